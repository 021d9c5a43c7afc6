"""The worker's upload/output store and the read-only data store (worker spec §4.3–§4.4).

Layout of the temp dir (``--temp-dir``), owned by one worker at a time::

    <root>/soma-worker.lock        flock held by the owning worker (holds its pid)
    <root>/incoming/               bodies being written; renamed into store/ once hashed
    <root>/store/<key>.<suffix>    one file per value, suffix .json (v1), .soma (v2) or .msgpack

``key`` is the hex SHA-256 of (body length as u64 little-endian ‖ body), the Soma 0.2.43
rule, so identical bodies share one file. A file's last access is its mtime (set on
creation, ``touch`` and ``unpin``); ``sweep`` deletes files idle longer than the TTL that
no in-flight request pins, then evicts least recently used files beyond ``max_bytes``.

References resolve only inside the store or the data-store root (realpath, so ``..``
and symlinks cannot leave them). Values are returned undecoded, as a ``StoredValue``
with a sniffed ``kind``; decoding is the wire codecs' job. ``Store.recent`` keeps values
decoded lately by key, so that an upload is decoded once rather than again by each plan.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal

from soma.digests import parts_digest
from soma.errors import SomaConfigError, SomaError
from soma.log import worker_logger

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "STORE_SUFFIXES",
    "BadRequest",
    "BodyTooLarge",
    "DiskLow",
    "ForbiddenPath",
    "Pin",
    "RecentValues",
    "Store",
    "StoreError",
    "StoreLocked",
    "StoredValue",
    "UnreadableValue",
    "UnresolvedReference",
    "Upload",
    "store_key",
]

STORE_SUFFIXES = (".soma", ".json", ".msgpack")
"""Suffixes of store files, in lookup order."""

_DATA_STORE_SUFFIXES = (".soma", ".json", ".npy", "")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024
_PARALLEL_HASH_BYTES = 8 * _CHUNK
RECENT_BYTES = 256 * _CHUNK
"""Default budget of ``Store.recent``: the encoded bytes of the decoded values it keeps."""
_LOCK_NAME = "soma-worker.lock"
_REMEMBERED_DIGESTS = 1024
GIB = 1024**3

ValueKind = Literal["soma", "json", "msgpack", "npy"]


# --------------------------------------------------------------------------- errors


class StoreError(SomaError):
    """Base of store failures; ``code`` and ``http_status`` say how the server answers."""

    code = "internal"
    http_status = 500


class ForbiddenPath(StoreError):
    """Raised for a ``Local`` path outside the store and the data-store root (after resolving
    symlinks and ``..``), or a relative one."""

    code = "forbidden_path"
    http_status = 403


class UnresolvedReference(StoreError):
    """Raised when a reference names nothing (or an empty file); the message names the
    reference and every directory searched."""

    code = "unresolved_reference"
    http_status = 404

    def __init__(self, reference: str, searched: Iterable[str | Path], reason: str = "not found") -> None:
        self.reference = reference
        self.searched = tuple(str(place) for place in searched)
        super().__init__(f"unresolved reference {reference}: {reason} (searched {', '.join(self.searched)})")


class BadRequest(StoreError):
    """Raised for a malformed cache key or an empty body."""

    code = "bad_message"
    http_status = 400


class UnreadableValue(StoreError):
    """Raised when a data-store file cannot be read as what it claims to be (an object-dtype
    or corrupt ``.npy``)."""

    code = "encoding_error"
    http_status = 400


class BodyTooLarge(StoreError):
    """Raised when a body exceeds the upload limit (declared or while streaming)."""

    code = "too_large"
    http_status = 413


class DiskLow(StoreError):
    """Raised when free disk under the store is below max(1 GiB, 5 %)."""

    code = "disk_low"
    http_status = 507


class StoreLocked(SomaConfigError):
    """Raised when another worker already owns the temp dir; give each worker its own ``--temp-dir``."""


# --------------------------------------------------------------------------- values


def store_key(body: bytes) -> str:
    """The store key of ``body``: hex SHA-256 of (length as u64 LE ‖ body)."""
    return hashlib.sha256(struct.pack("<Q", len(body)) + body).hexdigest()


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key.lower()):
        raise BadRequest(f"invalid cache key {key!r}: expected 64 hexadecimal digits")
    return key.lower()


def _sniff(path: Path) -> ValueKind:
    if path.suffix == ".npy":
        return "npy"
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(b"SOMA"):
        return "soma"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    return "json" if head.lstrip()[:1] == b"{" else "msgpack"


@dataclass(frozen=True)
class StoredValue:
    """A resolved value file, undecoded: ``kind`` is ``soma`` (v2 frame), ``json`` (v1 Value),
    ``msgpack`` (named-map Value) or ``npy`` (a numpy array file). ``key`` is the store key
    when the file lives in the store (pin it while in use), ``None`` in the data store."""

    path: Path
    kind: ValueKind
    size: int
    key: str | None = None

    def read_bytes(self) -> bytes:
        """The file's bytes (for ``soma``, ``json`` and ``msgpack`` values)."""
        return self.path.read_bytes()

    def load_array(self) -> np.ndarray[Any, Any]:
        """A read-only memory map of an ``npy`` value (``allow_pickle=False``)."""
        import numpy as np

        if self.kind != "npy":
            raise UnreadableValue(f"{self.path} holds a {self.kind} value, not an .npy array")
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)  # type: ignore[no-any-return]
        except (ValueError, OSError, EOFError) as exc:
            raise UnreadableValue(f"{self.path} is not a plain .npy array: {exc}") from exc


