"""One training loop for every edge method and every teacher source.

Methods differ only in how the student starts, what is frozen and which losses
are summed (:mod:`kd.methods`); teacher logits come from a
:class:`kd.teacher_source.TeacherSource` (a local teacher, precomputed logits,
or logits streamed from a cloud rank).  The loop never tests a method's name
or where logits come from.

The teacher is always in eval mode under ``no_grad``; the optimiser sees only
student parameters (and T).  Frozen units run under ``no_grad`` and in eval
mode, so they cost no backward pass and their BatchNorm statistics stay put.
Schedules are in optimiser steps, not epochs: 500 images are only a handful of
batches per epoch.  Batch ``s`` depends only on ``(seed, s)``
(:class:`kd.batches.BatchStream`), so a cloud rank can rebuild it, and the trainer
hands batch s+1 to its teacher source as batch s's backward begins (its logits
travel during that backward and the next forward: :mod:`kd.teacher_source`).  Images are
made on the CPU and moved to ``device``; on CUDA the forward pass runs under
autocast (:mod:`kd.device`), losses in float32.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from runtime.progress import progress_bar

from models import edge_net
from runtime.errors import UsageError

from .batches import BatchStream
from .config import METHODS, EdgeConfig
from .datasets import ImageArrays
from .device import autocast, grad_scaler
from .freezing import freeze_first, shared_units
from .methods import make_method
from .schedule import one_cycle
from .teacher import evaluate, to_tensor
from .teacher_source import LocalTeacher, TeacherSource

__all__ = ["METHODS", "EdgeConfig", "train_edge"]

CL = torch.channels_last


@dataclass
class EdgeResult:
    test_acc: float
    seconds: float
    history: list = field(default_factory=list)  # per epoch: step, T, frozen, epoch seconds
    model: Optional[nn.Module] = None
    val_acc: Optional[float] = None  # on the validation slice, when one was given


def _student(config: EdgeConfig, data: ImageArrays) -> nn.Sequential:
    """A fresh student, its weights seeded by ``config.seed``."""
    torch.manual_seed(config.seed)
    return edge_net(config.net, data.channels, 32, data.classes)


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
    teacher: Optional[nn.Module] = None,
    source: Optional[TeacherSource] = None,
    eval_batch: int = 500,
    progress: bool = False,
    device: Optional[torch.device] = None,
    student: Optional[nn.Sequential] = None,
    views=None,
    val_idx: Optional[np.ndarray] = None,
) -> EdgeResult:
    """Train student ``config.net`` on ``data.x_train[train_idx]``; accuracy on the full test split.

    Teacher logits come from ``source``, or from ``teacher`` run in this process
    (wrapped in a :class:`LocalTeacher`).  ``student`` continues training a given
    student instead of starting one as the method says (incremental updates).
    ``device`` trains there (default: the CPU); the source's logits are moved to it.
    ``views`` (a :class:`kd.views.ViewTable`) shows each image as one of its fixed
    views; the source is then indexed by ``row * K + view`` (see :mod:`kd.views`).
    ``val_idx`` (training-split indices, disjoint from ``train_idx``) also measures
    accuracy there, for choices that must not look at the test split.
    """
    device = torch.device("cpu") if device is None else device
    method = make_method(config).to(device)
    if source is None and teacher is not None:
        source = LocalTeacher(teacher)
    if method.distils and source is None:
        raise UsageError(f"method '{config.method}' needs a cloud teacher (--teacher)")
    if source is not None and source.classes is not None and source.classes != data.classes:
        raise UsageError(f"the teacher has {source.classes} classes but {data.name} has {data.classes}; "
                         f"give a teacher trained on {data.name}")
    if student is None:
        student = _student(config, data)
        method.start_student(student, source.weights if source is not None else None)
    student = student.to(device=device, memory_format=CL)
    names = [name for name, _ in student.named_children()]
    units = shared_units(student, config.net, method.unit_kind())
    method.units = len(units)

    x_train = to_tensor(data.x_train[train_idx], data)
    y_train = torch.from_numpy(data.y_train[train_idx])
    extra = method.param_groups()
    groups = [{"params": list(student.parameters())}] + extra
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    schedule = one_cycle(optimizer, [config.lr] + [g["lr"] for g in extra], config.steps, pct_start=0.2)
    scaler = grad_scaler(device)
    if views is None:
        batches = BatchStream(x_train, config.batch, config.seed)
    else:
        from .views import ViewBatchStream

        batches = ViewBatchStream(x_train, train_idx, views, config.batch, config.seed)
    history, step, start = [], 0, time.perf_counter()
    ahead = None  # (step, rows, images) of a batch whose logits were already asked for
    bar = progress_bar(total=config.steps, desc=f"{config.method} edge net {config.net}", unit="step", disable=not progress)
    try:
        while step < config.steps:
            n = method.frozen_units()
            student.train()
            freeze_first(student, units, n)
            prefix = names.index(units[n - 1][-1]) + 1 if n else 0
            epoch_start, epoch = time.perf_counter(), batches.epoch(step)
            while step < config.steps and batches.epoch(step) == epoch:
                if ahead is not None and ahead[0] == step:
                    rows, xb = ahead[1], ahead[2]
                else:
                    rows = batches.rows(step)
                    xb = batches.images(step, rows)
                    if method.distils:
                        source.start(step, batches.keys(step, rows), xb)
                yb = y_train[rows].to(device)
                if method.distils:
                    source.forward(step)
                with autocast(device):
                    logits = _forward(student, xb.to(device, non_blocking=True), prefix)
                teacher_logits = source.logits(step).to(device) if method.distils else None
                ahead = None
                if method.distils and step + 1 < config.steps:  # batch s+1's logits are asked for now, so their
                    nxt = batches.rows(step + 1)                # transfer overlaps this backward pass and the next
                    ahead = (step + 1, nxt, batches.images(step + 1, nxt))  # forward (the round model's Comm chain)
                    source.start(step + 1, batches.keys(step + 1, nxt), ahead[2])
                losses = method.losses(logits.float(), teacher_logits, yb, step)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(sum(losses.values())).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                method.after_step()
                step += 1
                bar.update()
            bar.set_postfix(T=f"{method.t_value():.2f}", frozen=n)
            history.append({"step": step, "frozen": n, "T": method.t_value(),
                            "epoch_seconds": time.perf_counter() - epoch_start})
    finally:
        bar.close()
        if source is not None:
            source.close()
    x_test, y_test = to_tensor(data.x_test, data), torch.from_numpy(data.y_test)
    accuracy = evaluate(student, x_test, y_test, eval_batch)
    val_acc = None
    if val_idx is not None and len(val_idx):
        val_acc = evaluate(student, to_tensor(data.x_train[val_idx], data), torch.from_numpy(data.y_train[val_idx]),
                           eval_batch)
    return EdgeResult(accuracy, time.perf_counter() - start, history, student, val_acc)
