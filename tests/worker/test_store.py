"""The upload/output store and the data store (worker spec §4.3–§4.4, §9 items 8, 9 and 23)."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from soma.errors import SomaConfigError
from soma.worker.store import (
    BadRequest,
    BodyTooLarge,
    DiskLow,
    ForbiddenPath,
    Store,
    StoreError,
    StoreLocked,
    UnreadableValue,
    UnresolvedReference,
    store_key,
)

V2_FRAME = b"SOMA\x02\x00\x00\x00" + b"\x00" * 24
V1_VALUE = b'{"type":"Json","data":[1,2,3]}'


def _expected_key(body: bytes) -> str:
    return hashlib.sha256(struct.pack("<Q", len(body)) + body).hexdigest()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def store(tmp_path: Path, data_dir: Path) -> Iterator[Store]:
    with Store(tmp_path / "temp", ttl=60, data_store=data_dir) as opened:
        yield opened


def _store_files(store: Store) -> list[str]:
    return sorted(path.name for path in store.store_dir.iterdir())


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# --------------------------------------------------------------------------- writing


def test_key_is_sha256_of_length_and_body(store: Store) -> None:
    key = store.put_bytes(V1_VALUE, ".json")
    assert key == _expected_key(V1_VALUE) == store_key(V1_VALUE)
    path = store.path_for(key)
    assert path == store.store_dir / f"{key}.json" and path.is_absolute()
    assert path.read_bytes() == V1_VALUE


def test_identical_uploads_share_one_file(store: Store) -> None:
    first = store.put_bytes(V2_FRAME, ".soma")
    second = store.put_stream([V2_FRAME[:5], V2_FRAME[5:]], ".soma")
    third = store.put_stream(io.BytesIO(V2_FRAME), ".soma", size=len(V2_FRAME))
    assert first == second == third
    assert _store_files(store) == [f"{first}.soma"]
    assert list(store.incoming_dir.iterdir()) == []


def test_streamed_key_does_not_depend_on_the_announced_size(store: Store) -> None:
    body = b"x" * 3000
    announced_wrong = store.put_stream([body[:1000], body[1000:]], ".json", size=10)
    unannounced = store.put_stream(iter([body]), ".json")
    assert announced_wrong == unannounced == _expected_key(body)


def test_body_over_the_limit_is_refused_and_leaves_nothing(store: Store) -> None:
    with pytest.raises(BodyTooLarge) as info:
        store.put_stream([b"a" * 600, b"b" * 600], ".soma", limit=1000)
    assert info.value.http_status == 413
    with pytest.raises(BodyTooLarge):
        store.open_upload(".soma", size=2000, limit=1000)
    assert _store_files(store) == [] and list(store.incoming_dir.iterdir()) == []


def test_empty_body_is_refused(store: Store) -> None:
    with pytest.raises(BadRequest, match="empty"):
        store.put_bytes(b"", ".json")
    assert _store_files(store) == []


def test_abandoned_upload_leaves_no_partial_file(store: Store) -> None:
    with store.open_upload(".soma") as upload:
        upload.write(b"partial")
    assert list(store.incoming_dir.iterdir()) == [] and _store_files(store) == []
    with pytest.raises(StoreError):
        upload.commit()


def test_writing_needs_an_open_store(tmp_path: Path) -> None:
    closed = Store(tmp_path / "never-opened", ttl=60)
    with pytest.raises(StoreError, match="not open"):
        closed.put_bytes(b"x", ".json")
    assert closed.sweep() == 0 and closed.bytes_used() == 0


def test_unknown_suffix_is_a_programming_error(store: Store) -> None:
    with pytest.raises(SomaConfigError, match="suffix"):
        store.put_bytes(b"x", ".exe")


def test_disk_low_refuses_uploads(tmp_path: Path) -> None:
    with Store(tmp_path / "t", ttl=60, min_free_bytes=0, min_free_fraction=0.0) as roomy:
        assert not roomy.disk_low()
    with Store(tmp_path / "t2", ttl=60, min_free_bytes=2**62) as cramped:
        assert cramped.disk_low()
        with pytest.raises(DiskLow) as info:
            cramped.put_bytes(b"x", ".json")
        assert info.value.http_status == 507


# --------------------------------------------------------------------------- Local references (item 8)


def test_store_file_resolves_with_kind_and_key(store: Store) -> None:
    key = store.put_bytes(V1_VALUE, ".json")
    value = store.resolve_local(str(store.path_for(key)))
    assert (value.kind, value.key, value.size) == ("json", key, len(V1_VALUE))
    assert value.read_bytes() == V1_VALUE


def test_etc_passwd_is_forbidden(store: Store) -> None:
    with pytest.raises(ForbiddenPath) as info:
        store.resolve_local("/etc/passwd")
    assert info.value.code == "forbidden_path" and info.value.http_status == 403


def test_dotdot_leaving_the_store_is_forbidden(store: Store) -> None:
    with pytest.raises(ForbiddenPath):
        store.resolve_local(f"{store.store_dir}/../soma-worker.lock")
    with pytest.raises(ForbiddenPath):
        store.resolve_local(f"{store.store_dir}/../../../../../../etc/passwd")


def test_symlink_leaving_the_store_is_forbidden(store: Store, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_bytes(V1_VALUE)
    link = store.store_dir / f"{'a' * 64}.json"
    link.symlink_to(secret)
    with pytest.raises(ForbiddenPath):
        store.resolve_local(str(link))


def test_relative_paths_are_forbidden(store: Store) -> None:
    with pytest.raises(ForbiddenPath, match="absolute"):
        store.resolve_local("store/x.json")


def test_missing_file_inside_the_store_is_unresolved(store: Store) -> None:
    with pytest.raises(UnresolvedReference) as info:
        store.resolve_local(str(store.store_dir / "nothing.json"))
    assert info.value.code == "unresolved_reference" and info.value.http_status == 404


def test_data_store_files_resolve_by_path_and_sniffed_kind(store: Store, data_dir: Path) -> None:
    (data_dir / "sub").mkdir()
    (data_dir / "sub" / "frame.bin").write_bytes(V2_FRAME)
    (data_dir / "value.json").write_bytes(b"  " + V1_VALUE)
    np.save(data_dir / "array.npy", np.arange(6.0).reshape(2, 3))
    (data_dir / "alias.json").symlink_to(data_dir / "value.json")
    assert store.resolve_local(str(data_dir / "sub" / "frame.bin")).kind == "soma"
    assert store.resolve_local(str(data_dir / "value.json")).kind == "json"
    assert store.resolve_local(str(data_dir / "alias.json")).path == data_dir / "value.json"
    value = store.resolve_local(str(data_dir / "array.npy"))
    assert value.kind == "npy" and value.key is None
    array = value.load_array()
    assert isinstance(array, np.memmap) and not array.flags.writeable
    np.testing.assert_array_equal(array, np.arange(6.0).reshape(2, 3))


def test_npy_with_objects_is_not_unpickled(store: Store, data_dir: Path) -> None:
    np.save(data_dir / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UnreadableValue, match="not a plain .npy array") as info:
        store.resolve_local(str(data_dir / "objects.npy")).load_array()
    assert info.value.code == "encoding_error"
    (data_dir / "truncated.npy").write_bytes(b"\x93NUMPY\x01\x00")
    with pytest.raises(UnreadableValue):
        store.resolve_local(str(data_dir / "truncated.npy")).load_array()


def test_empty_file_never_resolves(store: Store, data_dir: Path) -> None:
    (data_dir / "empty.json").write_bytes(b"")
    with pytest.raises(UnresolvedReference, match="empty"):
        store.resolve_local(str(data_dir / "empty.json"))


# --------------------------------------------------------------------------- Cached references (item 23)


def test_cached_key_is_found_in_the_store_then_the_data_store(store: Store, data_dir: Path) -> None:
    key = store.put_bytes(V2_FRAME, ".soma")
    assert store.find_cached(key.upper()).path == store.path_for(key)
    data_key = "c" * 64
    np.save(data_dir / f"{data_key}.npy", np.ones(3))
    found = store.find_cached(data_key)
    assert found.kind == "npy" and found.path == data_dir / f"{data_key}.npy"


def test_unresolved_key_names_the_reference_and_every_directory(store: Store, data_dir: Path) -> None:
    key = "d" * 64
    with pytest.raises(UnresolvedReference) as info:
        store.find_cached(key)
    message = str(info.value)
    assert key in message and str(store.store_dir) in message and str(data_dir) in message
    assert info.value.searched == (str(store.store_dir), str(data_dir))


def test_malformed_keys_are_bad_requests(store: Store) -> None:
    for key in ("abc", "g" * 64, "../" + "a" * 61, 42):
        with pytest.raises(BadRequest):
            store.find_cached(key)  # type: ignore[arg-type]


def test_set_data_store_validates_at_call_time(store: Store, tmp_path: Path) -> None:
    with pytest.raises(SomaConfigError, match="not a directory"):
        store.set_data_store(tmp_path / "missing")
    store.set_data_store(None)
    with pytest.raises(UnresolvedReference) as info:
        store.find_cached("e" * 64)
    assert info.value.searched == (str(store.store_dir),)


# --------------------------------------------------------------------------- TTL, pins, LRU (item 9)


def test_sweep_deletes_files_idle_longer_than_the_ttl(tmp_path: Path) -> None:
    with Store(tmp_path / "t", ttl=1) as store:
        old = store.put_bytes(b"old value", ".json")
        _age(store.path_for(old), 5)
        fresh = store.put_bytes(b"fresh value", ".json")
        assert store.sweep() == 1
        assert _store_files(store) == [f"{fresh}.json"]
        assert store.sweep(now=time.time() + 2) == 1
        assert _store_files(store) == [] and store.deleted_total == 2


def test_pinned_file_survives_until_unpinned(tmp_path: Path) -> None:
    with Store(tmp_path / "t", ttl=1) as store:
        key = store.put_bytes(V2_FRAME, ".soma")
        with store.pin(key) as pin:
            assert store.is_pinned(key)
            assert store.sweep(now=time.time() + 10) == 0
            with store.pin(key):  # pins nest
                pass
            assert store.sweep(now=time.time() + 10) == 0 and store.path_for(key).exists()
            pin.release()
            pin.release()  # idempotent
        assert not store.is_pinned(key)
        assert store.sweep(now=time.time() + 10) == 1
        with pytest.raises(UnresolvedReference):
            store.path_for(key)


def test_unpinning_an_unpinned_key_is_an_error(store: Store) -> None:
    with pytest.raises(StoreError, match="not pinned"):
        store.unpin("f" * 64)


def test_touch_records_an_access(tmp_path: Path) -> None:
    with Store(tmp_path / "t", ttl=10) as store:
        key = store.put_bytes(b"value", ".json")
        _age(store.path_for(key), 60)
        assert store.touch(key) is True
        assert store.sweep() == 0
        assert store.touch("0" * 64) is False


def test_dedupe_counts_as_an_access(tmp_path: Path) -> None:
    with Store(tmp_path / "t", ttl=10) as store:
        key = store.put_bytes(b"value", ".json")
        _age(store.path_for(key), 60)
        store.put_bytes(b"value", ".json")
        assert store.sweep() == 0


def test_lru_eviction_beyond_max_bytes(tmp_path: Path) -> None:
    with Store(tmp_path / "t", ttl=3600, max_bytes=250) as store:
        keys = [store.put_bytes(bytes([n]) * 100, ".soma") for n in range(1, 4)]
        for age, key in zip((30, 20, 10), keys, strict=True):
            _age(store.path_for(key), age)
        assert store.bytes_used() == 300
        store.touch(keys[0])  # now the most recently used
        with store.pin(keys[1]):  # the least recently used, but in use
            assert store.sweep() == 1
        assert _store_files(store) == sorted([f"{keys[0]}.soma", f"{keys[1]}.soma"])
        assert store.bytes_used() == 200


def test_open_removes_expired_files_and_partial_uploads(tmp_path: Path) -> None:
    root = tmp_path / "t"
    with Store(root, ttl=30) as store:
        expired = store.put_bytes(b"expired", ".json")
        kept = store.put_bytes(b"kept", ".json")
        _age(store.path_for(expired), 120)
        (store.incoming_dir / "crashed.part").write_bytes(b"half a body")
    with Store(root, ttl=30) as reopened:
        assert _store_files(reopened) == [f"{kept}.json"]
        assert list(reopened.incoming_dir.iterdir()) == []


# --------------------------------------------------------------------------- temp-dir lock


def test_two_stores_cannot_share_a_temp_dir(tmp_path: Path) -> None:
    first = Store(tmp_path / "shared", ttl=60).open()
    try:
        with pytest.raises(StoreLocked) as info:
            Store(tmp_path / "shared", ttl=60).open()
        assert str(os.getpid()) in str(info.value) and "--temp-dir" in str(info.value)
        assert isinstance(info.value, SomaConfigError)
    finally:
        first.close()
    with Store(tmp_path / "shared", ttl=60) as second:
        assert second.put_bytes(b"ok", ".json")


@pytest.mark.parametrize("kwargs", [{"ttl": 0}, {"ttl": -1}, {"ttl": "1"}, {"ttl": 1, "max_bytes": -1}])
def test_bad_store_settings_are_refused(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(SomaConfigError):
        Store(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_concurrent_identical_uploads_end_in_one_file(store: Store) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = os.urandom(200_000)
    with ThreadPoolExecutor(max_workers=4) as pool:
        keys = set(pool.map(lambda _: store.put_stream([body[:50_000], body[50_000:]], ".soma"), range(8)))
    assert keys == {_expected_key(body)}
    assert _store_files(store) == [f"{_expected_key(body)}.soma"]
    assert list(store.incoming_dir.iterdir()) == []
