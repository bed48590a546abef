"""Streamed distillation over MPI (pytest-mpi; run by 'aflkd test' at 2, 3 and 4 ranks).

One cloud rank holds the teacher, every other rank is an edge with its own
method, net and seed.  What each edge gets is compared with the in-process
trainer run on the same rank with the same seed and a teacher of the same
weights: with the float32 wire the student's weights must be bit-for-bit the
same (both sides compute the teacher's logits with the same code on the same
images, one thread each; MPI copies the float32 bytes).  At 3 and 4 ranks this
is one cloud serving two and three edges, each getting what it would alone.
"""
import time

import numpy as np
import pytest
import torch

from kd.streaming import EdgeJob, open_cloud, open_edge
from kd.teacher_source import CloudLost
from kd.trainer import EdgeConfig, train_edge
from kd.wire import parse_wire
from models import cloud_net
from runtime.errors import UsageError
from tests.test_teacher import tiny

METHODS = ("aflkd", "kd", "ctkd", "sslf", "baseline")


def _teacher(classes=3):
    torch.manual_seed(11)
    return cloud_net(3, 32, classes).eval()


def _job(rank: int, wire: str = "float32") -> EdgeJob:
    """Edge ``rank``'s own config: method, net, seed, subset and run-ahead differ from rank to rank."""
    config = EdgeConfig(METHODS[rank % len(METHODS)], 1 + rank % 2, steps=7, batch=8, seed=100 + rank)
    idx = np.sort(np.random.default_rng(rank).choice(48, size=20 + 4 * rank, replace=False))
    return EdgeJob(config, idx, parse_wire(wire), run_ahead=1 + rank % 3)


def _serve(world, cloud, data, timeout_s=60.0):
    server = open_cloud(world, cloud, _teacher(), data, timeout_s=timeout_s)
    try:
        return server.serve()
    finally:
        server.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("where", ["first", "last"])
