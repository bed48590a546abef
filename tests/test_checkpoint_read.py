"""One reader of checkpoint files (models.checkpoint.read_saved/read_state/check_state) behind the three
loaders: load_weights, runtime.distribute's memory-mapped load_checkpoint/check_checkpoint, and
kd.incremental.read_student.  The same bad file gets the same one-line error from each."""
import pytest
import torch
import torch.nn as nn

from kd.incremental import read_student
from models.checkpoint import check_state, load_weights, read_state
from runtime.distribute import check_checkpoint, load_checkpoint
from runtime.errors import UsageError


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def _bad_files(tmp_path):
    good = _net().state_dict()
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({**good, "0.weight": torch.zeros(4, 3, 5, 5)}, tmp_path / "shape.pt")
    torch.save({k: v for k, v in good.items() if k != "3.bias"}, tmp_path / "missing.pt")
    torch.save({"model": {**good, "extra": torch.zeros(1)}}, tmp_path / "extra.pt")
    return {"absent.pt": "does not exist", "garbage.pt": "cannot be", "list.pt": "holds a list, not a state dict",
            "shape.pt": "1 shape mismatch(es), e.g. 0.weight: checkpoint (4, 3, 5, 5) vs net (4, 3, 3, 3)",
            "missing.pt": "1 missing key(s), e.g. 3.bias", "extra.pt": "1 unexpected key(s), e.g. extra"}


LOADERS = {
    "load_weights": lambda path: load_weights(_net(), path, "check --net"),
    "load_checkpoint": lambda path: load_checkpoint(_net(), path),
    "check_checkpoint": lambda path: check_checkpoint(_net(), path, "check --net"),
    "read_state+check_state": lambda path: check_state(_net(), read_state(path), path, "check --net"),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_loader_refuses_each_bad_file_in_the_same_one_line(tmp_path, loader):
    for name, said in _bad_files(tmp_path).items():
        path = str(tmp_path / name)
        with pytest.raises(UsageError) as err:
            LOADERS[loader](path)
        line = str(err.value)
        assert "\n" not in line and said in line and path in line, (loader, name, line)


@pytest.mark.parametrize("wrapped", [False, True])
def test_every_loader_loads_the_same_weights(tmp_path, wrapped):
    torch.manual_seed(0)
    saved = _net().state_dict()
    path = str(tmp_path / "w.pt")
    torch.save({"model": saved, "update": {"generation": 3}} if wrapped else saved, path)
    for model in (load_weights(_net(), path), load_checkpoint(_net(), path)):
        for key, value in model.state_dict().items():
            assert torch.equal(value, saved[key]), key
    state, update = read_student(path)
    assert all(torch.equal(state[k], saved[k]) for k in saved) and update == ({"generation": 3} if wrapped else None)


def test_read_student_names_the_student_and_how_to_make_one(tmp_path):
    with pytest.raises(UsageError, match=r"student '.*s\.pt' does not exist; train one first \('aflkd train edge"):
        read_student(str(tmp_path / "s.pt"))


def test_an_atomic_write_is_on_disk_before_its_name_and_the_rename_is_synced(tmp_path, monkeypatch):
    """Regression: the demo's generation-0 student was renamed into place unsynced, while the buffer recorded
    its sha durably: after a power cut the name could point at an empty file."""
    import os

    from models.checkpoint import write_atomic

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    target = tmp_path / "student.pt"
    write_atomic(str(target), lambda fh: fh.write(b"weights"))
    assert target.read_bytes() == b"weights"
    assert any(p.startswith(str(target) + ".") for p in synced)  # the data, under its temporary name
    assert str(tmp_path) in synced  # then the folder holding the rename
