"""The one-cycle learning-rate schedule of teacher and student training."""
from __future__ import annotations

import torch

__all__ = ["one_cycle"]


def one_cycle(optimizer: torch.optim.Optimizer, max_lr, total_steps: int, pct_start: float,
              div_factor: float = 10, final_div_factor: float = 100) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's ``OneCycleLR``, safe for every ``total_steps >= 1``.

    ``OneCycleLR`` ends its warm-up at step ``pct_start * total_steps - 1``; when
    that is exactly 0 (5 steps at ``pct_start`` 0.2, 4 at 0.25) its first
    ``step()`` divides 0 by 0 (``ZeroDivisionError``: ``aflkd train edge --steps 5``
    died so).  Then the warm-up is made two steps long (the first at the initial
    rate, the second at the peak); every other step count keeps ``pct_start``, so
    schedules of earlier runs are unchanged.
    """
    if pct_start * total_steps == 1:
        pct_start = min(1.0, 2 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=total_steps, pct_start=pct_start,
                                               div_factor=div_factor, final_div_factor=final_div_factor)
