"""The whole system in one MPI job: cloud teacher, training rank, inference ranks, weights swapped between images.

Roles (see :mod:`launch.system` for how a topology names them)::

    cloud ──logits──> trainer ──new student (flat float64)──> inference root ──Ibcast──> inference ranks
            <─images──                                                    (height split of each image)

* the **cloud** answers the trainer's label requests (:func:`kd.incremental.serve_cloud`);
* the **trainer** appends camera frames to the durable buffer, runs one incremental
  AFLKD update per increment (:func:`kd.incremental.run_updates` with
  :class:`kd.incremental.CloudLink`), and sends every new generation's weights to the
  inference root, then a "done" header;
* the **inference ranks** serve a stream of images with the height-split executor on
  their own communicator.

Why a swap can only happen between two images: the inference root is the only rank
that looks for new weights, and it looks (``Iprobe``, never blocking) only at the top
of its loop, before image ``k`` starts.  It then broadcasts one decision
``[k, kind, generation]`` over the inference communicator; every inference rank
waits for that decision before it touches image ``k``, and a "swap" decision is
followed by the weights themselves (one ``Ibcast``).  Every rank rebuilds its model and
executor and only then enters image ``k``'s split pass; a pass is one synchronous
call that no message can interrupt.  So all inference ranks serve image ``k`` with
the same generation, images ``< k`` with the old one.

Every wait on a peer is bounded by ``timeout_s`` (:class:`runtime.transport.PeerTimeout`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from runtime import transport as mpi
from runtime import transport
from runtime.errors import UsageError

from .channel import Channel, Kind

__all__ = ["flatten_state", "load_flat", "Served", "serve_images", "send_weights", "send_done",
           "KIND_SERVE", "KIND_SWAP", "KIND_STOP"]

KIND_SERVE, KIND_SWAP, KIND_STOP = 0, 1, 2  # the inference root's decision before an image
HEAD = 4  # int64 words of a decision


# ---------------------------------------------------------------------- weights as one flat vector
def flatten_state(state: dict) -> torch.Tensor:
    """Every tensor of a state dict, in key order, as one float64 vector (exact for float32 and small ints)."""
    return torch.cat([v.detach().reshape(-1).to(torch.float64) for v in state.values()])


def load_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Inverse of :func:`flatten_state` into ``model`` (same architecture); refuses a vector of the wrong size."""
    state = model.state_dict()
    need = sum(v.numel() for v in state.values())
    if flat.numel() != need:
        raise UsageError(f"received {flat.numel()} weights but the student has {need}; every rank must run the same --net")
    new, at = {}, 0
    for key, value in state.items():
        n = value.numel()
        new[key] = flat[at : at + n].reshape(value.shape).to(value.dtype)
        at += n
    model.load_state_dict(new)


def _wait(requests: list, timeout_s: float, what: str) -> None:
    """Bounded wait on a collective (``Ibcast``): MPI cannot cancel one, so unlike
    :func:`runtime.transport.wait_or_raise` (used for every point-to-point wait here) it only raises."""
    if not transport.wait_by(requests, time.monotonic() + timeout_s):
        raise transport.PeerTimeout(f"{what} within {timeout_s:g} s (--timeout): it died or stalled")


# ---------------------------------------------------------------------- trainer side
def send_weights(root: Channel, generation: int, state: dict) -> None:
    """The trainer: a :attr:`Kind.WEIGHTS` header ``[generation, n]`` and the flat weights (bounded)."""
    flat = flatten_state(state).contiguous()
    root.send(Kind.WEIGHTS, generation, flat.numel(), payload=flat, what=f"weights of generation {generation}")


def send_done(root: Channel, generation: int) -> None:
    root.send(Kind.DONE, generation, what="end-of-updates message")


# ---------------------------------------------------------------------- inference side
@dataclass
class Served:
    """What the inference root saw: per image its generation (and, when recording, input and output)."""

    generations: list = field(default_factory=list)
    correct: list = field(default_factory=list)
    # (generation, first image it served, seconds from its header's arrival at the root to every rank's new executor)
    swaps: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        gens = np.asarray(self.generations)
        correct = np.asarray(self.correct, dtype=bool)
        per = {}
        for g in sorted(set(self.generations)):
            mask = gens == g
            per[int(g)] = {"images": int(mask.sum()), "served_acc": float(correct[mask].mean())}
        return {"images": len(self.generations), "seconds": self.seconds,
                "images_per_s": len(self.generations) / self.seconds if self.seconds > 0 else 0.0,
                "swaps": [{"generation": g, "image": k, "swap_s": s} for g, k, s in self.swaps],
                "per_generation": per}


