"""Hostfiles in Open MPI (``host slots=N``) and MPICH Hydra (``host:N``) syntax: read, write, check.

Both MPIs place ranks "by slot" in file order: rank 0 fills the first line's
slots, then the next line, and so on.  So a hostfile realises a rank map when
its lines, in order, are the runs of consecutive ranks on the same address
(:func:`hostfile_lines`).  A host that reappears after another host is where
the two differ (read from their sources and, for Hydra, run here):

* **MPICH Hydra** merges a line only with the line just above it when the host
  is the same (``HYDU_add_to_node_list``); a host repeated later becomes another
  node, in place, so ``a:1 / b:1 / a:1`` puts ranks 0, 1, 2 on a, b, a (checked
  with ``mpiexec -f`` of MPICH 5.0.2, whose ranks see ``PMI_HOSTNAME``).
* **Open MPI** does not honour a repeated host: 4.x adds its slots to the
  earlier entry and moves it to the end of the list; 5.x (PRRTE) keeps the first
  position and refuses a second ``slots=`` for it.  Such an order cannot be
  written for Open MPI, so :func:`hostfile_lines` refuses it with the fix.

Comments: whole-line ``#`` comments in both syntaxes; Hydra refuses a comment
after a host (``token # not supported``), so only Open MPI lines may carry one.
A line without a count is 1 slot here (Hydra's reading; Open MPI would count
the host's cores).  Pure functions plus file reading/writing; no MPI.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from itertools import groupby
from typing import Optional, Sequence

from runtime.errors import UsageError

from .topology import Topology

__all__ = [
    "FLAVOURS", "HostfileEntry", "Hostfile", "parse_hostfile", "read_hostfile", "rank_runs", "hostfile_lines",
    "write_hostfile", "placement", "check_hostfile",
]

FLAVOURS = ("openmpi", "mpich")
_OMPI_SLOTS = ("slots", "count", "cpu")
_OMPI_MAX = ("max_slots", "max-slots")
_HOST = re.compile(r"^[A-Za-z0-9_.@\-\[\]]+$")


@dataclass(frozen=True)
class HostfileEntry:
    """One host line: the host, its slots (and Open MPI's ``max_slots``), its line number (from 1)."""

    host: str
    slots: int
    max_slots: Optional[int] = None
    line: int = 0


@dataclass(frozen=True)
class Hostfile:
    """A parsed hostfile; ``flavour`` is None when no line says (bare host names only)."""

    path: str
    flavour: Optional[str]
    entries: tuple[HostfileEntry, ...]


def parse_hostfile(text: str, path: str = "<hostfile>", flavour: str = "auto") -> Hostfile:
    """Parse hostfile ``text``; ``flavour`` is ``openmpi``, ``mpich`` or ``auto`` (from the lines' syntax)."""
    if flavour not in (*FLAVOURS, "auto"):
        raise UsageError(f"hostfile flavour must be openmpi, mpich or auto, got {flavour!r}")
    entries, seen = [], {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        body, hash_, _ = line.partition("#")
        words = body.split()
        where = f"{path} line {number}"
        kind, entry = _parse_line(words, where, number)
        if hash_ and (kind == "mpich" or flavour == "mpich"):
            raise UsageError(f"{where}: a comment after the host ('{raw.strip()}'); MPICH's Hydra refuses it: "
                             "put the comment on its own line")
        if hash_ and kind is None:
            kind = "openmpi"  # only Open MPI reads a comment after a host
        if kind is not None:
            seen.setdefault(kind, number)
        entries.append(entry)
    if len(seen) == 2:
        raise UsageError(f"{path}: mixes MPICH 'host:N' (line {seen['mpich']}) and Open MPI 'slots=' "
                         f"(line {seen['openmpi']}) syntax; write one of them")
    found = next(iter(seen), None)
    if flavour != "auto" and found is not None and found != flavour:
        line = seen[found]
        want = "host slots=N" if flavour == "openmpi" else "host:N"
        raise UsageError(f"{path} line {line}: {found} syntax in a {flavour} hostfile; write '{want}'")
    return Hostfile(path, found if flavour == "auto" else flavour, tuple(entries))


def _parse_line(words: list[str], where: str, number: int) -> tuple[Optional[str], HostfileEntry]:
    """(syntax it shows: 'mpich', 'openmpi' or None for a bare host, the entry)."""
    head, rest = words[0], words[1:]
    if ":" in head:  # Hydra: host:N, nothing else on the line
        host, _, count = head.partition(":")
        if rest or not count.isdigit() or int(count) < 1 or not _HOST.match(host):
            raise UsageError(f"{where}: cannot read '{' '.join(words)}'; MPICH lines are host:N with N >= 1")
        return "mpich", HostfileEntry(host, int(count), None, number)
    if not _HOST.match(head) or "=" in head:
        raise UsageError(f"{where}: cannot read '{' '.join(words)}'; a line starts with a host name")
    slots, max_slots = None, None
    for word in rest:
        key, eq, value = word.partition("=")
        if not eq or key not in _OMPI_SLOTS + _OMPI_MAX or not value.isdigit():
            raise UsageError(f"{where}: cannot read '{word}'; Open MPI lines are 'host slots=N [max_slots=M]'")
        if key in _OMPI_SLOTS:
            slots = int(value)
        else:
            max_slots = int(value)
    if slots is not None and slots < 1:
        raise UsageError(f"{where}: slots must be >= 1, got {slots}")
    if slots is not None and max_slots is not None and max_slots < slots:
        raise UsageError(f"{where}: max_slots={max_slots} is below slots={slots}")
    kind = "openmpi" if rest else None
    return kind, HostfileEntry(head, slots if slots is not None else (max_slots or 1), max_slots, number)


def read_hostfile(path: str | os.PathLike, flavour: str = "auto") -> Hostfile:
    """Read and parse a hostfile (see :func:`parse_hostfile`)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"hostfile {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read hostfile {path} ({getattr(err, 'strerror', None) or err})") from None
    return parse_hostfile(text, path, flavour)


def rank_runs(addresses: Sequence[str]) -> list[tuple[str, int]]:
    """Runs of consecutive equal addresses: ``[a, a, b, a] -> [(a, 2), (b, 1), (a, 1)]``."""
    return [(host, len(list(group))) for host, group in groupby(addresses)]


def hostfile_lines(topology: Topology, flavour: str, with_cloud: bool = False) -> list[str]:
    """Lines of a hostfile whose by-slot placement is the topology's rank map, with comment lines.

    One line per run of consecutive ranks on one address.  Open MPI cannot
    place a host that reappears after another host (see the module docstring):
    refused with the fix.
    """
    if flavour not in FLAVOURS:
        raise UsageError(f"hostfile flavour must be openmpi or mpich, got {flavour!r}")
    ranks = topology.ranks(with_cloud)
    runs = rank_runs([r.address for r in ranks])
    if flavour == "openmpi":
        first: dict[str, int] = {}
        at = 0
        for host, n in runs:
            if host in first:
                raise UsageError(f"{topology.path}: ranks {first[host]} and {at} both run on {host} with other "
                                 f"hosts between them; Open MPI hostfiles cannot express that order (it merges "
                                 f"a host's lines): list each address's devices next to each other in the "
                                 f"topology, or use MPICH, whose hostfiles keep repeated hosts in place")
            first[host] = at
            at += n
    what = "Open MPI" if flavour == "openmpi" else "MPICH (Hydra)"
    lines = [f"# {what} hostfile for {topology.path}: {len(ranks)} ranks, in rank order (written by aflkd)."]
    at = 0
    for host, n in runs:
        names = ", ".join(f"{r.host}" + (f"[{r.slot}]" if r.slot else "") for r in ranks[at:at + n])
        span = f"rank {at}" if n == 1 else f"ranks {at}-{at + n - 1}"
        lines.append(f"# {span}: {names}")
        lines.append(f"{host} slots={n}" if flavour == "openmpi" else f"{host}:{n}")
        at += n
    return lines


def write_hostfile(path: str | os.PathLike, topology: Topology, flavour: str, with_cloud: bool = False) -> str:
    """Write :func:`hostfile_lines` to ``path``; returns the path."""
    path = os.fspath(path)
    text = "\n".join(hostfile_lines(topology, flavour, with_cloud)) + "\n"
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise UsageError(f"cannot write hostfile {path} ({err.strerror})") from None
    return path


def placement(hostfile: Hostfile, size: int, flavour: Optional[str] = None) -> list[str]:
    """The host of each of ``size`` ranks when an MPI of ``flavour`` places them by slot from ``hostfile``.

    Fewer slots than ranks is refused (both MPIs would oversubscribe or fail);
    so is a host repeated in an Open MPI hostfile (4.x and 5.x differ, both
    break the order).
    """
    flavour = flavour or hostfile.flavour or "mpich"
    if flavour == "openmpi":
        first: dict[str, int] = {}
        for e in hostfile.entries:
            if e.host in first:
                raise UsageError(f"{hostfile.path} line {e.line}: {e.host} is already on line {first[e.host]}; "
                                 "Open MPI merges (4.x) or refuses (5.x) a repeated host: give it once, "
                                 "with slots=N")
            first[e.host] = e.line
    total = sum(e.slots for e in hostfile.entries)
    if total < size:
        raise UsageError(f"{hostfile.path} has {total} slots for {size} ranks; give its hosts more slots "
                         f"(or write it with 'aflkd plan --topology ...')")
    out: list[str] = []
    for e in hostfile.entries:
        out.extend([e.host] * e.slots)
    return out[:size]


def check_hostfile(topology: Topology, hostfile: Hostfile, flavour: Optional[str] = None,
                   with_cloud: bool = False) -> None:
    """Refuse a hostfile that does not realise the topology's rank map: unknown host, too few slots, wrong order."""
    ranks = topology.ranks(with_cloud)
    addresses = {r.address for r in ranks}
    for e in hostfile.entries:
        if e.host not in addresses:
            raise UsageError(f"{hostfile.path} line {e.line}: host {e.host} runs no rank of {topology.path} "
                             f"(its ranks run on {', '.join(sorted(addresses))}); fix the name or remove the line")
    for address in sorted(addresses):
        want = sum(r.address == address for r in ranks)
        have = sum(e.slots for e in hostfile.entries if e.host == address)
        if have < want:
            raise UsageError(f"{hostfile.path}: {address} has {have} slots but {topology.path} puts {want} ranks "
                             f"on it; give it slots={want}" + (" (missing: add a line)" if have == 0 else ""))
    placed = placement(hostfile, len(ranks), flavour)
    for r, host in zip(ranks, placed):
        if host != r.address:
            raise UsageError(f"{hostfile.path}: rank {r.rank} would run on {host} but {topology.path} puts it on "
                             f"{r.address} ({r.host}); order the lines as the rank map ('aflkd plan' writes one)")
