"""Every mpi4py call of the runtime, on plain tensors: no plan types, any dtype, any root.

Tensors travel through the buffer API (upper-case methods) as numpy views of
their memory, never pickled.  A message is any strided view of a tensor --
a band of rows of a channels-last batch, say -- described to MPI by a derived
datatype built from the view's sizes and strides (cached), so no view is ever
copied into a staging buffer: batch 1 or 8, contiguous or not.

Tags are built from (pass, node) by :func:`tag_for`, so messages of different
passes or micro-batches in flight never match each other.
"""
from __future__ import annotations

import sys
import time
import traceback
from functools import lru_cache
from typing import Callable, Iterable, Optional, Sequence, TypeVar

import numpy as np
import torch
from mpi4py import MPI
from mpi4py.util import dtlib

__all__ = [
    "tag_for",
    "message",
    "sendrecv",
    "post",
    "post_messages",
    "wait",
    "scatter_rows",
    "gather_rows",
    "allreduce_",
    "reduce_",
    "idle_barrier",
    "barrier",
    "ranks_on_this_host",
    "bcast_object",
    "gather_objects",
    "allgather_objects",
    "share_from_root",
    "abort_on_uncaught_exception",
    "split_comm",
    "free_comm",
    "rows_major",
    "isend_rows",
    "recv_rows",
    "irecv_rows",
    "scatter_objects",
    "ibcast",
    "iprobe",
]

T = TypeVar("T")

#: Tags must stay below MPI_TAG_UB, which the standard guarantees to be at least 32767.
_TAG_LIMIT = 32767

#: numpy has no bfloat16: such tensors travel as same-sized integers.
_AS_INTEGERS = {torch.bfloat16: torch.int16}


