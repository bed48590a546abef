"""``aflkd update``: the AFLKD update step, the buffer tools, and bad input in one line (under mpiexec too)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.cli import main
from launch.options import DATA_ROOT
from models import edge_net
from tests.test_teacher import tiny

MPIEXEC = Path(sys.executable).parent / "mpiexec"
HAVE_CIFAR10 = (DATA_ROOT / "cifar10.npz.xz").exists()


def test_aflkd_update_continues_the_given_student_with_eq17_freezing():
    """The update trains the student it is given (not a fresh one), with the cloud's logits as targets:
    the frozen shared prefix keeps the given weights bit for bit, the rest moves."""
    from kd.trainer import EdgeConfig
    from launch.update import AflkdUpdate

    data = tiny(classes=3, n=40)
    torch.manual_seed(3)
    start = {k: v.clone() for k, v in edge_net(1, 3, 32, 3).state_dict().items()}
    logits = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    update = AflkdUpdate(EdgeConfig("aflkd", 1, steps=4, batch=8, temperature=9.0), data, torch.device("cpu"), False)
    state, info = update(start, data.x_train, logits, generation=1)
    assert 0.0 <= info["test_acc"] <= 1.0 and info["steps"] == 4
    n = info["final_frozen"]
    assert 1 <= n  # T near t_max freezes shared units (Eq. 17)
    assert torch.equal(state["conv1_1.weight"], start["conv1_1.weight"])  # frozen: the given student's weights
    assert not torch.equal(state["fc2.weight"], start["fc2.weight"])  # trained on


def test_status_refuses_a_corrupt_buffer_with_its_path(tmp_path, capsys):
    path = tmp_path / "b.sqlite"
    path.write_bytes(b"\x00garbage" * 1000)
    assert main(["update", "status", "--buffer", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"aflkd: error: buffer {path} is corrupt"), err
    assert path.read_bytes() == b"\x00garbage" * 1000


def test_add_is_idempotent_per_frame_and_status_reports(tmp_path, capsys):
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 1), dtype=np.uint8)
    np.save(tmp_path / "frames.npy", images)
    buffer = str(tmp_path / "b.sqlite")
    assert main(["update", "add", "--buffer", buffer, "--images", str(tmp_path / "frames.npy")]) == 0
    assert main(["update", "status", "--buffer", buffer]) == 0
    assert main(["update", "add", "--buffer", buffer, "--images", str(tmp_path / "frames.npy")]) == 0  # again
    assert "0 of 6 images added (pending 6" in capsys.readouterr().out
    assert main(["update", "add", "--buffer", buffer]) == 2  # no frames named
    assert "one of the arguments --train-range --images is required" in capsys.readouterr().err
    assert main(["update", "add", "--buffer", buffer, "--train-range", "5:2", "--dataset", "cifar10"]) == 2
    assert "--train-range A:B needs 0 <= A < B" in capsys.readouterr().err


@pytest.mark.skipif(not (MPIEXEC.exists() and HAVE_CIFAR10), reason="needs mpiexec and ../shared/data/cifar10")
def test_a_student_of_another_net_is_one_line_on_every_rank_before_any_transfer(tmp_path):
    student = tmp_path / "s.pt"
    torch.save(edge_net(2, 3, 32, 10).state_dict(), student)
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "launch.cli", "update", "run", "--buffer",
           str(tmp_path / "b.sqlite"), "--student", str(student), "--net", "1", "--dataset", "cifar10",
           "--device", "cpu", "--timeout", "30"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=Path(__file__).parent.parent)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aflkd: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "does not match the net" in lines[0] and "check --net" in lines[0]
    assert "Traceback" not in proc.stderr and "MPI_Abort" not in proc.stderr  # refused, not aborted
