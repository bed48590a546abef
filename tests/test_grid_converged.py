"""Grids that converge: fixed views with cached teacher logits, the validation slice, epoch budgets,
incremental chains, worker processes, and the mean ± sd report -- each against an independent computation."""
import csv
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from kd import experiments
from kd.datasets import balanced_subset, validation_indices
from kd.experiments import GridOptions, read_results, run_grid
from kd.grid_report import budget_comparison, markdown_table, ordering_report
from kd.teacher import to_tensor
from kd.teacher_source import PrecomputedLogits
from kd.trainer import EdgeConfig
from kd.views import ViewBatchStream, ViewTable, apply_views, view_logits
from models import cloud_net
from runtime.errors import UsageError
from tests.test_teacher import tiny


def _brute_view(image: np.ndarray, dy: int, dx: int, flip: bool, pad: int) -> np.ndarray:
    """Crop of a zero-padded (C, H, W) image, then a horizontal flip, by plain indexing."""
    c, h, w = image.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=image.dtype)
    padded[:, pad : pad + h, pad : pad + w] = image
    out = padded[:, dy : dy + h, dx : dx + w]
    return out[:, :, ::-1] if flip else out


@pytest.mark.parametrize("seed", range(5))
def test_views_are_the_crops_and_flips_they_name(seed):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((7, 3, 9, 11)).astype(np.float32))
    dy, dx = rng.integers(0, 9, 7), rng.integers(0, 9, 7)
    flip = rng.random(7) < 0.5
    out = apply_views(x, dy, dx, flip, pad=4)
    for i in range(7):
        assert np.array_equal(out[i].numpy(), _brute_view(x[i].numpy(), dy[i], dx[i], flip[i], 4))


def test_cached_view_logits_are_the_teachers_logits_of_the_students_images():
    """The point of the cache: for every batch, the looked-up logits equal the teacher run on that very batch."""
    data = tiny(n=60)
    teacher = cloud_net(3, 32, 3).eval()
    table = ViewTable(len(data.y_train), views=3)
    idx = np.array([3, 5, 8, 13, 21, 34, 40, 41, 50, 59])
    x = to_tensor(data.x_train[idx], data)
    source = PrecomputedLogits(view_logits(teacher, x, idx, table, batch=4).reshape(-1, 3))
    stream = ViewBatchStream(x, idx, table, batch=4, seed=1)
    seen = set()
    for step in range(12):
        rows = stream.rows(step)
        images = stream.images(step, rows)
        source.start(step, stream.keys(step, rows), images)
        with torch.no_grad():
            direct = teacher(images)
        assert torch.allclose(source.logits(step), direct, atol=1e-5)
        seen |= set(stream.keys(step, rows).tolist())
    assert len(seen) > len(idx)  # images were shown as more than one view


def test_validation_slice_is_balanced_fixed_and_never_trained_on():
    labels = np.repeat(np.arange(10), 600)[np.random.default_rng(0).permutation(6000)]
    val = validation_indices(labels, 10, 1000)
    assert np.array_equal(val, validation_indices(labels, 10, 1000))
    assert np.bincount(labels[val]).tolist() == [100] * 10
    for seed in range(3):
        small = balanced_subset(labels, 500, 10, seed=seed, exclude=val)
        large = balanced_subset(labels, 2000, 10, seed=seed, exclude=val)
        assert not set(large) & set(val) and set(small) <= set(large)
        assert np.bincount(labels[large]).tolist() == [200] * 10
    with pytest.raises(UsageError, match="less the validation slice"):
        balanced_subset(labels, 5500, 10, exclude=val)


def _grid(tmp_path, options, sizes=(30, 45), methods=("baseline", "aflkd"), seeds=(0,), name="acc.csv", data=None):
    data = data or tiny(n=90)
    base = EdgeConfig("baseline", 1, steps=2, batch=16)
    return run_grid(data, cloud_net(3, 32, 3).eval(), [1], list(sizes), list(methods), list(seeds),
                    str(tmp_path / name), base, progress=False, options=options, teacher_sha256="t" * 16)


