"""Frames on the wire: the edge uploads the images it trains on, the cloud labels them (AFLKD Sec. 4, Alg. 2).

In AFLKD's own loop the edge collects frames and sends them to the cloud,
which answers with the teacher's logits.  That upload is the communication the
edge-KD paper schedules: MB per batch, and encoding it costs the edge CPU that
scales with cores, with diminishing returns (its g(y, c)).  Here a batch of
the student's (normalised, augmented) 32x32 images becomes ``B`` frames at the
user's resolution ``size`` (the camera's, 224 by default):

* quantised to uint8 (what a camera gives) and upsampled by pixel repetition to
  ``size`` x ``size`` (``size`` a multiple of the image size);
* ``raw``: the frames' bytes as they are (``B * C * size**2`` bytes, 150 KB per
  224x224 RGB frame); ``jpeg``: each frame JPEG-encoded (libjpeg through
  torchvision) at ``quality``, on ``threads`` encoder threads.

The cloud decodes, averages each ``k x k`` block back to the image size
(``k = size / 32``) and normalises: for ``raw`` it recovers the quantised images
exactly, so the teacher sees the student's images to within uint8 rounding;
JPEG adds its loss.  A message is one uint8 buffer::

    int64 header: [MAGIC, step, B, len_0, ..., len_{B-1}]  then the B frames' bytes

so the cloud checks the step, the count and every length before decoding
(a message that does not parse is one error naming the edge, never garbage logits).
"""
from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from runtime.errors import UsageError

__all__ = ["FrameFormat", "parse_frames", "quantise", "upsample", "FrameEncoder", "decode_message",
           "frames_to_images", "frames_to_pixels", "MAGIC"]

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

MAGIC = 0x41464C4B46524D31  # "AFLKFRM1"
KINDS = ("raw", "jpeg")


@dataclass(frozen=True)
class FrameFormat:
    """How frames travel: ``kind`` raw or jpeg, at ``size`` x ``size`` pixels, JPEG ``quality``."""
    kind: str
    size: int = 224
    quality: int = 90

    def __str__(self) -> str:
        return f"{self.kind}@{self.size}" + (f"q{self.quality}" if self.kind == "jpeg" else "")

    def check(self, image_size: int = 32) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"--upload {self.kind!r}: choose none, raw or jpeg")
        if self.size < image_size or self.size % image_size:
            raise UsageError(f"--frame-size {self.size} must be a multiple of the images' size ({image_size}), "
                             f"e.g. {7 * image_size}: the cloud averages each block back to one pixel")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"--jpeg-quality {self.quality} must be between 1 and 100")

    def frame_bytes(self, channels: int) -> int:
        return channels * self.size * self.size


def parse_frames(kind: str, size: int = 224, quality: int = 90, image_size: int = 32) -> Optional[FrameFormat]:
    """The format of ``--upload kind --frame-size size --jpeg-quality quality`` (None for ``none``), checked."""
    if kind == "none":
        return None
    fmt = FrameFormat(kind, size, quality)
    fmt.check(image_size)
    return fmt


