"""Per-node benchmark of split inference against unsplit runs and against this machine's bound.

Timed in every repetition, interleaved so that machine noise hits them alike,
after warm-up passes:

* **unsplit** -- the root runs the split part of the graph alone, through the
  executor on ``COMM_SELF`` with the threads of one rank; the whole model in
  plain torch is timed too;
* **unsplit, all cores** -- the same two on the root with every core the split
  uses (ranks x threads) in one process, the other ranks asleep: the fair
  baseline for a user who would run torch on one board with all its cores;
* **split** -- every rank runs :meth:`SplitExecutor.forward_local` with halo exchange;
* **bound** -- every rank, at the same time, runs the split part on only its
  own input rows as if they were a whole image, with no exchange, through the
  same executor code on ``COMM_SELF``: what P processes sharing this machine's
  cores, caches and memory bandwidth can do at best.  It does a little less work
  than the split must: a convolution's taps on the zero padding at a band's cut
  are skipped (oneDNN), taps the split computes on its neighbour's halo rows;
* **no messages** -- every rank, at the same time, runs the split's own program
  with its messages left out (``forward_local(exchange=False)``): the same
  compute on the same buffers, so ``exchange_efficiency`` (its time / split)
  is what the halo exchanges and the waits for them cost, and nothing else.

``efficiency`` is the median over repetitions of ``bound / split`` taken within
the same repetition (paired, so slow drifts cancel).  The "split part" is
every node before the gather or the global pool of the head (the paper's
Fig. 10 leaves the FC layers out too); scatter, gather and head are in
``end_to_end_ms``.

Head placements (``head``): with ``"split"``, ``"both"`` or ``"auto"`` the
split-head placement (each rank multiplies its own rows by its columns of
the first Linear, one Reduce) is built and run *first*, in a process that has
held nothing else, and each rank's peak memory is read then; it is freed, the
peak is reset (``/proc/self/clear_refs``) and the gather placement, with the
unsplit reference, runs as before and its peak is read.  So neither
placement's peak counts the other's, and the split's not the unsplit
reference.  Only then is the split placement built again beside the gather
one, and both are timed end to end, alternating within every repetition.
"""
from __future__ import annotations

import gc
import os
import resource
from statistics import median
from time import perf_counter
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from .progress import progress_bar

from . import transport as mpi
from .skeleton import empty_weights
from .distribute import distribute_model
from .errors import UsageError
from .graph import trace_model
from .plan import plan_split
from .report import NodeRow, Report, receptive_field_min_bytes
from .split import SplitExecutor
from .timing import NO_CLOCK, NodeClock

__all__ = ["bench_layers", "peak_rss_mb", "reset_peak_rss"]

HEAD_CHOICES = ("both", "gather", "split", "auto")

_SKIPPED_OPS = {"size", "getattr", "getitem"}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB.

    Linux's ``VmHWM`` (psutil reports only the current RSS there); not
    ``getrusage``, whose maximum survives ``exec`` and so shows a parent's peak
    in a child started by ``subprocess``.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current resident memory (Linux ``clear_refs`` 5); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _split_head_build(comm, build, in_shape, *, load, checkpoint, weights, head) -> SplitExecutor:
    return distribute_model(build, in_shape, comm, weights, load=None if checkpoint else load, checkpoint=checkpoint,
                            head="auto" if head == "auto" else "split")


def _split_head_memory(comm, build, in_shape, *, batch, warmup, seed, **how) -> dict:
    """The split-head placement alone: built, run (warm-up passes, at least one), its peak memory per rank, freed."""
    rank, size = comm.Get_rank(), comm.Get_size()
    executor = _split_head_build(comm, build, in_shape, **how)
    plan = executor.plan
    out = dict(head=plan.head, note=plan.head_note)
    if plan.head == "split":  # else the head cannot split, or auto chose gather: the gather placement covers it
        image = torch.randn(batch, *in_shape, generator=torch.Generator().manual_seed(seed + 1)) if rank == 0 else None
        for _ in range(max(1, warmup)):
            output = executor(image, batch)
        out.update(output=output, rss=mpi.gather_objects(comm, peak_rss_mb(), root=0),
                   weight_mb=[plan.head_split.weight_bytes(r) / 2**20 for r in range(size)])
        del output
    del executor
    gc.collect()
    return out


