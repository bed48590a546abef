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
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.fx import Graph, GraphModule

from . import transport as mpi
from .deployment import pipeline_deployment, plan_digest, stage_plans_of
from .skeleton import empty_weights
from .errors import UsageError
from .geometry import split_rows
from .graph import trace_model
from .plan import check_weights, plan_split
from .split import SplitExecutor, check_image
from .stages import Layers, split_layers
from .stream_program import Collect, Keep, RecvBand, ScatterIn, SendBand, StreamProgram, lower_pipeline

__all__ = ["Grid", "PipelineExecutor", "StreamResult", "stage_module", "head_module", "distribute_pipeline"]

#: images in flight per sender before it waits for an old send to finish (bounds memory)
SEND_SLOTS = 4
_TAG_LIMIT = mpi.TAG_PASSES  # the image counter's tags, below the fixed ones


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


def tail_module(model: nn.Module, layers: Layers, first: int) -> GraphModule:
    """Layers ``first:`` and the head, as one module: the last stage when the head is split too."""
    names = [n for layer in layers.layers[first:] for n in layer.nodes] + list(layers.head)
    return _sub_module(model, layers.graph.fx, names, None if first == 0 else layers.cut_value(first))


def split_head_plan(layers: Layers, shares: Sequence[float]):
    """The :class:`~runtime.plan.HeadSplit` of the model's head over the clusters, or None (then: gather).

    Pure (shapes only), so every rank reaches the same answer.  The head
    splits when it is flatten -> Linear on the map after the last cut.
    """
    plan = plan_split(layers.graph, check_weights(shares, len(shares)), head="split")
    hs = plan.head_split
    if plan.head != "split" or hs is None or hs.value != layers.cut_value(len(layers)):
        return None, plan.head_note
    return hs, plan.head_note


