"""Where ``aflkd serve`` takes its images from: every image has a stable id and can be read again by id.

A restarted job must serve exactly the images it had not served, so a source is
not a stream to consume but an indexed, deterministic collection:

* ``synthetic``: image ``i`` is drawn from a generator seeded by ``(seed, i)``;
* ``cifar10`` / ``cifar100`` / ``fashion-mnist`` (optionally ``:train``): a dataset split,
  normalised as the students were trained (Fashion-MNIST padded to 32x32);
* ``folder:PATH``: the image files of a folder (png, jpg, jpeg, bmp, gif), in
  sorted name order, read with Pillow, scaled to [0, 1] and resized (bilinear) to the
  planned size.

:func:`parse_source` checks the text of ``--source`` (one clear line on bad
input); :meth:`ImageSource.image` returns a float32 ``(1, C, H, W)`` batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .errors import UsageError

__all__ = ["ImageSource", "parse_source", "DATASET_NAMES", "IMAGE_SUFFIXES"]

DATASET_NAMES = ("cifar10", "cifar100", "fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # synthetic | dataset | folder
    name: str = ""  # the dataset, or the folder
    split: str = "test"

    def __str__(self) -> str:
        return {"synthetic": "synthetic", "dataset": f"{self.name}:{self.split}", "folder": f"folder:{self.name}"}[
            self.kind]


def parse_source(text: str) -> SourceSpec:
    """``synthetic``, ``DATASET[:test|:train]`` or ``folder:PATH`` -> a spec, or one UsageError line."""
    if text == "synthetic":
        return SourceSpec("synthetic")
    if text.startswith("folder:"):
        path = text[len("folder:"):]
        if not path:
            raise UsageError("--source folder: needs a path, e.g. folder:images/")
        return SourceSpec("folder", path)
    name, _, split = text.partition(":")
    if name in DATASET_NAMES:
        if split not in ("", "test", "train"):
            raise UsageError(f"--source {text}: the split must be test or train, got '{split}'")
        return SourceSpec("dataset", name, split or "test")
    raise UsageError(f"--source must be synthetic, {', '.join(DATASET_NAMES)} (optionally :train) or "
                     f"folder:PATH, got '{text}'")


class ImageSource:
    """An opened source: ``len(source)`` images, ``source.image(i)`` the i-th as a (1, C, H, W) float32 batch.

    ``shape`` is what the deployment takes (C, H, W): a dataset's images must
    have its channels and, padded, its size; a folder's are converted to it;
    ``count`` limits the source to its first ``count`` images (synthetic: how many).
    """

    def __init__(self, spec: SourceSpec, shape: tuple[int, int, int], count: Optional[int], seed: int = 0,
                 data_root: str = "") -> None:
        self.spec, self.shape, self.seed = spec, tuple(shape), seed
        self.labels = None
        if spec.kind == "synthetic":
            if count is None:
                raise UsageError("--source synthetic needs --images N (how many to serve)")
            self._n = count
        elif spec.kind == "dataset":
            self._open_dataset(data_root, count)
        else:
            self._open_folder(count)

    def _open_dataset(self, data_root: str, count: Optional[int]) -> None:
        from kd.datasets import load_dataset

        data = load_dataset(self.spec.name, data_root)
        channels, size = data.channels, max(32, data.x_test.shape[1])
        if self.shape != (channels, size, size):
            raise UsageError(f"--source {self.spec} images are {channels}x{size}x{size} (C x H x W), the "
                             f"deployment takes {'x'.join(map(str, self.shape))}: use --in-channels {channels} "
                             f"--size {size}")
        x, y = (data.x_test, data.y_test) if self.spec.split == "test" else (data.x_train, data.y_train)
        self._data, self._x, self.labels = data, x, y
        self._n = len(x) if count is None else min(count, len(x))

    def _open_folder(self, count: Optional[int]) -> None:
        folder = self.spec.name
        if not os.path.isdir(folder):
            raise UsageError(f"--source folder:{folder}: no such folder")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise UsageError(f"--source folder:{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
        self._files = [os.path.join(folder, f) for f in files]
        self._n = len(files) if count is None else min(count, len(files))

    def __len__(self) -> int:
        return self._n

    def image(self, i: int):
        import torch

        if not 0 <= i < self._n:
            raise IndexError(i)
        c, h, w = self.shape
        if self.spec.kind == "synthetic":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            return torch.randn(1, c, h, w, generator=g)
        if self.spec.kind == "dataset":
            from kd.teacher import to_tensor

            return to_tensor(self._x[i:i + 1], self._data, h).contiguous()
        return self._read_file(self._files[i])

    def _read_file(self, path: str):
        import numpy as np
        import torch
        from PIL import Image, UnidentifiedImageError

        c, h, w = self.shape
        try:
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                array = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as err:
            raise UsageError(f"{path}: cannot read the image ({str(err).splitlines()[0]})") from None
        x = torch.from_numpy(array.reshape(h, w, -1)).permute(2, 0, 1).unsqueeze(0)
        if x.shape[1] != c:
            raise UsageError(f"{path}: {x.shape[1]} channels, the deployment takes {c}")
        return x.contiguous()
