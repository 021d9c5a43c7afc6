"""The content-addressed cache of states and outputs: a memory LRU over an optional disk tier.

    lookup(key) ──► memory ──miss──► disk ──hit──► promoted to memory
    put(key, v) ──► memory (by reference, within budget)
                └─► disk   (pickled once, written to a temp file, renamed into place)

Keys are the SHA-256 hex strings of ``soma.runtime.keys``. The disk layout,
``<dir>/v1/<hex[:2]>/<hex>.pkl`` plus a ``<hex>.json`` sidecar, is shared by every
process and worker pointed at the same directory; atomic renames make concurrent
writers safe. Workers store pre-pickled blobs through ``DiskTier.write_bytes``
without unpickling them. Entries are pickles: only use trusted directories.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import pickle
import re
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle

from soma.errors import CacheError, SomaConfigError, SomaWarning
from soma.log import cache_logger

__all__ = ["Cache", "CacheHit", "DiskTier", "dumps", "estimate_size"]

DEFAULT_MAX_BYTES = 1 << 30
_KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
_KINDS = frozenset({"state", "output"})


@dataclass(frozen=True)
class CacheHit:
    """A value found in the cache, the tier that served it and how long loading took.

    A memory hit loads nothing: its ``load_time_ms`` is 0.
    """

    value: Any
    tier: str
    load_time_ms: int


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise SomaConfigError(f"invalid cache key {key!r}: expected 64 lower-case hex characters")
    return key


def _check_max_bytes(max_bytes: object) -> int:
    if type(max_bytes) is not int or max_bytes < 0:
        raise SomaConfigError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
    return max_bytes


def _elapsed_ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)


def dumps(value: Any) -> bytes:
    """Pickle ``value`` with protocol 5, falling back to cloudpickle (lambdas, local classes).

    Raises:
        pickle.PicklingError: neither could serialise it (the cause is chained).
    """
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # user __reduce__ methods may raise anything
        try:
            blob: bytes = cloudpickle.dumps(value, protocol=5)
        except Exception as exc:  # same: arbitrary user code runs here
            raise pickle.PicklingError(f"{type(exc).__name__}: {exc}") from exc
        return blob


# --- size estimate ------------------------------------------------------------------------

_SIZED_BY_LENGTH = (str, bytes, bytearray)
_ATOM_SIZES: dict[type, int] = {
    type(None): sys.getsizeof(None),
    bool: sys.getsizeof(False),
    int: sys.getsizeof(0),
    float: sys.getsizeof(0.0),
    complex: sys.getsizeof(0j),
}


def estimate_size(value: Any) -> int:
    """Approximate memory held by ``value``, for the memory tier's budget (api §6.3).

    Arrays count ``nbytes``, tensors ``numel * element_size``, str and bytes their
    length, containers the sum of their items (shared items once), anything else
    ``sys.getsizeof``.
    """
    total = 0
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) in _ATOM_SIZES:
            total += sys.getsizeof(item)
        elif isinstance(item, _SIZED_BY_LENGTH):
            total += len(item)
        elif id(item) not in seen:
            seen.add(id(item))
            if isinstance(item, (list, tuple, set, frozenset)):
                total += sys.getsizeof(item) + _flat_items_size(item, stack)
            elif isinstance(item, dict):
                total += sys.getsizeof(item)
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                total += _leaf_size(item)
    return total


def _flat_items_size(items: Collection[Any], stack: list[Any]) -> int:
    """Size of a container's items when all are numbers (counted in C, at the size of a
    small instance of each type); otherwise the items go on ``stack`` and count 0 here."""
    first = type(next(iter(items), None))
    # The common case, a long list of floats: counting one type compares pointers, no set is built.
    if first in _ATOM_SIZES and operator.countOf(map(type, items), first) == len(items):
        return _ATOM_SIZES[first] * len(items)
    kinds = set(map(type, items))
    if kinds and kinds <= _ATOM_SIZES.keys():
        return sum(_ATOM_SIZES[kind] * n for kind, n in Counter(map(type, items)).items())
    stack.extend(items)
    return 0


def _leaf_size(item: Any) -> int:
    root = type(item).__module__.partition(".")[0]
    if root == "numpy" and hasattr(item, "nbytes"):
        return int(item.nbytes)
    if root == "torch" and hasattr(item, "element_size"):
        return int(item.numel()) * int(item.element_size())
    return sys.getsizeof(item)


# --- memory tier --------------------------------------------------------------------------


class _MemoryTier:
    """LRU by access within a byte budget; values are kept by reference. Not locked itself.

    Each entry holds the ``CacheHit`` its lookups return, built once at ``put``: a hit
    allocates nothing and costs a dict lookup and a ``move_to_end``.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[CacheHit, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> CacheHit | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: Any, size: int) -> None:
        self._discard(key)
        if size > self.max_bytes:
            return
        while self._entries and self.bytes + size > self.max_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self.bytes -= evicted_size
        self._entries[key] = (CacheHit(value, "memory", 0), size)
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _discard(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]