NOISY_SPREAD = 0.25


def _timing_notes(split_runs, end_to_end_ms: float, split_ms: float) -> list[str]:
    """Say when the figures cannot be trusted: repetitions that vary a lot, or end to end (which contains the
    split part) measured below the split part alone."""
    notes = []
    q1, q3 = np.percentile(split_runs, [25, 75])
    spread = (q3 - q1) / max(float(np.median(split_runs)), 1e-12)
    if spread > NOISY_SPREAD:
        notes.append(f"the split part's repetitions vary by {100 * spread:.0f}% (interquartile range over the "
                     "median): the machine was busy; rerun with nothing else running, or more --repeat")
    if end_to_end_ms < split_ms:
        notes.append(f"end to end ({end_to_end_ms:.1f} ms) came out below the split part it contains "
                     f"({split_ms:.1f} ms): the two were timed in different repetitions of a noisy machine")
    return notes


def _paired_end_to_end(comm, gather: SplitExecutor, split: SplitExecutor, image, batch: int, repeat: int,
                       warmup: int, progress: bool, label: str) -> dict[str, list]:
    """End-to-end seconds of both placements, alternating within every repetition (noise hits them alike)."""
    times: dict[str, list] = {"gather": [], "split": []}
    bar = progress_bar(range(warmup + repeat), desc=f"{label}, gather vs split head", leave=False,
               disable=not progress or comm.Get_rank() != 0)
    for step in bar:
        for which in ("gather", "split") if step % 2 == 0 else ("split", "gather"):
            executor = gather if which == "gather" else split
            mpi.barrier(comm)
            elapsed = _timed(lambda: executor(image, batch))
            if step >= warmup:
                times[which].append(elapsed)
    return times


def _host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _timed(work: Callable[[], object]) -> float:
    start = perf_counter()
    work()
    return perf_counter() - start


#: the order of the three timed split-part passes, rotated repetition by repetition so that none always
#: follows the same one
_PHASES = (("split", "bound", "free"), ("bound", "free", "split"), ("free", "split", "bound"))


def _per_kind(program, clocks) -> dict[str, float]:
    """Milliseconds per pass by kind of instruction: per pass, the kind's instructions summed; then the median
    over passes."""
    kinds = sorted({type(ins).__name__ for ins in program})
    per_pass = np.stack([c.steps for c in clocks])  # (passes, instructions)
    return {kind: 1e3 * float(np.median(per_pass[:, [type(ins).__name__ == kind for ins in program]].sum(axis=1)))
            for kind in kinds}


def _instruction_rows(per_rank: list[dict]) -> list[dict]:
    """One row per rank and kind of instruction: its milliseconds per pass in the split, the split's program
    without messages, and the whole-image bound (None where that pass has no such instruction)."""
    rows = []
    for rank, phases in enumerate(per_rank):
        for kind in sorted(set().union(*phases.values())):
            rows.append({"rank": rank, "kind": kind, **{f"{phase}_ms": phases[phase].get(kind) for phase in phases}})
    return rows


def _warm_timed(work: Callable[[], object], timed: Optional[Callable[[], object]] = None) -> float:
    """One untimed pass, then the timed one: every figure is a pass that follows a pass of the same work
    (its weights and maps in cache, as image after image in a stream), not one that follows another
    measurement's (which left the two-thread run warm from the one-thread run of the same executor, and
    the split cold)."""
    work()
    return _timed(timed or work)


def _bound_executor(build, model, in_shape, rows: int, full_split: set) -> tuple[Optional[SplitExecutor], str]:
    """The split part on ``rows`` rows as a whole image, on COMM_SELF; None and why when it does not fit."""
    channels, _, width = in_shape
    with empty_weights():
        skeleton = build().eval()
    try:
        plan = plan_split(trace_model(skeleton, (channels, rows, width), split_part_only=True), [1.0])
    except UsageError as err:
        return None, str(err)
    lost = [n.name for n in plan.graph.nodes if n.placement == "root" and n.role == "head"
            and n.name in full_split]
    if lost:
        return None, f"node '{lost[0]}' does not run on {rows} rows"
    return SplitExecutor(plan, model, mpi.COMM_SELF, head=False), ""


