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

from .plan import LayerPlan, SplitPlan

__all__ = [
    "rows_as_buffer",
    "exchange_halos",
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


def exchange_halos(
    comm: MPI.Comm,
    layer: LayerPlan,
    source: torch.Tensor,
    source_first_row: int,
    target: torch.Tensor,
    target_first_row: int,
) -> int:
    """Move this rank's share of ``layer.transfers``; return bytes sent.

    ``source`` holds input rows, its index 0 being image row ``source_first_row``;
    received rows land in ``target``, whose index 0 is image row
    ``target_first_row`` (negative when the target starts with padding rows).  Transfers are done
    as shifts: for each distance ``d`` used by the layer, every rank sends to
    ``rank + d`` and receives from ``rank - d`` in one ``Sendrecv`` -- the
    deadlock-free pattern of mpi4py's halo demo, with ``PROC_NULL`` standing
    in wherever there is nothing to move.
    """
    rank = comm.Get_rank()
    sent = 0
    for shift in sorted({t.dst - t.src for t in layer.transfers}):
        out = next((t for t in layer.transfers if t.src == rank and t.dst == rank + shift), None)
        inc = next((t for t in layer.transfers if t.dst == rank and t.src == rank - shift), None)
        if out is None and inc is None:
            continue
        send_buf, dest = None, MPI.PROC_NULL
        if out is not None:
            a = out.rows.start - source_first_row
            send_buf, _ = rows_as_buffer(source[:, :, a : a + len(out.rows), :])
            dest = out.dst
            sent += send_buf.nbytes
        recv_buf, src, recv_view, in_place = None, MPI.PROC_NULL, None, True
        if inc is not None:
            a = inc.rows.start - target_first_row
            recv_view = target[:, :, a : a + len(inc.rows), :]
            recv_buf, in_place = rows_as_buffer(recv_view)
            src = inc.src
        comm.Sendrecv(
            None if send_buf is None else [send_buf, MPI.FLOAT], dest, 0,
            None if recv_buf is None else [recv_buf, MPI.FLOAT], src, 0,
        )
        if recv_view is not None and not in_place:
            _hwc(recv_view).copy_(torch.from_numpy(recv_buf))
    return sent


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
