"""An increment's images uploaded as frames (``update run --upload``) over MPI: the cloud labels the buffer's
own pixels (raw: exactly; JPEG: within its loss), checked against the labelling function applied here."""
import time

import numpy as np
import pytest

from kd.frames import FrameEncoder, FrameFormat
from kd.incremental import CloudLink, serve_cloud


def _label(pixels: np.ndarray) -> np.ndarray:
    """A stand-in teacher that sees layout: per image and channel, the mean of the top rows, of the left
    columns and of the top-left corner (float32 'logits'; a transposed or shuffled image gets others)."""
    x = pixels.astype(np.float64)
    h = x.shape[1] // 2
    parts = [x[:, :h].mean(axis=(1, 2)), x[:, :, :h].mean(axis=(1, 2)), x[:, :h // 2, :h].mean(axis=(1, 2))]
    return np.concatenate(parts, axis=1).astype(np.float32)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["raw", "jpeg", "none"])
def test_an_uploaded_increment_is_labelled_as_the_buffers_pixels(world, agree, kind):
    problems = []
    rng = np.random.default_rng(5)
    smooth = np.kron(rng.integers(40, 200, size=(9, 8, 8, 3)), np.ones((1, 4, 4, 1))).astype(np.uint8)
    if world.rank == 0:
        served = serve_cloud(world, 1, _label, timeout_s=60.0)
        if served != 2 * len(smooth):
            problems.append(f"cloud labelled {served} images")
    elif world.rank == 1:
        encoder = None
        if kind != "none":
            encoder = FrameEncoder(FrameFormat(kind, 96, quality=95), (0.5,) * 3, (0.25,) * 3, 3, max_threads=2)
        link = CloudLink(world, 0, 60.0, encoder)
        for _ in range(2):
            got = link.logits(smooth)
            err = float(np.abs(got - _label(smooth)).max())
            limit = 0.0 if kind in ("raw", "none") else 2.0  # pixel levels
            if not err <= limit:
                problems.append(f"{kind}: labels off by {err:.3g} (limit {limit})")
        raw_bytes = 2 * smooth.size * 9  # 96 = 3 x 32: nine frame bytes per pixel
        if kind == "raw" and link.bytes_sent <= raw_bytes:
            problems.append(f"raw: sent {link.bytes_sent} bytes for {raw_bytes} bytes of frames")
        if kind == "jpeg" and not 0 < link.bytes_sent < raw_bytes / 4:
            problems.append(f"jpeg: sent {link.bytes_sent} bytes for {raw_bytes} bytes of frames")
        link.close()
        if encoder is not None:
            encoder.close()
    agree(world, problems)
