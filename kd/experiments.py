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
import os
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterable, Optional

from tqdm import tqdm

from .datasets import ImageArrays, balanced_subset
from .trainer import EdgeConfig, train_edge

__all__ = ["FIELDS", "file_digest", "check_settings", "missing_cells", "run_grid", "read_results", "markdown_table", "plot_accuracy", "epoch_time_by_frozen"]

FIELDS = ["dataset", "net", "size", "method", "seed", "test_acc", "seconds", "final_T", "final_frozen", "device"]


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
    return (row["dataset"], int(row["net"]), int(row["size"]), row["method"], int(row["seed"]))


def _settings(base: EdgeConfig) -> dict:
    """What every cell of one results file shares (all but the cell's own method, net and seed)."""
    return {k: v for k, v in asdict(base).items() if k not in ("method", "net", "seed")}


def file_digest(path: str) -> str:
    """First 16 hex digits of the SHA-256 of a file: names a teacher checkpoint by content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):  # hashlib.file_digest needs Python 3.11
            digest.update(chunk)
    return digest.hexdigest()[:16]


def check_settings(csv_path: str, base: EdgeConfig, teacher_sha256: str = "") -> Optional[dict]:
    """Refuse to mix cells trained with other settings into ``csv_path``.

    Finished cells are skipped by key (dataset, net, size, method, seed), so a rerun
    with, say, another ``--steps`` or another teacher checkpoint into the same file
    would silently keep the old cells.  The settings are kept beside the CSV
    (``.settings.json``) and compared.  The teacher is named by the digest of its
    file; a grid that has used no teacher yet (baseline cells only) takes the first
    one it is given.  Returns the settings to write with the first cell when the
    CSV holds no cell yet (nothing is written before a cell is finished), else None.
    """
    from runtime.errors import UsageError

    path = Path(csv_path).with_suffix(".settings.json")
    wanted = {**_settings(base), "teacher_sha256": teacher_sha256}
    if not read_results(csv_path):
        return wanted  # no cell yet: settings left by a run that finished none do not bind
    if path.exists():
        kept = json.loads(path.read_text())
        changed = {k: (kept.get(k), v) for k, v in wanted.items() if k != "teacher_sha256" and kept.get(k) != v}
        old_teacher = kept.get("teacher_sha256", "")
        if teacher_sha256 and old_teacher and old_teacher != teacher_sha256:
            changed["teacher_sha256"] = (old_teacher, teacher_sha256)
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise UsageError(f"{csv_path} holds cells trained with other settings ({what}); "
                             f"pass --out with another folder, or delete that CSV to start over")
        if teacher_sha256 and not old_teacher:
            path.write_text(json.dumps({**kept, "teacher_sha256": teacher_sha256}, indent=1) + "\n")
    return None  # (a CSV from before settings were recorded has nothing to compare with)


def missing_cells(dataset: str, nets: Iterable[int], sizes: Iterable[int], methods: Iterable[str],
                  seeds: Iterable[int], csv_path: str) -> list[tuple]:
    """The grid's cells (net, size, method, seed) not yet in ``csv_path``, in run order."""
    done = {_key(r) for r in read_results(csv_path)}
    return [(n, s, m, seed) for n in nets for s in sizes for m in methods for seed in seeds
            if (dataset, n, s, m, seed) not in done]


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
) -> list[dict]:
    """Run every missing cell and append it to ``csv_path``; return all rows.

    ``device`` (a ``torch.device``; default the CPU) trains each student there and is
    recorded in the ``device`` column.

    ``teacher_sha256`` (see :func:`file_digest`) is recorded with the settings.
    The CSV header and the settings are written with the first finished cell, so
    a run that fails in its first cell leaves no header-only CSV behind.
    """
    import torch

    from .device import device_name

    device = torch.device("cpu") if device is None else device
    pending_settings = check_settings(csv_path, base, teacher_sha256)
    cells = missing_cells(data.name, nets, sizes, methods, seeds, csv_path)
    fh = writer = None
    try:
        for net, size, method, seed in tqdm(cells, desc=f"{data.name} grid", disable=not progress):
            idx = balanced_subset(data.y_train, size, data.classes, seed=seed)
            config = replace(base, method=method, net=net, seed=seed)
            result = train_edge(config, data, idx, teacher, device=device)
            last = result.history[-1] if result.history else {}
            if fh is None:
                Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
                fresh = pending_settings is not None  # no cell yet (perhaps a header-only file): start it over
                if not fresh:
                    _add_missing_columns(csv_path)
                fh = open(csv_path, "w" if fresh else "a", newline="")
                writer = csv.DictWriter(fh, fieldnames=FIELDS)
                if fresh:
                    Path(csv_path).with_suffix(".settings.json").write_text(json.dumps(pending_settings, indent=1)
                                                                            + "\n")
                    writer.writeheader()
            writer.writerow({"dataset": data.name, "net": net, "size": size, "method": method, "seed": seed,
                             "test_acc": f"{result.test_acc:.4f}", "seconds": f"{result.seconds:.1f}",
                             "final_T": f"{last.get('T', float('nan')):.3f}", "final_frozen": last.get("frozen", 0),
                             "device": device_name(device)})
            fh.flush()
    finally:
        if fh is not None:
            fh.close()
    return read_results(csv_path)


def _means(rows: list[dict]) -> dict:
    acc = defaultdict(list)
    for r in rows:
        acc[(r["dataset"], r["method"], int(r["net"]), int(r["size"]))].append(float(r["test_acc"]))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def markdown_table(rows: list[dict], dataset: str) -> str:
    """Rows ``Method (Edge network k)``, columns sizes; test accuracy in %, mean over seeds."""
    means = _means([r for r in rows if r["dataset"] == dataset])
    sizes = sorted({k[3] for k in means})
    lines = [f"| {dataset} | " + " | ".join(str(s) for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    methods = sorted({k[1] for k in means}, key=lambda m: ["baseline", "sslf", "kd", "ctkd", "aflkd"].index(m)
                     if m in ("baseline", "sslf", "kd", "ctkd", "aflkd") else 9)
    for method in methods:
        for net in sorted({k[2] for k in means if k[1] == method}):
            cells = [f"{100 * means[(dataset, method, net, s)]:.1f}" if (dataset, method, net, s) in means else "–"
                     for s in sizes]
            lines.append(f"| {method.upper() if method != 'baseline' else 'Baseline'} (Edge network{net}) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(rows: list[dict], dataset: str, path: str, title: Optional[str] = None) -> None:
    """Accuracy against training-set size, one line per method and net (like Fig. 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = _means([r for r in rows if r["dataset"] == dataset])
    fig, ax = plt.subplots(figsize=(9, 5))
    styles = {1: ":", 2: "--", 3: "-"}  # line style says the net, colour says the method
    colours = {"baseline": "tab:gray", "sslf": "tab:blue", "kd": "tab:green", "ctkd": "tab:purple",
               "aflkd": "tab:red"}
    order = [m for m in colours if m in {k[1] for k in means}] + sorted({k[1] for k in means} - set(colours))
    for method in order:
        for net in sorted({k[2] for k in means if k[1] == method}):
            points = sorted((k[3], v) for k, v in means.items() if k[1] == method and k[2] == net)
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], styles.get(net, "-"), marker="o",
                    color=colours.get(method), label=f"{method} (edge net {net})")
    ax.set_xlabel("training images")
    ax.set_ylabel("test accuracy (%), full test split")
    ax.set_title(title or f"{dataset}: edge accuracy against training-set size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
