"""Learnable distillation temperature kept in ``[t_min, t_max]``, with two update rules.

* ``"descent"`` -- the paper's Eq. 5: plain gradient descent on T.  The only
  T-gradient comes from ``lambda * T^2 * KL``.  Where that term grows with T (a
  sharp teacher, small T, unrelated logits) T slides to ``t_min`` and Eq. 17 then
  freezes every layer (issue 3, trap 1; a test shows it).  It does not always
  grow: for a soft (label-smoothed) teacher and a near-uniform student (a fresh
  head) it falls with T above T ~ 2 (a test shows it), and on real CIFAR-10 data
  descent *raised* T (4.0 -> 4.87 in 200 steps, README).
* ``"reversal"`` -- Curriculum Temperature KD: the gradient reaching T is
  reversed (times ``scale``), so T *ascends* the distillation loss, making the
  task harder as the student improves; ``scale`` follows a cosine ramp.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["LearnableTemperature", "cosine_ramp"]


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def cosine_ramp(step: int, total: int, start: float = 0.0, end: float = 1.0) -> float:
    """``start`` -> ``end`` along half a cosine over ``total`` steps (CTKD's lambda schedule)."""
    if total <= 0:
        return end
    progress = min(max(step / total, 0.0), 1.0)
    return start + (end - start) * (1 - math.cos(math.pi * progress)) / 2


class LearnableTemperature(nn.Module):
    """A scalar T; call it to get the (possibly gradient-reversed) value for the loss."""

    RULES = ("descent", "reversal")

    def __init__(self, initial: float = 4.0, t_min: float = 1.0, t_max: float = 10.0, rule: str = "reversal"):
        super().__init__()
        if rule not in self.RULES:
            raise ValueError(f"temperature rule must be one of {self.RULES}, got '{rule}'")
        if not t_min <= initial <= t_max:
            raise ValueError(f"initial temperature {initial} outside [{t_min}, {t_max}]")
        self.t_min, self.t_max, self.rule = t_min, t_max, rule
        self.value = nn.Parameter(torch.tensor(float(initial)))
        self.scale = 1.0  # reversal strength, set by the trainer (cosine ramp)

    def forward(self) -> torch.Tensor:
        t = self.value
        return _Reverse.apply(t, self.scale) if self.rule == "reversal" else t

    @torch.no_grad()
    def project(self) -> None:
        """Clamp T back into ``[t_min, t_max]`` after an optimiser step."""
        self.value.clamp_(self.t_min, self.t_max)

    def item(self) -> float:
        return float(self.value.detach())