# --------------------------------------------------------------------------- writing


class Upload:
    """A body being written to ``incoming/`` while it is hashed; ``commit`` moves it into the store.

    Use as a context manager: leaving the block without ``commit`` (or with an exception)
    removes the partial file.
    """

    def __init__(self, store: Store, suffix: str, *, size: int | None, limit: int | None) -> None:
        self._store = store
        self._suffix = suffix
        self._size = size
        self._limit = limit
        self._written = 0
        # With the length known up front, the key is hashed while streaming; otherwise
        # (or if the body turns out longer or shorter) the file is hashed again at commit.
        self._hasher = hashlib.sha256(struct.pack("<Q", size)) if size is not None else None
        fd, name = tempfile.mkstemp(dir=store.incoming_dir, suffix=".part")
        self._path = Path(name)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")

    @property
    def written(self) -> int:
        """Bytes written so far."""
        return self._written

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append ``chunk``; raises ``BodyTooLarge`` (and discards the upload) past the limit."""
        if self._file is None:
            raise StoreError("upload already committed or aborted")
        size = memoryview(chunk).nbytes
        if self._limit is not None and self._written + size > self._limit:
            self.abort()
            raise BodyTooLarge(f"body larger than the upload limit of {self._limit} bytes")
        hasher = self._hasher
        if hasher is not None and size >= _PARALLEL_HASH_BYTES:
            # Hashing and writing both release the GIL: overlapping them hides the shorter one.
            hashing = threading.Thread(target=hasher.update, args=(chunk,), name="soma-store-hash")
            hashing.start()
            try:
                self._file.write(chunk)
            finally:
                hashing.join()
        else:
            self._file.write(chunk)
            if hasher is not None:
                hasher.update(chunk)
        self._written += size

    def commit(self) -> str:
        """Finish the body and return its key; an identical stored body is reused (dedupe)."""
        if self._file is None:
            raise StoreError("upload already committed or aborted")
        self._file.close()
        self._file = None
        if self._written == 0:
            self._path.unlink(missing_ok=True)
            raise BadRequest("empty body: a stored value is never empty")
        if self._hasher is not None and self._written == self._size:
            key = self._hasher.hexdigest()
        else:
            hasher = hashlib.sha256(struct.pack("<Q", self._written))
            with self._path.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    hasher.update(chunk)
            key = hasher.hexdigest()
        self._store._adopt(self._path, key, self._suffix)
        return key

    def abort(self) -> None:
        """Discard the partial body (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path.unlink(missing_ok=True)

    def __enter__(self) -> Upload:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None or exc_type is not None:
            self.abort()


class Pin:
    """A hold on a store key that keeps ``sweep`` away from its file; ``release`` (or leaving
    the ``with`` block) undoes it once."""

    def __init__(self, store: Store, key: str) -> None:
        self._store = store
        self.key = key
        self._held = True

    def release(self) -> None:
        """Unpin the key (idempotent)."""
        if self._held:
            self._held = False
            self._store.unpin(self.key)

    def __enter__(self) -> Pin:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class RecentValues:
    """Values decoded lately, by store key: an upload is decoded once, not again at each use.

    A store key is the hash of the file's bytes, so a value kept under a key always matches
    the file of that key; callers still resolve (and pin) the reference first, so a swept
    file stays unresolvable. Least recently used values go first once the encoded sizes of
    those kept pass ``max_bytes``. Thread-safe. The values are shared: never mutate them.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._values: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, default: Any = None) -> Any:
        """The value kept under ``key``, else ``default``."""
        with self._lock:
            entry = self._values.get(key)
            if entry is None:
                return default
            self._values.move_to_end(key)
            return entry[0]

    def put(self, key: str, value: Any, size: int) -> None:
        """Keep ``value`` (``size`` encoded bytes) under ``key``; one larger than the budget is not kept."""
        with self._lock:
            self._drop(key)
            if size > self.max_bytes:
                return
            while self._values and self._bytes + size > self.max_bytes:
                self._drop(next(iter(self._values)))
            self._values[key] = (value, size)
            self._bytes += size

    def discard(self, key: str) -> None:
        """Forget ``key`` (its file was deleted)."""
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._values.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]


# --------------------------------------------------------------------------- the store


class Store:
    """Content-addressed value files under ``<root>/store`` with TTL and LRU cleanup.

    ``ttl`` (seconds) is ``--store-ttl``; ``max_bytes`` is ``--store-max-bytes``;
    ``data_store`` the read-only ``--data-store`` root. Call ``open()`` (or use ``with``)
    before anything else: it takes the temp-dir lock and removes leftovers. Thread-safe;
    file I/O blocks, so call it from a thread inside an event loop.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        ttl: float,
        max_bytes: int | None = None,
        data_store: str | os.PathLike[str] | None = None,
        min_free_bytes: int = GIB,
        min_free_fraction: float = 0.05,
        recent_bytes: int = RECENT_BYTES,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise SomaConfigError(f"store ttl must be a positive number of seconds, got {ttl!r}")
        valid_max = isinstance(max_bytes, int) and not isinstance(max_bytes, bool) and max_bytes >= 0
        if max_bytes is not None and not valid_max:
            raise SomaConfigError(f"store max_bytes must be an int >= 0 or None, got {max_bytes!r}")
        # Resolved once, so paths handed out compare equal to realpaths of references.
        self.root = Path(os.path.realpath(root))
        self.store_dir = self.root / "store"
        self.incoming_dir = self.root / "incoming"
        self.ttl = float(ttl)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.min_free_fraction = min_free_fraction
        self.data_store: Path | None = None
        self.deleted_total = 0
        self._lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self._lock_fd: int | None = None
        self.recent = RecentValues(recent_bytes)
        # Fast digests of bodies stored lately, with their keys (see put_parts).
        self._digests: OrderedDict[bytes, str] = OrderedDict()
        self.set_data_store(data_store)

    # ---- lifecycle

    def open(self) -> Store:
        """Create the directories, take the temp-dir lock, remove partial uploads and files idle
        longer than the TTL. Raises ``StoreLocked`` if another worker owns the directory."""
        self.acquire_lock()
        for leftover in self.incoming_dir.iterdir():
            leftover.unlink(missing_ok=True)
        self.sweep()
        return self

    def acquire_lock(self) -> None:
        """Take ``<root>/soma-worker.lock`` (flock), so two workers never share a temp dir."""
        if self._lock_fd is not None:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise StoreLocked(
                f"temp dir {self.root} is in use by another worker (pid {owner}); "
                "give each worker its own --temp-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Release the temp-dir lock (files stay; the next owner's ``open`` applies the TTL)."""
        if self._lock_fd is not None:
            # The lock file is kept: unlinking it would let a waiter lock a dead inode.
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def set_data_store(self, path: str | os.PathLike[str] | None) -> None:
        """Point at a read-only data root (``None`` for none); it must be an existing directory."""
        if path is None:
            self.data_store = None
            return
        resolved = Path(os.path.realpath(Path(path).expanduser()))
        if not resolved.is_dir():
            raise SomaConfigError(f"data store {str(path)!r} is not a directory")
        self.data_store = resolved

    # ---- writing

    def open_upload(self, suffix: str, *, size: int | None = None, limit: int | None = None) -> Upload:
        """Start writing a body stored as ``<key><suffix>``.

        ``size`` is the announced length (``Content-Length``), if any; ``limit`` the largest
        body accepted. Raises ``BodyTooLarge`` when ``size > limit``, ``DiskLow`` when the
        disk is nearly full.
        """
        if self._lock_fd is None:
            raise StoreError(f"store {self.root} is not open: call open() first")
        if suffix not in STORE_SUFFIXES:
            raise SomaConfigError(f"store suffix must be one of {', '.join(STORE_SUFFIXES)}, got {suffix!r}")
        if size is not None and limit is not None and size > limit:
            raise BodyTooLarge(f"body of {size} bytes is larger than the upload limit of {limit} bytes")
        if self.disk_low():
            raise DiskLow(f"free disk space under {self.root} is below max(1 GiB, 5 %)")
        return Upload(self, suffix, size=size, limit=limit)

    def put_stream(
        self,
        source: Iterable[bytes] | IO[bytes],
        suffix: str,
        *,
        size: int | None = None,
        limit: int | None = None,
    ) -> str:
        """Store a body read from an iterable of chunks or a binary file; return its key."""
        with self.open_upload(suffix, size=size, limit=limit) as upload:
            if hasattr(source, "read"):
                while chunk := source.read(_CHUNK):
                    upload.write(chunk)
            else:
                for chunk in source:
                    upload.write(chunk)
            return upload.commit()

    def put_bytes(self, body: bytes | bytearray | memoryview, suffix: str) -> str:
        """Store ``body`` (an upload or a worker output); return its key."""
        return self.put_parts([body], suffix)

    def put_parts(self, parts: Sequence[bytes | bytearray | memoryview], suffix: str) -> str:
        """Store the concatenation of ``parts`` (an encoded frame) without joining them; return its key.

        A body stored lately is recognised by a fast digest (XXH3-128 and length) and its
        file only touched: a value returned again (a cache hit served twice) is neither
        hashed with SHA-256 nor written again.
        """
        size = sum(memoryview(part).nbytes for part in parts)
        digest = parts_digest(parts, salt=suffix.encode())
        with self._lock:
            known = self._digests.get(digest)
        if known is not None and self.touch(known):
            return known
        with self.open_upload(suffix, size=size) as upload:
            for part in parts:
                upload.write(part)
            key = upload.commit()
        with self._lock:
            self._digests[digest] = key
            self._digests.move_to_end(digest)
            while len(self._digests) > _REMEMBERED_DIGESTS:
                self._digests.popitem(last=False)
        return key

    def _adopt(self, partial: Path, key: str, suffix: str) -> None:
        with self._lock:
            existing = self._stored_path(key)
            if existing is not None:
                partial.unlink(missing_ok=True)
                os.utime(existing)
            else:
                os.replace(partial, self.store_dir / f"{key}{suffix}")

    # ---- reading

    def _stored_path(self, key: str) -> Path | None:
        for suffix in STORE_SUFFIXES:
            candidate = self.store_dir / f"{key}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    def path_for(self, key: str) -> Path:
        """The store file of ``key`` (absolute). Raises ``UnresolvedReference`` if absent."""
        key = _check_key(key)
        path = self._stored_path(key)
        if path is None:
            raise UnresolvedReference(f'Cached{{cache_key: "{key}"}}', [self.store_dir])
        return path

    def _describe(self, path: Path, reference: str) -> StoredValue:
        size = path.stat().st_size
        if size == 0:
            raise UnresolvedReference(reference, [path.parent], reason=f"{path} is empty")
        key = path.name.partition(".")[0]
        in_store = path.parent == self.store_dir and _KEY_RE.match(key)
        return StoredValue(path=path, kind=_sniff(path), size=size, key=key if in_store else None)

    def resolve_local(self, path: str | os.PathLike[str]) -> StoredValue:
        """Resolve a ``Local{path}`` reference.

        The realpath must lie inside the store or the data-store root, else ``ForbiddenPath``
        (checked before existence, so nothing leaks about other files); a missing or empty
        file is ``UnresolvedReference``.
        """
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise BadRequest(f"invalid Local path {path!r}")
        given = Path(path)
        roots = [self.store_dir]
        if self.data_store is not None:
            roots.append(self.data_store)
        places = " or ".join(str(root) for root in roots)
        if not given.is_absolute():
            raise ForbiddenPath(f"forbidden path {str(path)!r}: only absolute paths inside {places} resolve")
        real = Path(os.path.realpath(given))
        if not any(real.is_relative_to(root) for root in roots):
            raise ForbiddenPath(f"forbidden path {str(path)!r}: outside {places}")
        reference = f'Local{{path: "{path}"}}'
        if not real.is_file():
            raise UnresolvedReference(reference, [real.parent])
        return self._describe(real, reference)

    def find_cached(self, key: str) -> StoredValue:
        """Resolve a ``Cached{cache_key}`` reference: the store, then the data store
        (``<data-store>/<key>.soma|.json|.npy|<key>``).

        Raises ``BadRequest`` for a malformed key and ``UnresolvedReference`` naming the key
        and both directories when nothing matches.
        """
        key = _check_key(key)
        reference = f'Cached{{cache_key: "{key}"}}'
        found = self._stored_path(key)
        searched = [self.store_dir]
        if found is None and self.data_store is not None:
            searched.append(self.data_store)
            for suffix in _DATA_STORE_SUFFIXES:
                candidate = self.data_store / f"{key}{suffix}"
                if candidate.is_file():
                    found = candidate
                    break
        if found is None:
            raise UnresolvedReference(reference, searched)
        return self._describe(found, reference)

    # ---- access times and pins

    def touch(self, key: str) -> bool:
        """Record an access to ``key`` now; ``False`` if it is not in the store."""
        with self._lock:
            path = self._stored_path(_check_key(key))
            if path is None:
                return False
            os.utime(path)
            return True

    def pin(self, key: str) -> Pin:
        """Keep ``key``'s file through sweeps until the returned ``Pin`` is released (pins nest).

        Also records an access. Use ``with store.pin(key):`` or call ``unpin(key)`` later.
        """
        key = _check_key(key)
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
            path = self._stored_path(key)
            if path is not None:
                os.utime(path)
        return Pin(self, key)

    def unpin(self, key: str) -> None:
        """Undo one ``pin(key)`` and record an access (the end of its use)."""
        key = _check_key(key)
        with self._lock:
            count = self._pins.get(key, 0)
            if count == 0:
                raise StoreError(f"store key {key} is not pinned")
            if count == 1:
                del self._pins[key]
            else:
                self._pins[key] = count - 1
            path = self._stored_path(key)
            if path is not None:
                os.utime(path)

    def is_pinned(self, key: str) -> bool:
        """Whether an in-flight request holds ``key``."""
        return _check_key(key) in self._pins

    # ---- cleanup and accounting

    def _entries(self) -> list[tuple[str, Path, os.stat_result]]:
        entries: list[tuple[str, Path, os.stat_result]] = []
        if not self.store_dir.is_dir():
            return entries
        for path in self.store_dir.iterdir():
            key, _, suffix = path.name.partition(".")
            if _KEY_RE.match(key) and f".{suffix}" in STORE_SUFFIXES:
                try:
                    entries.append((key, path, path.stat()))
                except FileNotFoundError:
                    continue
        return entries

    def sweep(self, now: float | None = None) -> int:
        """Delete files idle longer than the TTL, then the least recently used beyond ``max_bytes``;
        pinned files are never deleted. Returns the number of files deleted."""
        now = time.time() if now is None else now
        deleted = 0
        with self._lock:
            kept = []
            for key, path, stat in self._entries():
                if key not in self._pins and now - stat.st_mtime > self.ttl:
                    deleted += self._unlink(path, "idle")
                    self.recent.discard(key)
                else:
                    kept.append((key, path, stat))
            if self.max_bytes is not None:
                total = sum(stat.st_size for _, _, stat in kept)
                for key, path, stat in sorted(kept, key=lambda entry: entry[2].st_mtime):
                    if total <= self.max_bytes:
                        break
                    if key not in self._pins and self._unlink(path, "over max_bytes"):
                        self.recent.discard(key)
                        deleted += 1
                        total -= stat.st_size
            self.deleted_total += deleted
        return deleted

    @staticmethod
    def _unlink(path: Path, reason: str) -> int:
        try:
            path.unlink()
        except FileNotFoundError:
            return 0
        worker_logger.debug("store: deleted %s (%s)", path.name, reason)
        return 1

    def bytes_used(self) -> int:
        """Total size of the store's files."""
        return sum(stat.st_size for _, _, stat in self._entries())

    def disk_low(self) -> bool:
        """Whether free space under the store is below max(``min_free_bytes``, ``min_free_fraction``)."""
        existing = next(path for path in (self.root, *self.root.parents) if path.exists())
        usage = shutil.disk_usage(existing)
        return usage.free < max(self.min_free_bytes, self.min_free_fraction * usage.total)
