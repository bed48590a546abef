r"""Row geometry of height-split execution: pure integer functions, no MPI, no torch.

Every rank owns a contiguous, half-open range of rows ``[start, stop)`` of each
feature map.  A spatial layer (convolution or pooling) maps input rows to output
rows; to compute its own output rows a rank needs a (possibly larger) range of
input rows, which it partly owns and partly fetches from other ranks::

      input rows          rank 0 owns [0, 4)      rank 1 owns [4, 8)
      0 1 2 3 | 4 5 6 7
      \_____/ ^                      3x3 conv, stride 1, padding 1:
       rank 0 needs [0, 5) -> fetches row 4 from rank 1 (its halo)
              ^ rank 1 needs [3, 8) -> fetches row 3 from rank 0

Rows outside ``[0, H)`` are the layer's own padding; they exist only at the
image's true top and bottom, never between ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

__all__ = [
    "RowRange",
    "Window",
    "split_rows",
    "output_height",
    "input_rows_for",
    "padding_rows",
    "merge_ranges",
    "subtract_ranges",
    "hull",
    "rows_read",
]


@dataclass(frozen=True)
class RowRange:
    """Half-open row interval ``[start, stop)``; empty when ``stop <= start``."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if self.stop < self.start:
            object.__setattr__(self, "stop", self.start)

    def __len__(self) -> int:
        return self.stop - self.start

    def intersect(self, other: "RowRange") -> "RowRange":
        return RowRange(max(self.start, other.start), min(self.stop, other.stop))

    def clip(self, height: int) -> "RowRange":
        return self.intersect(RowRange(0, height))

    def __str__(self) -> str:
        """First to last row, both included, as ``aflkd plan`` prints shares ("10-12", "10", "none")."""
        if self.stop <= self.start:
            return "none"
        return f"{self.start}" if len(self) == 1 else f"{self.start}-{self.stop - 1}"

    def described(self) -> str:
        """"row 9", "rows 9-10" or "no rows": :meth:`__str__` with its noun."""
        return "no rows" if not len(self) else f"row{'s' * (len(self) > 1)} {self}"


@dataclass(frozen=True)
class Window:
    """Height geometry of one sliding-window layer (the width is never split)."""

    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.stride < 1 or self.dilation < 1 or self.padding < 0:
            raise ValueError(
                f"invalid window kernel={self.kernel} stride={self.stride} "
                f"padding={self.padding} dilation={self.dilation}: kernel, stride and "
                "dilation must be >= 1 and padding >= 0"
            )

    @property
    def span(self) -> int:
        """Rows one output row reads: ``dilation * (kernel - 1) + 1``."""
        return self.dilation * (self.kernel - 1) + 1


def split_rows(height: int, weights: Sequence[float]) -> tuple[RowRange, ...]:
    """Split ``[0, height)`` into ``len(weights)`` contiguous ranges, sized by weight.

    Boundary ``i`` is ``floor(height * W_i / W)`` with ``W_i`` the sum of the first
    ``i`` weights, computed in exact rationals so that every rank derives the same
    split.  Ranges cover ``[0, height)`` in rank order without overlap; a range is
    empty when ``height`` is smaller than the number of ranks or a weight is tiny.
    """
    if height < 0:
        raise ValueError(f"height must be >= 0, got {height}")
    if not weights:
        raise ValueError("need at least one weight (one per rank)")
    exact = [Fraction(w) for w in weights]
    if any(w <= 0 for w in exact):
        raise ValueError(f"rank weights must be positive, got {list(weights)}")
    total = sum(exact)
    bounds = [0]
    running = Fraction(0)
    for w in exact:
        running += w
        bounds.append(int(height * running / total))  # floor for non-negative values
    bounds[-1] = height
    return tuple(RowRange(a, b) for a, b in zip(bounds[:-1], bounds[1:]))


