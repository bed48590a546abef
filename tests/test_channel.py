"""kd's one channel (kd/channel.py): headers and payloads arrive as sent, heartbeats are skipped but keep the
peer alive, silence and nonsense are one error naming the peer.  On COMM_SELF: this rank is its own peer (its
sends, which MPICH completes only once received, run on a second thread)."""
import threading
import time

import numpy as np
import pytest
import torch

from kd.channel import HEADER, TAG_HEADER, Channel, Kind
from runtime import transport
from runtime.errors import UsageError


def sending(*calls):
    """Run ``calls`` (each blocks until the receiver takes its message) in order on a thread; join it after."""
    failed = []

    def run():
        try:
            for call in calls:
                call()
        except BaseException as err:  # noqa: BLE001
            failed.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, failed


def test_a_header_and_its_payload_arrive_as_sent_past_heartbeats(self_comm):
    ch = Channel(self_comm, 0, 2.0, "the peer")
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8))
    sender, failed = sending(ch.beat, lambda: ch.send(Kind.REQUEST, 3, 4, 4, 3, payload=pixels), ch.beat,
                             lambda: ch.send(Kind.BYE))
    head = ch.recv("request")
    assert head.kind == Kind.REQUEST and head.values[:4] == (3, 4, 4, 3)
    got = ch.recv_payload(torch.empty(3, 4, 4, 3, dtype=torch.uint8), "pixels")
    assert torch.equal(got, pixels)
    assert ch.recv("goodbye").kind == Kind.BYE  # the heartbeat between them was skipped
    sender.join(5)
    assert not failed


def test_heartbeats_are_seen_when_asked_for(self_comm):
    ch = Channel(self_comm, 0, 2.0, "the peer")
    assert not ch.waiting()
    sender, failed = sending(ch.beat)
    deadline = time.monotonic() + 2
    while not ch.waiting() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert ch.recv("anything", heartbeats=True).kind == Kind.HEARTBEAT
    sender.join(5)
    assert not failed and not ch.waiting()


def test_silence_is_one_peer_timeout_naming_the_peer(self_comm):
    ch = Channel(self_comm, 0, 0.2, "the cloud rank 7")
    began = time.monotonic()
    with pytest.raises(transport.PeerTimeout, match=r"^the cloud rank 7 sent no logits within 0.2 s"):
        ch.recv("logits")
    assert time.monotonic() - began < 2


def test_an_unknown_or_unexpected_message_is_one_usage_line(self_comm):
    ch = Channel(self_comm, 0, 2.0, "the edge rank 1")
    bogus = torch.zeros(HEADER, dtype=torch.int64)
    bogus[0] = 99
    sender, failed = sending(lambda: transport.wait_or_raise([transport.isend(self_comm, bogus, 0, TAG_HEADER)],
                                                             2.0, "self"),
                             lambda: ch.send(Kind.DONE, 3))
    with pytest.raises(UsageError, match=r"^the edge rank 1 sent an unknown message \[99"):
        ch.recv("request")
    with pytest.raises(UsageError) as err:
        ch.expect(ch.recv("request"), Kind.REQUEST, Kind.FRAMES)
    assert str(err.value) == "the edge rank 1 sent a done message [3, 0, 0, 0, 0, 0, 0] where a request or frames was due"
    sender.join(5)
    assert not failed


def test_objects_travel_pickled_beside_the_headers(self_comm):
    ch = Channel(self_comm, 0, 2.0, "the peer")
    request = ch.send_object({"labelled": 5})
    sender, failed = sending(lambda: ch.send(Kind.DONE, 1))
    assert ch.recv("done").values[0] == 1
    assert ch.recv_object("report") == {"labelled": 5}
    assert transport.wait_by([request], time.monotonic() + 2)
    sender.join(5)
    assert not failed


@pytest.mark.mpi(min_size=2)
def test_reports_reach_the_root_in_rank_order_and_a_silent_rank_is_one_timeout(world):
    """Regression: distill's and control's result gathering waited on every rank without a deadline."""
    from kd.channel import gather_reports

    me = world.Get_rank()
    rows = gather_reports(world, {"rank": me, "squares": [me * me]}, 10.0)
    if me == 0:
        assert rows == [{"rank": r, "squares": [r * r]} for r in range(world.Get_size())]
    else:
        assert rows is None
    transport.idle_barrier(world, "the test's barrier", 30)
    if me == 0:  # now nobody else reports
        began = time.monotonic()
        with pytest.raises(transport.PeerTimeout, match=r"^rank 1 sent no report within 0.3 s \(--timeout\)"):
            gather_reports(world, {"rank": 0}, 0.3)
        assert time.monotonic() - began < 5
    transport.idle_barrier(world, "the test's barrier", 30)


def test_heartbeats_and_the_receive_thread_need_thread_multiple_one_line(monkeypatch):
    """Regression: heartbeat threads called MPI from a second thread without asking whether MPI allows it."""
    from mpi4py import MPI

    from kd.teacher_source import PrecomputedLogits
    from scheduling.controller import Controller, ControlledSource

    monkeypatch.setattr(MPI, "Query_thread", lambda: MPI.THREAD_SERIALIZED)
    with pytest.raises(UsageError, match=r"^sending heartbeats from a thread while this rank works needs "
                                         r"MPI_THREAD_MULTIPLE"):
        with transport.heartbeats(lambda: None, 1.0):
            pass
    with pytest.raises(UsageError, match=r"^the controller's receive thread needs MPI_THREAD_MULTIPLE"):
        ControlledSource(PrecomputedLogits(torch.zeros(4, 3)), Controller("none", 1, steps=2))