def tag_for(pass_number: int, node: int, nodes: int) -> int:
    """A tag unique to (pass, node) among the last ``32767 // nodes`` passes in flight."""
    if not 0 <= node < nodes:
        raise ValueError(f"node index {node} outside [0, {nodes})")
    window = max(1, _TAG_LIMIT // nodes)
    return (pass_number % window) * nodes + node


def _mpi_type(dtype: np.dtype) -> MPI.Datatype:
    """The predefined MPI datatype of a numpy dtype (reductions need predefined types)."""
    found = MPI._typedict.get(dtype.char)
    return found if found is not None else dtlib.from_numpy_dtype(dtype)


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype in _AS_INTEGERS:
        t = t.view(_AS_INTEGERS[t.dtype])
    return t.numpy()


@lru_cache(maxsize=None)
def _strided_type(sizes: tuple[int, ...], strides: tuple[int, ...], numpy_dtype: str):
    """A committed MPI datatype laying out ``sizes`` elements at ``strides`` (in elements).

    Dimensions that are contiguous in memory are merged first, so a contiguous
    view is a plain ``count x base`` message and a band of rows of a
    channels-last batch one ``vector``.
    """
    base = _mpi_type(np.dtype(numpy_dtype))
    itemsize = np.dtype(numpy_dtype).itemsize
    dims = [(n, s) for n, s in zip(sizes, strides) if n != 1]
    merged: list[list[int]] = []
    for n, s in reversed(dims):  # innermost first
        if merged and s == merged[-1][0] * merged[-1][1]:
            merged[-1][0] *= n
        else:
            merged.append([n, s])
    if not merged:
        return base, 1
    if merged[0][1] == 1 and len(merged) == 1:
        return base, merged[0][0]
    dtype = base
    if merged[0][1] == 1:
        inner, merged = merged[0][0], merged[1:]
        dtype = base.Create_contiguous(inner)
    for n, s in merged:
        dtype = dtype.Create_hvector(n, 1, s * itemsize)
    dtype.Commit()
    return dtype, 1


def message(t: torch.Tensor) -> list:
    """A buffer-API message over ``t``'s own memory (any strides, no copy)."""
    t = t.detach()
    if t.numel() == 0:
        return [np.empty(0, dtype=np.float32), 0, MPI.FLOAT]
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    flat = t.as_strided((span,), (1,), t.storage_offset())
    array = _numpy(flat)
    dtype, count = _strided_type(tuple(t.shape), tuple(t.stride()), array.dtype.str)
    return [array, count, dtype]


def _peer(rank: Optional[int]) -> int:
    return MPI.PROC_NULL if rank is None else rank


def sendrecv(comm: MPI.Comm, send: Optional[torch.Tensor], dest: Optional[int],
             recv: Optional[torch.Tensor], source: Optional[int], tag: int) -> None:
    """Blocking exchange: ``send`` to ``dest`` while receiving ``recv`` from ``source`` (None: no peer)."""
    comm.Sendrecv(message(send) if send is not None else None, _peer(dest), tag,
                  message(recv) if recv is not None else None, _peer(source), tag)


def post(comm: MPI.Comm, sends: Iterable[tuple[torch.Tensor, int]],
         recvs: Iterable[tuple[torch.Tensor, int]], tag: int) -> list:
    """Non-blocking exchange: receives posted first, then sends; wait with :func:`wait`.

    Messages between the same pair with the same tag match in posting order, so
    both ends must list them in the same order (the plan sorts them by row).
    """
    return post_messages(comm, [(message(t), dst) for t, dst in sends], [(message(t), src) for t, src in recvs], tag)


def post_messages(comm: MPI.Comm, sends: Iterable[tuple[list, int]], recvs: Iterable[tuple[list, int]],
                  tag: int) -> list:
    """:func:`post` with messages already built by :func:`message` (reused pass after pass on fixed buffers)."""
    requests = [comm.Irecv(m, source=src, tag=tag) for m, src in recvs]
    requests += [comm.Isend(m, dest=dst, tag=tag) for m, dst in sends]
    return requests


def wait(requests: list) -> None:
    if requests:
        MPI.Request.Waitall(requests)


def _row_counts(rows: Sequence, per_row: int) -> tuple[list[int], list[int]]:
    return [len(r) * per_row for r in rows], [r.start * per_row for r in rows]


def scatter_rows(comm: MPI.Comm, image: Optional[torch.Tensor], rows: Sequence, shape: tuple[int, int, int],
                 batch: int, dtype: torch.dtype = torch.float32, root: int = 0) -> torch.Tensor:
    """Root's ``(N, C, H, W)`` batch -> each rank's band ``rows[rank]`` (objects with start/stop).

    Returns an ``(N, C, h, W)`` view, channels-last when ``N == 1``.
    """
    channels, _, width = shape
    per_row = batch * width * channels
    counts, displs = _row_counts(rows, per_row)
    send = None
    if comm.Get_rank() == root:
        full = image.detach().permute(2, 0, 3, 1).contiguous()  # H-major: each rank's band is contiguous
        array = _numpy(full)
        send = [array, counts, displs, _mpi_type(array.dtype)]
    local = torch.empty(len(rows[comm.Get_rank()]), batch, width, channels, dtype=dtype)
    array = _numpy(local)
    comm.Scatterv(send, [array, _mpi_type(array.dtype)], root=root)
    return local.permute(1, 3, 0, 2)


def gather_rows(comm: MPI.Comm, local: torch.Tensor, rows: Sequence, root: int = 0) -> Optional[torch.Tensor]:
    """Each rank's ``(N, C, h, W)`` band -> the whole ``(N, C, H, W)`` map on ``root`` (None elsewhere)."""
    batch, channels, _, width = local.shape
    height = max(r.stop for r in rows)
    per_row = batch * width * channels
    counts, displs = _row_counts(rows, per_row)
    mine = _numpy(local.detach().permute(2, 0, 3, 1).contiguous())
    base = _mpi_type(mine.dtype)
    full = recv = None
    if comm.Get_rank() == root:
        full = torch.empty(height, batch, width, channels, dtype=local.dtype)
        recv = [_numpy(full), counts, displs, base]
    comm.Gatherv([mine, base], recv, root=root)
    return full.permute(1, 3, 0, 2) if full is not None else None


_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}


