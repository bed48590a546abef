"""Clusters x pipeline stages: the height split across clusters, layer splitting within each (AFLKD Sec. 5).

Rank ``c * S + s`` is device ``s`` of cluster ``c`` (its master is stage 0,
so rank 0 is cluster 0's master).  Two communicators are split from the
world:

* the **stage** communicator -- stage ``s`` of every cluster -- runs the
  height split of that stage's layers with the existing
  :class:`~runtime.split.SplitExecutor` (halo exchange between the clusters);
* the **cluster** communicator -- the devices of one cluster -- carries each
  stage's band of rows to the next stage (``Isend``/``Recv`` of contiguous
  rows-first buffers whose shapes both ends know from the plan).

Rank 0 scatters the input over stage 0, receives the last stage's bands and
runs the head.  A flat height split (``S = 1``) and a pure pipeline
(``C = 1``) are the same code.  A stream of images flows through: image
``i + 1`` enters stage 0 while image ``i`` is in stage 1; every message is
tagged with the image's sequence number, and every rank handles images in
order, so halos and bands always pair with the right image.

Each stage is its own ``torch.fx`` module cut from the traced graph (layers
``bounds[s]:bounds[s+1]`` of :func:`runtime.stages.split_layers`), traced
and planned over the stage communicator with the clusters' row shares; a
stage's output rows on a cluster are exactly the next stage's input rows
there, because both are the same share of the same map.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from mpi4py import MPI
from torch.fx import Graph, GraphModule

from . import comm as mpi
from .errors import UsageError
from .geometry import split_rows
from .graph import trace_model
from .plan import check_weights, plan_split
from .split import SplitExecutor, check_image
from .stages import Layers, split_layers

__all__ = ["Grid", "PipelineExecutor", "StreamResult", "stage_module", "head_module", "distribute_pipeline"]

#: images in flight per sender before it waits for an old send to finish (bounds memory)
SEND_SLOTS = 4
_TAG_LIMIT = 32767


@dataclass(frozen=True)
class Grid:
    """``clusters`` clusters of ``stages`` devices; rank ``c * stages + s`` is device ``s`` of cluster ``c``."""

    clusters: int
    stages: int

    def __post_init__(self) -> None:
        if self.clusters < 1 or self.stages < 1:
            raise UsageError(f"a grid needs at least one cluster and one stage, got {self.clusters} x {self.stages}")

    @property
    def size(self) -> int:
        return self.clusters * self.stages

    def rank(self, cluster: int, stage: int) -> int:
        return cluster * self.stages + stage

    def position(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.stages)


def _sub_module(model: nn.Module, graph_fx: Graph, names: Sequence[str], source: Optional[str]) -> GraphModule:
    """The nodes ``names`` of ``graph_fx`` as a module whose input is the value ``source`` (None: the model input)."""
    by_name = {n.name: n for n in graph_fx.nodes}
    sub = Graph()
    env: dict = {}
    if source is None:
        source = next(n for n in graph_fx.nodes if n.op == "placeholder").name
    last = env[source] = sub.placeholder("x")

    def arg(node):
        if node.name not in env:
            if node.op != "get_attr":
                raise UsageError(f"node '{node.name}' is used across a stage boundary; the cut is not valid")
            env[node.name] = sub.node_copy(node, arg)
        return env[node.name]

    for name in names:
        last = env[name] = sub.node_copy(by_name[name], arg)
    sub.output(last)
    return GraphModule(model, sub)


def stage_module(model: nn.Module, layers: Layers, first: int, stop: int) -> GraphModule:
    """Layers ``first:stop`` of ``model`` as a module from the map before ``first`` to the map after ``stop - 1``."""
    names = [n for layer in layers.layers[first:stop] for n in layer.nodes]
    return _sub_module(model, layers.graph.fx, names, None if first == 0 else layers.cut_value(first))


def head_module(model: nn.Module, layers: Layers) -> GraphModule:
    """What follows the last cut (flatten, classifier), from the gathered map to the model's output."""
    fx_nodes = list(layers.graph.fx.nodes)
    output = fx_nodes[-1]
    names = list(layers.head)
    sub = _sub_module(model, layers.graph.fx, names, layers.cut_value(len(layers)))
    if not names:  # the model ends at the split part
        return sub
    # the output node may return a head value other than the last one computed
    out_arg = output.args[0]
    if getattr(out_arg, "name", None) != names[-1]:
        raise UsageError("the model's output is not the last node of its head; pipeline needs a single output")
    return sub


