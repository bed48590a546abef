"""Height-split executor: runs a traced CNN graph with its rows spread over MPI ranks.

Follows a :class:`~runtime.plan.GraphPlan` built beforehand.  Every rank walks
the graph in order:

* a **window** node (conv, pool) runs its torch op once on the input rows its
  output rows need, with no height padding of its own: those rows sit in a
  preallocated channels-last buffer of the input value::

      +------------------------------+  pad_top rows (0, or -inf before max pooling)
      | halo rows from rank r-1 ...  |  received in place (Irecv)
      | own rows                     |  written by the value's producer
      | halo rows from rank r+1 ...  |  received in place (Irecv)
      +------------------------------+  pad_bottom rows

  (a value no rank needs halo rows of is read in place, with no buffer);
* **row-wise** nodes (BatchNorm, activations, residual ``add``, channel
  ``cat``, channel shuffles) run on the rank's own rows as they are;
* a **reduce** (global pool) sums its own rows and finishes with an
  ``Allreduce`` (squeeze-excitation mid-net) or a ``Reduce`` to the root (head);
* the **head** runs on the root, after the split values it reads are gathered;
  or, with a split head (``plan.head == "split"``), every rank multiplies its own
  rows of the last map by its columns of the first Linear and one ``Reduce``
  gives the root the product (no gather; the root adds the bias and runs the rest).

A value's halo exchange is posted (``Isend``/``Irecv``) as soon as its own rows
are written; its receives are waited for only by the first window node that
reads halo rows, its sends at the end of the pass (``Drain``).  The rows travel
in channels-last order, one contiguous block per message.  When the value is made by a chain of element-wise nodes (conv -> BN ->
ReLU -> buffer), the chain writes straight into the buffer, the rows other ranks
need first: their sends are posted while the rest of the rows are computed.

Why one buffer and one call per window: CPU convolutions re-pack their weights
on every call, so computing a slice as an interior plus thin edge calls (to
overlap the exchange with the interior) costs more than it hides.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_arg

from . import program as P
from . import transport as mpi
from .deployment import plan_digest
from .errors import UsageError
from .geometry import input_rows_for
from .graph import trace_model
from .layers import mutates_first_input
from .plan import GraphPlan, check_weights, plan_split
from .timing import NO_CLOCK, NoClock

__all__ = ["SplitExecutor", "check_image"]

CL = torch.channels_last


def check_image(image, in_shape: tuple[int, int, int]) -> None:
    """Raise :class:`UsageError` unless ``image`` is a float32 ``(N, C, H, W)`` batch of the planned shape."""
    if not isinstance(image, torch.Tensor):
        raise UsageError(f"input must be a torch.Tensor image batch, got {type(image).__name__}")
    shape = tuple(image.shape)
    if image.dim() != 4:
        raise UsageError(
            f"input must be an image batch of shape (N, C, H, W), got shape {shape}; "
            "add a batch dimension with x.unsqueeze(0)"
        )
    c, h, w = in_shape
    if shape[1:] != (c, h, w):
        raise UsageError(f"input images are {shape[1]}x{shape[2]}x{shape[3]} (C x H x W) but the plan is for "
                         f"{c}x{h}x{w}; plan for this shape or resize the input")
    if shape[0] < 1:
        raise UsageError("input batch is empty")
    if image.dtype != torch.float32:
        raise UsageError(f"input dtype must be float32, got {image.dtype}; use x.float()")


def _call(fx_node, module, args, kwargs):
    """Run one fx node as eager torch would."""
    if fx_node.op == "call_module":
        return module(*args, **kwargs)
    if fx_node.op == "call_function":
        return fx_node.target(*args, **kwargs)
    if fx_node.op == "call_method":
        return getattr(args[0], fx_node.target)(*args[1:], **kwargs)
    raise AssertionError(fx_node.op)


def _writes_shared_input(fx_node, module, graph, plan) -> bool:
    """An in-place node whose input is not its alone: another node reads it, or its rows are sent (a halo or a
    gather whose Isend may still be in flight when the node runs)."""
    if not fx_node.args or not isinstance(fx_node.args[0], torch.fx.Node) or not mutates_first_input(fx_node, module):
        return False
    source = fx_node.args[0].name
    value = plan.values.get(source)
    return len(graph.consumers(source)) > 1 or (value is not None and value.exchange is not None) or graph[source].gather


def _fold_batchnorm(module: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as ``x * a + b`` per channel (snapshot of the statistics at build time)."""
    with torch.no_grad():
        a = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            a = a * module.weight
        b = -module.running_mean * a
        if module.bias is not None:
            b = b + module.bias
    return a.view(1, -1, 1, 1).clone(), b.view(1, -1, 1, 1).clone()


