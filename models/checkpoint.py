"""Loading and saving model weights, with one clear error when they do not fit the net."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn

from runtime.errors import UsageError

__all__ = ["load_weights", "read_saved", "read_state", "check_state", "save_atomic", "write_atomic"]


def read_saved(path: str, mmap: bool = False, what: str = "checkpoint",
               absent: str = "pass the path of a saved .pt file") -> tuple[dict, dict]:
    """``(state dict, the rest)`` of a file holding a state dict or ``{"model": state, ...}``
    (the rest: that dict's other entries, ``{}`` for a plain state dict); one-line UsageErrors.

    ``mmap``: tensors stay memory-mapped, read from the file only where touched (zip-format
    files only).  ``what`` names the file in the messages, ``absent`` says what to do if it
    does not exist.
    """
    if not os.path.isfile(path):
        raise UsageError(f"{what} '{path}' does not exist; {absent}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several unrelated types for corrupt or legacy files
        how = ("cannot be memory-mapped", ".pt file written by torch.save (zip format)") if mmap else \
            ("cannot be read", "torch .pt file")
        raise UsageError(f"{what} '{path}' {how[0]} ({type(err).__name__}); is it a {how[1]}?") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        return loaded["model"], {k: v for k, v in loaded.items() if k != "model"}
    if not isinstance(loaded, dict):
        raise UsageError(f"{what} '{path}' holds a {type(loaded).__name__}, not a state dict")
    return loaded, {}


def read_state(path: str, mmap: bool = False) -> dict:
    """The state dict of a checkpoint (a state dict, or a dict with a ``"model"`` state dict); see :func:`read_saved`."""
    return read_saved(path, mmap)[0]


def check_state(model: nn.Module, state: dict, path: str, hint: str = "") -> None:
    """Raise one-line :class:`UsageError` unless ``state`` (read from ``path``) fits ``model`` (real or meta):
    same keys, same shapes.  ``hint`` ends the line: the options that decide the net's shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}: checkpoint {tuple(state[wrong[0]].shape)} "
                     f"vs net {tuple(own[wrong[0]].shape)}")
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected key(s), e.g. {extra[0]}")
    if parts:
        raise UsageError(f"checkpoint '{path}' does not match the net ({'; '.join(parts)})" + (f"; {hint}" if hint else ""))


def load_weights(model: nn.Module, path: str,
                 hint: str = "check --net, --size, --classes and --in-channels") -> nn.Module:
    """Load a checkpoint (a state dict, or a dict with a ``"model"`` state dict) into ``model``.

    ``hint`` ends the one-line error for a checkpoint that does not fit: the options
    of the calling command that decide the net's shape.
    """
    state = read_state(path)
    check_state(model, state, path, hint)
    model.load_state_dict(state)
    return model


def _fsync_folder(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort: some file systems cannot sync a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, write) -> None:
    """Call ``write(binary_file)`` on a unique temp file beside ``path``, fsync it, rename it over ``path``
    and fsync the folder: an interrupted or concurrent writer never leaves (and a reader never sees) a torn
    file, and after a power cut ``path`` is the old file or the new one, never an empty one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints and caches are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # the bytes on disk before the name points at them (a power cut mid-way)
        os.replace(tmp, path)
        _fsync_folder(directory)  # and the rename itself
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj, path: str) -> None:
    """``torch.save`` through :func:`write_atomic`: never a torn checkpoint."""
    write_atomic(path, lambda fh: torch.save(obj, fh))
