"""Cache blobs: out of band on the channel (``values.Blob``) and read in place (``values.blob_array``)."""

from __future__ import annotations

import os
import pickle
import struct
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

from soma.isolation import channel
from soma.isolation.process import Child
from soma.isolation.spec import ChildSpec
from soma.isolation.values import blob_array, cache_blob

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Shift:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x + 1


def _writable(data: bytes, array: Any = None) -> memoryview:
    """``data`` in writable memory, as a download's body is received; placed so that the bytes of
    ``array`` (pickled in ``data``) are aligned, when it is given."""
    shift = 0
    if array is not None:
        start = data.find(np.ascontiguousarray(array).tobytes()[:64])
        shift = -start % 16
    buffer = np.zeros(len(data) + shift, dtype=np.uint8)
    buffer[shift:] = np.frombuffer(data, dtype=np.uint8)
    return buffer.data[shift:]


def test_a_blob_crosses_the_channel_out_of_band_and_arrives_as_bytes() -> None:
    array = np.random.default_rng(0).standard_normal(300_000)
    expected = cache_blob(array, "n").data
    r, w = os.pipe()
    raw = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 20):
            raw.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        channel.write_frame(w, {"blob": cache_blob(array, "n")})
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    _, _, payload_length, count = struct.unpack_from("<4sIQI", raw)
    (buffer_length,) = struct.unpack_from("<Q", raw, 20)
    assert count == 1 and buffer_length == len(expected)
    assert payload_length < 200  # the blob is not copied into the pickle payload
    payload = bytes(raw[28 : 28 + payload_length])
    message = channel.restricted_loads(payload, [bytearray(raw[28 + payload_length :])])
    assert type(message["blob"]) is bytes and message["blob"] == expected
    np.testing.assert_array_equal(pickle.loads(message["blob"]), array)


@pytest.fixture
def child() -> Iterator[Child]:
    spawned = Child.spawn(ChildSpec(), restricted=True)
    try:
        entry = {"id": "s", "pickle": cloudpickle.dumps(Shift()), "trainable": False, "differentiable": False}
        spawned.call("LOAD", timeout=60, filters=[entry], runtime=None, seed=None)
        yield spawned
    finally:
        spawned.shutdown()


def test_a_large_blob_from_a_child_is_the_pickle_of_its_result(child: Child) -> None:
    x = np.arange(1_000_000, dtype=np.float64)  # 8 MB: through the shared-memory ring
    reply = child.call("FORWARD", timeout=60, node_id="s", data=x, blob=True)
    assert type(reply["blob"]) is bytes
    np.testing.assert_array_equal(pickle.loads(reply["blob"]), x + 1)
    np.testing.assert_array_equal(reply["result"], x + 1)


def test_blob_array_reads_a_writable_array_where_it_lies() -> None:
    array = np.random.default_rng(1).standard_normal((500, 400))
    body = _writable(pickle.dumps(array, protocol=5), array)
    back = blob_array(body)
    assert isinstance(back, np.ndarray) and back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert np.shares_memory(back, np.frombuffer(body, np.uint8)) and back.flags.writeable


def test_blob_array_keeps_what_pickle_would_give_for_read_only_arrays_and_fortran_order() -> None:
    records = np.zeros(200_000, dtype=[("a", "<f8"), ("b", "<i4")])
    assert blob_array(_writable(pickle.dumps(records, protocol=5))).dtype == records.dtype
    frozen = np.arange(200_000, dtype=np.int64)
    frozen.flags.writeable = False
    blob = _writable(pickle.dumps(frozen, protocol=5), frozen).toreadonly()
    back = blob_array(blob)
    assert not back.flags.writeable and np.shares_memory(back, np.frombuffer(blob, np.uint8))
    np.testing.assert_array_equal(back, frozen)
    fortran = np.asfortranarray(np.arange(300_000, dtype=np.float32).reshape(600, 500))
    back = blob_array(_writable(pickle.dumps(fortran, protocol=5)))
    assert back.flags.f_contiguous and not back.flags.c_contiguous
    np.testing.assert_array_equal(back, fortran)


