"""An in-process transport: every rank's program runs in one process, one thread per rank, no MPI.

For checks that need no real MPI: a program set that pairs and finishes here (and equals plain torch)
is one whose messages and collectives match; a lost message is a :class:`~runtime.transport.PeerTimeout`
after the deadline instead of a hang.  It offers the functions of :mod:`runtime.transport` that the split
executor calls, with the same arguments (``comm`` is an :class:`InProcessComm`)::

    outputs = run_ranks(3, lambda comm: SplitExecutor(plan, model, comm)(image if comm.rank == 0 else None))

Messages are copies, so a send is complete when it is posted; a receive completes when its message
arrives, and its size is checked as the real transport checks it.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Optional, Sequence

import torch

from .transport import (CHANNELS_LAST_ORDER, AgreedError, MessageSizeError, PeerTimeout, deadline_s,  # noqa: F401
                        judge_problems, judge_values, halo_tag)

__all__ = ["InProcessComm", "run_ranks", "AgreedError", "halo_tag", "message", "post_messages", "prepare_messages",
           "wait", "scatter_rows", "gather_rows", "allreduce_", "reduce_", "bcast_ints", "bcast_object", "agree",
           "agree_on"]


class _World:
    """What the ranks share: mailboxes keyed (source, destination, tag) and a rendezvous for collectives."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size, self.timeout_s = size, timeout_s
        self.lock = threading.Lock()
        self.boxes: dict[tuple[int, int, int], queue.Queue] = {}
        self.barrier = threading.Barrier(size)
        self.slots: list = [None] * size

    def box(self, src: int, dst: int, tag: int) -> queue.Queue:
        with self.lock:
            return self.boxes.setdefault((src, dst, tag), queue.Queue())

    def exchange(self, rank: int, value, what: str) -> list:
        """Every rank's ``value``, in rank order, once all have given theirs (a collective)."""
        try:
            self.barrier.wait(self.timeout_s)
            self.slots[rank] = value
            self.barrier.wait(self.timeout_s)
            values = list(self.slots)
            self.barrier.wait(self.timeout_s)
        except threading.BrokenBarrierError:
            raise PeerTimeout(f"rank {rank}: not every rank reached {what} within {self.timeout_s:g} s") from None
        return values


class InProcessComm:
    """One rank's view of an in-process world (the part of ``MPI.Comm`` the executors use)."""

    def __init__(self, world: _World, rank: int) -> None:
        self.world, self.rank = world, rank

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's names)
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.world.size


