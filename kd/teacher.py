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

``val`` > 0 trains on the training split less the fixed validation slice of
``val`` images (:func:`kd.datasets.validation_indices`, the slice the student
grids hold out with ``--val``) and records the accuracy there (``val_acc``) every
epoch, so checkpoints can be chosen without reading the test split
(:func:`select_teacher`).  On CUDA the (normalised) training images stay on the
GPU and each batch is cropped and flipped there, from offsets drawn on the CPU
from the same generator in the same order, so the batches are the CPU's.
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from runtime.progress import progress_bar

from models import cloud_net, load_weights, save_atomic
from runtime.errors import UsageError

from .config import TeacherConfig
from .datasets import ImageArrays, validation_indices
from .device import autocast, device_name, grad_scaler, tune
from .schedule import one_cycle

__all__ = ["TeacherConfig", "to_tensor", "augment", "evaluate", "train_teacher", "average_teachers", "step_throughput",
           "split_training", "evaluate_weights", "select_teacher", "record_teacher", "selected_by_val"]

CL = torch.channels_last


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
    return crop_flip(x, *draw_augment(len(x), generator, flip, pad), pad=pad)


def draw_augment(n: int, generator: torch.Generator, flip: bool = True, pad: int = 4):
    """The random part of :func:`augment` for ``n`` images: crop offsets ``dy, dx`` and the flip mask (None: no flip).

    Drawn in :func:`augment`'s order (``dy``, ``dx``, then the flips), so drawing
    them ahead (on the CPU) and cropping elsewhere (on a GPU) gives the same images.
    """
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    mask = torch.rand(n, generator=generator) < 0.5 if flip else None
    return dy, dx, mask


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, mask: Optional[torch.Tensor],
              pad: int = 4, where: bool = False) -> torch.Tensor:
    """Crop each image of ``x`` at ``(dy, dx)`` in its zero-padded copy and flip where ``mask``, on ``x``'s device.

    ``where`` selects the flipped images with ``torch.where`` instead of boolean
    indexing (the same values; on a GPU it needs no wait for the mask's count).
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # (n, w)
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    if mask is not None and where:
        out = torch.where(mask.view(n, 1, 1, 1), out.flip(2), out)
    elif mask is not None:
        out[mask] = out[mask].flip(2)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=CL)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` (eval mode, on its own device) on all of ``x`` (kept on the CPU)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch):
        with torch.inference_mode(), autocast(device):
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


RESIDENT = ("cuda",)
"""Device types whose training images are copied there once and cropped there (see the module doc)."""


def split_training(data: ImageArrays, val: int) -> tuple[Optional[np.ndarray], np.ndarray]:
    """``(training indices, validation indices)`` of ``data``'s training split for a slice of ``val`` images.

    ``val`` 0: ``(None, [])``, i.e. the whole training split, untouched.  Otherwise the
    fixed slice of :func:`kd.datasets.validation_indices` and every other index.
    """
    if val == 0:
        return None, np.empty(0, dtype=np.int64)
    if not data.classes <= val < len(data.y_train):
        raise UsageError(f"--val must be 0 or between {data.classes} (one image per class) and "
                         f"{len(data.y_train) - 1} (less than the training split), got {val}")
    val_idx = validation_indices(data.y_train, data.classes, val)
    return np.setdiff1d(np.arange(len(data.y_train)), val_idx), val_idx


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
    load on either device: tensors are read onto the CPU, then moved).  Augmentation
    is drawn on the CPU (the same batches on every device); on CUDA the images are
    cropped there (see the module doc).  ``config.val`` holds out the validation
    slice and reports ``val_acc`` on it.  ``limit_batches`` (tests) stops each epoch
    early; ``stop_after`` stops after that many epochs in all, as if the session had
    been cut off.
    """
    state_path = out + ".state"
    torch.manual_seed(config.seed)
    model = cloud_net(data.channels, config.size, data.classes)
    if config.init:
        load_weights(model, config.init, f"--init must be a cloud net trained on {data.name}")
    device = torch.device("cpu") if device is None else device
    tune(device)
    model = model.to(device=device, memory_format=CL)
    train_idx, val_idx = split_training(data, config.val)
    steps_per_epoch = math.ceil((len(data.x_train) if train_idx is None else len(train_idx)) / config.batch)
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
                             "pass another --save, or delete it to start over")
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
    if train_idx is None:
        x_train, y_train = to_tensor(data.x_train, data, config.size), torch.from_numpy(data.y_train)
    else:
        x_train, y_train = to_tensor(data.x_train[train_idx], data, config.size), torch.from_numpy(data.y_train[train_idx])
    x_test, y_test = to_tensor(data.x_test, data, config.size), torch.from_numpy(data.y_test)
    x_val = to_tensor(data.x_train[val_idx], data, config.size) if len(val_idx) else None
    y_val = torch.from_numpy(data.y_train[val_idx]) if len(val_idx) else None
    resident = device.type in RESIDENT
    if resident:  # images copied once; evaluation reads them there too
        x_train, y_train, x_test = x_train.to(device), y_train.to(device), x_test.to(device)
        x_val = x_val.to(device) if x_val is not None else None
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
        if resident:  # the epoch's crops and flips, drawn as augment() would draw them, moved over at once
            batches = [order[s * config.batch : (s + 1) * config.batch] for s in range(steps_per_epoch)]
            draws = [draw_augment(len(b), generator, flip) for b in batches]
            order_dev = torch.cat(batches).to(device)
            dy, dx = (torch.cat([d[i] for d in draws]).to(device) for i in (0, 1))
            mask = torch.cat([d[2] for d in draws]).to(device) if flip else None
            loss_acc = torch.zeros((), dtype=torch.float64, device=device)  # no host sync per step
        bar = progress_bar(range(steps_per_epoch), desc=f"{data.name} epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False)
        for step in bar:
            idx = order[step * config.batch : (step + 1) * config.batch]
            if resident:
                lo, hi = seen, seen + len(idx)
                rows = order_dev[lo:hi]
                xb = crop_flip(x_train[rows], dy[lo:hi], dx[lo:hi], mask[lo:hi] if flip else None, where=True)
                loss = _train_step(model, optimizer, loss_fn, xb, y_train[rows], scaler)
            else:
                xb = augment(x_train[idx], generator, flip=flip).to(device, non_blocking=True)
                loss = _train_step(model, optimizer, loss_fn, xb, y_train[idx].to(device, non_blocking=True), scaler)
            if not averaging:
                schedule.step()
            seen += len(idx)
            if resident:
                loss_acc += loss.detach().double() * len(idx)
                bar.set_postfix(img_s=f"{seen / (time.perf_counter() - start):.0f}")
            else:
                loss_sum += loss.item() * len(idx)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
        if resident:
            loss_sum = loss_acc.item()
        elapsed = time.perf_counter() - start
        accuracy = evaluate(model, x_test, y_test)
        val_accuracy = evaluate(model, x_val, y_val) if x_val is not None else None
        epoch += 1
        record = {"epoch": epoch, "train_loss": loss_sum / seen, "test_acc": accuracy,
                  "seconds": elapsed, "images_per_s": seen / elapsed, "device": device_name(device)}
        if val_accuracy is not None:
            record["val_acc"] = val_accuracy
        kept = model
        if averaging:  # OUT gets the average; its accuracy is the run's, the last iterate's is kept beside it
            averaged.update_parameters(model)
            kept = averaged.module
            record.update(sgd_test_acc=accuracy, test_acc=evaluate(kept, x_test, y_test),
                          averaged=int(averaged.n_averaged))
            if val_accuracy is not None:
                record.update(sgd_val_acc=val_accuracy, val_acc=evaluate(kept, x_val, y_val))
        history.append(record)
        swa_note = (f" (average of {record['averaged']}; last iterate {accuracy:.2%}"
                    + (f", val {val_accuracy:.2%}" if val_accuracy is not None else "") + ")" if averaging else "")
        val_note = f", val acc {record['val_acc']:.2%}" if val_accuracy is not None else ""
        print(f"{data.name} epoch {epoch}/{config.epochs}: loss {loss_sum / seen:.4f}, "
              f"test acc {record['test_acc']:.2%}{val_note}{swa_note}, {seen / elapsed:.0f} img/s", flush=True)
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
            "val": config.val, "val_acc": history[-1].get("val_acc") if history else None,
            "history": history, "device": device_name(device)}