@pytest.mark.parametrize("shift", range(8))
def test_blob_array_gives_an_aligned_array_that_reduces_like_the_original(shift: int) -> None:
    # Where the array's bytes lie in a blob depends on the pickle's header: never use them misaligned.
    x = np.linspace(0.0, 1.0, 300_000)
    y = x - x.mean()  # a sum of cancelling terms: its rounding depends on numpy's loop
    blob = pickle.dumps(y, protocol=5)
    padded = bytearray(shift) + bytearray(blob)
    back = blob_array(memoryview(padded)[shift:])
    assert back.flags.aligned and back.flags.writeable
    assert back.mean() == y.mean() and back.sum() == y.sum()
    np.testing.assert_array_equal(back, y)


def test_a_writable_array_in_read_only_memory_is_left_to_pickle() -> None:
    # pickle would give a writable array; a view on read-only bytes cannot be one.
    assert blob_array(pickle.dumps(np.zeros(200_000), protocol=5)) is None


@pytest.mark.parametrize(
    "value",
    [
        np.zeros(100),  # small: nothing to gain
        [0.5] * 300_000,
        {"a": np.zeros(200_000)},
        [np.zeros(200_000)],
        bytearray(2_000_000),
        bytes(2_000_000),
    ],
)
def test_blob_array_is_none_for_anything_but_one_plain_array(value: Any) -> None:
    blob = pickle.dumps(value, protocol=5)
    assert blob_array(_writable(blob)) is None
    assert blob_array(blob) is None


def test_blob_array_never_imports_or_runs_a_class_of_the_blob(tmp_path: Path) -> None:
    module = f"ghost_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(
        "import numpy as np\nclass Ghost(np.ndarray):\n    def __reduce_ex__(self, p):\n"
        "        return (np.asarray, (np.asarray(self),))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        ghost = __import__(module).Ghost
        blob = pickle.dumps({"g": ghost, "data": np.ones(300_000)}, protocol=5)
    finally:
        sys.path.remove(str(tmp_path))
        del sys.modules[module]
    assert blob_array(_writable(blob)) is None
    assert module not in sys.modules


@pytest.mark.parametrize("cut", [10, 60, -3])
def test_blob_array_is_none_for_a_truncated_blob(cut: int) -> None:
    blob = pickle.dumps(np.ones(300_000), protocol=5)
    assert blob_array(_writable(blob[:cut])) is None


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_blob_pickles_as_its_bytes_with_any_protocol(protocol: int) -> None:
    blob = cache_blob({"a": [1, 2]}, "n")
    assert pickle.loads(pickle.dumps(blob, protocol=protocol)) == pickle.dumps({"a": [1, 2]}, protocol=5)


def _frozen(array: Any) -> Any:
    array.flags.writeable = False
    return array


def _records() -> Any:
    records = np.zeros(200_000, dtype=[("a", "<f8"), ("b", "<i4")])
    records["a"], records["b"] = np.arange(1, 200_001) * 0.5, np.arange(1, 200_001)
    return records


@pytest.mark.parametrize(
    "array",
    [
        np.linspace(0.0, 1.0, 300_000),
        np.asfortranarray(np.arange(300_000, dtype=np.float32).reshape(600, 500)),
        _records(),
        _frozen(np.arange(1, 200_001, dtype=np.int64)),
    ],
    ids=["float64", "fortran", "records", "read-only"],
)
def test_a_blob_of_one_array_loads_like_its_pickle_with_the_bytes_aligned(array: Any) -> None:
    blob = cache_blob(array, "n").data
    back, expected = pickle.loads(blob), pickle.loads(pickle.dumps(array, protocol=5))
    assert back.dtype == expected.dtype and back.shape == expected.shape and back.tobytes() == array.tobytes()
    assert (back.flags.writeable, back.flags.f_contiguous) == (expected.flags.writeable, expected.flags.f_contiguous)
    data_at = blob.find(array.tobytes(order="A")[:64])
    assert data_at % 64 == 0  # read in place from a frame's aligned buffer
