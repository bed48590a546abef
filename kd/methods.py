"""One small class per edge method: how the student starts, what is frozen, which losses.

The trainer asks a method these questions and never tests its name (mdistiller's habit):

============  ==================  ==========================  ==============================
method        student starts      frozen                      loss
============  ==================  ==========================  ==============================
baseline      from scratch        nothing                     CE
sslf          cloud's k blocks    first ``sslf_frozen`` units  CE
aflkd         cloud's k blocks    first n units, Eq. 17/epoch  CE + lambda T^2 KL, learnable T
kd            from scratch        nothing                     CE + lambda T^2 KL, fixed T
ctkd          from scratch        nothing                     CE + lambda T^2 KL, T by reversal
============  ==================  ==========================  ==============================
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.errors import UsageError

from .freezing import frozen_count
from .losses import aflkd_losses
from .temperature import LearnableTemperature, cosine_ramp

__all__ = ["Method", "make_method", "METHOD_CLASSES"]


class Method:
    """Baseline: a fresh student, nothing frozen, cross-entropy on the labels."""

    name = "baseline"
    distils = False  # uses teacher logits (the trainer asks the teacher source only if so)
    copies_shared_blocks = False  # the student starts from the teacher's first k blocks

    def __init__(self, config):
        self.config = config
        self.units = 0  # freezable shared units of the student: set by the trainer (see unit_kind)
        self.temperature: Optional[LearnableTemperature] = None

    def unit_kind(self) -> str:
        """What Eq. 17 counts as one unit: ``config.unit`` (a conv with its BN/ReLU, or a block)."""
        return self.config.unit

    def start_student(self, student: nn.Sequential, teacher_weights: Optional[dict]) -> None:
        """Copy the teacher's shared blocks into ``student`` (methods that start from them)."""
        if not self.copies_shared_blocks:
            return
        if teacher_weights is None:
            raise UsageError(f"method '{self.name}' needs a cloud teacher to copy the shared blocks from")
        layers = dict(student.named_children())
        shared = {k: v for k, v in teacher_weights.items()
                  if k.split(".")[0] in layers and not k.startswith(("fc", "flatten"))}
        student.load_state_dict(shared, strict=False)

    def param_groups(self) -> list[dict]:
        """Extra optimiser groups beside the student's (the learnable T)."""
        return []

    def to(self, device: torch.device) -> "Method":
        """Put the method's own parameters (T) beside the student."""
        if self.temperature is not None:
            self.temperature.to(device)
        return self

    def frozen_units(self) -> int:
        """Units to freeze for the coming epoch."""
        return 0

    def t_value(self) -> float:
        return self.config.temperature

    def losses(self, logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
               step: int) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(logits, labels)}

    def after_step(self) -> None:
        """After the optimiser step (T back into its range)."""


class SSLF(Method):
    """Shallow layers from the cloud, a fixed half of the shared convs frozen, cross-entropy only."""

    name, copies_shared_blocks = "sslf", True

    def unit_kind(self) -> str:
        """Always convs, whatever ``unit`` says: "half the shared convs" never becomes "all the shared blocks"."""
        return "conv"

    def frozen_units(self) -> int:
        half = (self.units + 1) // 2
        wanted = self.config.sslf_frozen if self.config.sslf_frozen is not None else half
        return min(wanted, self.units)


class KD(Method):
    """Hinton KD at a fixed T: CE + lambda T^2 KL from a fresh student."""

    name, distils = "kd", True

    def losses(self, logits, teacher_logits, labels, step):
        return aflkd_losses(logits, teacher_logits, labels, self.temperature_for(step), self.config.kd_weight)

    def temperature_for(self, step: int):
        return self.config.temperature


class CTKD(KD):
    """Curriculum temperature KD: a learnable T whose gradient is reversed with a cosine-ramped strength."""

    name = "ctkd"
    rule = "reversal"

    def __init__(self, config):
        super().__init__(config)
        self.temperature = LearnableTemperature(config.temperature, config.t_min, config.t_max, self.rule)

    def param_groups(self) -> list[dict]:
        return [{"params": [self.temperature.value], "lr": self.config.t_lr, "weight_decay": 0.0}]

    def temperature_for(self, step: int):
        if self.temperature.rule == "reversal":
            self.temperature.scale = cosine_ramp(step, self.config.steps)
        return self.temperature()

    def t_value(self) -> float:
        return self.temperature.item()

    def after_step(self) -> None:
        self.temperature.project()


class AFLKD(CTKD):
    """AFLKD: shared blocks from the cloud, learnable T (``t_rule``), Eq. 17 freezing from T each epoch."""

    name, copies_shared_blocks = "aflkd", True

    def __init__(self, config):
        self.rule = config.t_rule
        super().__init__(config)

    def frozen_units(self) -> int:
        if self.config.fixed_frozen is not None:
            return min(max(self.config.fixed_frozen, 0), self.units)
        return frozen_count(self.temperature.item(), self.units, self.config.t_min, self.config.t_max)


METHOD_CLASSES = {cls.name: cls for cls in (Method, SSLF, AFLKD, KD, CTKD)}


def make_method(config) -> Method:
    """The method object of ``config.method`` (an :class:`kd.trainer.EdgeConfig`)."""
    return METHOD_CLASSES[config.method](config)
