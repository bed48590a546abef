"""Relaunching a job that lost a board (``aflkd launch --restart N``): which hosts answer, what the rack is then.

When an MPI job loses a rank (a board reboots, its link drops, its process is
killed) the launcher ends every rank within about a second, and the job's
deadlines end it when a rank only stalls.  The supervisor then asks every host
of the *original* topology whether it answers (a board that came back is
admitted again), builds the topology of the hosts that do (:func:`surviving`),
and runs the same command on it.  ``aflkd serve`` resumes from its results log,
so no image is lost or served twice.

Why relaunch rather than MPI's own fault tolerance (ULFM): a relaunch works with
any MPI and also survives the loss of rank 0, which a shrunk communicator cannot
(the image source and the results log live there).  The PyPI MPICH 5.0.2 does
expose ``Comm.Shrink``/``Revoke``/``Agree`` through mpi4py 4.1, but its launcher
ends every rank when one dies unless started with ``-disable-auto-cleanup``; a
measured comparison of the two is still to be made.
"""
from __future__ import annotations

import socket
import subprocess
from dataclasses import replace
from typing import Callable, Iterable, Optional

from runtime.errors import UsageError

from .topology import Topology, _build

__all__ = ["surviving", "answering", "should_restart", "is_this_host", "NO_RESTART_CODES"]

#: exit statuses that a restart cannot mend: success, bad input (2), Ctrl-C (130)
NO_RESTART_CODES = (0, 2, 130)


def should_restart(code: int, restarts_done: int, restarts: int) -> bool:
    """Whether the supervisor reruns a job that ended with ``code``."""
    return code not in NO_RESTART_CODES and restarts_done < restarts


def surviving(topology: Topology, lost: Iterable[str]) -> tuple[Topology, list[str]]:
    """The topology without the ``lost`` hosts, and notes on what else had to go.

    A cluster whose master is lost goes whole (its workers only ever work
    behind it); the clusters left are cut to the smallest number of devices
    among them (every cluster runs the same stages), dropping workers from the
    end.  Refuses in one line when no cluster is left.
    """
    lost = set(lost)
    unknown = sorted(lost - {h.name for h in topology.hosts})
    if unknown:
        raise UsageError(f"{topology.path}: no host named {', '.join(unknown)}")
    notes: list[str] = []
    hosts = [h for h in topology.hosts if h.name not in lost]
    for c in topology.cluster_names:
        members = [h for h in topology.hosts if h.cluster == c]
        masters = [h for h in members if h.role == "master"]
        if masters and masters[0].name in lost:
            dropped = [h.name for h in members if h.name not in lost]
            hosts = [h for h in hosts if h.cluster != c]
            if dropped:
                notes.append(f"cluster {c} lost its master {masters[0].name}: {', '.join(dropped)} left out too")
    clusters = [c for c in topology.cluster_names if any(h.cluster == c for h in hosts)]
    if not clusters:
        raise UsageError(f"{topology.path}: no cluster has a device left after losing {', '.join(sorted(lost))}")
    counts = {c: sum(h.slots for h in hosts if h.cluster == c) for c in clusters}
    want = min(counts.values())
    for c in clusters:
        extra = counts[c] - want
        for h in reversed([h for h in hosts if h.cluster == c and h.role == "worker"]):
            if extra <= 0:
                break
            cut = min(extra, h.slots)
            index = hosts.index(h)
            if cut == h.slots:
                hosts.pop(index)
            else:
                hosts[index] = replace(h, slots=h.slots - cut)
            extra -= cut
            notes.append(f"cluster {c}: {cut} slot(s) of {h.name} left out (every cluster runs {want} stage(s))")
    return _build(topology.path, tuple(hosts), topology.description), notes


def _ssh_answers(address: str, timeout_s: float) -> bool:
    try:
        return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout_s))}",
                               address, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout_s + 2).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def answering(topology: Topology, is_local: Callable[[str], bool], timeout_s: float = 5.0,
              probe: Optional[Callable[[str, float], bool]] = None) -> list[str]:
    """Names of the hosts that answer: a local address always does; another must run ``ssh HOST true``."""
    probe = probe or _ssh_answers
    return [h.name for h in topology.hosts if is_local(h.address) or probe(h.address, timeout_s)]


def is_this_host(address: str) -> bool | None:
    """Whether ``address`` names this host (True), another (False) or cannot be told here (None: it does not
    resolve on this host).  Asked of the OS: the host's own names, else whether this host can bind a socket to
    an IP address ``address`` resolves to (only a local interface's address binds)."""
    names = {socket.gethostname(), socket.getfqdn(), "localhost"}
    if address in names or address == socket.gethostname().split(".")[0]:
        return True
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return None
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False
