"""Image datasets as uint8 arrays, from local files only (nothing downloads unless asked).

Sources, tried in this order for ``--data-root ROOT``:

* CIFAR-10/100: ``ROOT/cifar10.npz.xz`` / ``ROOT/cifar100.npz.xz`` (the project's
  offline copies, decompressed once into ``~/.cache/aflkd`` or ``$AFLKD_CACHE``), else
  torchvision's own layout under ROOT (``cifar-10-batches-py``), which
  ``download=True`` can fetch for a user with internet.
* Fashion-MNIST: torchvision's layout ``ROOT/FashionMNIST/raw``, else Debian's
  ``dataset-fashion-mnist`` files in ``/usr/share/datasets/fashion-mnist`` (read
  with torchvision's IDX readers; their gzip headers differ from the published
  archives, so torchvision's md5 check would reject them as downloads).

Training images are only ever the official training split; accuracy is always
on the full official test split.
"""
from __future__ import annotations

import dataclasses
import gzip
import lzma
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from models.checkpoint import write_atomic
from runtime.errors import UsageError

__all__ = ["ImageArrays", "DATASETS", "DatasetNotFound", "load_dataset", "balanced_subset", "validation_indices"]

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class ImageArrays:
    """uint8 images ``(N, H, W, C)`` and int64 labels, train and test, plus normalisation."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return self.x_train.shape[3]


class DatasetNotFound(UsageError):
    """No local files of the dataset; the message names where to get them.  It does not offer
    ``--download``: only commands that have that option add it (``train cloud``)."""


def _cache_dir() -> Path:
    """Where decompressed files go: ``$AFLKD_CACHE`` or ``~/.cache/aflkd`` (never the data folder)."""
    path = Path(os.environ.get("AFLKD_CACHE", Path.home() / ".cache" / "aflkd"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the cache folder {path} ({err}); set AFLKD_CACHE to a writable folder") from None
    return path


def _download_failed(name: str, err: OSError) -> UsageError:
    return UsageError(f"downloading {name} failed ({err}); check the network, or drop --download and point "
                      "--data-root at local files")


def _cifar_npz(root: Path, name: str):
    packed = root / f"{name}.npz.xz"
    if not packed.exists():
        return None
    cached = _cache_dir() / f"{name}.npz"
    if not cached.exists() or cached.stat().st_mtime < packed.stat().st_mtime:
        with lzma.open(packed) as fh:  # streamed: the decompressed file never sits whole in memory
            write_atomic(cached, lambda out: shutil.copyfileobj(fh, out))
    d = np.load(cached)
    return d["x_train"], d["y_train"].astype(np.int64), d["x_test"], d["y_test"].astype(np.int64)


def _torchvision_splits(cls, root: Path, name: str, download: bool):
    """Train and test splits through a torchvision dataset class; None when its files are not
    under ``root`` (torchvision raises RuntimeError); one line when a requested download fails."""
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except RuntimeError:
        return None
    except OSError as err:  # URLError is an OSError
        if not download:
            raise
        raise _download_failed(name, err) from None


def _cifar_torchvision(root: Path, name: str, download: bool):
    from torchvision import datasets

    splits = _torchvision_splits(datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100, root, name, download)
    if splits is None:
        return None
    train, test = splits
    return (np.asarray(train.data), np.asarray(train.targets, np.int64),
            np.asarray(test.data), np.asarray(test.targets, np.int64))


def _fashion(root: Path, download: bool):
    from torchvision import datasets
    from torchvision.datasets.mnist import read_image_file, read_label_file

    splits = _torchvision_splits(datasets.FashionMNIST, root, "fashion-mnist", download)
    if splits is not None:
        train, test = splits
        pairs = (train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy())
    else:
        names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
        if not all((DEBIAN_FASHION / f"{n}.gz").exists() for n in names):
            return None
        cache = _cache_dir()
        arrays = []
        for n in names:
            raw = cache / n
            if not raw.exists():
                with gzip.open(DEBIAN_FASHION / f"{n}.gz") as fh:
                    write_atomic(raw, lambda out: shutil.copyfileobj(fh, out))
            read = read_image_file if "images" in n else read_label_file
            arrays.append(read(str(raw)).numpy())
        pairs = tuple(arrays)
    x_train, y_train, x_test, y_test = pairs
    return x_train[..., None], y_train.astype(np.int64), x_test[..., None], y_test.astype(np.int64)


DATASETS = {
    "cifar10": (10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (100, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": (10, (0.2860,), (0.3530,)),
}


def load_dataset(name: str, root: str | os.PathLike, download: bool = False) -> ImageArrays:
    """Load ``name`` (cifar10, cifar100, fashion-mnist) from ``root``; see the module doc."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    root = Path(root)
    if name == "fashion-mnist":
        arrays = _fashion(root, download)
        hint = "install Debian's package with 'apt-get install dataset-fashion-mnist'"
    else:
        arrays = _cifar_npz(root, name) or _cifar_torchvision(root, name, download)
        hint = f"point --data-root at the folder holding {name}.npz.xz (e.g. ../shared/data)"
    if arrays is None:
        raise DatasetNotFound(f"dataset '{name}' not found under {root}; {hint}")
    classes, mean, std = DATASETS[name]
    return ImageArrays(name, *arrays, classes=classes, mean=mean, std=std)


