"""Every mpi4py call of the runtime: halo exchange, scatter/gather of row slices, abort.

Tensors travel through the buffer API (upper-case methods) as numpy views of
torch tensors, never pickled.  Feature maps are kept channels-last, so a band
of rows of one image, ``x[:, :, a:b, :]`` with batch 1, is one contiguous block
of memory and is sent or received in place, with no copy.  Larger batches go
through a contiguous staging copy.
"""
from __future__ import annotations

import sys
import traceback

import numpy as np
import torch
from mpi4py import MPI

from .plan import SplitPlan

__all__ = [
    "rows_as_buffer",
    "sendrecv_rows",
    "post_rows",
    "wait_rows",
    "float_message",
    "scatter_rows",
    "gather_rows",
    "abort_on_uncaught_exception",
]


def _hwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W, C) view: row bands of batch-1 CL tensors are contiguous."""
    return t.permute(0, 2, 3, 1)


def rows_as_buffer(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """A numpy buffer over ``t``'s memory if it is contiguous, else a staging copy.

    Returns ``(array, is_view)``; a receiver must copy a staging array back.
    """
    view = _hwc(t)
    if view.is_contiguous():
        return view.numpy(), True
    return view.contiguous().numpy(), False


def sendrecv_rows(comm: MPI.Comm, send, dest: int, recv, source: int, tag: int) -> None:
    """One step of a halo exchange: ``send``/``recv`` are ``[array, MPI.FLOAT]`` or None; -1 = no peer."""
    comm.Sendrecv(send, MPI.PROC_NULL if dest < 0 else dest, tag, recv, MPI.PROC_NULL if source < 0 else source, tag)


def post_rows(comm: MPI.Comm, steps, tag: int) -> list:
    """Non-blocking form of a halo exchange: ``steps`` are ``(send, dest, recv, source)``.

    Receives are posted first; wait on the returned requests with :func:`wait_rows`.
    """
    requests = [comm.Irecv(recv, source=source, tag=tag) for _, _, recv, source in steps if recv is not None]
    requests += [comm.Isend(send, dest=dest, tag=tag) for send, dest, _, _ in steps if send is not None]
    return requests


def wait_rows(requests: list) -> None:
    if requests:
        MPI.Request.Waitall(requests)


def float_message(array: np.ndarray) -> list:
    return [array, MPI.FLOAT]


def _counts(plan_rows, per_row: int) -> tuple[list[int], list[int]]:
    counts = [len(r) * per_row for r in plan_rows]
    displs = [r.start * per_row for r in plan_rows]
    return counts, displs


def scatter_rows(comm: MPI.Comm, plan: SplitPlan, image: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Rank 0's ``(N, C, H, W)`` image -> each rank's own input rows, channels-last."""
    rank = comm.Get_rank()
    channels, height, width = plan.in_shape
    rows = plan.input_rows
    per_row = batch * width * channels
    counts, displs = _counts(rows, per_row)
    send = None
    if rank == 0:
        full = image.permute(2, 0, 3, 1).contiguous()  # H-major: rank blocks are contiguous
        send = [full.numpy(), counts, displs, MPI.FLOAT]
    mine = rows[rank]
    local = torch.empty(len(mine), batch, width, channels)
    comm.Scatterv(send, [local.numpy(), MPI.FLOAT], root=0)
    return local.permute(1, 3, 0, 2)  # (N, C, h, W) view, channels-last strides when N == 1


def gather_rows(comm: MPI.Comm, plan: SplitPlan, local: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Each rank's output rows -> the whole ``(N, C, H, W)`` map on rank 0 (None elsewhere)."""
    rank = comm.Get_rank()
    channels, height, width = plan.out_shape
    per_row = batch * width * channels
    counts, displs = _counts(plan.output_rows, per_row)
    mine = local.permute(2, 0, 3, 1).contiguous()
    recv = None
    full = None
    if rank == 0:
        full = torch.empty(height, batch, width, channels)
        recv = [full.numpy(), counts, displs, MPI.FLOAT]
    comm.Gatherv([mine.numpy(), MPI.FLOAT], recv, root=0)
    return full.permute(1, 3, 0, 2) if rank == 0 else None


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
