"""``aflkd train distill`` under mpiexec on tiny synthetic data: results, one-line set-up errors, a stalled cloud."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")

# the CLI with its dataset replaced by tiny synthetic images (and, for the stall test, a cloud that never serves)
SCRIPT = """
import sys, time
import kd.datasets
from tests.test_teacher import tiny
kd.datasets.load_dataset = lambda name, root, download=False: tiny(n=60)
if sys.argv[1] == "stall":
    import kd.streaming
    kd.streaming.Cloud.serve = lambda self, progress=False: time.sleep(600)
if sys.argv[1] == "slow-rank-1":  # a slower board: each batch of rank 1 takes 1.2 s more (it stays in touch)
    from mpi4py import MPI
    import kd.teacher_source
    logits = kd.teacher_source.StreamedTeacher.logits
    def slow(self, step):
        if MPI.COMM_WORLD.Get_rank() == 1:
            time.sleep(1.2)
        return logits(self, step)
    kd.teacher_source.StreamedTeacher.logits = slow
from launch.cli import main
sys.exit(main(sys.argv[2:]))
"""


def distill(ranks: int, *args: str, mode: str = "run", timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [str(MPIEXEC), "-n", str(ranks), sys.executable, "-c", SCRIPT, mode, "train", "distill",
           "--dataset", "cifar10", "--size", "30", "--steps", "4", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("aflkd: error:")]


@pytest.fixture
def teacher(tmp_path):
    from models import cloud_net, save_atomic

    path = tmp_path / "teacher.pt"
    save_atomic(cloud_net(3, 32, 3).state_dict(), str(path))
    return str(path)


def test_one_cloud_two_edges_write_results_and_students(tmp_path, teacher):
    out = tmp_path / "run"
    proc = distill(3, "--teacher", teacher, "--nets", "1", "--seeds", "0,1", "--wire", "float32,topk:2",
                   "--json", str(out / "r.json"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "r.json").read_text())
    assert report["cloud"]["device"] == "cpu" and report["cloud"]["role"] == "cloud"
    edges = {e["rank"]: e for e in report["edges"]}
    assert sorted(edges) == [1, 2] and [edges[r]["seed"] for r in (1, 2)] == [0, 1]
    assert edges[1]["wire"] == "float32" and edges[1]["bytes_per_batch"] == 30 * 3 * 4  # batch 30 (< 64), 3 classes
    assert edges[2]["wire"] == "topk:2" and edges[2]["bytes_per_batch"] == 30 * (3 * 4 + 2 * 2)
    assert all(e["bytes_received"] == 4 * e["bytes_per_batch"] and e["device"] == "cpu" for e in edges.values())
    assert (out / "student-rank1.pt").exists() and (out / "student-rank2.pt").exists()
    assert "float32" in proc.stdout and "topk:2" in proc.stdout
    assert proc.stderr.count("no CUDA device visible to torch; running on the CPU") == 1


def test_the_output_says_which_controller_allocated_the_cores(tmp_path, teacher):
    """`train distill --control planner --constants F` printed the same table as an uncontrolled run."""
    constants = tmp_path / "c.json"
    constants.write_text(json.dumps({"f": {"a1": 0.2, "a2": 0.05}, "g": {"b1": 100.0, "b2": 10.0, "b3": 1.0}}))
    proc = distill(2, "--teacher", teacher, "--nets", "1", "--control", "planner", "--constants", str(constants))
    assert proc.returncode == 0, proc.stderr
    assert f"rank 1: cores allocated by planner (" in proc.stdout and f"constants from {constants})" in proc.stdout
    assert "re-plan(s) over 4 steps" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--teacher", "{ten}"], "--teacher must be a cloud net trained on tiny"),
    (["--wire", "topk:3"], "--wire topk:3 must keep between 1 and 2 of the 3 classes"),
    (["--seeds", "1,2,3"], "--seeds has 3 values for 2 edge rank(s)"),
    (["--cloud-rank", "3"], "--cloud-rank must be between 0 and 2 for 3 ranks, got 3"),
    (["--control", "static:9", "--control-cores", "1"], "--control static:9: no static split exists on 1 core"),
])
def test_set_up_errors_are_one_line_on_every_rank(tmp_path, teacher, args, message):
    from models import cloud_net, save_atomic

    ten = tmp_path / "ten-classes.pt"
    save_atomic(cloud_net(3, 32, 10).state_dict(), str(ten))
    argv = [a.replace("{ten}", str(ten)) for a in args]
    proc = distill(3, *argv, *(["--teacher", teacher] if "--teacher" not in argv else []), timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = errors(proc)
    assert message in line and "Traceback" not in proc.stderr


def test_a_stalled_cloud_ends_the_job_with_one_line_within_the_timeout(teacher):
    began = time.monotonic()
    proc = distill(2, "--teacher", teacher, "--nets", "1", "--method", "kd", "--timeout", "3", mode="stall",
                   timeout=120)
    took = time.monotonic() - began
    assert proc.returncode != 0
    (line,) = errors(proc)
    assert "rank 1: cloud rank 0 sent no logits for step 0 within 3 s (--timeout): it died or stalled" in line
    assert "Traceback" not in proc.stderr and took < 60


def test_an_edge_done_early_never_calls_a_slower_live_edge_dead(tmp_path, teacher):
    """Regression: the results were gathered on rank 0, here an edge (--cloud-rank 2) that finishes at once; its
    wait for rank 1 (alive, 4 x 1.2 s slower) was bounded by --timeout 3 s from when it arrived, so it called
    rank 1 dead.  The cloud gathers now: it serves until every edge has all its batches."""
    out = tmp_path / "r.json"
    proc = distill(3, "--cloud-rank", "2", "--timeout", "3", "--teacher", str(teacher), "--json", str(out),
                   mode="slow-rank-1")
    assert proc.returncode == 0 and not errors(proc), proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["cloud"]["rank"] == 2 and sorted(e["rank"] for e in report["edges"]) == [0, 1]
