"""Split plan: who owns which rows of every feature map and which rows move where.

Built once per (net, input shape, rank weights) from pure geometry; identical on
every rank, so both ends of every message agree without negotiating.  Executors
only follow it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import UsageError
from .geometry import RowRange, input_rows_for, output_height, padding_rows, split_rows
from .layers import LayerSpec

__all__ = ["Transfer", "LayerPlan", "SplitPlan", "build_plan"]


@dataclass(frozen=True)
class Transfer:
    """Rows ``rows`` of a layer's input go from rank ``src`` to rank ``dst``."""

    src: int
    dst: int
    rows: RowRange


@dataclass(frozen=True)
class LayerPlan:
    """One layer of the plan.  Shapes are ``(channels, height, width)`` per image.

    For a spatial layer, rank ``r`` assembles input rows ``needed[r]`` (clipped to
    the image) with ``pad_top[r]``/``pad_bottom[r]`` padding rows around them,
    then computes output rows ``owned_out[r]``.  Element-wise layers keep the
    row split and move nothing.
    """

    index: int
    spec: LayerSpec
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    owned_in: tuple[RowRange, ...]
    owned_out: tuple[RowRange, ...]
    needed: tuple[RowRange, ...]
    pad_top: tuple[int, ...]
    pad_bottom: tuple[int, ...]
    transfers: tuple[Transfer, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def sends(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.src == rank]

    def recvs(self, rank: int) -> list[Transfer]:
        return [t for t in self.transfers if t.dst == rank]

    def halo_schedule(self, rank: int) -> list[tuple[int, "RowRange | None", int, "RowRange | None"]]:
        """This rank's exchange as ``Sendrecv`` steps ``(dest, send_rows, source, recv_rows)``.

        One step per rank distance ``d`` in use, in increasing ``d``: send to
        ``rank + d``, receive from ``rank - d`` (the deadlock-free shift pattern of
        mpi4py's halo demo); ``-1`` stands for ``MPI.PROC_NULL`` where there is
        nothing to move.  Every rank derives the same distances from the same plan.
        """
        steps = []
        for d in sorted({t.dst - t.src for t in self.transfers}):
            out = next((t for t in self.transfers if t.src == rank and t.dst == rank + d), None)
            inc = next((t for t in self.transfers if t.dst == rank and t.src == rank - d), None)
            if out is not None or inc is not None:
                steps.append((rank + d if out else -1, out.rows if out else None,
                              rank - d if inc else -1, inc.rows if inc else None))
        return steps

    def row_bytes(self, batch: int, itemsize: int = 4) -> int:
        """Bytes of one input row across the batch: width x channels x batch x itemsize."""
        channels, _, width = self.in_shape
        return width * channels * batch * itemsize


@dataclass(frozen=True)
class SplitPlan:
    """The whole spatial part of a net, split over ``len(weights)`` ranks."""

    weights: tuple[float, ...]
    in_shape: tuple[int, int, int]
    layers: tuple[LayerPlan, ...]

    @property
    def ranks(self) -> int:
        return len(self.weights)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return self.layers[-1].out_shape if self.layers else self.in_shape

    @property
    def input_rows(self) -> tuple[RowRange, ...]:
        return self.layers[0].owned_in if self.layers else split_rows(self.in_shape[1], self.weights)

    @property
    def output_rows(self) -> tuple[RowRange, ...]:
        return self.layers[-1].owned_out if self.layers else self.input_rows


def _plan_spatial(index, spec, in_shape, owned_in, weights) -> LayerPlan:
    channels, height, width = in_shape
    if spec.in_channels is not None and spec.in_channels != channels:
        raise UsageError(
            f"layer '{spec.name}' expects {spec.in_channels} input channels but receives "
            f"{channels}; check the net's in_channels against the input"
        )
    try:
        out_h = output_height(height, spec.height)
        out_w = output_height(width, spec.width)
    except ValueError as err:
        raise UsageError(f"layer '{spec.name}' with input {height}x{width}: {err}") from None
    out_c = spec.out_channels if spec.out_channels is not None else channels
    owned_out = split_rows(out_h, weights)
    wanted = [input_rows_for(rows, spec.height) for rows in owned_out]
    needed = tuple(w.clip(height) if len(w) else RowRange(0, 0) for w in wanted)
    pad_top = tuple(padding_rows(w, height)[0] for w in wanted)
    pad_bottom = tuple(padding_rows(w, height)[1] for w in wanted)
    transfers = []
    for dst, need in enumerate(needed):
        for src, own in enumerate(owned_in):
            rows = need.intersect(own)
            if src != dst and len(rows):
                transfers.append(Transfer(src, dst, rows))
    return LayerPlan(
        index, spec, in_shape, (out_c, out_h, out_w), owned_in, owned_out,
        needed, pad_top, pad_bottom, tuple(transfers),
    )


def build_plan(
    specs: Sequence[LayerSpec], in_shape: tuple[int, int, int], weights: Sequence[float]
) -> SplitPlan:
    """Plan ``specs`` on a ``(C, H, W)`` input split over ``len(weights)`` ranks.

    Raises :class:`UsageError` when some rank would own no row of the input (more
    ranks than input rows); deeper layers may leave a rank with no rows, which
    the executor handles.
    """
    weights = tuple(float(w) for w in weights)
    channels, height, width = in_shape
    owned = split_rows(height, weights)
    empty = [r for r, rows in enumerate(owned) if len(rows) == 0]
    if empty:
        raise UsageError(
            f"{len(weights)} ranks with weights {list(weights)} leave rank(s) {empty} without "
            f"rows of the {height}-row input; use at most {height} ranks, a larger input, "
            "or more even --weights"
        )
    layers = []
    shape = in_shape
    for index, spec in enumerate(specs):
        if spec.spatial:
            layer = _plan_spatial(index, spec, shape, owned, weights)
        else:
            zeros = (0,) * len(weights)
            layer = LayerPlan(index, spec, shape, shape, owned, owned, owned, zeros, zeros, ())
        layers.append(layer)
        shape, owned = layer.out_shape, layer.owned_out
    return SplitPlan(weights, in_shape, tuple(layers))
