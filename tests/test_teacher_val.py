"""The teacher's validation slice (``train cloud --val N``), choosing on it (``train select``), and the
CUDA path's batches (images kept on the device, cropped there) checked against the CPU's on tiny data."""
import csv
import os
import re

import numpy as np
import pytest
import torch

import kd.teacher
from kd.datasets import ImageArrays, validation_indices
from kd.teacher import (TeacherConfig, augment, crop_flip, draw_augment, record_teacher, split_training,
                        to_tensor, train_teacher)
from models import cloud_net, save_atomic
from runtime.errors import UsageError

VAL = 9  # 3 images of each of the 3 classes


def unique_tiny(n=60, classes=3, seed=0) -> ImageArrays:
    """Noise on a random colour per image, cyclic labels, every image different (so a batch image names its
    index), and a separate test split.  Nothing to learn, but predictions vary with the colour, so a net's
    accuracy on one slice is not its accuracy on another (a check on the wrong images can fail)."""
    rng = np.random.default_rng(seed)

    def images(count):
        return (rng.random((count, 32, 32, 3)) * 40 + rng.random((count, 1, 1, 3)) * 210).astype(np.uint8)

    y, yt = np.arange(n) % classes, np.arange(15) % classes
    return ImageArrays("tiny", images(n), y.astype(np.int64), images(15), yt.astype(np.int64), classes,
                       (0.5,) * 3, (0.25,) * 3)


def test_split_is_the_grids_slice_and_its_complement():
    data = unique_tiny()
    train_idx, val_idx = split_training(data, VAL)
    assert np.array_equal(val_idx, validation_indices(data.y_train, data.classes, VAL))
    assert len(val_idx) == VAL and np.bincount(data.y_train[val_idx]).tolist() == [3, 3, 3]
    assert not set(train_idx) & set(val_idx) and sorted(set(train_idx) | set(val_idx)) == list(range(60))
    none, empty = split_training(data, 0)
    assert none is None and len(empty) == 0
    with pytest.raises(UsageError, match="--val must be 0 or between 3"):
        split_training(data, 2)
    with pytest.raises(UsageError, match="--val must be 0 or between"):
        split_training(data, 60)
    with pytest.raises(UsageError, match="--val must be >= 0"):
        TeacherConfig(val=-1)


def _rows_of(batch: torch.Tensor, images: torch.Tensor) -> list[int]:
    """The index in ``images`` of every image of ``batch`` (exact match: the images are all different)."""
    flat = images.reshape(len(images), -1)
    out = []
    for b in batch.reshape(len(batch), -1):
        (hit,) = torch.nonzero((flat == b).all(1)).flatten().tolist()
        out.append(hit)
    return out


@pytest.mark.parametrize("resident", [False, True], ids=["cpu-path", "device-path"])
def test_held_out_images_are_never_in_a_training_batch(tmp_path, monkeypatch, resident):
    """Every image that reaches the crop of a training batch is looked up: none is in the slice, all others are."""
    data = unique_tiny()
    if resident:  # the CUDA path (images on the device, cropped there), run on the CPU
        monkeypatch.setattr(kd.teacher, "RESIDENT", ("cuda", "cpu"))
    seen = []
    real = kd.teacher.crop_flip

    def spy(x, *args, **kwargs):
        seen.append(x.detach().cpu().clone())
        return real(x, *args, **kwargs)

    monkeypatch.setattr(kd.teacher, "crop_flip", spy)
    train_teacher(data, str(tmp_path / "t.pt"), TeacherConfig(epochs=2, batch=16, val=VAL), progress=False)
    everything = to_tensor(data.x_train, data)
    trained = [i for batch in seen for i in _rows_of(batch, everything)]
    train_idx, val_idx = split_training(data, VAL)
    assert len(seen) == 2 * 4  # ceil(51 / 16) batches an epoch
    assert not set(trained) & set(val_idx.tolist())
    assert sorted(trained) == sorted(train_idx.tolist() * 2)  # each epoch sees every other image once


