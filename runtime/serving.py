"""The serving loop of ``aflkd serve``: a stream of images through a height split, re-planned between images.

Every rank runs :func:`serve_stream`.  Before image ``k`` the root broadcasts one
decision ``[kind, image id, plan epoch, ranks]``: *serve* the image, or
*re-plan* first (then the new row weights follow in one broadcast, and every
rank builds the new executor from them: the plan is a pure function of the
traced graph and the weights, which the job agreed on at start).  So a switch
happens only at an image boundary, and every image runs entirely under one
plan epoch.

After each image every rank sends the root the seconds it computed (its busy
time, halo waits excluded: :class:`BusyClock`) in one small ``Igather``; the
root feeds them to a :class:`runtime.rebalance.Rebalancer`, logs the result
(:class:`runtime.results_log.ResultsLog`, committed image by image) and
prints progress.  Every wait is bounded by the transport's deadline.

A slower board is emulated with :class:`Slowdown`: from the ``after``-th image
of the run the rank sleeps ``(1/speed - 1)`` times each compute step's
duration, as ``bench pipeline`` does for a whole stage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import transport as mpi
from .geometry import split_rows
from .rebalance import CutModel, Rebalancer, RebalanceRule
from .timing import NoClock

__all__ = ["Slowdown", "BusyClock", "ServeReport", "serve_stream", "serve_pipeline_stream", "top_k"]

KIND_SERVE, KIND_REPLAN = 0, 1


@dataclass(frozen=True)
class Slowdown:
    """Rank ``rank`` runs at ``speed`` (0 < speed <= 1) from the ``after``-th image served in this run on."""

    rank: int
    speed: float
    after: int = 0


class BusyClock(NoClock):
    """Seconds this rank computed in the split part of a pass since :meth:`reset`; with ``extra`` > 0 the rank
    also sleeps ``extra`` times each compute step's duration (an emulated slower board), counted as busy.

    The head (the root's layers after the gather) is not counted: the other ranks wait for it whatever the
    rows, so only the split part's time is proportional to a rank's share.  The emulation's sleep is owed
    and paid in slices of at least :data:`MIN_SLEEP_S` (and at the end of the split part), because one
    ``time.sleep`` per layer would add its own fixed cost of about 0.1 ms per call.
    """

    MIN_SLEEP_S = 0.002

    def __init__(self) -> None:
        self.busy = 0.0
        self.extra = 0.0
        self._counting = True
        self._owed = 0.0

    def reset(self) -> None:
        self.busy, self._counting, self._owed = 0.0, True, 0.0

    def now(self) -> float:
        return time.perf_counter()

    def spent(self, node: int, since: float) -> None:
        took = time.perf_counter() - since
        if self.extra > 0.0:
            self._owed += took * self.extra
            if self._owed >= self.MIN_SLEEP_S:
                took += self._pay()
        if self._counting:
            self.busy += took

    def _pay(self) -> float:
        start = time.perf_counter()
        time.sleep(self._owed)
        slept = time.perf_counter() - start
        self._owed -= slept
        return slept

    def split_done(self) -> None:
        if self._owed > 0.0 and self._counting:
            self.busy += self._pay()
        self._counting = False


def top_k(logits: torch.Tensor, k: int) -> list:
    """``[[class, logit], ...]`` of the first image, best first (float logits, rounded to 6 digits)."""
    k = min(k, logits.shape[-1])
    values, classes = torch.topk(logits[0].float(), k)
    return [[int(c), round(float(v), 6)] for c, v in zip(classes, values)]


@dataclass
class ServeReport:
    """What the root measured: one record per image, the switches, the totals."""

    images: list = field(default_factory=list)  # [image, t_done_s, latency_ms, epoch, busy_ms per rank]
    switches: list = field(default_factory=list)  # {"at": k, "image": id, "epoch": e, "weights": [...], "rule": {...}}
    seconds: float = 0.0

    def throughput(self, first: int = 0, last: Optional[int] = None) -> float:
        """Images per second between the ``first``-th and ``last``-th image served (their completion times)."""
        rows = self.images[first:last]
        if len(rows) < 2:
            return 0.0
        return (len(rows) - 1) / max(rows[-1][1] - rows[0][1], 1e-9)


def serve_stream(comm, build: Callable[[Sequence[float]], object], weights: Sequence[float], height: int,
                 todo: Optional[list], image_of: Optional[Callable[[int], torch.Tensor]],
                 record: Optional[Callable[[int, list, int, float], None]] = None,
                 rule: Optional[RebalanceRule] = None, slowdowns: Sequence[Slowdown] = (), rate: float = 0.0,
                 topk: int = 5, progress: Optional[Callable[[ServeReport], None]] = None,
                 progress_every_s: float = 5.0) -> Optional[ServeReport]:
    """Serve the root's ``todo`` image ids in order (other ranks pass None); returns the root's report.

    ``build(weights)`` makes this rank's executor for a plan with those row
    weights; ``image_of(id)`` reads an image (root only); ``record(id, topk,
    epoch, latency_ms)`` stores a result (root only); ``rule`` None: never
    re-plan.  ``rate`` > 0: image ``k`` arrives ``k / rate`` s after the start
    (latency counts from then); 0: each arrives when the previous one is done.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    root = rank == 0
    count = mpi.bcast_ints(comm, (len(todo) if root else 0,), 0, "the number of images to serve")[0]
    weights = list(weights)
    executor = build(weights)
    rebalancer = Rebalancer(weights, rule) if root and rule is not None else None
    clock = BusyClock()
    slow = {s.after: s.speed for s in slowdowns if s.rank == rank}
    report = ServeReport() if root else None
    decision = torch.zeros(4, dtype=torch.int64)
    epoch, proposal = 0, None
    start = last_progress = time.monotonic()
    for k in range(count):
        if k in slow:
            clock.extra = 1.0 / slow[k] - 1.0
        if root:
            kind = KIND_REPLAN if proposal is not None else KIND_SERVE
            decision[:] = torch.tensor([kind, todo[k], epoch + (kind == KIND_REPLAN), size])
        mpi.bcast_tensor(comm, decision, 0, "the root's decision before the next image")
        if int(decision[0]) == KIND_REPLAN:
            weights = _new_plan(comm, proposal, size, torch.float64, "the root's new row weights")
            executor.close()
            executor = build(weights)
            epoch = int(decision[2])
            if root:
                _switched(report, rebalancer, k, todo[k], epoch, "weights", weights)
                proposal = None
        image, arrived = None, None
        if root:
            arrived = start + k / rate if rate > 0 else time.monotonic()
            if rate > 0 and time.monotonic() < arrived:
                time.sleep(arrived - time.monotonic())
            image = image_of(todo[k])
        clock.reset()
        out = executor(image, clock=clock)
        busy = mpi.gather_floats(comm, [clock.busy], 0, "the ranks' compute times")
        if not root:
            continue
        done = time.monotonic()
        latency_ms = 1000 * (done - arrived)
        if record is not None:
            record(todo[k], top_k(out, topk), epoch, latency_ms)
        report.images.append([todo[k], done - start, latency_ms, epoch, (1000 * busy[:, 0]).round(3).tolist()])
        if rebalancer is not None:
            new = rebalancer.observe(busy[:, 0])
            if new is not None and split_rows(height, new) != split_rows(height, weights):
                proposal = new
            elif new is not None:
                rebalancer.declined()
        if progress is not None and done - last_progress >= progress_every_s:
            report.seconds = done - start
            progress(report)
            last_progress = done
    if root:
        report.seconds = time.monotonic() - start
    return report


def _new_plan(comm, proposal: Optional[list], length: int, dtype: torch.dtype, what: str) -> list:
    """The root's proposal (row weights or stage cuts), broadcast: every rank switches to the same plan."""
    plan = torch.tensor(proposal if proposal is not None else [0] * length, dtype=dtype)
    mpi.bcast_tensor(comm, plan, 0, what)
    return plan.tolist()


def _switched(report: ServeReport, rebalancer: Rebalancer, k: int, image: int, epoch: int, key: str,
              plan: list) -> None:
    """The root's record of a switch: the rule restarts its window, the report keeps what and why."""
    rebalancer.switched(plan)
    report.switches.append({"at": k, "image": image, "epoch": epoch, key: plan, "rule": dict(rebalancer.last)})


def serve_pipeline_stream(comm, build: Callable[[Sequence[int]], object], bounds: Sequence[int],
                          todo: Optional[list], image_of: Optional[Callable[[int], torch.Tensor]],
                          record: Optional[Callable[[int, list, int, float], None]] = None,
                          rule: Optional[RebalanceRule] = None, model: Optional[CutModel] = None,
                          chunk: int = 20, slowdowns: Sequence[Slowdown] = (), topk: int = 5,
                          progress: Optional[Callable[[ServeReport], None]] = None,
                          progress_every_s: float = 5.0) -> Optional[ServeReport]:
    """Serve the root's ``todo`` through a pipeline, ``chunk`` images at a time, re-cutting the stages between
    chunks; returns the root's report (other ranks pass None for ``todo`` and get None).

    ``build(bounds)`` makes this rank's :class:`runtime.pipeline.PipelineExecutor` for those stage cuts (every
    rank holds the whole model, so that a cut can move).  Images stream through the stages with several in
    flight; between two chunks the root broadcasts one decision ``[kind, first, count, epoch]`` and, to
    re-plan, the new cuts.  Each rank's busy seconds of a chunk (its stage's compute, an emulated slowdown
    included; the head on the root excluded), image by image, feed the :class:`Rebalancer` with ``model``
    (stage cuts predicted from layer costs) under the same rule as the flat split; a proposal made inside a
    chunk is taken at the chunk's end.  A slowdown starts at its image exactly: chunks end there.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    root = rank == 0
    count = mpi.bcast_ints(comm, (len(todo) if root else 0,), 0, "the number of images to serve")[0]
    bounds = list(bounds)
    executor = build(bounds)
    rebalancer = Rebalancer(bounds, rule, model) if root and rule is not None and model is not None else None
    mine = sorted((s.after, s.speed) for s in slowdowns if s.rank == rank)
    starts = sorted({s.after for s in slowdowns if 0 < s.after < count})
    report = ServeReport() if root else None
    decision = torch.zeros(4, dtype=torch.int64)
    epoch, proposal, k = 0, None, 0
    start = last_progress = time.monotonic()
    while k < count:
        if root:
            n = min(chunk, count - k, *[a - k for a in starts if a > k])
            kind = KIND_REPLAN if proposal is not None else KIND_SERVE
            decision[:] = torch.tensor([kind, k, n, epoch + (kind == KIND_REPLAN)])
        mpi.bcast_tensor(comm, decision, 0, "the root's decision before the next images")
        n = int(decision[2])
        if int(decision[0]) == KIND_REPLAN:
            bounds = _new_plan(comm, proposal, len(bounds), torch.int64, "the root's new stage cuts")
            executor.close()
            executor = build(bounds)
            epoch = int(decision[3])
            if root:
                _switched(report, rebalancer, k, todo[k], epoch, "bounds", bounds)
                proposal = None
        speed = next((sp for after, sp in reversed(mine) if after <= k), 1.0)
        executor.speed = speed
        images = [image_of(todo[i]) for i in range(k, k + n)] if root else None
        began = time.monotonic()
        result = executor.stream(images)
        if root:
            busy = np.asarray(result.busy_images, dtype=float).T  # (image, rank)
            for i, out in enumerate(result.outputs):
                done = began + result.seconds * (i + 1) / n - start  # spread over the chunk (one figure per chunk)
                latency_ms = 1000 * result.latencies[i]
                if record is not None:
                    record(todo[k + i], top_k(out, topk), epoch, latency_ms)
                report.images.append([todo[k + i], done, latency_ms, epoch, (1000 * busy[i]).round(3).tolist()])
                if rebalancer is not None and proposal is None:
                    new = rebalancer.observe(busy[i])
                    if new is not None and list(new) != bounds:
                        proposal = list(new)
                    elif new is not None:
                        rebalancer.declined()
            if progress is not None and time.monotonic() - last_progress >= progress_every_s:
                report.seconds = time.monotonic() - start
                progress(report)
                last_progress = time.monotonic()
        k += n
    executor.close()
    if root:
        report.seconds = time.monotonic() - start
    return report


def busy_fraction(report: ServeReport) -> list[float]:
    """Each rank's compute time over the wall time of the run (1.0: never idle)."""
    if not report.images or report.seconds <= 0:
        return []
    busy = np.sum([row[4] for row in report.images], axis=0) / 1000.0
    return (busy / report.seconds).round(3).tolist()
