"""The shared-memory bulk path of the channel (``channel.Ring``)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from soma.isolation import channel


@pytest.fixture
def duplex() -> Iterator[tuple[int, int, int, int, int]]:
    """(forward r, forward w, back r, back w, memfd)."""
    forward_r, forward_w = os.pipe()
    back_r, back_w = os.pipe()
    memfd = channel.Ring.create_memfd()
    if memfd is None:
        pytest.skip("memfd_create is unavailable on this platform")
    yield forward_r, forward_w, back_r, back_w, memfd
    for fd in (forward_r, forward_w, back_r, back_w, memfd):
        with contextlib.suppress(OSError):  # a test may have closed one already
            os.close(fd)


def test_large_buffers_cross_the_ring_and_the_next_frame_stays_in_step(duplex: tuple[int, ...]) -> None:
    forward_r, forward_w, back_r, back_w, memfd = duplex
    writer = channel.Ring(memfd, ack_fd=back_r)
    reader = channel.Ring(memfd, ack_fd=back_w)
    big = np.random.default_rng(0).standard_normal(5_000_000)  # 40 MB: several trips round the ring
    odd = np.arange(3_000_001, dtype=np.uint8)  # not a multiple of a slot
    received: dict[str, Any] = {}

    def read() -> None:
        received["frame"] = channel.read_frame(forward_r, deadline=time.monotonic() + 30, ring=reader)
        # The reply follows the last ack on the same pipe: the writer must not swallow it.
        channel.write_frame(back_w, {"reply": np.arange(4)})

    thread = threading.Thread(target=read)
    thread.start()
    channel.write_frame(forward_w, {"big": big, "small": np.arange(5), "odd": odd}, ring=writer)
    reply = channel.read_frame(back_r, deadline=time.monotonic() + 30)
    thread.join()
    frame = received["frame"]
    assert np.array_equal(frame["big"], big) and frame["big"].dtype == big.dtype
    assert np.array_equal(frame["odd"], odd)
    assert np.array_equal(frame["small"], np.arange(5))
    assert frame["big"].flags.writeable
    assert np.array_equal(reply["reply"], np.arange(4))


def test_a_frame_using_a_ring_is_corrupt_on_a_channel_without_one(duplex: tuple[int, ...]) -> None:
    forward_r, forward_w, back_r, back_w, memfd = duplex
    writer = channel.Ring(memfd, ack_fd=back_r)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            channel.write_frame(forward_w, np.zeros(1 << 23, dtype=np.uint8), ring=writer, deadline=time.monotonic() + 1)
        except (TimeoutError, BrokenPipeError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    with pytest.raises(channel.FrameError, match="shared memory"):
        channel.read_frame(forward_r, deadline=time.monotonic() + 5)
    thread.join()
    assert errors  # nobody acknowledged: the writer gave up at its deadline


def test_a_reader_gone_mid_transfer_breaks_the_writer(duplex: tuple[int, ...]) -> None:
    forward_r, forward_w, back_r, back_w, memfd = duplex
    writer = channel.Ring(memfd, ack_fd=back_r)
    os.close(back_w)  # the reader is gone: no ack can ever come
    with pytest.raises(BrokenPipeError):
        channel.write_frame(forward_w, np.zeros(1 << 25, dtype=np.uint8), ring=writer)