def balanced_subset(labels: np.ndarray, size: int, classes: int, seed: int = 0,
                    exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of ``size`` training images, class-balanced, fixed by ``seed``, and nested.

    Each class's images are shuffled once (by ``seed``); the subset takes the
    first ``size // classes`` of each class (the remainder from the first classes),
    so the 1000-image subset contains the 500-image one, like an incremental stream.
    ``exclude`` (e.g. the validation slice) is never picked.
    """
    pool = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        pool[np.asarray(exclude, dtype=np.int64)] = False
    if size < classes or size > int(pool.sum()):
        raise UsageError(f"subset size {size} must be between {classes} and {int(pool.sum())}"
                         + (" (the training split less the validation slice)" if exclude is not None else ""))
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(classes)]
    per_class = [idx[pool[idx]] for idx in per_class]
    base, extra = divmod(size, classes)
    short = [c for c, idx in enumerate(per_class) if len(idx) < base + (1 if c < extra else 0)]
    if short:
        raise UsageError(f"subset size {size} needs more images of class {short[0]} than the pool has; "
                         f"ask for fewer images")
    picked = [idx[: base + (1 if c < extra else 0)] for c, idx in enumerate(per_class)]
    return np.sort(np.concatenate(picked))


VALIDATION_SEED = 20261125  # fixed for every grid and teacher: the slice never moves


def validation_indices(labels: np.ndarray, classes: int, size: int) -> np.ndarray:
    """A fixed, seeded, class-balanced slice of the training split, held out for every choice.

    The offline CIFAR files are sorted by class, so "the last N images" would be
    one class; this takes ``size // classes`` random images of each class.  Edge
    subsets exclude it (``balanced_subset(..., exclude=...)``); the test split is
    then read only for the final numbers.
    """
    if size == 0:
        return np.empty(0, dtype=np.int64)
    return balanced_subset(labels, size, classes, seed=VALIDATION_SEED)


def with_test_subset(data: ImageArrays, test_images: Optional[int]) -> ImageArrays:
    """``data`` whose test split is ``test_images`` class-balanced test images (in their order; all when None)."""
    if test_images is None:
        return data
    if not data.classes <= test_images <= len(data.y_test):
        raise UsageError(f"--test-images must be between {data.classes} (one per class) and {len(data.y_test)} "
                         f"(the test split of {data.name}), got {test_images}")
    idx = np.sort(balanced_subset(data.y_test, test_images, data.classes, seed=0))
    return dataclasses.replace(data, x_test=data.x_test[idx], y_test=data.y_test[idx])