def stage_plan(model: nn.Module, layers: Layers, bounds: Sequence[int], stage: int, shares: Sequence[float],
               split_head: bool):
    """Stage ``stage``'s module (the tail with the head when the head is split) and its split plan: what the
    stage's executors run and what ``aflkd plan --program --stages`` prints, built in one place so that
    their digests agree."""
    first, stop = bounds[stage], bounds[stage + 1]
    tail = split_head and stage == len(bounds) - 2
    module = (tail_module(model, layers, first) if tail else stage_module(model, layers, first, stop)).eval()
    plan = plan_split(trace_model(module, layers.cut_shape(first)), shares, head="split" if tail else "gather")
    return module, plan


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
    busy_images: list = field(default_factory=list)  # per rank: those seconds image by image
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
                 shares: Optional[Sequence[float]] = None, comm: mpi.Comm = mpi.COMM_WORLD,
                 layers: Optional[Layers] = None, speed: float = 1.0, head: str = "gather",
                 head_columns: Optional[torch.Tensor] = None) -> None:
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
        if head not in ("gather", "split"):
            raise UsageError(f"head must be 'gather' or 'split', got '{head}'")
        self.grid, self.layers, self.bounds, self.comm = grid, layers, bounds, comm
        self.shares = check_weights(shares, grid.clusters)
        # split: the last stage's ranks multiply their rows by their columns of the first Linear, one Reduce
        # over the last stage, and its cluster-0 rank finishes the head (see runtime.plan.HeadSplit)
        self.head_split, self.head_note = split_head_plan(layers, self.shares) if head == "split" else (None, "")
        self.split_head = self.head_split is not None
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
        last = self.stage == grid.stages - 1
        try:
            self.module, plan = stage_plan(model, layers, bounds, self.stage, self.shares, self.split_head)
            if last and self.split_head:
                self.executor = SplitExecutor(plan, self.module, self.stage_comm, root=0, head=True,
                                              head_columns=head_columns, agree=False)
            else:
                self.executor = SplitExecutor(plan, self.module, self.stage_comm, root=0, head=False, agree=False)
        except UsageError as err:
            problem = f"stage {self.stage} (layers {first}:{stop}): {err}"
        self.out_features = tuple(layers.graph.nodes[-2].shape[1:]) if self.split_head else ()
        #: every rank's per-image transfers (runtime.stream_program), the same on every rank; this rank runs its own
        self.programs = lower_pipeline(grid.clusters, grid.stages, bounds,
                                       [layers.cut_shape(k) for k in range(n + 1)], self.shares, self.split_head,
                                       self.out_features)
        self.program = self.programs[self.rank]
        if problem is None:
            problem = _program_fits_plan(self.program, plan, last and self.split_head)
        # one collective: every rank's problem, its stage's plan and its view of the whole deployment
        shape = pipeline_deployment(layers, grid.clusters, grid.stages, bounds, self.shares, head)
        stage_digest = plan_digest(plan) if problem is None else ""
        reports = mpi.allgather_objects(comm, (problem, self.stage, stage_digest, shape.digest()),
                                        what="the deployment agreement")
        problems = [p for p, _, _, _ in reports if p is not None]
        verdict = problems[0] if problems else mpi.judge_values(
            [d for _, _, _, d in reports], 0, "deployment (grid, stage cuts, rows, layers, head)",
            lambda r: mpi.who(comm, r))
        stage_plans, differ = stage_plans_of([(st, d) for _, st, d, _ in reports], grid.stages)
        verdict = verdict or (differ[0] if differ else None)
        if verdict is not None:  # every rank refuses together: none is left waiting in the stream
            self.close()
            raise mpi.AgreedError(verdict)
        #: what the whole job runs, the same on every rank (``text()`` prints it, ``digest()`` names it)
        self.deployment = dataclasses.replace(shape, stage_plans=stage_plans)
        self.in_rows = plan.input_rows[self.cluster]
        if last and self.split_head:
            self.out_value, self.out_rows = None, None
        else:
            self.out_value = plan.graph.nodes[-1].inputs[0]
            self.out_rows = plan.values[self.out_value].owned[self.cluster]
        self.final_rows = split_rows(layers.cut_shape(n)[1], self.shares)
        self.head = head_module(model, layers).eval() if self.is_root and not self.split_head else None
        self.model_params = list(model.parameters())  # what this rank built (meta where it holds nothing)
        self.model_in_shape = layers.graph.in_shape

    def close(self) -> None:
        if getattr(self, "executor", None) is not None:
            self.executor.close()  # its prepared exchanges are on stage_comm
        mpi.free_comm(self.stage_comm)
        mpi.free_comm(self.cluster_comm)

    def _poll(self) -> None:
        mpi.progress(self.comm)

    # ------------------------------------------------------------------ one image through this rank's stage
    def _band_in(self, t: int, image: Optional[torch.Tensor], batch: int, count: int) -> torch.Tensor:
        """Image ``t``'s input rows of this stage (the program's :class:`ScatterIn` or :class:`RecvBand`).  A later
        stage waits for the band it posted a receive for one image earlier, then posts the receive of image
        ``t + 1`` into the other of its two buffers before computing: the previous stage's send finds its
        receive already posted."""
        source = self.program.find(ScatterIn) or self.program.find(RecvBand)
        if isinstance(source, ScatterIn):
            return mpi.scatter_rows(self.stage_comm, image, self.executor.plan.input_rows, self.in_shape, batch)
        if t == 0:
            channels, width = source.shape
            self._in_bands = [mpi.rows_major(len(source.rows), batch, channels, width) for _ in range(2)]
            self._in_posted = self._post_band_in(0, source)
        band, posted = self._in_bands[t % 2], self._in_posted
        mpi.wait(posted, "the band of rows from the previous stage")
        self._in_posted = self._post_band_in(t + 1, source) if t + 1 < count else None
        return band.permute(1, 3, 0, 2)

    def _post_band_in(self, t: int, source: RecvBand):
        return mpi.irecv_rows(self.cluster_comm, self._in_bands[t % 2], self.grid.position(source.src)[1],
                              t % _TAG_LIMIT, "the band of rows from the previous stage")

    def _run_stage(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        poll = self._poll if self.grid.stages > 1 else None  # bands in flight move while this stage computes
        if self.out_value is None:  # the last stage with the split head: the output, on its root only
            out = self.executor.forward_band(x, poll=poll)
        else:
            out = self.executor.forward_local(x, poll=poll)[self.out_value]
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
            raise mpi.AgreedError(problem)
        return count, batch

    def _stream(self, images, count, batch) -> StreamResult:
        count, batch = self._check_stream(images)
        result = StreamResult()
        out_step = self.program.find(SendBand) or self.program.find(Keep)  # None: this rank's output goes nowhere
        collect = self.program.find(Collect)
        slots: list = []
        if isinstance(out_step, SendBand):
            slots = [torch.empty(batch, *out_step.shape) if out_step.rows is None else
                     mpi.rows_major(len(out_step.rows), batch, *out_step.shape) for _ in range(SEND_SLOTS)]
        in_flight: list = [None] * SEND_SLOTS
        pending: deque = deque()  # root: (t, full map or output, requests, start time)
        busy, spent_each = 0.0, []
        mpi.barrier(self.comm)
        begin = time.perf_counter()
        for t in range(count):
            tag = t % _TAG_LIMIT
            started = time.perf_counter()
            if collect is not None:
                pending.append(self._post_collect(t, batch, started, collect))
            x = self._band_in(t, images[t] if self.is_root and self.stage == 0 else None, batch, count)
            out, spent = self._run_stage(x)
            busy += spent
            spent_each.append(spent)
            if isinstance(out_step, Keep):  # the root's own rows of the last map, or the output itself
                target = pending[-1][1]
                if out_step.rows is None:
                    target.copy_(out)
                else:
                    target[out_step.rows.start:out_step.rows.stop].copy_(out.permute(2, 0, 3, 1))
            elif isinstance(out_step, SendBand):
                slot = t % SEND_SLOTS
                if in_flight[slot] is not None:
                    mpi.wait([in_flight[slot]])
                band = slots[slot]
                band.copy_(out if out_step.rows is None else out.permute(2, 0, 3, 1))
                if out_step.final:
                    in_flight[slot] = mpi.isend_rows(self.comm, band, out_step.dst, tag)
                else:
                    in_flight[slot] = mpi.isend_rows(self.cluster_comm, band, self.grid.position(out_step.dst)[1],
                                                     tag)
            if collect is not None:
                # image t - stages, not t - (stages - 1): one image of slack, so the root's head never waits on
                # the last stage's image that is still running (the two were in lockstep: any jitter on either
                # added to every image; edge net 3 at 224, 2 stages: median images/s 33.7 -> 37.2, speeds 1,1)
                while pending and pending[0][0] <= t - self.grid.stages:
                    self._finish(pending.popleft(), result)
        while pending:
            self._finish(pending.popleft(), result)
        mpi.wait([r for r in in_flight if r is not None])
        if self.is_root:
            result.seconds = time.perf_counter() - begin
        busy_all = mpi.gather_objects(self.comm, (busy, spent_each))
        if self.is_root:
            result.busy = [b for b, _ in busy_all]
            result.busy_images = [each for _, each in busy_all]
        return result

    def _post_collect(self, t: int, batch: int, started: float, collect: Collect):
        """The root, as image ``t`` starts: the map (or output) it ends in, and the receives of what others send."""
        if self.split_head:
            into = torch.empty(batch, *self.out_features)
        else:
            channels, height, width = self.layers.cut_shape(len(self.layers))
            into = mpi.rows_major(height, batch, channels, width)
        requests = [mpi.irecv_rows(self.comm, into if rows is None else into[rows.start:rows.stop], src,
                                   t % _TAG_LIMIT) for src, rows in collect.sources]
        return t, into, requests, started

    def _finish(self, item, result: StreamResult) -> None:
        t, full, requests, started = item
        mpi.wait(requests)
        if self.split_head:
            result.outputs.append(full)
            result.latencies.append(time.perf_counter() - started)
            return
        start = time.perf_counter()
        output = self.head(full.permute(1, 3, 0, 2).contiguous())
        result.head_seconds += time.perf_counter() - start
        result.outputs.append(output)
        result.latencies.append(time.perf_counter() - started)


def _program_fits_plan(program: StreamProgram, plan, split_tail: bool) -> Optional[str]:
    """None if the rows this rank's stream program moves are the rows its stage plan computes, else the
    problem (every rank refuses together, before any image moves)."""
    source = next(i for i in program.instructions if isinstance(i, (ScatterIn, RecvBand)))
    if source.rows != plan.input_rows[program.cluster]:
        return (f"rank {program.rank}: its stream program takes input rows {source.rows} but its stage plan "
                f"computes from {plan.input_rows[program.cluster]}")
    out = next((i for i in program.instructions if isinstance(i, (SendBand, Keep))), None)
    if out is not None and out.rows is not None and not split_tail:
        owned = plan.values[plan.graph.nodes[-1].inputs[0]].owned[program.cluster]
        if out.rows != owned:
            return (f"rank {program.rank}: its stream program moves output rows {out.rows} but its stage plan "
                    f"owns {owned}")
    return None


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


def _set_state(model: nn.Module, state: dict) -> None:
    """Put real tensors at these state-dict keys of a (meta) model; nothing else is allocated."""
    for key, value in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[attr] = value


def distribute_pipeline(build: Callable[[], nn.Module], in_shape: tuple[int, int, int], grid: Grid,
                        bounds: Sequence[int], shares: Optional[Sequence[float]] = None,
                        comm: mpi.Comm = mpi.COMM_WORLD, load: Optional[Callable[[nn.Module], None]] = None,
                        speed: float = 1.0, root_model: Optional[nn.Module] = None,
                        head: str = "gather") -> PipelineExecutor:
    """A :class:`PipelineExecutor` whose ranks hold only the weights of their own stage.

    Every rank builds ``build()`` on the meta device (structure only); rank 0
    builds it for real, calls ``load(model)``, keeps it (it runs stage 0 of
    cluster 0 and, gathering, the head) and sends every other rank the state
    of its stage's modules, once, at set-up.  A Pi never holds the head's
    Linear; with ``head="split"`` each last-stage rank gets only its columns
    of it (and the last stage's root the rest of the head).
    ``root_model``: rank 0's model, already built and loaded (then neither
    ``build`` nor ``load`` runs there again).
    """
    with empty_weights():
        skeleton = build()
    skeleton.eval()
    layers = split_layers(trace_model(skeleton, in_shape))
    weights = check_weights(shares, grid.clusters)
    head_split = split_head_plan(layers, weights)[0] if head == "split" else None
    head_targets = {f.target for f in layers.graph.fx.nodes
                    if f.op in ("call_module", "get_attr") and f.name in set(layers.head)}
    rank = comm.Get_rank()
    model, parts, problem = skeleton, None, None
    if rank == 0:
        try:
            model = root_model if root_model is not None else build()
            if root_model is None and load is not None:
                load(model)
            model.eval()
            state = model.state_dict()
            parts = []
            for r in range(comm.Get_size()):
                c, s = grid.position(r)
                targets = _stage_targets(layers, bounds[s], bounds[s + 1]) if s + 1 < len(bounds) else set()
                last = s == grid.stages - 1
                if head_split is not None and last and c == 0:
                    targets |= head_targets  # the last stage's root finishes the head
                part = {k: v for k, v in state.items() if k.rpartition(".")[0] in targets or k in targets}
                if head_split is not None and last:
                    weight = part.pop(head_split.target + ".weight", None)
                    weight = state[head_split.target + ".weight"] if weight is None else weight
                    blocks = [weight[:, i:j] for i, j in head_split.column_blocks(c)]
                    part["#head_columns"] = (torch.cat(blocks, dim=1) if blocks
                                             else weight.new_empty(weight.shape[0], 0)).contiguous()
                parts.append(part)
        except UsageError as err:
            problem = str(err)
    problem = mpi.bcast_object(comm, problem)
    if problem is not None:
        raise mpi.AgreedError(problem)
    mine = mpi.scatter_objects(comm, parts)
    columns = mine.pop("#head_columns", None)
    if rank != 0:
        _set_state(model, mine)
    return PipelineExecutor(model, in_shape, grid, bounds, shares, comm, layers=layers, speed=speed,
                            head=head, head_columns=columns)
