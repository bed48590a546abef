"""``aflkd launch``: run an aflkd command on every rank of a topology through the installed mpiexec.

What it builds (and ``--dry-run`` prints): the installed MPI's flavour, detected
from ``mpiexec --version`` (MPICH's Hydra or Open MPI); a hostfile whose line
order is the rank map (:mod:`launch.hostfile`); ``-n`` from the topology; the
topology's absolute path exported to every rank as ``$AFLKD_TOPOLOGY`` (``-genv``
for Hydra, ``-x`` for Open MPI, which forwards no variable unasked); and the
inner command as ``<venv>/bin/aflkd ...``, the venv of this Python.

Assumptions for real boards: the same checkout and venv at the same path on
every host (the inner command and the topology path are used as they are
here), passwordless ssh from this host to the others, one MPI installation of
the same flavour everywhere.  On one host (every address local): Hydra gets
``-launcher fork`` (no ssh); Open MPI gets ``--allow-run-as-root`` when run as
root and ``--oversubscribe --bind-to none`` only when there are more ranks than
cores.  The command builder is pure (:func:`mpiexec_argv`), so ``aflkd plan``
prints the same lines.
"""
from __future__ import annotations

import os
import shlex
import textwrap
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from runtime.errors import UsageError

from . import options
from .healing import answering, is_this_host, should_restart, surviving
from .hostfile import FLAVOURS, write_hostfile
from .topology import TOPOLOGY_ENV, Topology, load_topology

__all__ = [
    "add_parser", "LOCAL_ADDRESSES", "default_mpiexec", "venv_bin", "flavour_from_version", "detect_flavour",
    "local_only", "inner_command", "check_inner_command", "mpiexec_argv", "hostfile_name", "host_cores",
]

