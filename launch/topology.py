"""The rack as data: a TOML topology file -> hosts, clusters and the rank map every rank agrees on.

A topology names each host once (read with the standard library's ``tomllib``)::

    description = "1 PC + 3 clusters of 1 Jetson and 4 Pis"   # optional

    [[host]]
    name = "pc"              # unique label; also the MPI host name unless `address` is given
    role = "cloud"           # the cloud: listed, but no rank of the inference job (see below)

    [[host]]
    name = "jetson-0"
    role = "master"          # a cluster's Jetson: stage 0, gathers the cluster's work
    cluster = 0              # integer or name ("north"); clusters keep the order of their first host
    speed = 2.0              # relative speed per device (> 0), or "measure" (default: 1.0)
    address = "10.0.0.10"    # what mpiexec reaches it by (default: name)
    slots = 1                # devices (= ranks) this host holds (default: 1)

    [[host]]
    name = "pi-0"
    role = "worker"          # a Raspberry Pi of the cluster
    cluster = 0

Keys other than these are refused (a typo would otherwise be silently ignored).

**Rank-map contract** (every rank computes it from the same file; the runtime
builds its communicators from it):

* The computing ranks are the cluster devices only.  The ``cloud`` host is
  listed (``Topology.cloud``) but is **not** a rank of an inference job; a job
  that includes it (``ranks(with_cloud=True)``, ``aflkd launch --with-cloud``)
  gives it the one rank after all devices, ``Topology.cloud_rank == size``, so
  the device ranks are the same in both.
* Clusters are ordered by their first host in the file.  Within a cluster the
  master comes first, then the workers in file order.
* A host with ``slots = N`` contributes N devices in sequence, one rank each
  (several ``[[host]]`` entries may share ``address = "localhost"``: that is
  how a rack is emulated on one machine).  A master with N slots gives stage 0
  (role ``master``) and stages 1..N-1 (role ``worker``).
* Every cluster has the same number of devices S (the pipeline runs S stages in
  each).  With C clusters, ``rank = cluster * S + stage``: rank 0 is cluster 0's
  master, which gathers the last stage's slices and runs the FC head.

Pure data and pure functions: no MPI, no torch.  Bad input raises
:class:`UsageError` naming the file and the host or key.
"""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, replace
from typing import Mapping, Optional

from runtime.errors import UsageError

__all__ = [
    "ROLES", "TOPOLOGY_ENV", "Host", "RankSlot", "Topology", "load_topology", "parse_topology",
    "check_world_size", "topology_path_from_env",
]

ROLES = ("cloud", "master", "worker")
TOPOLOGY_ENV = "AFLKD_TOPOLOGY"
"""Environment variable ``aflkd launch`` sets on every rank: the topology file's absolute path."""

#: The most ranks one host entry may hold: a 16-core board with a rank per core is far below it.
MAX_SLOTS = 1024

_HOST_KEYS = {"name", "role", "cluster", "speed", "slots", "address"}
_TOP_KEYS = {"description", "host"}
MEASURE = "measure"


@dataclass(frozen=True)
class Host:
    """One ``[[host]]`` entry as written (validated).  ``speed`` None means "measure"."""

    name: str
    role: str
    address: str
    cluster: Optional[str]  # the cluster key as text (0 and "0" are the same cluster); None for the cloud
    speed: Optional[float]
    slots: int


@dataclass(frozen=True)
class RankSlot:
    """One rank of the map: where it runs and what it is.

    ``cluster``/``stage`` are indices (None for the cloud); ``slot`` is which of
    its host's slots this rank is; ``speed`` None means "measure" (unresolved).
    """

    rank: int
    host: str
    address: str
    role: str
    cluster: Optional[int]
    stage: Optional[int]
    speed: Optional[float]
    slot: int = 0
    cluster_name: Optional[str] = None


