"""Frames on the wire (kd/frames.py): what the cloud decodes is what the edge trained on, checked against
plain numpy/torch arithmetic; malformed messages and options are one clear error; encoder threads are real
OS threads, and ``threads=k`` runs the encoding on k of them."""
import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kd.frames as frames_mod
from kd.frames import FrameEncoder, FrameFormat, decode_message, frames_to_images, parse_frames
from runtime.errors import UsageError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _stats(channels):
    return [0.45, 0.5, 0.4][:channels], [0.25, 0.2, 0.3][:channels]


def _quantised(images, mean, std):
    """What the cloud should see: the images rounded to uint8 pixels, normalised again (plain torch)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    pixels = torch.round(torch.clamp((images * s + m) * 255.0, 0, 255))
    return (pixels / 255.0 - m) / s


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 9), channels=st.sampled_from([1, 3]), factor=st.integers(1, 4),
       threads=st.integers(1, 3), step=st.integers(0, 10 ** 6), seed=st.integers(0, 2 ** 16))
def test_raw_frames_give_the_cloud_the_quantised_images(batch, channels, factor, threads, step, seed):
    mean, std = _stats(channels)
    images = torch.randn(batch, channels, 32, 32, generator=torch.Generator().manual_seed(seed)) * 1.5
    fmt = FrameFormat("raw", 32 * factor)
    encoder = FrameEncoder(fmt, mean, std, channels, max_threads=3)
    try:
        message = encoder.encode(step, images, threads)
    finally:
        encoder.close()
    assert message.numel() == 8 * (3 + batch) + batch * channels * (32 * factor) ** 2
    frames = decode_message(message.numpy(), fmt, batch, channels, step)
    # every k x k block is one pixel repeated (what a camera at k times the resolution would see)
    assert torch.equal(frames, frames[:, :, ::factor, ::factor].repeat_interleave(factor, 2).repeat_interleave(factor, 3))
    got = frames_to_images(frames, mean, std)
    torch.testing.assert_close(got, _quantised(images, mean, std), rtol=0, atol=1e-6)


def test_jpeg_frames_of_smooth_images_come_back_close():
    mean, std = _stats(3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = torch.stack([torch.stack([yy, xx, yy * xx]) * (k + 1) / 4 for k in range(4)])
    fmt = FrameFormat("jpeg", 128, quality=95)
    encoder = FrameEncoder(fmt, mean, std, 3, max_threads=2)
    try:
        message = encoder.encode(3, images, 2)
    finally:
        encoder.close()
    assert message.numel() < 4 * 3 * 128 * 128 / 4   # compressed at least 4x
    got = frames_to_images(decode_message(message.numpy(), fmt, 4, 3, 3), mean, std)
    err = (got - _quantised(images, mean, std)).abs() * torch.tensor(std).view(1, -1, 1, 1) * 255
    assert err.mean() < 1.5 and err.max() < 12, (err.mean(), err.max())  # in pixel levels


def _message(batch=2):
    mean, std = _stats(3)
    enc = FrameEncoder(FrameFormat("raw", 64), mean, std, 3)
    return enc.encode(5, torch.zeros(batch, 3, 32, 32)).numpy()


@pytest.mark.parametrize("damage, reason", [
    (lambda m: m[:20], "shorter than its header"),
    (lambda m: m[:-1], "frame lengths"),
    (lambda m: np.concatenate([m, m[:8]]), "frame lengths"),
    (lambda m: np.concatenate([np.zeros(8, np.uint8), m[8:]]), "magic"),
])
def test_a_damaged_frame_message_is_one_error_saying_what(damage, reason):
    with pytest.raises(ValueError, match=reason):
        decode_message(damage(_message()), FrameFormat("raw", 64), 2, 3, 5)


def test_frames_of_another_step_or_batch_are_refused():
    with pytest.raises(ValueError, match="step 5 where step 6 was due"):
        decode_message(_message(), FrameFormat("raw", 64), 2, 3, 6)
    with pytest.raises(ValueError, match="2 frames where the batch is 3"):
        decode_message(_message(), FrameFormat("raw", 64), 3, 3, 5)
    with pytest.raises(ValueError, match="raw frames of"):  # the edge used another frame size
        decode_message(_message(), FrameFormat("raw", 96), 2, 3, 5)


@pytest.mark.parametrize("kind, size, quality, reason", [
    ("raw", 100, 90, "multiple of the images' size"), ("jpeg", 16, 90, "multiple"),
    ("jpeg", 224, 0, "between 1 and 100"), ("jpeg", 224, 101, "between 1 and 100"), ("png", 224, 90, "choose none"),
])
def test_bad_frame_options_are_one_usage_line(kind, size, quality, reason):
    with pytest.raises(UsageError, match=reason) as err:
        parse_frames(kind, size, quality)
    assert "\n" not in str(err.value)
    assert parse_frames("none", size, quality) is None


def test_encoder_threads_are_os_threads_and_threads_k_uses_k_of_them(monkeypatch):
    ran = []
    original = frames_mod._encode_part

    def recording(pixels, fmt, factor):
        ran.append(threading.get_native_id())
        return original(pixels, fmt, factor)

    monkeypatch.setattr(frames_mod, "_encode_part", recording)
    mean, std = _stats(3)
    encoder = FrameEncoder(FrameFormat("jpeg", 64), mean, std, 3, max_threads=3)
    try:
        assert len(set(encoder.tids)) == 3
        assert set(map(str, encoder.tids)) <= set(os.listdir("/proc/self/task"))   # seen by the OS
        images = torch.zeros(6, 3, 32, 32)
        for k in (1, 2, 3):
            ran.clear()
            encoder.encode(0, images, k)
            assert len(ran) == k
            assert (set(ran) <= set(encoder.tids)) if k > 1 else ran == [threading.get_native_id()]
    finally:
        encoder.close()


def test_jpeg_frames_decoded_on_several_threads_equal_one_thread():
    from concurrent.futures import ThreadPoolExecutor

    mean, std = _stats(3)
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    fmt = FrameFormat("jpeg", 64)
    encoder = FrameEncoder(fmt, mean, std, 3)
    message = encoder.encode(1, images).numpy()
    alone = decode_message(message, fmt, 7, 3, 1)
    with ThreadPoolExecutor(3) as pool:
        assert torch.equal(decode_message(message, fmt, 7, 3, 1, pool), alone)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), channels=st.sampled_from([1, 3]), side=st.sampled_from([28, 32]),
       factor=st.integers(1, 8), seed=st.integers(0, 2 ** 16))
def test_a_buffers_pixels_sent_as_raw_frames_come_back_exactly(n, channels, side, factor, seed):
    """update run --upload raw: the cloud's pixels are the buffer's, byte for byte (Fashion-MNIST's 28 too)."""
    from kd.frames import frames_to_pixels

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, side, side, channels), dtype=np.uint8)
    fmt = FrameFormat("raw", side * factor)
    mean, std = _stats(channels)
    encoder = FrameEncoder(fmt, mean, std, channels, image_size=side)
    message = encoder.encode_pixels(0, pixels.transpose(0, 3, 1, 2))
    back = frames_to_pixels(decode_message(message.numpy(), fmt, n, channels, 0), side)
    assert back.dtype == np.uint8 and np.array_equal(back, pixels)