def run_ranks(size: int, work: Callable[[InProcessComm], object], timeout_s: Optional[float] = None) -> list:
    """``work(comm)`` on ``size`` ranks at once (threads); every rank's result, in rank order.  The first error
    in time is raised, after every rank has ended (a rank waiting on the failed one times out): the others'
    are its consequences."""
    world = _World(size, deadline_s() if timeout_s is None else timeout_s)
    results: list = [None] * size
    errors: list = [None] * size

    def one(rank: int) -> None:
        try:
            results[rank] = work(InProcessComm(world, rank))
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            errors[rank] = (time.monotonic(), exc)
            world.barrier.abort()  # the others stop waiting for this rank at their next collective

    threads = [threading.Thread(target=one, args=(r,), name=f"rank-{r}", daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    happened = sorted((e for e in errors if e is not None), key=lambda e: e[0])
    if happened:
        raise happened[0][1]
    return results


# ---------------------------------------------------------------------------------------------- point to point
class _Recv:
    def __init__(self, comm: InProcessComm, into: torch.Tensor, src: int, tag: int) -> None:
        self.comm, self.into, self.src, self.tag = comm, into, src, tag
        self.done = False  # (waiting again on a finished receive returns at once, as MPI_Wait does)


def message(t: torch.Tensor, order=None) -> torch.Tensor:
    """What is sent or received: the tensor (a view) itself, its dimensions in ``order`` when given."""
    return t if order is None else t.permute(order)


def post_messages(comm: InProcessComm, sends: Sequence[tuple[torch.Tensor, int]],
                  recvs: Sequence[tuple[torch.Tensor, int]], tag: int) -> list:
    """Send copies at once; return the receives to :func:`wait` for."""
    for t, dst in sends:
        comm.world.box(comm.rank, dst, tag).put(t.clone())
    return [_Recv(comm, t, src, tag) for t, src in recvs]


class _Prepared:
    """:func:`post_messages` again at every start (in process nothing is gained by making requests once)."""

    def __init__(self, comm: InProcessComm, sends, recvs, tag: int) -> None:
        self.comm, self.sends, self.recvs, self.tag = comm, list(sends), list(recvs), tag

    def start(self) -> tuple[list, list]:
        return post_messages(self.comm, (), self.recvs, self.tag), post_messages(self.comm, self.sends, (), self.tag)

    def free(self) -> None:
        pass


def prepare_messages(comm: InProcessComm, sends: Sequence[tuple[torch.Tensor, int]],
                     recvs: Sequence[tuple[torch.Tensor, int]], tag: int, what: str = "a halo exchange") -> _Prepared:
    """As :func:`runtime.transport.prepare_messages`: ``start()`` posts the messages, (receives, sends)."""
    return _Prepared(comm, sends, recvs, tag)


def wait(requests: Sequence, what: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
    """Wait for receives (a list of them, or a list of such lists, as MPI's wait takes a list of Pendings)."""
    for r in requests:
        if isinstance(r, (list, tuple)):
            wait(r, what, timeout_s)
            continue
        if not isinstance(r, _Recv) or r.done:
            continue
        try:
            got = r.comm.world.box(r.src, r.comm.rank, r.tag).get(timeout=timeout_s or r.comm.world.timeout_s)
        except queue.Empty:
            raise PeerTimeout(f"rank {r.comm.rank}: no message from rank {r.src} (tag {r.tag}) within "
                              f"{r.comm.world.timeout_s:g} s") from None
        if got.numel() != r.into.numel():
            raise MessageSizeError(f"rank {r.comm.rank}: the message from rank {r.src} holds {got.numel()} "
                                   f"values, {r.into.numel()} expected")
        r.into.copy_(got.reshape(r.into.shape))
        r.done = True


# ---------------------------------------------------------------------------------------------- collectives
def scatter_rows(comm: InProcessComm, image: Optional[torch.Tensor], rows: Sequence, shape: tuple[int, int, int],
                 batch: int, dtype: torch.dtype = torch.float32, root: int = 0) -> torch.Tensor:
    full = comm.world.exchange(comm.rank, image if comm.rank == root else None, "the input scatter")[root]
    band = rows[comm.rank]
    local = full.detach().to(dtype).permute(2, 0, 3, 1)[band.start: band.stop].contiguous()
    return local.permute(1, 3, 0, 2)


def gather_rows(comm: InProcessComm, local: torch.Tensor, rows: Sequence, root: int = 0) -> Optional[torch.Tensor]:
    parts = comm.world.exchange(comm.rank, local.detach().clone(), "the gather of the output map")
    return torch.cat(parts, dim=2).contiguous(memory_format=torch.channels_last) if comm.rank == root else None


def _reduce(parts: list, op: str) -> torch.Tensor:
    total = parts[0].clone()
    for p in parts[1:]:
        total = total + p if op == "sum" else torch.maximum(total, p) if op == "max" else torch.minimum(total, p)
    return total


def allreduce_(comm: InProcessComm, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    t.copy_(_reduce(comm.world.exchange(comm.rank, t.clone(), f"an Allreduce ({op})"), op))
    return t


def reduce_(comm: InProcessComm, t: torch.Tensor, op: str = "sum", root: int = 0) -> Optional[torch.Tensor]:
    parts = comm.world.exchange(comm.rank, t.clone(), f"a Reduce ({op})")
    return _reduce(parts, op) if comm.rank == root else None


def bcast_ints(comm: InProcessComm, values: Sequence[int], root: int = 0, what: str = "a broadcast") -> tuple:
    return tuple(comm.world.exchange(comm.rank, tuple(int(v) for v in values), what)[root])


def bcast_object(comm: InProcessComm, obj, root: int = 0, what: str = "a set-up broadcast"):
    return comm.world.exchange(comm.rank, obj, what)[root]


def _name(r: int) -> str:
    return f"rank {r}"


def agree(comm: InProcessComm, problem: Optional[str], what: str = "set-up") -> None:
    verdict = judge_problems(comm.world.exchange(comm.rank, problem, f"the {what} agreement"), _name)
    if verdict is not None:
        raise AgreedError(verdict)


def agree_on(comm: InProcessComm, value: str, what: str, root: int = 0) -> None:
    verdict = judge_values(comm.world.exchange(comm.rank, value, f"the {what} agreement"), root, what, _name)
    if verdict is not None:
        raise AgreedError(verdict)
