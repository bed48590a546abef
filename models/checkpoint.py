"""Loading and saving model weights, with one clear error when they do not fit the net."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn

from runtime.errors import UsageError

__all__ = ["load_weights", "save_atomic", "write_atomic"]


def load_weights(model: nn.Module, path: str,
                 hint: str = "check --net, --size, --classes and --in-channels") -> nn.Module:
    """Load a checkpoint (a state dict, or a dict with a ``"model"`` state dict) into ``model``.

    ``hint`` ends the one-line error for a checkpoint that does not fit: the options
    of the calling command that decide the net's shape.
    """
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' does not exist; pass the path of a saved .pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for corrupt files
        raise UsageError(f"checkpoint '{path}' cannot be read ({type(err).__name__}); is it a torch .pt file?") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UsageError(f"checkpoint '{path}' holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: checkpoint {tuple(state[k].shape)} vs net {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), e.g. {extra[0]}")
        raise UsageError(
            f"checkpoint '{path}' does not match the net ({'; '.join(parts)}); {hint}"
        )
    model.load_state_dict(state)
    return model


def write_atomic(path, write) -> None:
    """Call ``write(binary_file)`` on a unique temp file beside ``path``, then rename it over
    ``path``: an interrupted or concurrent writer never leaves (and a reader never sees) a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints and caches are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj, path: str) -> None:
    """``torch.save`` through :func:`write_atomic`: never a torn checkpoint."""
    write_atomic(path, lambda fh: torch.save(obj, fh))