_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_RELU = {torch.relu, F.relu, "relu", "relu_"}


def _writer(fx_node, module, folded):
    """``f(args, kwargs, out)``: the node's element-wise result written into ``out`` (which may alias an input)."""
    key = fx_node.target if fx_node.op != "call_module" else None
    if isinstance(module, nn.BatchNorm2d):
        a, b = folded
        return lambda args, kwargs, out: torch.addcmul(b, args[0], a, out=out)
    if isinstance(module, nn.ReLU) or key in _RELU and not (fx_node.kwargs or len(fx_node.args) > 1):
        return lambda args, kwargs, out: torch.clamp_min(args[0], 0, out=out)
    if isinstance(module, nn.ReLU6):
        return lambda args, kwargs, out: torch.clamp(args[0], 0, 6, out=out)
    if isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return lambda args, kwargs, out: out if args[0] is out else out.copy_(args[0])
    plain = not fx_node.kwargs and len(fx_node.args) == 2
    if key in _ADD and plain:
        return lambda args, kwargs, out: torch.add(args[0], args[1], out=out)
    if key in _MUL and plain:
        return lambda args, kwargs, out: torch.mul(args[0], args[1], out=out)
    return lambda args, kwargs, out: out.copy_(_call(fx_node, module, args, kwargs))


#: The requests and buffers of passes that failed with messages possibly in flight: kept until the process ends.
_IN_FLIGHT: list = []


