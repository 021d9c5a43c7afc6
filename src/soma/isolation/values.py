"""The child's two walks over channel values (isolation.md §3.2, §3.3), and cache blobs.

``materialise`` turns a request value into objects (markers resolved), ``neutralise``
turns a reply value into neutral values (tensors to ``TorchData``, anything else
the parent may not unpickle to ``Opaque``). Kept apart from the command handlers
because the local subprocess runner decodes child replies with the same walk, so
one definition of the channel's values serves both sides. ``reduce_neutral`` lets a
reply be pickled as it is when it is neutral already, sparing the walk.

Cache blobs are pickles with everything in band (the disk cache's format). ``cache_blob``
hands one to the channel so that its bytes still cross out of band (the shared-memory ring
for large ones), and ``blob_array`` reads a blob holding one array without copying its bytes.
"""

from __future__ import annotations

import pickle
import pickletools
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import cloudpickle

from soma.isolation import channel
from soma.isolation.child_errors import VERSION_SKEW_HINT, CommandError
from soma.isolation.markers import Concat, Handle, Opaque, TorchData
from soma.isolation.tensors import is_ndarray, is_plain_tensor, tensor_from_marker, tensor_to_marker
from soma.runtime import batching

__all__ = ["Blob", "NeedsNeutralising", "blob_array", "cache_blob", "materialise", "neutralise", "reduce_neutral"]

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


