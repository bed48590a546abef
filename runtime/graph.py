"""A CNN as data: its ``torch.fx`` graph, every node classified for height-split execution.

:func:`trace_model` traces the torch module symbolically (nested modules are
looked through), propagates shapes on meta or fake tensors (no real compute,
so it is cheap on every rank) and gives each node

* a **role**: ``input``, ``window`` (conv/pool: reads a window of rows),
  ``rowwise`` (each output row from the same input row: element-wise ops,
  residual ``add``, channel ``cat``/``chunk``, channel shuffles), ``reduce``
  (a global pool: a sum or max over every row, finished by an all-reduce),
  ``head`` (mixes rows, e.g. a flatten to ``(batch, features)``: runs on the
  root after a gather), ``plain`` (no split input: weights, sizes, the MLP of a
  squeeze-excitation) or ``output``;
* a **placement**: ``rows`` (every rank holds a band of rows), ``all``
  (every rank holds the whole, small value) or ``root`` (only the root).

Anything that would mix rows in a way the split cannot reproduce exactly is
refused here, with one line naming the node.  The planner
(:mod:`runtime.plan`) partitions this description; it never sees modules.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node, Tracer
from torch.fx.node import map_aggregate

from .errors import UsageError
from .layers import (ELEMENTWISE_METHODS, ELEMENTWISE_MODULES, WindowSpec, is_elementwise_function,
                     mutates_first_input, window_of_function, window_of_module)

__all__ = ["GraphNode", "ModelGraph", "trace_model"]

_VIEWS_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_VIEWS_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESAMPLING = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle,
               nn.MultiheadAttention, nn.Unfold, nn.Fold)


@dataclass(frozen=True)
class GraphNode:
    """One node of the traced graph, as the planner and executor see it.

    ``shape`` is the traced output shape with batch 1 (None for non-tensors);
    ``hdim`` the dimension of the rows of a ``rows`` value; ``window`` the
    geometry of a window node; ``reduce`` ``"mean"`` or ``"max"`` for a
    global pool, with ``keepdim``; ``gather``: this rows value is gathered to
    the root (a head node or the output reads it).
    """

    index: int
    name: str
    role: str
    placement: str
    label: str
    inputs: tuple[str, ...]
    shape: Optional[tuple[int, ...]] = None
    hdim: Optional[int] = None
    window: Optional[WindowSpec] = None
    reduce: Optional[str] = None
    keepdim: bool = True
    gather: bool = False
    identity: bool = False

    @property
    def height(self) -> int:
        return self.shape[self.hdim]


@dataclass(frozen=True)
class ModelGraph:
    """The classified graph of one model at one input shape ``(C, H, W)``."""

    in_shape: tuple[int, int, int]
    nodes: tuple[GraphNode, ...]
    fx: torch.fx.Graph = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {n.name: n for n in self.nodes})
        consumers: dict[str, list[GraphNode]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                if n not in consumers[i]:
                    consumers[i].append(n)
        object.__setattr__(self, "_consumers", {k: tuple(v) for k, v in consumers.items()})

    def __getitem__(self, name: str) -> GraphNode:
        return self._by_name[name]  # type: ignore[attr-defined]

    def consumers(self, name: str) -> tuple[GraphNode, ...]:
        return self._consumers[name]  # type: ignore[attr-defined]

    @property
    def input(self) -> GraphNode:
        return self.nodes[0]

    def module_targets(self, placements: tuple[str, ...]) -> list[str]:
        """Qualified names of the modules (and attributes) that nodes with these placements use."""
        return [f.target for f, n in zip(self.fx.nodes, self.nodes)
                if f.op in ("call_module", "get_attr") and n.placement in placements]


class _LeafTracer(Tracer):
    """fx tracer that looks through every container (torchvision's blocks too)."""


def _fx_shape(meta) -> Optional[tuple[int, ...]]:
    if meta is None:
        return None
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _label(fx_node: Node, gm: GraphModule) -> str:
    if fx_node.op == "call_module":
        return type(gm.get_submodule(fx_node.target)).__name__
    if fx_node.op == "call_function":
        return getattr(fx_node.target, "__name__", str(fx_node.target))
    return str(fx_node.target)


def _carry_height(in_shape, hdim: int, out_shape) -> Optional[int]:
    """The output dim that is the input's row dim, unchanged, under a reshape; None if rows get mixed."""
    before, after, height = math.prod(in_shape[:hdim]), math.prod(in_shape[hdim + 1:]), in_shape[hdim]
    run = 1
    for k, size in enumerate(out_shape):
        if run == before and size == height and math.prod(out_shape[k + 1:]) == after:
            return k
        run *= size
    return None


def _dims(value, ndim: int) -> Optional[set]:
    if value is None:
        return None
    values = value if isinstance(value, (list, tuple)) else [value]
    return {int(v) % ndim for v in values}


class _Classifier:
    """Walks the fx graph in order and decides each node's role and placement."""

    def __init__(self, gm: GraphModule, in_shape) -> None:
        self.gm, self.in_shape = gm, in_shape
        self.kind: dict[str, str] = {}  # rows, rows_tuple, all, local, root
        self.hdim: dict[str, int] = {}
        self.nodes: list[dict] = []

    def refuse(self, n: Node, why: str) -> UsageError:
        return UsageError(f"node '{n.name}' ({_label(n, self.gm)}) is not supported by height-split "
                          f"execution: {why}")

    def run(self) -> list[dict]:
        for index, n in enumerate(self.gm.graph.nodes):
            inputs = []
            map_aggregate((n.args, n.kwargs), lambda a: inputs.append(a.name) if isinstance(a, Node) else None)
            inputs = list(dict.fromkeys(inputs))
            entry = dict(index=index, name=n.name, label=_label(n, self.gm), inputs=tuple(inputs),
                         shape=_fx_shape(n.meta.get("tensor_meta")))
            entry.update(self.classify(n, inputs, entry["shape"]))
            if entry.get("hdim") is not None:
                self.hdim[n.name] = entry["hdim"]
            self.kind[n.name] = entry.pop("kind")
            self.nodes.append(entry)
        return self.nodes

    def classify(self, n: Node, inputs: list[str], shape) -> dict:
        if n.op == "placeholder":
            if any(e["role"] == "input" for e in self.nodes):
                raise self.refuse(n, "the model takes more than one input; give it one image batch")
            return dict(role="input", kind="rows", hdim=2)
        if n.op == "get_attr":
            return dict(role="plain", kind="all")
        if n.op == "output":
            return dict(role="output", kind="root")
        kinds = [self.kind[i] for i in inputs]
        split = [i for i, k in zip(inputs, kinds) if k in ("rows", "rows_tuple")]
        if n.meta.get("type") is _Unknown:  # could not run on this input (lenient tracing): never runs
            return dict(role="head" if split else "plain", kind="root")
        if not split:
            if "root" in kinds:
                if "local" in kinds:
                    raise self.refuse(n, "the head uses the size of a split feature map, which differs by rank; "
                                      "use sizes of the gathered tensor")
                return dict(role="plain", kind="root")
            return dict(role="plain", kind="local" if "local" in kinds else "all")
        if "root" in kinds:
            raise self.refuse(n, "it combines a split feature map with a value computed on the root only")
        return self.classify_split(n, split, shape)

    # ---------------------------------------------------------------- on split values
    def classify_split(self, n: Node, split: list[str], shape) -> dict:
        module = self.gm.get_submodule(n.target) if n.op == "call_module" else None
        first = split[0]
        hdim = self.hdim[first]
        src_shape = self._shape(first)

        if module is not None:
            if module.training and _training_matters(module):
                raise self.refuse(n, "the module is in training mode; call model.eval() first")
            window = window_of_module(n.name, module)
            if window is not None:
                return self.window(n, window, first, src_shape)
            if isinstance(module, nn.BatchNorm2d) and module.running_mean is None:
                raise self.refuse(n, "no running statistics (track_running_stats=False): it would normalise each "
                                  "slice by its own batch statistics")
            if isinstance(module, ELEMENTWISE_MODULES):
                return self.rowwise(n, split, shape)
            if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                return self.adaptive(n, first, src_shape, shape, "mean" if isinstance(module, nn.AdaptiveAvgPool2d)
                                     else "max")
            if isinstance(module, nn.Flatten):
                return self.reshape(n, first, src_shape, shape)
            if isinstance(module, _RESAMPLING):
                raise self.refuse(n, "it mixes rows (resampling or attention across the height)")
            raise self.refuse(n, "a module the split does not know on a split feature map; supported are "
                              "Conv2d, MaxPool2d, AvgPool2d, element-wise layers, global pools and Flatten")

        target = n.target
        if n.op == "call_function":
            window = window_of_function(n.name, target, n.args, dict(n.kwargs))
            if window is not None:
                return self.window(n, window, first, src_shape)
            if target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d) or getattr(target, "__name__", "") in (
                    "adaptive_max_pool2d", "_adaptive_max_pool2d"):
                return self.adaptive(n, first, src_shape, shape, "mean" if target is F.adaptive_avg_pool2d else "max")
            if is_elementwise_function(target):
                if getattr(target, "__name__", "") in ("dropout", "stochastic_depth"):
                    at = 2 if target.__name__ == "dropout" else 3
                    training = n.kwargs.get("training", n.args[at] if len(n.args) > at else True)
                    if training is not False:
                        raise self.refuse(n, "dropout in training mode; call model.eval() first")
                return self.rowwise(n, split, shape)
            if target is torch.cat:
                return self.cat(n, split, shape)
            if target in (torch.chunk, torch.split):
                return self.chunk(n, first, src_shape)
            if target is getattr:  # x.shape differs by rank; dtype or device do not
                return dict(role="plain", kind="local" if n.args[1] == "shape" else "all")
            if target is operator.getitem:
                return self.getitem(n, first, src_shape)
            if target in _VIEWS_FUNCTIONS:
                return self.reshape(n, first, src_shape, shape)
            if target in (torch.transpose, torch.permute):
                return self.permute(n, first, src_shape, shape)
            if target is torch.mean or target is torch.amax or target is torch.sum:
                return self.mean(n, first, src_shape, {torch.mean: "mean", torch.amax: "max"}.get(target, "sum"))
            if target is F.batch_norm:  # functional BatchNorm (timm's norm + activation layers)
                training = n.kwargs.get("training", n.args[5] if len(n.args) > 5 else False)
                if training is not False:
                    raise self.refuse(n, "functional batch_norm in training mode; call model.eval() first")
                return self.rowwise(n, split, shape)
            if getattr(target, "__name__", "") in ("interpolate", "upsample", "scaled_dot_product_attention"):
                raise self.refuse(n, "it mixes rows (resampling or attention across the height)")
        elif n.op == "call_method":
            if target in ELEMENTWISE_METHODS:
                return self.rowwise(n, split, shape)
            if target == "size":
                dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
                same_everywhere = dim is not None and int(dim) % len(src_shape) != hdim
                return dict(role="plain", kind="all" if same_everywhere else "local")
            if target in _VIEWS_METHODS:
                return self.reshape(n, first, src_shape, shape)
            if target in ("transpose", "permute"):
                return self.permute(n, first, src_shape, shape)
            if target in ("chunk", "split"):
                return self.chunk(n, first, src_shape)
            if target in ("mean", "amax", "sum"):
                return self.mean(n, first, src_shape, {"mean": "mean", "amax": "max"}.get(target, "sum"))
        raise self.refuse(n, "an operation the split does not know on a split feature map (it may mix rows)")

    def _shape(self, name: str):
        for e in self.nodes:
            if e["name"] == name:
                return e["shape"]
        raise KeyError(name)

    def window(self, n: Node, window: WindowSpec, first: str, src_shape) -> dict:
        if len(src_shape) != 4 or self.hdim[first] != 2:
            raise self.refuse(n, "a window layer on a feature map that is not (N, C, H, W)")
        if window.in_channels is not None and window.in_channels != src_shape[1]:
            raise UsageError(f"node '{n.name}' expects {window.in_channels} input channels but receives "
                             f"{src_shape[1]}; check the net's in_channels against the input")
        if window.kind == "avgpool" and window.ceil_mode:
            from .geometry import output_height

            for axis, size in ((window.height, src_shape[2]), (window.width, src_shape[3])):
                if output_height(size, axis, True) != output_height(size, axis, False):
                    raise self.refuse(n, "ceil_mode=True average pool with a partial last window (its divisor "
                                      "depends on the image edge); use ceil_mode=False or another input size")
        return dict(role="window", kind="rows", hdim=2, window=window)

    def rowwise(self, n: Node, split: list[str], shape) -> dict:
        hdims = {self.hdim[s] for s in split}
        if len(hdims) != 1 or shape is None:
            raise self.refuse(n, "it combines feature maps split along different dimensions")
        hdim = hdims.pop()
        height = self._shape(split[0])[hdim]
        for s in split:
            if self._shape(s)[hdim] != height or len(self._shape(s)) != len(shape):
                raise self.refuse(n, "it combines feature maps of different heights")
        for a in n.all_input_nodes:
            if a.name in split:
                continue
            other = _fx_shape(a.meta.get("tensor_meta"))
            if other is None:
                continue
            offset = len(shape) - len(other)
            k = hdim - offset
            if 0 <= k < len(other) and other[k] != 1:
                raise self.refuse(n, f"'{a.name}' spans the height but is not split; only per-channel or scalar "
                                  "operands can be broadcast over a split feature map")
        if shape[hdim] != height:
            raise self.refuse(n, "its output height differs from its input's")
        return dict(role="rowwise", kind="rows", hdim=hdim)

    def cat(self, n: Node, split: list[str], shape) -> dict:
        tensors = n.args[0] if n.args else n.kwargs["tensors"]
        if any(not (isinstance(t, Node) and t.name in split) for t in tensors):
            raise self.refuse(n, "it concatenates split and unsplit tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        hdim = self.hdim[split[0]]
        if int(dim) % len(shape) == hdim:
            raise self.refuse(n, "it concatenates along the height")
        return self.rowwise(n, split, shape)

    def chunk(self, n: Node, first: str, src_shape) -> dict:
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        hdim = self.hdim[first]
        if int(dim) % len(src_shape) == hdim:
            raise self.refuse(n, "it splits along the height")
        return dict(role="rowwise", kind="rows_tuple", hdim=hdim)

    def getitem(self, n: Node, first: str, src_shape=None) -> dict:
        if self.kind[first] == "rows_tuple" and isinstance(n.args[1], int):
            return dict(role="rowwise", kind="rows", hdim=self.hdim[first])
        if self.kind[first] == "rows" and src_shape is not None and _slices_keep_height(n.args[1], len(src_shape),
                                                                                        self.hdim[first]):
            return dict(role="rowwise", kind="rows", hdim=self.hdim[first])  # x[:, a:b]: a channel slice
        raise self.refuse(n, "indexing a split feature map (supported: slices that keep every row, such as "
                          "x[:, a:b], and items of a channel chunk/split)")

    def reshape(self, n: Node, first: str, src_shape, shape) -> dict:
        hdim = self.hdim[first]
        if len(shape) <= 2:  # (batch, features): the head starts here
            return dict(role="head", kind="root")
        k = _carry_height(src_shape, hdim, shape)
        if k is not None and shape[0] == src_shape[0] and k > 0:
            return dict(role="rowwise", kind="rows", hdim=k)
        raise self.refuse(n, "it merges the height into another dimension; only a flatten to (batch, features) "
                          "at the head is supported")

    def permute(self, n: Node, first: str, src_shape, shape) -> dict:
        hdim, ndim = self.hdim[first], len(src_shape)
        rest = list(n.args[1:]) or list(n.kwargs.values())
        if n.target in ("transpose", torch.transpose):
            a, b = (int(d) % ndim for d in rest[:2])
            order = list(range(ndim))
            order[a], order[b] = order[b], order[a]
        else:
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            order = [int(d) % ndim for d in dims]
        if 0 in (order.index(hdim),):
            raise self.refuse(n, "it moves the height to the batch dimension")
        return dict(role="rowwise", kind="rows", hdim=order.index(hdim))

    def adaptive(self, n: Node, first: str, src_shape, shape, op: str) -> dict:
        if len(src_shape) != 4 or self.hdim[first] != 2:
            raise self.refuse(n, "an adaptive pool on a feature map that is not (N, C, H, W)")
        if tuple(shape[2:]) == tuple(src_shape[2:]):
            return dict(role="rowwise", kind="rows", hdim=2, identity=True)  # output size = input size
        if tuple(shape[2:]) == (1, 1):
            return dict(role="reduce", kind="all", reduce=op, keepdim=True)
        return dict(role="head", kind="root")  # a coarser grid: mixes rows, run on the root after a gather

    def mean(self, n: Node, first: str, src_shape, op: str) -> dict:
        hdim, ndim = self.hdim[first], len(src_shape)
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        dims = _dims(dim, ndim) if dim is not None else set(range(ndim))
        keepdim = bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
        if hdim not in dims:  # over channels or a channel-group dim (split attention): row-local
            return dict(role="rowwise", kind="rows", hdim=hdim if keepdim else hdim - sum(d < hdim for d in dims))
        if op == "sum":
            raise self.refuse(n, "a sum over the height")
        if ndim == 4 and hdim == 2 and dims == {2, 3}:
            return dict(role="reduce", kind="all", reduce=op, keepdim=keepdim)
        raise self.refuse(n, f"a {op} over the height together with other dims than the width")


def _slices_keep_height(index, ndim: int, hdim: int) -> bool:
    """Whether ``x[index]`` keeps every dimension and every row: slices (and one Ellipsis) only, the
    height's a literal full ``:`` (the other bounds may be computed, e.g. from ``x.shape[1]``: only the
    height differs between ranks)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (isinstance(i, slice) or i is Ellipsis) for i in items) or sum(i is Ellipsis for i in items) > 1:
        return False
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - len(items) + 1) + items[at + 1:]
    items += [slice(None)] * (ndim - len(items))
    return len(items) == ndim and items[hdim] == slice(None)


class _Unknown:
    """The value of a node that could not run during lenient shape propagation."""


@dataclass(frozen=True)
class _Shape:
    """A node's output shape, stored where torch's ShapeProp stores its ``tensor_meta`` (it has ``.shape``)."""

    shape: tuple[int, ...]


class _NeedsFake(Exception):
    """The graph mixes meta tensors with tensors it makes itself: propagate with fake tensors instead."""


def _is_device_mix(err: Exception) -> bool:
    text = str(err).lower()
    return "meta" in text and ("device" in text or "expected" in text)


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the graph on meta tensors and records every node's output shape.

    Why not ``torch.fx.passes.shape_prop.ShapeProp``: with real weights it needs
    ``FakeTensorMode``, whose first use imports dynamo and sympy -- about 150 MB
    on every rank, more than a non-head rank's whole model and buffers.  Meta
    tensors give the same shapes for everything this runtime splits; a graph
    that makes its own CPU tensors falls back to fake tensors (:class:`_NeedsFake`).
    ``lenient``: a node that cannot run (and what follows it) is left without a
    shape instead of failing the trace.
    """

    def __init__(self, gm: GraphModule, lenient: bool) -> None:
        super().__init__(gm)
        self.lenient = lenient

    def run_node(self, n):
        if self.lenient and any(isinstance(self.env.get(a), _Unknown) for a in n.all_input_nodes):
            return self._unknown(n)
        try:
            result = self._shape_by_rule(n)
            if result is None:
                result = super().run_node(n)
        except Exception as err:
            if _is_device_mix(err):
                raise _NeedsFake() from None
            if not self.lenient:
                raise
            return self._unknown(n)
        n.meta["tensor_meta"] = map_aggregate(
            result, lambda r: _Shape(tuple(int(d) for d in r.shape)) if isinstance(r, torch.Tensor) else None)
        return result

    def _shape_by_rule(self, n):
        """The output, on meta, of a node whose shape torch's formula gives without a kernel (None: run the
        node): Conv2d/pools/Linear by their formulas, shape-keeping modules as their input.  Their meta kernels
        are Python: the first ``torch._check`` imports sympy, BatchNorm's and addmm's decompositions dynamo."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            if isinstance(module, nn.Linear) and len(args) == 1:  # addmm's decomposition imports dynamo too
                if x.shape[-1:] != (module.in_features,):
                    raise RuntimeError(f"{n.target}: input features {tuple(x.shape)} do not match Linear's "
                                       f"{module.in_features}")
                return x.new_empty((*x.shape[:-1], module.out_features))
            if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and len(args) == 1 and x.dim() == 4:
                hw = _window_out(module, x.shape[-2:])  # meta kernels are Python: torch._check imports sympy
                if hw is not None:
                    channels = module.out_channels if isinstance(module, nn.Conv2d) else x.shape[1]
                    return x.new_empty((x.shape[0], channels, *hw))
            keeps = isinstance(module, ELEMENTWISE_MODULES + (nn.modules.batchnorm._BatchNorm,)) and len(args) == 1
        else:
            keeps = n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)
        return x if keeps else None

    @staticmethod
    def _unknown(n):
        n.meta.pop("tensor_meta", None)
        n.meta["type"] = _Unknown
        return _Unknown()


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _window_out(module: nn.Module, hw) -> Optional[tuple[int, int]]:
    """Output (H, W) of a Conv2d / MaxPool2d / AvgPool2d (torch's formula, ceil_mode included); None for what
    it does not cover (string paddings), which then runs the meta kernel."""
    if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
        return None
    k = _pair(module.kernel_size)
    s = _pair(module.stride if module.stride is not None else module.kernel_size)
    p = _pair(module.padding)
    d = _pair(getattr(module, "dilation", 1)) if not isinstance(module, nn.AvgPool2d) else (1, 1)
    ceil = bool(getattr(module, "ceil_mode", False))
    out = []
    for size, k_, s_, p_, d_ in zip(hw, k, s, p, d):
        span = int(size) + 2 * p_ - d_ * (k_ - 1) - 1
        if span < 0:
            return None  # too small: let the kernel raise its own error
        n = (-(-span // s_) if ceil else span // s_) + 1
        if ceil and (n - 1) * s_ >= int(size) + p_:  # the last window must start inside the input or left padding
            n -= 1
        out.append(n)
    return out[0], out[1]


def _propagate_shapes(gm: GraphModule, in_shape, lenient: bool = False) -> None:
    """Shapes on every node; torch's own traceback printing is kept quiet (errors become one line)."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            _propagate_on_meta(gm, in_shape, lenient)
        except _NeedsFake:
            _propagate_with_fake_tensors(gm, in_shape, lenient)


class _Propagate(nn.Module):
    """Runs shape propagation as a forward pass, so that ``functional_call`` can swap the weights."""

    def __init__(self, gm: GraphModule, lenient: bool) -> None:
        super().__init__()
        self.gm, self.lenient = gm, lenient

    def forward(self, x):
        return _ShapeRecorder(self.gm, self.lenient).run(x)


def _propagate_on_meta(gm: GraphModule, in_shape, lenient: bool) -> None:
    """Shapes with every weight replaced by a meta twin meanwhile (real weights stay as they are)."""
    wrapper = _Propagate(gm, lenient)
    twins = {k: torch.empty(v.shape, dtype=v.dtype, device="meta")  # empty_like on meta imports sympy
             for k, v in list(wrapper.named_parameters()) + list(wrapper.named_buffers())}
    with torch.no_grad():
        torch.func.functional_call(wrapper, twins, (torch.empty(1, *in_shape, device="meta"),))


def _propagate_with_fake_tensors(gm: GraphModule, in_shape, lenient: bool) -> None:
    """torch's ShapeProp under FakeTensorMode: for graphs that create tensors of their own (imports dynamo)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    class Lenient(ShapeProp):
        def run_node(self, n):
            if not any(isinstance(self.env.get(a), _Unknown) for a in n.all_input_nodes):
                try:
                    return super().run_node(n)
                except Exception:
                    pass
            return _ShapeRecorder._unknown(n)

    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
        n.meta.pop("type", None)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    (Lenient if lenient else ShapeProp)(gm, fake_mode=fake).propagate(fake.from_tensor(torch.empty(1, *in_shape)))


def _redirect_after_inplace(gm: GraphModule) -> None:
    """Make eager torch's aliasing explicit: after ``b = relu_(y)`` (or ``nn.ReLU(inplace=True)(y)``), eager
    readers of ``y`` see the written values, but fx records them as reading ``y``.  Each read of ``y`` after
    the in-place node is redirected to the node's output, so that a split that sent ``y``'s halo rows before
    the write (and a rank that keeps ``y``'s rows elsewhere) computes what eager torch computes.  The
    executor runs such a node on a copy when ``y`` is still read or sent (see runtime/split.py)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        module = gm.get_submodule(n.target) if n.op == "call_module" else None
        if not n.args or not isinstance(n.args[0], Node) or not mutates_first_input(n, module):
            continue
        y = n.args[0]
        for user in [u for u in y.users if order[u] > order[n]]:
            user.replace_input_with(y, n)


def _training_matters(module: nn.Module) -> bool:
    """BatchNorm and dropout change in training mode, and so may any module outside torch.nn."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd

    return isinstance(module, (_BatchNorm, _DropoutNd)) or not type(module).__module__.startswith("torch.nn")


def trace_model(model: nn.Module, in_shape: tuple[int, int, int], split_part_only: bool = False) -> ModelGraph:
    """Trace ``model`` (eval mode, real or meta weights) at input ``(C, H, W)`` and classify its nodes.

    ``split_part_only``: nodes after the split part may fail on this input
    (a head built for another size); they are kept unplanned, to run never.
    """
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise UsageError(f"input shape must be (C, H, W) with positive sizes, got {in_shape}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training and _training_matters(m)]
    if training:
        raise UsageError(f"the model is in training mode ('{training[0]}'); call model.eval() before split "
                         "inference (BatchNorm must use its running statistics, the same on every slice)")
    try:
        graph = _LeafTracer().trace(model)
    except Exception as err:  # torch.fx raises many kinds; one line names it
        raise UsageError(f"torch.fx cannot trace {type(model).__name__}: {str(err).splitlines()[0]}") from None
    gm = GraphModule(model, graph)
    _redirect_after_inplace(gm)
    try:
        _propagate_shapes(gm, in_shape, split_part_only)
    except UsageError:
        raise
    except Exception as err:
        while err.__cause__ is not None:  # ShapeProp wraps the layer's own error
            err = err.__cause__
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = re.sub(r"Proxy\([^)]*\)", "another value", first)  # a message formatted while tracing
        raise UsageError(f"{type(model).__name__} does not run on a {in_shape} input: {first}") from None
    entries = _Classifier(gm, in_shape).run()
    entries = _place(entries)
    nodes = tuple(GraphNode(**{k: v for k, v in e.items() if k != "kind"}) for e in entries)
    return ModelGraph(in_shape, nodes, graph)


def _place(entries: list[dict]) -> list[dict]:
    """Placement from roles: small values only the head needs stay on the root; split values it reads are gathered."""
    consumers: dict[str, list[dict]] = {e["name"]: [] for e in entries}
    for e in entries:
        for i in e["inputs"]:
            consumers[i].append(e)
    for e in entries:
        if e["role"] in ("input", "window", "rowwise"):
            e["placement"] = "rows"
        elif e["role"] in ("head", "output"):
            e["placement"] = "root"
    # backwards: a small value is needed everywhere if a split node (or a value needed everywhere) reads it
    for e in reversed(entries):
        if "placement" in e:
            continue
        everywhere = any(c.get("placement") in ("rows", "all") for c in consumers[e["name"]])
        e["placement"] = "all" if everywhere else "root"
    # a root-placed plain node whose inputs are plain values is fine; reading a rows value means a gather
    for e in entries:
        if e["placement"] == "rows":
            e["gather"] = any(c["placement"] == "root" and c["role"] != "reduce" for c in consumers[e["name"]])
    return entries
