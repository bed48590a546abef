"""Height-split executor: run a sequential CNN with its rows spread over MPI ranks.

Follows a :class:`~runtime.plan.SplitPlan`.  For each spatial layer a rank keeps
one preallocated channels-last buffer laid out as::

    +------------------------------+  pad_top rows (0, or -inf before max pooling)
    | halo rows from rank r-1 ...  |  received in place by Sendrecv
    | own rows                     |  written by the previous ReLU, or copied
    | halo rows from rank r+1 ...  |  received in place by Sendrecv
    +------------------------------+  pad_bottom rows

and runs the layer on it in one call with *no* height padding of its own (the
padding rows are in the buffer, and exist only at the image's true top and
bottom), so every rank computes exactly its own output rows.  Element-wise
layers run on the slice as it is.  Rank 0 gathers the last slices and runs the
head (Flatten, Linear, ...).

Why one buffer and one call per layer: CPU convolutions re-pack their weights
on every call, so computing a slice as an interior plus two thin edge calls
(to overlap the exchange with the interior) cost more than it hid -- measured
in the README ("Overlap").  The copy into the buffer is avoided where it is
large: the element-wise layers (BatchNorm, ReLU) right before a spatial layer
write their output straight into its buffer.
"""
from __future__ import annotations

from time import perf_counter
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI

from .comm import float_message, gather_rows, post_rows, rows_as_buffer, scatter_rows, sendrecv_rows, wait_rows
from .errors import UsageError
from .geometry import RowRange, input_rows_for
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
    if height is not None and shape[2] != height:
        raise UsageError(f"input height {shape[2]} does not match the plan's height {height}")
    if image.dtype != torch.float32:
        raise UsageError(f"input dtype must be float32, got {image.dtype}; use x.float()")


def _write_into(module: nn.Module):
    """``f(x, out)`` writing ``module(x)`` into ``out`` (which may be ``x`` itself): no new tensor.

    BatchNorm in eval mode is the affine map ``x * a + b`` per channel, written
    with ``addcmul``; ReLU with ``clamp_min``; anything else is computed, then copied.
    """
    if isinstance(module, nn.BatchNorm2d):
        with torch.no_grad():  # folded once: the executor snapshots the statistics it was built with
            a = torch.rsqrt(module.running_var + module.eps)
            if module.weight is not None:
                a = a * module.weight
            b = -module.running_mean * a
            if module.bias is not None:
                b = b + module.bias
            a, b = a.view(1, -1, 1, 1).clone(), b.view(1, -1, 1, 1).clone()
        return lambda x, out: torch.addcmul(b, x, a, out=out)
    if isinstance(module, nn.ReLU):
        return lambda x, out: torch.clamp_min(x, 0, out=out)
    return lambda x, out: out.copy_(module(x))


def _window_op(layer: LayerPlan, module: nn.Module):
    """The layer's functional op with height padding removed (the buffer carries it)."""
    h, w = layer.spec.height, layer.spec.width
    kernel, stride, dilation = (h.kernel, w.kernel), (h.stride, w.stride), (h.dilation, w.dilation)
    padding = (0, w.padding)
    if layer.spec.kind == "conv":
        if layer.in_shape[2] == 1:
            # torch 2.14's channels-last conv crashes (SIGSEGV) on some 1-pixel-wide maps with
            # width padding and bias (seen: 1x1 kernel, stride 2, dilation 2, batch 3): go NCHW.
            return lambda buf: F.conv2d(buf.clone(memory_format=torch.contiguous_format), module.weight,
                                        module.bias, stride, padding, dilation, module.groups)
        return lambda buf: F.conv2d(buf, module.weight, module.bias, stride, padding, dilation, module.groups)
    if layer.spec.kind == "maxpool":
        return lambda buf: F.max_pool2d(buf, kernel, stride, padding, dilation)
    return lambda buf: F.avg_pool2d(buf, kernel, stride, padding, False, module.count_include_pad, module.divisor_override)


def _merge(ranges: list[RowRange]) -> list[RowRange]:
    """Sorted, disjoint union of row ranges."""
    merged: list[RowRange] = []
    for rows in sorted(ranges, key=lambda r: r.start):
        if merged and rows.start <= merged[-1].stop:
            merged[-1] = RowRange(merged[-1].start, max(merged[-1].stop, rows.stop))
        else:
            merged.append(rows)
    return merged


