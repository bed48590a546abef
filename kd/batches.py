"""Which images make optimiser step ``s``, from ``(seed, s)`` alone: the cloud rebuilds any batch.

The old trainer drew shuffling and augmentation from one generator in turn, so
batch ``s`` could only be had by replaying batches ``0..s-1``.  Here the
shuffling of epoch ``e`` comes from its own generator seeded by ``(seed, e)``,
and the crops and flips of step ``s`` from one seeded by ``(seed, s)``, so a
cloud rank that knows the training subset and the config computes exactly the
images the edge trains on, for any step, without seeing the stream::

    step s ─▶ epoch e = s // steps_per_epoch ─▶ order_e = randperm(N | seed, e)
           └▶ rows = order_e[b*B:(b+1)*B],  b = s % steps_per_epoch
           └▶ images = augment(x[rows] | seed, s)

Batches are always full (``min(B, N)`` images): an epoch drops its remainder.
"""
from __future__ import annotations

import hashlib

import torch

from .teacher import augment

__all__ = ["derived_seed", "BatchStream"]


def derived_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for the ``index``-th generator of ``stream`` under ``seed`` (any ints, negative too)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BatchStream:
    """Batch ``step`` of a seeded run over ``x`` (normalised ``(N, C, H, W)`` float images, on the CPU)."""

    def __init__(self, x: torch.Tensor, batch: int, seed: int):
        if len(x) < 1:
            raise ValueError("no training images")
        self.x, self.seed = x, seed
        self.batch = min(batch, len(x))
        self.steps_per_epoch = max(1, len(x) // batch)
        self._order = (-1, None)

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def rows(self, step: int) -> torch.Tensor:
        """Indices into ``x`` (int64) of the images of ``step``."""
        epoch, b = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, "order", epoch))
            self._order = (epoch, torch.randperm(len(self.x), generator=generator))
        return self._order[1][b * self.batch : (b + 1) * self.batch]

    def keys(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        """What a teacher source indexes its logits by for these rows: the rows themselves."""
        return rows

    def images(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        """The augmented images of ``rows`` at ``step`` (random crop and flip, seeded by ``(seed, step)``)."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "augment", step))
        return augment(self.x[rows], generator)
