"""The worker's blob cache: memory LRU, shared disk tier, failures that never stop a plan."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from soma.runtime.cache import Cache
from soma.worker.blobcache import BlobCache

KEY_A = "a" * 64
KEY_B = "b" * 64
KEY_C = "c" * 64


def test_memory_tier_is_lru_within_its_byte_budget() -> None:
    cache = BlobCache(10)
    cache.put(KEY_A, b"12345", kind="output", node_id="n")
    cache.put(KEY_B, b"12345", kind="output", node_id="n")
    assert cache.get(KEY_A) is not None  # A becomes the most recent
    cache.put(KEY_C, b"12345", kind="output", node_id="n")
    assert cache.get(KEY_B) is None
    hit = cache.get(KEY_A)
    assert hit is not None and hit.blob == b"12345" and hit.tier == "memory"
    cache.put(KEY_B, b"x" * 11, kind="output", node_id="n")  # larger than the budget: not kept
    assert cache.get(KEY_B) is None
    assert cache.info()["bytes"] <= 10


def test_summaries_stay_beside_memory_entries() -> None:
    cache = BlobCache(1000)
    cache.put(KEY_A, b"blob", kind="output", node_id="n", summary="list(len=3)")
    hit = cache.get(KEY_A)
    assert hit is not None and hit.summary == "list(len=3)"


def test_the_disk_tier_is_shared_with_a_local_cache_both_ways(tmp_path: Path) -> None:
    worker = BlobCache(0, tmp_path)
    worker.put(KEY_A, pickle.dumps({"state": [1, 2]}, protocol=5), kind="state", node_id="n")
    assert Cache(directory=tmp_path).get(KEY_A) == {"state": [1, 2]}
    Cache(directory=tmp_path).put(KEY_B, [3.0, 4.0], kind="output", node_id="m")
    hit = BlobCache(1000, tmp_path).get(KEY_B)
    assert hit is not None and hit.tier == "disk" and pickle.loads(hit.blob) == [3.0, 4.0]


def test_an_unusable_cache_directory_logs_a_warning_and_memory_still_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the directory should be")
    with caplog.at_level(logging.WARNING, logger="soma.worker"):
        cache = BlobCache(1000, blocker)
    assert "disk tier disabled" in caplog.text
    cache.put(KEY_A, b"blob", kind="output", node_id="n")
    assert cache.get(KEY_A) is not None


def test_a_failing_disk_write_logs_a_warning_and_is_otherwise_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = BlobCache(1000, tmp_path)
    (tmp_path / "v1" / KEY_A[:2]).write_text("a file where the bucket directory should be")
    with caplog.at_level(logging.WARNING, logger="soma.worker"):
        cache.put(KEY_A, b"blob", kind="output", node_id="n")
    assert "not written to disk" in caplog.text
    assert cache.get(KEY_A) is not None  # still served from memory