class Blob:
    """A cache blob on its way to the parent: it unpickles as ``bytes``, rebuilt from an out-of-band buffer.

    A ``bytes`` object is always pickled in band, so a large blob would be copied into the
    frame's payload and pushed through the pipe; as an out-of-band buffer it crosses the
    channel's shared-memory ring (or is written from its own memory) like an array.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[type[bytes], tuple[pickle.PickleBuffer | bytes]]:
        if isinstance(protocol, int) and protocol < 5:  # no out-of-band buffers before protocol 5
            return bytes, (self.data,)
        return bytes, (pickle.PickleBuffer(self.data),)


_NATIVE_TYPES = frozenset({complex, bytearray, pickle.PickleBuffer, Opaque, TorchData, Handle, Concat, Blob})


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


def cache_blob(value: Any, node_id: str | None) -> Blob:
    """``value`` pickled in-band, the disk cache's format (isolation.md §3.4): pickle, else cloudpickle.

    Returned as a ``Blob``, which reaches the parent as these ``bytes``. Raises
    ``CommandError("encoding_error")`` naming ``node_id`` when neither can pickle it.
    """
    try:
        return Blob(_aligned_pickle(value) or pickle.dumps(value, protocol=5))
    except Exception:  # noqa: BLE001 - the cache format falls back to cloudpickle on any pickling failure
        try:
            return Blob(cloudpickle.dumps(value, protocol=5))
        except BaseException as exc:  # pickling runs user code (__reduce__, __getstate__)
            raise CommandError(
                "encoding_error",
                f"cannot pickle the {type(value).__name__} from node {node_id!r} into a cache blob: {exc}",
                node_id=node_id,
            ) from exc


_BLOB_ALIGNMENT = 64
"""Where the bytes of a blob's one large buffer start, relative to the blob (a frame's buffers are as aligned)."""


def _aligned_pickle(value: Any) -> bytes | None:
    """``pickle.dumps(value, protocol=5)`` for a value holding one large buffer (an array), laid out
    so that the buffer's bytes start at a multiple of ``_BLOB_ALIGNMENT``: ``blob_array`` can then
    use them in place. ``None`` for any other value.

    The value is pickled with its buffer out of band, then the buffer is put in band where the
    pickle said ``NEXT_BUFFER``: the bytes are copied once, as ``pickle.dumps`` copies them. A
    ``SHORT_BINBYTES`` pad, popped at once, goes after the protocol header; frames are left out
    (they are optional). ``pickle.loads`` gives what it gives for ``pickle.dumps(value, 5)``.
    """
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    if len(buffers) != 1:
        return None
    raw = buffers[0].raw()
    if raw.nbytes < _IN_PLACE_BYTES:
        return None
    ops = list(pickletools.genops(head))
    before: list[bytes] = []
    after: list[bytes] = []
    opcode = b"\x96"  # BYTEARRAY8: what an in-band writable buffer becomes
    side = before
    for index, (op, _, position) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else len(head)
        if op.name in ("PROTO", "FRAME"):
            continue
        if op.name == "NEXT_BUFFER":
            side = after
        elif op.name == "READONLY_BUFFER" and side is after and not after:
            opcode = b"\x8e"  # BINBYTES8: a read-only buffer in band
        else:
            side.append(head[position:end])
    if side is before or head[:2] != b"\x80\x05":
        return None
    prefix = b"".join(before)
    pad = -(2 + 3 + len(prefix) + 9) % _BLOB_ALIGNMENT  # header, pad op (3 + pad), buffer op and length
    return b"".join(
        (head[:2], b"C", bytes((pad,)), bytes(pad), b"0", prefix, opcode, raw.nbytes.to_bytes(8, "little"), raw, *after)
    )


_IN_PLACE_BYTES = 1 << 20
"""Byte strings of a blob at least this long are read in place by ``blob_array``."""
_MAX_OPCODES = 256
"""A blob of one array has a few dozen opcodes; one with more holds something else."""
_OPCODES = {ord(op.code): op for op in pickletools.opcodes}
_LENGTH_PREFIXES = {
    pickletools.TAKEN_FROM_ARGUMENT1: struct.Struct("<B"),
    pickletools.TAKEN_FROM_ARGUMENT4: struct.Struct("<i"),
    pickletools.TAKEN_FROM_ARGUMENT4U: struct.Struct("<I"),
    pickletools.TAKEN_FROM_ARGUMENT8U: struct.Struct("<Q"),
}
_FRAME_LENGTH = struct.Struct("<Q")
_BYTE_STRINGS = frozenset({"BINBYTES", "BINBYTES8", "BYTEARRAY8"})
_NEXT_BUFFER = pickle.NEXT_BUFFER
_READONLY_BUFFER = pickle.READONLY_BUFFER


def blob_array(blob: bytes | memoryview) -> Any:
    """The numpy array a blob pickles, over the blob's own bytes; ``None`` if it holds anything else.

    ``pickle.loads`` copies an array's bytes out of an in-band pickle (100 MB: a fresh
    100 MB). Here each long byte string of the blob goes to the unpickler out of band, as
    a view on ``blob`` (writable where ``blob`` is and the pickle wants a ``bytearray``),
    and only what ``channel.restricted_loads`` allows may be rebuilt. A result that is not
    one plain array, or any doubt (text opcodes, a string inside a frame), gives ``None``;
    the caller then loads the blob as usual.
    """
    view = memoryview(blob).cast("B") if memoryview(blob).format != "B" else memoryview(blob)
    strings = _long_byte_strings(view)
    if not strings:
        return None
    pieces: list[bytes | memoryview] = []
    buffers: list[memoryview] = []
    position = 0
    for start, data, end, name in strings:
        if name == "BYTEARRAY8" and view.readonly:
            return None  # the array would come out read-only, where pickle makes it writable
        pieces += [view[position:start], _NEXT_BUFFER if name == "BYTEARRAY8" else _NEXT_BUFFER + _READONLY_BUFFER]
        buffers.append(view[data:end])
        position = end
    pieces.append(view[position:])
    try:
        value = channel.restricted_loads(b"".join(pieces), buffers)
    except Exception:  # noqa: BLE001 - refused or malformed: the caller loads it the usual way
        return None
    if not (is_ndarray(value) and _is_plain_numpy(value)):
        return None
    if not value.flags.aligned:
        # An array at an odd offset of the blob: numpy would reduce it with its unaligned loops,
        # whose rounding differs from an aligned copy's (and is slower). Copy it, as pickle would.
        copy = value.copy(order="K")
        copy.flags.writeable = value.flags.writeable
        return copy
    return value


def _long_byte_strings(view: memoryview) -> list[tuple[int, int, int, str]] | None:
    """``(opcode offset, data offset, end, opcode name)`` of each long byte string, scanning opcodes only.

    ``None`` for a pickle that is not worth it (none found, too many opcodes, text opcodes,
    a long string inside a frame) or malformed.
    """
    found: list[tuple[int, int, int, str]] = []
    position = 0
    frame_end = 0
    try:
        for _ in range(_MAX_OPCODES):
            start = position
            op = _OPCODES.get(view[position])
            if op is None:
                return None
            position += 1
            if op.name == "STOP":
                return found or None
            arg = op.arg
            if arg is None:
                continue
            if arg.n >= 0:
                if op.name == "FRAME":
                    frame_end = position + arg.n + _FRAME_LENGTH.unpack_from(view, position)[0]
                position += arg.n
                continue
            prefix = _LENGTH_PREFIXES.get(arg.n)
            if prefix is None:
                return None
            data = position + prefix.size
            position = data + prefix.unpack_from(view, position)[0]
            if op.name in _BYTE_STRINGS and position - data >= _IN_PLACE_BYTES:
                if start < frame_end or position > view.nbytes:
                    return None
                found.append((start, data, position, op.name))
    except (IndexError, struct.error):
        return None
    return None
