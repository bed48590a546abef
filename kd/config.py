"""The settings of edge students and cloud teachers, as plain dataclasses: the CLI reads its defaults here
without importing torch (``aflkd --help`` and a refused option answer in a fraction of a second)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from runtime.errors import UsageError

__all__ = ["METHODS", "EdgeConfig", "TeacherConfig"]

METHODS = ("baseline", "sslf", "aflkd", "kd", "ctkd")


@dataclass(frozen=True)
class EdgeConfig:
    method: str
    net: int
    steps: int = 200  # the CLI's default too (launch/options.py reads it here)
    batch: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    kd_weight: float = 1.0  # lambda of Eq. 6
    temperature: float = 4.0  # initial (aflkd, ctkd) or fixed (kd) T
    t_min: float = 1.0
    t_max: float = 10.0
    t_rule: str = "reversal"  # aflkd: "descent" (paper Eq. 5) or "reversal" (curriculum)
    t_lr: float = 0.05
    unit: str = "conv"  # what Eq. 17 counts: a shared conv (with its BN/ReLU) or a whole block
    sslf_frozen: Optional[int] = None  # SSLF's fixed frozen convs, whatever ``unit`` says (default: half)
    fixed_frozen: Optional[int] = None  # aflkd: force n (for timing epochs against n), else Eq. 17
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise UsageError(f"unknown method '{self.method}'; choose from {', '.join(METHODS)}")
        if self.net not in (1, 2, 3):
            raise UsageError(f"edge net must be 1, 2 or 3, got {self.net}")
        # softened logits divide by T: T = 0 gives NaN, t_min = t_max divides the learnable T's range by zero
        if not (math.isfinite(self.t_min) and math.isfinite(self.t_max) and 0 < self.t_min < self.t_max):
            raise UsageError(f"the temperature range needs 0 < t_min < t_max, got t_min={self.t_min:g}, "
                             f"t_max={self.t_max:g}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UsageError(f"the temperature T must be a finite number > 0, got {self.temperature:g}")
        if self.method in ("aflkd", "ctkd") and not self.t_min <= self.temperature <= self.t_max:
            raise UsageError(f"{self.method} learns T within [t_min, t_max] = [{self.t_min:g}, {self.t_max:g}]: "
                             f"its initial T={self.temperature:g} lies outside")



@dataclass(frozen=True)
class TeacherConfig:
    epochs: int = 18  # the CLI's default too (launch/train.py reads it here)
    batch: int = 128
    max_lr: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    size: int = 32
    init: str = ""  # weights to start from ("" = random initialisation)
    swa_epochs: int = 0  # the last epochs average weights at a constant swa_lr (0 = plain one-cycle)
    swa_lr: float = 0.01
    val: int = 0  # images of the training split held out as the validation slice (0 = none: train on all)

    def __post_init__(self):  # checked on construction, so the CLI refuses before loading any data
        if self.val < 0:
            raise UsageError(f"--val must be >= 0, got {self.val}")
        if not 0 <= self.swa_epochs <= self.epochs:
            raise UsageError(f"--swa-epochs must be between 0 and --epochs ({self.epochs}), got {self.swa_epochs}")
        if self.swa_epochs and not self.swa_lr > 0:
            raise UsageError(f"--swa-lr must be > 0, got {self.swa_lr}")
