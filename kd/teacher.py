"""Train the cloud (teacher) net: resumable, checkpointed every epoch, fast on a CPU.

Speed on CPU comes from channels-last tensors, augmentation done on whole
batches of tensors (random crop with 4-pixel padding, horizontal flip for CIFAR)
instead of per-image PIL transforms, and a one-cycle schedule that reaches the
target in few epochs.  ``init`` starts from saved weights instead of random ones
(a warm restart: a second, gentler one-cycle on an already-trained net, with a
fresh optimiser), which is how a teacher a few tenths short of its target is
finished without paying for a longer run from scratch.  ``swa_epochs`` makes the
last epochs stochastic weight averaging (Izmailov et al., 2018): a constant
``swa_lr`` instead of the one-cycle tail, and the weights *and* BatchNorm
statistics at the end of each of those epochs averaged with equal weight
(``torch.optim.swa_utils.AveragedModel(use_buffers=True)``); OUT then holds the
average.  The buffers are averaged rather than recomputed with ``update_bn``
because recomputing them cost accuracy here: the 67.95% CIFAR-100 teacher fell to
66.56% with its statistics recomputed over augmented training batches of 500
(66.55% with batches of 128, the training batch) and to 66.02% over plain ones.
The state (model, average, optimiser, schedule, epoch, history) is written
atomically after every epoch, and the shuffling order of epoch ``e`` depends
only on ``(seed, e)`` and the dropout RNG state is saved too, so a run
cut off and resumed continues bit for bit (at the same thread count: another
count changes the order of float sums, so a resumed run then differs in the last
bits, though it continues the same schedule).
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from models import cloud_net, load_weights, save_atomic
from runtime.errors import UsageError

from .datasets import ImageArrays
from .device import autocast, device_name, grad_scaler
from .schedule import one_cycle

__all__ = ["TeacherConfig", "to_tensor", "augment", "evaluate", "train_teacher", "average_teachers", "step_throughput"]

CL = torch.channels_last


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

    def __post_init__(self):  # checked on construction, so the CLI refuses before loading any data
        if not 0 <= self.swa_epochs <= self.epochs:
            raise UsageError(f"--swa-epochs must be between 0 and --epochs ({self.epochs}), got {self.swa_epochs}")
        if self.swa_epochs and not self.swa_lr > 0:
            raise UsageError(f"--swa-lr must be > 0, got {self.swa_lr}")


def to_tensor(images: np.ndarray, data: ImageArrays, size: int = 32) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> normalised float ``(N, C, size, size)`` (zero-padded if smaller)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x = (x - mean) / std
    pad = size - x.shape[2]
    if pad > 0:  # Fashion-MNIST 28x28 -> 32x32
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return x.contiguous(memory_format=CL)


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool = True, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and optional horizontal flip, for a whole batch at once."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
    idx_n = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        out[mask] = out[mask].flip(2)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=CL)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` (eval mode, on its own device) on all of ``x`` (kept on the CPU)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch):
        with autocast(device):
            out = model(x[i : i + batch].to(device, non_blocking=True))
        correct += (out.argmax(1).cpu() == y[i : i + batch]).sum().item()
    return correct / len(x)


def _sgd(model: nn.Module, config: TeacherConfig) -> torch.optim.SGD:
    """The recipe's optimiser, one definition for training and its benchmark."""
    return torch.optim.SGD(model.parameters(), lr=config.max_lr, momentum=0.9, nesterov=True,
                           weight_decay=config.weight_decay)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                x: torch.Tensor, y: torch.Tensor, scaler: Optional[torch.amp.GradScaler] = None) -> torch.Tensor:
    """One SGD step on one batch; shared by training and its benchmark so they time the same work.

    On CUDA the forward pass runs under autocast and the loss in float32; ``scaler``
    scales float16 losses (see :mod:`kd.device`).
    """
    device = x.device
    with autocast(device):
        out = model(x)
    loss = loss_fn(out.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss


def train_teacher(
    data: ImageArrays,
    out: str,
    config: TeacherConfig = TeacherConfig(),
    progress: bool = True,
    limit_batches: Optional[int] = None,
    stop_after: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> dict:
    """Train (or resume) the cloud net on ``data``'s training split; return the final state summary.

    ``out`` gets the model weights; ``out + '.state'`` the resumable state (both
    load on either device: tensors are read onto the CPU, then moved).  Images are
    augmented on the CPU (the same batches on every device) and moved to ``device``.
    ``limit_batches`` (tests) stops each epoch early; ``stop_after`` stops after that
    many epochs in all, as if the session had been cut off.
    """
    state_path = out + ".state"
    torch.manual_seed(config.seed)
    model = cloud_net(data.channels, config.size, data.classes)
    if config.init:
        load_weights(model, config.init, f"--init must be a cloud net trained on {data.name}")
    device = torch.device("cpu") if device is None else device
    model = model.to(device=device, memory_format=CL)
    steps_per_epoch = math.ceil(len(data.x_train) / config.batch)
    if limit_batches:
        steps_per_epoch = min(steps_per_epoch, limit_batches)
    optimizer = _sgd(model, config)
    cycle_epochs = config.epochs - config.swa_epochs  # one-cycle first, then averaging at a constant rate
    schedule = one_cycle(optimizer, config.max_lr, cycle_epochs * steps_per_epoch, pct_start=0.25) if cycle_epochs else None
    averaged = AveragedModel(model, use_buffers=True) if config.swa_epochs else None
    scaler = grad_scaler(device)
    epoch, history = 0, []
    if os.path.exists(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("dataset", data.name) != data.name:  # states from before the field: not checked
            raise UsageError(f"{state_path} is a {state['dataset']} run, not {data.name}; "
                             "pass another --out, or delete it to start over")
        saved = {**asdict(TeacherConfig()), "init": "", **state["config"]}  # states from before a field existed
        if asdict(config) != saved:
            raise UsageError(f"{state_path} was made with {state['config']}, not {asdict(config)}; "
                             "resume with the same options or delete it to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, history = state["epoch"], state["history"]
        torch.set_rng_state(state["torch_rng"])  # dropout draws continue where they stopped
        if device.type == "cuda" and state.get("cuda_rng") is not None:  # dropout on the GPU draws from its RNG
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    x_train, y_train = to_tensor(data.x_train, data, config.size), torch.from_numpy(data.y_train)
    x_test, y_test = to_tensor(data.x_test, data, config.size), torch.from_numpy(data.y_test)
    flip = True  # horizontal flips keep the class for CIFAR and for Fashion-MNIST's garments
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    while epoch < config.epochs and (stop_after is None or epoch < stop_after):
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(x_train), generator=generator)
        averaging = epoch >= cycle_epochs
        if averaging:
            for group in optimizer.param_groups:
                group["lr"] = config.swa_lr
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"{data.name} epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False)
        for step in bar:
            idx = order[step * config.batch : (step + 1) * config.batch]
            xb = augment(x_train[idx], generator, flip=flip).to(device, non_blocking=True)
            loss = _train_step(model, optimizer, loss_fn, xb, y_train[idx].to(device, non_blocking=True), scaler)
            if not averaging:
                schedule.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
        elapsed = time.perf_counter() - start
        accuracy = evaluate(model, x_test, y_test)
        epoch += 1
        record = {"epoch": epoch, "train_loss": loss_sum / seen, "test_acc": accuracy,
                  "seconds": elapsed, "images_per_s": seen / elapsed, "device": device_name(device)}
        kept = model
        if averaging:  # OUT gets the average; its accuracy is the run's, the last iterate's is kept beside it
            averaged.update_parameters(model)
            kept = averaged.module
            record.update(sgd_test_acc=accuracy, test_acc=evaluate(kept, x_test, y_test),
                          averaged=int(averaged.n_averaged))
        history.append(record)
        swa_note = (f" (average of {record['averaged']}; last iterate {accuracy:.2%})" if averaging else "")
        print(f"{data.name} epoch {epoch}/{config.epochs}: loss {loss_sum / seen:.4f}, "
              f"test acc {record['test_acc']:.2%}{swa_note}, {seen / elapsed:.0f} img/s", flush=True)
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict() if schedule is not None else None,
                     "averaged": averaged.state_dict() if averaged is not None else None,
                     "epoch": epoch, "history": history,
                     "torch_rng": torch.get_rng_state(), "dataset": data.name,
                     "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "config": asdict(config)}, state_path)
        save_atomic({k: v.cpu() for k, v in kept.state_dict().items()}, out)  # plain CPU tensors, any device loads them
    return {"dataset": data.name, "epochs": epoch, "test_acc": history[-1]["test_acc"] if history else float("nan"),
            "history": history, "device": device_name(device)}


def average_teachers(data: ImageArrays, paths: list[str], out: str, size: int = 32,
                     device: Optional[torch.device] = None) -> float:
    """Average saved cloud nets (weights and BatchNorm statistics, equal weight) into ``out``; return its test accuracy.

    Stochastic weight averaging with a cyclical schedule (Izmailov et al., 2018)
    averages the weights at the end of each cycle; the ends of a chain of warm
    restarts (``train cloud --init``) are exactly such points, so averaging them
    needs no further training.  The files must be nets of one basin (one chain):
    nets trained from different random starts have their units in another
    order, so their average is not expected to work.
    """
    if len(paths) < 2:
        raise UsageError(f"give at least two weights files to average, got {len(paths)}")
    model = cloud_net(data.channels, size, data.classes)
    averaged = None
    for path in paths:
        load_weights(model, path, f"every file averaged must be a cloud net trained on {data.name}")
        if averaged is None:
            averaged = AveragedModel(model, use_buffers=True)
        averaged.update_parameters(model)
    net = averaged.module.to(memory_format=CL)
    save_atomic(net.state_dict(), out)  # from the CPU: the file is the same whatever device tests it
    net = net.to(device or torch.device("cpu"))
    accuracy = evaluate(net, to_tensor(data.x_test, data, size), torch.from_numpy(data.y_test))
    return accuracy


def step_throughput(model: nn.Module, shape: tuple[int, int, int], classes: int, batch: int = 128,
                    steps: int = 15, warmup: int = 3, compile: bool = False) -> dict:
    """Images per second of one teacher-training step (forward, backward, SGD), median of ``steps``.

    The recipe of :func:`train_teacher` on random data, so thread counts, batch
    sizes and ``torch.compile`` can be compared before committing hours to a run.
    ``warmup_s`` is the untimed first steps (compiling, when asked, happens there).
    """
    model = model.to(memory_format=CL).train()
    forward = torch.compile(model) if compile else model
    recipe = TeacherConfig()
    optimizer = _sgd(model, recipe)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=generator).contiguous(memory_format=CL)
    y = torch.randint(0, classes, (batch,), generator=generator)

    def step() -> float:
        start = time.perf_counter()
        _train_step(forward, optimizer, loss_fn, x, y)
        return time.perf_counter() - start

    warmup_s = sum(step() for _ in range(warmup))
    times = sorted(step() for _ in range(steps))
    median = times[len(times) // 2]
    return {"batch": batch, "threads": torch.get_num_threads(), "compile": compile, "warmup_s": warmup_s,
            "median_s": median, "images_per_s": batch / median}


SELECTED_BY_NONE = "none: the command's last epoch, the test split read once after training"


def record_teacher(csv_path: str, dataset: str, test_acc: float, epochs: Optional[int], command: str,
                   device: str = "", selected_by: str = SELECTED_BY_NONE) -> None:
    """Add or replace the row for ``dataset`` in ``results/teachers.csv`` (``epochs`` None: left blank).

    ``device`` says what made the row (rows from before the column existed keep it blank);
    ``selected_by`` how the checkpoint was chosen (a command's own output involves no choice)."""
    path = Path(csv_path)
    rows = []
    if path.exists():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["dataset"] != dataset]
    rows.append({"dataset": dataset, "test_acc": f"{test_acc:.4f}", "epochs": "" if epochs is None else str(epochs),
                 "command": command, "device": device, "selected_by": selected_by})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["dataset", "test_acc", "epochs", "command", "device", "selected_by"],
                                restval="")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["dataset"]))
