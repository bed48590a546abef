"""Healing: the rack without its lost boards (pure), and ``aflkd launch --restart`` bringing ``aflkd serve`` through
kill -9s of its ranks with no image lost or served twice (checked from the log against the source and torch)."""
import json
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from launch.healing import answering, should_restart, surviving
from launch.topology import parse_topology
from runtime.errors import UsageError

REPO = Path(__file__).parent.parent
AFLKD = Path(sys.executable).parent / "aflkd"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
needs_mpiexec = pytest.mark.skipif(not (MPIEXEC.exists() and AFLKD.exists()), reason="no mpiexec/aflkd here")

RACK = """
[[host]]
name = "jetson-0"
address = "10.0.0.10"
role = "master"
cluster = 0
[[host]]
name = "pi-0"
address = "10.0.0.11"
role = "worker"
cluster = 0
slots = 2
[[host]]
name = "jetson-1"
address = "10.0.0.20"
role = "master"
cluster = 1
[[host]]
name = "pi-1"
address = "10.0.0.21"
role = "worker"
cluster = 1
slots = 2
[[host]]
name = "cloud"
address = "10.0.0.1"
role = "cloud"
"""


def test_a_lost_worker_trims_every_cluster_to_the_same_stages():
    rack = parse_topology(RACK)
    assert rack.world_size() == 6
    left, notes = surviving(rack, ["pi-1"])
    assert [d.host for d in left.devices] == ["jetson-0", "jetson-1"]
    assert left.clusters == 2 and left.stages == 1 and left.world_size() == 2
    assert any("pi-0" in n for n in notes)


def test_a_lost_master_takes_its_cluster_and_nothing_else():
    left, notes = surviving(parse_topology(RACK), ["jetson-0"])
    assert [d.host for d in left.devices] == ["jetson-1", "pi-1", "pi-1"]
    assert left.cloud is not None and any("lost its master jetson-0" in n for n in notes)


def test_losing_everything_or_an_unknown_host_is_one_line():
    with pytest.raises(UsageError, match="no cluster has a device left"):
        surviving(parse_topology(RACK), ["jetson-0", "jetson-1"])
    with pytest.raises(UsageError, match="no host named nano-9"):
        surviving(parse_topology(RACK), ["nano-9"])


def test_only_hosts_that_answer_are_kept_and_local_ones_always_answer():
    rack = parse_topology(RACK.replace('"10.0.0.1"', '"localhost"'))
    asked = []

    def probe(address, timeout_s):
        asked.append(address)
        return address != "10.0.0.21"
    assert answering(rack, lambda a: a == "localhost", probe=probe) == ["jetson-0", "pi-0", "jetson-1", "cloud"]
    assert "localhost" not in asked


@pytest.mark.parametrize("code, done, restarts, again", [
    (0, 0, 3, False), (2, 0, 3, False), (130, 0, 3, False), (137, 0, 3, True), (3, 2, 3, True), (3, 3, 3, False),
    (1, 0, 0, False)])
def test_which_endings_are_restarted(code, done, restarts, again):
    assert should_restart(code, done, restarts) is again


@needs_mpiexec
@pytest.mark.slow
def test_kill_9_of_ranks_mid_stream_loses_and_duplicates_nothing(tmp_path):
    """`aflkd chaos serve`: kill -9 of rank 2, then rank 0 (the root) at random moments under `launch --restart`;
    the log is then checked here, against the source's ids and plain torch (five kills: results/serving/)."""
    log, report, images = tmp_path / "serve.db", tmp_path / "chaos.json", 60
    proc = subprocess.run([str(AFLKD), "chaos", "serve", "--kills", "2,0", "--images", str(images), "--log",
                           str(log), "--workdir", str(tmp_path), "--json", str(report), "--gap", "3,12", "--",
                           "--net", "edge3", "--size", "64", "--threads", "1", "--deadline", "10"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with sqlite3.connect(str(log)) as db:
        served = db.execute("SELECT image, topk, run FROM results ORDER BY image").fetchall()
    assert [r[0] for r in served] == list(range(images))  # 0 lost, 0 twice
    assert len({r[2] for r in served}) == 3  # the first run and one per kill
    figures = json.loads(report.read_text())
    assert [k["rank"] for k in figures["kills"]] == [2, 0] and figures["restarts_said"] == 2
    from tests.test_serve_mpi import plain_torch_logits
    import torch

    sample = sorted(random.Random(2).sample(range(images), 12))
    for i, logits in zip(sample, plain_torch_logits("edge3", 64, 0, sample)):
        assert [c for c, _ in json.loads(served[i][1])] == torch.topk(logits, 5).indices.tolist(), i
    print(proc.stdout)


@pytest.mark.parametrize("argv, message", [
    (["--kills", "5"], "--kills: rank 5 is not a rank of the 3-rank serve job of"),
    (["--kills", "1", "--topology", "hostfiles/testbed.toml"],
     "chaos serve kills ranks by process id on this host, but jetson-0, pi-0"),
])
def test_chaos_refuses_kills_it_cannot_do_before_the_job_starts(tmp_path, argv, message):
    """It started the job, then said 'rank 5 is not running ... is the stream too short?'."""
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "chaos", "serve", "--images", "20",
                           "--workdir", str(tmp_path / "w"), *argv], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2 and "$ " not in proc.stdout  # the launch line is never printed
    assert proc.stderr.strip().splitlines()[-1].startswith("aflkd: error: ") and message in proc.stderr
