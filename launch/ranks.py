"""Per-rank set-up shared by every MPI command: threads, abort on error, root-only work."""
from __future__ import annotations

import os
from typing import Callable, TypeVar


from runtime.errors import UsageError

__all__ = ["default_threads", "set_threads", "on_root_then_bcast"]

T = TypeVar("T")


def controlled_cpus(comm, cores: int) -> list[int]:
    """The CPUs this rank's controller may pin to: its own block of the host (see scheduling.controller.rank_cpus)."""
    from runtime.transport import host_slot
    from scheduling.controller import machine_cpus, rank_cpus

    slot, slots = host_slot(comm)
    return rank_cpus(machine_cpus(), cores, slot, slots)[0]


def default_threads(comm) -> int:
    """Cores this process may use divided among the ranks on this host (at least 1).

    On a rack of boards each rank has its board to itself; on one host running
    several ranks, oversubscribing the cores would only measure contention.
    """
    from runtime.transport import ranks_on_this_host

    local = ranks_on_this_host(comm)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // local)


def set_threads(threads: int) -> None:
    """Torch threads of this rank (--threads is checked once, when it is parsed: launch/options.py)."""
    import torch  # here, not at the top: set-up errors before this point are refused without torch's import

    torch.set_num_threads(threads)


def on_root_then_bcast(comm, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only (e.g. read a checkpoint that only it has) and share the result.

    A :class:`UsageError` on rank 0 is re-raised on every rank, so all ranks
    exit cleanly together instead of the others waiting for a dead root.  The
    MPI calls are the runtime's (:func:`runtime.transport.share_from_root`).
    """
    from runtime.transport import share_from_root

    return share_from_root(comm, work, 0, UsageError)
