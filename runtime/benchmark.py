"""Per-layer benchmark of split inference against unsplit and against this machine's bound.

Timed in every repetition, interleaved so that machine noise hits them alike,
after warm-up passes:

* **unsplit** -- rank 0 runs the whole conv stack alone (the other ranks wait),
  through the executor on one process; the plain ``nn.Sequential`` call is timed
  too (``unsplit_torch_ms``), for reference;
* **split** -- every rank runs :meth:`SplitExecutor.forward_local` with halo exchange;
* **bound** -- every rank, at the same time, runs the conv stack on only its own
  input rows as if they were a whole image, with no exchange at all, through
  the same executor code on ``COMM_SELF`` (same buffers, same kernels).  This is
  what P processes sharing this machine's cores, caches and memory bandwidth can
  do at best.

``efficiency`` is the median over repetitions of ``bound / split`` taken within
the same repetition (paired, so slow drifts of this shared machine cancel);
``split_ms`` and ``bound_ms`` are the medians of each on its own.

"Conv stack" is every layer before the Flatten (the paper's Fig. 10 leaves the
FC layers out too); scatter, gather and the head are in ``end_to_end_ms``.
"""
from __future__ import annotations

from statistics import median
from time import perf_counter

import numpy as np
import torch
import torch.nn as nn
from mpi4py import MPI
from tqdm import tqdm

from .comm import scatter_rows
from .geometry import output_height
from .split import SplitExecutor
from .timing import LayerClock, LayerRow, Report, analytic_min_bytes

__all__ = ["bench_layers"]


def _timed_stack(modules, x: torch.Tensor) -> float:
    """The plain torch module chain, for reference."""
    start = perf_counter()
    for module in modules:
        x = module(x)
    return perf_counter() - start


def _runs_alone(plan, rows: int) -> bool:
    """Whether ``rows`` input rows survive the stack as a standalone image (the bound needs it)."""
    for layer in plan.layers:
        if layer.spec.spatial:
            try:
                rows = output_height(rows, layer.spec.height)
            except ValueError:
                return False
    return True


