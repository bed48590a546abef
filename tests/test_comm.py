"""The MPI layer on one rank (COMM_SELF): strided messages without staging copies, any dtype, tags."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from runtime import transport as mpi


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32])
def test_band_of_a_channels_last_batch_travels_in_place(self_comm, batch, dtype):
    """A band of rows of an (N, C, H, W) channels-last batch is not contiguous for N > 1: a derived datatype."""
    src = torch.arange(batch * 4 * 9 * 5).reshape(batch, 4, 9, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    dst = torch.zeros_like(src)
    mpi.sendrecv(self_comm, src[:, :, 2:5], 0, dst[:, :, 6:9], 0, tag=7)
    assert torch.equal(dst[:, :, 6:9], src[:, :, 2:5])
    assert torch.count_nonzero(dst[:, :, :6]) == 0


@pytest.mark.parametrize("layouts", [("cl", "cl"), ("nchw", "cl"), ("cl", "nchw"), ("nchw", "nchw")])
@pytest.mark.parametrize("batch", [1, 2])
def test_halo_wire_order_agrees_across_layouts(self_comm, layouts, batch):
    """Both ends in CHANNELS_LAST_ORDER: any pair of layouts gets the right rows (checked element by element
    against the source), and a channels-last band at batch 1 is one plain contiguous block (no derived type:
    MPI would pack it element by element)."""
    fmt = {"cl": torch.channels_last, "nchw": torch.contiguous_format}
    src = torch.randn(batch, 5, 9, 7).contiguous(memory_format=fmt[layouts[0]])
    dst = torch.zeros(batch, 5, 9, 7).contiguous(memory_format=fmt[layouts[1]])
    wire = mpi.CHANNELS_LAST_ORDER
    pending = mpi.post_messages(self_comm, [(mpi.message(src[:, :, 2:5], wire), 0)],
                                [(mpi.message(dst[:, :, 4:7], wire), 0)], tag=9)
    mpi.wait(pending)
    assert torch.equal(dst[:, :, 4:7], src[:, :, 2:5])
    assert torch.count_nonzero(dst[:, :, :4]) == 0 and torch.count_nonzero(dst[:, :, 7:]) == 0
    band = torch.zeros(1, 5, 9, 7).contiguous(memory_format=torch.channels_last)[:, :, 3:6]
    _, count, datatype = mpi.message(band, wire)
    assert (count, datatype) == (band.numel(), mpi.MPI.FLOAT)
    _, count, datatype = mpi.message(band)  # its logical order is strided: a derived type
    assert count == 1 and datatype != mpi.MPI.FLOAT


def test_posted_messages_arrive_in_order(self_comm):
    src = torch.randn(2, 3, 8, 4).contiguous(memory_format=torch.channels_last)
    dst = torch.zeros_like(src)
    requests = mpi.post(self_comm, [(src[:, :, 0:1], 0), (src[:, :, 5:8], 0)],
                        [(dst[:, :, 0:1], 0), (dst[:, :, 5:8], 0)], tag=3)
    mpi.wait(requests)
    assert torch.equal(dst[:, :, 0:1], src[:, :, 0:1]) and torch.equal(dst[:, :, 5:8], src[:, :, 5:8])


def test_scatter_gather_and_reduce_on_one_rank(self_comm):
    from runtime.geometry import RowRange

    image = torch.randn(2, 3, 6, 5)
    local = mpi.scatter_rows(self_comm, image, [RowRange(0, 6)], (3, 6, 5), 2)
    assert torch.equal(local, image)
    assert torch.equal(mpi.gather_rows(self_comm, local, [RowRange(0, 6)]), image)
    t = torch.ones(4)
    assert torch.equal(mpi.allreduce_(self_comm, t), torch.ones(4))


def test_halo_tags_are_unique_per_node_and_below_the_fixed_tags():
    tags = {mpi.halo_tag(n, 50) for n in range(50)}
    assert len(tags) == 50 and max(tags) < mpi.TAG_PASSES
    fixed = {mpi.TAG_COLUMNS, mpi.TAG_LINK, mpi.TAG_SIZE_CHECK}
    assert min(fixed) >= mpi.TAG_PASSES and max(fixed) + 100 <= mpi.TAG_LIMIT  # the two kinds never meet
    with pytest.raises(ValueError):
        mpi.halo_tag(50, 50)
    with pytest.raises(ValueError):
        mpi.halo_tag(mpi.TAG_PASSES, mpi.TAG_PASSES + 1)


def test_peak_memory_of_a_child_is_its_own():
    """getrusage's maximum survives exec, so a child started from a big process reported the parent's peak."""
    ballast = np.ones(400 * 2**20 // 8)  # 400 MB held by this process
    code = "from runtime.benchmark import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    from runtime.benchmark import peak_rss_mb

    assert peak_rss_mb() > child + 300 and ballast.sum() > 0


@pytest.mark.parametrize("env, cores, expected", [
    ({"MPI_LOCALNRANKS": "4"}, 2, True),            # MPICH: 4 ranks on this host's 2 cores
    ({"MPI_LOCALNRANKS": "2"}, 2, False),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 16, False),  # Open MPI
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "17"}, 16, True),
    ({}, 1, False),                                 # not started by mpiexec
    ({"MPI_LOCALNRANKS": "4", "AFLKD_YIELD": "0"}, 2, False),
    ({"MPI_LOCALNRANKS": "1", "AFLKD_YIELD": "1"}, 2, True),
])
def test_waits_yield_their_core_only_when_ranks_outnumber_cores(monkeypatch, env, cores, expected):
    """Oversubscribed ranks that spin hold the core their peer needs (the MPI tests at 4 and 8 ranks on 2 cores
    ran 116 and 47 s spinning, 93 and 32 s yielding); ranks with a core each keep spinning (no added latency)."""
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "AFLKD_YIELD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(mpi.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert mpi._oversubscribed() is expected
