"""``aflkd update``: the AFLKD update step, the buffer tools, and bad input in one line (under mpiexec too)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.cli import main
from launch.options import DATA_ROOT
from runtime.errors import UsageError
from models import edge_net
from tests.test_teacher import tiny

MPIEXEC = Path(sys.executable).parent / "mpiexec"
HAVE_CIFAR10 = (DATA_ROOT / "cifar10.npz.xz").exists()


def test_aflkd_update_continues_the_given_student_with_eq17_freezing():
    """The update trains the student it is given (not a fresh one), with the cloud's logits as targets:
    the frozen shared prefix keeps the given weights bit for bit, the rest moves."""
    from kd.trainer import EdgeConfig
    from kd.incremental import AflkdUpdate

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
    assert main(["update", "add", "--buffer", buffer, "--frames", str(tmp_path / "frames.npy")]) == 0
    capsys.readouterr()
    assert main(["update", "status", "--buffer", buffer]) == 0
    status = capsys.readouterr().out
    assert "pending 6, labelled 0 (no open batch), consumed 0" in status and "None" not in status
    assert main(["update", "add", "--buffer", buffer, "--frames", str(tmp_path / "frames.npy")]) == 0  # again
    assert "0 of 6 images added (pending 6" in capsys.readouterr().out
    assert main(["update", "add", "--buffer", buffer]) == 2  # no frames named
    assert "one of the arguments --train-range --frames is required" in capsys.readouterr().err
    assert main(["update", "add", "--buffer", buffer, "--train-range", "5:2", "--dataset", "cifar10"]) == 2
    assert "--train-range A:B needs 0 <= A < B" in capsys.readouterr().err


def _update_run(buffer, student, *extra):
    """``mpiexec -n 2 aflkd update run`` with edge net 1 on CIFAR-10: the process and its 'aflkd: error:' lines."""
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "launch.cli", "update", "run", "--buffer", str(buffer),
           "--student", str(student), "--net", "1", "--dataset", "cifar10", "--device", "cpu", "--timeout", "30",
           "--test-images", "100", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=Path(__file__).parent.parent)
    return proc, [line for line in proc.stderr.splitlines() if line.startswith("aflkd: error:")]


def _student_and_buffer(tmp_path, net: int, images: int):
    """A fresh edge net ``net`` student file and a CIFAR-10 buffer of the first ``images`` training images."""
    from launch.cli import main

    student = tmp_path / "s.pt"
    torch.save(edge_net(net, 3, 32, 10).state_dict(), student)
    assert main(["update", "add", "--buffer", str(tmp_path / "b.sqlite"), "--train-range", f"0:{images}",
                 "--dataset", "cifar10"]) == 0
    return student, tmp_path / "b.sqlite"


@pytest.mark.skipif(not (MPIEXEC.exists() and HAVE_CIFAR10), reason="needs mpiexec and ../shared/data/cifar10")
def test_a_student_of_another_net_is_one_line_on_every_rank_before_any_transfer(tmp_path):
    student, buffer = _student_and_buffer(tmp_path, 2, 2)
    proc, lines = _update_run(buffer, student)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "does not match the net" in lines[0] and "check --net" in lines[0]
    assert "Traceback" not in proc.stderr and "MPI_Abort" not in proc.stderr  # refused, not aborted


@pytest.mark.skipif(not (MPIEXEC.exists() and HAVE_CIFAR10), reason="needs mpiexec and ../shared/data/cifar10")
def test_update_run_on_a_missing_buffer_is_refused_and_creates_nothing(tmp_path):
    """Regression: it created an empty buffer, trained nothing and exited 0."""
    student = tmp_path / "s.pt"
    torch.save(edge_net(1, 3, 32, 10).state_dict(), student)
    proc, lines = _update_run(tmp_path / "missing.sqlite", student)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "missing.sqlite: no such buffer" in lines[0]
    assert not (tmp_path / "missing.sqlite").exists()


# run by mpiexec below: rank FAIL_RANK cannot load its dataset (as if its --data-root were wrong), the other can
_ONE_RANK_WITHOUT_DATA = """
import os, sys
from mpi4py import MPI
import kd.datasets
from launch.cli import main

if MPI.COMM_WORLD.Get_rank() == int(os.environ["FAIL_RANK"]):
    def load_dataset(name, root, download=False):
        raise kd.datasets.DatasetNotFound(f"dataset '{name}' not found under /nowhere/on/this/rank")
    kd.datasets.load_dataset = load_dataset
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not (MPIEXEC.exists() and HAVE_CIFAR10), reason="needs mpiexec and ../shared/data/cifar10")
@pytest.mark.parametrize("fail_rank", [1, 0])
def test_a_set_up_error_on_one_rank_only_is_one_line_and_exit_2_on_both(tmp_path, fail_rank):
    """Before: the failing rank raised before the set-up exchange, so the other timed out or was
    aborted (a traceback, MPI_Abort) and the failing rank's own message was lost."""
    student = tmp_path / "s.pt"
    torch.save(edge_net(1, 3, 32, 10).state_dict(), student)
    script = tmp_path / "one_rank_without_data.py"
    script.write_text(_ONE_RANK_WITHOUT_DATA)
    cmd = [str(MPIEXEC), "-n", "2", "-env", "FAIL_RANK", str(fail_rank), sys.executable, str(script), "update", "run",
           "--buffer", str(tmp_path / "b.sqlite"), "--student", str(student), "--net", "1", "--dataset", "cifar10",
           "--device", "cpu", "--timeout", "60"]
    root = Path(__file__).parent.parent
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aflkd: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    role = "the edge" if fail_rank == 1 else "the cloud"
    assert f"rank {fail_rank} ({role})" in lines[0] and "not found under /nowhere/on/this/rank" in lines[0], lines
    assert "Traceback" not in proc.stderr and "MPI_Abort" not in proc.stderr  # refused, not aborted