def test_epoch_budget_scales_with_the_data_and_is_recorded(tmp_path):
    options = GridOptions(epochs=3, min_steps=4, views=2, val_size=15)
    rows = _grid(tmp_path, options)
    for r in rows:
        size = int(r["size"])
        assert int(r["steps"]) == max(4, math.ceil(3 * (size // 16)))  # 30 -> 4 (floor), 45 -> 6
        assert r["mode"] == "static" and r["val_acc"] != "" and int(r["train_images"]) == size
    with pytest.raises(UsageError, match="epochs 3 -> 6"):
        _grid(tmp_path, GridOptions(epochs=6, min_steps=4, views=2, val_size=15))
    with pytest.raises(UsageError, match="epochs 3 -> None"):
        _grid(tmp_path, GridOptions(views=2, val_size=15))  # a fixed --steps into an epochs folder


def test_incremental_chain_carries_the_student_and_resumes(tmp_path, monkeypatch):
    options = GridOptions(mode="incremental", views=2)
    rows = _grid(tmp_path, options, sizes=(30, 45, 60), methods=("aflkd",))
    assert [int(r["size"]) for r in rows] == [30, 45, 60]
    assert [int(r["train_images"]) for r in rows] == [30, 45, 60]
    # drop the last size and rerun: only it trains, starting from the saved 45-image student and its T
    path = tmp_path / "acc.csv"
    kept = rows[:2]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=experiments.FIELDS)
        writer.writeheader()
        writer.writerows(kept)
    for last in (tmp_path / "chains").glob("*-60.pt"):  # cut off while training the last size
        last.unlink()
    calls = []
    real = experiments.train_edge

    def spy(config, data, idx, **kwargs):
        calls.append((len(idx), kwargs["student"] is not None, config.temperature))
        return real(config, data, idx, **kwargs)

    monkeypatch.setattr(experiments, "train_edge", spy)
    again = _grid(tmp_path, options, sizes=(30, 45, 60), methods=("aflkd",))
    assert len(calls) == 1 and calls[0][:2] == (60, True)
    assert calls[0][2] == pytest.approx(float(rows[1]["final_T"]), abs=1e-3)  # T carried over
    assert [int(r["size"]) for r in again] == [30, 45, 60]


def test_incremental_new_trains_on_the_new_images_only(tmp_path):
    rows = _grid(tmp_path, GridOptions(mode="incremental-new"), sizes=(30, 45, 60), methods=("baseline",))
    assert [int(r["train_images"]) for r in rows] == [30, 15, 15]
    assert {r["mode"] for r in rows} == {"incremental-new"}


def test_worker_processes_train_the_same_students(tmp_path):
    torch.set_num_threads(1)
    options = GridOptions(views=2, val_size=15)
    one = _grid(tmp_path, options, name="one.csv")
    two = _grid(tmp_path, GridOptions(views=2, val_size=15, workers=2, threads=1), name="two.csv")
    key = lambda r: (r["size"], r["method"])  # noqa: E731
    assert [(key(r), r["test_acc"], r["val_acc"]) for r in sorted(one, key=key)] == \
           [(key(r), r["test_acc"], r["val_acc"]) for r in sorted(two, key=key)]


def _rows(cells):
    return [{"dataset": "cifar10", "net": str(net), "size": str(size), "method": method, "seed": str(seed),
             "test_acc": str(acc), "mode": "", "steps": "10"} for net, size, method, seed, acc in cells]


def test_report_means_sds_paper_figures_and_orderings():
    rows = _rows([(3, 500, "aflkd", 0, 0.60), (3, 500, "aflkd", 1, 0.62), (3, 500, "aflkd", 2, 0.64),
                  (3, 500, "sslf", 0, 0.61), (3, 500, "sslf", 1, 0.61), (3, 500, "sslf", 2, 0.61),
                  (3, 500, "baseline", 0, 0.70), (3, 500, "baseline", 1, 0.70), (3, 500, "baseline", 2, 0.70)])
    table = markdown_table(rows, "cifar10")
    assert "| AFLKD (Edge network3) | 62.0 ± 2.0 (53.9) |" in table  # sd of 60, 62, 64 is 2
    assert "| SSLF (Edge network3) | 61.0 ± 0.0 (51.3) |" in table
    report = ordering_report(rows, "cifar10")
    assert "| 3 | 500 | yes, +1.0 (within 1 sd) | **no**, -9.0 | ≥ (+8.1) |" in report


def test_budget_comparison_reports_the_largest_change():
    a = _rows([(1, 500, "aflkd", 0, 0.50), (1, 500, "baseline", 0, 0.40)])
    b = _rows([(1, 500, "aflkd", 0, 0.505), (1, 500, "baseline", 0, 0.43)])
    table, worst = budget_comparison(a, b, "cifar10")
    assert worst == pytest.approx(3.0)
    assert "| baseline (1) | 500 | 10 | 40.0 | 10 | 43.0 | +3.0 | +3.0 |" in table
    for r, v in zip(a + b, (0.52, 0.41, 0.52, 0.40)):  # with a validation slice it is judged there
        r["val_acc"] = str(v)
    table, worst = budget_comparison(a, b, "cifar10")
    assert worst == pytest.approx(1.0) and "| validation % |" in table
    assert "| baseline (1) | 500 | 10 | 41.0 | 10 | 40.0 | -1.0 | +3.0 |" in table


def test_teachers_csv_says_how_each_teacher_was_selected(tmp_path):
    from kd.teacher import SELECTED_BY_NONE, record_teacher

    path = tmp_path / "teachers.csv"
    record_teacher(str(path), "cifar10", 0.9, 18, "aflkd train cloud ...", selected_by="validation slice: epoch 17")
    record_teacher(str(path), "cifar100", 0.7, 30, "aflkd train cloud ...")
    rows = {r["dataset"]: r for r in csv.DictReader(open(path))}
    assert rows["cifar10"]["selected_by"] == "validation slice: epoch 17"
    assert rows["cifar100"]["selected_by"] == SELECTED_BY_NONE


def test_the_shipped_teachers_selection_is_stated():
    from pathlib import Path

    rows = list(csv.DictReader(open(Path(__file__).resolve().parents[1] / "results" / "teachers.csv")))
    assert {r["dataset"] for r in rows} == {"cifar10", "cifar100", "fashion-mnist"}
    assert all(r["selected_by"] for r in rows)


def test_each_size_of_a_chain_reaches_the_csv_before_the_next_size_trains(tmp_path, monkeypatch):
    """So a stop loses at most the size in flight: the CSV is read from disk at every training call."""
    seen = []
    real = experiments.train_edge

    def spy(config, data, idx, **kwargs):
        seen.append((len(idx), [int(r["size"]) for r in read_results(str(tmp_path / "acc.csv"))]))
        return real(config, data, idx, **kwargs)

    monkeypatch.setattr(experiments, "train_edge", spy)
    _grid(tmp_path, GridOptions(mode="incremental", views=2), sizes=(30, 45, 60), methods=("baseline",))
    assert seen == [(30, []), (45, [30]), (60, [30, 45])]


def test_worker_processes_run_each_chain_in_order_and_write_every_size(tmp_path):
    """Incremental chains over 2 worker processes, each chain's sizes as separate tasks: every size of every
    chain is written once, each chain's in size order, and every size left its student for the next.
    (Not compared with one process row for row: incremental chains repeat only to within noise, see
    results/converged/README.md, "Reproducibility".)"""
    torch.set_num_threads(1)
    rows = _grid(tmp_path, GridOptions(mode="incremental", views=2, val_size=15, workers=2, threads=1),
                 sizes=(30, 45, 60), seeds=(0, 1))
    chains = {}
    for r in rows:  # in the CSV's order
        chains.setdefault((r["method"], r["seed"]), []).append(int(r["size"]))
    assert chains == {(m, s): [30, 45, 60] for m in ("baseline", "aflkd") for s in ("0", "1")}
    saved = sorted(p.name for p in (tmp_path / "chains").glob("*.pt"))
    assert len(saved) == 12 and all(f"-{size}.pt" in " ".join(saved) for size in (30, 45, 60))


def test_a_chain_cut_off_before_its_rows_were_written_resumes_without_retraining(tmp_path, monkeypatch):
    options = GridOptions(mode="incremental", views=2)
    rows = _grid(tmp_path, options, sizes=(30, 45), methods=("aflkd",))
    (tmp_path / "acc.csv").unlink()  # the rows are lost, the chain's saved students are not
    monkeypatch.setattr(experiments, "train_edge", lambda *a, **k: pytest.fail("trained again"))
    again = _grid(tmp_path, options, sizes=(30, 45), methods=("aflkd",))
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in rows]


def test_converge_compares_only_its_own_cells(tmp_path, monkeypatch, capsys):
    """Regression: the budget folder also held other seeds and modes, and they were averaged in."""
    import kd.datasets
    from launch.cli import main
    from models import save_atomic

    from dataclasses import replace

    monkeypatch.setattr(kd.datasets, "load_dataset", lambda name, root, download=False: replace(tiny(n=90), name=name))
    teacher = tmp_path / "t.pt"
    save_atomic(cloud_net(3, 32, 3).state_dict(), str(teacher))
    common = ["--dataset", "cifar10", "--teacher", str(teacher), "--nets", "1", "--sizes", "30", "--methods",
              "baseline", "--epochs", "1", "--min-steps", "2", "--mode", "static", "--no-progress"]
    assert main(["experiment", "accuracy", *common, "--seeds", "1", "--out", str(tmp_path / "c" / "epochs-1")]) == 0
    first = tmp_path / "c" / "epochs-1" / "accuracy-cifar10.csv"
    first.write_text(re.sub(r",static,0\.\d+,", ",static,0.9900,", first.read_text()))  # seed 1: far from seed 0
    assert main(["experiment", "converge", *common, "--seeds", "0", "--out", str(tmp_path / "c")]) == 0
    rows = {(r["seed"]): r for r in read_results(str(tmp_path / "c" / "epochs-1" / "accuracy-cifar10.csv"))}
    doubled = read_results(str(tmp_path / "c" / "epochs-2" / "accuracy-cifar10.csv"))
    assert set(rows) == {"0", "1"} and len(doubled) == 1 and rows["1"]["test_acc"] == "0.9900"
    text = (tmp_path / "c" / "convergence-cifar10.md").read_text()
    seed0 = 100 * float(rows["0"]["test_acc"])
    row = next(line for line in text.splitlines() if line.startswith("| baseline (1) |"))
    assert row.split(" | ")[3] == f"{seed0:.1f}"  # the seed-0 cell alone, not the mean with seed 1


def _prefix(chain, size):
    return [s for s in chain if s <= size]


@given(st.sets(st.sampled_from([500, 1000, 1500, 2000, 2500, 3000]), min_size=1),
       st.sets(st.sampled_from([500, 1000, 1500, 2000, 2500, 3000]), min_size=1))
@settings(max_examples=200, deadline=None)
def test_chains_agree_when_every_cell_keeps_its_history(kept, wanted):
    """Brute force: one folder may hold both runs' cells when, in the chain through all their sizes, every cell of
    either run has the same smaller sizes before it as it had in its own run."""
    union = sorted(kept | wanted)
    coherent = all(_prefix(union, s) == _prefix(sorted(run), s) for run in (kept, wanted) for s in run)
    assert experiments.chains_agree(kept, wanted) == coherent


def test_an_incremental_grid_refuses_sizes_that_chain_its_cells_otherwise(tmp_path):
    options = GridOptions(mode="incremental", views=2)
    _grid(tmp_path, options, sizes=(30, 60), methods=("baseline",))
    with pytest.raises(UsageError, match="chains through sizes 30,60; --sizes 30,45,60"):
        _grid(tmp_path, options, sizes=(30, 45, 60), methods=("baseline",))
    _grid(tmp_path, options, sizes=(30, 60, 75), methods=("baseline",))  # a longer chain with the same start
    kept = (tmp_path / "acc.settings.json").read_text()
    assert '"chain_sizes": [\n  30,\n  60,\n  75\n ]' in kept
    _grid(tmp_path, options, sizes=(30,), methods=("baseline",))  # its start: nothing new, accepted


def test_tables_take_each_method_from_its_grid_and_refuse_a_cell_in_two(tmp_path, capsys):
    from launch.cli import main

    cells = [(n, s, m, seed, 0.5 + 0.01 * seed) for n in (1, 2) for s in (500, 1000, 1500, 2000, 2500, 3000)
             for m in ("baseline", "sslf", "aflkd") for seed in (0, 1, 2)]
    for folder, methods in (("e60", ("baseline", "sslf")), ("e30", ("sslf", "aflkd"))):
        (tmp_path / folder).mkdir()
        rows = [dict(r, dataset="fashion-mnist", mode="incremental") for r in _rows(cells) if r["method"] in methods]
        with open(tmp_path / folder / "accuracy-fashion-mnist.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=experiments.FIELDS, restval="")
            writer.writeheader()
            writer.writerows(rows[:-1] if folder == "e30" else rows)  # the last aflkd cell (net 2, 3000, seed 2) missing
    args = ["experiment", "tables", "--dataset", "fashion-mnist", "--grid", f"{tmp_path / 'e60'}:baseline",
            "--grid", f"{tmp_path / 'e30'}:sslf,aflkd", "--out", str(tmp_path / "t")]
    assert main(args) == 0
    out = read_results(str(tmp_path / "t" / "accuracy-fashion-mnist.csv"))
    assert len(out) == len(cells) - 1
    assert {(r["method"], r["source"]) for r in out} == {("baseline", str(tmp_path / "e60")),
                                                           ("sslf", str(tmp_path / "e30")), ("aflkd", str(tmp_path / "e30"))}
    text = (tmp_path / "t" / "accuracy-fashion-mnist.md").read_text()
    assert "fewer than 3 seeds (1): aflkd net 2 at 3000 (2)" in text
    assert "| AFLKD (Edge network1) | 51.0 ± 1.0 (85.3) |" in text
    capsys.readouterr()
    args[args.index(f"{tmp_path / 'e60'}:baseline")] = f"{tmp_path / 'e60'}:baseline,sslf"
    assert main(args) == 2
    assert "is in both" in capsys.readouterr().err
