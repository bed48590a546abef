"""Height-split executor: run a sequential CNN with its rows spread over MPI ranks.

Follows a :class:`~runtime.plan.SplitPlan`.  For each spatial layer a rank keeps
one preallocated channels-last buffer laid out as::

    +------------------------------+  pad_top rows (0, or -inf for max pooling)
    | halo rows from rank r-1 ...  |  received in place by Sendrecv
    | own rows                     |  written by the previous ReLU, or copied
    | halo rows from rank r+1 ...  |  received in place by Sendrecv
    +------------------------------+  pad_bottom rows

and runs the layer on it with *no* height padding (the padding rows are in the
buffer, and exist only at the image's true top and bottom), so every rank
computes exactly its own output rows.  Element-wise layers run on the slice as
is.  Rank 0 gathers the last slices and runs the head (Flatten, Linear, ...).
"""
from __future__ import annotations

from time import perf_counter
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI

from .comm import exchange_halos, gather_rows, scatter_rows
from .errors import UsageError
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


def _window_op(layer: LayerPlan, module: nn.Module):
    """The layer's functional op with height padding removed (the buffer carries it)."""
    h, w = layer.spec.height, layer.spec.width
    kernel, stride, dilation = (h.kernel, w.kernel), (h.stride, w.stride), (h.dilation, w.dilation)
    padding = (0, w.padding)
    if layer.spec.kind == "conv":
        return lambda buf: F.conv2d(buf, module.weight, module.bias, stride, padding, dilation, module.groups)
    if layer.spec.kind == "maxpool":
        return lambda buf: F.max_pool2d(buf, kernel, stride, padding, dilation)
    return lambda buf: F.avg_pool2d(
        buf, kernel, stride, padding, False, module.count_include_pad, module.divisor_override
    )


class SplitExecutor:
    """Runs ``model`` (an ``nn.Sequential``) split by height over ``comm``.

    Every rank calls :meth:`__call__` (or :meth:`forward_local`) with the same
    arguments' shapes; rank 0 gets the output, other ranks ``None``.  Buffers are
    built for a batch size on first use and reused while it stays the same.
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
        self._ops = [_window_op(l, m) if l.spec.spatial else m for l, m in zip(self.plan.layers, self.modules)]
        self._fused = [self._fuses_into_next(i) for i in range(len(self.plan.layers))]
        self._batch: Optional[int] = None
        self._buffers: list[Optional[torch.Tensor]] = []

    # ----------------------------------------------------------------- planning
    def _fuses_into_next(self, i: int) -> bool:
        """A ReLU writes straight into the next spatial layer's buffer (saves a copy).

        Only when that layer needs every row this rank owns (stride-1 style
        layers), since the buffer is then also the source of this rank's sends.
        """
        layers = self.plan.layers
        if not isinstance(self.modules[i], nn.ReLU) or i + 1 >= len(layers) or not layers[i + 1].spec.spatial:
            return False
        nxt, r = layers[i + 1], self.rank
        own, need = nxt.owned_in[r], nxt.needed[r]
        return len(nxt.owned_out[r]) > 0 and need.start <= own.start and own.stop <= need.stop

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

    # ---------------------------------------------------------------- execution
    def forward_local(self, x: torch.Tensor, clock: Optional[LayerClock] = None) -> torch.Tensor:
        """This rank's input rows -> this rank's rows of the last spatial layer.

        ``x`` holds rows ``plan.input_rows[rank]`` of every image in the batch.
        May modify ``x`` in place (in-place ReLUs).
        """
        batch = x.shape[0]
        if batch != self._batch:
            self._allocate(batch)
        r, comm = self.rank, self.comm
        filled = False  # whether the previous ReLU already wrote into this layer's buffer
        for i, (layer, op) in enumerate(zip(self.plan.layers, self._ops)):
            start = perf_counter()
            if not layer.spec.spatial:
                if self._fused[i]:
                    nxt = self.plan.layers[i + 1]
                    first = nxt.needed[r].start - nxt.pad_top[r]
                    own = nxt.owned_in[r]
                    x = torch.clamp_min(x, 0, out=self._buffers[i + 1][:, :, own.start - first : own.stop - first])
                    filled = True
                else:
                    x = op(x)
                if clock is not None:
                    clock.compute[i] += perf_counter() - start
                continue
            buf = self._buffers[i]
            own, need = layer.owned_in[r], layer.needed[r]
            buf_first = need.start - layer.pad_top[r]  # image row at buffer index 0
            if filled:
                source, source_first = buf, buf_first
            else:
                source, source_first = x, own.start
                if buf is not None:
                    keep = need.intersect(own)
                    if len(keep):
                        buf[:, :, keep.start - buf_first : keep.stop - buf_first].copy_(
                            x[:, :, keep.start - own.start : keep.stop - own.start]
                        )
            filled = False
            copied = perf_counter()
            sent = exchange_halos(comm, layer, source, source_first, buf, buf_first) if layer.transfers else 0
            exchanged = perf_counter()
            if buf is None:
                c, h, w = layer.out_shape
                x = torch.empty((batch, c, 0, w), memory_format=CL)
            else:
                x = op(buf)
            if clock is not None:
                done = perf_counter()
                clock.compute[i] += (copied - start) + (done - exchanged)
                clock.halo[i] += exchanged - copied
                clock.bytes[i] += sent
        return x

    def __call__(self, image: Optional[torch.Tensor], batch: int = 1, clock: Optional[LayerClock] = None):
        """Scatter rank 0's image batch, run split, gather, run the head on rank 0.

        Every rank passes ``batch``; only rank 0 needs ``image`` (others pass None).
        Returns the head's output on rank 0 and ``None`` on the other ranks.
        """
        if self.rank == 0:
            check_image(image, self.plan.in_shape[0], self.plan.in_shape[1])
            batch = image.shape[0]
        x = scatter_rows(self.comm, self.plan, image, batch)
        y = gather_rows(self.comm, self.plan, self.forward_local(x, clock), batch)
        if self.rank != 0:
            return None
        return self.head(y) if len(self.head) else y
