"""Frames stored part by part, and values kept decoded by store key (``Store.recent``)."""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from soma.wire import v2
from soma.worker.store import RecentValues, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "temp", ttl=60) as opened:
        yield opened


def _key(body: bytes) -> str:
    return hashlib.sha256(struct.pack("<Q", len(body)) + body).hexdigest()


def test_parts_are_stored_as_their_concatenation(store: Store) -> None:
    array = np.arange(3 * 2**20, dtype=np.float64)  # 24 MiB: written while hashed on another thread
    parts = v2.encode_value_frame_parts({"x": array, "name": "big"})
    frame = b"".join(parts)
    key = store.put_parts(parts, ".soma")
    assert key == _key(frame)
    assert store.path_for(key).read_bytes() == frame
    assert store.put_bytes(frame, ".soma") == key  # the same bytes: the same file


def test_recent_values_keep_the_most_recently_used_within_the_budget() -> None:
    recent = RecentValues(max_bytes=100)
    recent.put("a", [1], 40)
    recent.put("b", [2], 40)
    assert recent.get("a") == [1]  # "a" is now the most recently used
    recent.put("c", [3], 40)
    assert recent.get("b") is None
    assert recent.get("a") == [1] and recent.get("c") == [3]
    recent.put("huge", [4], 101)
    assert recent.get("huge", "missing") == "missing"
    assert recent.get("a") == [1]


def test_a_value_of_none_is_told_apart_from_a_missing_one() -> None:
    recent = RecentValues(max_bytes=10)
    recent.put("k", None, 1)
    missing = object()
    assert recent.get("k", missing) is None
    assert recent.get("other", missing) is missing


def test_sweeping_a_file_forgets_its_value(store: Store) -> None:
    key = store.put_bytes(v2.encode_value_frame([1.0, 2.0]), ".soma")
    store.recent.put(key, [1.0, 2.0], 10)
    assert store.sweep(now=time.time() + 120) == 1
    assert store.recent.get(key) is None


def test_the_server_sniffs_v2_uploads_by_the_codec_magic() -> None:
    from soma.worker.server import V2_MAGIC

    assert V2_MAGIC == v2.MAGIC
    assert v2.encode_value_frame(None).startswith(V2_MAGIC)
