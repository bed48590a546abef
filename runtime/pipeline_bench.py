"""``aflkd bench pipeline``: a stream of images through clusters x stages, the planned cut against the naive one.

In one run, on the same ranks and the same images:

* one rank (rank 0, at its own emulated speed) runs the whole net, image by
  image: the images/s to beat;
* the **planned** cut (:func:`runtime.stages.partition_stages`, from a
  per-layer profile and the ranks' speeds) streams the images: images/s,
  single-image latency, each rank's busy time and the measured balance;
* the **equal-layer** cut (the same number of layers per stage, the same row
  shares) streams them too: its measured balance is the reference;
* the **re-planned** cut: the planned run's measured busy times give each rank
  an effective speed (the profile's time for its layers over the time it took,
  contention and emulated slowness included), the partitioner cuts again for
  those speeds, and the images stream once more (skipped when the cut is the
  same).  A profile taken on one rank alone misses what the stream adds.

Balance is the slowest stage's busy time over the mean (1.0: perfect); a
stage's busy time is its slowest cluster's (clusters wait for each other's
halos).  Rank 0's busy time includes the head it runs.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from . import transport as mpi
from .skeleton import empty_weights
from .errors import UsageError
from .graph import trace_model
from .pipeline import Grid, distribute_pipeline, split_head_plan
from .profile import LayerProfile, profile_layers, read_profile
from .stages import balance, equal_stages, min_share, partition_stages, split_layers, stage_times

__all__ = ["bench_pipeline", "measured_replan"]

CL = torch.channels_last


def _speed_grid(grid: Grid, speeds: Sequence[float]) -> list[list[float]]:
    return [[speeds[grid.rank(c, s)] for s in range(grid.stages)] for c in range(grid.clusters)]


def measured_replan(costs: Sequence[float], out_bytes: Sequence[float], grid: Grid, bounds: Sequence[int],
                    shares: Sequence[float], compute_s: Sequence[float], head_s: float,
                    bandwidth: float = float("inf"), min_share: float = 0.0):
    """The cut for the speeds the ranks showed (a pure decision): rank r's effective speed is the profile's
    seconds for its layers and rows at speed 1 over ``compute_s[r]``, its measured compute seconds per image
    (rank 0's without the head, whose measured ``head_s`` it keeps as fixed work).  Row shares stay."""
    from .rebalance import CutModel  # the serving rebalancer's speeds from busy times, the same rule

    speeds = CutModel(tuple(costs), tuple(out_bytes), grid.clusters, grid.stages, tuple(shares)).speeds(bounds,
                                                                                                         compute_s)
    extra = [[0.0] * grid.stages for _ in range(grid.clusters)]
    extra[0][0] = head_s * speeds[0][0]  # stage_times divides fixed work by the speed too
    return partition_stages(costs, out_bytes, speeds, bandwidth, extra, shares=shares, min_share=min_share)


def _one_rank(model: nn.Module, images: list, speed: float) -> float:
    """Seconds for rank 0 alone to run every image through the whole model (its emulated speed)."""
    with torch.no_grad():
        model(images[0].contiguous(memory_format=CL))  # warm-up
        start = time.perf_counter()
        for x in images:
            t0 = time.perf_counter()
            model(x.contiguous(memory_format=CL))
            if speed != 1.0:
                time.sleep((time.perf_counter() - t0) * (1.0 / speed - 1.0))
        return time.perf_counter() - start


def _run_cut(name: str, build, model, in_shape, grid, bounds, shares, comm, speed, images, latency_repeat,
             planned_seconds, head) -> Optional[dict]:
    executor = distribute_pipeline(build, in_shape, grid, bounds, shares, comm, speed=speed, root_model=model,
                                   head=head)
    root = comm.Get_rank() == 0
    executor.stream(images[:2] if root else None)  # warm-up: buffers, messages, caches
    timed = executor.stream(images if root else None)
    latencies = []
    for _ in range(latency_repeat):
        one = executor.stream(images[:1] if root else None)
        if root:
            latencies.append(one.latencies[0])
    executor.close()
    if not root:
        return None
    count = len(images)
    busy = list(timed.busy)
    busy[0] += timed.head_seconds
    per_stage = [max(busy[grid.rank(c, s)] for c in range(grid.clusters)) / count for s in range(grid.stages)]
    with torch.no_grad():
        error = max(float((model(x) - y).abs().max()) for x, y in zip(images, timed.outputs))
    return {
        "cut": name,
        "bounds": list(bounds),
        "layers_per_stage": [b - a for a, b in zip(bounds, bounds[1:])],
        "shares": list(shares),
        "planned_stage_ms": [1e3 * t for t in planned_seconds],
        "balance_planned": balance(planned_seconds),
        "busy_ms_per_image": [1e3 * b / count for b in busy],
        "compute_ms_per_image": [1e3 * b / count for b in timed.busy],  # rank 0's without the head
        "head_ms_per_image": 1e3 * timed.head_seconds / count,
        "stage_busy_ms": [1e3 * t for t in per_stage],
        "balance_measured": balance(per_stage),
        "images_per_s": count / timed.seconds,
        "latency_ms": 1e3 * statistics.median(latencies),
        "max_abs_error": error,
    }


def bench_pipeline(comm: mpi.Comm, build: Callable[[], nn.Module], in_shape: tuple[int, int, int], grid: Grid,
                   speeds: Optional[Sequence[float]] = None, images: int = 16, batch: int = 1,
                   latency_repeat: int = 5, bandwidth: float = float("inf"), profile: Optional[str] = None,
                   net: str = "", seed: int = 0, progress: Optional[Callable[[str], None]] = None,
                   head: str = "gather", emulate: bool = True) -> Optional[dict]:
    """Run the benchmark on every rank of ``comm``; the report (a dict) on rank 0, None elsewhere.

    ``speeds``: one relative speed per rank, scaled so the fastest is 1 (runs
    as is); a rank at 0.5 sleeps as long as it computed, a board half as fast.  ``profile``: a file from
    ``aflkd profile`` for this net and size; without one, rank 0 measures the
    layers first (the others sleep meanwhile).  ``head``: ``gather`` (rank 0
    runs the head on the gathered map) or ``split`` (the last stage's ranks
    multiply their rows by their columns of the first Linear, one Reduce).  ``emulate`` False: the speeds
    only plan the cut and every rank runs at its own speed (real boards of unequal speed: sleeping on top
    of a slow board would count its slowness twice).
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    speeds = [1.0] * size if speeds is None else [float(s) for s in speeds]
    if len(speeds) != size:
        raise UsageError(f"--speeds has {len(speeds)} values but the job has {size} ranks; give one per rank")
    if any(not s > 0 for s in speeds):
        raise UsageError(f"--speeds must be positive, got {speeds}")
    top = max(speeds)
    speeds = [s / top for s in speeds]  # relative: the fastest rank runs as is, the others are slowed down
    if grid.size != size:
        raise UsageError(f"{grid.clusters} clusters x {grid.stages} stages need {grid.size} ranks but the job has "
                         f"{size}; run mpiexec -n {grid.size}")
    note = progress or (lambda text: None)
    with empty_weights():
        skeleton = build().eval()
    layers = split_layers(trace_model(skeleton, in_shape))
    torch.manual_seed(seed)
    model = build().eval() if rank == 0 else None  # the others get their stage's weights from rank 0
    if grid.stages > len(layers):
        raise UsageError(f"{grid.stages} stages but {net or 'the net'} has only {len(layers)} layers to share; "
                         f"use at most {len(layers)} devices per cluster")

    def measure() -> LayerProfile:
        if profile is not None:
            return read_profile(profile, layers)
        note(f"profiling {len(layers)} layers on rank 0")
        return profile_layers(model, layers, net, batch)

    prof, problem = None, None
    if rank == 0:
        try:
            prof = measure()
        except UsageError as err:
            problem = str(err)
    mpi.idle_barrier(comm, "the layer profile on rank 0", timeout_s=mpi.long_wait_s())  # the others sleep while rank 0 times the layers, instead of spinning on a core
    prof, problem = mpi.bcast_object(comm, (prof, problem))
    if problem is not None:
        raise mpi.AgreedError(problem)
    speed_grid = _speed_grid(grid, speeds)
    extra = [[0.0] * grid.stages for _ in range(grid.clusters)]
    costs = list(prof.seconds)
    head_split, head_note = split_head_plan(layers, [1.0] * grid.clusters) if head == "split" else (None, "")
    if head == "split" and head_split is None:
        raise UsageError(f"--head split: {head_note}; use --head gather")
    if head_split is None:
        extra[0][0] = prof.head_seconds  # rank 0 runs the head beside its stage
    else:
        costs[-1] += prof.head_seconds  # the last stage's ranks run it, each on its own rows' columns
    planned = partition_stages(costs, prof.out_bytes, speed_grid, bandwidth, extra,
                               min_share=min_share(layers, grid.clusters))
    equal = equal_stages(len(layers), grid.stages)
    equal_planned = stage_times(costs, prof.out_bytes, speed_grid, equal, planned.shares, bandwidth, extra)
    equal_seconds = [max(row[s] for row in equal_planned) for s in range(grid.stages)]

    gen = torch.Generator().manual_seed(seed + 1)
    stream = [torch.randn(batch, *in_shape, generator=gen) for _ in range(images)] if rank == 0 else None
    note("one rank, whole net")
    alone = None
    if rank == 0:
        alone = _one_rank(model, stream, speeds[0] if emulate else 1.0)
    mpi.idle_barrier(comm, "the one-rank run on rank 0", timeout_s=mpi.long_wait_s())
    runs = []
    for name, bounds, seconds in (("planned", planned.bounds, planned.stage_seconds),
                                  ("equal layers", equal, equal_seconds)):
        note(f"{name} cut {list(bounds)}")
        runs.append(_run_cut(name, build, model, in_shape, grid, bounds, planned.shares, comm,
                             speeds[rank] if emulate else 1.0,
                             stream, latency_repeat, seconds, head))
    replanned, problem = None, None
    if rank == 0 and head_split is None:  # with a split head the last stage's time holds the head: not modelled
        first = runs[0]
        try:
            replanned = measured_replan(costs, prof.out_bytes, grid, planned.bounds, planned.shares,
                                        [t / 1e3 for t in first["compute_ms_per_image"]],
                                        first["head_ms_per_image"] / 1e3, bandwidth, min_share(layers, grid.clusters))
        except UsageError as err:  # agreed below: every rank ends with the same line
            problem = f"re-planning from the measured busy times: {err}"
    replanned, problem = mpi.bcast_object(comm, (replanned, problem))
    if problem is not None:
        raise mpi.AgreedError(problem)
    if replanned is not None and tuple(replanned.bounds) != tuple(planned.bounds):
        note(f"re-planned cut {list(replanned.bounds)} (from the measured busy times)")
        runs.append(_run_cut("re-planned", build, model, in_shape, grid, replanned.bounds, planned.shares, comm,
                             speeds[rank] if emulate else 1.0, stream, latency_repeat, replanned.stage_seconds,
                             head))
    if rank != 0:
        return None
    one_rank_ips = images * batch / alone
    for run in runs:
        run["images_per_s"] *= batch
    plan_run, equal_run = runs[0], runs[1]
    again = runs[2] if len(runs) > 2 else None
    return {
        "net": net,
        "size": in_shape[1],
        "batch": batch,
        "head": head,
        "clusters": grid.clusters,
        "stages": grid.stages,
        "ranks": size,
        "speeds": speeds,
        "speeds_emulated": emulate,
        "images": images * batch,
        "layers": len(layers),
        "profile": asdict(prof),
        "one_rank_images_per_s": one_rank_ips,
        "pipeline_images_per_s": plan_run["images_per_s"],
        "throughput_ratio": plan_run["images_per_s"] / one_rank_ips,
        # every rank busy all the time at its speed: one rank's throughput times the sum of speeds over its own
        "ideal_ratio": sum(speeds) / speeds[0],
        "throughput_vs_ideal": plan_run["images_per_s"] / one_rank_ips / (sum(speeds) / speeds[0]),
        "one_rank_latency_ms": 1e3 * alone / images,
        "latency_ms": plan_run["latency_ms"],
        "balance_planned": plan_run["balance_planned"],
        "balance_measured": plan_run["balance_measured"],
        "equal_split_balance_planned": equal_run["balance_planned"],
        "equal_split_balance_measured": equal_run["balance_measured"],
        "replanned_bounds": list(replanned.bounds) if replanned is not None else None,
        "replanned_images_per_s": again["images_per_s"] if again else None,
        "replanned_balance_measured": again["balance_measured"] if again else None,
        "max_abs_error": max(run["max_abs_error"] for run in runs),
        "runs": runs,
    }