class SplitExecutor:
    """Runs a planned model split by height over ``comm``; rank ``root`` gets the output.

    ``model`` is the module the plan was traced from (or one of the same
    structure): each rank needs real weights only for the nodes it runs --
    the split part everywhere, the head on the root (see
    :func:`runtime.distribute.distribute_model`, which builds exactly that).
    Buffers are built for a batch size on first use and reused while it stays
    the same.  BatchNorm statistics are folded into per-channel scales when
    the executor is built: build a new executor after changing the weights.
    """

    def __init__(self, plan: GraphPlan, model: nn.Module, comm: mpi.Comm = mpi.COMM_WORLD, root: int = 0,
                 head: bool = True, head_columns: Optional[torch.Tensor] = None, agree: bool = True) -> None:
        """``agree`` False: the caller agrees on the set-up and the plan over a wider communicator (a pipeline
        stage's executor: the whole job refuses together) and a set-up problem is raised here, on this rank."""
        self._t = transport_for(comm)
        if not agree:
            self._set_up(plan, model, comm, root, head, head_columns)
            return
        problem = None
        try:
            self._set_up(plan, model, comm, root, head, head_columns)
        except UsageError as err:  # one board's problem (weights missing, another plan) is every rank's
            problem = str(err)
        # the set-up agreed, then the plan itself: a rank that planned otherwise is named before any image moves
        self._t.agree(comm, problem, "split executor set-up")
        self._t.agree_on(comm, plan_digest(plan), "split plan")

    def _set_up(self, plan: GraphPlan, model: nn.Module, comm, root: int, head: bool,
                head_columns: Optional[torch.Tensor]) -> None:
        size = comm.Get_size()
        if plan.ranks != size:
            raise UsageError(f"the plan is for {plan.ranks} ranks but the communicator has {size}; "
                             "plan with one weight per rank")
        if not 0 <= root < size:
            raise UsageError(f"root rank {root} outside the {size} ranks")
        self.plan, self.graph, self.comm = plan, plan.graph, comm
        self.model = model
        self.rank, self.root = comm.Get_rank(), root
        self.is_root = self.rank == root and head  # head=False: forward_local only (a benchmark's bound)
        # a split head (plan.head == "split"): every rank multiplies its rows by its columns of the first Linear
        self._split_head = plan.head_split if head else None
        skip = set(self._split_head.skip + (self._split_head.linear,)) if self._split_head else set()
        self._fx = list(self.graph.fx.nodes)
        self._index = {n.name: i for i, n in enumerate(self.graph.nodes)}
        self._modules: dict[str, object] = {}
        self._folded: dict[str, tuple] = {}
        for f, g in zip(self._fx, self.graph.nodes):
            if g.placement == "root" and not self.is_root or f.op not in ("call_module", "get_attr") or g.name in skip:
                continue
            thing = model.get_submodule(f.target) if f.op == "call_module" else _fetch_attr(model, f.target)
            tensors = list(thing.parameters()) + list(thing.buffers()) if isinstance(thing, nn.Module) else [thing]
            if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
                raise UsageError(f"rank {self.rank} runs node '{g.name}' but holds no weights for "
                                 f"'{f.target}' (meta tensors); load them, e.g. with runtime.distribute_model")
            if isinstance(thing, (nn.BatchNorm2d, nn.Dropout, nn.Dropout2d)) and thing.training:
                raise UsageError(f"module '{f.target}' is in training mode; call model.eval() before split inference")
            self._modules[g.name] = thing
            if isinstance(thing, nn.BatchNorm2d) and g.placement == "rows":
                self._folded[g.name] = _fold_batchnorm(thing)
        if self._split_head is not None:
            self._head_weight, self._head_bias = self._head_slice(model, head_columns)
        #: what this rank runs, decided once from the plan (printable: ``aflkd plan --program``)
        self.program = P.lower(plan, self.rank, root=root, head=head, module_of=lambda f: self._modules.get(f.name))
        self._batch: Optional[int] = None
        self._prepared: list = []  # the halo exchanges of buffered values, made once per batch size
        self._failed: Optional[str] = None  # why a pass failed: its messages may be in flight, no pass follows

    def _head_slice(self, model: nn.Module, columns: Optional[torch.Tensor]):
        """This rank's columns of the split Linear's weight (given, or cut from the model's); the root's bias."""
        hs = self._split_head
        linear = model.get_submodule(hs.target)
        want = (hs.out_features, hs.columns(self.rank))
        if columns is None:
            weight = linear.weight
            if weight.is_meta:
                raise UsageError(f"rank {self.rank} runs its columns of Linear '{hs.target}' but holds no weights "
                                 "for it (meta); pass head_columns= or use runtime.distribute_model")
            with torch.no_grad():
                blocks = [weight[:, a:b] for a, b in hs.column_blocks(self.rank)]
                columns = torch.cat(blocks, dim=1) if blocks else weight.new_empty(want)
        if tuple(columns.shape) != want:
            raise UsageError(f"rank {self.rank}: head_columns for Linear '{hs.target}' must have shape {want}, "
                             f"got {tuple(columns.shape)}")
        bias = None
        if self.is_root and linear.bias is not None:
            if linear.bias.is_meta:
                raise UsageError(f"the root holds no bias for Linear '{hs.target}' (meta); load it")
            bias = linear.bias.detach()
        return columns.detach().contiguous(), bias

    @classmethod
    def build(cls, model: nn.Module, in_shape: tuple[int, int, int], comm: mpi.Comm = mpi.COMM_WORLD,
              weights=None, root: int = 0, head: str = "gather") -> "SplitExecutor":
        """Trace, plan and build in one call, for a model every rank holds whole (tests, small nets).

        ``head``: ``"gather"``, ``"split"`` or ``"auto"`` (see :func:`runtime.headcost.choose_head`).
        """
        weights = check_weights(weights, comm.Get_size())
        graph = trace_model(model, in_shape)
        if head == "auto":
            from .headcost import choose_head

            return cls(choose_head(graph, weights, comm, root=root), model, comm, root)
        return cls(plan_split(graph, weights, head=head), model, comm, root)

    # ------------------------------------------------------------------ set-up per batch size
    def _prepare(self, batch: int) -> None:
        """Buffers for ``batch`` images and one step per instruction of the program (built once per batch size)."""
        r = self.rank
        self._buffers: dict[str, torch.Tensor] = {}
        for name, value in self.plan.values.items():
            spec = value.buffers[r]
            if spec is None:
                continue
            _, channels, _, width = self.graph[name].shape
            buf = torch.empty((batch, channels, spec.length, width), memory_format=CL).zero_()  # skipped rows: finite
            buf[:, :, : spec.pad_top].fill_(spec.fill)
            buf[:, :, spec.length - spec.pad_bottom:].fill_(spec.fill)
            self._buffers[name] = buf
        self._own_views = {name: self._buffers[name][:, :, v.owned[r].start - v.buffers[r].first:
                                                     v.owned[r].stop - v.buffers[r].first]
                           for name, v in self.plan.values.items() if name in self._buffers}
        self.close()  # the previous batch size's exchanges (made on its buffers)
        self._split_steps = [self._step(ins) for ins in self.program.split]
        self._exchange_free_steps = None  # built when first asked for (benchmarks only)
        self._head_steps = [self._step(ins) for ins in self.program.head]
        self._batch = batch

    def _step(self, ins):
        """The step that carries out one instruction: ``step(env, clock)``."""
        kind = type(ins)
        if kind is P.Window:
            if ins.empty:
                return self._empty_window_step(ins)
            return self._window_step(ins) if ins.parts is None else self._window_parts_step(ins)
        builders = {P.Input: self._input_step, P.Fused: self._fused_step, P.Compute: self._compute_step,
                    P.PostHalo: self._post_step, P.AwaitHalo: self._await_step, P.Partial: self._partial_step,
                    P.AllReduce: self._finish_step, P.Reduce: self._finish_step,
                    P.SplitLinear: self._split_linear_step, P.Gather: self._gather_step,
                    P.Output: self._output_step, P.Drain: self._drain_step}
        return builders[kind](ins)

    # ------------------------------------------------------------------ steps, one per kind of instruction
    def _store(self, name: str, env: dict, t: torch.Tensor) -> None:
        """Value ``name``'s own rows are ``t``: into its buffer when it has one (env then holds the buffer's view)."""
        view = self._own_views.get(name)
        if view is None:
            env[name] = t
            return
        if t is not view and view.shape[2]:
            view.copy_(t)
        env[name] = view

    def _input_step(self, ins):
        name = ins.value

        def step(env, clock):
            self._store(name, env, env[name])
        return step

    def _empty_window_step(self, ins):
        _, channels, _, width = self.graph[ins.node].shape
        name = ins.node

        def step(env, clock):
            self._store(name, env, torch.empty((self._batch, channels, 0, width), memory_format=CL))
        return step

    def _window_op_of(self, ins):
        f = self._fx[self._index[ins.node]]
        module = self._modules[ins.node] if f.op == "call_module" else None
        return _window_op(self.graph[ins.node].window, module, narrow=self.graph[ins.source].shape[3] == 1)

    def _window_step(self, ins):
        r, name, source, i = self.rank, ins.node, ins.source, self._index[ins.node]
        read = self.plan.windows[name].reads[r]
        value = self.plan.values[source]
        op = self._window_op_of(ins)
        own, buf_spec = value.owned[r], value.buffers[r]
        if read.repad:
            image_rows = read.rows.clip(value.height)
            lo, hi = image_rows.start, image_rows.stop
        else:
            lo, hi = read.rows.start, read.rows.stop
        fill = self.graph[name].window.fill

        window = self._buffers[source][:, :, lo - buf_spec.first: hi - buf_spec.first] if read.from_buffer else None

        def step(env, clock):
            since = clock.now()
            if window is not None:
                x = window
            else:
                x = env[source][:, :, lo - own.start: hi - own.start]
            if read.repad:
                x = F.pad(x, (0, 0, read.pad_top, read.pad_bottom), value=fill)
            y = op(x)
            clock.spent(i, since)
            self._store(name, env, y)
        return step

    def _window_parts_step(self, ins):
        """Some output rows of a pool (those others wait for, or the rest), written into its buffer.

        Pools are cheap to call per part (convs are not: they re-pack weights per call).
        """
        r, name, source, i = self.rank, ins.node, ins.source, self._index[ins.node]
        op = self._window_op_of(ins)
        first, src_first = self.plan.values[name].buffers[r].first, self.plan.values[source].buffers[r].first
        geometry = self.graph[name].window.height
        parts = [(p, input_rows_for(p, geometry)) for p in ins.parts]

        def step(env, clock):
            since = clock.now()
            buf, src = self._buffers[name], self._buffers[source]
            for p, rows in parts:
                buf[:, :, p.start - first: p.stop - first].copy_(
                    op(src[:, :, rows.start - src_first: rows.stop - src_first]))
            env[name] = self._own_views[name]
            clock.spent(i, since)
        return step

    def _fused_step(self, ins):
        """A chain of element-wise nodes over rows ``ins.parts``, written into the buffer of its last node."""
        r, name = self.rank, ins.node
        value = self.plan.values[name]
        own, first = value.owned[r], value.buffers[r].first
        members = []
        for k, member in enumerate(ins.chain):
            idx = self._index[member]
            f = self._fx[idx]
            write = _writer(f, self._modules.get(member), self._folded.get(member))
            prev = ins.chain[k - 1] if k else None
            rows_args = {a.name for a in f.all_input_nodes if self.graph[a.name].placement == "rows"}
            members.append((idx, write, _arg_reader(f, prev, rows_args)))
        parts = list(ins.parts)

        buf = self._buffers[name]  # (steps are built with the buffers: their views are made once)
        views = [(p.start - own.start, p.stop - own.start, buf[:, :, p.start - first: p.stop - first]) for p in parts]
        own_view = self._own_views[name]

        def step(env, clock):
            for a, b, dst in views:
                for idx, write, read in members:
                    since = clock.now()
                    args, kwargs = read(env, dst, a, b)
                    write(args, kwargs, dst)
                    clock.spent(idx, since)
            env[name] = own_view
        return step

    def _compute_step(self, ins):
        name, i = ins.node, self._index[ins.node]
        f, g = self._fx[i], self.graph.nodes[i]
        module = self._modules.get(name)
        stores = ins.where == "rows" and name in self.plan.values
        if ins.how == "reshape":  # the traced shape with this rank's rows: a -1 cannot be inferred with no rows
            source = f.all_input_nodes[0].name
            src_hdim, hdim, traced = self.graph[source].hdim, g.hdim, list(g.shape)

            def compute(env):
                x = env[source]
                shape = list(traced)
                shape[0], shape[hdim] = x.shape[0], x.shape[src_hdim]
                return x.reshape(shape)
        elif ins.how == "batchnorm":  # eval BatchNorm as x * a + b: F.batch_norm on channels-last maps is slower
            a, b = self._folded[name]
            source = f.all_input_nodes[0].name

            def compute(env):
                return torch.addcmul(b, env[source], a)
        elif ins.how == "identity":  # e.g. an adaptive pool to the size the map already has
            source = f.all_input_nodes[0].name

            def compute(env):
                return env[source]
        elif f.op == "get_attr":
            def compute(env):
                return module
        else:
            if ins.where == "root":
                look = lambda env: lambda n: env.get(n.name + "#full", env.get(n.name))  # noqa: E731
            else:
                look = lambda env: lambda n: env[n.name]  # noqa: E731

            if _writes_shared_input(f, module, self.graph, self.plan):
                def compute(env):  # on a copy: the input's rows are still read by others or in flight (Isend)
                    find = look(env)
                    args = map_arg(f.args, find)
                    return _call(f, module, (args[0].clone(),) + tuple(args[1:]), map_arg(f.kwargs, find))
            else:
                def compute(env):
                    find = look(env)
                    return _call(f, module, map_arg(f.args, find), map_arg(f.kwargs, find))

        def step(env, clock):
            since = clock.now()
            out = compute(env)
            clock.spent(i, since)
            if stores:
                self._store(name, env, out)
            else:
                env[name] = out
        return step

    def _messages(self, ins, source: torch.Tensor):
        """(sends, recvs, bytes sent, tensors to keep) of a halo exchange as ready MPI messages."""
        r = self.rank
        value = self.plan.values[ins.value]
        own = value.owned[r]
        buf = self._buffers.get(ins.value)
        first = value.buffers[r].first if buf is not None else None
        sends = [(source[:, :, t.rows.start - own.start: t.rows.stop - own.start], t.dst) for t in ins.sends]
        recvs = [(buf[:, :, t.rows.start - first: t.rows.stop - first], t.src) for t in ins.recvs]
        wire = self._t.CHANNELS_LAST_ORDER  # both ends: a channels-last band moves as one block
        return ([(self._t.message(t, wire), d) for t, d in sends], [(self._t.message(t, wire), s) for t, s in recvs],
                sum(t.numel() * t.element_size() for t, _ in sends), [t for t, _ in sends])

    def _post_step(self, ins):
        value = self.plan.values[ins.value]
        node, index = self._index[value.exchange.node], self._index[ins.value]
        # one tag per value, the same every pass (see transport.Prepared: every pass posts the same messages in
        # the same order, so a pass's receive only matches that pass's message) and whichever end buffers it
        tag = self._t.halo_tag(index, len(self._fx))
        if ins.value in self._buffers:  # its rows are the same memory every pass: messages made once, started each
            sends, recvs, nbytes, keep = self._messages(ins, self._own_views[ins.value])
            prepared = self._t.prepare_messages(self.comm, sends, recvs, tag)
            self._prepared.append(prepared)

            def step(env, clock):
                since = clock.now()
                # the receives are awaited by the value's first reader; the sends only at the end of the pass
                # (their rows are not written again before it), so a rank never waits for its own sends to land
                self._pending[ins.value], sent = prepared.start()
                self._all_requests.append((sent, keep))
                clock.sent(node, nbytes)
                clock.waited(node, since)
            return step
        if ins.recvs:
            raise AssertionError(f"'{ins.value}' receives halo rows but has no buffer on rank {self.rank}")

        def step(env, clock):  # sends only, from a tensor made this pass (a value with no halo of its own here)
            since = clock.now()
            sends, _, nbytes, keep = self._messages(ins, env[ins.value])
            self._all_requests.append((self._t.post_messages(self.comm, sends, (), tag), keep))
            clock.sent(node, nbytes)
            clock.waited(node, since)
        return step

    def _await_step(self, ins):
        consumer = next(self._index[w.name] for w in self.plan.windows.values() if w.source == ins.value)

        def step(env, clock):
            requests = self._pending.pop(ins.value, None)
            if requests is not None:
                since = clock.now()
                self._t.wait(requests)
                clock.waited(consumer, since)
        return step

    def _drain_step(self, ins):
        def step(env, clock):
            # every send of the pass, and received rows no instruction read (none in a checked program): one wait
            self._t.wait([requests for requests, _ in self._all_requests] + list(self._pending.values()))
            self._all_requests, self._pending = [], {}
        return step

    def _partial_step(self, ins):
        """A global pool's share of this rank: sum (or max) over its own rows, kept in ``NAME#partial``."""
        name, i = ins.node, self._index[ins.node]
        source = self._fx[i].all_input_nodes[0].name

        def step(env, clock):
            since = clock.now()
            x = env[source]
            if ins.reduce == "mean":
                part = x.sum(dim=(2, 3), keepdim=True, dtype=torch.float32).contiguous()
            elif x.shape[2] == 0:
                part = torch.full((x.shape[0], x.shape[1], 1, 1), float("-inf"), dtype=x.dtype)
            else:
                part = x.amax(dim=(2, 3), keepdim=True).contiguous()
            env[name + "#partial"] = part
            clock.spent(i, since)
        return step

    def _exchange_free_step(self, ins):
        """The step of ``ins`` with no message: a reduction over ranks keeps this rank's own part."""
        if type(ins) in (P.AllReduce, P.Reduce):
            return self._finish_step(ins, local=True)
        if type(ins) in (P.Gather, P.SplitLinear):
            raise ValueError(f"{type(ins).__name__} is not part of the split pass")
        return self._step(ins)

    def _finish_step(self, ins, local: bool = False):
        name, i = ins.node, self._index[ins.node]
        g = self.graph[name]
        source = self.graph[g.inputs[0]]
        count = source.shape[2] * source.shape[3]
        everywhere = isinstance(ins, P.AllReduce)

        def step(env, clock):
            since = clock.now()
            part = env.pop(name + "#partial")
            if local:
                total = part
            else:
                total = (self._t.allreduce_(self.comm, part, ins.op) if everywhere
                         else self._t.reduce_(self.comm, part, ins.op, ins.root))
            if total is not None:
                if g.reduce == "mean":
                    total = total / count
                env[name] = total if g.keepdim else total.flatten(1)
            clock.waited(i, since)
        return step

    def _split_linear_step(self, ins):
        """Own rows (flattened in NCHW order) x own columns, summed over ranks onto the root; the root adds the bias."""
        i, out_features = self._index[ins.node], self._split_head.out_features
        weight, bias = self._head_weight, self._head_bias

        def step(env, clock):
            since = clock.now()
            x = env[ins.value]
            batch = x.shape[0]
            if weight.shape[1]:
                part = F.linear(x.contiguous().reshape(batch, -1), weight)  # NCHW order: the flatten's
            else:
                part = torch.zeros(batch, out_features, dtype=weight.dtype)
            clock.spent(i, since)
            since = clock.now()
            total = self._t.reduce_(self.comm, part.contiguous(), "sum", ins.root)
            clock.waited(i, since)
            if total is not None:
                env[ins.node] = total + bias if bias is not None else total
        return step

    def _gather_step(self, ins):
        owned = self.plan.values[ins.value].owned

        def step(env, clock):
            full = self._t.gather_rows(self.comm, env[ins.value].contiguous(memory_format=CL), owned, ins.root)
            if full is not None:
                env[ins.value + "#full"] = full
        return step

    def _output_step(self, ins):
        f = self._fx[-1]

        def step(env, clock):
            if self.is_root:
                env["#output"] = map_arg(f.args[0], lambda n: env.get(n.name + "#full", env.get(n.name)))
        return step

    # ------------------------------------------------------------------ execution
    def forward_local(self, x: torch.Tensor, clock: NoClock = NO_CLOCK, poll=None, exchange: bool = True) -> dict:
        """This rank's input rows -> the split part of the graph (no gather, no head).

        ``x`` holds rows ``plan.input_rows[rank]`` of every image in the batch.
        Returns the rank's environment (values by node name); used for timing.
        ``poll``: called after every instruction (a pipeline stage lets its bands move meanwhile).
        ``exchange=False`` runs the same program without its messages (no halo rows move, an
        all-reduce keeps this rank's part): the same compute on the same buffers, so its time is
        what the split would take if exchanges were free.  Its output is not the model's.
        """
        if self._failed is not None:
            raise RuntimeError(f"this executor's earlier pass failed ({self._failed}); its messages may still be "
                               "in flight: build a new executor")
        with torch.no_grad():
            batch = x.shape[0]
            if batch != self._batch:
                self._prepare(batch)
            self._pending: dict[str, list] = {}
            self._all_requests: list = []
            env = {self.graph.input.name: x}
            steps = self._split_steps
            if not exchange:
                if self._exchange_free_steps is None:
                    self._exchange_free_steps = [self._exchange_free_step(ins) for ins in self.exchange_free_program()]
                steps = self._exchange_free_steps
            try:
                for k, step in enumerate(steps):
                    since = clock.now()
                    step(env, clock)
                    clock.step(k, since)
                    if poll is not None:
                        poll()
            except BaseException as err:
                self._failed = f"{type(err).__name__}: {err}".splitlines()[0]
                _IN_FLIGHT.append((self._prepared, self._buffers))  # never freed: a late message may land there
                raise
            return env

    def close(self) -> None:
        """Release this executor's prepared halo exchanges (MPI persistent requests) now rather than when the
        collector gets to it; a later pass makes them again.  After a failed pass they stay: a receive may
        still land in their buffers."""
        if self._failed is None:
            for prepared in self._prepared:
                prepared.free()
            self._prepared, self._batch = [], None

    def exchange_free_program(self) -> list:
        """The split part's instructions that ``forward_local(exchange=False)`` runs, in order (its clock's
        step indices)."""
        return [ins for ins in self.program.split if type(ins) not in (P.PostHalo, P.AwaitHalo, P.Drain)]

    def __call__(self, image: Optional[torch.Tensor], batch: int = 1, clock: NoClock = NO_CLOCK):
        """Scatter the root's image batch, run split, gather, run the head on the root.

        Only the root needs ``image`` (others pass None).  Returns the model's
        output on the root and ``None`` on the other ranks.  A bad image raises
        :class:`UsageError` on every rank, so none is left waiting.  Works in any
        grad mode (inference only: nothing is recorded for autograd).
        """
        with torch.no_grad():
            problem = None
            if self.is_root:
                try:
                    check_image(image, self.plan.in_shape)
                    batch = image.shape[0]
                except UsageError as err:
                    problem = str(err)
            # per image: two integers, not a pickle; the problem's text travels only when there is one
            batch, failed = self._t.bcast_ints(self.comm, (batch if problem is None else 0, problem is not None),
                                           self.root, "the image's batch size")
            if failed:
                raise self._t.AgreedError(self._t.bcast_object(self.comm, problem, self.root))
            x = self._t.scatter_rows(self.comm, image, self.plan.input_rows, self.plan.in_shape, batch, root=self.root)
            return self.forward_band(x, clock)

    def forward_band(self, x: torch.Tensor, clock: NoClock = NO_CLOCK, poll=None):
        """This rank's input rows -> the model's output on the root (None elsewhere): split part, then head.

        What :meth:`__call__` runs after its scatter; a pipeline's last stage
        calls it with the band the previous stage sent.
        """
        with torch.no_grad():
            env = self.forward_local(x, clock, poll)
            clock.split_done()
            for step in self._head_steps:
                step(env, clock)
            return env.get("#output") if self.is_root else None


