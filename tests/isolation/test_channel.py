"""SOMD frames: hand-built headers, corruption, EOF, deadlines, round trips, the restricted unpickler."""

from __future__ import annotations

import math
import os
import pickle
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from soma.isolation import channel
from soma.isolation.markers import Concat, Handle, Opaque, TorchData


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def frame(payload: bytes, buffers: Sequence[bytes] = (), *, magic: bytes = b"SOMD", version: int = 1) -> bytes:
    header = struct.pack("<4sIQI", magic, version, len(payload), len(buffers))
    header += b"".join(struct.pack("<Q", len(b)) for b in buffers)
    return header + payload + b"".join(buffers)


def read_soon(fd: int, **kwargs: object) -> object:
    return channel.read_frame(fd, deadline=time.monotonic() + 5, **kwargs)  # type: ignore[arg-type]


def test_hand_built_frame_with_out_of_band_buffer_is_read(pipe: tuple[int, int]) -> None:
    r, w = pipe
    array = np.arange(6, dtype=np.int16).reshape(2, 3)
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps({"a": array}, protocol=5, buffer_callback=buffers.append)
    os.write(w, frame(payload, [bytes(b.raw()) for b in buffers]))
    message = read_soon(r)
    assert isinstance(message, dict)
    np.testing.assert_array_equal(message["a"], array)
    assert message["a"].dtype == np.int16 and message["a"].flags.writeable


def test_writer_layout_matches_the_spec(pipe: tuple[int, int]) -> None:
    r, w = pipe
    array = np.ones(4, dtype=np.float64)
    written = channel.write_frame(w, [array, "x"])
    data = os.read(r, 1 << 16)
    assert written == len(data)
    magic, version, payload_len, count = struct.unpack_from("<4sIQI", data)
    assert (magic, version, count) == (b"SOMD", 1, 1)
    (buffer_len,) = struct.unpack_from("<Q", data, 20)
    assert buffer_len == array.nbytes
    assert len(data) == 28 + payload_len + buffer_len
    assert data[-buffer_len:] == array.tobytes()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (frame(pickle.dumps(1), magic=b"XXXX"), "magic"),
        (frame(pickle.dumps(1), version=2), "version"),
        (struct.pack("<4sIQI", b"SOMD", 1, 4, 1_000_001), "buffers"),
        (struct.pack("<4sIQI", b"SOMD", 1, 1 << 40, 0), "limit"),
        (struct.pack("<4sIQI", b"SOMD", 1, 1, 1) + struct.pack("<Q", 1 << 40), "limit"),
    ],
)
def test_corrupt_headers_raise_frame_error(pipe: tuple[int, int], raw: bytes, match: str) -> None:
    r, w = pipe
    os.write(w, raw)
    with pytest.raises(channel.FrameError, match=match):
        channel.read_frame(r, deadline=time.monotonic() + 5, max_frame=1 << 30)


