"""A fixed set of augmented views per training image, so a frozen teacher runs once per view.

The teacher never changes while students train, yet the on-the-fly stream
(:class:`kd.batches.BatchStream`) asks it for logits of every augmented batch:
on these CPUs the cloud net's forward pass was more than half of an AFLKD step
(103 of 179 ms at batch 64).  Here every training image ``i`` of the dataset has
``K`` fixed views (crop offset and flip drawn once from ``(views_seed, i, k)``),
the teacher's logits of all views of the images a grid needs are computed once
(:func:`view_logits`), and a student at epoch ``e`` sees view
``k = h(seed, e, row) mod K`` of each image -- the teacher's logits of exactly
that view are a table lookup.  Every method sees the same views (the baseline
too), so methods differ only in what the papers say they differ in.

``K`` trades augmentation variety for the one-off teacher cost: 8 views and 30
epochs show each view about 4 times.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .batches import BatchStream, derived_seed
from .teacher_source import run_teacher

__all__ = ["ViewTable", "apply_views", "ViewBatchStream", "view_logits"]

CL = torch.channels_last


class ViewTable:
    """Crop offsets ``dy, dx`` in ``[0, 2*pad]`` and a flip bit for every (image, view) of a training split."""

    def __init__(self, images: int, views: int, pad: int = 4, seed: int = 0):
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        rng = np.random.default_rng(derived_seed(seed, "views", views))
        self.views, self.pad = views, pad
        self.dy = rng.integers(0, 2 * pad + 1, (images, views), dtype=np.int64)
        self.dx = rng.integers(0, 2 * pad + 1, (images, views), dtype=np.int64)
        self.flip = rng.random((images, views)) < 0.5


def apply_views(x: torch.Tensor, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray, pad: int) -> torch.Tensor:
    """Crop ``x`` (``(n, C, H, W)``) at offsets ``dy, dx`` of its zero-padded copy, then flip where asked.

    The same crop-and-flip as :func:`kd.teacher.augment`, with the offsets given
    instead of drawn, so the student and the teacher's cache see identical pixels.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = torch.from_numpy(dy).view(n, 1) + torch.arange(h).view(1, h)
    cols = torch.from_numpy(dx).view(n, 1) + torch.arange(w).view(1, w)
    out = padded.permute(0, 2, 3, 1)[torch.arange(n).view(n, 1, 1), rows.view(n, h, 1), cols.view(n, 1, w)]
    mask = torch.from_numpy(np.asarray(flip, dtype=bool))
    out[mask] = out[mask].flip(2)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=CL)


class ViewBatchStream(BatchStream):
    """:class:`BatchStream`'s batches (same rows for ``(seed, step)``), each image as one of its fixed views.

    ``global_idx`` maps the subset's rows to training-split indices (the views
    belong to the image, not to the cell), and :meth:`keys` names each batch
    image's ``(row, view)`` as ``row * K + view``: the index into the subset's
    flattened ``(rows * K, classes)`` logit table.
    """

    def __init__(self, x: torch.Tensor, global_idx: np.ndarray, table: ViewTable, batch: int, seed: int):
        super().__init__(x, batch, seed)
        if len(global_idx) != len(x):
            raise ValueError(f"{len(global_idx)} training-split indices for {len(x)} images")
        self.global_idx, self.table = np.asarray(global_idx), table
        self._picks = (-1, None)

    def view_of(self, step: int, rows: torch.Tensor) -> np.ndarray:
        """The view each of ``rows`` shows at ``step``: one pick per subset row per epoch, from ``(seed, epoch)``."""
        epoch = self.epoch(step)
        if self._picks[0] != epoch:
            rng = np.random.default_rng(derived_seed(self.seed, "view-pick", epoch))
            self._picks = (epoch, rng.integers(0, self.table.views, len(self.x)))
        return self._picks[1][rows.numpy()]

    def keys(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        return rows * self.table.views + torch.from_numpy(self.view_of(step, rows))

    def images(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        g, k = self.global_idx[rows.numpy()], self.view_of(step, rows)
        t = self.table
        return apply_views(self.x[rows], t.dy[g, k], t.dx[g, k], t.flip[g, k], t.pad)


@torch.no_grad()
def view_logits(teacher, x: torch.Tensor, global_idx: np.ndarray, table: ViewTable, batch: int = 500,
                progress=None) -> torch.Tensor:
    """The teacher's float32 logits of every view of ``x`` (rows = ``global_idx``): ``(len(x), K, classes)``.

    ``progress`` (a tqdm bar or None) is advanced by the images done.
    """
    out = []
    k_all = np.arange(table.views)
    for i in range(0, len(x), batch):
        chunk, g = x[i : i + batch], np.asarray(global_idx[i : i + batch])
        n = len(chunk)
        rep = chunk.repeat_interleave(table.views, dim=0)
        gg, kk = np.repeat(g, table.views), np.tile(k_all, n)
        images = apply_views(rep, table.dy[gg, kk], table.dx[gg, kk], table.flip[gg, kk], table.pad)
        out.append(run_teacher(teacher, images).view(n, table.views, -1))
        if progress is not None:
            progress.update(n)
    return torch.cat(out) if out else torch.empty(0, table.views, 0)
