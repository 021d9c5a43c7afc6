"""The worker's cache of opaque blobs under client-computed keys (worker spec §6.5).

    get(key) ──▶ memory LRU (--cache-bytes) ──miss──▶ disk tier (--cache-dir) ──hit──▶ into memory
    put(key, blob) ──▶ memory (within budget) and disk

Blobs are the child's pickles of states and outputs (isolation.md §3.4), stored and handed
back as bytes: the worker never unpickles one. The disk tier is ``soma.runtime.cache.DiskTier``,
the api.md §6.3 layout, so a directory shared with clients and other workers is hit from every
side. A cache is an optimisation: any disk failure (unwritable directory, full disk) logs a
WARNING and the plan goes on as if the entry were missing.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from soma.errors import CacheError, SomaConfigError
from soma.log import worker_logger
from soma.runtime.cache import DiskTier

__all__ = ["BlobCache", "BlobHit"]


@dataclass(frozen=True)
class BlobHit:
    """A cached blob, the tier that served it (``memory``/``disk``), load time and the summary if known."""

    blob: bytes
    tier: str
    load_time_ms: int
    summary: str | None = None


class BlobCache:
    """A thread-safe memory LRU of blobs over an optional shared disk tier.

    ``max_bytes`` bounds the memory tier (0 turns it off; a blob larger than the budget is
    not kept in memory). ``directory`` enables the disk tier; one that cannot be used is
    reported with a WARNING and the cache runs in memory only.
    """

    def __init__(self, max_bytes: int, directory: str | os.PathLike[str] | None = None) -> None:
        if type(max_bytes) is not int or max_bytes < 0:
            raise SomaConfigError(f"cache max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._memory: collections.OrderedDict[str, tuple[bytes, str | None]] = collections.OrderedDict()
        self._memory_bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.disk: DiskTier | None = None
        if directory is not None:
            try:
                self.disk = DiskTier(directory)
            except CacheError as exc:
                worker_logger.warning("cache: disk tier disabled, entries stay in memory only: %s", exc)

    def get(self, key: str) -> BlobHit | None:
        """The blob stored under ``key``, or ``None``. Disk errors count as a miss (WARNING)."""
        start = time.perf_counter()
        with self._lock:
            entry = self._memory.get(key)
            if entry is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return BlobHit(entry[0], "memory", _elapsed_ms(start), entry[1])
        blob = self._read_disk(key)
        with self._lock:
            if blob is None:
                self.misses += 1
                return None
            self.hits += 1
            self._remember(key, blob, None)
        return BlobHit(blob, "disk", _elapsed_ms(start))

    def holds(self, key: str) -> bool:
        """Whether the memory tier has ``key`` now (no disk access, not counted as a lookup)."""
        with self._lock:
            return key in self._memory

    def put(self, key: str, blob: bytes, *, kind: str, node_id: str | None, summary: str | None = None) -> None:
        """Store ``blob`` under ``key`` in every tier; ``kind`` is ``state`` or ``output``.

        ``summary`` (the value's ``output_summary``) is kept beside the memory entry so a hit can
        report it without unpickling. A disk failure logs a WARNING and is otherwise ignored.
        """
        with self._lock:
            self._remember(key, blob, summary)
        if self.disk is None:
            return
        try:
            self.disk.write_bytes(key, blob, {"kind": kind, "node_id": node_id, "filter": None})
        except (CacheError, OSError) as exc:
            worker_logger.warning("cache: entry %s not written to disk, the plan goes on: %s", key[:16], exc)

    def info(self) -> dict[str, Any]:
        """``{entries, bytes, max_bytes, hits, misses, disk}`` of the memory tier; ``disk`` is the path or None."""
        with self._lock:
            return {
                "entries": len(self._memory),
                "bytes": self._memory_bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "disk": str(self.disk.directory) if self.disk is not None else None,
            }

    def _read_disk(self, key: str) -> bytes | None:
        if self.disk is None:
            return None
        try:
            return self.disk.read_bytes(key)
        except (CacheError, OSError) as exc:
            worker_logger.warning("cache: entry %s not read from disk, treated as a miss: %s", key[:16], exc)
            return None

    def _remember(self, key: str, blob: bytes, summary: str | None) -> None:
        size = len(blob)
        old = self._memory.pop(key, None)
        if old is not None:
            self._memory_bytes -= len(old[0])
        if size > self.max_bytes:
            return
        self._memory[key] = (blob, summary)
        self._memory_bytes += size
        while self._memory_bytes > self.max_bytes:
            _, (dropped, _) = self._memory.popitem(last=False)
            self._memory_bytes -= len(dropped)


def _elapsed_ms(start: float) -> int:
    return int((time.perf_counter() - start) * 1000)