LOCAL_ADDRESSES = ("localhost", "127.0.0.1")
GRACE_S = 10
"""After Ctrl-C, how long mpiexec gets to end its ranks before it is killed."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "launch",
        help="run an aflkd command on every rank of a topology (builds and runs mpiexec)",
        description=textwrap.fill(
            "Run an aflkd command under mpiexec with the rank count, hostfile and rank order of a topology "
            "file (docs/topology.md).  Detects MPICH (Hydra) or Open MPI from 'mpiexec --version', writes the "
            "hostfile, exports $AFLKD_TOPOLOGY (the topology's absolute path) to every rank and runs "
            "<venv>/bin/aflkd COMMAND on each.  The exit status is mpiexec's; Ctrl-C ends the job.  On boards: "
            "same checkout and venv path on every host, passwordless ssh, one MPI everywhere."
        ),
        epilog=(
            "examples:\n"
            "  aflkd launch --topology hostfiles/local-2x2.toml -- aflkd ranks\n"
            "  aflkd launch --topology hostfiles/testbed.toml --dry-run -- aflkd bench layers --net edge3\n"
            "  aflkd launch --topology hostfiles/local-3x1.toml --restart 5 -- serve --images 500 --log out/s.db\n"
        ),
        formatter_class=options.ExamplesFormatter,
    )
    p.add_argument("--topology", required=True, help="topology file (TOML; shipped ones: hostfiles/*.toml)")
    p.add_argument("--dry-run", action="store_true", help="print the mpiexec command and exit")
    p.add_argument("--mpiexec", default=None, metavar="PATH",
                   help="mpiexec to use (default: the one beside this Python, i.e. the venv's, else PATH's)")
    p.add_argument("--mpi", choices=("auto", *FLAVOURS), default="auto",
                   help="MPI flavour; auto asks 'mpiexec --version'")
    p.add_argument("--hostfile-dir", default=None, metavar="DIR",
                   help="where the hostfile is written (default: a temporary file, removed after the run; "
                   "kept with --dry-run)")
    p.add_argument("--with-cloud", action="store_true",
                   help="give the topology's cloud host a rank too (the last one); inference jobs leave it out")
    p.add_argument("--restart", type=options.non_negative_int, default=0, metavar="N",
                   help="rerun the command up to N times when the job ends with a fault (any status but 0, 2 = bad "
                   "input and 130 = Ctrl-C), on the topology's hosts that answer then (ssh HOST true; this host "
                   "always does): a board that died is left out, one that came back is admitted. 'aflkd serve' "
                   "resumes from its --log, so no image is lost or served twice")
    p.add_argument("command", nargs="...", metavar="-- COMMAND",
                   help="the aflkd command every rank runs, after '--' (a leading 'aflkd' is optional)")
    p.set_defaults(func=_launch, one_process=True)


def default_mpiexec() -> str:
    """The mpiexec beside this Python (the venv's MPICH wheel), else the first on PATH."""
    beside = venv_bin() / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise UsageError("no mpiexec found beside this Python or on PATH; install the project with its [mpich] "
                         "extra or a system MPI, or give --mpiexec PATH")
    return found


def venv_bin() -> Path:
    """This Python's bin folder, symlinks kept (a venv's python links to the system one)."""
    return Path(os.path.abspath(sys.executable)).parent


def flavour_from_version(text: str) -> Optional[str]:
    """``openmpi``, ``mpich`` (any Hydra: MPICH, Intel MPI, MVAPICH) or None, from ``mpiexec --version``."""
    lowered = text.lower()
    if "open mpi" in lowered or "openrte" in lowered or "prrte" in lowered:
        return "openmpi"
    if "hydra" in lowered or "mpich" in lowered or "intel(r) mpi" in lowered:
        return "mpich"
    return None


def detect_flavour(mpiexec: str) -> str:
    """Run ``mpiexec --version`` and name its flavour, or refuse in one line."""
    try:
        done = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise UsageError(f"mpiexec {mpiexec} not found; give --mpiexec PATH") from None
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UsageError(f"cannot run '{mpiexec} --version' ({err}); give --mpi mpich or --mpi openmpi") from None
    flavour = flavour_from_version(done.stdout + done.stderr)
    if flavour is None:
        first = (done.stdout + done.stderr).strip().splitlines()[:1] or ["(no output)"]
        raise UsageError(f"cannot tell which MPI {mpiexec} is (--version said: {first[0]!r}); "
                         "give --mpi mpich or --mpi openmpi")
    return flavour


def local_only(topology: Topology, with_cloud: bool = False, hostname: Optional[str] = None) -> bool:
    """Whether every rank's address is this host (localhost, 127.0.0.1 or ``hostname``)."""
    local = set(LOCAL_ADDRESSES) | {hostname or socket.gethostname()}
    return all(r.address in local for r in topology.ranks(with_cloud))


def inner_command(words: Sequence[str], bin_dir: Optional[Path] = None) -> list[str]:
    """The command each rank runs: ``<venv>/bin/aflkd`` + the aflkd arguments (a leading 'aflkd' dropped)."""
    words = list(words)
    if words and words[0] == "--":
        words = words[1:]
    if words and (words[0] == "aflkd" or words[0].endswith("/aflkd")):
        words = words[1:]
    if not words:
        raise UsageError("give the aflkd command to run after '--', e.g. aflkd launch --topology T -- aflkd ranks")
    if words[0] == "launch":
        raise UsageError("the command after '--' is run on every rank; it cannot be another 'aflkd launch'")
    return [str((bin_dir or venv_bin()) / "aflkd"), *words]


def hostfile_name(topology: Topology, flavour: str, with_cloud: bool = False) -> str:
    """``<stem>[-cloud]-<flavour>.hosts``: the file name ``plan`` and ``launch`` write."""
    stem = Path(topology.path).stem
    return f"{stem}{'-cloud' if with_cloud else ''}-{flavour}.hosts"


def mpiexec_argv(topology: Topology, flavour: str, hostfile: str, inner: Sequence[str], mpiexec: str = "mpiexec",
                 *, with_cloud: bool = False, local: bool = False, as_root: bool = False,
                 cores: Optional[int] = None) -> list[str]:
    """The mpiexec command line that realises the topology's rank map (pure).

    ``local``: every address is this host; ``as_root``: running as root (Open MPI
    refuses without a flag); ``cores``: this host's cores (Open MPI needs
    ``--oversubscribe`` past them on one host).
    """
    size = topology.world_size(with_cloud)
    path = os.path.abspath(topology.path)
    if flavour == "mpich":
        argv = [mpiexec, "-f", hostfile, "-n", str(size)]
        if local:
            argv += ["-launcher", "fork"]
        argv += ["-genv", TOPOLOGY_ENV, path]
    elif flavour == "openmpi":
        argv = [mpiexec, "--hostfile", hostfile, "-n", str(size), "--map-by", "slot"]
        if as_root:
            argv.append("--allow-run-as-root")
        if local and cores is not None and size > cores:
            argv += ["--oversubscribe", "--bind-to", "none"]
        argv += ["-x", f"{TOPOLOGY_ENV}={path}"]
    else:
        raise UsageError(f"MPI flavour must be mpich or openmpi, got {flavour!r}")
    return argv + list(inner)


def host_cores() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_inner_command(words: Sequence[str], parser) -> None:
    """Parse the inner command with ``parser`` (the whole ``aflkd`` parser, handed down by the CLI as
    ``args.root_parser``), so a typo fails before any rank starts (on every board)."""
    if "-h" in words or "--help" in words:  # the ranks print the help
        return
    parser.parse_args(list(words))


def _launch(args) -> int:
    topology = load_topology(args.topology)
    inner = inner_command(args.command)
    check_inner_command(inner[1:], args.root_parser)
    mpiexec = args.mpiexec or default_mpiexec()
    flavour = args.mpi if args.mpi != "auto" else detect_flavour(mpiexec)
    if args.dry_run:
        return _run_on(args, topology, flavour, mpiexec, inner)
    original, restarts_done = topology, 0
    while True:
        started = time.monotonic()
        code = _run_on(args, topology, flavour, mpiexec, inner)
        if not should_restart(code, restarts_done, args.restart):
            if code == LAUNCH_FAILED:
                print(launch_failed_line(topology, is_this_host, args.with_cloud), file=sys.stderr, flush=True)
            return code
        restarts_done += 1
        local = set(LOCAL_ADDRESSES) | {socket.gethostname()}
        up = answering(original, lambda address: address in local)
        topology, notes = surviving(original, [h.name for h in original.hosts if h.name not in up])
        lost = sorted({h.name for h in original.hosts} - {h.name for h in topology.hosts})
        print(f"aflkd launch: the job ended with status {code} after {time.monotonic() - started:.1f} s; restart "
              f"{restarts_done} of {args.restart} on {topology.world_size(args.with_cloud)} rank(s)"
              + (f", without {', '.join(lost)}" if lost else "") + "".join(f"; {n}" for n in notes),
              file=sys.stderr, flush=True)


#: mpiexec's status when it could not start its proxies on every host (Hydra; a rank's own exit is its status)
LAUNCH_FAILED = 255


def launch_failed_line(topology: Topology, resolves: Callable[[str], Optional[bool]], with_cloud: bool = False) -> str:
    """The one line after mpiexec could not start the job: what to check, and any address of a host the job runs
    on (the cloud only ``with_cloud``) that does not resolve on this machine (``resolves``:
    :func:`launch.healing.is_this_host`; None: it does not)."""
    names: dict[str, list[str]] = {}
    for h in topology.hosts:
        if (h.role != "cloud" or with_cloud) and resolves(h.address) is None:
            names.setdefault(h.address, []).append(h.name)
    unknown = [f"'{a}' ({', '.join(n)})" for a, n in sorted(names.items())]
    hint = (f"; the address {unknown[0]} does not resolve on this machine" if len(unknown) == 1 else
            f"; the addresses {', '.join(unknown)} do not resolve on this machine" if unknown else "")
    return (f"aflkd: error: mpiexec could not start the job on every host of {topology.path} (status "
            f"{LAUNCH_FAILED}){hint}: check that each host answers 'ssh ADDRESS true' without a password and has "
            "this checkout and venv at the same path")


def _run_on(args, topology: Topology, flavour: str, mpiexec: str, inner: list) -> int:
    """Write the hostfile of ``topology`` and run (or, with --dry-run, print) its mpiexec line."""
    local = local_only(topology, args.with_cloud)
    temporary = None
    if args.hostfile_dir:
        folder = options.prepare_folder(args.hostfile_dir, "--hostfile-dir")
        hostfile = str(folder / hostfile_name(topology, flavour, args.with_cloud))
    else:
        fd, hostfile = tempfile.mkstemp(prefix=f"aflkd-{Path(topology.path).stem}-", suffix=".hosts")
        os.close(fd)
        temporary = None if args.dry_run else hostfile
    try:
        write_hostfile(hostfile, topology, flavour, args.with_cloud)
        argv = mpiexec_argv(topology, flavour, hostfile, inner, mpiexec, with_cloud=args.with_cloud, local=local,
                            as_root=hasattr(os, "geteuid") and os.geteuid() == 0, cores=host_cores())
        if args.dry_run:
            print(shlex.join(argv), flush=True)
            return 0
        print(f"aflkd launch: {shlex.join(argv)}", file=sys.stderr, flush=True)
        return _run(argv)
    finally:
        if temporary:
            os.unlink(temporary)


def _run(argv: list[str]) -> int:
    """Run mpiexec in our process group (a terminal's Ctrl-C reaches it too); forward its exit status.

    From before Popen until mpiexec has ended, SIGINT only sets a flag (a
    KeyboardInterrupt raised between two statements could otherwise leave
    mpiexec running, unended, holding the terminal); the wait polls the flag
    and ends mpiexec itself.  The child gets SIGINT's default action back at
    exec (a Python handler does not survive it).
    """
    held: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:  # an ignored SIGINT stays ignored, for mpiexec too
        signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        try:
            proc = subprocess.Popen(argv)
        except OSError as err:
            raise UsageError(f"cannot start {argv[0]} ({err.strerror})") from None
        code = _wait_or_stop(proc, held)
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell says


#: seconds between looks at the Ctrl-C flag while mpiexec runs
_POLL_S = 0.1


def _wait_or_stop(proc: subprocess.Popen, held: list[int]) -> int:
    """mpiexec's exit status; once ``held`` is non-empty (a Ctrl-C came), end it first."""
    while not held:
        try:
            return proc.wait(timeout=_POLL_S)
        except subprocess.TimeoutExpired:
            pass
    _stop(proc)
    return proc.returncode


def _stop(proc: subprocess.Popen) -> None:
    """End mpiexec after Ctrl-C: SIGINT (it ends its ranks), then SIGKILL after a grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
