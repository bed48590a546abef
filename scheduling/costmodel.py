"""The paper's cost models f (computation) and g (communication), Eq. 3-4, and their fits.

In both functions ``c`` is the number of cores given to *communication*
(the edge-KD paper, Sec. III-A): the rest of the ``c_total`` cores compute.

* ``f(x, c) = a1*x / (1 - a2*c)``: time to compute workload ``x`` (e.g. batches of
  forward or backward) while ``c`` cores are taken by communication; ``c = 0``
  means computation has every core.  Fitted by linear least squares on the
  *rate*: ``x / f = 1/a1 - (a2/a1)*c`` is linear in ``(1, c)``; with
  ``p0, p1`` the intercept and slope, ``a1 = 1/p0`` and ``a2 = -p1/p0``.
* ``g(y, c) = y / (b1*c + b2*log(b3*c))``: time to receive and decode ``y``
  (e.g. MiB of teacher logits) with ``c`` communication cores (``c >= 1``).
  Change of variables: ``y / g = b1*c + b2*log(c) + (b2*log(b3))`` is linear
  in ``(c, log c, 1)``; with ``beta0`` the intercept, ``b3 = exp(beta0/b2)``.

Both linear fits weight each point by ``1/rate`` so that they minimise the
*relative* error (to first order), and each fit reports the RMS relative error
of the fitted time against the measured time.  Too few points, a singular
system, or constants that make f or g non-positive (or infinite) on the fitted
range raise :class:`~runtime.errors.UsageError`; a fit never returns NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from runtime.errors import UsageError

__all__ = ["CompModel", "CommModel", "CostModel", "f", "g", "fit_f", "fit_g", "PAPER_LIKE"]


def f(x: float, c: float, a1: float, a2: float) -> float:
    """Computation time of workload ``x`` with ``c`` cores given to communication (Eq. 3)."""
    return a1 * x / (1.0 - a2 * c)


def g(y: float, c: float, b1: float, b2: float, b3: float) -> float:
    """Communication time of data ``y`` with ``c >= 1`` communication cores (Eq. 4)."""
    return y / (b1 * c + b2 * math.log(b3 * c))


@dataclass(frozen=True)
class CompModel:
    """f's constants; ``rms_rel_error`` is the fit's RMS relative error (0 when given, not fitted)."""
    a1: float
    a2: float
    rms_rel_error: float = 0.0
    points: int = 0

    def time(self, x: float, c: int) -> float:
        return f(x, c, self.a1, self.a2)

    def check(self, c_max: int, measured: bool = False) -> None:
        """Raise unless f is positive and finite for c = 0..c_max communication cores, and does not fall as
        communication takes cores (a2 >= 0).  ``measured``: a fit as measured, which may say a2 < 0 (noise):
        kept as data, refused only where it would be planned with."""
        if not (math.isfinite(self.a1) and math.isfinite(self.a2)) or self.a1 <= 0 or 1.0 - self.a2 * c_max <= 0 \
                or 1.0 - self.a2 * 0 <= 0:
            raise UsageError(f"f's constants a1={self.a1:g}, a2={self.a2:g} make computation time non-positive or "
                             f"infinite for c in 0..{c_max}; need a1 > 0 and a2*c < 1 (measure more points)")
        if self.a2 < 0 and not measured:
            raise UsageError(f"f's constant a2={self.a2:g} < 0 says computation gets faster the more cores "
                             "communication takes from it: a fit of noise (the planner would give communication "
                             "every core but one); measure on a quiet machine, with more points")


@dataclass(frozen=True)
class CommModel:
    """g's constants; ``rms_rel_error`` is the fit's RMS relative error (0 when given, not fitted)."""
    b1: float
    b2: float
    b3: float
    rms_rel_error: float = 0.0
    points: int = 0

    def time(self, y: float, c: int) -> float:
        if c < 1:
            raise UsageError(f"g needs at least 1 communication core, got c={c}")
        return g(y, c, self.b1, self.b2, self.b3)

    def check(self, c_max: int) -> None:
        """Raise unless g is positive and finite for c = 1..c_max communication cores."""
        ok = all(math.isfinite(v) for v in (self.b1, self.b2, self.b3)) and self.b3 > 0
        if ok:
            ok = all(self.b1 * c + self.b2 * math.log(self.b3 * c) > 0 for c in range(1, c_max + 1))
        if not ok:
            raise UsageError(f"g's constants b1={self.b1:g}, b2={self.b2:g}, b3={self.b3:g} make communication "
                             f"time non-positive or infinite for c in 1..{c_max}; need b3 > 0 and "
                             f"b1*c + b2*log(b3*c) > 0 (measure more points)")


@dataclass(frozen=True)
class CostModel:
    """f and g together, and where their constants came from (``source``)."""
    comp: CompModel
    comm: CommModel
    source: str = "given"

    def comp_time(self, x: float, c_comm: int) -> float:
        return self.comp.time(x, c_comm)

    def comm_time(self, y: float, c_comm: int) -> float:
        return self.comm.time(y, c_comm)

    def check(self, c_total: int) -> None:
        """Raise unless f (c = 0..c_total-1) and g (c = 1..c_total) are positive and finite."""
        self.comp.check(c_total - 1)
        self.comm.check(c_total)

    def to_json(self) -> dict:
        return {"source": self.source,
                "f": {"a1": self.comp.a1, "a2": self.comp.a2, "rms_rel_error": self.comp.rms_rel_error,
                      "points": self.comp.points},
                "g": {"b1": self.comm.b1, "b2": self.comm.b2, "b3": self.comm.b3,
                      "rms_rel_error": self.comm.rms_rel_error, "points": self.comm.points}}

    @staticmethod
    def from_json(data: dict, source: str = "file") -> "CostModel":
        try:
            fa, ga = data["f"], data["g"]
            comp = CompModel(float(fa["a1"]), float(fa["a2"]), float(fa.get("rms_rel_error", 0.0)),
                             int(fa.get("points", 0)))
            comm = CommModel(float(ga["b1"]), float(ga["b2"]), float(ga["b3"]),
                             float(ga.get("rms_rel_error", 0.0)), int(ga.get("points", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise UsageError(f"constants file needs f.a1, f.a2, g.b1, g.b2, g.b3 (as written by "
                             f"'aflkd schedule profile'): {err!r}") from None
        return CostModel(comp, comm, data.get("source", source))


PAPER_LIKE = CostModel(CompModel(a1=1.0, a2=0.06), CommModel(b1=0.35, b2=1.0, b3=1.0),
                       source="built-in (paper's Fig. 4 shape; the paper prints no constants)")
"""Default constants.  The paper plots f and g (Fig. 4, x = y = 1, 6..12 cores) but prints no constants;
these give the same shape: computation slows as communication takes cores (a2*c < 1 up to 12 cores),
communication speeds up with diminishing returns."""


def _arrays(work, cores, times, what: str):
    w, c, t = (np.asarray(v, dtype=float) for v in (work, cores, times))
    if not (w.shape == c.shape == t.shape) or w.ndim != 1:
        raise UsageError(f"{what}: workloads, cores and times must be three lists of equal length")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(c)) and np.all(np.isfinite(t))):
        raise UsageError(f"{what}: measurements must be finite numbers")
    if np.any(w <= 0) or np.any(t <= 0):
        raise UsageError(f"{what}: workloads and times must be positive")
    return w, c, t


def _weighted_lstsq(features: np.ndarray, rate: np.ndarray, what: str) -> np.ndarray:
    weights = 1.0 / rate
    a = features * weights[:, None]
    b = rate * weights
    if np.linalg.matrix_rank(a) < features.shape[1]:
        raise UsageError(f"{what}: the fit is singular (the points do not vary the cores enough); "
                         f"measure more distinct core counts")
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    if not np.all(np.isfinite(sol)):
        raise UsageError(f"{what}: the fit failed (non-finite constants)")
    return sol


def _rms_rel(model_times: np.ndarray, times: np.ndarray) -> float:
    return float(np.sqrt(np.mean(((model_times - times) / times) ** 2)))


def fit_f(work: Sequence[float], comm_cores: Sequence[int], times: Sequence[float],
          nonnegative: bool = False) -> CompModel:
    """Fit a1, a2 of f from computation times measured with ``comm_cores`` cores taken by communication.

    Needs at least 2 distinct core counts (and 3 points, so the fit error means something).
    ``nonnegative``: the least-squares fit within a2 >= 0 (taking cores from computation cannot speed it
    up): where the free fit says a2 < 0 (noise), a2 = 0 and a1 fits the rates alone.  Without it the free
    fit is returned as measured (:meth:`CompModel.check` refuses a2 < 0 where it would be planned with).
    """
    x, c, t = _arrays(work, comm_cores, times, "fit of f")
    if np.any(c < 0):
        raise UsageError("fit of f: communication cores must be >= 0")
    if len(np.unique(c)) < 2 or len(x) < 3:
        raise UsageError(f"fit of f needs >= 3 points over >= 2 distinct communication core counts; got "
                         f"{len(x)} points over {len(np.unique(c))} core counts (vary the workload x too)")
    p0, p1 = _weighted_lstsq(np.stack([np.ones_like(c), c], axis=1), x / t, "fit of f")
    if p0 <= 0:
        raise UsageError(f"fit of f failed: the fitted rate at c=0 is {p0:g} <= 0")
    model = CompModel(a1=float(1.0 / p0), a2=float(-p1 / p0), points=len(x))
    if nonnegative and model.a2 < 0:
        rate = x / t  # the same weighted least squares with the intercept alone: weights 1/rate
        model = CompModel(a1=float(np.sum(1.0 / rate ** 2) / np.sum(1.0 / rate)), a2=0.0, points=len(x))
    model.check(int(c.max()), measured=True)
    err = _rms_rel(np.array([model.time(xi, ci) for xi, ci in zip(x, c)]), t)
    return CompModel(model.a1, model.a2, err, len(x))


def fit_g(data: Sequence[float], comm_cores: Sequence[int], times: Sequence[float]) -> CommModel:
    """Fit b1, b2, b3 of g from communication times measured with ``comm_cores`` cores.

    g has three constants, so it needs at least 3 distinct core counts (>= 1) and 4 points.
    """
    y, c, t = _arrays(data, comm_cores, times, "fit of g")
    if np.any(c < 1):
        raise UsageError("fit of g: communication cores must be >= 1")
    if len(np.unique(c)) < 3 or len(y) < 4:
        raise UsageError(f"fit of g needs >= 4 points over >= 3 distinct communication core counts (its 3 "
                         f"constants are linear in (c, log c, 1)); got {len(y)} points over "
                         f"{len(np.unique(c))} core counts")
    b1, b2, beta0 = _weighted_lstsq(np.stack([c, np.log(c), np.ones_like(c)], axis=1), y / t, "fit of g")
    if abs(b2) < 1e-12 * max(1.0, abs(b1)):
        raise UsageError("fit of g failed: b2 is 0, so b3 is undetermined (g is linear in c); "
                         "measure more distinct core counts")
    b3 = math.exp(beta0 / b2) if beta0 / b2 < 700 else math.inf
    model = CommModel(b1=float(b1), b2=float(b2), b3=b3, points=len(y))
    model.check(int(c.max()))
    err = _rms_rel(np.array([model.time(yi, int(ci)) if float(ci).is_integer() else
                             g(yi, ci, model.b1, model.b2, model.b3) for yi, ci in zip(y, c)]), t)
    return CommModel(model.b1, model.b2, model.b3, err, len(y))