def bench_layers(
    comm: mpi.Comm,
    build: Callable[[], nn.Module],
    in_shape: tuple[int, int, int],
    *,
    load: Optional[Callable[[nn.Module], None]] = None,
    net: str,
    batch: int,
    repeat: int,
    warmup: int,
    weights,
    threads: int,
    seed: int = 0,
    progress: bool = True,
    unsplit_memory: Optional[Callable[[], Optional[float]]] = None,
    head: str = "both",
    checkpoint: Optional[str] = None,
) -> Optional[Report]:
    """Run the benchmark on every rank; return the :class:`Report` on rank 0, None elsewhere.

    ``build`` makes the model (see :func:`~runtime.distribute.distribute_model`:
    every rank holds only what it runs); ``unsplit_memory`` (rank 0) measures the
    peak memory of the unsplit model alone, in a fresh process.  ``head``: which
    head placements to time end to end (``both``, ``gather``, ``split``: split
    and gather, ``auto``: the cost model's pick, with gather for the table);
    ``checkpoint``: where the split-head placement reads its weights (the same
    weights as ``build``/``load``; without it the root builds the whole Linear
    once, and its peak shows it).
    """
    if head not in HEAD_CHOICES:
        raise UsageError(f"head must be one of {', '.join(HEAD_CHOICES)}, got '{head}'")
    rank, size = comm.Get_rank(), comm.Get_size()
    baseline = mpi.gather_objects(comm, peak_rss_mb(), root=0)  # the interpreter with torch and the runtime
    split_head = None
    head_notes = []
    how = dict(load=load, checkpoint=checkpoint, weights=weights, head=head)
    if head != "gather":  # first, in a process that has held nothing else: its peak is its own
        split_head = _split_head_memory(comm, build, in_shape, batch=batch, warmup=warmup, seed=seed, **how)
        if split_head["head"] == "split":
            if checkpoint is None:
                head_notes.append("split head without a checkpoint: the root built the whole Linear once at "
                                  "set-up, so its peak counts it")
            reset = all(mpi.allgather_objects(comm, reset_peak_rss()))
            if not reset:
                head_notes.append("peak memory could not be reset (/proc/self/clear_refs refused): the gather "
                                  "placement's peak includes the split placement's")
    executor = distribute_model(build, in_shape, comm, weights, load=load)
    plan, graph, model = executor.plan, executor.graph, executor.model
    channels, height, width = in_shape
    notes = []
    local_ranks = mpi.ranks_on_this_host(comm)
    if size == 1:
        notes.append("one rank (started without mpiexec?): the split is the unsplit run plus overhead; "
                     "run under 'mpiexec -n P'")
    if local_ranks * threads > _host_cores():
        notes.append(f"{local_ranks} ranks x {threads} thread(s) share {_host_cores()} cores on this host: the "
                     "split oversubscribes them, so its speedup measures contention")

    own_rows = plan.input_rows[rank]
    split_part = {n.name for n in graph.nodes if n.placement != "root"}
    bounded, why = _bound_executor(build, model, in_shape, len(own_rows), split_part)
    reasons = mpi.allgather_objects(comm, why)
    alone = all(not r for r in reasons)
    if not alone:
        bounded = None
        worst = next(r for r in reasons if r)
        notes.append(f"no bound: a rank's own {min(len(r) for r in plan.input_rows)} input rows alone do not "
                     f"run through the net ({worst})")
    single = SplitExecutor(plan_split(graph, [1.0]), model, mpi.COMM_SELF) if rank == 0 else None

    image = torch.randn(batch, *in_shape, generator=torch.Generator().manual_seed(seed + 1)) if rank == 0 else None
    full = image.contiguous(memory_format=torch.channels_last) if rank == 0 else None
    local = mpi.scatter_rows(comm, image, plan.input_rows, in_shape, batch).clone(memory_format=torch.channels_last)
    nodes = len(graph.nodes)
    all_cores = threads * size

    unsplit_clock = [NodeClock(nodes) for _ in range(repeat)]
    split_clock = [NodeClock(nodes, len(executor.program.split)) for _ in range(repeat)]
    free_program = executor.exchange_free_program()
    free_clock = [NodeClock(nodes, len(free_program)) for _ in range(repeat)]
    bound_clock = ([NodeClock(len(bounded.graph.nodes), len(bounded.program.split)) for _ in range(repeat)]
                   if bounded is not None else None)
    times: dict[str, list] = {k: [] for k in ("unsplit", "torch", "unsplit_all", "torch_all", "split", "bound", "free",
                                               "e2e")}
    bar = progress_bar(range(warmup + repeat), desc=f"bench {net} x{size} ranks", disable=not progress or rank != 0,
               leave=False)
    with torch.no_grad():
        for step in bar:
            k = step - warmup  # < 0 during warm-up
            keep = k >= 0
            if rank == 0:  # unsplit, the root alone; the others sleep in an idle barrier
                clock = unsplit_clock[k] if keep else NO_CLOCK
                x = full.clone(memory_format=torch.channels_last)
                t_unsplit = _warm_timed(lambda: single.forward_local(x), lambda: single.forward_local(x, clock))
                t_torch = _warm_timed(lambda: model(full))
                torch.set_num_threads(all_cores)
                x = full.clone(memory_format=torch.channels_last)
                t_unsplit_all = _warm_timed(lambda: single.forward_local(x))
                t_torch_all = _warm_timed(lambda: model(full))
                torch.set_num_threads(threads)
                if keep:
                    times["unsplit"].append(t_unsplit)
                    times["torch"].append(t_torch)
                    times["unsplit_all"].append(t_unsplit_all)
                    times["torch_all"].append(t_torch_all)
            mpi.idle_barrier(comm, "the unsplit timing on rank 0", timeout_s=mpi.long_wait_s())
            for phase in _PHASES[step % len(_PHASES)]:
                x = local.clone(memory_format=torch.channels_last)
                if phase == "split":
                    executor.forward_local(x)  # untimed: every rank, so the timed pass follows one of its own
                    mpi.barrier(comm)
                    elapsed = _timed(lambda: executor.forward_local(x, split_clock[k] if keep else NO_CLOCK))
                elif phase == "free":
                    mpi.barrier(comm)
                    free = _warm_timed(lambda: executor.forward_local(x, exchange=False),
                                       lambda: executor.forward_local(x, free_clock[k] if keep else NO_CLOCK,
                                                                      exchange=False))
                else:
                    mpi.barrier(comm)
                    bound = (_warm_timed(lambda: bounded.forward_local(x),
                                         lambda: bounded.forward_local(x, bound_clock[k] if keep else NO_CLOCK))
                             if bounded is not None else float("nan"))
            mpi.barrier(comm)
            e2e = _timed(lambda: executor(image if rank == 0 else None, batch))
            if keep:
                times["split"].append(elapsed)
                times["bound"].append(bound)
                times["free"].append(free)
                times["e2e"].append(e2e)

        output = executor(image if rank == 0 else None, batch)
        reference = model(full) if rank == 0 else None
    # Small control data after the timed loop: the lower-case (pickling) API is fine here.
    per_rank = mpi.gather_objects(
        comm,
        {
            "split": times["split"], "bound": times["bound"], "free": times["free"], "e2e": times["e2e"],
            "compute": np.stack([c.compute for c in split_clock]), "halo": np.stack([c.halo for c in split_clock]),
            "bytes": split_clock[0].bytes, "rss": peak_rss_mb(),
            "instructions": {"split": _per_kind(executor.program.split, split_clock),
                             "no_messages": _per_kind(free_program, free_clock),
                             "bound": _per_kind(bounded.program.split, bound_clock) if bounded is not None else {}},
        },
        root=0,
    )
    paired = None
    if split_head is not None and split_head["head"] == "split":
        # both peaks are read (above and in the split phase): now both placements side by side, timed in turn
        second = _split_head_build(comm, build, in_shape, **how)
        paired = _paired_end_to_end(comm, executor, second, image if rank == 0 else None, batch, repeat, warmup,
                                    progress, f"bench {net} x{size} ranks")
        del second
    if rank != 0:
        return None
    max_abs_error = float((output - reference).abs().max())
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    max_relative_error = max_abs_error / scale if scale > 0 else max_abs_error
    gather_e2e = paired["gather"] if paired else per_rank[0]["e2e"]
    heads = [dict(head="gather", end_to_end_ms=1e3 * median(gather_e2e),
                  peak_rss_mb=[r["rss"] for r in per_rank], max_abs_error=max_abs_error,
                  weight_mb_per_rank=None, split_over_gather=None)]
    head_note = executor.plan.head_note
    if split_head is not None:
        head_note = split_head["note"]
        if paired:
            heads.append(dict(head="split", end_to_end_ms=1e3 * median(paired["split"]),
                              peak_rss_mb=split_head["rss"],
                              max_abs_error=float((split_head["output"] - reference).abs().max()),
                              weight_mb_per_rank=split_head["weight_mb"],
                              split_over_gather=float(median(np.array(paired["split"]) / np.array(paired["gather"])))))
    headline = heads[-1] if head == "split" and heads[-1]["head"] == "split" else None
    split_runs = np.max([r["split"] for r in per_rank], axis=0)
    split_ms = 1e3 * median(split_runs)
    bound_ms = efficiency = None
    if alone:
        bound_runs = np.max([r["bound"] for r in per_rank], axis=0)
        bound_ms, efficiency = 1e3 * median(bound_runs), float(median(bound_runs / split_runs))
    free_runs = np.max([r["free"] for r in per_rank], axis=0)
    exchange_free_ms, exchange_efficiency = 1e3 * median(free_runs), float(median(free_runs / split_runs))
    unsplit_ms, unsplit_all_ms = 1e3 * median(times["unsplit"]), 1e3 * median(times["unsplit_all"])
    # one end-to-end figure: with both placements timed side by side, the gather's is the paired one
    end_to_end_ms = headline["end_to_end_ms"] if headline else heads[0]["end_to_end_ms"]
    notes = notes + _timing_notes(split_runs, end_to_end_ms, split_ms)
    total = np.stack([r["compute"] for r in per_rank]) + np.stack([r["halo"] for r in per_rank])
    halo = np.stack([r["halo"] for r in per_rank])
    slowest = total.argmax(axis=0)  # (repeat, nodes)
    halo_of_slowest = np.take_along_axis(halo, slowest[None], axis=0)[0]
    unsplit_nodes = np.stack([c.compute for c in unsplit_clock])
    minimum = receptive_field_min_bytes(graph, plan.weights, batch)
    fx_nodes = list(graph.fx.nodes)
    rows = []
    for i, node in enumerate(graph.nodes):
        f = fx_nodes[i]
        if (node.placement == "root" or node.role in ("input", "output") or f.op == "get_attr"
                or node.label in _SKIPPED_OPS or f.target in _SKIPPED_OPS):
            continue
        rows.append(NodeRow(
            name=node.name, op=node.label, window=node.role == "window",
            unsplit_ms=1e3 * float(np.median(unsplit_nodes[:, i])),
            split_ms=1e3 * float(np.median(total.max(axis=0)[:, i])),
            halo_ms=1e3 * float(np.median(halo_of_slowest[:, i])),
            bytes=int(sum(r["bytes"][i] for r in per_rank)),
            bytes_min=minimum.get(node.name, 0),
        ))
    return Report(
        net=net, size=height, batch=batch, ranks=size, weights=list(plan.weights), threads_per_rank=threads,
        repeat=repeat, unsplit_ms=unsplit_ms, unsplit_torch_ms=1e3 * median(times["torch"]),
        all_cores_threads=all_cores, unsplit_all_cores_ms=unsplit_all_ms,
        torch_all_cores_ms=1e3 * median(times["torch_all"]), split_ms=split_ms, bound_ms=bound_ms,
        efficiency=efficiency, exchange_free_ms=exchange_free_ms, exchange_efficiency=exchange_efficiency,
        speedup=unsplit_ms / split_ms, speedup_all_cores=unsplit_all_ms / split_ms,
        # the headline is the placement asked for: --head split's own figures, not the gather's
        end_to_end_ms=end_to_end_ms,
        max_abs_error=headline["max_abs_error"] if headline else max_abs_error,
        max_relative_error=(headline["max_abs_error"] / scale if scale > 0 else headline["max_abs_error"])
        if headline else max_relative_error,
        peak_rss_mb=headline["peak_rss_mb"] if headline else [r["rss"] for r in per_rank],
        unsplit_peak_rss_mb=unsplit_memory() if unsplit_memory is not None else None,
        notes=notes + head_notes, layers=rows, head_note=head_note, heads=heads, baseline_rss_mb=baseline,
        instructions=_instruction_rows([r["instructions"] for r in per_rank]),
    )
