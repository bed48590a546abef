"""``aflkd serve`` under mpiexec: every logged result equals plain torch's, each image exactly once, across a
re-plan and a resumed run; bad input is one line on every rank."""
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")


def aflkd(ranks: int, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", "launch.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def plain_torch_logits(net: str, size: int, seed: int, images: list) -> torch.Tensor:
    """The unsplit model as ``serve`` builds it (seeded weights and BatchNorm statistics), run by torch alone."""
    from models import build_model, randomize_batchnorm

    torch.manual_seed(seed)
    model = randomize_batchnorm(build_model(net, 3, size, 10), torch.Generator().manual_seed(seed)).eval()
    with torch.no_grad():
        return torch.cat([model(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + i))) for i in images])


def assert_top5_equal_torch(rows: list, net: str, size: int, seed: int) -> None:
    """Every logged result (rows of :func:`logged`) has plain torch's top-5 classes and logits (within 1e-4)."""
    want = plain_torch_logits(net, size, seed, [r[0] for r in rows])
    for (image, top1, topk, _, _), logits in zip(rows, want):
        topk = json.loads(topk)
        values, classes = torch.topk(logits, 5)
        assert top1 == int(classes[0]) and [c for c, _ in topk] == classes.tolist(), image
        assert max(abs(v - float(w)) for (_, v), w in zip(topk, values)) <= 1e-4, image


def logged(path) -> list:
    return sqlite3.connect(str(path)).execute("SELECT image, top1, topk, epoch, run FROM results ORDER BY image").fetchall()


@needs_mpiexec
@pytest.mark.slow
def test_three_ranks_serve_each_image_once_equal_to_torch_across_a_replan_and_a_resume(tmp_path):
    log, report = tmp_path / "serve.db", tmp_path / "serve.json"
    common = ["serve", "--net", "edge3", "--size", "64", "--seed", "3", "--log", str(log), "--threads", "1",
              "--no-progress", "--rebalance-window", "4"]
    first = aflkd(3, *common, "--images", "24", "--slow", "2:0.25@4", "--json", str(report))
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(report.read_text())
    assert summary["served_now"] == 24 and summary["switches"], summary  # rank 2 at a quarter speed: re-planned
    switch = summary["switches"][0]
    assert switch["weights"][2] < min(switch["weights"][:2])  # the slow rank got fewer rows
    second = aflkd(3, *common, "--images", "30")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "serving 6 of 30 images" in second.stdout and "24 already in" in second.stdout, second.stdout
    rows = logged(log)
    assert [r[0] for r in rows] == list(range(30))  # each image exactly once
    assert [r[4] for r in rows] == [1] * 24 + [2] * 6
    assert {r[3] for r in rows[:24]} >= {0, 1}  # served under two plan epochs
    assert_top5_equal_torch(rows, "edge3", 64, 3)


@needs_mpiexec
@pytest.mark.slow
def test_a_pipeline_serves_each_image_once_equal_to_torch_across_a_recut(tmp_path):
    """--stages 2 over 4 ranks (2 clusters x 2 stages): stage 1 of cluster 1 at a fifth of its speed from image
    10, so the cuts move layers off stage 1; every logged top-5 equals plain torch's, each image once."""
    log, report = tmp_path / "pipe.db", tmp_path / "pipe.json"
    proc = aflkd(4, "serve", "--stages", "2", "--chunk", "5", "--net", "edge3", "--size", "48", "--seed", "4",
                 "--log", str(log), "--threads", "1", "--no-progress", "--rebalance-window", "10",
                 "--images", "50", "--slow", "3:0.2@10", "--json", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(report.read_text())
    assert summary["served_now"] == 50 and summary["switches"], summary
    first_cut = int(proc.stdout.split("cuts [0, ")[1].split(",")[0])
    assert summary["switches"][0]["bounds"][1] > first_cut, (first_cut, summary["switches"])  # layers off stage 1
    rows = logged(log)
    assert [r[0] for r in rows] == list(range(50)) and {r[3] for r in rows} >= {0, 1}
    assert_top5_equal_torch(rows, "edge3", 48, 4)


@needs_mpiexec
@pytest.mark.parametrize("ranks, args, message", [
    (2, ["--slow", "5:0.5"], "--slow names rank 5 but the job has 2 ranks"),
    (2, ["--weights", "1,1,1"], "got 3 rank weights for 2 ranks"),
    (2, ["--slow", "1:2"], "0 < speed <= 1"),
    (2, ["--source", "folder:/nonexistent/x"], "--source folder:/nonexistent/x: no such folder"),
    (3, ["--stages", "2"], "--stages 2 does not divide the job's 3 ranks"),
    (4, ["--stages", "2", "--weights", "1,1,1,1"], "got 4 rank weights for 2 ranks"),
])
def test_bad_input_is_one_line_on_every_rank(tmp_path, ranks, args, message):
    proc = aflkd(ranks, "serve", "--images", "4", "--size", "32", "--log", str(tmp_path / "s.db"), *args, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aflkd: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


@needs_mpiexec
def test_a_log_that_is_not_a_log_is_refused_on_every_rank_before_any_image(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite " * 200)
    proc = aflkd(2, "serve", "--images", "4", "--size", "32", "--log", str(junk), timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aflkd: error:")]
    assert len(lines) == 1 and "not a results log" in lines[0], proc.stderr[-2000:]
    assert junk.read_text().startswith("not sqlite")
