"""Distillation losses as pure functions (AFLKD Eq. 6 and 10; Hinton KD)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "aflkd_losses"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature) -> torch.Tensor:
    """``T^2 * KL(p_teacher(T) || p_student(T))``, averaged over the batch (Eq. 10).

    ``temperature`` may be a float or a 0-d tensor that requires grad (learnable T);
    the teacher's logits carry no gradient.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1).mean()
    return t * t * kl


def aflkd_losses(student_logits, teacher_logits, labels, temperature, weight: float) -> dict[str, torch.Tensor]:
    """Eq. 6 as named parts: ``ce`` on the labels and ``kd = weight * T^2 * KL``; the trainer sums them."""
    return {
        "ce": F.cross_entropy(student_logits, labels),
        "kd": weight * kd_loss(student_logits, teacher_logits, temperature),
    }