@pytest.mark.skipif(not (MPIEXEC.exists() and HAVE_CIFAR10), reason="needs mpiexec and ../shared/data/cifar10")
def test_a_second_training_job_on_one_buffer_is_refused(tmp_path):
    """Regression: two 'update run' on one buffer at once both retrained a batch and overwrote one student file."""
    import fcntl
    import os

    from kd.buffer import hold_for_training
    from launch.cli import main

    buffer = str(tmp_path / "b.sqlite")
    assert main(["update", "add", "--buffer", buffer, "--train-range", "0:2", "--dataset", "cifar10"]) == 0
    fd = hold_for_training(buffer)  # as a running job holds it
    try:
        student = tmp_path / "s.pt"
        torch.save(edge_net(1, 3, 32, 10).state_dict(), student)
        proc, lines = _update_run(buffer, student)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "another training job ('update run' or 'demo') holds it" in lines[0]


@pytest.mark.skipif(not (MPIEXEC.exists() and HAVE_CIFAR10), reason="needs mpiexec and ../shared/data/cifar10")
def test_update_run_uploads_its_increment_as_frames_and_refuses_a_frame_size_the_images_do_not_divide(tmp_path):
    student, buffer = _student_and_buffer(tmp_path, 1, 4)
    proc, lines = _update_run(buffer, student, "--upload", "raw", "--frame-size", "100")
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--frame-size 100 must be a multiple of the images' size (32)" in lines[0]
    proc, lines = _update_run(buffer, student, "--upload", "jpeg", "--increment", "4", "--steps", "2")
    assert proc.returncode == 0 and not lines, proc.stderr
    assert "edge: generation 1 from batch 1 (4 images): test acc " in proc.stdout
    assert " on 100 test images, " in proc.stdout
    assert "uploaded the increments as jpeg@224q90 frames" in proc.stdout



@pytest.mark.skipif(not (MPIEXEC.exists() and HAVE_CIFAR10), reason="needs mpiexec and ../shared/data/cifar10")
def test_the_demo_carries_the_initial_students_temperature_into_its_first_update(tmp_path):
    """Regression (Alg. 2): the demo wrote its generation-0 student as a plain state dict, so generation 1's
    learnt T started again at --temperature (4.0) instead of where the initial student's training ended."""
    import json

    from kd.incremental import read_student

    out = tmp_path / "demo"
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "launch.cli", "update", "demo",
                           "--dataset", "cifar10", "--initial", "20", "--initial-steps", "4", "--increment", "8",
                           "--increments", "1", "--steps", "1", "--test-images", "200", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    initial_t = json.loads((out / "initial.json").read_text())["final_T"]
    assert initial_t != pytest.approx(4.0, abs=1e-6)        # the initial training moved T off its start
    _, meta = read_student(str(out / "student.pt"))         # generation 1
    assert meta["generation"] == 1 and meta["info"]["start_T"] == pytest.approx(initial_t, abs=1e-4)
    _measured_on_200_balanced_test_images(out)


def _measured_on_200_balanced_test_images(out) -> None:
    """--test-images 200: generation 0's accuracy is the saved initial student's on 20 test images of each class,
    counted here with plain torch."""
    import csv

    import numpy as np
    import torch

    from kd.datasets import balanced_subset, load_dataset
    from kd.teacher import to_tensor
    from models import edge_net, load_weights

    data = load_dataset("cifar10", str(DATA_ROOT))
    idx = balanced_subset(data.y_test, 200, 10, seed=0)
    assert np.bincount(data.y_test[idx], minlength=10).tolist() == [20] * 10
    student = load_weights(edge_net(3, 3, 32, 10), str(out / "initial-student.pt")).eval()
    with torch.no_grad():
        predicted = student(to_tensor(data.x_test[idx], data)).argmax(1).numpy()
    rows = list(csv.DictReader(open(out / "incremental-cifar10.csv")))
    assert [r["test_images"] for r in rows] == ["200", "200"]
    assert float(rows[0]["test_acc"]) == pytest.approx(float(np.mean(predicted == data.y_test[idx])), abs=6e-5)


@pytest.mark.parametrize("n", [1, 9, 31])
def test_too_few_or_too_many_test_images_is_one_usage_error(n):
    import numpy as np

    from kd.datasets import ImageArrays, with_test_subset

    labels = np.arange(30) % 10
    data = ImageArrays("toy", np.zeros((30, 2, 2, 3), np.uint8), labels, np.zeros((30, 2, 2, 3), np.uint8), labels,
                       10, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(UsageError, match=f"--test-images must be between 10 .* and 30 .*got {n}$"):
        with_test_subset(data, n)
    kept = with_test_subset(data, 20)
    assert np.bincount(kept.y_test, minlength=10).tolist() == [2] * 10 and with_test_subset(data, None) is data