def _arg_reader(fx_node, prev: Optional[str], rows_args: set):
    """``read(env, dst, a, b) -> (args, kwargs)``: a chain member's arguments for rows ``a:b`` of its own
    rows -- the previous member's output is ``dst`` (written in place), another split input its rows
    ``a:b``, anything else as it is.  Flat positional args without kwargs (element-wise modules and
    operators) are read without ``map_arg``: this runs per part, per member, per image."""
    def nested(env, dst, a, b):
        def look(n):
            if n.name == prev:
                return dst
            return env[n.name][:, :, a:b] if n.name in rows_args else env[n.name]
        return map_arg(fx_node.args, look), map_arg(fx_node.kwargs, look)

    if fx_node.kwargs or any(isinstance(arg, (list, tuple, dict, slice)) for arg in fx_node.args):
        return nested

    def kind(arg):
        if not isinstance(arg, torch.fx.Node):
            return 0, arg
        if arg.name == prev:
            return 1, None
        return (2 if arg.name in rows_args else 3), arg.name

    kinds = tuple(kind(arg) for arg in fx_node.args)
    no_kwargs: dict = {}

    def flat(env, dst, a, b):
        return tuple(value if k == 0 else dst if k == 1 else env[value][:, :, a:b] if k == 2 else env[value]
                     for k, value in kinds), no_kwargs
    return flat