def test_limit_batches_never_reaches_the_slice_either(tmp_path, monkeypatch):
    data = unique_tiny()
    orders = []
    real = torch.randperm

    def spy(n, *args, **kwargs):
        out = real(n, *args, **kwargs)
        orders.append((n, out))
        return out

    monkeypatch.setattr(kd.teacher.torch, "randperm", spy)
    summary = train_teacher(data, str(tmp_path / "t.pt"), TeacherConfig(epochs=1, batch=8, val=VAL), progress=False,
                            limit_batches=2)
    (n, order), = orders
    assert n == 60 - VAL  # the shuffle runs over the training split less the slice, not over all 60
    assert summary["epochs"] == 1 and 0 <= summary["val_acc"] <= 1


def _independent_accuracy(path, data, idx) -> float:
    """Accuracy of saved weights on ``data.x_train[idx]``, without kd.teacher's helpers."""
    model = cloud_net(3, 32, data.classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(data.x_train[idx]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + 4]).argmax(1) for i in range(0, len(x), 4)])
    return int((predicted == torch.from_numpy(data.y_train[idx])).sum()) / len(idx)


@pytest.mark.parametrize("batch,swa_epochs", [(4, 0), (8, 1)])
def test_val_acc_is_the_saved_weights_accuracy_on_the_slice(tmp_path, monkeypatch, batch, swa_epochs):
    data = unique_tiny()
    _, val_idx = split_training(data, VAL)
    calls = []
    real = kd.teacher.evaluate

    def spy(model, x, y, batch=500):
        calls.append((x.clone(), y.clone()))
        return real(model, x, y, batch)

    monkeypatch.setattr(kd.teacher, "evaluate", spy)
    out = str(tmp_path / "t.pt")
    summary = train_teacher(data, out, TeacherConfig(epochs=2, batch=batch, max_lr=0.01, val=VAL,
                                                     swa_epochs=swa_epochs), progress=False)
    last = summary["history"][-1]
    assert summary["val_acc"] == last["val_acc"]
    assert last["val_acc"] == pytest.approx(_independent_accuracy(out, data, val_idx), abs=1e-12)
    # the check can fail: 9 training images of one class each score otherwise (a net that predicts one class
    # everywhere, as these briefly trained ones may, scores 1/3 on every class-balanced slice but 1 or 0 here)
    rest = np.setdiff1d(np.arange(len(data.y_train)), val_idx)
    others = [_independent_accuracy(out, data, rest[data.y_train[rest] == c][:VAL]) for c in range(data.classes)]
    assert any(o != pytest.approx(last["val_acc"]) for o in others), others
    if swa_epochs:  # the slice's accuracy of the average (the saved weights) and of the last iterate beside it
        assert "sgd_val_acc" in last
    # the slice was evaluated with its own images and labels, and never trained on
    x_val, y_val = to_tensor(data.x_train[val_idx], data), torch.from_numpy(data.y_train[val_idx])
    assert any(torch.equal(x, x_val) and torch.equal(y, y_val) for x, y in calls)


def test_without_val_the_history_and_run_are_as_before(tmp_path):
    data = unique_tiny()
    summary = train_teacher(data, str(tmp_path / "t.pt"), TeacherConfig(epochs=1, batch=16), progress=False)
    assert "val_acc" not in summary["history"][-1] and summary["val_acc"] is None
    assert set(summary["history"][-1]) == {"epoch", "train_loss", "test_acc", "seconds", "images_per_s", "device"}


def test_resume_with_another_val_is_refused_and_old_states_still_resume(tmp_path):
    data = unique_tiny()
    out = str(tmp_path / "t.pt")
    train_teacher(data, out, TeacherConfig(epochs=2, batch=16, val=VAL), progress=False, stop_after=1)
    with pytest.raises(UsageError, match="resume with the same options"):
        train_teacher(data, out, TeacherConfig(epochs=2, batch=16), progress=False)
    # a state written before the field existed has no "val": it means 0, and resumes with --val 0
    old = str(tmp_path / "old.pt")
    train_teacher(data, old, TeacherConfig(epochs=2, batch=16), progress=False, stop_after=1)
    state = torch.load(old + ".state", weights_only=False)
    del state["config"]["val"]
    torch.save(state, old + ".state")
    assert train_teacher(data, old, TeacherConfig(epochs=2, batch=16), progress=False)["epochs"] == 2
    with pytest.raises(UsageError, match="resume with the same options"):
        train_teacher(data, old, TeacherConfig(epochs=2, batch=16, val=VAL), progress=False)


