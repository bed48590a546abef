"""A fault on one rank only is every rank's fault: the job ends in one line, non-zero, within the deadline.

Each case runs ``mpiexec -n 2`` on this host with the fault on rank 1 alone, through
``tests/one_rank_fault.py`` (an argument swapped on rank 1, torch reporting another version
there, or rank 1 stopped or killed mid-stream).  What counts is what a user sees: the exit
status of ``mpiexec``, the ``aflkd: error:`` lines, and the time it took (a hang fails by timeout).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
pytestmark = [pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python"), pytest.mark.slow]

BENCH = ["bench", "pipeline", "--net", "edge3", "--size", "48", "--latency-repeat", "1", "--threads", "1"]


def on_rank1(mode: str, *values: str, args: list[str], timeout: int = 90, rank: int = 1):
    cmd = [str(MPIEXEC), "-n", "2", "-genv", "FAULT_RANK", str(rank), sys.executable,
           str(REPO / "tests" / "one_rank_fault.py"), mode, *values, "--", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return proc, time.monotonic() - start


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("aflkd: error:")]


def topology(path: Path, speeds: tuple[float, float]) -> str:
    hosts = "".join(f'[[host]]\nname = "b{i}"\naddress = "localhost"\nrole = "{role}"\ncluster = 0\nspeed = {s}\n\n'
                    for i, (role, s) in enumerate(zip(("master", "worker"), speeds)))
    path.write_text(f'description = "two local ranks"\n\n{hosts}')
    return str(path)


def test_an_unwritable_json_on_one_rank_ends_the_job_in_one_line(tmp_path):
    good = str(tmp_path / "out.json")
    proc, _ = on_rank1("swap", good, "/proc/no/out.json", args=[*BENCH, "--images", "4", "--json", good])
    assert proc.returncode == 2, proc.stderr
    lines = errors(proc)
    assert len(lines) == 1 and lines[0].startswith("aflkd: error: rank 1 (") and "/proc/no" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_topology_that_differs_on_one_rank_is_refused_before_any_image(tmp_path):
    mine = topology(tmp_path / "a.toml", (1.0, 1.0))
    other = topology(tmp_path / "b.toml", (1.0, 0.5))
    proc, _ = on_rank1("swap", mine, other, args=[*BENCH, "--images", "4", "--topology", mine])
    assert proc.returncode == 2, proc.stderr
    lines = errors(proc)
    assert len(lines) == 1 and "rank 1 (" in lines[0] and "another deployment" in lines[0], proc.stderr
    assert "max abs error" not in proc.stdout  # refused: no image went through


def test_a_topology_missing_on_one_rank_is_refused(tmp_path):
    mine = topology(tmp_path / "a.toml", (1.0, 1.0))
    proc, _ = on_rank1("swap", mine, str(tmp_path / "missing.toml"),
                       args=[*BENCH, "--images", "4", "--topology", mine])
    assert proc.returncode == 2, proc.stderr
    lines = errors(proc)
    assert len(lines) == 1 and lines[0].startswith("aflkd: error: rank 1 (") and "missing.toml" in lines[0], \
        proc.stderr


def test_another_torch_version_on_one_rank_is_refused():
    proc, _ = on_rank1("torch", "0.0.0-simulated", args=[*BENCH, "--images", "4"])
    assert proc.returncode == 2, proc.stderr
    lines = errors(proc)
    assert len(lines) == 1 and "rank 1 (" in lines[0] and "torch" in lines[0], proc.stderr


def test_a_rank_stopped_mid_stream_ends_the_job_within_the_deadline():
    proc, took = on_rank1("stop", "20", args=[*BENCH, "--images", "40", "--deadline", "3"])
    # 3 from the rank that found it, or 9 when mpiexec reports the stopped rank it had to kill
    assert proc.returncode in (3, 9), proc.stderr
    lines = errors(proc)
    assert len(lines) == 1 and "rank 1 (" in lines[0] and "within 3 s" in lines[0], proc.stderr
    assert took < 45  # set-up and the one-rank run take about 10 s here; then the deadline


def test_a_rank_killed_mid_stream_ends_the_job():
    proc, took = on_rank1("kill", "20", args=[*BENCH, "--images", "40", "--deadline", "3"])
    assert proc.returncode != 0
    assert "max abs error" not in proc.stdout
    assert took < 45


@pytest.mark.parametrize("rank", [0, 1])
def test_a_checkpoint_missing_on_one_rank(tmp_path, rank):
    """Only rank 0 reads --checkpoint (it sends every rank its part): missing there, one line on every rank;
    missing on rank 1 only, nothing is wrong and the split still equals the unsplit model."""
    import torch

    from models import build_model, save_atomic

    torch.manual_seed(0)
    path = tmp_path / "edge3.pt"
    save_atomic(build_model("edge3", 3, 32, 10).state_dict(), str(path))
    proc, _ = on_rank1("hide", str(path), rank=rank,
                       args=["bench", "layers", "--net", "edge3", "--size", "32", "--repeat", "1", "--warmup", "0",
                             "--threads", "1", "--no-progress", "--checkpoint", str(path)])
    if rank == 0:
        assert proc.returncode == 2, proc.stderr
        lines = errors(proc)
        assert len(lines) == 1 and "edge3.pt" in lines[0], proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        error = [line for line in proc.stdout.splitlines() if line.startswith("max |split - unsplit|")]
        assert error and float(error[0].split(":")[1].split()[0]) <= 1e-5, proc.stdout


@pytest.mark.parametrize("command", [["train", "distill", "--steps", "2", "--size", "100"],
                                     ["control", "--steps", "2", "--size", "100"]])
def test_a_dataset_missing_on_one_board_is_agreed_before_any_exchange(command):
    """Regression: the dataset was read after the ranks had started talking; rank 1 left alone, and mpiexec
    killed the others (exit 9 and MPICH's BAD TERMINATION banner about one run in three)."""
    data = str(REPO.parent / "shared" / "data")
    proc, _ = on_rank1("swap", data, "/nonexistent", args=[*command, "--dataset", "cifar10", "--data-root", data])
    assert proc.returncode == 2, proc.stderr + proc.stdout
    lines = errors(proc)
    assert len(lines) == 1 and lines[0].startswith("aflkd: error: rank 1 (") and "/nonexistent" in lines[0], lines
    assert "BAD TERMINATION" not in proc.stdout
