"""``aflkd plan``, ``aflkd launch`` and ``aflkd ranks``: command lines built for each MPI, and the emitted lines
run for real on this host from localhost topologies (MPICH from the venv)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main
from tests.signals import sigint_as_from_a_terminal
from launch.hostfile import check_hostfile, read_hostfile
from launch.launcher import (detect_flavour, flavour_from_version, inner_command, local_only, mpiexec_argv,
                             venv_bin)
from launch.rankcheck import placement_problems
from launch.topology import load_topology
from runtime.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
HOSTFILES = REPO / "hostfiles"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
AFLKD = Path(sys.executable).parent / "aflkd"
needs_mpiexec = pytest.mark.skipif(not (MPIEXEC.exists() and AFLKD.exists()), reason="no mpiexec/aflkd beside Python")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("aflkd: error:")]


@pytest.mark.parametrize("text, flavour", [
    ("HYDRA build details:\n    Version:                                 5.0.2\n", "mpich"),
    ("mpiexec (OpenRTE) 4.1.2\n\nReport bugs to http://www.open-mpi.org/community/help/\n", "openmpi"),
    ("mpirun (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/\n", "openmpi"),
    ("Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619\n", "mpich"),
    ("mpiexec: unknown option --version\n", None),
])
def test_flavour_from_version_output(text, flavour):
    assert flavour_from_version(text) == flavour


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_detect_flavour_runs_mpiexec_version(tmp_path):
    if MPIEXEC.exists():
        assert detect_flavour(str(MPIEXEC)) == "mpich"  # the venv's MPICH wheel
    assert detect_flavour(_script(tmp_path / "ompi", "echo 'mpirun (Open MPI) 5.0.3'\n")) == "openmpi"
    with pytest.raises(UsageError, match=r"cannot tell which MPI .*odd is \(--version said: 'LAM 7'\); give --mpi"):
        detect_flavour(_script(tmp_path / "odd", "echo 'LAM 7'\n"))
    with pytest.raises(UsageError, match=r"mpiexec .*missing not found; give --mpiexec PATH"):
        detect_flavour(str(tmp_path / "missing"))


def test_command_lines_for_each_mpi():
    local = load_topology(HOSTFILES / "local-2x4.toml")
    boards = load_topology(HOSTFILES / "testbed.toml")
    inner = ["/v/bin/aflkd", "ranks"]
    topo = os.path.abspath(local.path)
    assert local_only(local) and not local_only(boards)
    assert mpiexec_argv(local, "mpich", "h", inner, "mpx", local=True) == \
        ["mpx", "-f", "h", "-n", "8", "-launcher", "fork", "-genv", "AFLKD_TOPOLOGY", topo, *inner]
    assert mpiexec_argv(local, "openmpi", "h", inner, "mpirun", local=True, as_root=True, cores=2) == \
        ["mpirun", "--hostfile", "h", "-n", "8", "--map-by", "slot", "--allow-run-as-root", "--oversubscribe",
         "--bind-to", "none", "-x", f"AFLKD_TOPOLOGY={topo}", *inner]
    assert "--oversubscribe" not in mpiexec_argv(local, "openmpi", "h", inner, local=True, cores=8)
    on_boards = mpiexec_argv(boards, "openmpi", "h", inner, "mpirun", cores=2)
    assert "--oversubscribe" not in on_boards and "--allow-run-as-root" not in on_boards and "-n" in on_boards
    assert on_boards[on_boards.index("-n") + 1] == "15"
    assert mpiexec_argv(boards, "mpich", "h", inner, with_cloud=True)[4] == "16"
    assert "-launcher" not in mpiexec_argv(boards, "mpich", "h", inner)


def test_inner_command_is_the_venvs_aflkd():
    assert inner_command(["aflkd", "ranks"], Path("/v/bin")) == ["/v/bin/aflkd", "ranks"]
    assert inner_command(["--", "/x/.venv/bin/aflkd", "bench", "layers"], Path("/v/bin")) == \
        ["/v/bin/aflkd", "bench", "layers"]
    assert inner_command(["bench", "layers"])[0] == str(venv_bin() / "aflkd")
    with pytest.raises(UsageError, match="give the aflkd command to run after '--'"):
        inner_command(["aflkd"])
    with pytest.raises(UsageError, match="cannot be another 'aflkd launch'"):
        inner_command(["launch", "--topology", "t"])


def test_placement_problems():
    assert placement_problems(["localhost", "localhost"], [("vm", "localhost"), ("vm", "localhost")]) == []
    assert placement_problems(["a", "b"], [("a", None), ("b", None)]) == []
    assert placement_problems(["a", "b"], [("h", "a"), ("h", "a")]) == \
        ["rank 1 was placed on a, the topology puts it on b"]
    assert placement_problems(["a", "a"], [("h1", None), ("h2", None)]) == \
        ["ranks 0 and 1 share address a in the topology but run on h1 and h2"]
    # one rank per board and no PMI_HOSTNAME (Open MPI): the OS's answer is what catches a swap
    assert placement_problems(["a", "b"], [("b", None, False), ("a", None, False)]) == \
        ["rank 0 runs on b, which is not a, where the topology puts it",
         "rank 1 runs on a, which is not b, where the topology puts it"]
    assert placement_problems(["a", "b"], [("a", None, True), ("b", None, None)]) == []  # None: cannot tell


def test_is_this_host_asks_the_os():
    import socket

    from launch.rankcheck import is_this_host

    assert is_this_host("localhost") and is_this_host("127.0.0.1") and is_this_host(socket.gethostname())
    assert is_this_host("192.0.2.1") is False  # TEST-NET-1: resolves (a literal), bound to no interface here
    assert is_this_host("no-such-host.invalid") is None


@needs_mpiexec
def test_a_rank_on_another_hosts_address_fails_without_pmi_hostname(tmp_path):
    """Rank 1 put on 192.0.2.1 by the topology but run here (as a swapped Open MPI placement would be):
    every rank ends with status 2 and one line, though MPICH gives no hostfile entry to compare."""
    topology = tmp_path / "swap.toml"
    topology.write_text((HOSTFILES / "local-2x1.toml").read_text().replace(
        'name = "right"\naddress = "localhost"', 'name = "right"\naddress = "192.0.2.1"'))
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "launch.cli", "ranks", "--topology",
                           str(topology)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "rank 1 runs on" in lines[0] and "which is not 192.0.2.1" in lines[0], proc.stderr


def test_plan_prints_the_testbed_map_and_writes_hostfiles_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--topology", str(HOSTFILES / "testbed.toml"), "--hostfile-dir", str(tmp_path / "h"),
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 clusters x 5 stages = 15 ranks" in text
    assert "cloud: pc (pc): not a rank of inference jobs; rank 15 with --with-cloud" in text
    rows = [line.split() for line in text.splitlines() if line[:1].isdigit()]
    assert [r[0] for r in rows] == [str(i) for i in range(15)]
    assert rows[0][:6] == ["0", "jetson-0", "jetson-0", "master", "0", "0"]
    assert rows[14][:6] == ["14", "pi-11", "pi-11", "worker", "2", "4"]
    report = json.loads(out.read_text())
    shares = ", ".join(f"{v:.1%}" for v in report["stages_plan"]["shares"])
    assert f"cluster speeds (sum of devices): 6, 6, 6; planned shares of the rows: {shares}" in text
    assert (report["size"], report["clusters"], report["stages"]) == (15, 3, 5)
    assert [r["rank"] for r in report["ranks"]] == list(range(15)) and report["ranks"][5]["host"] == "jetson-1"
    topology = load_topology(HOSTFILES / "testbed.toml")
    for flavour, flag in (("openmpi", "--hostfile"), ("mpich", "-f")):
        argv = report["mpiexec"][flavour]
        hostfile = argv[argv.index(flag) + 1]
        assert hostfile == report["hostfiles"][flavour] and argv[argv.index("-n") + 1] == "15"
        check_hostfile(topology, read_hostfile(hostfile, flavour))  # the written hostfile realises the map
        assert f"{shlex.join(argv)}" in text and argv[-2:] == [str(venv_bin() / "aflkd"), "ranks"]


def test_plan_and_launch_refuse_bad_input_in_one_line(tmp_path, capsys):
    assert main(["plan", "--topology", str(tmp_path / "none.toml"), "--hostfile-dir", str(tmp_path)]) == 2
    assert main(["launch", "--topology", str(HOSTFILES / "local-2x1.toml"), "--dry-run", "--mpi", "mpich",
                 "--hostfile-dir", str(tmp_path), "--", "aflkd", "bench", "layers", "--net", "edge9"]) == 2
    assert main(["launch", "--topology", str(HOSTFILES / "local-2x1.toml"), "--dry-run", "--mpi", "mpich"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 3
    assert "none.toml not found" in errors[0] and "unknown net 'edge9'" in errors[1]
    assert "give the aflkd command to run after '--'" in errors[2]


def test_launch_dry_run_prints_the_command_for_either_mpi(tmp_path, capsys):
    for flavour in ("mpich", "openmpi"):
        assert main(["launch", "--topology", str(HOSTFILES / "local-3x1.toml"), "--dry-run", "--mpi", flavour,
                     "--mpiexec", "/opt/mpi/bin/mpiexec", "--hostfile-dir", str(tmp_path), "--", "aflkd",
                     "ranks"]) == 0
        argv = shlex.split(capsys.readouterr().out.strip())
        assert argv[0] == "/opt/mpi/bin/mpiexec" and argv[argv.index("-n") + 1] == "3"
        assert argv[-2:] == [str(venv_bin() / "aflkd"), "ranks"]
        hostfile = tmp_path / f"local-3x1-{flavour}.hosts"
        assert str(hostfile) in argv
        check_hostfile(load_topology(HOSTFILES / "local-3x1.toml"), read_hostfile(hostfile, flavour))


@needs_mpiexec
def test_launch_runs_a_localhost_topology_and_every_rank_checks_its_place():
    """The issue's check: the emitted mpiexec line, run on one host from a localhost topology."""
    proc = subprocess.run([str(AFLKD), "launch", "--topology", "hostfiles/local-2x1.toml", "--", "aflkd", "ranks"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "-n 2 -launcher fork -genv AFLKD_TOPOLOGY" in proc.stderr  # the line it ran
    rows = [line.split() for line in proc.stdout.splitlines() if line[:1].isdigit()]
    assert [r[:6] for r in rows] == [["0", "left", "localhost", "master", "0", "0"],
                                     ["1", "right", "localhost", "master", "1", "0"]]
    assert "every rank is where the topology puts it" in proc.stdout


@needs_mpiexec
def test_the_mpich_line_printed_by_plan_runs(tmp_path, capsys):
    report = tmp_path / "plan.json"
    assert main(["plan", "--topology", str(HOSTFILES / "local-1x2.toml"), "--hostfile-dir", str(tmp_path),
                 "--json", str(report)]) == 0
    assert shlex.join(json.loads(report.read_text())["mpiexec"]["mpich"]) in capsys.readouterr().out
    argv = json.loads(report.read_text())["mpiexec"]["mpich"]
    assert argv[0] == "mpiexec"
    proc = subprocess.run([str(MPIEXEC), *argv[1:]], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line[:1].isdigit()]
    assert [(r[1], r[3], r[5], r[6]) for r in rows] == [("fast", "master", "0", "2"), ("slow", "worker", "1", "1")]


@needs_mpiexec
def test_ranks_with_the_wrong_world_size_fails_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "ranks", "--topology", "hostfiles/local-2x1.toml"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        "aflkd: error: this job has 1 ranks but hostfiles/local-2x1.toml has 2 (devices; the cloud is not a rank "
        "of it); run it with mpiexec -n 2, or use 'aflkd launch --topology hostfiles/local-2x1.toml -- ...' "
        "which picks -n for you"]


def test_ctrl_c_in_any_gap_after_popen_still_ends_mpiexec_first(tmp_path, monkeypatch):
    """A Ctrl-C that lands just as launch puts its usual SIGINT handler back (the moment the last CI run hit:
    mpiexec was left running, holding the pipes) surfaces only once mpiexec has ended."""
    import launch.launcher as launcher
    fake = _script(tmp_path / "mpiexec", "sleep 1\n")
    started: list[subprocess.Popen] = []
    real_popen, real_signal = subprocess.Popen, signal.signal

    def popen(argv):
        started.append(real_popen(argv))
        return started[-1]

    def signal_then_ctrl_c(signum, handler):  # put the handler back, then a Ctrl-C arrives at once
        previous = real_signal(signum, handler)
        if handler is signal.default_int_handler:
            os.kill(os.getpid(), signal.SIGINT)
        return previous

    before = real_signal(signal.SIGINT, signal.default_int_handler)  # as under a terminal, even if CI ignores it
    try:
        monkeypatch.setattr(launcher.subprocess, "Popen", popen)
        monkeypatch.setattr(launcher.signal, "signal", signal_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            launcher._run([fake])
        assert started and started[0].poll() is not None  # mpiexec had ended before the interrupt surfaced
    finally:
        monkeypatch.undo()
        real_signal(signal.SIGINT, before)
        for proc in started:
            proc.kill()
            proc.wait()


def test_ctrl_c_ends_mpiexec_and_exits_130(tmp_path):
    """Ctrl-C sent to launch alone (not its group): it passes SIGINT on to mpiexec and waits for it."""
    marker = tmp_path / "got-int"
    fake = _script(tmp_path / "mpiexec", f"trap 'touch {marker}; exit 9' INT\necho started\n"
                   "while true; do sleep 0.1; done\n")
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", "--topology",
                             str(HOSTFILES / "local-2x1.toml"), "--mpi", "mpich", "--mpiexec", fake,
                             "--hostfile-dir", str(tmp_path), "--", "aflkd", "ranks"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=sigint_as_from_a_terminal)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "aflkd: interrupted" in err
    deadline = time.time() + 5
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists()  # mpiexec got the SIGINT (it ends its ranks)


def test_a_launch_that_mpiexec_could_not_start_says_what_to_check(tmp_path):
    """mpiexec's status 255 (no proxy started on some host) came with Hydra's lines only: now one aflkd line,
    naming each address that does not resolve here (asked of the OS, as the real resolver would answer)."""
    from launch.launcher import launch_failed_line
    from launch.rankcheck import is_this_host

    path = tmp_path / "t.toml"
    path.write_text('[[host]]\nname = "left"\naddress = "nosuchhost.invalid"\nrole = "master"\ncluster = 0\n'
                    '[[host]]\nname = "right"\naddress = "nosuchhost.invalid"\nrole = "master"\ncluster = 1\n'
                    '[[host]]\nname = "me"\naddress = "localhost"\nrole = "master"\ncluster = 2\n')
    line = launch_failed_line(load_topology(path), is_this_host)
    assert line == (f"aflkd: error: mpiexec could not start the job on every host of {path} (status 255); the "
                    "address 'nosuchhost.invalid' (left, right) does not resolve on this machine: check that each "
                    "host answers 'ssh ADDRESS true' without a password and has this checkout and venv at the same "
                    "path")
    assert "resolve" not in launch_failed_line(load_topology(REPO / "hostfiles" / "local-2x1.toml"), is_this_host)