def test_device_path_crops_exactly_as_the_cpu_path():
    data = unique_tiny()
    x = to_tensor(data.x_train, data)
    a = augment(x, torch.Generator().manual_seed(5))
    b = crop_flip(x, *draw_augment(len(x), torch.Generator().manual_seed(5)), where=True)
    assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)


def test_device_path_trains_the_same_weights_as_the_cpu_path(tmp_path, monkeypatch):
    """The CUDA path's data handling (resident images, epoch-wise draws, no per-step sync) run on the CPU
    gives the CPU path's weights bit for bit: the same batches in the same order."""
    data = unique_tiny()
    config = TeacherConfig(epochs=2, batch=16, val=VAL, swa_epochs=1)
    a = train_teacher(data, str(tmp_path / "a.pt"), config, progress=False)
    monkeypatch.setattr(kd.teacher, "RESIDENT", ("cuda", "cpu"))
    b = train_teacher(data, str(tmp_path / "b.pt"), config, progress=False)
    wa = torch.load(tmp_path / "a.pt", weights_only=True)
    wb = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["val_acc"] == hb["val_acc"] and ha["test_acc"] == hb["test_acc"]
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-12)


def test_teachers_csv_gets_val_acc_and_old_rows_stay_blank(tmp_path):
    path = tmp_path / "teachers.csv"
    path.write_text("dataset,test_acc,epochs,command,device,selected_by\n"
                    "cifar10,0.9004,32,aflkd train cloud ...,,test split: old\n")
    record_teacher(str(path), "cifar100", 0.7, 30, "aflkd train cloud --val 5000", "cpu", "x", val_acc=0.71234)
    rows = {r["dataset"]: r for r in csv.DictReader(open(path))}
    assert rows["cifar10"]["val_acc"] == "" and rows["cifar10"]["selected_by"] == "test split: old"
    assert rows["cifar100"]["val_acc"] == "0.7123" and rows["cifar100"]["selected_by"] == "x"


@pytest.fixture
def tiny_cli(monkeypatch):
    import kd.datasets

    data = unique_tiny()
    monkeypatch.setattr(kd.datasets, "load_dataset", lambda name, root, download=False: data)
    return data


