"""The accuracy grid (AFLKD Table 2/3, Fig. 7): nets x subset sizes x methods x seeds, resumable.

Every finished cell is appended to a CSV at once (``dataset,net,size,method,seed,
test_acc,seconds,final_T,final_frozen,device``); a rerun skips cells already there, so a
cut-off session loses at most the cell in progress.  (A CSV from before the
``device`` column gets it, blank for its old rows, when a rerun adds a cell.)  From the CSV come a
markdown table laid out like the paper's Table 2 (rows: method and net, columns:
training-set size, mean over seeds) and a plot like Fig. 7.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from runtime.progress import progress_bar

from runtime.errors import UsageError

from .datasets import ImageArrays, balanced_subset
from .grid_report import markdown_table, plot_accuracy
from .trainer import EdgeConfig, train_edge

__all__ = ["FIELDS", "MODES", "GridOptions", "file_digest", "check_settings", "chains_agree", "chain_of",
           "missing_cells", "run_grid",
           "read_results", "markdown_table", "plot_accuracy", "epoch_time_by_frozen"]

FIELDS = ["dataset", "net", "size", "method", "seed", "mode", "test_acc", "val_acc", "steps", "epochs", "train_images",
          "seconds", "final_T", "final_frozen", "device"]


def read_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _add_missing_columns(path: str) -> None:
    """Rewrite (atomically) a results CSV whose header lacks some of :data:`FIELDS`; new columns blank."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or set(FIELDS) <= set(reader.fieldnames):
            return
        rows = list(reader)

    def write(out):
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=FIELDS, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        out.write(text.getvalue().encode())

    from models.checkpoint import write_atomic

    write_atomic(path, write)


def _key(row) -> tuple:
    return (row["dataset"], int(row["net"]), int(row["size"]), row["method"], int(row["seed"]),
            row.get("mode") or "static")


def _settings(base: EdgeConfig, options: Optional["GridOptions"] = None) -> dict:
    """What every cell of one results file shares (all but the cell's own method, net and seed).

    With an epoch budget the fixed ``steps`` is not used, so it is not kept.
    """
    options = options or GridOptions()
    kept = {k: v for k, v in asdict(base).items() if k not in ("method", "net", "seed")}
    if options.epochs is not None:
        kept.pop("steps")
    return {**kept, **options.settings()}


