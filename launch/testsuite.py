"""``aflkd test``: the whole suite -- serial pytest, then MPI tests at several sizes.

Each MPI size runs ``mpiexec -n P python -m mpi4py -m launch.rank_pytest``:
every rank writes its own log and JUnit XML (so the terminal shows one report,
not P interleaved ones), ``python -m mpi4py`` aborts the job if a rank dies
outside pytest, and a timeout kills a hung run instead of waiting forever.
The counts come from every rank's XML: a test counts as run only if it was not
skipped, and a size where nothing ran is a failure.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["add_parser", "run_suite", "Counts", "read_junit"]

REPO = Path(__file__).resolve().parent.parent


def add_parser(sub) -> None:
    """The ``aflkd test`` command."""
    from .options import positive_int, positive_int_list

    test = sub.add_parser(
        "test",
        help="run the whole test suite (serial, then MPI at several sizes)",
        description="Serial tests with pytest, then MPI tests under mpiexec at each size; "
        "prints how many tests ran at each size and exits non-zero if any rank failed.",
    )
    test.add_argument("--mpi-sizes", type=positive_int_list, default="2,3,4", help="MPI sizes to run the MPI tests at")
    test.add_argument("--wide-mpi-sizes", type=positive_int_list, default="8",
                      help="larger MPI sizes at which only the tests marked 'wide' (clusters x stages) run")
    test.add_argument("--timeout", type=positive_int, default=1200, help="seconds before one pytest run is killed")
    test.add_argument("--logs", default="out/test-logs",
                      help="folder for per-rank logs and JUnit XML, relative to the checkout")
    test.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    test.set_defaults(one_process=True)
    test.set_defaults(func=lambda args: run_suite(args.mpi_sizes, args.pytest_args, args.logs, args.timeout,
                                                   args.wide_mpi_sizes))


@dataclass
class Counts:
    tests: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0

    @property
    def ran(self) -> int:
        return self.tests - self.skipped

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.errors == 0


def read_junit(path: Path) -> Counts:
    """Counts of one pytest JUnit XML file (missing file: nothing ran)."""
    if not path.exists():
        return Counts()
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = Counts()
    for s in suites:
        c.tests += int(s.get("tests", 0))
        c.failed += int(s.get("failures", 0))
        c.errors += int(s.get("errors", 0))
        c.skipped += int(s.get("skipped", 0))
    return c


def _mpiexec() -> str:
    """The mpiexec beside this Python (the venv's MPICH), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("no mpiexec found; install the project with its [mpich] extra or a system MPI")
    return found


def _run(cmd: list[str], timeout: int, log: Path | None = None) -> int:
    """Run ``cmd`` in its own process group; kill the whole group on timeout."""
    out = open(log, "w") if log else None
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT if out else None,
                            start_new_session=True)
    def end_children(signum, frame):  # SIGTERM reaches only us: the run's own session would go on without us
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, end_children)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"TIMEOUT after {timeout}s: {' '.join(cmd)} (killed)", flush=True)
        return 124
    except KeyboardInterrupt:  # Ctrl-C reaches only our group: the run's own session would go on without us
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if out:
            out.close()


def _mpi_run(py: str, n: int, marks: str, label: str, logdir: Path, pytest_args: Sequence[str], timeout: int):
    """One pytest run under ``mpiexec -n n`` of the tests ``marks`` selects: (label, worst rank's counts, exit)."""
    print(f"== MPI tests under mpiexec -n {n} (pytest --with-mpi -m '{marks}') ==", flush=True)
    rundir = logdir / f"{label.split()[0]}-n{n}"
    rundir.mkdir()
    code = _run([_mpiexec(), "-n", str(n), py, "-m", "mpi4py", "-m", "launch.rank_pytest", str(rundir),
                 "--with-mpi", "-m", marks, "--color=no", "-q", *pytest_args, *mpi_test_files()], timeout,
                log=rundir / "mpiexec.log")
    per_rank = [read_junit(rundir / f"rank{r}.xml") for r in range(n)]
    failed_ranks = [r for r, c in enumerate(per_rank) if not c.ok]
    rank0_log = rundir / "rank0.log"
    if rank0_log.exists():
        lines = rank0_log.read_text().splitlines()
        ok_run = code == 0 and not failed_ranks
        print(f"rank 0: {lines[-1] if lines else '(empty log)'}" if ok_run else rank0_log.read_text(), flush=True)
    for r in failed_ranks[:2]:
        if r != 0:
            print(f"--- rank {r} log ---\n{(rundir / f'rank{r}.log').read_text()}", flush=True)
    if code != 0 and not failed_ranks:
        print((rundir / "mpiexec.log").read_text()[-4000:], flush=True)
    worst = per_rank[failed_ranks[0]] if failed_ranks else per_rank[0]
    return label, worst, code


def mpi_test_files() -> list[str]:
    """The test files that hold MPI tests: each rank of an MPI run collects only these (collecting every file
    costs each rank seconds of imports)."""
    files = sorted(p for p in (REPO / "tests").glob("test_*.py") if "mark.mpi" in p.read_text())
    return [str(p.relative_to(REPO)) for p in files] or ["tests"]


def serial_workers() -> list[str]:
    """pytest-xdist's options for the serial run: one worker more than cores (many tests wait on a
    subprocess), work stealing (a few end-to-end tests take 20-50 s: an idle worker takes queued tests from a
    busy one, so the run does not end on one worker's tail), none where xdist is missing or there is one core."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ["-n", str(cores + 1), "--dist", "worksteal"] if cores > 1 else []


def run_suite(sizes: Sequence[int], pytest_args: Sequence[str], logs: str, timeout: int,
              wide_sizes: Sequence[int] = ()) -> int:
    logdir = (REPO / logs).resolve()
    if logdir.exists():
        shutil.rmtree(logdir)
    logdir.mkdir(parents=True)
    py = sys.executable
    summary: list[tuple[str, Counts, int]] = []

    print("== serial tests (pytest -m 'not mpi') ==", flush=True)
    serial_xml = logdir / "serial.xml"
    code = _run([py, "-m", "pytest", "-m", "not mpi", "--color=no", f"--junitxml={serial_xml}", *serial_workers(),
                 *pytest_args, "tests"], timeout)
    summary.append(("serial", read_junit(serial_xml), code))

    # every MPI test at each size; the tests marked ``wide`` (clusters x stages) also at the wide sizes
    runs = [(n, "mpi", f"mpi n={n}") for n in sizes] + [(n, "mpi and wide", f"wide n={n}") for n in wide_sizes]
    for n, marks, label in runs:
        summary.append(_mpi_run(py, n, marks, label, logdir, pytest_args, timeout))

    print("\n== summary ==")
    status = 0
    for label, c, code in summary:
        ok = code == 0 and c.ok and c.ran > 0
        status |= 0 if ok else 1
        why = "" if ok else ("  <- nothing ran" if c.ran == 0 and c.ok and code in (0, 5) else "  <- FAILED")
        print(f"{label:<10} {c.ran:4d} ran, {c.skipped:3d} skipped, {c.failed + c.errors:3d} failed (exit {code}){why}")
    total = sum(c.ran for _, c, _ in summary)
    failed = sum(c.failed + c.errors for _, c, _ in summary)
    skipped = sum(c.skipped for _, c, _ in summary)
    print(f"{total - failed} passed, {failed} failed, {skipped} skipped")
    return status