def average_teachers(data: ImageArrays, paths: list[str], out: str, size: int = 32,
                     device: Optional[torch.device] = None, val: int = 0):
    """Average saved cloud nets (weights and BatchNorm statistics, equal weight) into ``out``; return its test accuracy.

    Stochastic weight averaging with a cyclical schedule (Izmailov et al., 2018)
    averages the weights at the end of each cycle; the ends of a chain of warm
    restarts (``train cloud --init``) are exactly such points, so averaging them
    needs no further training.  The files must be nets of one basin (one chain):
    nets trained from different random starts have their units in another
    order, so their average is not expected to work.  ``val`` > 0: returns
    ``(test accuracy, accuracy on the validation slice of val images)`` instead.
    """
    if len(paths) < 2:
        raise UsageError(f"give at least two weights files to average, got {len(paths)}")
    _, val_idx = split_training(data, val)  # refused before any work
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
    if not val:
        return accuracy
    return accuracy, evaluate(net, to_tensor(data.x_train[val_idx], data, size), torch.from_numpy(data.y_train[val_idx]))


def evaluate_weights(data: ImageArrays, path: str, split: str, val: int = 0, size: int = 32,
                     device: Optional[torch.device] = None) -> float:
    """Top-1 accuracy of the cloud net saved in ``path`` on ``split``: ``"val"`` (the validation slice of ``val``
    training images) or ``"test"`` (the full test split)."""
    model = load_weights(cloud_net(data.channels, size, data.classes), path,
                         f"every candidate must be a cloud net trained on {data.name}")
    model = model.to(device=device or torch.device("cpu"), memory_format=CL)
    if split == "test":
        return evaluate(model, to_tensor(data.x_test, data, size), torch.from_numpy(data.y_test))
    _, val_idx = split_training(data, val)
    if not len(val_idx):
        raise UsageError("--val must be > 0: the candidates are compared on the validation slice")
    return evaluate(model, to_tensor(data.x_train[val_idx], data, size), torch.from_numpy(data.y_train[val_idx]))


