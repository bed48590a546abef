"""EdgeConfig refuses temperatures that would make the losses NaN or divide by zero (one line, at once)."""
from __future__ import annotations

import math

import pytest
import torch

from kd.config import EdgeConfig
from runtime.errors import UsageError


@pytest.mark.parametrize("method,kwargs,match", [
    ("kd", {"temperature": 0.0}, "T must be a finite number > 0"),
    ("kd", {"temperature": -1.0}, "T must be a finite number > 0"),
    ("kd", {"temperature": math.nan}, "T must be a finite number > 0"),
    ("aflkd", {"t_min": 2.0, "t_max": 2.0}, "0 < t_min < t_max"),
    ("aflkd", {"t_min": 0.0}, "0 < t_min < t_max"),
    ("aflkd", {"temperature": 12.0}, r"initial T=12 lies outside"),
])
def test_bad_temperatures_are_refused(method, kwargs, match):
    with pytest.raises(UsageError, match=match):
        EdgeConfig(method, 1, **kwargs)


def test_what_is_refused_would_have_broken_the_loss_and_sensible_values_pass():
    """Not arbitrary: at T = 0 the softened KD loss is NaN (computed by torch directly)."""
    student, teacher, t = torch.randn(4, 10), torch.randn(4, 10), torch.tensor(0.0)
    soft = torch.nn.functional.kl_div(torch.log_softmax(student / t, 1), torch.softmax(teacher / t, 1),
                                      reduction="batchmean")
    assert not torch.isfinite(soft)
    EdgeConfig("kd", 1, temperature=0.5)  # KD's fixed T need not lie in the learnable range
    EdgeConfig("aflkd", 1, temperature=1.0, t_min=1.0, t_max=10.0)