def test_eof_at_a_frame_boundary_is_channel_closed(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(w)
    with pytest.raises(channel.ChannelClosed, match="closed by the other end"):
        read_soon(r)


@pytest.mark.parametrize("cut", [3, 20, 30, 40])
def test_truncated_frame_then_eof_is_channel_closed(pipe: tuple[int, int], cut: int) -> None:
    r, w = pipe
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(np.zeros(8), protocol=5, buffer_callback=buffers.append)
    whole = frame(payload, [bytes(b.raw()) for b in buffers])
    assert cut < len(whole)
    os.write(w, whole[:cut])
    os.close(w)
    with pytest.raises(channel.ChannelClosed, match="inside a frame"):
        read_soon(r)


def test_deadline_raises_timeout_error_without_data(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        channel.read_frame(r, deadline=start + 0.2)
    assert 0.15 < time.monotonic() - start < 2


def test_an_idle_reader_burns_no_cpu(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    cpu_before = time.thread_time()
    with pytest.raises(TimeoutError):
        channel.read_frame(r, deadline=time.monotonic() + 0.5)
    assert time.thread_time() - cpu_before < 0.05  # a bounded spin, then a sleep in poll


def test_deadline_applies_inside_a_frame(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, frame(pickle.dumps("abc"))[:22])
    with pytest.raises(TimeoutError):
        channel.read_frame(r, deadline=time.monotonic() + 0.2)


def test_custom_loads_receives_payload_and_buffers(pipe: tuple[int, int]) -> None:
    r, w = pipe
    channel.write_frame(w, {"a": np.zeros(3, dtype=np.uint8)})
    seen = {}

    def loads(payload: object, buffers: list[object]) -> str:
        seen["payload"] = bytes(payload)  # type: ignore[call-overload]
        seen["sizes"] = [memoryview(b).nbytes for b in buffers]  # type: ignore[arg-type]
        return "decoded"

    assert read_soon(r, loads=loads) == "decoded"
    assert seen["sizes"] == [3]
    assert pickle.loads(seen["payload"], buffers=[b"\x00" * 3])["a"].shape == (3,)


def test_large_array_streams_through_a_small_pipe_both_ways(pipe: tuple[int, int]) -> None:
    r, w = pipe
    array = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)  # 4 MiB > pipe size
    result: dict[str, object] = {}
    reader = threading.Thread(target=lambda: result.setdefault("m", read_soon(r)))
    reader.start()
    written = channel.write_frame(w, {"big": array, "tail": [1, 2]})
    reader.join(10)
    message = result["m"]
    assert isinstance(message, dict)
    assert written > array.nbytes
    np.testing.assert_array_equal(message["big"], array)
    assert message["big"].flags.writeable and message["tail"] == [1, 2]


def test_write_deadline_bounds_a_stuck_reader(pipe: tuple[int, int]) -> None:
    _, w = pipe
    with pytest.raises(TimeoutError):
        channel.write_frame(w, np.zeros(1 << 22, dtype=np.uint8), deadline=time.monotonic() + 0.2)


def test_write_to_a_closed_reader_raises_broken_pipe(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(r)
    with pytest.raises(BrokenPipeError):
        channel.write_frame(w, {"x": 1})


def test_unpicklable_message_raises_before_writing(pipe: tuple[int, int]) -> None:
    r, w = pipe
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        channel.write_frame(w, {"f": lambda: 1})
    channel.write_frame(w, "next")
    assert read_soon(r) == "next"


def test_many_buffers_beyond_iov_max_round_trip(pipe: tuple[int, int]) -> None:
    r, w = pipe
    arrays = [np.full(3, i, dtype=np.int32) for i in range(1500)]
    result: dict[str, object] = {}
    reader = threading.Thread(target=lambda: result.setdefault("m", read_soon(r)))
    reader.start()
    channel.write_frame(w, arrays)
    reader.join(10)
    received = result["m"]
    assert isinstance(received, list) and len(received) == 1500
    assert all(int(a[0]) == i for i, a in enumerate(received))


def test_tune_pipe_enlarges_the_buffer_and_ignores_non_pipes(pipe: tuple[int, int], tmp_path: Path) -> None:
    _, w = pipe
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    assert channel.tune_pipe(w) == limit > 1 << 16
    with open(tmp_path / "f", "wb") as regular:
        assert channel.tune_pipe(regular.fileno()) == 0


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, np.ndarray):
        # Bit-exact: NaN payloads and the sign of -0.0 included.
        return isinstance(b, np.ndarray) and (a.dtype, a.shape) == (b.dtype, b.shape) and a.tobytes() == b.tobytes()
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[index]
    return a == b


floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([-0.0, math.inf, -math.inf, math.nan])
arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int8, np.int64, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    elements=None,
)
leaves = st.none() | st.booleans() | st.integers() | floats | st.text(max_size=8) | st.binary(max_size=8) | arrays
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(value=values)
def test_neutral_values_round_trip_exactly(value: object) -> None:
    r, w = os.pipe()
    try:
        channel.write_frame(w, value)
        received = channel.read_frame(r, deadline=time.monotonic() + 5, loads=channel.restricted_loads)
    finally:
        os.close(r)
        os.close(w)
    assert _same(value, received), (value, received)


def test_restricted_loads_accepts_markers_and_numpy_scalars(pipe: tuple[int, int]) -> None:
    r, w = pipe
    message = [
        Opaque(b"data", []),
        TorchData(b"\x00" * 4, "float32", (1,)),
        Handle("h1"),
        Concat([np.float32(1.5), np.int64(2)]),
        {1, 2},
        frozenset({3}),
        complex(1, 2),
        bytearray(b"z"),
        np.datetime64("2020-01-01"),
        np.zeros(2, dtype=[("a", "<f4"), ("b", "i8")]),
        np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    ]
    channel.write_frame(w, message)
    received = read_soon(r, loads=channel.restricted_loads)
    assert isinstance(received, list)
    assert received[:4] == message[:4]
    assert received[4:8] == message[4:8]
    assert received[8] == message[8]
    assert received[9].dtype == message[9].dtype  # type: ignore[union-attr]
    np.testing.assert_array_equal(received[10], message[10])  # Fortran order travels out of band too


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_restricted_loads_refuses_a_pickled_os_system() -> None:
    payload = pickle.dumps(_Evil(), protocol=5)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        channel.restricted_loads(payload, [])


@pytest.mark.parametrize("obj", [np.rec.array([(1, 2.0)]), _Evil, print])
def test_restricted_loads_refuses_other_globals(obj: object) -> None:
    with pytest.raises(pickle.UnpicklingError):
        channel.restricted_loads(pickle.dumps(obj, protocol=5), [])


def test_received_buffers_can_be_forwarded_on_another_channel() -> None:
    """A parent relays markers between channels; large buffers included, nothing is unpickled."""
    small = TorchData(pickle.PickleBuffer(bytearray(b"\x01" * 16)), "float32", (4,))
    large = Opaque(b"blob", [pickle.PickleBuffer(bytearray(b"\x02" * (6 << 20)))])
    first_r, first_w = os.pipe()
    second_r, second_w = os.pipe()
    try:
        result: dict[str, object] = {}

        def relay() -> None:
            received = channel.read_frame(first_r, deadline=time.monotonic() + 10, loads=channel.restricted_loads)
            channel.write_frame(second_w, received)

        def receive() -> None:
            result["m"] = channel.read_frame(second_r, deadline=time.monotonic() + 10, loads=channel.restricted_loads)

        threads = [threading.Thread(target=relay), threading.Thread(target=receive)]
        for thread in threads:
            thread.start()
        channel.write_frame(first_w, [small, large])
        for thread in threads:
            thread.join(15)
        relayed_small, relayed_large = result["m"]  # type: ignore[misc]
        assert bytes(relayed_small.buffer) == b"\x01" * 16 and relayed_small.shape == (4,)
        assert relayed_large.data == b"blob"
        (buffer,) = relayed_large.buffers
        view = memoryview(buffer)
        assert view.nbytes == 6 << 20 and not view.readonly and bytes(view[:4]) == b"\x02" * 4
    finally:
        for fd in (first_r, first_w, second_r, second_w):
            os.close(fd)


class _Refused(Exception):
    pass


def test_reducer_override_sees_non_native_objects_and_can_refuse(pipe: tuple[int, int]) -> None:
    r, w = pipe
    seen: list[type] = []

    def override(obj: object) -> object:
        seen.append(type(obj))
        if isinstance(obj, complex):
            raise _Refused
        return NotImplemented

    with pytest.raises(_Refused):
        channel.write_frame(w, [1.0, "s", 2j], reducer_override=override)
    assert seen == [complex]
    channel.write_frame(w, {"a": np.arange(3)}, reducer_override=override)
    assert np.array_equal(read_soon(r, loads=channel.restricted_loads)["a"], np.arange(3))  # type: ignore[index]


def test_is_allowed_global_matches_the_restricted_unpickler() -> None:
    assert channel.is_allowed_global("soma.isolation.markers", "Opaque")
    assert channel.is_allowed_global("numpy", "dtype")
    assert not channel.is_allowed_global("os", "system")


def _send_and_receive(r: int, w: int, value: object) -> object:
    result: dict[str, object] = {}
    reader = threading.Thread(target=lambda: result.setdefault("m", read_soon(r)))
    reader.start()
    channel.write_frame(w, value)
    reader.join(10)
    return result["m"]


def test_large_receive_buffers_are_reused_only_once_released(pipe: tuple[int, int]) -> None:
    r, w = pipe
    size = 5 << 20
    first = _send_and_receive(r, w, np.full(size, 1, dtype=np.uint8))
    second = _send_and_receive(r, w, np.full(size, 2, dtype=np.uint8))
    assert int(first.min()) == int(first.max()) == 1  # type: ignore[attr-defined]
    del first
    third = _send_and_receive(r, w, np.full(size, 3, dtype=np.uint8))
    assert int(second.min()) == int(second.max()) == 2  # type: ignore[attr-defined]
    assert int(third.min()) == int(third.max()) == 3  # type: ignore[attr-defined]
    assert third.flags.writeable  # type: ignore[attr-defined]


def test_idle_receive_buffers_are_given_back(pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = pipe
    monkeypatch.setattr(channel, "_POOL_IDLE_SECONDS", 0.1)
    received = _send_and_receive(r, w, np.zeros(5 << 20, dtype=np.uint8))
    del received
    assert channel._ReceivePool.holds_free()
    with pytest.raises(TimeoutError):
        channel.read_frame(r, deadline=time.monotonic() + 0.5)
    assert not channel._ReceivePool.holds_free()