def test_streamed_students_equal_in_process_students(world, agree, where):
    cloud = 0 if where == "first" else world.size - 1
    data = tiny(n=48)
    problems = []
    if world.rank == cloud:
        served = _serve(world, cloud, data)
        for row in served:  # every batch of a distilling edge, none to an edge that only copies weights (sslf)
            job = _job(row["rank"])
            want = job.config.steps if job.config.method in ("aflkd", "kd", "ctkd") else 0
            if row["steps"] != want:
                problems.append(f"edge {row['rank']} ({job.config.method}): served {row['steps']} batches, "
                                f"expected {want}")
    else:
        job = _job(world.rank)
        source = open_edge(world, cloud, job, data, timeout_s=60.0)
        streamed = train_edge(job.config, data, job.train_idx, source=source)
        alone = train_edge(job.config, data, job.train_idx, teacher=_teacher())
        want, got = alone.model.state_dict(), streamed.model.state_dict()
        for key in want:
            if not torch.equal(want[key], got[key]):
                problems.append(f"edge {world.rank} ({job.config.method}): {key} differs by "
                                f"{(want[key].float() - got[key].float()).abs().max():.3g}")
        if [h["T"] for h in streamed.history] != [h["T"] for h in alone.history]:
            problems.append(f"edge {world.rank}: T history differs")
        expected = job.config.steps * min(job.config.batch, len(job.train_idx)) * 3 * 4 if job.config.method in (
            "aflkd", "kd", "ctkd") else 0
        if source.bytes_received != expected:
            problems.append(f"edge {world.rank}: received {source.bytes_received} bytes, expected {expected}")
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("wire", ["float16", "topk:2"])
def test_smaller_wire_formats_train_close_to_float32(world, agree, wire):
    """float16 and top-k logits change the student a little, never its shape; bytes are what the format says."""
    data = tiny(n=48)
    problems = []
    if world.rank == 0:
        for row in _serve(world, 0, data):
            per_batch = min(8, len(_job(row["rank"]).train_idx))
            want = {"float16": per_batch * 3 * 2, "topk:2": per_batch * (3 * 4 + 2 * 2)}[wire]
            if row["bytes_per_batch"] != want:
                problems.append(f"{wire}: {row['bytes_per_batch']} bytes per batch, expected {want}")
    else:
        job = _job(world.rank, wire)
        source = open_edge(world, 0, job, data, timeout_s=60.0)
        result = train_edge(job.config, data, job.train_idx, source=source)
        if not all(torch.isfinite(v.float()).all() for v in result.model.state_dict().values()):
            problems.append(f"edge {world.rank}: non-finite weights with {wire}")
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("edge_data, want", [
    (dict(classes=4), "the teacher on cloud rank 0 has 3 classes but the student on edge rank 1 has 4"),
    (dict(channels=1, side=28), "the teacher on cloud rank 0 takes (3, 32, 32) images but edge rank 1 trains on "
                                "(1, 32, 32)"),
])
def test_mismatched_teacher_and_student_fail_on_every_rank_with_one_message(world, agree, edge_data, want):
    """Edge rank 1's data do not fit the teacher (4 classes; grey 28x28 images): the same one-line error
    on every rank, before any logits move."""
    problems, message = [], None
    try:
        if world.rank == 0:
            _serve(world, 0, tiny(n=48), timeout_s=30.0)
        else:
            job = _job(world.rank)
            open_edge(world, 0, job, tiny(n=48, **(edge_data if world.rank == 1 else {})), timeout_s=30.0)
        problems.append(f"rank {world.rank}: no error")
    except UsageError as err:
        message = str(err)
    messages = world.allgather(message)
    if len(set(messages)) != 1 or want not in (messages[0] or "") or "\n" in (messages[0] or ""):
        problems.append(f"rank {world.rank}: messages {messages}")
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_a_stalled_cloud_is_noticed_within_the_timeout(world, agree):
    """The cloud answers the set-up, then never serves a batch: each edge gives up after ~timeout, not never."""
    from runtime.transport import idle_barrier

    data, timeout_s, problems = tiny(n=48), 2.0, []
    if world.rank == 0:
        server = open_cloud(world, 0, _teacher(), data, timeout_s=timeout_s)
        idle_barrier(world)  # stalled: serves nothing until every edge has given up
        server.close()
    else:
        job = _job(world.rank)
        job = EdgeJob(EdgeConfig("kd", 1, steps=5, batch=8, seed=world.rank), job.train_idx)
        source = open_edge(world, 0, job, data, timeout_s=timeout_s)
        began = time.monotonic()
        try:
            train_edge(job.config, data, job.train_idx, source=source)
            problems.append(f"edge {world.rank}: trained without a cloud")
        except CloudLost as err:
            waited = time.monotonic() - began
            if not timeout_s <= waited <= timeout_s + 5:
                problems.append(f"edge {world.rank}: gave up after {waited:.1f} s (timeout {timeout_s} s)")
            if "cloud rank 0 sent no logits for step 0 within 2 s" not in str(err):
                problems.append(f"edge {world.rank}: message {err}")
        idle_barrier(world)
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_a_stalled_edge_is_noticed_by_the_cloud_within_the_timeout(world, agree):
    """Every edge answers the set-up, then falls silent (its heartbeats stop too, as on a board that hangs or
    loses power): the cloud gives up after ~timeout."""
    from kd.streaming import EdgeLost
    from runtime.transport import idle_barrier

    data, timeout_s, problems = tiny(n=48), 2.0, []
    if world.rank == 0:
        server = open_cloud(world, 0, _teacher(), data, timeout_s=timeout_s)
        began = time.monotonic()
        try:
            server.serve()
            problems.append("the cloud served edges that asked for nothing")
        except EdgeLost as err:
            waited = time.monotonic() - began
            if not timeout_s <= waited <= timeout_s + 5:
                problems.append(f"cloud gave up after {waited:.1f} s (timeout {timeout_s} s)")
            if "sent nothing (no request, no heartbeat) within 2 s" not in str(err):
                problems.append(f"cloud: message {err}")
        finally:
            server.close()
        idle_barrier(world)
    else:
        job = EdgeJob(EdgeConfig("kd", 1, steps=5, batch=8, seed=world.rank), _job(world.rank).train_idx)
        source = open_edge(world, 0, job, data, timeout_s=timeout_s)
        source._stop_touch(goodbye=False)  # stalled: no heartbeat, no request (a hung board)
        idle_barrier(world)
        source.close()
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_an_edge_slower_than_the_timeout_is_not_called_dead(world, agree):
    """Regression (CI, a loaded machine): an edge whose set-up took longer than --timeout was called dead by
    the cloud ("asked for no batch within 3 s").  Its heartbeats now keep it alive: here each edge waits 1.6
    timeouts before each of its 2 batches (its set-up, then a long step), and every student still trains."""
    data, timeout_s, problems = tiny(n=48), 1.0, []
    if world.rank == 0:
        try:
            served = _serve(world, 0, data, timeout_s=timeout_s)
            if sorted(row["steps"] for row in served) != [2] * (world.size - 1):
                problems.append(f"cloud served {served}")
        except Exception as err:  # noqa: BLE001 -- reported on every rank
            problems.append(f"cloud: {type(err).__name__}: {err}")
    else:
        job = EdgeJob(EdgeConfig("kd", 1, steps=2, batch=8, seed=world.rank), _job(world.rank).train_idx)
        source = open_edge(world, 0, job, data, timeout_s=timeout_s)
        try:
            for step in range(2):
                time.sleep(1.6 * timeout_s)  # a slow board: set-up, then a long step
                source.start(step, None, None)
                source.logits(step)
        except Exception as err:  # noqa: BLE001
            problems.append(f"edge {world.rank}: {type(err).__name__}: {err}")
        finally:
            source.close()
    agree(world, problems)