@dataclass(frozen=True)
class Topology:
    """Hosts as written plus the rank map derived from them (``devices``: rank order).

    Build it with :func:`load_topology` or :func:`parse_topology`, which check it.
    """

    path: str
    hosts: tuple[Host, ...]
    cluster_names: tuple[str, ...]
    devices: tuple[RankSlot, ...]
    description: str = ""

    @property
    def clusters(self) -> int:
        """C: clusters (the height split runs across them)."""
        return len(self.cluster_names)

    @property
    def stages(self) -> int:
        """S: devices per cluster (pipeline stages; the same in every cluster)."""
        return len(self.devices) // self.clusters

    @property
    def size(self) -> int:
        """Ranks of an inference job: C * S (the cloud excluded)."""
        return len(self.devices)

    @property
    def cloud(self) -> Optional[Host]:
        """The cloud host, or None: listed, never a rank of an inference job."""
        return next((h for h in self.hosts if h.role == "cloud"), None)

    @property
    def cloud_rank(self) -> Optional[int]:
        """The cloud's rank in a job launched with the cloud (``size``: after every device), or None."""
        return self.size if self.cloud is not None else None

    def rank_of(self, cluster: int, stage: int) -> int:
        """``cluster * S + stage``, checked."""
        if not (0 <= cluster < self.clusters and 0 <= stage < self.stages):
            raise UsageError(f"no device at cluster {cluster}, stage {stage} in {self.path} "
                             f"({self.clusters} clusters x {self.stages} stages)")
        return cluster * self.stages + stage

    def ranks(self, with_cloud: bool = False) -> list[RankSlot]:
        """Every rank in rank order; with ``with_cloud`` the cloud is appended as rank ``size``."""
        out = list(self.devices)
        if with_cloud and self.cloud is not None:
            c = self.cloud
            out.append(RankSlot(self.size, c.name, c.address, "cloud", None, None, c.speed, 0, None))
        return out

    def world_size(self, with_cloud: bool = False) -> int:
        """``mpiexec -n`` for a job over this topology."""
        return len(self.ranks(with_cloud))

    def cluster_ranks(self, cluster: int) -> list[int]:
        """Ranks of one cluster, stage order (the pipeline's communicator)."""
        return [self.rank_of(cluster, s) for s in range(self.stages)]

    def stage_ranks(self, stage: int) -> list[int]:
        """Ranks running one stage, cluster order (the height split's communicator)."""
        return [self.rank_of(c, stage) for c in range(self.clusters)]

    def cluster_speeds(self, measured: Optional[Mapping[str, float]] = None) -> list[float]:
        """Sum of each cluster's device speeds (a cluster's share of rows follows it).

        ``measured`` maps host names to speeds and resolves ``"measure"`` (it
        also overrides written speeds of the hosts it names).
        """
        speeds = self.with_speeds(measured).devices if measured else self.devices
        unresolved = sorted({d.host for d in speeds if d.speed is None})
        if unresolved:
            raise UsageError(f"{self.path}: speed of {', '.join(unresolved)} is \"measure\" and no measurement "
                             "was given; run 'aflkd profile' on that board, or write a number (e.g. speed = 1.0)")
        out = [0.0] * self.clusters
        for d in speeds:
            out[d.cluster] += d.speed
        return out

    def with_speeds(self, measured: Mapping[str, float]) -> "Topology":
        """The same topology with the speeds of the named hosts replaced by ``measured`` ones."""
        unknown = sorted(set(measured) - {h.name for h in self.hosts})
        if unknown:
            raise UsageError(f"{self.path}: measured speeds name hosts the topology does not have: "
                             f"{', '.join(unknown)}")
        for name, value in measured.items():
            if not _is_positive_number(value):
                raise UsageError(f"{self.path}: measured speed of {name} must be a number > 0, got {value!r}")
        hosts = tuple(replace(h, speed=float(measured[h.name])) if h.name in measured else h for h in self.hosts)
        devices = tuple(replace(d, speed=float(measured[d.host])) if d.host in measured else d for d in self.devices)
        return replace(self, hosts=hosts, devices=devices)


