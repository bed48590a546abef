"""Durable incremental updates: the buffer's invariants, corrupt files refused, and kill -9 at many points.

The kill tests run the edge (with a stand-in cloud and a counting student, see
``tests/incremental_harness.py``) in forked children that are SIGKILLed at every
step boundary of the update and at random moments, then rerun to completion; the
student file's own counts, not the buffer, show that no acknowledged sample was
lost and none was trained on twice.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import time

import numpy as np
import pytest
import torch

from kd.buffer import Buffer
from kd.incremental import file_sha256, read_student, reconcile, run_updates, save_student
from runtime.errors import UsageError
from tests.incremental_harness import (CLASSES, SHAPE, KillAt, StandInCloud, camera_and_edge, cloud_logits,
                                       counting_update, images_for, initial_state, serials_of)


def _new_student(path):
    torch.save(initial_state(), path)


# ---------------------------------------------------------------------- buffer invariants
def test_states_move_pending_labelled_consumed_as_whole_batches(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", SHAPE)
    ids = b.append(images_for(range(10)))
    assert ids == list(range(1, 11)) and b.counts() == {"pending": 10, "labelled": 0, "consumed": 0}
    got_ids, images = b.pending(4)
    assert got_ids.tolist() == ids[:4] and serials_of(images).tolist() == [0, 1, 2, 3]  # oldest first, bytes intact
    b.start("0" * 64)
    batch = b.label(got_ids, cloud_logits(images))
    assert b.counts() == {"pending": 6, "labelled": 4, "consumed": 0} and b.open_batch() == batch
    bid, bimages, blogits = b.batch(batch)
    assert bid.tolist() == ids[:4] and np.array_equal(blogits, cloud_logits(bimages))
    with pytest.raises(UsageError, match="open batch"):  # one open batch at a time
        b.label(ids[4:6], cloud_logits(images_for([4, 5])))
    with pytest.raises(UsageError, match="does not follow"):  # generations go 0, 1, 2, ...
        b.consume(batch, 2, "1" * 64)
    b.consume(batch, 1, "1" * 64)
    assert b.counts() == {"pending": 6, "labelled": 0, "consumed": 4} and b.open_batch() is None
    with pytest.raises(UsageError, match="not open"):
        b.consume(batch, 2, "2" * 64)
    with pytest.raises(UsageError, match="not pending"):  # a consumed sample is never labelled again
        b.label([ids[0]], cloud_logits(images_for([0])))
    assert b.counts() == {"pending": 6, "labelled": 0, "consumed": 4}  # the refused label changed nothing
    assert [g.generation for g in b.generations()] == [0, 1] and b.check() == []
    b.close()
    reopened = Buffer(tmp_path / "b.sqlite")  # survives closing: every step was a commit
    assert reopened.counts() == {"pending": 6, "labelled": 0, "consumed": 4} and reopened.shape == SHAPE


def test_append_with_keys_is_idempotent(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", SHAPE)
    first = b.append(images_for([1, 2, 3]), keys=["a", "b", "c"])
    again = b.append(images_for([1, 2, 3, 4]), keys=["a", "b", "c", "d"])
    assert again[:3] == first and b.counts()["pending"] == 4


def test_constraints_forbid_a_state_without_its_batch_or_logits(tmp_path):
    """Even a buggy writer cannot make a labelled sample without logits: the schema refuses it."""
    b = Buffer(tmp_path / "b.sqlite", SHAPE)
    b.append(images_for([1]))
    with pytest.raises(sqlite3.IntegrityError):
        b._db.execute("UPDATE samples SET state = 'labelled'")
    with pytest.raises(sqlite3.IntegrityError):
        b._db.execute("UPDATE samples SET state = 'bogus'")


def test_bad_input_is_refused_in_one_line(tmp_path):
    b = Buffer(tmp_path / "b.sqlite", SHAPE)
    with pytest.raises(UsageError, match=r"uint8 images of shape \(n, 4, 4, 1\)"):
        b.append(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(UsageError, match="NaN"):
        b.label(b.append(images_for([1])), np.full((1, CLASSES), np.nan, np.float32))
    b.close()
    with pytest.raises(UsageError, match="shape"):
        Buffer(tmp_path / "b.sqlite", (32, 32, 3))
    with pytest.raises(UsageError, match="does not exist"):
        Buffer(tmp_path / "none.sqlite", create=False)


def test_an_acknowledged_image_is_in_the_buffer_file_itself(tmp_path):
    """Rollback journal, not WAL: once append returns, the bytes are in the one file the checks read
    (a WAL would hold them in a side file whose damaged tail SQLite drops without a word)."""
    path = tmp_path / "b.sqlite"
    b = Buffer(path, SHAPE)
    b.append(np.full((3, *SHAPE), 0xC7, np.uint8))
    assert bytes([0xC7] * 16) in path.read_bytes()  # still open: nothing was checkpointed on close
    assert not (tmp_path / "b.sqlite-wal").exists()
    b.close()


# ---------------------------------------------------------------------- corrupt files
def _corrupted(tmp_path, how: str):
    path = tmp_path / "b.sqlite"
    if how == "garbage":
        path.write_bytes(os.urandom(8192))
        return path
    if how == "empty":
        path.write_bytes(b"")
        return path
    if how == "other-sqlite":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE t(x)")
        db.commit()
        db.close()
        return path
    b = Buffer(path, SHAPE)
    b.append(np.full((50, *SHAPE), 0xAB, np.uint8))
    b.close()
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "header":
        data[0:16] = b"not a database!!"
        path.write_bytes(data)
    elif how == "image-byte":  # one bit in one image: structure intact, the CRC32 must catch it
        data[data.index(bytes([0xAB] * 16)) + 3] ^= 0x01
        path.write_bytes(data)
    elif how == "page":  # a whole page of the b-tree overwritten
        data[4096:8192] = os.urandom(4096)
        path.write_bytes(data)
    return path


def test_the_buffer_fsyncs_the_folder_after_each_commit(tmp_path):
    """A commit deletes the rollback journal; with synchronous=FULL that unlink is not fsynced, so a
    power cut can bring the journal back and roll the acknowledged commit back.  EXTRA (3) fsyncs it."""
    with Buffer(str(tmp_path / "b.sqlite"), SHAPE) as buf:
        assert buf._db.execute("PRAGMA synchronous").fetchone()[0] == 3  # EXTRA, read back from SQLite
        assert buf._db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_creating_leaves_a_concurrent_creators_temp_file_alone_and_removes_old_ones(tmp_path):
    """A ``NAME.*.creating`` file may be another process's buffer being made right now: only one left
    for minutes (its creator was killed) is removed."""
    from kd.buffer import STALE_CREATING_S

    path = tmp_path / "b.sqlite"
    fresh, old = tmp_path / "b.sqlite.aaaa0001.creating", tmp_path / "b.sqlite.bbbb0002.creating-journal"
    fresh.write_bytes(b"half made")
    old.write_bytes(b"left by a kill")
    long_ago = time.time() - STALE_CREATING_S - 60
    os.utime(old, (long_ago, long_ago))
    Buffer(str(path), SHAPE).close()
    assert fresh.exists() and fresh.read_bytes() == b"half made"
    assert not old.exists()


@pytest.mark.parametrize("how", ["garbage", "empty", "other-sqlite", "truncated", "header", "image-byte", "page"])
def test_corrupt_buffer_is_refused_with_its_path_and_left_as_is(tmp_path, how):
    path = _corrupted(tmp_path, how)
    before = path.read_bytes()
    with pytest.raises(UsageError, match=str(path)):
        b = Buffer(path, SHAPE)
        b.pending(100)  # a damaged record is found when read, if opening did not find it
    assert path.read_bytes() == before  # never repaired, never truncated


# ---------------------------------------------------------------------- the update loop and its recovery
def test_updates_use_each_sample_once_and_record_each_student(tmp_path):
    buf, student = str(tmp_path / "b.sqlite"), str(tmp_path / "s.pt")
    _new_student(student)
    start_sha = file_sha256(student)
    with Buffer(buf, SHAPE) as b:
        b.append(images_for(range(23)))
        records = run_updates(b, student, StandInCloud(), counting_update, increment=5)
        assert [r.samples for r in records] == [5, 5, 5, 5] and b.counts()["pending"] == 3  # 3 < increment: wait
        gens = b.generations()
        assert gens[0].sha256 == start_sha and gens[-1].sha256 == file_sha256(student)
        assert b.check() == []
    state, meta = read_student(student)
    assert state["count"][:20].tolist() == [1] * 20 and state["count"][20:].sum() == 0
    assert meta["generation"] == 4 and int(state["updates"]) == 4


def test_a_written_but_unrecorded_update_is_recorded_not_trained_again(tmp_path):
    buf, student = str(tmp_path / "b.sqlite"), str(tmp_path / "s.pt")
    _new_student(student)
    with Buffer(buf, SHAPE) as b:
        b.append(images_for(range(5)))
        reconcile(b, student)
        ids, images = b.pending(5)
        batch = b.label(ids, cloud_logits(images))
        state, _ = read_student(student)
        new, info = counting_update(state, images, cloud_logits(images), 1)
        save_student(student, new, {"buffer": b.uuid, "generation": 1, "batch": batch, "info": info})
        # ... and the process died here, before consume()
    with Buffer(buf, SHAPE) as b:
        assert run_updates(b, student, StandInCloud(), counting_update, increment=5) == []
        assert b.counts() == {"pending": 0, "labelled": 0, "consumed": 5} and b.check() == []
        assert b.info(1) == {"serials": [0, 1, 2, 3, 4]}  # what the update reported, kept from the student file
    assert read_student(student)[0]["count"][:5].tolist() == [1] * 5


def test_a_foreign_student_is_refused(tmp_path):
    buf, student = str(tmp_path / "b.sqlite"), str(tmp_path / "s.pt")
    _new_student(student)
    with Buffer(buf, SHAPE) as b:
        reconcile(b, student)
        torch.save({"count": torch.ones(3)}, student)  # replaced by hand
        with pytest.raises(UsageError, match="is not generation 0 of buffer"):
            reconcile(b, student)


STEPS = ["selected", "exchanged", "labelled", "trained", "student_partial", "student_written", "consumed"]


def _run_child(target, args) -> int:
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    return child


def _check_no_loss_no_duplicate(buf, student, acked, every, increment):
    """The final state after a clean rerun, checked against the camera's log and the student's counts."""
    acknowledged = {int(s) for s in open(acked).read().split()} if os.path.exists(acked) else set()
    count = read_student(student)[0]["count"]
    with Buffer(buf, SHAPE) as b:
        assert b.check() == []
        keys = b.keys()
        assert {f"frame-{s}" for s in acknowledged} <= set(keys)  # nothing acknowledged was lost
        assert len(keys) == len(every)  # the final run appended everything once more: no duplicate rows
        states = b.states()
        consumed = {int(k[6:]) for k, i in keys.items() if states[i][0] == "consumed"}
        assert b.counts()["labelled"] == 0 and b.counts()["pending"] < increment
    assert count.max().item() <= 1, f"samples trained twice: {torch.nonzero(count > 1).flatten().tolist()}"
    assert set(torch.nonzero(count == 1).flatten().tolist()) == consumed  # trained once iff consumed
    assert len(consumed) == len(every) - len(every) % increment


def test_kill_9_at_every_step_and_at_random_moments_loses_and_duplicates_nothing(tmp_path):
    """About 60 SIGKILLs in all: each step boundary at its 1st and 2nd occurrence, and up to three in a row
    at random moments (30 cases)."""
    rng = random.Random(15)
    rounds = [list(range(r * 7, r * 7 + 7)) for r in range(6)]  # 42 frames; updates of 5
    every = [s for r in rounds for s in r]
    increment, kills = 5, 0
    cases = [(step, nth) for step in STEPS for nth in (1, 2)] + [(None, 0)] * 30
    for case, (step, nth) in enumerate(cases):
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        buf, student, acked = str(folder / "b.sqlite"), str(folder / "s.pt"), str(folder / "acked")
        _new_student(student)
        for attempt in range(3):  # up to three kills in a row before the clean rerun
            # random moments: each step boundary sleeps 10 ms, so a run lasts about 0.6 s on any machine
            fault = KillAt(step, nth) if step else (lambda _: time.sleep(0.01))
            child = _run_child(camera_and_edge, (buf, student, acked, rounds, increment, fault))
            if step is None:
                time.sleep(rng.uniform(0.0, 0.5))
                if child.is_alive():
                    os.kill(child.pid, signal.SIGKILL)
            child.join(30)
            assert child.exitcode in (0, -signal.SIGKILL), f"child failed: exit {child.exitcode}"
            kills += child.exitcode == -signal.SIGKILL
            if step is not None:
                break
        camera_and_edge(buf, student, acked, rounds, increment)  # the clean rerun: re-sends every frame
        _check_no_loss_no_duplicate(buf, student, acked, every, increment)
    assert kills >= 40  # the test did kill (most random moments land mid-run)


def test_keepalive_sends_a_heartbeat_every_quarter_timeout_while_the_edge_trains(self_comm):
    """The cloud's wait for the edge's next message is bounded by the timeout; an update that trains
    longer than that must not look like a dead edge: the link beats every timeout/4 meanwhile.

    Timing-robust on a loaded machine: at least 2 beats, and no silence (start to first beat,
    beat to beat, last beat to the end) longer than timeout/2, half the peer's patience."""
    from kd.channel import HEADER, TAG_HEADER, Kind
    from kd.incremental import CloudLink
    from runtime import transport

    headers = [torch.zeros(HEADER, dtype=torch.int64) for _ in range(20)]
    requests = [transport.irecv(self_comm, h, 0, TAG_HEADER) for h in headers]  # the "cloud", posted first
    timeout = 0.4
    link = CloudLink(self_comm, 0, timeout_s=timeout)
    sent_at: list[float] = []
    send = link.channel.beat
    link.channel.beat = lambda: (send(), sent_at.append(time.monotonic()))
    began = time.monotonic()
    with link.keepalive():
        time.sleep(0.55)  # "training" for longer than the timeout
    ended = time.monotonic()
    got = [h for h, r in zip(headers, requests) if transport.wait_by([r], time.monotonic() + 0.05)]
    transport.cancel([r for h, r in zip(headers, requests) if not any(h is g for g in got)])
    kinds = [int(h[0]) for h in got]
    assert set(kinds) == {int(Kind.HEARTBEAT)} and len(kinds) >= 2 and len(kinds) == len(sent_at), (kinds, sent_at)
    gaps = np.diff([began, *sent_at, ended])
    assert gaps.max() <= timeout / 2, gaps