@dataclass
class StreamResult:
    """What :meth:`PipelineExecutor.stream` measured, on the root (``outputs`` there only)."""

    outputs: list = field(default_factory=list)
    seconds: float = 0.0  # first scatter to last head, on the root
    latencies: list = field(default_factory=list)  # per image, root: scatter start to head done
    busy: list = field(default_factory=list)  # per rank: seconds computing its stage (slow-down included)
    head_seconds: float = 0.0


class PipelineExecutor:
    """Runs ``model`` over ``grid`` with stage ``s`` taking layers ``bounds[s]:bounds[s+1]``.

    ``shares``: rows of every stage's map per cluster, in proportion (one per
    cluster).  Every rank holds the model (its stage's weights are what it
    uses).  ``speed``: this rank's emulated relative speed (1 = as is): after
    each stage pass of ``d`` seconds the rank sleeps ``d * (1/speed - 1)``,
    a slower board on one host -- a benchmark device, off by default.
    """

    def __init__(self, model: nn.Module, in_shape: tuple[int, int, int], grid: Grid, bounds: Sequence[int],
                 shares: Optional[Sequence[float]] = None, comm: MPI.Comm = MPI.COMM_WORLD,
                 layers: Optional[Layers] = None, speed: float = 1.0) -> None:
        size = comm.Get_size()
        if grid.size != size:
            raise UsageError(f"the grid has {grid.clusters} clusters x {grid.stages} stages = {grid.size} ranks "
                             f"but the job has {size}; run mpiexec -n {grid.size} or change the topology")
        if layers is None:
            layers = split_layers(trace_model(model, in_shape))
        bounds = tuple(int(b) for b in bounds)
        n = len(layers)
        if (len(bounds) != grid.stages + 1 or bounds[0] != 0 or bounds[-1] != n
                or any(a >= b for a, b in zip(bounds[:-1], bounds[1:]))):
            raise UsageError(f"stage bounds {list(bounds)} must rise strictly from 0 to {n} with "
                             f"{grid.stages + 1} entries (at least one layer per stage)")
        if not speed > 0:
            raise UsageError(f"emulated speed must be positive, got {speed}")
        self.grid, self.layers, self.bounds, self.comm = grid, layers, bounds, comm
        self.shares = check_weights(shares, grid.clusters)
        self.rank = comm.Get_rank()
        self.cluster, self.stage = grid.position(self.rank)
        self.is_root = self.rank == 0
        self.speed = float(speed)
        self.stage_comm = mpi.split_comm(comm, self.stage, self.cluster)
        self.cluster_comm = mpi.split_comm(comm, self.cluster, self.stage)
        first, stop = bounds[self.stage], bounds[self.stage + 1]
        self.in_shape = layers.cut_shape(first)
        self.out_shape = layers.cut_shape(stop)
        problem = None
        try:
            self.module = stage_module(model, layers, first, stop).eval()
            plan = plan_split(trace_model(self.module, self.in_shape), self.shares)
            self.executor = SplitExecutor(plan, self.module, self.stage_comm, root=0, head=False)
        except UsageError as err:
            problem = f"stage {self.stage} (layers {first}:{stop}): {err}"
        problems = [p for p in mpi.allgather_objects(comm, problem) if p is not None]
        if problems:  # every rank refuses together: none is left waiting in the stream
            self.close()
            raise UsageError(problems[0])
        self.out_value = plan.graph.nodes[-1].inputs[0]
        self.in_rows = plan.input_rows[self.cluster]
        self.out_rows = plan.values[self.out_value].owned[self.cluster]
        self.final_rows = split_rows(layers.cut_shape(n)[1], self.shares)
        self.head = head_module(model, layers).eval() if self.is_root else None
        self.model_params = list(model.parameters())  # what this rank built (meta where it holds nothing)
        self.model_in_shape = layers.graph.in_shape

    def close(self) -> None:
        mpi.free_comm(self.stage_comm)
        mpi.free_comm(self.cluster_comm)

    # ------------------------------------------------------------------ one image through this rank's stage
    def _band_in(self, t: int, image: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        if self.stage == 0:
            return mpi.scatter_rows(self.stage_comm, image, self.executor.plan.input_rows, self.in_shape, batch)
        channels, _, width = self.in_shape
        band = mpi.rows_major(len(self.in_rows), batch, channels, width)
        mpi.recv_rows(self.cluster_comm, band, self.stage - 1, t % _TAG_LIMIT)
        return band.permute(1, 3, 0, 2)

    def _run_stage(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        env = self.executor.forward_local(x)
        out = env[self.out_value]
        spent = time.perf_counter() - start
        if self.speed != 1.0:
            time.sleep(spent * (1.0 / self.speed - 1.0))
            spent = time.perf_counter() - start
        return out, spent

    # ------------------------------------------------------------------ the stream
    def stream(self, images: Optional[Sequence[torch.Tensor]], count: int = 0, batch: int = 1) -> StreamResult:
        """Push ``images`` (a list of ``(N, C, H, W)`` batches, root only) through the pipeline.

        Other ranks pass ``None``; count and batch size come from the root.
        Returns a :class:`StreamResult`; ``outputs`` (the model's output per
        batch, in order) and the timings are filled on the root.
        """
        with torch.no_grad():
            return self._stream(images, count, batch)

    def _check_stream(self, images) -> tuple[int, int]:
        problem, count, batch = None, 0, 1
        if self.is_root:
            try:
                if images is None or len(images) == 0:
                    raise UsageError("the stream has no images")
                for image in images:
                    check_image(image, self.model_in_shape)
                batches = {image.shape[0] for image in images}
                if len(batches) != 1:
                    raise UsageError(f"every batch of a stream must have the same size, got {sorted(batches)}")
                count, batch = len(images), batches.pop()
            except UsageError as err:
                problem = str(err)
        count, batch, problem = mpi.bcast_object(self.comm, (count, batch, problem))
        if problem is not None:
            raise UsageError(problem)
        return count, batch

    def _stream(self, images, count, batch) -> StreamResult:
        count, batch = self._check_stream(images)
        grid, result = self.grid, StreamResult()
        last = grid.stages - 1
        out_channels, _, out_width = self.out_shape
        slots = [mpi.rows_major(len(self.out_rows), batch, out_channels, out_width) for _ in range(SEND_SLOTS)]
        in_flight: list = [None] * SEND_SLOTS
        pending: deque = deque()  # root: (t, full map, requests, start time)
        busy = 0.0
        mpi.barrier(self.comm)
        begin = time.perf_counter()
        for t in range(count):
            tag = t % _TAG_LIMIT
            started = time.perf_counter()
            if self.is_root:
                pending.append(self._post_final(t, batch, started))
            x = self._band_in(t, images[t] if self.is_root and self.stage == 0 else None, batch)
            out, spent = self._run_stage(x)
            busy += spent
            slot = t % SEND_SLOTS
            if in_flight[slot] is not None:
                mpi.wait([in_flight[slot]])
                in_flight[slot] = None
            band = slots[slot]
            band.copy_(out.permute(2, 0, 3, 1))
            if self.stage < last:
                in_flight[slot] = mpi.isend_rows(self.cluster_comm, band, self.stage + 1, tag)
            elif self.is_root:
                rows = self.final_rows[0]
                pending[-1][1][rows.start:rows.stop].copy_(band)
            elif len(self.out_rows):  # the root posts no receive for a cluster without rows
                in_flight[slot] = mpi.isend_rows(self.comm, band, 0, tag)
            if self.is_root:
                while pending and pending[0][0] <= t - last:
                    self._finish(pending.popleft(), result)
        while self.is_root and pending:
            self._finish(pending.popleft(), result)
        mpi.wait([r for r in in_flight if r is not None])
        if self.is_root:
            result.seconds = time.perf_counter() - begin
        busy_all = mpi.gather_objects(self.comm, busy)
        if self.is_root:
            result.busy = busy_all
        return result

    def _post_final(self, t: int, batch: int, started: float):
        channels, height, width = self.layers.cut_shape(len(self.layers))
        full = mpi.rows_major(height, batch, channels, width)
        requests = []
        for c, rows in enumerate(self.final_rows):
            source = self.grid.rank(c, self.grid.stages - 1)
            if source != 0 and len(rows):
                requests.append(mpi.irecv_rows(self.comm, full[rows.start:rows.stop], source, t % _TAG_LIMIT))
        return t, full, requests, started

    def _finish(self, item, result: StreamResult) -> None:
        t, full, requests, started = item
        mpi.wait(requests)
        start = time.perf_counter()
        output = self.head(full.permute(1, 3, 0, 2).contiguous())
        result.head_seconds += time.perf_counter() - start
        result.outputs.append(output)
        result.latencies.append(time.perf_counter() - started)


def _stage_targets(layers: Layers, first: int, stop: int) -> set[str]:
    """Qualified names of the modules and attributes layers ``first:stop`` use."""
    names = {n for layer in layers.layers[first:stop] for n in layer.nodes}
    targets = set()
    for f in layers.graph.fx.nodes:
        if f.op == "call_module" and f.name in names:
            targets.add(f.target)
        elif f.op == "get_attr" and any(user.name in names for user in f.users):
            targets.add(f.target)
    return targets


def distribute_pipeline(build: Callable[[], nn.Module], in_shape: tuple[int, int, int], grid: Grid,
                        bounds: Sequence[int], shares: Optional[Sequence[float]] = None,
                        comm: MPI.Comm = MPI.COMM_WORLD, load: Optional[Callable[[nn.Module], None]] = None,
                        speed: float = 1.0, root_model: Optional[nn.Module] = None) -> PipelineExecutor:
    """A :class:`PipelineExecutor` whose ranks hold only the weights of their own stage.

    Every rank builds ``build()`` on the meta device (structure only); rank 0
    builds it for real, calls ``load(model)``, keeps it (it runs stage 0 of
    cluster 0 and the head) and sends every other rank the state of its
    stage's modules, once, at set-up.  A Pi never holds the head's Linear.
    ``root_model``: rank 0's model, already built and loaded (then neither
    ``build`` nor ``load`` runs there again).
    """
    with torch.device("meta"):
        skeleton = build()
    skeleton.eval()
    layers = split_layers(trace_model(skeleton, in_shape))
    rank = comm.Get_rank()
    model, parts, problem = skeleton, None, None
    if rank == 0:
        try:
            if root_model is not None:
                model = root_model
            else:
                model = build()
                if load is not None:
                    load(model)
            model.eval()
            state = model.state_dict()
            parts = []
            for r in range(comm.Get_size()):
                _, s = grid.position(r)
                targets = _stage_targets(layers, bounds[s], bounds[s + 1]) if s + 1 < len(bounds) else set()
                parts.append({k: v for k, v in state.items() if k.rpartition(".")[0] in targets or k in targets})
        except UsageError as err:
            problem = str(err)
    problem = mpi.bcast_object(comm, problem)
    if problem is not None:
        raise UsageError(problem)
    mine = mpi.scatter_objects(comm, parts)
    if rank != 0:
        _, s = grid.position(rank)
        for target in _stage_targets(layers, bounds[s], bounds[s + 1]):
            owner_name, _, attr = target.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if isinstance(getattr(owner, attr, None), nn.Module):
                getattr(owner, attr).to_empty(device="cpu")
            elif attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(mine[target], requires_grad=False)
            else:
                owner._buffers[attr] = mine[target]
        model.load_state_dict({k: v for k, v in mine.items() if k in model.state_dict()}, strict=False, assign=True)
    return PipelineExecutor(model, in_shape, grid, bounds, shares, comm, layers=layers, speed=speed)