def _stats(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    if m.shape[1] != channels:
        raise ValueError(f"{m.shape[1]} channel means for {channels}-channel images")
    return m, s


def quantise(images: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised float ``(B, C, H, W)`` images as the uint8 pixels a camera would give, ``(B, C, H, W)``."""
    x = images.detach().float().cpu().contiguous().numpy()
    m, s = _stats(mean, std, x.shape[1])
    return np.clip(np.rint((x * s + m) * 255.0), 0, 255).astype(np.uint8)


def upsample(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel of uint8 ``(n, C, H, W)`` repeated ``factor`` x ``factor`` times: ``(n, C, H*f, W*f)``, contiguous."""
    if factor == 1:
        return np.ascontiguousarray(pixels)
    n, c, h, w = pixels.shape
    big = np.broadcast_to(pixels[:, :, :, None, :, None], (n, c, h, factor, w, factor))
    return np.ascontiguousarray(big).reshape(n, c, h * factor, w * factor)


def _codecs():
    """torchvision's libjpeg bindings.  torchvision >= 0.29 warns on every call that TorchCodec will take
    them over; they work as before, so that one warning is filtered (by its text) when this module loads."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    return encode_jpeg, decode_jpeg, ImageReadMode


def _encode_part(pixels: np.ndarray, fmt: FrameFormat, factor: int) -> list[torch.Tensor]:
    """Frames of a part of a batch, each a uint8 1-D tensor of its bytes (runs on an encoder thread)."""
    frames = upsample(pixels, factor)
    if fmt.kind == "raw":
        return [torch.from_numpy(frames.reshape(len(frames), -1))]
    encode_jpeg = _codecs()[0]
    return [encode_jpeg(torch.from_numpy(f), quality=fmt.quality) for f in frames]


class FrameEncoder:
    """Turns a batch of normalised images into one upload message on up to ``max_threads`` encoder threads.

    The threads exist from the start (their OS ids in :attr:`tids`), so a
    controller can pin them with the receive thread; :meth:`encode` uses the
    first ``threads`` of them (1: the calling thread alone).
    """

    def __init__(self, fmt: FrameFormat, mean, std, channels: int, image_size: int = 32, max_threads: int = 1):
        fmt.check(image_size)
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.fmt, self.mean, self.std, self.channels = fmt, list(mean), list(std), channels
        self.factor = fmt.size // image_size
        self.max_threads = max_threads
        self.tids: list[int] = []
        self._pool: Optional[ThreadPoolExecutor] = None
        if max_threads > 1:
            self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix="aflkd-encode")
            started = threading.Barrier(max_threads + 1)
            lock = threading.Lock()

            def hello():
                with lock:
                    self.tids.append(threading.get_native_id())
                started.wait()

            for _ in range(max_threads):  # every worker started now, each holding one hello until all are in
                self._pool.submit(hello)
            started.wait()

    def encode(self, step: int, images: torch.Tensor, threads: int = 1) -> torch.Tensor:
        """Batch ``step``'s upload message: the header and every frame's bytes (uint8, 1-D)."""
        return self.encode_pixels(step, quantise(images, self.mean, self.std), threads)

    def encode_pixels(self, step: int, pixels: np.ndarray, threads: int = 1) -> torch.Tensor:
        """The upload message of uint8 pixels ``(B, C, H, W)`` (a camera's frames, e.g. a buffer's)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.shape[1] != self.channels:
            raise ValueError(f"{pixels.shape[1]}-channel images for a {self.channels}-channel encoder")
        threads = max(1, min(threads, self.max_threads, len(pixels)))
        if threads == 1 or self._pool is None:
            frames = _encode_part(pixels, self.fmt, self.factor)
        else:
            parts = np.array_split(pixels, threads)
            frames = [f for part in self._pool.map(lambda p: _encode_part(p, self.fmt, self.factor), parts)
                      for f in part]
        if self.fmt.kind == "raw":
            body = torch.cat([f.reshape(-1) for f in frames])
            lengths = [self.fmt.frame_bytes(self.channels)] * len(pixels)
        else:
            body = torch.cat(frames)
            lengths = [len(f) for f in frames]
        header = torch.tensor([MAGIC, step, len(pixels), *lengths], dtype=torch.int64)
        return torch.cat([header.view(torch.uint8), body])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def decode_message(message: np.ndarray, fmt: FrameFormat, batch: int, channels: int,
                   step: Optional[int] = None, pool: Optional[ThreadPoolExecutor] = None) -> torch.Tensor:
    """The uint8 frames ``(B, C, size, size)`` of an upload message; ValueError saying what is wrong with it.
    ``pool``: decode JPEG frames on its threads, a share each (libjpeg decodes one frame on one thread)."""
    message = np.asarray(message, dtype=np.uint8).reshape(-1)
    fixed = 8 * (3 + batch)
    if message.nbytes < fixed:
        raise ValueError(f"a frame message of {message.nbytes} bytes is shorter than its header ({fixed} bytes)")
    header = message[:fixed].view(np.int64)
    if int(header[0]) != MAGIC:
        raise ValueError("a message that is not a batch of frames (wrong magic number)")
    if int(header[2]) != batch:
        raise ValueError(f"a frame message of {int(header[2])} frames where the batch is {batch}")
    if step is not None and int(header[1]) != step:
        raise ValueError(f"frames of step {int(header[1])} where step {step} was due")
    lengths = header[3:].astype(np.int64)
    if (lengths <= 0).any() or fixed + int(lengths.sum()) != message.nbytes:
        raise ValueError(f"frame lengths adding to {int(lengths.sum())} bytes in a message of "
                         f"{message.nbytes - fixed} bytes of frames")
    body = torch.from_numpy(message[fixed:].copy())
    side = fmt.size
    if fmt.kind == "raw":
        if (lengths != channels * side * side).any():
            raise ValueError(f"raw frames of {sorted(set(lengths.tolist()))} bytes where {channels}x{side}x{side} "
                             "was agreed")
        return body.view(batch, channels, side, side)
    _, decode_jpeg, ImageReadMode = _codecs()
    parts = list(torch.split(body, lengths.tolist()))
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        if pool is None or len(parts) < 2:
            frames = decode_jpeg(parts, mode=mode)
        else:
            shares = [s for s in np.array_split(np.arange(len(parts)), pool._max_workers) if len(s)]
            decoded = pool.map(lambda share: decode_jpeg([parts[i] for i in share], mode=mode), shares)
            frames = [f for chunk in decoded for f in chunk]
    except RuntimeError as err:
        raise ValueError(f"a JPEG frame that does not decode ({str(err).splitlines()[0]})") from None
    out = torch.stack(frames)
    if tuple(out.shape[1:]) != (channels, side, side):
        raise ValueError(f"JPEG frames of {tuple(out.shape[1:])} where {(channels, side, side)} was agreed")
    return out


def frames_to_pixels(frames: torch.Tensor, image_size: int) -> np.ndarray:
    """uint8 frames ``(B, C, S, S)`` back to uint8 pixels ``(B, image_size, image_size, C)`` (a buffer's layout):
    each ``k x k`` block averaged and rounded (raw frames: the pixels exactly)."""
    k = frames.shape[-1] // image_size
    b, c = frames.shape[:2]
    sums = frames.reshape(b, c, image_size, k, image_size, k).sum(dim=(3, 5), dtype=torch.int32)
    pixels = torch.div(sums * 2 + k * k, 2 * k * k, rounding_mode="floor")  # round half up, in integers
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def frames_to_images(frames: torch.Tensor, mean, std, image_size: int = 32) -> torch.Tensor:
    """uint8 frames ``(B, C, S, S)`` back to normalised float images ``(B, C, image_size, image_size)``,
    channels-last: each ``k x k`` block averaged (``k = S / image_size``), then normalised as the dataset is."""
    k = frames.shape[-1] // image_size
    b, c = frames.shape[:2]
    if k > 1:  # block sums in int32 straight from the uint8 frames: no float copy of the full-size frames
        x = frames.reshape(b, c, image_size, k, image_size, k).sum(dim=(3, 5), dtype=torch.int32).float()
        x = x.div_(float(k * k * 255))
    else:
        x = frames.float().div_(255.0)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)