def load_topology(path: str | os.PathLike) -> Topology:
    """Read and check a topology file (see the module docstring for its format)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"topology file {path} not found (shipped ones are in hostfiles/*.toml)") from None
    except OSError as err:
        raise UsageError(f"cannot read topology file {path} ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"topology file {path} is not UTF-8 text") from None
    return parse_topology(text, path)


def parse_topology(text: str, path: str = "<topology>") -> Topology:
    """Check TOML ``text`` (named ``path`` in messages) and derive the rank map."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends "(at line L, column C)"
        raise UsageError(f"{path}: not valid TOML: {err}") from None
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown top-level key {unknown[0]!r}; a topology has [[host]] entries "
                         "and an optional description")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise UsageError(f"{path}: description must be a string")
    entries = doc.get("host", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UsageError(f"{path}: 'host' must be an array of tables: write each host as a [[host]] section")
    hosts = tuple(_host(path, i, e) for i, e in enumerate(entries, start=1))
    return _build(path, hosts, description)


def check_world_size(topology: Topology, size: int, with_cloud: bool = False) -> None:
    """Refuse an ``mpiexec -n`` that disagrees with the topology (every rank raises the same error)."""
    want = topology.world_size(with_cloud)
    if size != want:
        what = "devices plus the cloud" if with_cloud else "devices; the cloud is not a rank of it"
        raise UsageError(f"this job has {size} ranks but {topology.path} has {want} ({what}); "
                         f"run it with mpiexec -n {want}, or use 'aflkd launch --topology {topology.path} -- ...' "
                         "which picks -n for you")


def topology_path_from_env() -> Optional[str]:
    """The topology ``aflkd launch`` exported to the ranks (``$AFLKD_TOPOLOGY``), or None."""
    return os.environ.get(TOPOLOGY_ENV) or None


def _is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _host(path: str, index: int, entry: dict) -> Host:
    """One validated ``[[host]]`` entry; ``index`` counts from 1 in file order."""
    label = f"host #{index}" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")
    where = f"{path}, {label}"
    unknown = sorted(set(entry) - _HOST_KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}; a host has {', '.join(sorted(_HOST_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip() or name != name.strip() or any(c.isspace() for c in name):
        raise UsageError(f"{where}: name must be a non-empty string without spaces, e.g. name = \"pi-0\"")
    role = entry.get("role")
    if role not in ROLES:
        raise UsageError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
    address = entry.get("address", name)
    if not isinstance(address, str) or not address or any(c.isspace() or c in "#=:" for c in address):
        raise UsageError(f"{where}: address must be a host name or IPv4 address without spaces, '#', '=' or ':' "
                         f"(hostfiles cannot hold them), got {address!r}")
    slots = entry.get("slots", 1)
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise UsageError(f"{where}: slots must be an integer >= 1 (devices on this host), got {slots!r}")
    if slots > MAX_SLOTS:  # checked before any list of ranks is built: 10**20 slots would fill the memory
        raise UsageError(f"{where}: slots = {slots} is more devices than one host holds (at most {MAX_SLOTS}); "
                         "give one [[host]] per board")
    speed = entry.get("speed", 1.0)
    if speed == MEASURE:
        speed = None
    elif not _is_positive_number(speed):
        raise UsageError(f"{where}: speed must be a number > 0 or \"measure\", got {speed!r}")
    else:
        speed = float(speed)
    cluster = entry.get("cluster")
    if role == "cloud":
        if cluster is not None:
            raise UsageError(f"{where}: the cloud belongs to no cluster; remove its 'cluster' key")
        if slots != 1:
            raise UsageError(f"{where}: the cloud is one rank; remove 'slots' (got {slots})")
    else:
        if cluster is None:
            raise UsageError(f"{where}: a {role} needs cluster = <integer or name>")
        if isinstance(cluster, bool) or not isinstance(cluster, (int, str)) or str(cluster).strip() == "":
            raise UsageError(f"{where}: cluster must be an integer or a non-empty name, got {cluster!r}")
        cluster = str(cluster)
    return Host(name, role, address, cluster, speed, slots)


def _build(path: str, hosts: tuple[Host, ...], description: str) -> Topology:
    """Check the hosts as a whole and lay out the ranks (the contract in the module docstring)."""
    seen: dict[str, int] = {}
    for i, h in enumerate(hosts, start=1):
        if h.name in seen:
            raise UsageError(f"{path}: host name {h.name!r} is used by host #{seen[h.name]} and host #{i}; "
                             "names must be unique (several hosts may share an address)")
        seen[h.name] = i
    clouds = [h.name for h in hosts if h.role == "cloud"]
    if len(clouds) > 1:
        raise UsageError(f"{path}: {len(clouds)} cloud hosts ({', '.join(clouds)}); a topology has at most one")
    names: list[str] = []
    for h in hosts:
        if h.cluster is not None and h.cluster not in names:
            names.append(h.cluster)
    if not names:
        raise UsageError(f"{path}: no cluster devices; add at least one [[host]] with role = \"master\" "
                         "and a cluster")
    layout: list[list[tuple[Host, int]]] = []
    for c in names:
        members = [h for h in hosts if h.cluster == c]
        masters = [h for h in members if h.role == "master"]
        if not masters:
            raise UsageError(f"{path}: cluster {c} has no master (hosts {', '.join(h.name for h in members)}); "
                             "give one of its hosts role = \"master\"")
        if len(masters) > 1:
            raise UsageError(f"{path}: cluster {c} has {len(masters)} masters "
                             f"({', '.join(h.name for h in masters)}); a cluster has exactly one")
        ordered = masters + [h for h in members if h.role == "worker"]
        layout.append([(h, k) for h in ordered for k in range(h.slots)])
    counts = [len(devs) for devs in layout]
    if len(set(counts)) > 1:
        listing = ", ".join(f"cluster {c}: {n}" for c, n in zip(names, counts))
        raise UsageError(f"{path}: clusters have different numbers of devices ({listing}); the pipeline runs "
                         "the same number of stages in every cluster, so give each cluster the same number "
                         "of devices (slots count)")
    stages = counts[0]
    devices = []
    for ci, devs in enumerate(layout):
        for stage, (h, k) in enumerate(devs):
            role = "master" if stage == 0 else "worker"
            devices.append(RankSlot(ci * stages + stage, h.name, h.address, role, ci, stage, h.speed, k, names[ci]))
    return Topology(path, hosts, tuple(names), tuple(devices), description)