def serve_images(world, infer, trainer: int, make_model: Callable[[], torch.nn.Module], in_shape: tuple,
                 images: Optional[torch.Tensor], labels: Optional[np.ndarray], min_images: int, timeout_s: float,
                 interval_s: float = 0.0, record: bool = False,
                 executor_of: Optional[Callable] = None, progress: Optional[Callable[[int, int], None]] = None,
                 serving: Optional[Callable[[int], None]] = None) -> Optional[Served]:
    """Every inference rank: serve images one at a time, swapping students only between two images.

    ``world``: the communicator shared with the trainer (``trainer`` its rank there);
    ``infer``: the inference ranks' own communicator, root 0 (the only one that needs
    ``images`` (normalised, NCHW), ``labels`` and hears from the trainer).  The root
    serves at least ``min_images`` and stops once the trainer has said it is done and
    the last swapped-in student has served at least one image.  Returns the root's
    :class:`Served` (None on the other ranks).

    ``serving(k)`` is called at the root every ``timeout_s / 4`` s once the trainer is
    done (the trainer then waits for the root's report while the root serves the
    remaining images, which may take longer than ``timeout_s``).  The other ranks wait
    ``2.25 x timeout_s`` for each decision: the root itself may wait ``timeout_s`` for a
    header and another ``timeout_s`` for the weights before it decides, and the
    training rank, which knows who stalled, should be the one to report it.
    """
    from runtime.split import SplitExecutor

    build = executor_of or (lambda model: SplitExecutor.build(model, in_shape, infer))
    root = mpi.rank(infer) == 0
    link = Channel(world, trainer, timeout_s, f"the training rank {trainer}")
    model = make_model().eval()
    flat = None
    executor = None
    served = Served() if root else None
    generation = -1
    done = False
    used_since_swap = 0
    arrived = 0.0
    last_heard = last_beat = time.monotonic()
    decision_s = timeout_s if root else 2.25 * timeout_s
    k = 0
    decision = torch.zeros(HEAD, dtype=torch.int64)
    start = None
    while True:
        if root:
            kind, new_gen = KIND_SERVE, generation
            first = executor is None
            # between images only: is a message from the trainer waiting? (the first image must have weights)
            if first or (not done and link.waiting()):
                head = link.expect(link.recv("student", heartbeats=not first),  # the first image needs one
                                   Kind.WEIGHTS, Kind.DONE, Kind.HEARTBEAT)
                arrived = time.monotonic()
                last_heard = arrived
                if head.kind == Kind.WEIGHTS:
                    generation_sent, count = head.values[:2]
                    flat = link.recv_payload(torch.empty(count, dtype=torch.float64),
                                             f"weights of generation {generation_sent}")
                    kind, new_gen = KIND_SWAP, generation_sent
                elif head.kind == Kind.DONE:
                    done = True
                    last_beat = time.monotonic()
                    if first:
                        raise UsageError("the training rank ended before it sent a student")
            elif not done and time.monotonic() - last_heard > timeout_s:
                raise transport.PeerTimeout(f"the training rank {trainer} sent nothing for {timeout_s:g} s (--timeout): "
                                         "it died or stalled")
            if kind == KIND_SERVE and done and k >= min_images and used_since_swap > 0:
                kind = KIND_STOP
            elif done and serving is not None and time.monotonic() - last_beat > timeout_s / 4:
                serving(k)
                last_beat = time.monotonic()
            decision[:] = torch.tensor([k, kind, new_gen, flat.numel() if kind == KIND_SWAP else 0])
        _wait([mpi.ibcast(infer, decision, 0)], decision_s,
              "the inference root sent no decision before the next image")
        kind = int(decision[1])
        if kind == KIND_STOP:
            break
        if kind == KIND_SWAP:
            if not root:
                flat = torch.empty(int(decision[3]), dtype=torch.float64)
            _wait([mpi.ibcast(infer, flat, 0)], timeout_s, f"the inference root sent no weights of generation "
                  f"{int(decision[2])}")
            load_flat(model, flat)
            model.eval()
            executor = build(model)  # BatchNorm is folded when built: a new student needs a new executor
            generation = int(decision[2])
            used_since_swap = 0
            if root:
                served.swaps.append((generation, k, time.monotonic() - arrived))
        # ---- image k, all of it with `generation`
        if start is None:
            start = time.monotonic()
        image = images[k % len(images)].unsqueeze(0) if root else None
        out = executor(image, 1)
        if root:
            served.generations.append(generation)
            served.correct.append(int(out.argmax(1)[0]) == int(labels[k % len(labels)]))
            if record:
                served.inputs.append(image.contiguous().numpy().copy())
                served.outputs.append(out.detach().numpy().copy())
            if progress is not None:
                progress(k + 1, generation)
        k += 1
        used_since_swap += 1
        if interval_s:
            time.sleep(interval_s)
    if root:
        served.seconds = time.monotonic() - start if start is not None else 0.0
    return served


def synthetic_dataset(seed: int = 0, classes: int = 10, train: int = 512, test: int = 200, size: int = 32):
    """A tiny seeded 32x32 RGB dataset for tests and smoke runs: each class a smooth colour pattern plus noise.

    Learnable in a few steps (so accuracy moves), nothing to download.
    """
    from .datasets import ImageArrays

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(classes, 4, 4, 3))
    patterns = np.repeat(np.repeat(coarse, size // 4, axis=1), size // 4, axis=2)

    def draw(n: int):
        y = rng.integers(0, classes, size=n)
        x = patterns[y] + rng.normal(0, 40, size=(n, size, size, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = draw(train)
    x_test, y_test = draw(test)
    return ImageArrays("synthetic", x_train, y_train, x_test, y_test, classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
