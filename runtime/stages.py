"""Cut a traced CNN into consecutive layers and give each pipeline stage a run of them.

Layer splitting (AFLKD Sec. 5, Fig. 4): within a cluster, consecutive layers
run on different devices, so one activation travels from stage to stage.  A
*cut* is a point of the graph's topological order where exactly one value is
live -- a band of rows, one tensor to send -- so on a chain every layer
boundary is a cut, and in a ResNet the cuts fall between residual blocks.
The *layers* are the runs of nodes between consecutive cuts; the *head* is
everything after the last cut whose value is split by rows (flatten, the
classifier): the root runs it on the gathered map.

:func:`partition_stages` assigns layers to stages by dynamic programming so
that the slowest (cluster, stage) -- compute at its device's speed on its
cluster's share of the rows, plus sending its output on -- is as fast as it
can be.  Unlike torchgpipe's ``balance_by_time`` and PipeDream's partitioner,
which assume identical devices, each (cluster, stage) has its own speed; the
row shares of the clusters are chosen together with the cut.  Pure functions,
no MPI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Optional, Sequence

from .errors import UsageError
from .graph import ModelGraph

__all__ = ["Layer", "Layers", "StageSplit", "split_layers", "partition_stages", "equal_stages", "stage_times",
           "balance", "min_share"]


@dataclass(frozen=True)
class Layer:
    """A run of graph nodes between two cuts; ``output`` is the one value live after it."""

    index: int
    nodes: tuple[str, ...]
    output: str
    out_shape: tuple[int, int, int]  # (C, H, W) of ``output``

    @property
    def label(self) -> str:
        return self.nodes[0] if len(self.nodes) == 1 else f"{self.nodes[0]}..{self.nodes[-1]}"


@dataclass(frozen=True)
class Layers:
    """A model cut into layers: ``layers`` for the stages, ``head`` for the root."""

    graph: ModelGraph
    layers: tuple[Layer, ...]
    head: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.layers)

    def cut_value(self, boundary: int) -> str:
        """The value crossing cut ``boundary`` (0: the input; ``len``: the last layer's output)."""
        return self.graph.input.name if boundary == 0 else self.layers[boundary - 1].output

    def cut_shape(self, boundary: int) -> tuple[int, int, int]:
        return self.graph.in_shape if boundary == 0 else self.layers[boundary - 1].out_shape


def min_share(layers: "Layers", clusters: int) -> float:
    """The least row share that leaves every cluster a row of every map a stage may start from."""
    smallest = min([layers.graph.in_shape[1]] + [layer.out_shape[1] for layer in layers.layers])
    return min(1.0 / clusters, 1.0 / smallest)


def _splittable(graph: ModelGraph, name: str) -> bool:
    node = graph[name]
    return node.placement == "rows" and node.shape is not None and len(node.shape) == 4 and node.hdim == 2


def split_layers(graph: ModelGraph) -> Layers:
    """The layers of ``graph``: cut wherever one split value alone is live."""
    fx_ops = [f.op for f in graph.fx.nodes]
    last_use = {n.name: i for i, n in enumerate(graph.nodes)}
    for i, n in enumerate(graph.nodes):
        for source in n.inputs:
            last_use[source] = max(last_use[source], i)
    constants = {n.name for n, op in zip(graph.nodes, fx_ops) if op == "get_attr"}
    cuts = []  # node indices after which a cut is valid
    live: set[str] = set()
    for i, n in enumerate(graph.nodes):
        if n.role == "output":
            break
        if n.name not in constants:
            live.add(n.name)
        live = {v for v in live if last_use[v] > i}
        if i > 0 and len(live) == 1:
            (value,) = live
            if value == n.name and _splittable(graph, value):
                cuts.append(i)
    if not cuts:
        raise UsageError("the model has no point where a single split feature map is live; "
                         "it cannot be cut into pipeline stages")
    layers, start = [], 1
    for i in cuts:
        names = tuple(n.name for n in graph.nodes[start: i + 1] if n.name not in constants)
        shape = graph.nodes[i].shape
        layers.append(Layer(len(layers), names, graph.nodes[i].name, (shape[1], shape[2], shape[3])))
        start = i + 1
    head = tuple(n.name for n in graph.nodes[start:] if n.role != "output" and n.name not in constants)
    return Layers(graph, tuple(layers), head)


@dataclass(frozen=True)
class StageSplit:
    """Stage ``k`` runs layers ``bounds[k]:bounds[k+1]``; cluster ``c`` owns rows in proportion to ``shares[c]``.

    ``times[c][k]``: predicted seconds per image of (cluster c, stage k).
    """

    bounds: tuple[int, ...]
    shares: tuple[float, ...]
    times: tuple[tuple[float, ...], ...]

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def stage_seconds(self) -> tuple[float, ...]:
        """Per stage, its slowest cluster's time (clusters wait for each other's halos)."""
        return tuple(max(row[k] for row in self.times) for k in range(self.stages))

    @property
    def balance(self) -> float:
        return balance(self.stage_seconds)


def balance(seconds: Sequence[float]) -> float:
    """Slowest over mean: 1.0 is a perfect balance."""
    mean = sum(seconds) / len(seconds)
    return max(seconds) / mean if mean > 0 else 1.0


def _check(costs, speeds, out_bytes, stages_wanted=None):
    if any(not math.isfinite(c) or c < 0 for c in costs):
        raise UsageError("layer costs must be finite and non-negative")
    if not speeds or not speeds[0]:
        raise UsageError("need at least one cluster with at least one device")
    stages = len(speeds[0])
    if any(len(row) != stages for row in speeds):
        raise UsageError("every cluster needs the same number of devices (one per pipeline stage)")
    if any(not (s > 0 and math.isfinite(s)) for row in speeds for s in row):
        raise UsageError("device speeds must be positive numbers")
    if stages > len(costs):
        raise UsageError(f"{stages} pipeline stages but the model has only {len(costs)} layers to share; "
                         f"use at most {len(costs)} devices per cluster")
    if len(out_bytes) != len(costs):
        raise UsageError("need one output size per layer")
    return stages


def stage_times(costs: Sequence[float], out_bytes: Sequence[float], speeds: Sequence[Sequence[float]],
                bounds: Sequence[int], shares: Sequence[float], bandwidth: float = math.inf,
                extra: Optional[Sequence[Sequence[float]]] = None) -> tuple[tuple[float, ...], ...]:
    """Predicted seconds of every (cluster, stage) for a given cut and row shares.

    Compute scales with the cluster's share of the rows and the device's
    speed; a stage that is not the last also sends its share of its output
    at ``bandwidth`` bytes/s, which overlaps the next image's compute
    (non-blocking sends), so the stage takes the longer of the two.
    ``extra[c][k]`` adds fixed work (the root's head).
    """
    prefix = [0.0, *accumulate(costs)]
    total = sum(shares)
    out = []
    for c, row in enumerate(speeds):
        share = shares[c] / total
        times = []
        for k, speed in enumerate(row):
            i, j = bounds[k], bounds[k + 1]
            t = (share * (prefix[j] - prefix[i]) + (extra[c][k] if extra else 0.0)) / speed
            if k < len(row) - 1:  # the send overlaps the next image's compute: the link is its own stage
                t = max(t, share * out_bytes[j - 1] / bandwidth)
            times.append(t)
        out.append(tuple(times))
    return tuple(out)


def _best_bounds(costs, out_bytes, speeds, shares, bandwidth, extra) -> tuple[int, ...]:
    """Exact minimum over cuts of the slowest (cluster, stage), for fixed shares: O(S n^2) dynamic program.

    Ties (common: a fixed head on rank 0 may be the bottleneck whatever the
    cut) go to the least total time of all stages.
    """
    n, stages = len(costs), len(speeds[0])
    prefix = [0.0, *accumulate(costs)]
    share_sum = sum(shares)

    def cost(k, i, j):
        worst = 0.0
        for c, row in enumerate(speeds):
            share = shares[c] / share_sum
            t = (share * (prefix[j] - prefix[i]) + (extra[c][k] if extra else 0.0)) / row[k]
            if k < stages - 1:
                t = max(t, share * out_bytes[j - 1] / bandwidth)
            worst = max(worst, t)
        return worst

    inf = math.inf
    # best[k][j]: slowest stage when stages 0..k run layers 0..j-1 (each stage at least one layer)
    best = [[inf] * (n + 1) for _ in range(stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for k in range(1, stages):
        for j in range(k + 1, n + 1):
            best[k][j] = min(max(best[k - 1][i], cost(k, i, j)) for i in range(k, j))
    limit = best[stages - 1][n] * (1 + 1e-9)
    # second pass: among the cuts whose slowest stage is optimal, the least total time (no needless sends of
    # big maps, no stage left near-empty when another stage is the bottleneck anyway)
    total = [[inf] * (n + 1) for _ in range(stages)]
    choice = [[0] * (n + 1) for _ in range(stages)]
    for j in range(1, n + 1):
        t = cost(0, 0, j)
        if t <= limit:
            total[0][j] = t
    for k in range(1, stages):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                t = cost(k, i, j)
                if t <= limit and total[k - 1][i] + t < total[k][j]:
                    total[k][j], choice[k][j] = total[k - 1][i] + t, i
    bounds = [n]
    for k in range(stages - 1, 0, -1):
        bounds.append(choice[k][bounds[-1]])
    bounds.append(0)
    return tuple(reversed(bounds))


def _balanced_shares(costs, out_bytes, speeds, bounds, bandwidth, extra, min_share) -> tuple[float, ...]:
    """Row shares (summing to 1) that equalise the clusters' slowest stages for a given cut.

    Cluster ``c``'s stage ``k`` takes ``max(share * a[c][k] + e[c][k], share * b[c][k])``
    (compute scales with the rows, the head does not; the send to the next
    stage scales with the rows and overlaps compute), so for a target time
    ``T`` the most rows a cluster can take is ``min_k min((T - e) / a, T / b)``;
    the smallest ``T`` whose shares add up to 1 is found by bisection.  Every
    cluster keeps at least ``min_share`` (a row of every map).
    """
    stages = len(speeds[0])
    prefix = [0.0, *accumulate(costs)]
    a, b, e = [], [], []
    for c, row in enumerate(speeds):
        a.append([(prefix[bounds[k + 1]] - prefix[bounds[k]]) / row[k] for k in range(stages)])
        b.append([out_bytes[bounds[k + 1] - 1] / bandwidth if k < stages - 1 else 0.0 for k in range(stages)])
        e.append([(extra[c][k] if extra else 0.0) / row[k] for k in range(stages)])

    def most(c, target):
        return max(min_share, min(min((target - e[c][k]) / a[c][k] if a[c][k] > 0 else math.inf,
                                      target / b[c][k] if b[c][k] > 0 else math.inf)
                                  for k in range(stages)))

    lo, hi = 0.0, max(max(ec) for ec in e) + max(max(ac) for ac in a) + max(max(bc) for bc in b) + 1e-12
    if any(math.isinf(most(c, hi)) for c in range(len(speeds))):  # a cluster with no work: share by speed
        return tuple(sum(row) / sum(map(sum, speeds)) for row in speeds)
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(most(c, mid) for c in range(len(speeds))) >= 1.0:
            hi = mid
        else:
            lo = mid
    return clamp_shares([most(c, hi) for c in range(len(speeds))], min_share)


def partition_stages(costs: Sequence[float], out_bytes: Sequence[float], speeds: Sequence[Sequence[float]],
                     bandwidth: float = math.inf, extra: Optional[Sequence[Sequence[float]]] = None,
                     shares: Optional[Sequence[float]] = None, rounds: int = 8,
                     min_share: float = 0.0) -> StageSplit:
    """The cut and row shares that minimise the slowest (cluster, stage).

    ``costs[l]``: seconds of layer ``l`` on the whole map at speed 1;
    ``out_bytes[l]``: bytes of its output; ``speeds[c][k]``: relative speed
    of cluster ``c``'s device for stage ``k``; ``extra[c][k]``: fixed seconds
    that do not shrink with fewer rows (the head on rank 0).  For fixed shares
    the cut is exact (dynamic program).  Otherwise shares start in proportion
    to each cluster's total speed and alternate with the cut: the shares that
    equalise the clusters for this cut, then the best cut for those shares,
    keeping the best pair.  ``min_share``: no cluster gets less (so each keeps
    a row of the smallest map).
    """
    stages = _check(costs, speeds, out_bytes)
    if shares is not None:
        if len(shares) != len(speeds) or any(not (s > 0) for s in shares):
            raise UsageError(f"need one positive row share per cluster ({len(speeds)}), got {list(shares)}")
        starts = [tuple(float(s) for s in shares)]
        rounds = 1
    else:
        starts = _starting_shares(speeds, min_share)
    best: Optional[StageSplit] = None
    for current in starts:
        for _ in range(rounds):
            bounds = _best_bounds(costs, out_bytes, speeds, current, bandwidth, extra)
            times = stage_times(costs, out_bytes, speeds, bounds, current, bandwidth, extra)
            split = StageSplit(bounds, current, times)
            if best is None or max(split.stage_seconds) < max(best.stage_seconds) * (1 - 1e-12):
                best = split
            if len(speeds) == 1 or shares is not None:
                break
            moved = _balanced_shares(costs, out_bytes, speeds, bounds, bandwidth, extra, min_share)
            total = sum(current)
            if max(abs(m - c / total) for m, c in zip(moved, current)) < 1e-9:
                break
            current = moved
    return best


def _starting_shares(speeds, min_share: float) -> list[tuple[float, ...]]:
    """Where the cut/shares alternation starts: by speed, even, and a spread of others (it finds local optima)."""
    clusters = len(speeds)
    if clusters == 1:
        return [(1.0,)]
    total = float(sum(map(sum, speeds)))
    starts = [tuple(sum(row) / total for row in speeds), tuple(1.0 / clusters for _ in speeds)]
    if clusters == 2:
        starts += [(i / 10, 1 - i / 10) for i in range(1, 10)]
    else:
        # a spread of starts from additions, products and remainders only (IEEE-exact everywhere, unlike
        # libm's log in random.expovariate): every board computes the very same plan
        for i in range(1, 13):
            draw = [0.05 + ((i * (c + 1) * 0.6180339887498949) % 1.0) for c in range(clusters)]
            starts.append(tuple(d / sum(draw) for d in draw))
    return [clamp_shares(start, min_share) for start in starts]


def clamp_shares(shares: Sequence[float], min_share: float) -> tuple[float, ...]:
    """Shares summing to 1 with none below ``min_share``: the clamped ones fixed at it, the others
    scaled down to make room (clamping alone would leave a sum above 1 and skew the plan)."""
    total = float(sum(shares))
    shares = [s / total for s in shares]
    if min_share * len(shares) >= 1.0:
        return tuple(1.0 / len(shares) for _ in shares)
    fixed: set[int] = set()
    while True:
        free = [i for i in range(len(shares)) if i not in fixed]
        room = 1.0 - min_share * len(fixed)
        scale = room / sum(shares[i] for i in free)
        low = {i for i in free if shares[i] * scale < min_share}
        if not low:
            return tuple(min_share if i in fixed else shares[i] * scale for i in range(len(shares)))
        fixed |= low


def equal_stages(layers: int, stages: int) -> tuple[int, ...]:
    """The naive cut: the same number of layers per stage (the first stages take the remainder)."""
    if stages > layers:
        raise UsageError(f"{stages} pipeline stages but the model has only {layers} layers; "
                         f"use at most {layers} devices per cluster")
    base, extra = divmod(layers, stages)
    return tuple([0, *accumulate(base + (1 if k < extra else 0) for k in range(stages))])