class _Recording:
    """A teacher source that keeps every batch's images and the logits its wrapped source gave for them."""

    def __init__(self, inner):
        self.inner, self.classes, self.weights = inner, inner.classes, inner.weights
        self.images, self.got = {}, {}

    def start(self, step, rows, images):
        self.images[step] = images.clone()
        self.inner.start(step, rows, images)

    def forward(self, step):
        self.inner.forward(step)

    def logits(self, step):
        self.got[step] = self.inner.logits(step)
        return self.got[step]

    def close(self):
        self.inner.close()


def _sensitive_teacher(classes=3):
    """A small teacher whose logits move with every pixel level (a random cloud net's barely do: 1e-8)."""
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(16, classes)).eval()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["raw", "jpeg"])
def test_uploaded_frames_are_labelled_as_the_images_the_student_trains_on(world, agree, kind):
    """Every edge uploads each batch's frames (at 2x the images' size); the logits that come back must be
    the teacher's on those images rounded to uint8 pixels, computed here with plain torch (raw: to 1e-5;
    JPEG: within its loss).  The teacher moves by ~1e-3 per pixel level, so a wrong rounding fails."""
    from kd.frames import FrameFormat
    from kd.teacher_source import run_teacher

    data = tiny(n=48)
    fmt = FrameFormat(kind, 64, quality=95)
    problems = []
    if world.rank == 0:
        server = open_cloud(world, 0, _sensitive_teacher(), data, timeout_s=60.0)
        try:
            served = server.serve()
        finally:
            server.close()
        for row in served:
            if row["frames"] != str(fmt) or row["frame_bytes_received"] == 0:
                problems.append(f"cloud: edge {row['rank']} served {row}")
    else:
        base = _job(world.rank)
        config = EdgeConfig("kd", base.config.net, steps=5, batch=8, seed=base.config.seed)
        job = EdgeJob(config, base.train_idx, frames=fmt, encode_threads=2)
        source = _Recording(open_edge(world, 0, job, data, timeout_s=60.0))
        train_edge(job.config, data, job.train_idx, source=source)
        teacher = _sensitive_teacher()
        m = torch.tensor(data.mean).view(1, -1, 1, 1)
        sd = torch.tensor(data.std).view(1, -1, 1, 1)
        worst = 0.0
        for step, images in source.images.items():
            pixels = torch.round(torch.clamp((images * sd + m) * 255.0, 0, 255))
            want = run_teacher(teacher, ((pixels / 255.0 - m) / sd).contiguous(memory_format=torch.channels_last))
            worst = max(worst, float((source.got[step] - want).abs().max()))
        limit = 1e-5 if kind == "raw" else 0.02
        if not worst <= limit:
            problems.append(f"edge {world.rank}: logits off by {worst:.3g} (limit {limit:.3g})")
        if sorted(source.got) != list(range(config.steps)):
            problems.append(f"edge {world.rank}: logits for steps {sorted(source.got)}")
        sent, raw = source.inner.bytes_sent, config.steps * 8 * 3 * 64 * 64
        if not (sent > raw if kind == "raw" else 0 < sent < raw):
            problems.append(f"edge {world.rank}: sent {sent} bytes of frames ({kind}; raw pixels: {raw})")
    agree(world, problems)


@pytest.mark.mpi(min_size=2)
def test_a_stream_after_abandoned_streams_gets_only_its_own_messages(world, agree):
    """A stalled cloud leaves the edge's credits unanswered; a stalled edge leaves the cloud's logits
    untaken.  MPICH reuses a freed communicator's context for the next Dup, so those messages matched the
    next stream's receives (it trained on the old stream's logits for two batches).  Streams that end
    early now keep their communicator; the third stream's logits must equal the teacher's, computed here."""
    from kd.teacher_source import run_teacher
    from runtime.transport import idle_barrier

    data, problems = tiny(n=48), []
    job = EdgeJob(EdgeConfig("kd", 1, steps=4, batch=8, seed=world.rank), _job(world.rank).train_idx)
    for stalled in ("cloud", "edge"):
        if world.rank == 0:
            server = open_cloud(world, 0, _teacher(), data, timeout_s=1.0)
            try:
                if stalled == "edge":
                    server.serve()
            except Exception:
                pass
            finally:
                idle_barrier(world)
                server.close()
        else:
            source = open_edge(world, 0, job, data, timeout_s=1.0)
            if stalled == "edge":
                source._stop_touch(goodbye=False)  # a hung board: no heartbeat, no request
            try:
                if stalled == "cloud":
                    train_edge(job.config, data, job.train_idx, source=source)
            except CloudLost:
                pass
            finally:
                idle_barrier(world)
                source.close()
    if world.rank == 0:
        server = open_cloud(world, 0, _sensitive_teacher(), data, timeout_s=60.0)
        try:
            server.serve()
        finally:
            server.close()
    else:
        source = _Recording(open_edge(world, 0, job, data, timeout_s=60.0))
        train_edge(job.config, data, job.train_idx, source=source)
        teacher = _sensitive_teacher()
        for step, images in source.images.items():
            err = float((source.got[step] - run_teacher(teacher, images)).abs().max())
            if err > 1e-5:
                problems.append(f"edge {world.rank} step {step}: logits off by {err:.3g}")
    agree(world, problems)
