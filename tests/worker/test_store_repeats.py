"""A body stored again (a cache hit returned twice) is recognised without hashing or writing it again."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from soma.wire import v2
from soma.worker.store import Store, Upload


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "temp", ttl=60) as opened:
        yield opened


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the bodies the store writes."""
    sizes: list[int] = []
    original = Upload.write

    def counting(self: Upload, chunk: bytes | bytearray | memoryview) -> None:
        sizes.append(memoryview(chunk).nbytes)
        original(self, chunk)

    monkeypatch.setattr(Upload, "write", counting)
    return sizes


def test_a_body_stored_again_is_only_touched(store: Store, writes: list[int]) -> None:
    parts = v2.encode_value_frame_parts(np.arange(100_000, dtype=np.float64))
    key = store.put_parts(parts, ".soma")
    path = store.path_for(key)
    written = len(writes)
    again = store.put_parts(v2.encode_value_frame_parts(np.arange(100_000, dtype=np.float64)), ".soma")
    assert again == key and len(writes) == written
    frame = b"".join(parts)
    assert key == hashlib.sha256(struct.pack("<Q", len(frame)) + frame).hexdigest()
    assert path.read_bytes() == frame


def test_a_body_whose_file_was_swept_is_written_again(store: Store, writes: list[int]) -> None:
    parts = v2.encode_value_frame_parts([0.25] * 10_000)
    key = store.put_parts(parts, ".soma")
    store.path_for(key).unlink()
    assert store.put_parts(parts, ".soma") == key
    assert store.path_for(key).read_bytes() == b"".join(parts)


def test_the_same_bytes_under_another_suffix_are_not_confused(store: Store) -> None:
    body = b'{"type":"Json","data":1}'
    json_key = store.put_parts([body], ".json")
    assert store.path_for(json_key).suffix == ".json"
    store.path_for(json_key).unlink()
    msgpack_key = store.put_parts([body], ".msgpack")
    assert msgpack_key == json_key and store.path_for(msgpack_key).suffix == ".msgpack"
