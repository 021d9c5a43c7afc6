"""Opaque values (ext 4) holding one array: decoded in place on the client when the frame is writable."""

from __future__ import annotations

import pickle

import numpy as np

from soma.isolation.markers import Opaque
from soma.isolation.values import cache_blob
from soma.wire import v2


def test_a_cache_hit_array_decodes_in_place_from_a_writable_download() -> None:
    array = np.random.default_rng(2).standard_normal((400, 500))
    frame = v2.encode_value_frame(Opaque(cache_blob(array, "n").data, []))  # a blob as a child makes it
    body = np.frombuffer(bytearray(frame), dtype=np.uint8)
    back = v2.decode_value_frame(body.data, "client")
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable and np.shares_memory(back, body)


def test_from_read_only_bytes_it_is_an_ordinary_writable_copy() -> None:
    array = np.arange(300_000, dtype=np.int32)
    frame = v2.encode_value_frame(Opaque(pickle.dumps(array, protocol=5), []))
    back = v2.decode_value_frame(frame, "client")
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable and not np.shares_memory(back, np.frombuffer(frame, np.uint8))


def test_other_opaque_values_still_unpickle_whole() -> None:
    value = {"big": np.ones(300_000), "name": "x", "raw": bytearray(1_200_000)}
    frame = v2.encode_value_frame(Opaque(pickle.dumps(value, protocol=5), []))
    back = v2.decode_value_frame(np.frombuffer(bytearray(frame), np.uint8).data, "client")
    assert back["name"] == "x" and type(back["raw"]) is bytearray and len(back["raw"]) == 1_200_000
    np.testing.assert_array_equal(back["big"], value["big"])


def test_an_array_at_an_odd_offset_of_a_blob_decodes_aligned_and_equal() -> None:
    x = np.linspace(0.0, 1.0, 300_000)
    y = x - x.mean()
    frame = v2.encode_value_frame(Opaque(pickle.dumps(y, protocol=5), []))  # a plain pickle: no alignment pad
    back = v2.decode_value_frame(np.frombuffer(bytearray(frame), dtype=np.uint8).data, "client")
    assert back.flags.aligned and back.mean() == y.mean()
    np.testing.assert_array_equal(back, y)
