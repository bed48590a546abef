"""Healing: the rack without its lost boards (pure), and ``aflkd launch --restart`` bringing ``aflkd serve`` through
kill -9s of its ranks with no image lost or served twice (checked from the log against the source and torch)."""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
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


def rows(log: Path) -> list:
    try:
        with sqlite3.connect(str(log), timeout=5) as db:
            return db.execute("SELECT image, top1, topk, run, served_at FROM results ORDER BY image").fetchall()
    except sqlite3.OperationalError:
        return []


@needs_mpiexec
@pytest.mark.slow
def test_kill_9_of_ranks_mid_stream_loses_and_duplicates_nothing(tmp_path):
    """Three kill -9s at random moments (ranks 1, 2, then 0, the root) under --restart; the stream completes."""
    log, images = tmp_path / "serve.db", 90
    proc = subprocess.Popen([str(AFLKD), "launch", "--topology", str(REPO / "hostfiles" / "local-3x1.toml"),
                             "--restart", "4", "--", "serve", "--images", str(images), "--size", "64", "--net",
                             "edge3", "--log", str(log), "--threads", "1", "--no-progress", "--deadline", "10"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    rng = random.Random(1)
    recovery = []
    try:
        for victim in (1, 2, 0):
            start = time.monotonic()
            target = len(rows(log)) + rng.randint(3, 12)
            while len(rows(log)) < target and proc.poll() is None and time.monotonic() - start < 90:
                time.sleep(0.05)
            pids = rank_pids_of(proc.pid)
            assert victim in pids, (victim, pids, proc.poll())
            os.kill(pids[victim], signal.SIGKILL)
            killed_at, runs_before = time.time(), max(r[3] for r in rows(log))
            while proc.poll() is None and not any(r[3] > runs_before for r in rows(log)):
                time.sleep(0.05)
            later = [r[4] for r in rows(log) if r[3] > runs_before]
            if later:
                recovery.append(min(later) - killed_at)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    served = rows(log)
    assert [r[0] for r in served] == list(range(images))  # 0 lost, 0 twice
    assert len({r[3] for r in served}) >= 4, err[-2000:]  # served over 4 runs: the first and 3 restarts
    assert err.count("restart ") >= 3
    from tests.test_serve_mpi import plain_torch_logits
    import torch

    sample = sorted(random.Random(2).sample(range(images), 12))
    want = plain_torch_logits("edge3", 64, 0, sample)
    for i, logits in zip(sample, want):
        topk = json.loads(served[i][2])
        assert [c for c, _ in topk] == torch.topk(logits, 5).indices.tolist(), i
    print(f"seconds from each kill -9 to the first image served again: {[round(s, 1) for s in recovery]}")


def rank_pids_of(launcher_pid: int) -> dict:
    """PMI rank -> pid for the rank processes under ``launcher_pid`` (found by walking /proc's parent links)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass

    def under(pid):
        while pid in parents and pid != 1:
            if pid == launcher_pid:
                return True
            pid = parents[pid]
        return False
    found = {}
    for pid in parents:
        if not under(pid) or pid == launcher_pid:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"PMI_RANK=")), None)
        if rank is not None and b"serve" in cmdline:
            found[int(rank)] = pid
    return found
