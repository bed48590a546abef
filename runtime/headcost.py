"""``head="auto"``: gather the last map or split the first Linear, by a measured cost model.

Split inference of a flatten head is limited by reading the first Linear's
weights (a matrix-vector product reads every weight once: memory-bound) and by
the bytes that move.  Both placements are estimated from two measurements
taken on the ranks themselves at set-up:

* seconds per weight of a matrix-vector product, on a probe matrix larger
  than the caches (every rank at once, as the split runs);
* the link's bandwidth, by a ping-pong between the root and every rank.

gather: the root receives the rows it does not own of the map, then reads all
``out x in`` weights.  split: every rank reads its own columns at once (the
slowest counts), then one Reduce of ``batch x out`` floats per tree level.
"""
from __future__ import annotations

import dataclasses
import math
from time import perf_counter
from typing import Sequence

import torch
import torch.nn.functional as F

from . import transport as mpi
from .graph import ModelGraph
from .plan import GraphPlan, plan_split

__all__ = ["choose_head", "head_costs", "measure_matvec", "measure_link"]

_PROBE_FLOATS = 16 * 1024 * 1024  # 64 MB of weights: larger than the caches of a board or a server core


def measure_matvec(out_features: int, in_features: int, batch: int = 1, repeat: int = 3) -> float:
    """Seconds per weight of ``F.linear`` on a (batch, k) input, k chosen so the probe is ~64 MB (or the layer)."""
    k = max(1, min(in_features, _PROBE_FLOATS // max(1, out_features)))
    weight = torch.randn(out_features, k)
    x = torch.randn(batch, k)
    F.linear(x, weight)  # warm
    best = math.inf
    for _ in range(repeat):
        start = perf_counter()
        F.linear(x, weight)
        best = min(best, perf_counter() - start)
    return best / (out_features * k)


def measure_link(comm: mpi.Comm, root: int = 0, nbytes: int = 1 << 20, repeat: int = 3) -> float:
    """Bytes per second between the root and the slowest other rank (ping-pong, best of ``repeat``)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    buf = torch.zeros(nbytes // 4)
    slowest = math.inf
    for peer in range(size):
        if peer == root:
            continue
        best = math.inf
        for k in range(repeat):
            mpi.barrier(comm)
            start = perf_counter()
            if rank == root:
                mpi.sendrecv(comm, buf, peer, None, None, mpi.TAG_LINK + k)
                mpi.sendrecv(comm, None, None, buf, peer, mpi.TAG_LINK + k)
            elif rank == peer:
                mpi.sendrecv(comm, None, None, buf, root, mpi.TAG_LINK + k)
                mpi.sendrecv(comm, buf, root, None, None, mpi.TAG_LINK + k)
            best = min(best, perf_counter() - start)
        if rank == root:
            slowest = min(slowest, 2 * nbytes / best)
    return mpi.bcast_object(comm, slowest if size > 1 else math.inf, root)


def head_costs(plan: GraphPlan, per_weight_s: Sequence[float], link_bps: float, batch: int = 1,
               root: int = 0) -> dict:
    """Estimated seconds and bytes of both placements for a plan with a split head (pure arithmetic)."""
    hs = plan.head_split
    ranks = plan.ranks
    outside = hs.height - len(hs.owned[root])
    gather_bytes = batch * 4 * hs.channels * hs.width * outside
    split_bytes = batch * 4 * hs.out_features * (ranks - 1)
    levels = math.ceil(math.log2(ranks)) if ranks > 1 else 0
    gather_s = gather_bytes / link_bps + per_weight_s[root] * hs.out_features * hs.in_features
    split_s = (max(per_weight_s[r] * hs.out_features * hs.columns(r) for r in range(ranks))
               + levels * batch * 4 * hs.out_features / link_bps)
    return dict(gather_s=gather_s, split_s=split_s, gather_bytes=gather_bytes, split_bytes=split_bytes,
                gather_weights=hs.out_features * hs.in_features,
                split_weights=max(hs.out_features * hs.columns(r) for r in range(ranks)))


def choose_head(graph: ModelGraph, weights: Sequence[float], comm: mpi.Comm, root: int = 0,
                batch: int = 1) -> GraphPlan:
    """The plan with the cheaper head placement; ``plan.head_note`` says which and why (same on every rank)."""
    split = plan_split(graph, weights, head="split")
    if split.head != "split":
        return dataclasses.replace(split, head_note=f"auto -> {split.head_note}")
    hs = split.head_split
    mpi.barrier(comm)
    mine = measure_matvec(hs.out_features, hs.in_features, batch)
    per_weight = mpi.allgather_objects(comm, mine)
    link = measure_link(comm, root)
    cost = head_costs(split, per_weight, link, batch, root)
    pick = "split" if cost["split_s"] < cost["gather_s"] else "gather"
    why = (f"auto -> {pick}: estimated split {1e3 * cost['split_s']:.1f} ms vs gather {1e3 * cost['gather_s']:.1f} ms "
           f"(matrix-vector {1e9 * max(per_weight):.2f} ns/weight measured, link "
           f"{'n/a' if math.isinf(link) else f'{link / 1e9:.2f} GB/s'} measured; gather moves "
           f"{cost['gather_bytes']} B and reads {cost['gather_weights']} weights on the root, split moves "
           f"{cost['split_bytes']} B and reads at most {cost['split_weights']} weights per rank)")
    chosen = split if pick == "split" else plan_split(graph, weights, head="gather")
    return dataclasses.replace(chosen, head_note=why)
