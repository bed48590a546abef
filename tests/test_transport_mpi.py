"""The transport under mpiexec: a wrong-sized message is an error naming both ranks, a silent peer a
timeout naming it, and set-up problems of one rank are refused on every rank (``agree``)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.mpi


@pytest.fixture()
def comm():
    from runtime import transport

    c = transport.world().Dup()
    yield c
    c.Free()


@pytest.mark.parametrize("sent,planned", [(10, 8), (6, 8)])
def test_a_message_of_another_size_is_an_error_naming_both_ranks(comm, sent, planned):
    from runtime import transport

    if comm.Get_size() < 2 or comm.Get_rank() > 1:
        transport.idle_barrier(comm)
        return
    if comm.Get_rank() == 1:
        transport.wait(transport.isend_rows(comm, torch.arange(sent, dtype=torch.float32), 0,
                                            transport.TAG_SIZE_CHECK))
    else:
        band = torch.full((planned,), -1.0)
        with pytest.raises(transport.MessageSizeError) as caught:
            transport.recv_rows(comm, band, 1, transport.TAG_SIZE_CHECK)
        text = str(caught.value)
        assert text.startswith("rank 0") and "rank 1" in text and "different plans" in text
    transport.idle_barrier(comm)


def test_progress_between_layers_completes_no_request(comm):
    """:func:`transport.progress` (a pipeline stage calls it between instructions) must not complete a receive
    behind wait's back (its status, which wait's size check reads, would be lost: a right-sized message would
    then look empty)."""
    from runtime import transport

    if comm.Get_size() < 2 or comm.Get_rank() > 1:
        transport.idle_barrier(comm)
        return
    if comm.Get_rank() == 1:
        transport.wait(transport.isend_rows(comm, torch.arange(8, dtype=torch.float32), 0, transport.TAG_SIZE_CHECK))
    else:
        band = torch.full((8,), -1.0)
        pending = transport.irecv_rows(comm, band, 1, transport.TAG_SIZE_CHECK)
        for _ in range(2000):
            transport.progress(comm)
        transport.wait(pending)
        assert band.tolist() == list(range(8))
    transport.idle_barrier(comm)


def test_a_silent_peer_is_a_timeout_naming_it(comm):
    from runtime import transport

    if comm.Get_size() >= 2 and comm.Get_rank() == 0:
        band = torch.empty(4)
        with pytest.raises(transport.PeerTimeout, match="no message from rank 1.* within 0.3 s"):
            transport.wait(transport.irecv_rows(comm, band, 1, transport.TAG_SIZE_CHECK), timeout_s=0.3)
    transport.idle_barrier(comm)


def test_a_problem_on_one_rank_is_refused_on_every_rank(comm):
    from runtime import transport

    problem = "cannot write out/x.json" if comm.Get_rank() == comm.Get_size() - 1 else None
    with pytest.raises(transport.AgreedError) as caught:
        transport.agree(comm, problem, "test")
    if comm.Get_size() > 1:
        assert str(caught.value).startswith(f"rank {comm.Get_size() - 1} (") and "out/x.json" in str(caught.value)
    transport.agree(comm, None, "test")  # nothing wrong: returns on every rank


def test_a_value_that_differs_on_one_rank_is_refused_naming_it(comm):
    from runtime import transport

    transport.agree_on(comm, "abc", "plan")
    if comm.Get_size() < 2:
        return
    value = "xyz" if comm.Get_rank() == 1 else "abc"
    with pytest.raises(transport.AgreedError, match=r"rank 1 \(.*\) has another plan than rank 0"):
        transport.agree_on(comm, value, "plan")


def test_object_collectives_carry_what_pickle_would(comm):
    from runtime import transport

    r, n = comm.Get_rank(), comm.Get_size()
    assert transport.bcast_object(comm, {"a": [1, 2]} if r == 0 else None) == {"a": [1, 2]}
    assert transport.allgather_objects(comm, ("r", r)) == [("r", k) for k in range(n)]
    got = transport.gather_objects(comm, r * r)
    assert got == ([k * k for k in range(n)] if r == 0 else None)
    assert transport.scatter_objects(comm, [f"x{k}" for k in range(n)] if r == 0 else None) == f"x{r}"
    assert transport.ranks_on_this_host(comm) == n  # mpiexec on one host