def file_digest(path: str) -> str:
    """First 16 hex digits of the SHA-256 of a file: names a teacher checkpoint by content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):  # hashlib.file_digest needs Python 3.11
            digest.update(chunk)
    return digest.hexdigest()[:16]


def chains_agree(kept: Iterable[int], wanted: Iterable[int]) -> bool:
    """Whether an incremental grid run through sizes ``wanted`` may add cells to one run through ``kept``.

    A cell of size s trained from the students of every smaller size in its chain, so
    two runs agree only when one chain is the start of the other: sizes 500, 2000 and
    500, 1000 do not (a later run through 500, 1000, 2000 would find a 2000 cell that
    never saw the 1000 student).
    """
    kept, wanted = sorted(set(kept)), sorted(set(wanted))
    short, long_ = (kept, wanted) if len(kept) <= len(wanted) else (wanted, kept)
    return long_[: len(short)] == short


def check_settings(csv_path: str, base: EdgeConfig, teacher_sha256: str = "",
                   options: Optional["GridOptions"] = None, chain: Optional[Iterable[int]] = None) -> Optional[dict]:
    """Refuse to mix cells trained with other settings into ``csv_path``.

    Finished cells are skipped by key (dataset, net, size, method, seed), so a rerun
    with, say, another ``--steps`` or another teacher checkpoint into the same file
    would silently keep the old cells.  The settings are kept beside the CSV
    (``.settings.json``) and compared.  The teacher is named by the digest of its
    file; a grid that has used no teacher yet (baseline cells only) takes the first
    one it is given.  Returns the settings to write with the first cell when the
    CSV holds no cell yet (nothing is written before a cell is finished), else None.
    ``chain`` (the sizes of an incremental grid) is kept as ``chain_sizes`` and must
    agree with the kept one (:func:`chains_agree`); the longer of the two is kept.
    """
    path = Path(csv_path).with_suffix(".settings.json")
    wanted = {**_settings(base, options), "teacher_sha256": teacher_sha256}
    if chain is not None:
        wanted["chain_sizes"] = sorted(set(chain))
    if not read_results(csv_path):
        return wanted  # no cell yet: settings left by a run that finished none do not bind
    if path.exists():
        kept = json.loads(path.read_text())
        old_chain, new_chain = kept.get("chain_sizes"), wanted.get("chain_sizes")
        if old_chain and new_chain and not chains_agree(old_chain, new_chain):
            raise UsageError(f"{csv_path} holds incremental chains through sizes {','.join(map(str, old_chain))}; "
                             f"--sizes {','.join(map(str, new_chain))} would chain them otherwise (one must be the "
                             f"start of the other); pass --out with another folder")
        update = {}
        if new_chain and (not old_chain or len(new_chain) > len(old_chain)):
            update["chain_sizes"] = new_chain  # a CSV from before chains were recorded takes this run's
        if teacher_sha256 and not kept.get("teacher_sha256", ""):
            update["teacher_sha256"] = teacher_sha256
        own = ("chain_sizes", "teacher_sha256")  # compared above, by their own rules
        keys = ([k for k in wanted if k not in own]
                + [k for k in kept if k not in wanted and k not in own and k != "steps"])
        changed = {k: (kept.get(k), wanted.get(k)) for k in keys if kept.get(k) != wanted.get(k)}
        old_teacher = kept.get("teacher_sha256", "")
        if teacher_sha256 and old_teacher and old_teacher != teacher_sha256:
            changed["teacher_sha256"] = (old_teacher, teacher_sha256)
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise UsageError(f"{csv_path} holds cells trained with other settings ({what}); "
                             f"pass --out with another folder, or delete that CSV to start over")
        if update:
            path.write_text(json.dumps({**kept, **update}, indent=1) + "\n")
    return None  # (a CSV from before settings were recorded has nothing to compare with)


@dataclass(frozen=True)
class GridOptions:
    """How a grid trains its cells, beyond the :class:`EdgeConfig` they share.

    ``epochs`` (when set) replaces the fixed ``steps`` of the config: a cell of N
    images runs ``max(min_steps, ceil(epochs * N // batch))`` steps, so a 5000-image
    cell gets ten times the steps of a 500-image one instead of the same 200.
    ``views`` > 0 shows every image as one of that many fixed views and computes
    the teacher's logits once per view (:mod:`kd.views`); 0 augments afresh every
    step and runs the teacher every step.  ``val_size`` > 0 holds out a fixed,
    class-balanced validation slice of the training split (no edge subset draws
    from it) and records each cell's accuracy there.  ``mode``: ``static`` trains
    each size from its start; ``incremental`` trains size s from the student of
    the previous size, on all s images (the accumulated stream); ``incremental-new``
    likewise on the new images only; both carry T (so Eq. 17's n) over.
    ``workers`` > 1 trains cells in that many processes of ``threads`` threads each.
    """

    epochs: Optional[float] = None
    min_steps: int = 0
    views: int = 0
    val_size: int = 0
    mode: str = "static"
    workers: int = 1
    threads: Optional[int] = None

    def steps_for(self, base: EdgeConfig, images: int) -> int:
        if self.epochs is None:
            return base.steps
        per_epoch = max(1, images // min(base.batch, images))
        return max(self.min_steps, math.ceil(self.epochs * per_epoch))

    def settings(self) -> dict:
        """The options that change what a cell computes, as kept in ``.settings.json`` (only when not the default,
        so grids made before they existed still compare equal)."""
        out = {}
        if self.epochs is not None:
            out.update(epochs=self.epochs, min_steps=self.min_steps)
        if self.views:
            out["views"] = self.views
        if self.val_size:
            out["val_size"] = self.val_size
        return out


MODES = ("static", "incremental", "incremental-new")


def chain_of(options: GridOptions, sizes: Iterable[int]) -> Optional[list[int]]:
    """The sizes an incremental grid chains through (None for static grids: their cells stand alone)."""
    return None if options.mode == "static" else sorted(set(sizes))


def missing_cells(dataset: str, nets: Iterable[int], sizes: Iterable[int], methods: Iterable[str],
                  seeds: Iterable[int], csv_path: str, mode: str = "static") -> list[tuple]:
    """The grid's cells (net, size, method, seed) not yet in ``csv_path`` for ``mode``, in run order."""
    done = {_key(r) for r in read_results(csv_path)}
    return [(n, s, m, seed) for n in nets for s in sizes for m in methods for seed in seeds
            if (dataset, n, s, m, seed, mode) not in done]


def _tasks(cells: list[tuple], mode: str) -> list[tuple]:
    """Units of work for the workers: one cell each, or (incremental) one chain of sizes per (net, method, seed)."""
    if mode == "static":
        return [("cell", cell) for cell in cells]
    chains = defaultdict(list)
    for net, size, method, seed in cells:
        chains[(net, method, seed)].append(size)
    return [("chain", (key, sorted(sizes))) for key, sizes in chains.items()]


class _Context:
    """What every cell of one grid needs: the data, the teacher (or its logits per view), the options."""

    def __init__(self, data, teacher_state, base, options, chain_dir, device_name_, val_idx, sizes, device="cpu"):
        self.data, self.base, self.options, self.chain_dir = data, base, options, chain_dir
        self.sizes = sizes  # every size of the grid: an incremental chain passes through them all
        self.teacher_state, self.val_idx, self.view_cache = teacher_state, val_idx, None
        self.device_name = device_name_  # what the CSV records: "cpu" or "cuda:<GPU name>"
        self.device_spec = str(device)  # what torch.device takes: "cpu", "cuda", "cuda:0" (not the GPU's name)
        self._teacher = None
        self.table = None
        if options.views:
            from .views import ViewTable

            self.table = ViewTable(len(data.y_train), options.views)

    def device(self):
        import torch

        return torch.device(self.device_spec)

    def teacher(self):
        if self._teacher is None and self.teacher_state is not None:
            from models import cloud_net

            model = cloud_net(self.data.channels, 32, self.data.classes)
            model.load_state_dict(self.teacher_state)
            self._teacher = model.eval().to(self.device())
        return self._teacher

    def source(self, train_idx):
        """The teacher source of a cell: its views' logits from the cache, or the teacher run every step."""
        if self.teacher_state is None:
            return None, None
        if self.table is None:
            return None, self.teacher()
        import torch

        from .teacher_source import PrecomputedLogits

        rows = self.view_cache.rows_of(train_idx)  # (N, K, classes)
        return PrecomputedLogits(torch.from_numpy(rows.reshape(-1, rows.shape[-1])), self.teacher_state), None

    def subset(self, size: int, seed: int):
        return balanced_subset(self.data.y_train, size, self.data.classes, seed=seed, exclude=self.val_idx)


def _train(ctx: _Context, method: str, net: int, seed: int, train_idx, student=None, temperature=None):
    config = replace(ctx.base, method=method, net=net, seed=seed, steps=ctx.options.steps_for(ctx.base, len(train_idx)))
    if temperature is not None:
        config = replace(config, temperature=min(max(temperature, config.t_min), config.t_max))
    source, teacher = ctx.source(train_idx)
    result = train_edge(config, ctx.data, train_idx, teacher=teacher, source=source, device=ctx.device(),
                        student=student, views=ctx.table, val_idx=ctx.val_idx)
    return config, result


def _row(ctx: _Context, net, size, method, seed, config, result, train_images) -> dict:
    last = result.history[-1] if result.history else {}
    return {"dataset": ctx.data.name, "net": net, "size": size, "method": method, "seed": seed,
            "mode": ctx.options.mode, "test_acc": f"{result.test_acc:.4f}",
            "val_acc": "" if result.val_acc is None else f"{result.val_acc:.4f}",
            "steps": config.steps, "epochs": f"{config.steps * min(config.batch, train_images) / train_images:.1f}",
            "train_images": train_images, "seconds": f"{result.seconds:.1f}",
            "final_T": f"{last.get('T', float('nan')):.3f}", "final_frozen": last.get("frozen", 0),
            "device": ctx.device_name}


def _units(ctx: _Context, task):
    """What the workers run for one task, in order: the cell itself, or (a chain) one link per size.

    A link trains one size of a chain from the student its previous size saved, so each size's row is
    written (and can be committed) as soon as that size is done, not when its whole chain is."""
    kind, spec = task
    if kind == "cell":
        yield task
        return
    key, wanted = spec
    previous = None
    for size in [s for s in sorted(set(wanted) | set(ctx.sizes)) if s <= max(wanted)]:
        yield ("link", (key, size, previous, size in wanted))
        previous = size


def _run_task(ctx: _Context, unit) -> list[dict]:
    """Train one unit of :func:`_units`; returns its rows (none for a link whose size the grid does not ask)."""
    kind, spec = unit
    if kind == "cell":
        net, size, method, seed = spec
        idx = ctx.subset(size, seed)
        config, result = _train(ctx, method, net, seed, idx)
        return [_row(ctx, net, size, method, seed, config, result, len(idx))]
    row = _run_link(ctx, *spec)
    return [row] if row is not None else []


def _saved_link(ctx: _Context, key, size: int) -> Path:
    net, method, seed = key
    return ctx.chain_dir / f"{ctx.data.name}-{ctx.options.mode}-net{net}-{method}-seed{seed}-{size}.pt"


def _run_link(ctx: _Context, key, size: int, previous: Optional[int], wanted: bool) -> Optional[dict]:
    """One size of a chain, from the student (and T) the previous size saved; the student is saved in turn, so
    a rerun resumes after the last size done (its row too, if it was cut off before the row reached the CSV)."""
    import torch

    from models import edge_net
    from models.checkpoint import save_atomic

    net, method, seed = key
    saved = _saved_link(ctx, key, size)
    if saved.exists():  # trained in an earlier run
        state = torch.load(saved, map_location="cpu", weights_only=True)
        return json.loads(state["row"]) if wanted else None
    student, temperature, before = None, None, np.empty(0, dtype=np.int64)
    if previous is not None:
        state = torch.load(_saved_link(ctx, key, previous), map_location="cpu", weights_only=True)
        student = edge_net(net, ctx.data.channels, 32, ctx.data.classes)
        student.load_state_dict(state["model"])
        temperature, before = state["T"], ctx.subset(previous, seed)
    idx = ctx.subset(size, seed)
    train_idx = np.setdiff1d(idx, before) if ctx.options.mode == "incremental-new" and len(before) else idx
    config, result = _train(ctx, method, net, seed, train_idx, student=student, temperature=temperature)
    temperature = result.history[-1]["T"] if method in ("aflkd", "ctkd") and result.history else None
    row = _row(ctx, net, size, method, seed, config, result, len(train_idx))
    ctx.chain_dir.mkdir(parents=True, exist_ok=True)
    save_atomic({"model": result.model.cpu().state_dict(), "T": temperature, "row": json.dumps(row)}, str(saved))
    return row if wanted else None


_WORKER: Optional[_Context] = None


def _init_worker(ctx: _Context, threads: int) -> None:
    import torch

    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = ctx


def _worker_task(task):
    return _run_task(_WORKER, task)


class ViewLogitCache:
    """The teacher's logits of every view of the training images a grid uses, computed once.

    Kept as ``OUT/teacher-views-DIGEST-kK.npz`` (training-split indices and
    ``(N, K, classes)`` float32 logits) when the teacher is named by a file digest,
    so a resumed grid and later grids with the same teacher reuse it.
    """

    def __init__(self, idx: np.ndarray, logits: np.ndarray):
        self.idx, self.logits = idx, logits  # idx sorted: a lookup is a binary search

    def rows_of(self, train_idx) -> np.ndarray:
        return self.logits[np.searchsorted(self.idx, train_idx)]

    @classmethod
    def build(cls, teacher, data, needed: np.ndarray, table, path: Optional[Path], progress: bool):
        from .teacher import to_tensor
        from .views import view_logits

        idx, logits = np.empty(0, dtype=np.int64), np.empty((0, table.views, data.classes), dtype=np.float32)
        if path is not None and path.exists():
            kept = np.load(path)
            idx, logits = kept["idx"], kept["logits"]
        missing = np.setdiff1d(needed, idx)
        if len(missing):
            with progress_bar(total=len(missing), desc=f"teacher logits, {table.views} views", unit="image",
                      disable=not progress) as bar:
                new = view_logits(teacher, to_tensor(data.x_train[missing], data), missing, table, progress=bar)
            idx = np.concatenate([idx, missing])
            logits = np.concatenate([logits, new.numpy()])
            order = np.argsort(idx)
            idx, logits = idx[order], logits[order]
            if path is not None:
                from models.checkpoint import write_atomic

                write_atomic(str(path), lambda fh: np.savez(fh, idx=idx, logits=logits))
        return cls(idx, logits)


def run_grid(
    data: ImageArrays,
    teacher,
    nets: Iterable[int],
    sizes: Iterable[int],
    methods: Iterable[str],
    seeds: Iterable[int],
    csv_path: str,
    base: EdgeConfig,
    progress: bool = True,
    teacher_sha256: str = "",
    device=None,
    options: Optional[GridOptions] = None,
) -> list[dict]:
    """Run every missing cell and append it to ``csv_path``; return all rows.

    ``device`` (a ``torch.device``; default the CPU) trains each student there and is
    recorded in the ``device`` column.  ``options`` (:class:`GridOptions`) sets the
    budget rule, views, validation slice, mode and worker processes.

    ``teacher_sha256`` (see :func:`file_digest`) is recorded with the settings.
    The CSV header and the settings are written with the first finished cell, so
    a run that fails in its first cell leaves no header-only CSV behind.
    """
    import torch

    from .datasets import validation_indices
    from .device import device_name

    options = options or GridOptions()
    nets, sizes, methods, seeds = list(nets), sorted(sizes), list(methods), list(seeds)
    if options.mode not in MODES:
        raise UsageError(f"unknown mode '{options.mode}'; choose from {', '.join(MODES)}")
    device = torch.device("cpu") if device is None else device
    pending_settings = check_settings(csv_path, base, teacher_sha256, options, chain_of(options, sizes))
    cells = missing_cells(data.name, nets, sizes, methods, seeds, csv_path, options.mode)
    if not cells:
        return read_results(csv_path)
    val_idx = validation_indices(data.y_train, data.classes, options.val_size)
    uses_teacher = any(m != "baseline" for m in methods)
    if uses_teacher and teacher is None:
        raise UsageError(f"methods {', '.join(m for m in methods if m != 'baseline')} need a cloud teacher (--teacher)")
    state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()} if uses_teacher else None
    cache = None
    ctx = _Context(data, state, base, options, Path(csv_path).parent / "chains", device_name(device), val_idx, sizes,
                   device)
    if options.views and uses_teacher:
        needed = np.unique(np.concatenate([ctx.subset(max(sizes), seed) for seed in seeds]))
        path = (Path(csv_path).parent / f"teacher-views-{teacher_sha256}-k{options.views}.npz") if teacher_sha256 else None
        cache = ViewLogitCache.build(teacher.eval().to(device), data, needed, ctx.table, path, progress)
        ctx.view_cache = cache
    tasks = _tasks(cells, options.mode)
    writer = _RowWriter(csv_path, pending_settings)
    try:
        with progress_bar(total=len(cells), desc=f"{data.name} grid", unit="cell", disable=not progress) as bar:
            if options.workers <= 1:
                for task in tasks:
                    for unit in _units(ctx, task):
                        for row in _run_task(ctx, unit):
                            writer.write(row)
                            bar.update()
            else:
                _run_parallel(ctx, tasks, options, writer, bar)
    finally:
        writer.close()
    return read_results(csv_path)


def _run_parallel(ctx, tasks, options, writer, bar) -> None:
    """Tasks in ``options.workers`` spawned processes (fresh interpreters: no OpenMP state shared over fork).

    Each worker takes one task at a time and, for a chain, its links in order: the parent submits a chain's
    next link when the last one returns (writing its row first), so chains finish one after another, as
    with one worker, rather than all advancing together."""
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = options.threads or max(1, (os.cpu_count() or 1) // options.workers)
    waiting = deque(_units(ctx, task) for task in tasks)
    with ProcessPoolExecutor(options.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(ctx, threads)) as pool:
        running: dict = {}  # future -> the units of its task still to run

        def submit_next(units) -> bool:
            unit = next(units, None)
            if unit is not None:
                running[pool.submit(_worker_task, unit)] = units
            return unit is not None

        try:
            while running or waiting:
                while waiting and len(running) < options.workers:
                    submit_next(waiting.popleft())
                if not running:
                    continue
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    units = running.pop(future)
                    for row in future.result():
                        writer.write(row)
                        bar.update()
                    submit_next(units)
        except BaseException:
            for f in running:
                f.cancel()
            raise


class _RowWriter:
    """Appends finished rows to the CSV at once (header and settings with the first), flushed per row."""

    def __init__(self, csv_path: str, pending_settings: Optional[dict]):
        self.path, self.pending = csv_path, pending_settings
        self.fh = self.writer = None

    def write(self, row: dict) -> None:
        if self.fh is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            fresh = self.pending is not None  # no cell yet (perhaps a header-only file): start it over
            if not fresh:
                _add_missing_columns(self.path)
            self.fh = open(self.path, "w" if fresh else "a", newline="")
            self.writer = csv.DictWriter(self.fh, fieldnames=FIELDS)
            if fresh:
                Path(self.path).with_suffix(".settings.json").write_text(json.dumps(self.pending, indent=1) + "\n")
                self.writer.writeheader()
        self.writer.writerow(row)
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def epoch_time_by_frozen(data: ImageArrays, teacher, net: int, size: int, steps: int, base: EdgeConfig,
                         unit: str = "conv", device=None) -> list[dict]:
    """AFLKD epochs with n = 0..m frozen units forced: median epoch seconds against n.

    Frozen units run without autograd, so an epoch should get cheaper as n grows.
    """
    from statistics import median

    import torch

    from models import edge_net

    from .device import device_name
    from .freezing import shared_units

    device = torch.device("cpu") if device is None else device
    units = len(shared_units(edge_net(net, data.channels, 32, data.classes), net, unit))
    idx = balanced_subset(data.y_train, size, data.classes, seed=base.seed)
    rows = []
    for n in range(units + 1):
        config = replace(base, method="aflkd", net=net, steps=steps, unit=unit, fixed_frozen=n)
        result = train_edge(config, data, idx, teacher, device=device)
        times = [h["epoch_seconds"] for h in result.history[1:]] or [h["epoch_seconds"] for h in result.history]
        rows.append({"net": net, "frozen": n, "units": units, "epoch_seconds": median(times),
                     "images": size, "test_acc": result.test_acc, "device": device_name(device)})
    return rows