def _subtract(rows: RowRange, holes: list[RowRange]) -> list[RowRange]:
    """``rows`` minus sorted disjoint ``holes``, as ranges."""
    out, cursor = [], rows.start
    for hole in holes:
        if hole.start > cursor:
            out.append(RowRange(cursor, min(hole.start, rows.stop)))
        cursor = max(cursor, hole.stop)
    if cursor < rows.stop:
        out.append(RowRange(cursor, rows.stop))
    return [o for o in out if len(o)]


class SplitExecutor:
    """Runs ``model`` (an ``nn.Sequential``) split by height over ``comm``.

    Every rank calls :meth:`__call__` (or :meth:`forward_local`); rank 0 gets the
    output, other ranks ``None``.  Buffers are built for a batch size on first
    use and reused while it stays the same.  BatchNorm statistics are folded
    into per-channel scales when the executor is built: build a new executor
    after changing the model's weights.
    """

    def __init__(
        self,
        model: nn.Sequential,
        in_shape: tuple[int, int, int],
        comm: MPI.Comm = MPI.COMM_WORLD,
        weights: Optional[Sequence[float]] = None,
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
        self.comm, self.rank = comm, comm.Get_rank()
        r = self.rank
        layers = self.plan.layers
        self._ops = [_window_op(l, m) if l.spec.spatial else m for l, m in zip(layers, self.modules)]
        # Image row at index 0 of each spatial layer's buffer (negative: starts with padding).
        self._first = [
            input_rows_for(l.owned_out[r], l.spec.height).start if l.spec.spatial and len(l.owned_out[r]) else 0
            for l in layers
        ]
        if any(m.training for m in self.modules):
            raise UsageError("the model is in training mode; call model.eval() before split inference "
                             "(BatchNorm must use its running statistics, the same on every slice)")
        self._into = [self._buffer_target(i) for i in range(len(layers))]
        self._writers = [_write_into(m) if t is not None and not l.spec.spatial else None
                         for m, t, l in zip(self.modules, self._into, layers)]
        self._batch: Optional[int] = None
        self._buffers: list[Optional[torch.Tensor]] = []

    def _buffer_target(self, i: int) -> Optional[int]:
        """The spatial layer whose buffer layer ``i`` writes into, if any.

        Element-wise layers right before a spatial layer write their output into
        that layer's buffer (the first one) and then work in place there, so the
        own rows never need a separate copy.  Only when that layer needs every
        row this rank owns (the usual case): the buffer is then also the source
        of this rank's sends.
        """
        layers, r = self.plan.layers, self.rank
        if layers[i].spec.spatial:
            # A spatial layer that exchanges nothing (a pool on an even split) can feed the
            # next spatial layer's buffer the same way, part by part.
            j = i + 1
            if layers[i].transfers or j == len(layers) or not layers[j].spec.spatial:
                return None
        else:
            j = i
            while j < len(layers) and not layers[j].spec.spatial:
                j += 1
            if j == len(layers):
                return None
        nxt = layers[j]
        own, need = nxt.owned_in[r], nxt.needed[r]
        if len(nxt.owned_out[r]) == 0 or not (need.start <= own.start and own.stop <= need.stop):
            return None
        return j

    def _allocate(self, batch: int) -> None:
        r = self.rank
        self._buffers = []
        for layer in self.plan.layers:
            if not layer.spec.spatial or len(layer.owned_out[r]) == 0:
                self._buffers.append(None)
                continue
            channels, _, width = layer.in_shape
            top, bottom = layer.pad_top[r], layer.pad_bottom[r]
            rows = top + len(layer.needed[r]) + bottom
            buf = torch.empty((batch, channels, rows, width), memory_format=CL)
            fill = float("-inf") if layer.spec.kind == "maxpool" else 0.0
            buf[:, :, :top].fill_(fill)
            buf[:, :, rows - bottom :].fill_(fill)
            self._buffers.append(buf)
        self._batch = batch
        self._halos, self._posts = [], []
        for i, layer in enumerate(self.plan.layers):
            steps = []
            buf, first = self._buffers[i], self._first[i]
            from_buffer = i > 0 and self._into[i - 1] == i  # own rows already sit in the buffer
            for dest, send_rows, src, recv_rows in (layer.halo_schedule(r) if layer.spec.spatial else ()):
                send = recv = staged = None
                if send_rows is not None and from_buffer:
                    arr, in_place = rows_as_buffer(buf[:, :, send_rows.start - first : send_rows.stop - first])
                    send = float_message(arr) if in_place else None  # a staging copy must be refreshed
                if recv_rows is not None:
                    view = buf[:, :, recv_rows.start - first : recv_rows.stop - first]
                    arr, in_place = rows_as_buffer(view)
                    recv, staged = float_message(arr), None if in_place else (view, arr)
                steps.append((dest, send_rows, send, src, recv, staged))
            self._halos.append(steps)
            self._posts.append(self._post_plan(i, steps) if from_buffer else None)

    def _post_plan(self, j: int, steps):
        """Fixed parts of :meth:`_produce_into` for layer ``j``, built once per batch size.

        Returns ``(first_parts, rest_parts, post_steps, staged, bytes)``: row parts
        as ``(x_start, x_stop, buffer view)``, sent rows first, then the rest.
        """
        own, buf, first = self.plan.layers[j].owned_in[self.rank], self._buffers[j], self._first[j]
        sent_rows = _merge([rows for _, rows, _, _, _, _ in steps if rows is not None])

        producer = self.plan.layers[j - 1]
        if producer.spec.spatial:  # rows of the producer's buffer that each part of its output reads
            pfirst = self._first[j - 1]

            def source(p):
                rows = input_rows_for(p, producer.spec.height)
                return rows.start - pfirst, rows.stop - pfirst
        else:

            def source(p):
                return p.start - own.start, p.stop - own.start

        def parts(ranges):
            return [(*source(p), buf[:, :, p.start - first : p.stop - first]) for p in ranges]

        post = [(send, dest, recv, src) for dest, _, send, src, recv, _ in steps]
        staged = [stage for *_, stage in steps if stage is not None]
        sent = sum(send[0].nbytes for send, *_ in post if send is not None)
        return parts(sent_rows), parts(_subtract(own, sent_rows)), post, staged, sent

    # ---------------------------------------------------------------- execution
    def _exchange(self, i: int, source: torch.Tensor, source_first: int) -> int:
        """Halo rows of layer ``i``: sends from ``source`` (index 0 = image row ``source_first``).

        Follows the schedule built in :meth:`_allocate`: buffers and messages made
        once, so a step costs little more than the ``Sendrecv`` itself.
        """
        sent = 0
        for dest, rows, send, src, recv, staged in self._halos[i]:
            if rows is not None and send is None:  # sending from a fresh tensor: view it now
                a = rows.start - source_first
                send = float_message(rows_as_buffer(source[:, :, a : a + len(rows)])[0])
            sendrecv_rows(self.comm, send, dest, recv, src, tag=i)
            if send is not None:
                sent += send[0].nbytes
            if staged is not None:  # batch > 1: received into a staging copy
                view, arr = staged
                view.permute(0, 2, 3, 1).copy_(torch.from_numpy(arr))
        return sent

    def _produce_into(self, i: int, j: int, x: torch.Tensor, clock: Optional[LayerClock]):
        """Run layers ``i..j-1`` into layer ``j``'s buffer, overlapping its halo exchange.

        Layers ``i..j-1`` are element-wise (``x`` is their input), or ``i`` is a
        spatial layer that exchanges nothing (``x`` is its buffer).

        The rows this rank sends go first; their transfers are then posted
        (``Irecv``/``Isend``) and fly while the rest of the rows are computed::

            own rows:  [ sent up | ........ bulk ........ | sent down ]
            order:        1          3 (transfers in flight)     1
                          2: post Irecv/Isend of layer j's halos

        so a late neighbour costs this rank nothing until the bulk is done.
        Returns the pending requests, staged receives, bytes sent and staging
        arrays to keep alive until the sends complete.
        """
        first_parts, rest_parts, steps, staged, sent = self._posts[j]
        clocked = clock is not None

        spatial, op = self.plan.layers[i].spec.spatial, self._ops[i]

        def apply(parts) -> None:
            for a, b, dst in parts:
                if spatial:  # (a, b): the producer's buffer rows these output rows read
                    dst.copy_(op(x[:, :, a:b]))
                    continue
                src = x[:, :, a:b]
                for k in range(i, j):
                    start = perf_counter() if clocked else 0.0
                    self._writers[k](src if k == i else dst, dst)
                    if clocked:
                        clock.compute[k] += perf_counter() - start

        apply(first_parts)
        posted = perf_counter()
        keep = []
        if any(send is None for send, dest, _, _ in steps if dest >= 0):  # batch > 1: stage sends now
            buf, first = self._buffers[j], self._first[j]
            fresh = []
            for (send, dest, recv, src), (_, rows, _, _, _, _) in zip(steps, self._halos[j]):
                if rows is not None and send is None:
                    arr = rows_as_buffer(buf[:, :, rows.start - first : rows.stop - first])[0]
                    send = float_message(arr)
                    keep.append(arr)
                    sent += arr.nbytes
                fresh.append((send, dest, recv, src))
            steps = fresh
        requests = post_rows(self.comm, steps, tag=j)
        posting = perf_counter() - posted
        if clocked:
            clock.halo[j] += posting
        apply(rest_parts)
        return (requests, staged, sent, keep), posting

    def forward_local(self, x: torch.Tensor, clock: Optional[LayerClock] = None) -> torch.Tensor:
        """This rank's input rows -> this rank's rows of the last spatial layer.

        ``x`` holds rows ``plan.input_rows[rank]`` of every image in the batch;
        it may be modified in place (in-place ReLUs).
        """
        batch = x.shape[0]
        if batch != self._batch:
            self._allocate(batch)
        r = self.rank
        pending = None  # (requests, staged, bytes, keep-alive) of a halo exchange already posted
        layers = self.plan.layers
        i = 0
        while i < len(layers):
            layer, op = layers[i], self._ops[i]
            start = perf_counter()
            if not layer.spec.spatial:
                j = self._into[i]
                if j is None:
                    x = op(x)
                    if clock is not None:
                        clock.compute[i] += perf_counter() - start
                    i += 1
                else:
                    pending, _ = self._produce_into(i, j, x, clock)
                    i = j
                continue
            buf, first = self._buffers[i], self._first[i]
            own, need = layer.owned_in[r], layer.needed[r]
            if pending is not None:  # own rows are in the buffer, halos in flight
                requests, staged, sent, _ = pending
                pending = None
                wait_rows(requests)
                for view, arr in staged:
                    view.permute(0, 2, 3, 1).copy_(torch.from_numpy(arr))
                copied = start
            else:
                keep = need.intersect(own)
                if buf is not None and len(keep):
                    buf[:, :, keep.start - first : keep.stop - first].copy_(
                        x[:, :, keep.start - own.start : keep.stop - own.start]
                    )
                copied = perf_counter()
                sent = self._exchange(i, x, own.start) if layer.transfers else 0
            exchanged = perf_counter()
            posting = 0.0
            if buf is None:  # this rank owns no output row of this layer
                _, _, w = layer.out_shape
                x = torch.empty((batch, layer.out_shape[0], 0, w), memory_format=CL)
            elif self._into[i] is not None:  # output straight into the next layer's buffer
                pending, posting = self._produce_into(i, i + 1, buf, clock)
                x = None
            else:
                x = op(buf)
            if clock is not None:
                clock.compute[i] += (copied - start) + (perf_counter() - exchanged) - posting
                clock.halo[i] += exchanged - copied
                clock.bytes[i] += sent
            i += 1
        return x

    def __call__(self, image: Optional[torch.Tensor], batch: int = 1, clock: Optional[LayerClock] = None):
        """Scatter rank 0's image batch, run split, gather, run the head on rank 0.

        Only rank 0 needs ``image`` (others pass None).  Returns the head's output
        on rank 0 and ``None`` on the other ranks.  A bad image raises
        :class:`UsageError` on every rank, so none is left waiting.
        """
        problem = None
        if self.rank == 0:
            try:
                check_image(image, self.plan.in_shape[0], self.plan.in_shape[1])
                batch = image.shape[0]
            except UsageError as err:
                problem = str(err)
        batch, problem = self.comm.bcast((batch, problem), root=0)
        if problem is not None:
            raise UsageError(problem)
        x = scatter_rows(self.comm, self.plan, image, batch)
        y = gather_rows(self.comm, self.plan, self.forward_local(x, clock), batch)
        if self.rank != 0:
            return None
        return self.head(y) if len(self.head) else y
