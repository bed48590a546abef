"""A counting student and a stand-in cloud for the crash tests of incremental updates.

Each image carries its serial number in its first four bytes.  The stand-in cloud's
logits are a function of the serial, and the counting "student" adds 1 to
``count[serial]`` for every image an update trains on (after checking that each
image came with its own logits).  So the student file itself says, independently
of the buffer's bookkeeping, how many times each sample was used: after any
crashes and a clean rerun, every consumed serial must count exactly 1.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

import numpy as np
import torch

SHAPE = (4, 4, 1)
CLASSES = 3
MAX_SERIALS = 4096


def images_for(serials) -> np.ndarray:
    serials = np.asarray(serials, dtype=np.uint32)
    out = np.zeros((len(serials), *SHAPE), dtype=np.uint8)
    flat = out.reshape(len(serials), -1)
    flat[:, :4] = serials.view(np.uint8).reshape(-1, 4)
    flat[:, 4:] = (serials[:, None] * 7 + np.arange(flat.shape[1] - 4)) % 251  # the rest: serial-dependent noise
    return out


def serials_of(images: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(images.reshape(len(images), -1)[:, :4])
    return flat.view(np.uint32).reshape(-1).astype(np.int64)


def cloud_logits(images: np.ndarray) -> np.ndarray:
    s = serials_of(images).astype(np.float32)
    return np.stack([s, s * 0.5 + 1, -s], axis=1).astype(np.float32)


class StandInCloud:
    def logits(self, images: np.ndarray) -> np.ndarray:
        return cloud_logits(images)


def counting_update(state: dict, images: np.ndarray, logits: np.ndarray, generation: int, temperature=None) -> dict:
    if not np.array_equal(logits, cloud_logits(images)):
        raise AssertionError("an update got logits that are not its images' own")
    count = state["count"].clone()
    serials = torch.from_numpy(serials_of(images))
    if len(set(serials.tolist())) != len(serials):
        raise AssertionError("one batch holds a sample twice")
    count[serials] += 1
    return {"count": count, "updates": state["updates"] + 1}, {"serials": serials.tolist()}


def initial_state() -> dict:
    return {"count": torch.zeros(MAX_SERIALS, dtype=torch.int64), "updates": torch.zeros((), dtype=torch.int64)}


class KillAt:
    """A fault hook that SIGKILLs this process the ``nth`` time step ``name`` is reached."""

    def __init__(self, name: Optional[str], nth: int = 1):
        self.name, self.left = name, nth

    def __call__(self, step: str) -> None:
        if step == self.name:
            self.left -= 1
            if self.left == 0:
                os.kill(os.getpid(), signal.SIGKILL)


def camera_and_edge(buffer_path: str, student: str, acked: str, rounds, increment: int,
                    fault=None) -> None:
    """Rounds of (append serials, run updates); each acknowledged serial is logged (fsync) after append returns."""
    from kd.buffer import Buffer
    from kd.incremental import run_updates

    with Buffer(buffer_path, SHAPE) as buffer:
        for serials in rounds:
            buffer.append(images_for(serials), keys=[f"frame-{s}" for s in serials])
            with open(acked, "a") as fh:  # the camera's record of what the edge acknowledged
                fh.write("".join(f"{s}\n" for s in serials))
                fh.flush()
                os.fsync(fh.fileno())
            run_updates(buffer, student, StandInCloud(), counting_update, increment, fault=fault or (lambda s: None))
