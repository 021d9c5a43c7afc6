"""The child's two walks over channel values (isolation.md §3.2, §3.3), and cache blobs.

``materialise`` turns a request value into objects (markers resolved), ``neutralise``
turns a reply value into neutral values (tensors to ``TorchData``, anything else
the parent may not unpickle to ``Opaque``). Kept apart from the command handlers
because the local subprocess runner decodes child replies with the same walk, so
one definition of the channel's values serves both sides. ``reduce_neutral`` lets a
reply be pickled as it is when it is neutral already, sparing the walk.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import cloudpickle

from soma.isolation import channel
from soma.isolation.child_errors import VERSION_SKEW_HINT, CommandError
from soma.isolation.markers import Concat, Handle, Opaque, TorchData
from soma.isolation.tensors import is_ndarray, is_plain_tensor, tensor_from_marker, tensor_to_marker
from soma.runtime import batching

__all__ = ["NeedsNeutralising", "cache_blob", "materialise", "neutralise", "reduce_neutral"]

_LEAF_TYPES = frozenset({type(None), bool, int, float, str, bytes})


def materialise(value: Any, handles: Mapping[str, Any]) -> Any:
    """Turn a request value into objects: markers resolved, containers rebuilt only if needed.

    ``Handle`` markers are looked up in ``handles``. Raises ``CommandError``
    (``unpickle_error`` for an ``Opaque`` that cannot be loaded here, ``bad_request``
    for an unknown handle or a malformed ``TorchData``).
    """
    kind = type(value)
    if kind in _LEAF_TYPES:
        return value
    if kind is list or kind is tuple:
        if _leaves_only(value):
            return value
        items = [materialise(item, handles) for item in value]
        return items if kind is list else tuple(items)
    if kind is dict:
        if _leaves_only(value.values()):
            return value
        return {key: materialise(item, handles) for key, item in value.items()}
    if kind is Opaque:
        try:
            return cloudpickle.loads(value.data, buffers=value.buffers)
        except BaseException as exc:  # unpickling runs user code (__setstate__, reducers)
            raise CommandError(
                "unpickle_error",
                f"cannot unpickle a value: {type(exc).__name__}: {exc}; a module it needs may be "
                f"missing in the child ({sys.executable}), or {VERSION_SKEW_HINT}",
            ) from exc
    if kind is TorchData:
        return tensor_from_marker(value)
    if kind is Handle:
        try:
            return handles[value.name]
        except KeyError:
            raise CommandError("bad_request", f"unknown handle {value.name!r} (LOAD clears handles)") from None
    if kind is Concat:
        return batching.concat_chunks([materialise(item, handles) for item in value.items])
    return value


def neutralise(value: Any, node_id: str | None) -> Any:
    """Turn a reply value into neutral values: tensors -> TorchData, other objects -> Opaque.

    Raises ``CommandError("encoding_error")`` naming ``node_id`` for an object
    cloudpickle cannot serialise.
    """
    kind = type(value)
    if kind in _LEAF_TYPES:
        return value
    if kind is list or kind is tuple:
        if _leaves_only(value):
            return value
        items = [neutralise(item, node_id) for item in value]
        return items if kind is list else tuple(items)
    if kind is dict and (_leaves_only(value) or all(_is_neutral_key(key) for key in value)):
        if _leaves_only(value.values()):
            return value
        return {key: neutralise(item, node_id) for key, item in value.items()}
    if _is_plain_numpy(value):
        return value
    if is_plain_tensor(value):
        return tensor_to_marker(value)
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except BaseException as exc:  # pickling runs user code (__reduce__, __getstate__)
        raise CommandError(
            "encoding_error",
            f"cannot encode a {kind.__module__}.{kind.__qualname__} from node {node_id!r}: "
            f"{type(exc).__name__}: {exc}",
            node_id=node_id,
        ) from exc
    return Opaque(data, list(buffers))


class NeedsNeutralising(Exception):
    """Raised while pickling a reply that holds an object the parent may not unpickle."""


_NATIVE_TYPES = frozenset({complex, bytearray, pickle.PickleBuffer, Opaque, TorchData, Handle, Concat})


def reduce_neutral(obj: Any) -> Any:
    """``reducer_override`` accepting only what ``restricted_loads`` can rebuild.

    Raises ``NeedsNeutralising`` at the first other object, so the caller can walk
    the value with ``neutralise`` and pickle it again.
    """
    kind = type(obj)
    if kind in _NATIVE_TYPES or _is_plain_numpy(obj):
        return NotImplemented
    if isinstance(obj, type) or callable(obj) and kind.__name__ in ("function", "builtin_function_or_method"):
        # The reduce callables of allowed values (numpy reconstructors, marker classes).
        if channel.is_allowed_global(getattr(obj, "__module__", ""), getattr(obj, "__qualname__", "")):
            return NotImplemented
    elif kind.__module__ == "numpy.dtypes" and _is_plain_dtype(obj):
        return NotImplemented
    raise NeedsNeutralising


def _leaves_only(values: Iterable[Any]) -> bool:
    """Whether every item is a neutral scalar: one C-speed pass, for lists of millions of floats."""
    return set(map(type, values)) <= _LEAF_TYPES


def _is_neutral_key(key: object) -> bool:
    kind = type(key)
    if kind in _LEAF_TYPES:
        return True
    if kind is tuple:
        return all(_is_neutral_key(item) for item in key)  # type: ignore[attr-defined]
    return _is_plain_numpy(key) and not is_ndarray(key)


def _is_plain_numpy(value: object) -> bool:
    """An ndarray (not a subclass) or numpy scalar whose dtype the parent can unpickle."""
    if type(value).__module__ != "numpy":
        return False
    numpy = sys.modules["numpy"]
    if not (type(value) is numpy.ndarray or isinstance(value, numpy.generic)):
        return False
    return _is_plain_dtype(value.dtype)  # type: ignore[attr-defined]


def _is_plain_dtype(dtype: Any) -> bool:
    # The restricted unpickler knows numpy's own scalar types only, and no objects.
    return not dtype.hasobject and dtype.type.__module__ == "numpy"


def cache_blob(value: Any, node_id: str | None) -> bytes:
    """``value`` pickled in-band, the disk cache's format (isolation.md §3.4): pickle, else cloudpickle.

    Raises ``CommandError("encoding_error")`` naming ``node_id`` when neither can.
    """
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # noqa: BLE001 - the cache format falls back to cloudpickle on any pickling failure
        try:
            blob: bytes = cloudpickle.dumps(value, protocol=5)
            return blob
        except BaseException as exc:  # pickling runs user code (__reduce__, __getstate__)
            raise CommandError(
                "encoding_error",
                f"cannot pickle the {type(value).__name__} from node {node_id!r} into a cache blob: {exc}",
                node_id=node_id,
            ) from exc
