"""Height-split executor: run a sequential CNN with its rows spread over MPI ranks.

Follows a :class:`~runtime.plan.SplitPlan`.  A rank holds its rows of a feature
map as a few *pieces* (contiguous row bands, channels-last).  For a spatial
layer it splits its output rows into an **interior**, whose input windows lie
inside one piece it already has, and at most two thin **edges**, which need halo
rows from neighbours or the image's padding::

    input rows of rank r           output rows of rank r
    . . . . . . . . . . . .
    [ pad / halo from r-1 ]  --->  top edge      (small buffer: copy + received rows)
    [ own piece, top rows ]
    [ own piece           ]  --->  interior      (computed in place on the piece)
    [ own piece, end rows ]
    [ halo from r+1 / pad ]  --->  bottom edge   (small buffer)

With ``overlap=True`` (the default) the halo transfers are posted with
``Irecv``/``Isend``, the interior is computed while they fly, and the edges
after ``Waitall``; with ``overlap=False`` a blocking ``Sendrecv`` exchange runs
first.  Either way the interior never copies the big slice: only edge rows are
copied.  Padding rows (zero, or -inf before max pooling) sit only at the
image's true top and bottom; ops run with no height padding of their own.
Element-wise layers run on each piece.  Rank 0 gathers and runs the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI

from .comm import gather_rows, rows_as_buffer, scatter_rows, sendrecv_halos, start_halos, wait_halos
from .errors import UsageError
from .geometry import RowRange, input_rows_for, padding_rows
from .layers import describe_layer, split_features
from .plan import LayerPlan, SplitPlan, build_plan
from .timing import LayerClock

__all__ = ["SplitExecutor", "check_image"]

CL = torch.channels_last


def check_image(image: torch.Tensor, channels: int, height: Optional[int] = None) -> None:
    """Raise :class:`UsageError` unless ``image`` is a float32 ``(N, C, H, W)`` batch."""
    shape = tuple(image.shape)
    if image.dim() != 4:
        raise UsageError(
            f"input must be an image batch of shape (N, C, H, W), got shape {shape}; "
            "add a batch dimension with x.unsqueeze(0)"
        )
    if shape[1] != channels:
        raise UsageError(f"input has {shape[1]} channels but the net expects {channels}")
    if height is not None and (shape[2] != height or shape[3] <= 0):
        raise UsageError(f"input height {shape[2]} does not match the plan's height {height}")
    if image.dtype != torch.float32:
        raise UsageError(f"input dtype must be float32, got {image.dtype}; use x.float()")


def _window_op(layer: LayerPlan, module: nn.Module):
    """The layer's functional op with height padding removed (edge buffers carry it)."""
    h, w = layer.spec.height, layer.spec.width
    kernel, stride, dilation = (h.kernel, w.kernel), (h.stride, w.stride), (h.dilation, w.dilation)
    padding = (0, w.padding)
    if layer.spec.kind == "conv":
        if layer.in_shape[2] == 1:
            # torch 2.14's channels-last conv can crash on 1-pixel-wide maps with width
            # padding (seen with a 1x1 kernel, stride 2, dilation 2, batch 3): go NCHW there.
            return lambda buf: F.conv2d(buf.clone(memory_format=torch.contiguous_format), module.weight, module.bias, stride, padding, dilation,
                                        module.groups)
        return lambda buf: F.conv2d(buf, module.weight, module.bias, stride, padding, dilation, module.groups)
    if layer.spec.kind == "maxpool":
        return lambda buf: F.max_pool2d(buf, kernel, stride, padding, dilation)
    return lambda buf: F.avg_pool2d(buf, kernel, stride, padding, False, module.count_include_pad, module.divisor_override)


@dataclass(frozen=True)
class Edge:
    """Output rows ``out`` computed from an assembled buffer.

    The buffer holds image rows ``first .. first + height``: ``pad_top`` padding
    rows, the real rows ``rows``, then ``pad_bottom`` padding rows.
    """

    out: RowRange
    rows: RowRange
    pad_top: int
    pad_bottom: int
    first: int

    @property
    def height(self) -> int:
        return self.pad_top + len(self.rows) + self.pad_bottom


@dataclass(frozen=True)
class LocalStep:
    """What this rank does for one spatial layer: derived once from the plan, integers only."""

    pieces_in: tuple[RowRange, ...]
    interior_out: RowRange  # empty when no output row fits inside one piece
    interior_piece: int  # index into pieces_in
    edges: tuple[Edge, ...]
    pieces_out: tuple[RowRange, ...]