def test_a_timed_out_receive_is_cancelled_not_left_posted(self_comm):
    """After a PeerTimeout the receive must be gone: a late message must not land in a buffer its
    owner has given up on (and reused), it must stay unmatched."""
    from runtime import transport

    comm = transport.dup(self_comm)
    try:
        stale = torch.zeros(4, dtype=torch.int64)
        with pytest.raises(transport.PeerTimeout, match="the test peer sent nothing within 0.05 s"):
            transport.wait_or_raise([transport.irecv(comm, stale, 0, 5)], 0.05, "the test peer sent nothing")
        late = torch.tensor([7, 7, 7, 7])
        transport.wait_by([transport.isend(comm, late, 0, 5)], time.monotonic() + 5)
        assert comm.iprobe(source=0, tag=5)  # unmatched: no receive was left posted
        assert stale.tolist() == [0, 0, 0, 0]
        fresh = torch.zeros(4, dtype=torch.int64)
        assert transport.wait_by([transport.irecv(comm, fresh, 0, 5)], time.monotonic() + 5)
        assert fresh.tolist() == [7, 7, 7, 7]
    finally:
        transport.free(comm)


def test_a_full_disk_is_said_as_such_and_loses_nothing(tmp_path):
    """Regression: SQLITE_FULL was reported as a corrupt buffer, with advice to move it away."""
    from kd.buffer import BufferUnwritable

    b = Buffer(tmp_path / "b.sqlite", SHAPE)
    first = b.append(np.zeros((2, *SHAPE), np.uint8))
    pages = b._db.execute("PRAGMA page_count").fetchone()[0]
    b._db.execute(f"PRAGMA max_page_count = {pages}")  # the file may not grow: SQLite answers SQLITE_FULL
    with pytest.raises(BufferUnwritable, match="disk is full or not writable.*still in the buffer"):
        b.append(np.ones((2000, *SHAPE), np.uint8))
    b.close()
    again = Buffer(tmp_path / "b.sqlite")
    assert again.counts()["pending"] == len(first) and again.check() == []  # nothing lost, nothing torn


