"""``aflkd test`` ends the runs it started when it is ended itself (SIGTERM as from ``timeout`` or a CI runner)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).parent.parent


def _children_of_run(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_aflkd_test_ends_its_pytest_run(tmp_path, sig):
    logs = tmp_path / f"logs-{sig.name}"
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "test", "--mpi-sizes", "2", "--logs", str(logs),
                             "--", "-k", "test_random_stacks_match_unsplit or test_readme"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child = str(logs / "serial.xml")  # in the serial pytest's command line only, not in the suite's own
    deadline = time.monotonic() + 60
    while not _children_of_run(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _children_of_run(child), "the suite never started its pytest run"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    time.sleep(1.0)
    left = [p for p in _children_of_run(child) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    assert not left, [p.info["cmdline"] for p in left]
    assert proc.returncode != 0