# --- disk tier ----------------------------------------------------------------------------


class DiskTier:
    """Pickled entries under ``<directory>/v1/<hex[:2]>/``, safe to share between processes.

    Byte-level (``read_bytes``, ``write_bytes``) for workers relaying pre-pickled blobs,
    value-level (``get``, ``put``) for everyone else.

    Raises:
        CacheError: at construction, when the directory cannot be created or written.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._directory = Path(directory).expanduser().absolute()
        self._root = self._directory / "v1"
        self._root_name = str(self._root)
        try:
            self._root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self._root):
                pass
        except OSError as exc:
            raise CacheError(
                f"cache directory {str(self._directory)!r} cannot be created or written "
                f"({exc.strerror or exc}); choose a writable directory"
            ) from exc

    @property
    def directory(self) -> Path:
        """The directory given at construction, made absolute."""
        return self._directory

    def _data_path(self, key: str) -> Path:
        return Path(self._data_name(key))

    def _data_name(self, key: str) -> str:
        # A plain str path: the lookup path pays no pathlib object construction.
        return os.path.join(self._root_name, key[:2], key + ".pkl")

    def contains(self, key: str) -> bool:
        """Whether an entry file exists for ``key`` (its contents are not checked)."""
        return os.path.isfile(self._data_name(_check_key(key)))

    def read_bytes(self, key: str) -> bytes | None:
        """The pickled entry for ``key``, or ``None``; an unreadable file is deleted and logged."""
        path = self._data_name(_check_key(key))
        try:
            with open(path, "rb") as entry:
                blob = entry.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._drop_unreadable(key, exc)
            return None
        # Reads refresh the mtime prune() orders by; the file may be gone already
        # (pruned by another process), which leaves the blob just read intact.
        with contextlib.suppress(OSError):
            os.utime(path)
        return blob

    def write_bytes(self, key: str, blob: bytes, meta: dict[str, Any]) -> None:
        """Store ``blob`` under ``key`` with its JSON sidecar, each written and renamed atomically.

        ``meta`` supplies ``kind``, ``node_id`` and ``filter`` (and may supply ``created``).

        Raises:
            CacheError: the files could not be written (disk full, permissions).
        """
        path = self._data_path(_check_key(key))
        sidecar = {
            "key": key,
            "kind": meta.get("kind", "output"),
            "node_id": meta.get("node_id"),
            "filter": meta.get("filter"),
            "created": meta.get("created", time.time()),
            "size": len(blob),
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, blob)
            _write_atomically(
                path.with_suffix(".json"), json.dumps(sidecar, default=str).encode("utf-8")
            )
        except OSError as exc:
            raise CacheError(
                f"cannot write cache entry {key[:16]} to {path.parent}: {exc}"
            ) from exc

    def get(self, key: str) -> CacheHit | None:
        """Load the value stored under ``key``; a corrupt entry is a miss and is deleted."""
        start = time.perf_counter()
        blob = self.read_bytes(key)
        if blob is None:
            return None
        try:
            value = pickle.loads(blob)
        except ImportError as exc:
            # The entry is fine; this process lacks a module another one had. Keep it.
            cache_logger.warning(
                "cache entry %s needs a module this process cannot import (%s); treated as a miss",
                key[:16],
                exc,
            )
            return None
        except Exception as exc:  # unpickling corrupt bytes can raise nearly anything
            self._drop_unreadable(key, exc)
            return None
        return CacheHit(value, "disk", _elapsed_ms(start))

    def put(self, key: str, value: Any, meta: dict[str, Any]) -> None:
        """Pickle ``value`` and store it under ``key``.

        Raises:
            pickle.PicklingError: the value cannot be pickled (nothing is written).
            CacheError: the files could not be written.
        """
        self.write_bytes(key, dumps(value), meta)

    def delete(self, key: str) -> None:
        """Remove the entry for ``key`` if present."""
        path = self._data_path(_check_key(key))
        for target in (path, path.with_suffix(".json")):
            target.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every entry (and stray temporary files)."""
        for bucket in self._buckets():
            for entry in bucket.iterdir():
                entry.unlink(missing_ok=True)

    def stats(self) -> tuple[int, int]:
        """``(entries, bytes)`` over the pickled entry files."""
        entries = [size for _, size, _ in self._entries()]
        return len(entries), sum(entries)

    def prune(self, max_bytes: int) -> int:
        """Delete least-recently-used entries until the tier holds at most ``max_bytes``.

        Returns the number of entries removed.
        """
        _check_max_bytes(max_bytes)
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, path in entries:
            if total <= max_bytes:
                break
            self.delete(path.stem)
            total -= size
            removed += 1
        return removed

    def _buckets(self) -> list[Path]:
        if not self._root.is_dir():  # removed from outside; writes recreate it
            return []
        return [p for p in self._root.iterdir() if p.is_dir()]

    def _entries(self) -> list[tuple[float, int, Path]]:
        found = []
        for bucket in self._buckets():
            for path in bucket.glob("*.pkl"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue  # removed by another process while listing
                found.append((stat.st_mtime, stat.st_size, path))
        return found

    def _drop_unreadable(self, key: str, exc: BaseException) -> None:
        cache_logger.warning(
            "cache entry %s in %s is unreadable (%s: %s); deleted",
            key[:16],
            self._directory,
            type(exc).__name__,
            exc,
        )
        try:
            self.delete(key)
        except OSError as delete_exc:
            cache_logger.warning("cannot delete cache entry %s: %s", key[:16], delete_exc)


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)  # already gone after a successful rename


