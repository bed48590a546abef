"""Which device trains or runs a net (``--device auto|cpu|cuda``), and the mixed precision used there.

``auto`` takes CUDA when torch sees a GPU and otherwise falls back to the CPU,
saying so once per process in one line (so a user on a laptop knows why the
run is slow, and a user on a GPU box whose driver torch cannot see finds out).
``cuda`` without a visible GPU is bad input: one :class:`UsageError` line.

Mixed precision, CUDA only (CPU runs stay float32 and bit-for-bit as before):
forward passes run under ``torch.autocast`` in bfloat16 when the GPU supports
it (Ampere and later: same exponent range as float32, so no loss scaling is
needed and VGG/CIFAR training is not known to lose accuracy), else in float16
with a :class:`torch.amp.GradScaler` (scaling keeps small gradients from
flushing to zero).  Losses, softmax/KL and the optimiser stay in float32: the
trainers cast logits to float32 before any loss, and teacher logits leave the
teacher as float32.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from runtime.errors import UsageError

__all__ = ["DEVICES", "FALLBACK_NOTE", "pick_device", "autocast", "amp_dtype", "grad_scaler", "device_name", "tune"]

DEVICES = ("auto", "cpu", "cuda")
FALLBACK_NOTE = "aflkd: no CUDA device visible to torch; running on the CPU"
_noted = False


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA if torch sees it, else the CPU (noted once on stderr); ``cpu``; ``cuda`` or refuse."""
    global _noted
    if requested not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got '{requested}'")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        built = torch.version.cuda
        why = f"this torch is built for CUDA {built} but sees no GPU" if built else "this torch is a CPU-only build"
        raise UsageError(f"--device cuda: no CUDA device visible to torch ({why}); use --device cpu or auto")
    if not _noted:
        print(FALLBACK_NOTE, file=sys.stderr, flush=True)
        _noted = True
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """What results record: ``cpu``, or ``cuda:<GPU name>``."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def amp_dtype(device: torch.device):
    """The autocast dtype on ``device``: bfloat16 where the GPU has it, else float16; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device):
    """A context for forward passes: CUDA autocast (see the module doc), nothing on the CPU."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


class PlainSteps:
    """What a loss scaler does when no scaling is needed (float32 or bfloat16): the step itself.

    Built instead of ``torch.amp.GradScaler("cuda", enabled=False)`` on CPU runs: that device-named
    constructor needs torch >= 2.3 (setup.py allows 2.1), and a CPU run has nothing to scale."""

    def is_enabled(self) -> bool:
        return False

    def scale(self, loss):
        return loss

    def step(self, optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def grad_scaler(device: torch.device):
    """A loss scaler for float16 autocast on CUDA; :class:`PlainSteps` everywhere else."""
    if amp_dtype(device) == torch.float16:
        return torch.amp.GradScaler("cuda")
    return PlainSteps()


def tune(device: torch.device) -> None:
    """Process-wide speed settings for training on ``device``: cuDNN's autotuner on CUDA (the shapes
    repeat every step); nothing on the CPU, whose runs stay as they were."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