def _trained_val(path: str) -> Optional[int]:
    """The ``--val`` a ``train cloud`` output was trained with, read from its ``.state`` (None: no state kept)."""
    state_path = path + ".state"
    if not os.path.exists(state_path):
        return None
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    return int(state.get("config", {}).get("val", 0))


def select_teacher(data: ImageArrays, paths: list[str], out: str, val: int,
                   device: Optional[torch.device] = None) -> dict:
    """Copy the candidate with the best accuracy on the validation slice of ``val`` images to ``out``.

    Only the validation slice is read to choose (the first of equals wins); the
    chosen file is then evaluated once on the test split.  A candidate whose
    ``.state`` says it trained on another slice (another ``--val``, e.g. 0: on the
    slice itself) is refused: its validation accuracy would not be held out.
    Returns ``{"val_acc": {path: acc}, "chosen": path, "test_acc", "chosen_val_acc"}``.
    """
    import shutil

    from models.checkpoint import write_atomic

    if not paths:
        raise UsageError("give at least one candidate weights file")
    if len(set(paths)) != len(paths):
        raise UsageError("a candidate is given twice")
    if os.path.abspath(out) in {os.path.abspath(p) for p in paths}:
        raise UsageError(f"--save {out} is one of the candidates; give another file")
    for path in paths:
        trained = _trained_val(path)
        if trained is not None and trained != val:
            raise UsageError(f"{path} was trained with --val {trained}, not {val}: the validation slice of {val} "
                             "images is not held out from it")
    scores = {path: evaluate_weights(data, path, "val", val, device=device) for path in paths}
    chosen = max(paths, key=lambda p: scores[p])  # max keeps the first of equals
    with open(chosen, "rb") as src:
        write_atomic(out, lambda fh: shutil.copyfileobj(src, fh))
    test_acc = evaluate_weights(data, out, "test", device=device)
    return {"val_acc": scores, "chosen": chosen, "chosen_val_acc": scores[chosen], "test_acc": test_acc}


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


def selected_by_val(val: int) -> str:
    """``selected_by`` of a command's own output (no choice) when it trained without the validation slice."""
    return (f"none: the command's own output, trained on the training split less the validation slice of {val} "
            f"(val_acc there); the test split read once after training")


def record_teacher(csv_path: str, dataset: str, test_acc: float, epochs: Optional[int], command: str,
                   device: str = "", selected_by: str = SELECTED_BY_NONE, val_acc: Optional[float] = None) -> None:
    """Add or replace the row for ``dataset`` in the teachers CSV ``csv_path`` (``--results``; the shipped
    teachers' rows are in ``results/teachers.csv``); ``epochs`` None: left blank.

    ``device`` says what made the row (rows from before the column existed keep it blank);
    ``selected_by`` how the checkpoint was chosen (a command's own output involves no choice);
    ``val_acc`` the accuracy on the validation slice (blank: none held out, and for older rows)."""
    path = Path(csv_path)
    rows = []
    if path.exists():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["dataset"] != dataset]
    rows.append({"dataset": dataset, "test_acc": f"{test_acc:.4f}", "epochs": "" if epochs is None else str(epochs),
                 "command": command, "device": device, "selected_by": selected_by,
                 "val_acc": "" if val_acc is None else f"{val_acc:.4f}"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["dataset", "test_acc", "epochs", "command", "device", "selected_by",
                                                "val_acc"], restval="")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["dataset"]))
