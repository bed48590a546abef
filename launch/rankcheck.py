"""``aflkd ranks``: under mpiexec, where did each rank land?  Checked against the topology.

Every rank reads the topology (``--topology`` or ``$AFLKD_TOPOLOGY``, which
``aflkd launch`` sets) and checks the job's size against it before any
exchange, so a wrong ``-n`` fails on every rank with the same line.  Rank 0
then prints each rank's place in the map beside the host it runs on.  The
placement check: under MPICH's Hydra every rank sees ``PMI_HOSTNAME``, the
hostfile entry it was placed on, which must be its topology address; ranks the
topology puts on one address must share a host name; and, under any MPI (Open
MPI sets no such variable), each rank asks the OS whether its topology address
is this host: its name, or an IP address this host can bind (a swapped
placement with one rank per board fails here).  An address a board cannot
resolve (an ssh alias known only on rank 0's host) is left unchecked and said
so.  A mismatch fails every rank with status 2.
"""
from __future__ import annotations

import os
import socket

from runtime.errors import UsageError

from .healing import is_this_host
from .planning import format_table, rank_table
from .topology import TOPOLOGY_ENV, check_world_size, load_topology, topology_path_from_env

__all__ = ["add_parser", "placement_problems", "is_this_host"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ranks",
        help="under mpiexec: print where each rank landed and check it against the topology",
        description=(
            "Run under mpiexec (or 'aflkd launch').  Checks the job's size against the topology, gathers each "
            "rank's host, and prints the rank map beside where each rank runs; a rank on the wrong host fails "
            "the job (status 2 on every rank)."
        ),
    )
    p.add_argument("--topology", default=None,
                   help=f"topology file (default: ${TOPOLOGY_ENV}, which 'aflkd launch' sets)")
    p.set_defaults(func=_ranks)


def placement_problems(expected: list[str], landed: list[tuple]) -> list[str]:
    """Problems (empty: none) of ranks that landed on (host name, Hydra's PMI_HOSTNAME or None[, whether
    the rank's topology address is its host: True, False or None, see :func:`is_this_host`]).

    Pure, so it is tested without MPI.  ``expected`` is each rank's topology address.
    """
    problems = []
    for rank, (address, (host, entry, *local)) in enumerate(zip(expected, landed)):
        said = local[0] if local else None  # the OS's answer, when there is one, outranks the entry's name
        if said is False:
            problems.append(f"rank {rank} runs on {host}, which is not {address}, where the topology puts it")
        elif said is None and entry is not None and entry != address:
            problems.append(f"rank {rank} was placed on {entry}, the topology puts it on {address}")
    by_address: dict[str, tuple[int, str]] = {}
    for rank, (address, (host, *_)) in enumerate(zip(expected, landed)):
        first = by_address.setdefault(address, (rank, host))
        if first[1] != host:
            problems.append(f"ranks {first[0]} and {rank} share address {address} in the topology but run on "
                            f"{first[1]} and {host}")
    return problems


def _ranks(args) -> int:
    from mpi4py import MPI

    from runtime.transport import abort_on_uncaught_exception, bcast_object, gather_objects

    comm = MPI.COMM_WORLD
    abort_on_uncaught_exception(comm)
    path = args.topology or topology_path_from_env()
    if not path:
        raise UsageError(f"give --topology FILE (or run under 'aflkd launch', which sets ${TOPOLOGY_ENV})")
    topology = load_topology(path)
    size = comm.Get_size()
    with_cloud = topology.cloud is not None and size == topology.size + 1
    check_world_size(topology, size, with_cloud)  # identical on every rank: all exit 2 together
    address = topology.ranks(with_cloud)[comm.Get_rank()].address
    here = (socket.gethostname(), os.environ.get("PMI_HOSTNAME"), is_this_host(address))
    landed = gather_objects(comm, here, 0)
    problems = None
    if comm.Get_rank() == 0:
        headers, rows = rank_table(topology, with_cloud)
        headers = headers + ["runs on"]
        rows = [row + [host if entry in (None, host) else f"{host} ({entry})"] for row, (host, entry, _)
                in zip(rows, landed)]
        c, s = topology.clusters, topology.stages
        print(f"{topology.path}: {size} ranks ({c} cluster{'s' * (c != 1)} x {s} stage{'s' * (s != 1)}"
              f"{' + cloud' if with_cloud else ''})")
        print(format_table(headers, rows), flush=True)
        problems = placement_problems([r.address for r in topology.ranks(with_cloud)], landed)
    problems = bcast_object(comm, problems, 0)
    if problems:
        raise UsageError(f"ranks are not where {topology.path} puts them: {'; '.join(problems)}; "
                         "use the hostfile 'aflkd plan' writes, or 'aflkd launch'")
    if comm.Get_rank() == 0:
        unknown = [r for r, (_, entry, local) in enumerate(landed) if local is None and entry is None]
        print("every rank is where the topology puts it" + (
            f" (ranks {unknown}: their address does not resolve on their board, so only the host names were "
            "compared)" if unknown else ""), flush=True)
    return 0
