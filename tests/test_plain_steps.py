"""CPU runs build no CUDA loss scaler (torch.amp.GradScaler("cuda", ...) needs torch >= 2.3; setup.py allows 2.1)."""
from __future__ import annotations

import numpy as np
import torch

from kd import device as kd_device
from kd.config import EdgeConfig
from kd.trainer import train_edge
from tests.test_teacher import tiny


def test_a_cpu_training_run_never_builds_a_grad_scaler(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("GradScaler built on a CPU run")

    monkeypatch.setattr(torch.amp, "GradScaler", refuse)
    data = tiny(n=40)
    result = train_edge(EdgeConfig("baseline", 1, steps=3, batch=8), data, np.arange(40))
    assert np.isfinite(result.test_acc)
    steps = kd_device.grad_scaler(torch.device("cpu"))
    assert not steps.is_enabled() and steps.state_dict() == {}
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.5)
    steps.scale((w ** 2).sum()).backward()  # the plain step: w - 0.5 * 2w = 0
    steps.step(opt)
    assert torch.equal(w.detach(), torch.zeros(2))