def allreduce_(comm: MPI.Comm, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce a contiguous tensor over all ranks, in place; every rank gets the result."""
    comm.Allreduce(MPI.IN_PLACE, message(t), op=_OPS[op])
    return t


def reduce_(comm: MPI.Comm, t: torch.Tensor, op: str = "sum", root: int = 0) -> Optional[torch.Tensor]:
    """Reduce a contiguous tensor onto ``root`` (in place there); None on the other ranks."""
    if comm.Get_rank() == root:
        comm.Reduce(MPI.IN_PLACE, message(t), op=_OPS[op], root=root)
        return t
    comm.Reduce(message(t), None, op=_OPS[op], root=root)
    return None


def idle_barrier(comm: MPI.Comm, poll_s: float = 0.0005) -> None:
    """A barrier whose waiting ranks sleep instead of spinning on a core.

    MPICH's ``Barrier`` busy-polls: while one rank times a multi-threaded run the
    others would steal its cores.
    """
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_s)


def self_comm() -> MPI.Comm:
    """This process alone (MPI_COMM_SELF): a self-send/recv times the local cost of a message."""
    return MPI.COMM_SELF


def barrier(comm: MPI.Comm) -> None:
    """A busy barrier: the tightest common start for timing."""
    comm.Barrier()


def ranks_on_this_host(comm: MPI.Comm) -> int:
    """How many ranks of ``comm`` share this host's memory (and cores)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    size = local.Get_size()
    local.Free()
    return size


def bcast_object(comm: MPI.Comm, obj, root: int = 0):
    """Small control data (pickled): set-up, verdicts, never tensors on a hot path."""
    return comm.bcast(obj, root=root)


def gather_objects(comm: MPI.Comm, obj, root: int = 0):
    """Small control data (pickled) from every rank onto ``root``; None elsewhere."""
    return comm.gather(obj, root=root)


def allgather_objects(comm: MPI.Comm, obj) -> list:
    """Small control data (pickled) from every rank, on every rank."""
    return comm.allgather(obj)


def share_from_root(comm: MPI.Comm, work: Callable[[], T], root: int = 0, error: type = ValueError) -> T:
    """Run ``work`` on ``root`` only and broadcast its (small, picklable) result.

    An ``error`` raised there is re-raised on every rank, so all ranks exit
    together instead of waiting for a dead root.  Set-up only: this pickles.
    """
    result, problem = None, None
    if comm.Get_rank() == root:
        try:
            result = work()
        except error as err:
            problem = str(err)
    result, problem = comm.bcast((result, problem), root=root)
    if problem is not None:
        raise error(problem)
    return result


def abort_on_uncaught_exception(comm: MPI.Comm = MPI.COMM_WORLD) -> None:
    """Make an exception on one rank end the whole job instead of hanging its peers.

    Same effect as running under ``python -m mpi4py``: print the traceback with
    the rank, then ``Abort`` so no rank waits forever in its next exchange.
    """
    previous = sys.excepthook

    def hook(kind, value, tb):
        if comm.Get_size() > 1:
            sys.stderr.write(f"[rank {comm.Get_rank()}] ")
            traceback.print_exception(kind, value, tb)
            sys.stderr.flush()
            comm.Abort(1)
        previous(kind, value, tb)

    sys.excepthook = hook


# ---------------------------------------------------------------------- pipeline: communicators and row bands
def split_comm(comm: MPI.Comm, color: int, key: int) -> MPI.Comm:
    """A sub-communicator of the ranks that give the same ``color``, ordered by ``key`` (collective)."""
    return comm.Split(color, key)


def free_comm(comm: MPI.Comm) -> None:
    if comm not in (MPI.COMM_WORLD, MPI.COMM_SELF) and comm != MPI.COMM_NULL:
        comm.Free()


def rows_major(rows: int, batch: int, channels: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty band stored rows-first ``(h, N, W, C)``: any run of rows is one contiguous block.

    ``band.permute(1, 3, 0, 2)`` is the ``(N, C, h, W)`` view the executors use
    (channels-last at batch 1), the layout :func:`scatter_rows` returns.
    """
    return torch.empty(rows, batch, width, channels, dtype=dtype)


def isend_rows(comm: MPI.Comm, band: torch.Tensor, dest: int, tag: int):
    """Start sending a contiguous rows-first band; returns the request (keep ``band`` alive until it completes)."""
    return comm.Isend(message(band), dest=dest, tag=tag)


def recv_rows(comm: MPI.Comm, band: torch.Tensor, source: int, tag: int) -> torch.Tensor:
    """Receive into a contiguous rows-first band whose shape both ends know from the plan."""
    comm.Recv(message(band), source=source, tag=tag)
    return band


def irecv_rows(comm: MPI.Comm, band: torch.Tensor, source: int, tag: int):
    """Post a receive into a contiguous rows-first band (e.g. one cluster's rows of the root's full map)."""
    return comm.Irecv(message(band), source=source, tag=tag)


def scatter_objects(comm: MPI.Comm, objs: Optional[list], root: int = 0):
    """One small picklable object per rank from ``root`` (set-up only: e.g. each rank's own weights)."""
    return comm.scatter(objs, root=root)


# ---------------------------------------------------------------------- the whole system: decisions between images
def ibcast(comm: MPI.Comm, t: torch.Tensor, root: int = 0) -> MPI.Request:
    """Non-blocking broadcast of a contiguous tensor (every rank of ``comm`` calls it; wait with a deadline)."""
    return comm.Ibcast(message(t), root=root)


def iprobe(comm: MPI.Comm, source: int, tag: int) -> bool:
    """Whether a message from ``source`` with ``tag`` is waiting (never blocks)."""
    return bool(comm.Iprobe(source=source, tag=tag))


def world() -> MPI.Comm:
    """The job's world communicator (so callers need not import mpi4py)."""
    return MPI.COMM_WORLD


def rank(comm: MPI.Comm) -> int:
    return comm.Get_rank()


def size(comm: MPI.Comm) -> int:
    return comm.Get_size()