@torch.no_grad()
def bench_layers(
    comm: MPI.Comm,
    model: nn.Sequential,
    image: torch.Tensor | None,
    *,
    net: str,
    batch: int,
    repeat: int,
    warmup: int,
    weights,
    threads: int,
    progress: bool = True,
) -> Report | None:
    """Run the benchmark on every rank; return the :class:`Report` on rank 0, None elsewhere.

    ``model`` must be in eval mode and channels-last on every rank (its head is
    used on rank 0 only); ``image`` is the ``(N, C, H, W)`` input on rank 0.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    channels = model[0].in_channels
    height, width = comm.bcast(tuple(image.shape[2:]) if rank == 0 else None, root=0)
    executor = SplitExecutor(model, (channels, height, width), comm, weights)
    plan = executor.plan
    layers = len(plan.layers)
    own_rows = plan.input_rows[rank]
    alone = comm.allreduce(_runs_alone(plan, len(own_rows)), op=MPI.LAND)
    # The same executor on one process (COMM_SELF): for the unsplit run (rank 0, whole
    # image) and for the bound (every rank, its own rows as a whole image, no exchange).
    # Same code path and memory handling as the split, so only the split's cost differs.
    bounded = SplitExecutor(model, (channels, len(own_rows), width), MPI.COMM_SELF) if alone else None
    single = SplitExecutor(model, (channels, height, width), MPI.COMM_SELF) if rank == 0 else None

    full = image.contiguous(memory_format=torch.channels_last) if rank == 0 else None
    local = scatter_rows(comm, plan, image, batch).clone(memory_format=torch.channels_last)

    unsplit_clock = [LayerClock(layers) for _ in range(repeat)]
    split_clock = [LayerClock(layers) for _ in range(repeat)]
    split_s, bound_s, unsplit_s, torch_s, e2e_s = [], [], [], [], []
    steps = range(warmup + repeat)
    bar = tqdm(steps, desc=f"bench {net} x{size} ranks", disable=not progress or rank != 0, leave=False)
    for step in bar:
        k = step - warmup  # < 0 during warm-up
        # unsplit, rank 0 alone: through the executor, and as the plain torch module chain
        comm.Barrier()
        if rank == 0:
            x = full.clone(memory_format=torch.channels_last)
            start = perf_counter()
            single.forward_local(x, unsplit_clock[k] if k >= 0 else None)
            unsplit = perf_counter() - start
            plain = _timed_stack(executor.modules, full.clone(memory_format=torch.channels_last))
            if k >= 0:
                unsplit_s.append(unsplit)
                torch_s.append(plain)
        # split and bound, in alternating order so that neither always runs first
        for phase in ("split", "bound") if step % 2 == 0 else ("bound", "split"):
            x = local.clone(memory_format=torch.channels_last)
            comm.Barrier()
            start = perf_counter()
            if phase == "split":
                executor.forward_local(x, split_clock[k] if k >= 0 else None)
                elapsed = perf_counter() - start
            elif bounded is not None:
                bounded.forward_local(x)
                bound = perf_counter() - start
            else:
                bound = float("nan")
        # end to end, as a user calls it
        comm.Barrier()
        start = perf_counter()
        executor(image if rank == 0 else None, batch)
        e2e = perf_counter() - start
        if k >= 0:
            split_s.append(elapsed)
            bound_s.append(bound)
            e2e_s.append(e2e)

    # Small control data after the timed loop: the lower-case (pickling) API is fine here.
    per_rank = comm.gather(
        {
            "split": split_s, "bound": bound_s, "e2e": e2e_s,
            "compute": np.stack([c.compute for c in split_clock]),
            "halo": np.stack([c.halo for c in split_clock]),
            "bytes": split_clock[0].bytes if repeat else np.zeros(layers, np.int64),
            "rows": len(own_rows),
        },
        root=0,
    )
    output = executor(image if rank == 0 else None, batch)
    if rank != 0:
        return None
    reference = model(full)
    max_abs_error = float((output - reference).abs().max())

    # slowest rank per repetition, then the median over repetitions
    split_runs = np.max([r["split"] for r in per_rank], axis=0)
    bound_runs = np.max([r["bound"] for r in per_rank], axis=0)
    split_ms, bound_ms = 1e3 * median(split_runs), 1e3 * median(bound_runs)
    efficiency = float(median(bound_runs / split_runs))
    e2e_ms = 1e3 * median(per_rank[0]["e2e"])
    unsplit_ms = 1e3 * median(unsplit_s)
    unsplit_torch_ms = 1e3 * median(torch_s)
    compute = np.stack([r["compute"] for r in per_rank])  # (ranks, repeat, layers)
    halo = np.stack([r["halo"] for r in per_rank])
    total = compute + halo
    slowest = total.argmax(axis=0)  # (repeat, layers)
    halo_of_slowest = np.take_along_axis(halo, slowest[None], axis=0)[0]
    unsplit_layers = np.stack([c.compute for c in unsplit_clock])
    rows = []
    for i, layer in enumerate(plan.layers):
        rows.append(
            LayerRow(
                name=layer.name,
                unsplit_ms=1e3 * float(np.median(unsplit_layers[:, i])),
                split_ms=1e3 * float(np.median(total.max(axis=0)[:, i])),
                halo_ms=1e3 * float(np.median(halo_of_slowest[:, i])),
                bytes=int(sum(r["bytes"][i] for r in per_rank)),
                bytes_min=analytic_min_bytes(layer, batch),
            )
        )
    return Report(
        net=net, size=height, batch=batch, ranks=size, weights=list(plan.weights),
        threads_per_rank=threads, repeat=repeat,
        unsplit_ms=unsplit_ms, unsplit_torch_ms=unsplit_torch_ms, split_ms=split_ms, bound_ms=bound_ms,
        efficiency=efficiency, speedup=unsplit_ms / split_ms,
        end_to_end_ms=e2e_ms, max_abs_error=max_abs_error, layers=rows,
    )