def _local_step(layer: LayerPlan, rank: int, pieces: tuple[RowRange, ...]) -> LocalStep:
    out = layer.owned_out[rank]
    window, height = layer.spec.height, layer.in_shape[1]
    if len(out) == 0:
        return LocalStep(pieces, RowRange(0, 0), -1, (), ())
    big = max(range(len(pieces)), key=lambda i: len(pieces[i])) if pieces else -1
    interior = RowRange(0, 0)
    if big >= 0:
        piece = pieces[big]
        first = -((-(piece.start + window.padding)) // window.stride)  # ceil division
        last = (piece.stop + window.padding - window.span) // window.stride  # floor division
        interior = RowRange(first, last + 1).intersect(out)
    if len(interior) == 0:
        spans = (out,)
    else:
        spans = tuple(r for r in (RowRange(out.start, interior.start), RowRange(interior.stop, out.stop)) if len(r))
    edges = []
    for span in spans:
        wanted = input_rows_for(span, window)
        top, bottom = padding_rows(wanted, height)
        edges.append(Edge(span, wanted.clip(height), top, bottom, wanted.start))
    pieces_out = sorted([e.out for e in edges] + ([interior] if len(interior) else []), key=lambda r: r.start)
    return LocalStep(pieces, interior, big, tuple(edges), tuple(pieces_out))


class SplitExecutor:
    """Runs ``model`` (an ``nn.Sequential``) split by height over ``comm``.

    Every rank calls :meth:`__call__` (or :meth:`forward_local`); rank 0 gets the
    output, other ranks ``None``.  Edge buffers are built for a batch size on
    first use and reused while it stays the same.
    """

    def __init__(
        self,
        model: nn.Sequential,
        in_shape: tuple[int, int, int],
        comm: MPI.Comm = MPI.COMM_WORLD,
        weights: Optional[Sequence[float]] = None,
        overlap: bool = True,
    ) -> None:
        features, self.head = split_features(model)
        self.names = [name for name, _ in features]
        self.modules = [module for _, module in features]
        specs = [describe_layer(name, module) for name, module in features]
        size = comm.Get_size()
        weights = [1.0] * size if weights is None else list(weights)
        if len(weights) != size:
            raise UsageError(f"got {len(weights)} rank weights for {size} ranks; give one weight per rank")
        self.plan: SplitPlan = build_plan(specs, in_shape, weights)
        self.comm, self.rank, self.overlap = comm, comm.Get_rank(), overlap
        self._ops = [_window_op(l, m) if l.spec.spatial else m for l, m in zip(self.plan.layers, self.modules)]
        self._steps: list[Optional[LocalStep]] = []
        pieces: tuple[RowRange, ...] = (self.plan.input_rows[self.rank],)
        for layer in self.plan.layers:
            step = _local_step(layer, self.rank, pieces) if layer.spec.spatial else None
            self._steps.append(step)
            pieces = step.pieces_out if step else pieces
        self._batch: Optional[int] = None
        self._buffers: list[list[torch.Tensor]] = []

    def _allocate(self, batch: int) -> None:
        self._buffers = []
        for layer, step in zip(self.plan.layers, self._steps):
            bufs = []
            for edge in step.edges if step else ():
                channels, _, width = layer.in_shape
                buf = torch.empty((batch, channels, edge.height, width), memory_format=CL)
                fill = float("-inf") if layer.spec.kind == "maxpool" else 0.0
                buf[:, :, : edge.pad_top].fill_(fill)
                buf[:, :, edge.height - edge.pad_bottom :].fill_(fill)
                bufs.append(buf)
            self._buffers.append(bufs)
        self._batch = batch

    # ---------------------------------------------------------------- execution
    @staticmethod
    def _rows(pieces, tensors, rows: RowRange) -> torch.Tensor:
        """Rows ``rows`` of the local map: a view when one piece holds them, else a small copy."""
        parts = []
        for piece, t in zip(pieces, tensors):
            part = piece.intersect(rows)
            if len(part):
                parts.append(t[:, :, part.start - piece.start : part.stop - piece.start])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _spatial(self, i: int, tensors: list[torch.Tensor], clock: Optional[LayerClock]) -> list[torch.Tensor]:
        layer, step, op, bufs = self.plan.layers[i], self._steps[i], self._ops[i], self._buffers[i]
        r = self.rank
        start = perf_counter()
        # Halo transfers: what my neighbours need from my pieces, what I need into my edge buffers.
        sends, recvs, copy_back = {}, {}, []
        for t in layer.transfers:
            if t.src == r:
                sends[t.dst] = rows_as_buffer(self._rows(step.pieces_in, tensors, t.rows))[0]
            elif t.dst == r:
                # Normally one edge buffer holds the whole transfer and receives it in place.
                # When the stride exceeds the window span the halo range can straddle
                # two edges or gap rows no window reads: receive into staging, copy the parts.
                home = [j for j, e in enumerate(step.edges) if len(e.rows.intersect(t.rows)) == len(t.rows)]
                if home:
                    e = step.edges[home[0]]
                    view = bufs[home[0]][:, :, t.rows.start - e.first : t.rows.stop - e.first]
                else:
                    channels, _, width = layer.in_shape
                    view = torch.empty((self._batch, channels, len(t.rows), width),
                                       memory_format=CL)
                arr, in_place = rows_as_buffer(view)
                recvs[t.src] = arr
                if not in_place or not home:
                    copy_back.append((t.rows, view, arr, None if home else step.edges))
        requests = []
        posted = perf_counter()
        if sends or recvs:
            if self.overlap:
                requests = start_halos(self.comm, sends, recvs, tag=i)
            else:
                sendrecv_halos(self.comm, sends, recvs, tag=i)
        halo = perf_counter() - posted
        # Own rows into the edge buffers (a few rows each).
        for e, buf in zip(step.edges, bufs):
            for piece, t in zip(step.pieces_in, tensors):
                part = piece.intersect(e.rows)
                if len(part):
                    buf[:, :, part.start - e.first : part.stop - e.first].copy_(
                        t[:, :, part.start - piece.start : part.stop - piece.start]
                    )
        outputs: dict[int, torch.Tensor] = {}
        if len(step.interior_out):
            w = layer.spec.height
            piece, t = step.pieces_in[step.interior_piece], tensors[step.interior_piece]
            rows = input_rows_for(step.interior_out, w)
            outputs[step.interior_out.start] = op(t[:, :, rows.start - piece.start : rows.stop - piece.start])
        waited = perf_counter()
        wait_halos(requests)
        for rows, view, arr, spread in copy_back:
            view.permute(0, 2, 3, 1).copy_(torch.from_numpy(arr))
            for e, buf in zip(spread or (), bufs):
                part = e.rows.intersect(rows)
                if len(part):
                    buf[:, :, part.start - e.first : part.stop - e.first].copy_(
                        view[:, :, part.start - rows.start : part.stop - rows.start]
                    )
        halo += perf_counter() - waited
        for e, buf in zip(step.edges, bufs):
            outputs[e.out.start] = op(buf)
        if clock is not None:
            clock.compute[i] += perf_counter() - start - halo
            clock.halo[i] += halo
            clock.bytes[i] += sum(a.nbytes for a in sends.values())
        return [outputs[p.start] for p in step.pieces_out]

    def forward_local(self, x: torch.Tensor, clock: Optional[LayerClock] = None) -> torch.Tensor:
        """This rank's input rows -> this rank's rows of the last spatial layer (one tensor).

        ``x`` holds rows ``plan.input_rows[rank]`` of every image in the batch;
        it may be modified in place (in-place ReLUs).
        """
        batch = x.shape[0]
        if batch != self._batch:
            self._allocate(batch)
        tensors = [x]
        for i, layer in enumerate(self.plan.layers):
            if layer.spec.spatial:
                tensors = self._spatial(i, tensors, clock)
            else:
                start = perf_counter()
                op = self._ops[i]
                tensors = [op(t) for t in tensors]
                if clock is not None:
                    clock.compute[i] += perf_counter() - start
        if len(tensors) == 1:
            return tensors[0]
        if not tensors:
            c, _, w = self.plan.out_shape
            return torch.empty((batch, c, 0, w), memory_format=CL)
        return torch.cat(tensors, dim=2)

    def __call__(self, image: Optional[torch.Tensor], batch: int = 1, clock: Optional[LayerClock] = None):
        """Scatter rank 0's image batch, run split, gather, run the head on rank 0.

        Every rank passes ``batch``; only rank 0 needs ``image`` (others pass None).
        Returns the head's output on rank 0 and ``None`` on the other ranks.
        """
        problem = None
        if self.rank == 0:
            try:
                check_image(image, self.plan.in_shape[0], self.plan.in_shape[1])
                batch = image.shape[0]
            except UsageError as err:
                problem = str(err)
        batch, problem = self.comm.bcast((batch, problem), root=0)
        if problem is not None:  # raised on every rank, so none is left waiting
            raise UsageError(problem)
        x = scatter_rows(self.comm, self.plan, image, batch)
        y = gather_rows(self.comm, self.plan, self.forward_local(x, clock), batch)
        if self.rank != 0:
            return None
        return self.head(y) if len(self.head) else y
