"""When to re-plan a height split from measured per-rank compute times, and to what shares (pure decisions).

Each rank reports the seconds it computed for an image (its busy time, halo
waits excluded).  With shares ``w`` (the plan's weights, normalised) a rank's
cost per unit of share is ``c_r = busy_r / w_r``; the shares that would finish
every rank together are ``w'_r ∝ 1 / c_r``, and the image would then take
``1 / Σ_r (1 / c_r)`` instead of ``max_r busy_r``.

Noise (this machine runs ±25% from one image to the next) and the fixed cost
of halo rows must not make the plan flap, so a switch needs all of:

* a full ``window`` of images since the last switch (the first ``settle``
  images after a switch are not counted: caches and buffers warm up);
* the per-rank medians over that window imbalanced, ``max / mean > threshold``,
  and a predicted gain, the re-planned time below ``(1 - min_gain)`` of the
  current one, both for ``patience`` images in a row (default half a window:
  by then most of the window is past a real change, so its medians measure the
  new speeds rather than a mix, and a passing spike has left).

After a switch the window starts again, so two switches are at least
``settle + window + patience - 1`` images apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

__all__ = ["RebalanceRule", "Rebalancer", "CutModel", "shares_from_busy", "predicted_time", "imbalance"]


@dataclass(frozen=True)
class RebalanceRule:
    """The switch rule's knobs (``aflkd serve --rebalance-*``)."""

    window: int = 20
    settle: int = 3
    threshold: float = 1.2
    min_gain: float = 0.1
    patience: int = 0  # 0: window // 2

    @property
    def needed(self) -> int:
        """Images in a row for which the switch condition must hold."""
        return self.patience or max(1, self.window // 2)

    def check(self) -> "RebalanceRule":
        """Refuse knobs that make no sense, in one line (they come from the command line)."""
        from .errors import UsageError

        if self.window < 1 or self.settle < 0 or self.patience < 0:
            raise UsageError(f"the rebalancing window must be >= 1 image and settle >= 0, got {self.window}, "
                             f"{self.settle}")
        if not self.threshold >= 1.0:
            raise UsageError(f"the rebalancing threshold is max/mean busy time, >= 1, got {self.threshold:g}")
        if not 0.0 <= self.min_gain < 1.0:
            raise UsageError(f"the rebalancing minimum gain is a fraction in [0, 1), got {self.min_gain:g}")
        return self


def _normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return w / w.sum()


def shares_from_busy(weights: Sequence[float], busy: Sequence[float]) -> list[float]:
    """Shares (summing to 1) that would equalise the ranks' busy times, each rank's cost per share held fixed."""
    cost = np.maximum(np.asarray(busy, dtype=float), 1e-9) / _normalised(weights)
    speed = 1.0 / cost
    return (speed / speed.sum()).tolist()


def predicted_time(weights: Sequence[float], busy: Sequence[float]) -> float:
    """Busy time of the slowest rank under :func:`shares_from_busy`'s shares (all ranks equal then)."""
    cost = np.maximum(np.asarray(busy, dtype=float), 1e-9) / _normalised(weights)
    return float(1.0 / np.sum(1.0 / cost))


def imbalance(busy: Sequence[float]) -> float:
    """max / mean of the ranks' busy times: 1.0 is perfectly balanced."""
    b = np.asarray(busy, dtype=float)
    return float(b.max() / b.mean()) if b.mean() > 0 else 1.0


@dataclass(frozen=True)
class CutModel:
    """What a pipeline's stage cuts predict, for the :class:`Rebalancer` (its plan is then the cuts, not shares).

    ``costs[l]``: seconds of layer ``l`` on the whole map at speed 1 (rank 0's profile); ``out_bytes[l]``: bytes
    of its output; ``shares``: the clusters' fixed row shares.  A rank's measured busy time over the time its
    layers and rows would take at speed 1 is its speed; the cuts that minimise the slowest (cluster, stage) at
    those speeds are :func:`runtime.stages.partition_stages`'s (exact for fixed shares), and the time they
    predict is that slowest stage.  Ranks are numbered as :class:`runtime.pipeline.Grid` numbers them.
    """

    costs: tuple[float, ...]
    out_bytes: tuple[float, ...]
    clusters: int
    stages: int
    shares: tuple[float, ...] = ()

    def _shares(self) -> tuple[float, ...]:
        return self.shares or (1.0,) * self.clusters

    def speeds(self, bounds: Sequence[int], busy: Sequence[float]) -> list[list[float]]:
        from .stages import stage_times

        ones = [[1.0] * self.stages for _ in range(self.clusters)]
        planned = stage_times(self.costs, self.out_bytes, ones, bounds, self._shares())
        return [[max(planned[c][k], 1e-12) / max(float(busy[c * self.stages + k]), 1e-9)
                 for k in range(self.stages)] for c in range(self.clusters)]

    def best(self, bounds: Sequence[int], busy: Sequence[float]):
        from .stages import partition_stages

        return partition_stages(self.costs, self.out_bytes, self.speeds(bounds, busy), shares=self._shares())

    def predicted(self, bounds: Sequence[int], busy: Sequence[float]) -> float:
        return float(max(self.best(bounds, busy).stage_seconds))

    def propose(self, bounds: Sequence[int], busy: Sequence[float]) -> list[int]:
        return list(self.best(bounds, busy).bounds)


@dataclass
class Rebalancer:
    """The root's running decision: feed it every image's busy times, it says when to switch and to what.

    Holds only the images seen since the last switch; :meth:`observe` proposes
    new weights when the rule says switch, else None.  The caller switches with
    :meth:`switched` (which starts a new window), or keeps the plan when the
    proposal rounds to the same rows.

    Every switch is a trial: the model behind it (busy time proportional to the
    share) ignores each rank's fixed cost per image, which grows in relative
    terms as a rank's share shrinks, so it can keep moving rows off a rank for
    no gain.  The first full window after a switch is therefore measured
    against the window before it; a switch that did not shorten the slowest
    rank's median by half of ``min_gain`` is reverted, and the window before the
    next proposal doubles (a back-off), so the plan never stays worse than one
    it had and switches grow rarer while they do not pay.
    """

    weights: Sequence[float]
    rule: RebalanceRule = field(default_factory=RebalanceRule)
    model: Optional[CutModel] = None  # None: the plan is row shares; else the plan is a pipeline's stage cuts
    _seen: int = 0
    _window: list = field(default_factory=list)
    _held: int = 0
    _backoff: int = 1
    _trial: Optional[tuple] = None  # (slowest median before the switch, the weights before it)
    _reverting: bool = False
    _proposed_from: Optional[float] = None
    last: dict = field(default_factory=dict)

    def observe(self, busy: Sequence[float]) -> Optional[list[float]]:
        self._seen += 1
        if self._seen <= self.rule.settle:
            return None
        self._window.append(list(busy))
        if len(self._window) < self.rule.window * self._backoff:
            return None
        median = np.median(np.asarray(self._window), axis=0)
        self._window.pop(0)
        now = float(median.max())
        then = predicted_time(self.weights, median) if self.model is None else self.model.predicted(self.weights,
                                                                                                     median)
        self.last = {"imbalance": imbalance(median), "busy_ms": (1000 * median).round(3).tolist(),
                     "now_ms": 1000 * now, "predicted_ms": 1000 * then}
        if self._trial is not None:
            before, previous = self._trial
            self._trial = None
            self.last["before_ms"] = 1000 * before
            if now > before * (1.0 - self.rule.min_gain / 2):
                self._backoff *= 2
                self._reverting = True
                self.last["revert"] = True
                return list(previous)
        if imbalance(median) <= self.rule.threshold or then >= (1.0 - self.rule.min_gain) * now:
            self._held = 0
            return None
        self._held += 1
        if self._held < self.rule.needed:
            return None
        self._proposed_from = now
        if self.model is not None:
            return self.model.propose(self.weights, median)
        return shares_from_busy(self.weights, median)

    def declined(self) -> None:
        """The proposal rounds to the rows the plan already has: nothing changes, nothing to judge."""
        self._reverting, self._proposed_from = False, None

    def switched(self, weights: Sequence[float]) -> None:
        """The plan now runs ``weights``: measure afresh from here (a forward switch is then judged)."""
        if not self._reverting and self._proposed_from is not None:
            self._trial = (self._proposed_from, list(self.weights))
        self._reverting, self._proposed_from = False, None
        self.weights = list(weights)
        self._seen, self._window, self._held = 0, [], 0
