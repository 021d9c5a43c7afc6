"""The cache tiers: memory LRU, the shared disk layout, counters and pruning (api §6.3, §6.5)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from soma.errors import CacheError, SomaConfigError, SomaWarning
from soma.runtime.cache import Cache, CacheHit, DiskTier, dumps, estimate_size
from soma.runtime.keys import cache_key


def key(name: str) -> str:
    return cache_key(name)


def data_file(directory: Path, k: str) -> Path:
    return directory / "v1" / k[:2] / f"{k}.pkl"


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", [-1, 1.5, True, "10", None])
def test_bad_max_bytes_is_a_config_error(max_bytes: Any) -> None:
    with pytest.raises(SomaConfigError, match="max_bytes"):
        Cache(max_bytes=max_bytes)


def test_uncreatable_directory_is_a_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="cannot be created or written") as info:
        Cache(directory=blocker / "cache")
    assert isinstance(info.value.__cause__, OSError)


def test_directory_is_created_and_exposed(tmp_path: Path) -> None:
    cache = Cache(directory=tmp_path / "a" / "b")
    assert cache.directory == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b" / "v1").is_dir()
    assert Cache().directory is None
    assert Cache(max_bytes=10).max_bytes == 10


@pytest.mark.parametrize("bad", ["k1", "A" * 64, "0" * 63, 123])
def test_keys_must_be_cache_keys(bad: Any) -> None:
    cache = Cache()
    with pytest.raises(SomaConfigError, match="invalid cache key"):
        cache.put(bad, 1)
    with pytest.raises(SomaConfigError, match="invalid cache key"):
        cache.lookup(bad)


def test_bad_kind_is_rejected_and_stores_nothing() -> None:
    cache = Cache()
    with pytest.raises(SomaConfigError, match="kind"):
        cache.put(key("a"), 1, kind="weights")
    assert not cache.contains(key("a"))


# --- memory tier ----------------------------------------------------------------------------


def test_memory_hit_returns_the_stored_object() -> None:
    cache = Cache()
    value = np.arange(5)
    cache.put(key("a"), value)
    hit = cache.lookup(key("a"))
    assert isinstance(hit, CacheHit)
    assert hit.value is value
    assert hit.tier == "memory"
    assert hit.load_time_ms >= 0
    assert cache.get(key("a")) is value


def test_a_stored_none_is_a_hit_and_a_miss_is_not() -> None:
    cache = Cache()
    cache.put(key("none"), None, kind="state")
    hit = cache.lookup(key("none"))
    assert hit is not None and hit.value is None
    assert cache.lookup(key("missing")) is None
    assert cache.get(key("missing"), "default") == "default"
    assert cache.get(key("none"), "default") is None


def test_memory_tier_evicts_least_recently_used_first() -> None:
    cache = Cache(max_bytes=100)
    cache.put(key("a"), b"a" * 40)
    cache.put(key("b"), b"b" * 40)
    assert cache.lookup(key("a")) is not None  # a is now more recent than b
    cache.put(key("c"), b"c" * 40)
    assert cache.contains(key("a"))
    assert not cache.contains(key("b"))
    assert cache.contains(key("c"))
    assert cache.info()["memory"]["bytes"] == 80


def test_memory_tier_stays_within_budget() -> None:
    cache = Cache(max_bytes=1000)
    for i in range(50):
        cache.put(key(str(i)), b"x" * (10 + i * 7))
        assert cache.info()["memory"]["bytes"] <= 1000
    assert cache.contains(key("49"))


def test_oversize_values_are_not_kept_in_memory() -> None:
    cache = Cache(max_bytes=100)
    cache.put(key("small"), b"s" * 10)
    cache.put(key("big"), b"b" * 101)
    assert not cache.contains(key("big"))
    assert cache.contains(key("small"))


def test_replacing_a_key_updates_its_size() -> None:
    cache = Cache(max_bytes=100)
    cache.put(key("a"), b"a" * 60)
    cache.put(key("a"), b"a" * 10)
    assert cache.info()["memory"] == {
        "entries": 1,
        "bytes": 10,
        "max_bytes": 100,
        "hits": 0,
        "misses": 0,
    }


def test_zero_budget_turns_the_memory_tier_off(tmp_path: Path) -> None:
    cache = Cache(max_bytes=0, directory=tmp_path)
    cache.put(key("a"), [1, 2])
    assert cache.info()["memory"]["entries"] == 0
    hit = cache.lookup(key("a"))
    assert hit is not None and hit.tier == "disk"
    assert cache.lookup(key("a")).tier == "disk"  # type: ignore[union-attr]
    assert cache.info()["memory"]["entries"] == 0


def test_contains_touches_neither_counters_nor_recency() -> None:
    cache = Cache(max_bytes=100)
    cache.put(key("a"), b"a" * 40)
    cache.put(key("b"), b"b" * 40)
    assert cache.contains(key("a"))
    cache.put(key("c"), b"c" * 40)
    assert not cache.contains(key("a"))  # a stayed least recently used
    assert cache.info()["memory"]["hits"] == 0
    assert cache.info()["memory"]["misses"] == 0


def test_clear_empties_memory_but_not_disk_unless_asked(tmp_path: Path) -> None:
    cache = Cache(directory=tmp_path)
    cache.put(key("a"), 1)
    cache.clear()
    assert cache.info()["memory"]["entries"] == 0
    assert cache.info()["disk"]["entries"] == 1
    cache.clear(disk=True)
    assert cache.info()["disk"]["entries"] == 0
    assert cache.lookup(key("a")) is None


def test_concurrent_use_keeps_the_budget() -> None:
    cache = Cache(max_bytes=2000)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(200):
                k = key(f"{worker}-{i % 20}")
                cache.put(k, b"v" * (i % 50))
                cache.lookup(k)
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    info = cache.info()["memory"]
    assert info["bytes"] <= 2000
    assert info["hits"] + info["misses"] == 800


# --- size estimate --------------------------------------------------------------------------


def test_size_estimate_follows_the_spec_rules() -> None:
    array = np.zeros(1000)
    assert estimate_size(array) == 8000
    assert estimate_size(b"x" * 123) == 123
    assert estimate_size("y" * 77) == 77
    container = [array, b"x" * 10]
    assert estimate_size(container) == sys.getsizeof(container) + 8010
    assert estimate_size({"k": array}) == sys.getsizeof({"k": array}) + 1 + 8000
    assert estimate_size([array, array]) == sys.getsizeof([array, array]) + 8000
    floats = [0.5] * 100
    assert estimate_size(floats) == sys.getsizeof(floats) + 100 * sys.getsizeof(0.5)


def test_size_estimate_of_tensors() -> None:
    torch = pytest.importorskip("torch")
    assert estimate_size(torch.zeros(10, 3, dtype=torch.bfloat16)) == 60


def test_size_estimate_survives_cycles() -> None:
    loop: list[Any] = [b"abc"]
    loop.append(loop)
    assert estimate_size(loop) == sys.getsizeof(loop) + 3


# --- disk tier ------------------------------------------------------------------------------


def test_disk_layout_and_sidecar(tmp_path: Path) -> None:
    cache = Cache(directory=tmp_path)
    k = key("layout")
    cache.put(k, {"w": [1, 2]}, kind="state", node_id="scaler", filter_name="Scaler")
    path = data_file(tmp_path, k)
    assert pickle.loads(path.read_bytes()) == {"w": [1, 2]}
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["key"] == k
    assert sidecar["kind"] == "state"
    assert sidecar["node_id"] == "scaler"
    assert sidecar["filter"] == "Scaler"
    assert sidecar["size"] == path.stat().st_size
    assert isinstance(sidecar["created"], float)
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{k}.json", f"{k}.pkl"]


def test_a_new_cache_on_the_same_directory_hits_disk_then_memory(tmp_path: Path) -> None:
    Cache(directory=tmp_path).put(key("a"), np.arange(3))
    reader = Cache(directory=tmp_path)
    first = reader.lookup(key("a"))
    assert first is not None and first.tier == "disk"
    np.testing.assert_array_equal(first.value, np.arange(3))
    second = reader.lookup(key("a"))
    assert second is not None and second.tier == "memory"
    assert second.value is first.value
    info = reader.info()
    assert info["disk"] == {
        "path": str(tmp_path),
        "entries": 1,
        "bytes": data_file(tmp_path, key("a")).stat().st_size,
        "hits": 1,
        "misses": 0,
    }
    assert info["memory"]["hits"] == 1
    assert info["memory"]["misses"] == 1


def test_disk_misses_are_counted(tmp_path: Path) -> None:
    cache = Cache(directory=tmp_path)
    assert cache.lookup(key("nothing")) is None
    assert cache.info()["disk"]["misses"] == 1
    assert Cache().info()["disk"] is None


def test_values_needing_cloudpickle_reach_disk(tmp_path: Path) -> None:
    Cache(directory=tmp_path).put(key("fn"), lambda x: x + 1)
    loaded = Cache(directory=tmp_path).get(key("fn"))
    assert loaded(1) == 2


def test_another_process_reads_what_this_one_wrote(tmp_path: Path) -> None:
    Cache(directory=tmp_path).put(key("shared"), {"array": np.arange(4.0)})
    script = (
        "import sys; from soma.runtime.cache import Cache; "
        "from soma.runtime.keys import cache_key; "
        "hit = Cache(directory=sys.argv[1]).lookup(cache_key('shared')); "
        "print(hit.tier, hit.value['array'].sum()); "
        "Cache(directory=sys.argv[1]).put(cache_key('back'), [7, None], kind='state')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["disk", "6.0"]
    assert Cache(directory=tmp_path).get(key("back")) == [7, None]


def test_a_corrupt_entry_is_a_logged_miss_and_is_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Cache(directory=tmp_path).put(key("a"), list(range(100)))
    path = data_file(tmp_path, key("a"))
    path.write_bytes(path.read_bytes()[:20])
    cache = Cache(directory=tmp_path)
    with caplog.at_level(logging.WARNING, logger="soma.cache"):
        assert cache.lookup(key("a")) is None
    assert not path.exists()
    assert not path.with_suffix(".json").exists()
    assert [r.name for r in caplog.records] == ["soma.cache"]
    assert key("a")[:16] in caplog.records[0].getMessage()
    assert cache.info()["disk"]["misses"] == 1


def test_an_entry_needing_a_missing_module_is_a_miss_but_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = DiskTier(tmp_path)
    k = key("foreign")
    disk.write_bytes(k, b"cno_such_module_for_soma_tests\nThing\n.", {"kind": "output"})
    with caplog.at_level(logging.WARNING, logger="soma.cache"):
        assert Cache(directory=tmp_path).lookup(k) is None
    assert data_file(tmp_path, k).exists()
    assert "cannot import" in caplog.records[0].getMessage()


def test_unpicklable_values_stay_in_memory_with_one_warning_per_node(tmp_path: Path) -> None:
    cache = Cache(directory=tmp_path)
    with pytest.warns(SomaWarning, match="'scaler'.*cannot be pickled") as record:
        cache.put(key("a"), threading.Lock(), node_id="scaler")
        cache.put(key("b"), threading.Lock(), node_id="scaler")
    assert len(record) == 1
    assert cache.lookup(key("a")) is not None
    assert not data_file(tmp_path, key("a")).exists()
    with pytest.warns(SomaWarning, match="'other'"):
        cache.put(key("c"), threading.Lock(), node_id="other")


def test_memory_only_cache_never_pickles() -> None:
    cache = Cache()
    cache.put(key("a"), threading.Lock(), node_id="n")  # no warning: nothing to pickle for
    assert cache.contains(key("a"))


def test_disk_reads_refresh_recency_for_prune(tmp_path: Path) -> None:
    cache = Cache(max_bytes=0, directory=tmp_path)
    keys = [key(name) for name in "abc"]
    for age, k in zip((300, 200, 100), keys, strict=True):
        cache.put(k, b"x" * 1000)
        past = data_file(tmp_path, k).stat().st_mtime - age
        os.utime(data_file(tmp_path, k), (past, past))
    assert cache.lookup(keys[0]) is not None  # the oldest becomes the most recent
    size = data_file(tmp_path, keys[0]).stat().st_size
    assert cache.prune(size) == 2
    assert data_file(tmp_path, keys[0]).exists()
    assert not data_file(tmp_path, keys[1]).exists()
    assert not data_file(tmp_path, keys[1]).with_suffix(".json").exists()
    assert not data_file(tmp_path, keys[2]).exists()
    assert cache.prune(size) == 0
    assert cache.prune(0) == 1
    assert cache.info()["disk"]["entries"] == 0


def test_prune_validates_and_needs_a_disk_tier() -> None:
    with pytest.raises(SomaConfigError, match="max_bytes"):
        Cache().prune(-5)
    assert Cache().prune(0) == 0


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    cache = Cache(directory=tmp_path)
    for i in range(5):
        cache.put(key("same"), list(range(i)))
    bucket = data_file(tmp_path, key("same")).parent
    assert len(list(bucket.iterdir())) == 2
    assert cache.get(key("same")) == [0, 1, 2, 3]


def test_disk_tier_relays_pre_pickled_blobs(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    blob = dumps({"state": np.ones(2)})
    k = key("blob")
    assert disk.read_bytes(k) is None
    disk.write_bytes(k, blob, {"kind": "state", "node_id": "n", "filter": "F"})
    assert disk.read_bytes(k) == blob
    assert disk.contains(k)
    value = Cache(directory=tmp_path).get(k)
    np.testing.assert_array_equal(value["state"], np.ones(2))
    disk.delete(k)
    assert not disk.contains(k)


def test_dumps_reports_unpicklable_values() -> None:
    with pytest.raises(pickle.PicklingError):
        dumps(threading.Lock())


def test_a_directory_removed_from_outside_is_recreated_on_write(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    cache = Cache(directory=directory)
    cache.put(key("a"), 1)
    shutil.rmtree(directory)
    assert cache.info()["disk"]["entries"] == 0
    cache.put(key("b"), 2)
    assert data_file(directory, key("b")).exists()