# --- the cache ----------------------------------------------------------------------------


class Cache:
    """The state and output cache: a memory LRU, plus a disk tier when ``directory`` is set.

    Thread-safe. Shared by passing the same object to several graphs.

    Raises:
        SomaConfigError: ``max_bytes`` is not an int >= 0.
        CacheError: ``directory`` cannot be created or written.
    """

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        self._memory = _MemoryTier(_check_max_bytes(max_bytes))
        self._disk = DiskTier(directory) if directory is not None else None
        self._lock = threading.Lock()
        self._counters = {"memory_hits": 0, "memory_misses": 0, "disk_hits": 0, "disk_misses": 0}
        self._unpicklable_warned: set[str | None] = set()

    def __repr__(self) -> str:
        return f"Cache(max_bytes={self.max_bytes}, directory={self.directory!r})"

    @property
    def directory(self) -> Path | None:
        """The disk tier's directory, or ``None`` when there is no disk tier."""
        return None if self._disk is None else self._disk.directory

    @property
    def max_bytes(self) -> int:
        """The memory tier's budget in bytes (0: no memory tier)."""
        return self._memory.max_bytes

    def lookup(self, key: str) -> CacheHit | None:
        """The entry for ``key`` from the fastest tier holding it, or ``None`` on a miss.

        A stored ``None`` is a hit. A disk hit is promoted to memory.
        """
        with self._lock:
            # Only checked keys are ever stored, so a hit proves the key valid; the
            # check (a regular expression) is left to misses.
            hit = self._memory.get(key) if isinstance(key, str) else None
            if hit is not None:
                self._counters["memory_hits"] += 1
                return hit
            _check_key(key)
            self._counters["memory_misses"] += 1
        if self._disk is None:
            return None
        hit = self._disk.get(key)  # unpickled outside the lock: it may take a while
        if hit is None:
            with self._lock:
                self._counters["disk_misses"] += 1
            return None
        size = estimate_size(hit.value) if self._memory.max_bytes > 0 else 0
        with self._lock:
            self._counters["disk_hits"] += 1
            if self._memory.max_bytes > 0:
                self._memory.put(key, hit.value, size)
        return hit

    def get(self, key: str, default: Any = None) -> Any:
        """The value for ``key``, or ``default`` on a miss (counts like ``lookup``)."""
        hit = self.lookup(key)
        return default if hit is None else hit.value

    def contains(self, key: str) -> bool:
        """Whether any tier holds ``key``; touches neither counters nor recency."""
        _check_key(key)
        with self._lock:
            if key in self._memory:
                return True
        return self._disk is not None and self._disk.contains(key)

    def put(
        self,
        key: str,
        value: Any,
        *,
        kind: str = "output",
        node_id: str | None = None,
        filter_name: str | None = None,
    ) -> None:
        """Store ``value`` under ``key`` in every tier.

        An unpicklable value stays in memory only, with one ``SomaWarning`` per node id;
        a failed disk write is logged on ``soma.cache`` and never raised.
        """
        _check_key(key)
        if kind not in _KINDS:
            raise SomaConfigError(f"invalid cache entry kind {kind!r}: use 'state' or 'output'")
        if self._memory.max_bytes > 0:
            size = estimate_size(value)
            with self._lock:
                self._memory.put(key, value, size)
        if self._disk is None:
            return
        try:
            blob = dumps(value)
        except pickle.PicklingError as exc:
            self._warn_unpicklable(node_id, exc)
            return
        meta = {"kind": kind, "node_id": node_id, "filter": filter_name}
        try:
            self._disk.write_bytes(key, blob, meta)
        except CacheError as exc:
            cache_logger.warning("%s; the entry stays in memory only", exc)

    def clear(self, disk: bool = False) -> None:
        """Empty the memory tier, and the disk tier too when ``disk`` is true."""
        with self._lock:
            self._memory.clear()
        if disk and self._disk is not None:
            self._disk.clear()

    def prune(self, max_bytes: int) -> int:
        """Delete least-recently-used disk entries until the disk tier fits ``max_bytes``.

        Returns the number of entries removed (0 without a disk tier).

        Raises:
            SomaConfigError: ``max_bytes`` is not an int >= 0.
        """
        _check_max_bytes(max_bytes)
        return 0 if self._disk is None else self._disk.prune(max_bytes)

    def info(self) -> dict[str, Any]:
        """Entry counts, sizes and hit/miss counters per tier (api §6.5)."""
        with self._lock:
            memory = {
                "entries": len(self._memory),
                "bytes": self._memory.bytes,
                "max_bytes": self._memory.max_bytes,
                "hits": self._counters["memory_hits"],
                "misses": self._counters["memory_misses"],
            }
            disk_hits, disk_misses = self._counters["disk_hits"], self._counters["disk_misses"]
        if self._disk is None:
            return {"memory": memory, "disk": None}
        entries, size = self._disk.stats()
        disk = {
            "path": str(self._disk.directory),
            "entries": entries,
            "bytes": size,
            "hits": disk_hits,
            "misses": disk_misses,
        }
        return {"memory": memory, "disk": disk}

    def _warn_unpicklable(self, node_id: str | None, exc: pickle.PicklingError) -> None:
        with self._lock:
            if node_id in self._unpicklable_warned:
                return
            self._unpicklable_warned.add(node_id)
        where = f"node {node_id!r}" if node_id is not None else "an entry"
        warnings.warn(
            f"the cached value of {where} cannot be pickled ({exc}); it stays in memory "
            "only and will not reach the disk tier",
            SomaWarning,
            stacklevel=3,
        )