def transport_for(comm):
    """The module whose functions carry ``comm``'s messages: :mod:`runtime.inprocess` for an in-process rank,
    else :mod:`runtime.transport` (MPI)."""
    from . import inprocess

    return inprocess if isinstance(comm, inprocess.InProcessComm) else mpi


def _fetch_attr(model: nn.Module, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _window_op(spec, module, narrow: bool = False):
    """The window's functional op with height padding removed (the buffer carries it)."""
    h, w = spec.height, spec.width
    kernel, stride, dilation = (h.kernel, w.kernel), (h.stride, w.stride), (h.dilation, w.dilation)
    padding = (0, w.padding)
    if spec.kind == "conv":
        bias, groups = module.bias, module.groups
        if narrow:
            # torch's channels-last conv has crashed (SIGSEGV) on 1-pixel-wide maps with width padding
            # (seen: 1x1 kernel, stride 2, dilation 2): input and weights both NCHW, so torch picks NCHW.
            weight = module.weight.detach().contiguous()
            return lambda x: F.conv2d(x.clone(memory_format=torch.contiguous_format), weight, bias, stride, padding,
                                      dilation, groups)
        # channels-last like the maps: a conv given NCHW weights converts them on every call
        weight = module.weight.detach().contiguous(memory_format=CL)
        return lambda x: F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if spec.kind == "maxpool":
        return lambda x: F.max_pool2d(x, kernel, stride, padding, dilation, spec.ceil_mode)
    return lambda x: F.avg_pool2d(x, kernel, stride, padding, spec.ceil_mode, spec.count_include_pad,
                                  spec.divisor_override)
