"""Values by reference or inline (worker spec §4.5): what comes in is resolved, what goes out is
stored once it reaches the inline threshold.

Inbound, ``Pins.resolve`` turns ``InlineRef``, ``LocalRef`` and ``CachedRef`` into values and keeps
their store files pinned until the request ends. Outbound, ``outbound`` returns a value as is, or
a ``LocalRef`` (v1) or ``CachedRef`` (v2) to a stored copy; ``encodes_quickly`` tells when a result
is so small that encoding it on the event loop beats a thread hop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from soma.isolation.markers import Handle, Opaque
from soma.wire import v1, v2
from soma.wire.errors import WireError
from soma.wire.messages import CachedRef, InlineRef, LocalRef, S3Ref, StreamRef, ZarrRef
from soma.worker.failures import Failed, error_info
from soma.worker.store import Pin, Store, StoredValue, StoreError

__all__ = ["REFERENCES", "Pins", "encodes_quickly", "outbound", "outbound_map"]


class Pins:
    """Resolves references of one request and keeps their store files pinned until it ends."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pins: list[Pin] = []

    async def __aenter__(self) -> Pins:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Unpin every store file this request resolved (idempotent)."""
        for pin in self._pins:
            pin.release()
        self._pins.clear()

    def resolve(self, value: Any, what: str) -> Any:
        """The value a reference names (blocking file I/O), or ``value`` itself if it is none.

        Raises ``Failed`` with ``forbidden_path``, ``unresolved_reference`` (naming the
        reference and the places searched), ``unsupported_reference`` or ``encoding_error``.
        """
        if isinstance(value, InlineRef):
            return value.value
        if isinstance(value, S3Ref | ZarrRef | StreamRef):
            raise Failed(
                error_info("unsupported_reference", f"{what}: {value.type} references are not supported by this worker")
            )
        try:
            if isinstance(value, LocalRef):
                stored = self._store.resolve_local(value.path)
            elif isinstance(value, CachedRef):
                stored = self._store.find_cached(value.cache_key)
            else:
                return value
        except StoreError as exc:
            raise Failed(error_info(exc.code, f"{what}: {exc}")) from None
        if stored.key is not None:
            self._pins.append(self._store.pin(stored.key))
            if stored.kind == "soma":
                value = self._store.recent.get(stored.key, _NOT_KEPT)
                if value is not _NOT_KEPT:
                    return value
        try:
            return _decode_stored(stored)
        except (WireError, ValueError, OSError, msgpack.UnpackException) as exc:
            raise Failed(error_info("encoding_error", f"{what}: cannot decode {stored.path}: {exc}")) from None


_NOT_KEPT = object()
_QUICK_ITEMS = 256
_QUICK_BYTES = 64 << 10


def encodes_quickly(values: Sequence[Any], threshold: int) -> bool:
    """Whether ``values`` are so small that encoding them beats a thread hop, and none is stored.

    At most ``_QUICK_ITEMS`` scalars, strings, small arrays or blobs, whose bound on the
    encoded size (32 bytes an item, strings as escaped JSON) stays under ``_QUICK_BYTES``
    and under ``threshold``, so ``outbound`` writes no file.
    """
    limit = min(_QUICK_BYTES, threshold)
    items = 0
    size = 0
    stack = list(values)
    while stack:
        value = stack.pop()
        items += 1
        size += 32
        if isinstance(value, str):
            size += 12 * len(value)
        elif isinstance(value, bytes):
            size += 2 * len(value)
        elif isinstance(value, list | tuple | dict):
            if items + len(stack) + 2 * len(value) > _QUICK_ITEMS:
                return False
            stack.extend(value.items() if isinstance(value, dict) else value)
        elif isinstance(value, Opaque):
            if value.buffers or not isinstance(value.data, bytes):
                return False
            size += 2 * len(value.data)
        elif isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                return False
            size += 2 * value.nbytes
        elif not (value is None or isinstance(value, bool | int | float | Handle | np.generic)):
            return False
        if items > _QUICK_ITEMS or size >= limit:
            return False
    return True


REFERENCES = (InlineRef, LocalRef, CachedRef, S3Ref, ZarrRef, StreamRef)
"""What ``Pins.resolve`` turns into values; anything else passes through unchanged."""


def _decode_stored(stored: StoredValue) -> Any:
    if stored.kind == "npy":
        return np.asarray(stored.load_array())
    data = stored.read_bytes()
    if stored.kind == "soma":
        return v2.decode_value_frame(data, "worker")
    if stored.kind == "json":
        return v1.decode_value(json.loads(data))
    return v1.decode_value(msgpack.unpackb(data, raw=False, strict_map_key=False))


def outbound(store: Store, threshold: int, value: Any, dialect: str, *, state: bool = False) -> Any:
    """``value`` itself, or a reference to a copy stored in ``store`` when it reaches ``threshold`` bytes (§4.5).

    Runs in a thread (encoding and writing). v1 states have no reference slot and stay inline;
    a value that cannot travel in the dialect raises ``Failed`` (``encoding_error``).
    """
    try:
        if dialect == "v1":
            if state:
                return value
            encoded = v1.encode_value(value, "output")
            body = json.dumps(encoded, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
            if len(body) < threshold:
                return value
            return LocalRef(path=str(store.path_for(store.put_bytes(body, ".json"))))
        size, parts = v2.measure_value_frame(value)
        if size < threshold:
            return value
        # Stored part by part: arrays are never joined into one copy of the frame.
        key = store.put_parts(parts, ".soma")
        return CachedRef(cache_key=key, size=sum(memoryview(part).nbytes for part in parts))
    except WireError as exc:
        raise Failed(error_info(exc.code, exc.message)) from None
    except StoreError as exc:
        raise Failed(error_info(exc.code, f"a large result could not be stored: {exc}")) from None

def outbound_map(store: Store, threshold: int, values: Mapping[str, Any], dialect: str) -> dict[str, Any]:
    """Each value of a state or gradient map by ``outbound`` (v1 values stay inline)."""
    if dialect == "v1":
        return dict(values)
    return {name: outbound(store, threshold, value, dialect) for name, value in values.items()}