def test_a_buffer_is_made_where_hard_links_are_not(tmp_path, monkeypatch):
    """FAT/exFAT (SD cards) have no hard links: os.link fails with EPERM; the buffer is still created."""
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    b = Buffer(tmp_path / "b.sqlite", SHAPE)
    b.append(np.zeros((1, *SHAPE), np.uint8))
    assert b.counts()["pending"] == 1 and not list(tmp_path.glob("*.creating*"))


def test_each_update_starts_from_the_temperature_the_last_one_ended_with(tmp_path):
    """Alg. 2 updates W and T and initialises neither: generation g+1 gets generation g's final T (the first
    update, from a plain student file, has none to carry)."""
    buf, student = str(tmp_path / "b.sqlite"), str(tmp_path / "s.pt")
    _new_student(student)
    given = []

    def update(state, images, logits, generation, temperature):
        given.append(temperature)
        new, info = counting_update(state, images, logits, generation)
        return new, {**info, "final_T": 2.5 + generation}  # what a learnt T would have ended at

    with Buffer(buf, SHAPE) as b:
        b.append(images_for(range(15)))
        run_updates(b, student, StandInCloud(), update, increment=5)
    assert given == [None, 3.5, 4.5]


@pytest.mark.parametrize("method, carried", [("aflkd", 7.25), ("ctkd", 7.25), ("kd", None)])
def test_update_student_starts_a_learnt_temperature_where_it_is_given(method, carried):
    """With T's learning rate 0 the final T is the starting T: the carried one for a method that learns T,
    clamped into [t_min, t_max]; the fixed --temperature otherwise."""
    from kd.incremental import update_student
    from kd.trainer import EdgeConfig
    from models import edge_net
    from tests.test_teacher import tiny

    data = tiny(n=24)
    config = EdgeConfig(method, 1, steps=2, batch=8, t_lr=0.0)
    state = edge_net(1, 3, 32, 3).state_dict()
    images = data.x_train[:16]
    logits = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    _, info, _ = update_student(config, data, state, images, logits, 1, temperature=7.25)
    assert info["final_T"] == pytest.approx(carried if carried is not None else config.temperature)
    _, info, _ = update_student(config, data, state, images, logits, 1, temperature=99.0)
    assert info["final_T"] == pytest.approx(config.t_max if carried is not None else config.temperature)
