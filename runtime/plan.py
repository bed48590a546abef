"""Split plan: who owns which rows of every feature map, what each window reads, which rows move.

Built once per (graph, rank weights) from pure geometry, outside any executor,
and identical on every rank, so both ends of every message agree without
negotiating.  Executors only follow it.

Ownership depends on a feature map's height alone: every map of height ``H``
is split by :func:`~runtime.geometry.split_rows` with the same weights, so
row-wise nodes (element-wise ops, residual adds, channel concatenations) move
nothing.  A window node (conv, pool) computes the output rows its rank owns and
reads the input rows they need; the rows a rank needs but does not own, taken
over *all* window consumers of a value (a fan-out to several branches is
exchanged once, for the union), are the value's halo -- the minimum that must
move.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

from .errors import UsageError
from .geometry import (RowRange, hull, input_rows_for, merge_ranges, output_height, padding_rows, rows_read,
                       split_rows, subtract_ranges)
from .graph import GraphNode, ModelGraph

__all__ = ["Transfer", "Buffer", "Read", "Exchange", "ValuePlan", "WindowPlan", "HeadSplit", "GraphPlan",
           "plan_split", "check_weights", "find_head_split", "HEAD_PLACEMENTS"]

#: Where the first Linear of a flatten head runs: on the root after a gather, or split by columns.
HEAD_PLACEMENTS = ("gather", "split")


@dataclass(frozen=True)
class Transfer:
    """Rows ``rows`` of a value go from rank ``src`` to rank ``dst``."""

    src: int
    dst: int
    rows: RowRange


@dataclass(frozen=True)
class Buffer:
    """One rank's buffer of a value: image rows ``rows`` between padding rows of value ``fill``.

    Padding rows exist only at the image's true top and bottom, never between ranks.
    """

    rows: RowRange
    pad_top: int
    pad_bottom: int
    fill: float

    @property
    def first(self) -> int:
        """Image row at index 0 of the buffer (negative: it starts with padding)."""
        return self.rows.start - self.pad_top

    @property
    def length(self) -> int:
        return self.pad_top + len(self.rows) + self.pad_bottom


@dataclass(frozen=True)
class Read:
    """What one window node reads on one rank.

    ``rows`` are input rows in image coordinates, padding included (they may
    start below 0 or end past the height); ``from_buffer``: they are taken
    from the value's buffer, else from the rank's own slice; ``repad``: the
    padding they need is not in the buffer (another consumer's fill), so a
    padded copy is made.
    """

    rows: RowRange
    pad_top: int
    pad_bottom: int
    from_buffer: bool
    repad: bool


@dataclass(frozen=True)
class Exchange:
    """The halo exchange of one value; its time and bytes are booked on node ``node``."""

    value: str
    node: str
    transfers: tuple[Transfer, ...]

    def sends(self, rank: int) -> list[Transfer]:
        return sorted((t for t in self.transfers if t.src == rank), key=lambda t: (t.dst, t.rows.start))

    def recvs(self, rank: int) -> list[Transfer]:
        return sorted((t for t in self.transfers if t.dst == rank), key=lambda t: (t.src, t.rows.start))

    def needs(self, rank: int) -> bool:
        return any(t.dst == rank for t in self.transfers)


@dataclass(frozen=True)
class ValuePlan:
    """A split value: rows owned per rank, each rank's buffer (None: read in place) and its halo exchange."""

    name: str
    height: int
    owned: tuple[RowRange, ...]
    buffers: tuple[Optional[Buffer], ...]
    exchange: Optional[Exchange]


@dataclass(frozen=True)
class WindowPlan:
    """A window node: the output rows each rank computes and what it reads for them (None: no rows)."""

    name: str
    source: str
    out_rows: tuple[RowRange, ...]
    reads: tuple[Optional[Read], ...]


@dataclass(frozen=True)
class HeadSplit:
    """The first Linear of a flatten head, split by the rows each rank owns of the map it reads.

    Flatten of an ``(N, C, H, W)`` map puts element ``(c, h, w)`` at column
    ``c*H*W + h*W + w``, so the rows ``[start, stop)`` a rank owns are, for
    every channel, one contiguous block of columns.  Each rank multiplies its
    own rows by its columns of the weight; one Reduce (sum) gives the root the
    product, and the root adds the bias.  ``skip``: the flatten and the eval
    dropouts between it and the Linear, which the root no longer runs.
    """

    value: str
    linear: str
    target: str
    skip: tuple[str, ...]
    channels: int
    height: int
    width: int
    out_features: int
    owned: tuple[RowRange, ...]

    @property
    def in_features(self) -> int:
        return self.channels * self.height * self.width

    def column_blocks(self, rank: int) -> list[tuple[int, int]]:
        """Rank ``rank``'s columns of the Linear's weight: one ``[start, stop)`` block per channel."""
        rows, plane = self.owned[rank], self.height * self.width
        if not len(rows):
            return []
        return [(c * plane + rows.start * self.width, c * plane + rows.stop * self.width)
                for c in range(self.channels)]

    def columns(self, rank: int) -> int:
        return self.channels * len(self.owned[rank]) * self.width

    def weight_bytes(self, rank: int, itemsize: int = 4) -> int:
        return self.out_features * self.columns(rank) * itemsize


@dataclass(frozen=True)
class GraphPlan:
    """A traced graph split by height over ``len(weights)`` ranks.

    ``head``: ``"gather"`` (the root gathers the map the head reads and runs the
    head) or ``"split"`` (``head_split`` says how); ``head_note`` says which
    case applies and why (e.g. a global pool reduces before the Linear, or
    why a requested split fell back to a gather).
    """

    graph: ModelGraph
    weights: tuple[float, ...]
    values: Mapping[str, ValuePlan]
    windows: Mapping[str, WindowPlan]
    head: str = "gather"
    head_split: Optional[HeadSplit] = None
    head_note: str = ""

    @property
    def ranks(self) -> int:
        return len(self.weights)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return self.graph.in_shape

    @property
    def input_rows(self) -> tuple[RowRange, ...]:
        return self.values[self.graph.input.name].owned

    @property
    def exchanges(self) -> list[Exchange]:
        return [v.exchange for v in self.values.values() if v.exchange is not None]

    def row_bytes(self, value: str, batch: int, itemsize: int = 4) -> int:
        """Bytes of one row of ``value`` across the batch."""
        node = self.graph[value]
        return batch * itemsize * math.prod(s for d, s in enumerate(node.shape) if d not in (0, node.hdim))

    def bytes_sent(self, batch: int, itemsize: int = 4) -> dict[str, int]:
        """Bytes each exchange moves in one pass, by the node it is booked on."""
        out: dict[str, int] = {}
        for ex in self.exchanges:
            rows = sum(len(t.rows) for t in ex.transfers)
            out[ex.node] = out.get(ex.node, 0) + rows * self.row_bytes(ex.value, batch, itemsize)
        return out


def check_weights(weights: Optional[Sequence[float]], ranks: int) -> tuple[float, ...]:
    """Rank weights as floats: one per rank, each finite and > 0 (None: even)."""
    if weights is None:
        return (1.0,) * ranks
    weights = tuple(float(w) for w in weights)
    if len(weights) != ranks:
        raise UsageError(f"got {len(weights)} rank weights for {ranks} ranks; give one weight per rank")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise UsageError(f"rank weights must be finite and > 0, got {list(weights)}")
    return weights


def _window_plan(node: GraphNode, source: GraphNode, weights) -> WindowPlan:
    window = node.window
    height = source.height
    try:
        out_h = output_height(height, window.height, window.ceil_mode)
    except ValueError as err:
        raise UsageError(f"node '{node.name}' with input height {height}: {err}") from None
    if out_h != node.shape[2]:  # the traced shape is torch's own answer: a mismatch is our bug
        raise AssertionError(f"node '{node.name}': geometry gives {out_h} rows, torch {node.shape[2]}")
    out_rows = split_rows(out_h, weights)
    reads = []
    for rows in out_rows:
        if not len(rows):
            reads.append(None)
            continue
        wanted = input_rows_for(rows, window.height)
        top, bottom = padding_rows(wanted, height)
        reads.append(Read(wanted, top, bottom, False, False))
    return WindowPlan(node.name, source.name, out_rows, tuple(reads))


def _value_plan(value: GraphNode, consumers: list[WindowPlan], specs: dict, weights,
                windows: dict) -> ValuePlan:
    height = value.height
    owned = split_rows(height, weights)
    buffers: list[Optional[Buffer]] = []
    transfers: list[Transfer] = []
    for r, own in enumerate(owned):
        reads = [(w, w.reads[r]) for w in consumers if w.reads[r] is not None]
        need = merge_ranges([rows.clip(height) for w, rd in reads
                             for rows in rows_read(w.out_rows[r], specs[w.name].height)])
        missing = subtract_ranges(need, [own])
        # a read wholly in the padding holds no image row: it is made from padding alone (repad)
        padded = [(w, rd) for w, rd in reads if (rd.pad_top or rd.pad_bottom) and len(rd.rows.clip(height))]
        if not reads:
            buffers.append(None)
        else:
            fill = specs[padded[0][0].name].fill if padded else 0.0
            same = [rd for w, rd in padded if specs[w.name].fill == fill]
            # the hull of every window's extent: rows a stride or dilation skips are never read
            extents = [rd.rows.clip(height) for _, rd in reads]
            buffers.append(Buffer(hull(need + extents + [own]), max((rd.pad_top for rd in same), default=0),
                                  max((rd.pad_bottom for rd in same), default=0), fill))
        buffer = buffers[-1]
        for w, rd in reads:
            pads = rd.pad_top or rd.pad_bottom
            repad = bool(pads) and (buffer is None or specs[w.name].fill != buffer.fill
                                    or not len(rd.rows.clip(height)))
            windows[w.name][r] = Read(rd.rows, rd.pad_top, rd.pad_bottom, buffer is not None, repad)
        for rows in missing:
            for src, theirs in enumerate(owned):
                part = rows.intersect(theirs)
                if src != r and len(part):
                    transfers.append(Transfer(src, r, part))
    exchange = None
    if transfers:
        exchange = Exchange(value.name, consumers[0].name, tuple(transfers))
    return ValuePlan(value.name, height, owned, tuple(buffers), exchange)


def _flatten_ok(graph: ModelGraph, fx_node, node: GraphNode, value: GraphNode) -> bool:
    """``node`` flattens ``value`` (N, C, H, W) to (N, C*H*W) in NCHW order, at any batch size."""
    _, c, h, w = value.shape
    if node.shape is None or tuple(node.shape) != (1, c * h * w):
        return False
    if node.label == "Flatten":  # nn.Flatten: a 2-D (1, C*H*W) result means start_dim 1 (or equivalent)
        return True
    target, args = fx_node.target, list(fx_node.args[1:])
    if target in ("flatten",) or getattr(target, "__name__", "") == "flatten":
        start = args[0] if args else fx_node.kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else fx_node.kwargs.get("end_dim", -1)
        return int(start) % 4 == 1 and int(end) % 4 == 3
    if target in ("view", "reshape") or getattr(target, "__name__", "") == "reshape":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if len(dims) != 2 or dims[1] not in (-1, c * h * w):
            return False
        first = dims[0]
        if not hasattr(first, "op"):
            return False  # a literal batch size: not the same model at another batch
        size = graph[first.name]
        return (first.op == "call_method" and first.target == "size" and size.inputs == (value.name,)
                and len(first.args) > 1 and first.args[1] == 0)
    return False


def _identity_in_eval(fx_node, node: GraphNode) -> bool:
    """Dropout in eval mode (trace_model refuses training mode) or Identity: the product is unchanged."""
    if fx_node.op == "call_module":
        return node.label in ("Dropout", "Identity", "AlphaDropout")
    if fx_node.op == "call_function" and getattr(fx_node.target, "__name__", "") == "dropout":
        training = fx_node.kwargs.get("training", fx_node.args[2] if len(fx_node.args) > 2 else True)
        return training is False
    return False


def find_head_split(graph: ModelGraph, owned_of) -> tuple[Optional[HeadSplit], str]:
    """The head's first Linear split by columns, or None and why it cannot be (then the head gathers).

    Looks for: exactly one gathered (N, C, H, W) map, read only by a flatten
    (``nn.Flatten``, ``torch.flatten(x, 1)``, ``x.flatten(1)``,
    ``x.view(x.size(0), -1)``), then eval dropouts, then an ``nn.Linear``.
    ``owned_of(name)``: the rows each rank owns of a split value.
    """
    fx = {f.name: f for f in graph.fx.nodes}
    gathered = [n for n in graph.nodes if n.placement == "rows" and n.gather]
    if not gathered:
        pools = [n.name for n in graph.nodes if n.role == "reduce" and n.placement == "root"]
        if pools:
            return None, (f"global pool '{pools[0]}' reduces partial sums before the Linear: no feature map is "
                          "gathered, nothing to split")
        return None, "no feature map is gathered for the head"
    if len(gathered) > 1:
        return None, f"the head reads {len(gathered)} split maps ({', '.join(n.name for n in gathered[:3])})"
    value = gathered[0]
    if value.shape is None or len(value.shape) != 4 or value.hdim != 2:
        return None, f"the gathered map '{value.name}' is not (N, C, H, W)"
    readers = [c for c in graph.consumers(value.name) if not (fx[c.name].op == "call_method"
                                                               and fx[c.name].target == "size")]
    if len(readers) != 1 or not _flatten_ok(graph, fx[readers[0].name], readers[0], value):
        return None, (f"the head does not start with a flatten of '{value.name}' to (batch, features) "
                      "(flatten then Linear is what splits)")
    chain = [readers[0]]
    while True:
        nxt = graph.consumers(chain[-1].name)
        if len(nxt) != 1:
            return None, f"'{chain[-1].name}' feeds {len(nxt)} nodes, not one Linear"
        node = nxt[0]
        f = fx[node.name]
        if node.label == "Linear" and f.op == "call_module":
            break
        if not _identity_in_eval(f, node):
            return None, f"'{node.name}' ({node.label}) comes between the flatten and the first Linear"
        chain.append(node)
    if node.shape is None or len(node.shape) != 2:
        return None, f"Linear '{node.name}' has no traced output shape"
    _, c, h, w = value.shape
    split = HeadSplit(value=value.name, linear=node.name, target=str(fx[node.name].target),
                      skip=tuple(n.name for n in chain), channels=c, height=h, width=w,
                      out_features=int(node.shape[1]), owned=tuple(owned_of(value.name)))
    return split, ""


def plan_split(graph: ModelGraph, weights: Sequence[float], head: str = "gather") -> GraphPlan:
    """Plan ``graph`` over ``len(weights)`` ranks with rows shared in proportion to ``weights``.

    ``head``: ``"gather"`` (the root gathers the last map and runs the whole
    head) or ``"split"`` (each rank multiplies its own rows by its columns of
    the first Linear, one Reduce; see :class:`HeadSplit`).  A split that the
    head's pattern does not allow falls back to ``"gather"``, with the reason
    in ``plan.head_note``.

    Raises :class:`UsageError` when a rank would own no row of the input (more
    ranks than input rows); deeper maps may leave a rank with no rows, which
    the executor handles.
    """
    if head not in HEAD_PLACEMENTS:
        raise UsageError(f"head placement must be one of {', '.join(HEAD_PLACEMENTS)}, got '{head}'"
                         " ('auto' is chosen by runtime.headcost.choose_head, which measures)")
    weights = check_weights(weights, len(weights))
    height = graph.in_shape[1]
    empty = [r for r, rows in enumerate(split_rows(height, weights)) if len(rows) == 0]
    if empty:
        raise UsageError(
            f"{len(weights)} ranks with weights {list(weights)} leave rank(s) {empty} without "
            f"rows of the {height}-row input; use at most {height} ranks, a larger input, "
            "or more even --weights"
        )
    window_plans = {n.name: _window_plan(n, graph[n.inputs[0]], weights)
                    for n in graph.nodes if n.role == "window"}
    specs = {n.name: n.window for n in graph.nodes if n.role == "window"}
    reads = {name: list(w.reads) for name, w in window_plans.items()}
    values = {}
    for node in graph.nodes:
        if node.placement != "rows" or node.hdim is None or node.shape is None:
            continue  # chunk tuples carry no rows of their own
        consumers = [window_plans[c.name] for c in graph.consumers(node.name) if c.role == "window"]
        values[node.name] = _value_plan(node, consumers, specs, weights, reads)
    windows = {name: WindowPlan(w.name, w.source, w.out_rows, tuple(reads[name]))
               for name, w in window_plans.items()}
    split, why = find_head_split(graph, lambda name: values[name].owned)
    if split is None:
        note = f"gather ({why})" if head == "gather" else f"gather: the head cannot split ({why})"
        split_head = None
    elif head == "split":
        note = (f"split: flatten of '{split.value}' -> Linear '{split.linear}' ({split.in_features} -> "
                f"{split.out_features}) by columns, one Reduce of {split.out_features} floats per image")
        split_head = split
    else:
        note = (f"gather: the root gathers '{split.value}' and runs the whole head (head='split' would split "
                f"Linear '{split.linear}' by columns)")
        split_head = None
    return GraphPlan(graph, weights, MappingProxyType(values), MappingProxyType(windows),
                     head="split" if split_head is not None else "gather", head_split=split_head, head_note=note)
