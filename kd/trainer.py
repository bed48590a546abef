"""One trainer for every edge method: baseline, SSLF, AFLKD, KD, CTKD.

Methods differ only in how the student starts, what is frozen and which losses
are summed -- never in the loop (mdistiller's habit):

============  ==================  ==========================  ==============================
method        student starts      frozen                      loss
============  ==================  ==========================  ==============================
baseline      from scratch        nothing                     CE
sslf          cloud's k blocks    first ``sslf_frozen`` units  CE
aflkd         cloud's k blocks    first n units, Eq. 17/epoch  CE + lambda T^2 KL, learnable T
kd            from scratch        nothing                     CE + lambda T^2 KL, fixed T
ctkd          from scratch        nothing                     CE + lambda T^2 KL, T by reversal
============  ==================  ==========================  ==============================

The teacher is always in eval mode under ``no_grad``; the optimiser sees only
student parameters (and T).  Frozen units run under ``no_grad`` and in eval
mode, so they cost no backward pass and their BatchNorm statistics stay put.
Schedules are in optimiser steps, not epochs: 500 images are only a handful of
batches per epoch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from models import edge_net
from runtime.errors import UsageError

from .datasets import ImageArrays
from .freezing import freeze_first, frozen_count, shared_units
from .losses import aflkd_losses
from .schedule import one_cycle
from .teacher import augment, evaluate, to_tensor
from .temperature import LearnableTemperature, cosine_ramp

__all__ = ["METHODS", "EdgeConfig", "train_edge"]

METHODS = ("baseline", "sslf", "aflkd", "kd", "ctkd")
CL = torch.channels_last


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


@dataclass
class EdgeResult:
    test_acc: float
    seconds: float
    history: list = field(default_factory=list)  # per epoch: step, T, frozen, epoch seconds
    model: Optional[nn.Module] = None


def _student(config: EdgeConfig, data: ImageArrays, teacher: Optional[nn.Sequential]) -> nn.Sequential:
    torch.manual_seed(config.seed)
    student = edge_net(config.net, data.channels, 32, data.classes)
    if config.method in ("sslf", "aflkd"):
        if teacher is None:
            raise UsageError(f"method '{config.method}' needs a cloud teacher to copy the shared blocks from")
        shared = {k: v for k, v in teacher.state_dict().items() if k.split(".")[0] in dict(student.named_children())
                  and not k.startswith(("fc", "flatten"))}
        student.load_state_dict(shared, strict=False)
    return student.to(memory_format=CL)


def _forward(student: nn.Sequential, x: torch.Tensor, frozen_layers: int) -> torch.Tensor:
    """Frozen prefix without autograd (no backward pass through it), the rest with it."""
    if frozen_layers:
        with torch.no_grad():
            x = student[:frozen_layers](x)
    return student[frozen_layers:](x)


def train_edge(
    config: EdgeConfig,
    data: ImageArrays,
    train_idx: np.ndarray,
    teacher: Optional[nn.Sequential] = None,
    eval_batch: int = 500,
    progress: bool = False,
) -> EdgeResult:
    """Train student ``config.net`` on ``data.x_train[train_idx]``; accuracy on the full test split."""
    uses_kd = config.method in ("aflkd", "kd", "ctkd")
    if uses_kd and teacher is None:
        raise UsageError(f"method '{config.method}' needs a cloud teacher (--teacher)")
    student = _student(config, data, teacher)
    if teacher is not None:
        teacher = teacher.eval().to(memory_format=CL)
        for p in teacher.parameters():
            p.requires_grad_(False)
    # ``unit`` is what Eq. 17 counts (AFLKD); SSLF's fixed shallow part is always counted in convs,
    # so "half the shared convs" never becomes "all the shared blocks" under --unit block.
    units = shared_units(student, config.net, "conv" if config.method == "sslf" else config.unit)
    names = [name for name, _ in student.named_children()]

    temp = None
    if config.method in ("aflkd", "ctkd"):
        rule = config.t_rule if config.method == "aflkd" else "reversal"
        temp = LearnableTemperature(config.temperature, config.t_min, config.t_max, rule)

    half = (len(units) + 1) // 2  # SSLF default: half the shared convs
    sslf_frozen = min(config.sslf_frozen if config.sslf_frozen is not None else half, len(units))

    def frozen_units() -> int:
        if config.method == "sslf":
            return sslf_frozen
        if config.method == "aflkd":
            if config.fixed_frozen is not None:
                return min(max(config.fixed_frozen, 0), len(units))
            return frozen_count(temp.item(), len(units), config.t_min, config.t_max)
        return 0

    x_train = to_tensor(data.x_train[train_idx], data)
    y_train = torch.from_numpy(data.y_train[train_idx])
    params = [p for p in student.parameters()]
    groups = [{"params": params}]
    if temp is not None:
        groups.append({"params": [temp.value], "lr": config.t_lr, "weight_decay": 0.0})
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    schedule = one_cycle(optimizer, [config.lr] + ([config.t_lr] if temp is not None else []), config.steps,
                         pct_start=0.2)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(1, len(x_train) // config.batch)
    history, step, start = [], 0, time.perf_counter()
    bar = tqdm(total=config.steps, desc=f"{config.method} edge net {config.net}", unit="step", disable=not progress)
    while step < config.steps:
        n = frozen_units()
        student.train()
        freeze_first(student, units, n)
        prefix = names.index(units[n - 1][-1]) + 1 if n else 0
        epoch_start = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator)
        for b in range(steps_per_epoch):
            if step >= config.steps:
                break
            idx = order[b * config.batch : (b + 1) * config.batch]
            xb, yb = augment(x_train[idx], generator), y_train[idx]
            logits = _forward(student, xb, prefix)
            if uses_kd:
                with torch.no_grad():
                    teacher_logits = teacher(xb)
                if temp is not None:
                    if config.method == "ctkd" or config.t_rule == "reversal":
                        temp.scale = cosine_ramp(step, config.steps)
                    t = temp()
                else:
                    t = config.temperature
                losses = aflkd_losses(logits, teacher_logits, yb, t, config.kd_weight)
            else:
                losses = {"ce": F.cross_entropy(logits, yb)}
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
            schedule.step()
            if temp is not None:
                temp.project()
            step += 1
            bar.update()
        bar.set_postfix(T=f"{temp.item() if temp else config.temperature:.2f}", frozen=n)
        history.append({"step": step, "frozen": n, "T": temp.item() if temp else config.temperature,
                        "epoch_seconds": time.perf_counter() - epoch_start})
    bar.close()
    x_test, y_test = to_tensor(data.x_test, data), torch.from_numpy(data.y_test)
    accuracy = evaluate(student, x_test, y_test, eval_batch)
    return EdgeResult(accuracy, time.perf_counter() - start, history, student)