def test_train_cloud_val_prints_and_records_it(tiny_cli, tmp_path, capsys):
    from launch.cli import main

    out, results = tmp_path / "c.pt", tmp_path / "teachers.csv"
    assert main(["train", "cloud", "--dataset", "cifar10", "--epochs", "1", "--batch", "16", "--val", str(VAL),
                 "--no-progress", "--save", str(out), "--results", str(results)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"epoch 1/1: loss \d+\.\d+, test acc \d+\.\d\d%, val acc \d+\.\d\d%, ", text), text
    assert re.search(r"cifar10: test accuracy \d+\.\d\d%, validation accuracy \d+\.\d\d% \(9 held out\)", text), text
    (row,) = csv.DictReader(open(results))
    assert row["val_acc"] != "" and "validation slice of 9" in row["selected_by"] and "--val 9" in row["command"]
    assert float(row["val_acc"]) == pytest.approx(_independent_accuracy(str(out), tiny_cli, split_training(tiny_cli, VAL)[1]),
                                                  abs=1e-4)
    # averaging reports the slice too
    assert main(["train", "average", "--dataset", "cifar10", str(out), str(out), "--val", str(VAL),
                 "--save", str(tmp_path / "avg.pt"), "--results", str(results)]) == 0
    assert re.search(r"average of 2 nets, test accuracy \d+\.\d\d%, validation accuracy \d+\.\d\d% \(9 held out\)",
                     capsys.readouterr().out)


def _candidates(data, tmp_path, seeds=(1,)):
    """Briefly trained nets (with the slice held out), one per seed."""
    paths = []
    for seed in seeds:
        paths.append(str(tmp_path / f"cand{seed}.pt"))
        train_teacher(data, paths[-1], TeacherConfig(epochs=1, batch=4, max_lr=0.01, seed=seed, val=VAL), progress=False)
    return paths


def test_select_copies_the_best_on_the_slice_and_reads_test_once(tiny_cli, tmp_path, monkeypatch, capsys):
    from launch.cli import main

    # which seed scores best on 9 images depends on the CPU's rounding: order the candidates by their scores,
    # computed independently, so that the best is neither the first candidate nor (given a tie) the last
    pool = _candidates(tiny_cli, tmp_path, seeds=range(6))
    _, val_idx = split_training(tiny_cli, VAL)
    score = {p: _independent_accuracy(p, tiny_cli, val_idx) for p in pool}
    top = max(score.values())
    lows, bests = [p for p in pool if score[p] < top], [p for p in pool if score[p] == top]
    assert lows, score  # six nets scoring alike: no choice to make
    paths = [lows[0], bests[0], bests[1] if len(bests) > 1 else lows[1]]
    scores = [score[p] for p in paths]
    best = paths[1]  # the first of the best, as the command chooses
    splits = []
    real = kd.teacher.evaluate_weights

    def spy(data, path, split, *args, **kwargs):
        splits.append((path, split))
        return real(data, path, split, *args, **kwargs)

    monkeypatch.setattr(kd.teacher, "evaluate_weights", spy)
    out, results = tmp_path / "chosen" / "t.pt", tmp_path / "teachers.csv"
    assert main(["train", "select", "--dataset", "cifar10", "--val", str(VAL), *paths, "--save", str(out),
                 "--results", str(results)]) == 0
    assert out.read_bytes() == open(best, "rb").read()
    assert [s for _, s in splits] == ["val"] * 3 + ["test"] and splits[-1][0] == str(out)
    (row,) = csv.DictReader(open(results))
    listed = ", ".join(f"{os.path.basename(p)} {score[p]:.4f}" for p in paths)
    assert row["selected_by"].startswith(f"validation slice of 9, best of 3 candidates: {listed}; "
                                         f"chose {os.path.basename(best)}"), row["selected_by"]
    assert float(row["val_acc"]) == pytest.approx(max(scores), abs=1e-4)
    text = capsys.readouterr().out
    assert f"chose {best}" in text and text.count("<- chosen") == 1


def test_select_refuses_a_candidate_trained_on_the_slice(tiny_cli, tmp_path, capsys):
    from launch.cli import main

    on_all = str(tmp_path / "all.pt")
    train_teacher(tiny_cli, on_all, TeacherConfig(epochs=1, batch=16), progress=False, limit_batches=1)
    paths = _candidates(tiny_cli, tmp_path) + [on_all]
    assert main(["train", "select", "--dataset", "cifar10", "--val", str(VAL), *paths,
                 "--save", str(tmp_path / "t.pt"), "--results", str(tmp_path / "r.csv")]) == 2
    assert "was trained with --val 0, not 9" in capsys.readouterr().err
    assert not (tmp_path / "t.pt").exists()


def test_grid_context_takes_the_torch_device_not_the_gpu_name():
    """Regression: the grid built torch.device from the recorded name 'cuda:<GPU name>', which torch refuses."""
    from kd.experiments import GridOptions, _Context
    from kd.trainer import EdgeConfig

    data = unique_tiny()
    ctx = _Context(data, None, EdgeConfig("baseline", 1), GridOptions(), None, "cuda:NVIDIA H200",
                   np.empty(0, dtype=np.int64), [30], torch.device("cuda"))
    assert ctx.device() == torch.device("cuda") and ctx.device_name == "cuda:NVIDIA H200"
