"""Incremental updates over a real ``mpiexec -n 2`` (cloud rank 0, edge rank 1): peers that die or stall.

One buffer lives through four runs of ``tests/incremental_mpi_worker.py``: the cloud
stalls mid-exchange (the edge must give up within its bound, with one line), the
edge is SIGKILLed at a random moment, the cloud is SIGKILLed at a random moment,
then a clean run.  Afterwards the counting student and the camera's log must show
every acknowledged frame trained on exactly once (or still waiting for a full
increment), as in the single-process kill test.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.incremental_harness import initial_state
from tests.test_incremental import _check_no_loss_no_duplicate

MPIEXEC = Path(sys.executable).parent / "mpiexec"
WORKER = Path(__file__).parent / "incremental_mpi_worker.py"
needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")


def _launch(folder: Path, *flags: str) -> subprocess.Popen:
    for stale in folder.glob("rank*.pid"):
        stale.unlink()
    return subprocess.Popen([str(MPIEXEC), "-n", "2", sys.executable, str(WORKER), str(folder), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: the job we started, nothing else
        proc.communicate()
        pytest.fail("an mpiexec job hung after its peer died or stalled")
    return proc.returncode, err


def _kill_rank_at_random(proc: subprocess.Popen, folder: Path, rank: int, rng: random.Random) -> None:
    deadline = time.monotonic() + 90
    while not all((folder / f"rank{r}.pid").exists() for r in (0, 1)):
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail("the job never got ready")
        time.sleep(0.02)
    time.sleep(rng.uniform(0.05, 0.8))  # the paced run lasts over 1.2 s after both ranks are ready
    os.kill(int((folder / f"rank{rank}.pid").read_text()), signal.SIGKILL)


@pytest.mark.slow  # four mpiexec jobs, mostly importing torch: 60-85 s on the shared, loaded 2-core machine
@needs_mpiexec
def test_either_rank_dying_or_stalling_under_mpiexec_loses_and_duplicates_nothing(tmp_path):
    rng = random.Random(15)
    torch.save(initial_state(), tmp_path / "s.pt")

    began = time.monotonic()
    code, err = _finish(_launch(tmp_path, "--cloud-stalls", "--timeout", "2"))
    lines = [line for line in err.splitlines() if line.startswith("aflkd: error:")]
    assert code != 0 and len(lines) == 1 and "sent no logits" in lines[0], err
    assert time.monotonic() - began < 60  # bounded: the stalled cloud did not hold the job

    for rank in (1, 0):  # the edge, then the cloud, SIGKILLed at a random moment
        proc = _launch(tmp_path, "--pace", "0.15")
        _kill_rank_at_random(proc, tmp_path, rank, rng)
        code, err = _finish(proc)
        assert code != 0, f"the kill of rank {rank} landed after the run ended: {err}"

    code, err = _finish(_launch(tmp_path))
    assert code == 0, err
    every = list(range(42))  # the worker's six rounds of seven frames
    _check_no_loss_no_duplicate(str(tmp_path / "b.sqlite"), str(tmp_path / "s.pt"), str(tmp_path / "acked"),
                                every, increment=5)
