"""The cloud's heartbeats over MPI (pytest-mpi; ranks 0 and 1 take part, any others wait).

A cloud whose teacher labels an increment for longer than ``--timeout`` (a CPU
teacher on a big increment) is busy, not dead: it beats while it labels, and the
edge waits through the beats for the logits.
"""
import time

import numpy as np
import pytest


def _exchange(world, teacher_s: float, timeout_s: float) -> list[str]:
    """Rank 0 serves one request with a teacher that takes ``teacher_s`` s; rank 1 asks for it.  Problems found."""
    from kd.incremental import CloudLink, serve_cloud
    from runtime import transport

    comm = transport.dup(world)  # private: nothing else matches these messages
    problems: list[str] = []
    images = np.arange(3 * 4 * 4 * 3, dtype=np.uint8).reshape(3, 4, 4, 3)
    try:
        if world.rank == 0:
            def slow_teacher(x: np.ndarray) -> np.ndarray:
                time.sleep(teacher_s)
                return x.reshape(len(x), -1)[:, :5].astype(np.float32) * 2  # 5 "classes", independent of aflkd

            try:
                served = serve_cloud(comm, 1, slow_teacher, timeout_s)
                if served != 3:
                    problems.append(f"cloud served {served} images, not 3")
            except transport.PeerTimeout as err:
                problems.append(f"cloud: {err}")
        elif world.rank == 1:
            link = CloudLink(comm, 0, timeout_s)
            began = time.monotonic()
            try:
                logits = link.logits(images)
                link.close()
                want = images.reshape(3, -1)[:, :5].astype(np.float32) * 2
                if not np.array_equal(logits, want):
                    problems.append(f"edge got logits {logits.tolist()}, not {want.tolist()}")
                if time.monotonic() - began < teacher_s:
                    problems.append("the edge had its logits before the teacher finished")
            except transport.PeerTimeout as err:
                problems.append(f"edge: {err}")
    finally:
        world.Barrier()
        transport.free(comm)
    return problems


@pytest.mark.mpi(min_size=2)
def test_the_edge_waits_through_a_teacher_slower_than_the_timeout(world, agree):
    agree(world, _exchange(world, teacher_s=1.5, timeout_s=0.4))  # without cloud heartbeats: edge times out at 0.4 s


@pytest.mark.mpi(min_size=2)
def test_a_fast_teacher_still_answers_in_one_exchange(world, agree):
    agree(world, _exchange(world, teacher_s=0.0, timeout_s=5.0))