def output_height(height: int, window: Window, ceil_mode: bool = False) -> int:
    """Output height of a window layer, as PyTorch computes it.

    With ``ceil_mode`` (pools only) a last, partial window is kept when it starts
    inside the input or its top padding; the rows it reads past the bottom
    padding are padding too (see :func:`padding_rows`).
    """
    reach = height + 2 * window.padding - window.span
    if reach < 0:
        raise ValueError(
            f"input height {height} is smaller than the window "
            f"(kernel {window.kernel}, dilation {window.dilation}, padding "
            f"{window.padding}); use a larger input"
        )
    if not ceil_mode:
        return reach // window.stride + 1
    out = -(-reach // window.stride) + 1
    if (out - 1) * window.stride >= height + window.padding:
        out -= 1
    return out


def input_rows_for(out_rows: RowRange, window: Window) -> RowRange:
    """Input rows that output rows ``out_rows`` read, in unpadded input coordinates.

    The result may start below 0 or end past the input height: those rows are
    the layer's padding.  An empty output range needs no input rows.
    """
    if len(out_rows) == 0:
        return RowRange(0, 0)
    first = out_rows.start * window.stride - window.padding
    last = (out_rows.stop - 1) * window.stride - window.padding + window.span
    return RowRange(first, last)


def padding_rows(wanted: RowRange, height: int) -> tuple[int, int]:
    """Rows of ``wanted`` above row 0 and below row ``height - 1``: the padding it reads.

    A window may lie wholly in the padding (padding larger than the kernel's
    reach), so this counts rows, it does not subtract clipped ends.
    """
    if len(wanted) == 0:
        return 0, 0
    top = max(0, min(wanted.stop, 0) - wanted.start)
    bottom = max(0, wanted.stop - max(wanted.start, height))
    return top, bottom


def merge_ranges(ranges: Sequence[RowRange]) -> list[RowRange]:
    """Sorted, disjoint union of row ranges (touching ranges are joined)."""
    merged: list[RowRange] = []
    for rows in sorted((r for r in ranges if len(r)), key=lambda r: r.start):
        if merged and rows.start <= merged[-1].stop:
            merged[-1] = RowRange(merged[-1].start, max(merged[-1].stop, rows.stop))
        else:
            merged.append(rows)
    return merged


def subtract_ranges(rows: Sequence[RowRange], holes: Sequence[RowRange]) -> list[RowRange]:
    """The rows of ``rows`` that lie in none of ``holes``, as sorted disjoint ranges."""
    out: list[RowRange] = []
    holes = merge_ranges(holes)
    for piece in merge_ranges(rows):
        cursor = piece.start
        for hole in holes:
            if hole.stop <= cursor or hole.start >= piece.stop:
                continue
            if hole.start > cursor:
                out.append(RowRange(cursor, hole.start))
            cursor = max(cursor, hole.stop)
        if cursor < piece.stop:
            out.append(RowRange(cursor, piece.stop))
    return out


def hull(ranges: Sequence[RowRange]) -> RowRange:
    """Smallest range holding every non-empty range of ``ranges`` (empty if none)."""
    full = [r for r in ranges if len(r)]
    if not full:
        return RowRange(0, 0)
    return RowRange(min(r.start for r in full), max(r.stop for r in full))


def rows_read(out_rows: RowRange, window: Window) -> list[RowRange]:
    """Exactly the input rows (unpadded coordinates, padding included) that output rows ``out_rows`` read.

    :func:`input_rows_for` gives their extent; with a stride larger than the
    dilation (a 1x1 conv with stride 2, a dilated strided conv) some rows inside
    it are skipped, and a halo needs only the rows actually read.
    """
    extent = input_rows_for(out_rows, window)
    if not len(extent) or window.dilation == 1 and window.stride <= window.kernel:
        return [extent] if len(extent) else []
    rows = {o * window.stride - window.padding + window.dilation * tap
            for o in range(out_rows.start, out_rows.stop) for tap in range(window.kernel)}
    return merge_ranges([RowRange(r, r + 1) for r in rows])
