"""Wire v2: binary frames, a msgpack envelope plus raw buffers (worker.md §5.4).

Frame layout::

    b"SOMA" | u8 version (2) | u8 flags (0) | u16 reserved | u32 LE envelope length
    | envelope (msgpack map) | zero padding | buffer 0 | padding | buffer 1 | ...

The envelope lists the buffers as ``buffers: [[offset, length], ...]``, offsets from
the frame start and multiples of 64, so arrays are read in place. Encoding never
copies a C-contiguous array: :func:`encode_frame_parts` returns the header chunk
followed by memoryviews of the buffers. Values are msgpack-native with extension
types 1 ndarray, 2 torch tensor, 3 tuple, 4 opaque object (cloudpickle, protocol 5,
out-of-band buffers), 5 data reference, 6 numpy scalar.

Decoding takes a *side*. The worker (``side="worker"``) never unpickles: arrays are
read-only views on the frame, tensors ``TorchData`` and objects ``Opaque`` markers,
which it can send on untouched. The client (``side="client"``) materialises writable
arrays (one copy at most), torch tensors where torch is importable, and objects.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
import struct
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import msgpack
import numpy as np

from soma.isolation.markers import Opaque, TorchData
from soma.wire.errors import WireError
from soma.wire.messages import (
    DATA_REFS,
    MESSAGE_TYPES,
    PLAN_CARRIERS,
    V2_MESSAGES,
    WIRE_VERSION,
    PlanFailure,
    PlanSuccess,
    Record,
    Reply,
    Request,
    check_plan_id,
    validate_plan,
    version_refusal,
)
from soma.wire.schema import mode_from_map, record_from_map, record_to_map

__all__ = [
    "ALIGNMENT",
    "MAGIC",
    "FrameHead",
    "Side",
    "decode",
    "decode_message",
    "decode_value_frame",
    "encode_frame",
    "encode_frame_parts",
    "encode_value_frame",
    "encode_value_frame_parts",
    "encoded_size",
    "measure_value_frame",
    "read_head",
]

Side: TypeAlias = Literal["worker", "client"]
Part: TypeAlias = bytes | memoryview

MAGIC = b"SOMA"
ALIGNMENT = 64
_HEADER = struct.Struct("<4sBBHI")
_FRAME_KEYS = frozenset({"v", "type", "id", "re", "buffers"})
_MAX_ID = 64
_IN_PLACE_BYTES = 1 << 20
"""Opaque objects at least this large are tried as a pickled array read in place (client side)."""

EXT_NDARRAY, EXT_TENSOR, EXT_TUPLE, EXT_OPAQUE, EXT_REF, EXT_NPSCALAR = 1, 2, 3, 4, 5, 6
_ARRAY_KINDS = frozenset("biufcmMSU")
_INT_RANGE = (-(2**63), 2**64 - 1)
_DECODE_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    RecursionError,
    msgpack.UnpackException,
)
# Element sizes of torch dtypes, so the worker can check tensors without importing torch.
_TORCH_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
}  # fmt: skip


# --------------------------------------------------------------------------- encoding


class _Pickled:
    """Wraps a value msgpack cannot carry natively (an int beyond 64 bits) to force ext 4."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Encoder:
    """Packs values, collecting the buffers they point into (never copying contiguous ones)."""

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []
        self._packers: list[msgpack.Packer] = []
        self._depth = 0
        self._hook = _default_hook(weakref.ref(self))

    def pack(self, value: Any) -> bytes:
        mark = len(self.buffers)
        try:
            return self._pack(value)
        except OverflowError:
            del self.buffers[mark:]
            return self._pack(_wrap_big_ints(value))
        except (TypeError, ValueError) as exc:
            raise WireError("encoding_error", f"value cannot be encoded: {exc}") from exc

    def _pack(self, value: Any) -> bytes:
        # ``default`` re-enters pack() for ext payloads while the packer above is mid-value,
        # so each nesting level has a packer of its own, kept for the next value at that level
        # (a packer that raised has dropped what it had packed).
        depth = self._depth
        if depth == len(self._packers):
            self._packers.append(msgpack.Packer(default=self._hook, use_bin_type=True, strict_types=True))
        self._depth = depth + 1
        try:
            return self._packers[depth].pack(value)  # type: ignore[no-any-return]
        finally:
            self._depth = depth

    def _buffer(self, view: memoryview) -> int:
        self.buffers.append(view)
        return len(self.buffers) - 1

    def _default(self, value: Any) -> Any:
        kind = type(value)
        if kind is tuple:
            return msgpack.ExtType(EXT_TUPLE, self.pack(list(value)))
        if kind is np.ndarray and _raw_dtype(value.dtype):
            return self._ndarray(value)
        if isinstance(value, np.generic) and _raw_dtype(value.dtype):
            return msgpack.ExtType(EXT_NPSCALAR, self.pack([value.dtype.str, value.tobytes()]))
        if kind is TorchData:
            index = self._buffer(_byte_view(value.buffer))
            return msgpack.ExtType(EXT_TENSOR, self.pack([index, value.dtype, list(value.shape)]))
        if kind is Opaque:
            index = self._buffer(_byte_view(value.data))
            oob = [self._buffer(_byte_view(b)) for b in value.buffers]
            return msgpack.ExtType(EXT_OPAQUE, self.pack([index, oob]))
        tag = getattr(value, "type", None) if isinstance(value, Record) else None
        if tag in DATA_REFS:
            body = {"type": tag, **record_to_map(value, _FIELDS)}
            return msgpack.ExtType(EXT_REF, self.pack(body))
        if _is_plain_tensor(value):
            return self._tensor(value)
        if kind is _Pickled:
            value = value.value
        return self._opaque(value)

    def _ndarray(self, array: np.ndarray[Any, Any]) -> msgpack.ExtType:
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
            array = array.copy(order="C")
        index = self._buffer(array.reshape(-1).view(np.uint8).data)
        return msgpack.ExtType(EXT_NDARRAY, self.pack([index, array.dtype.str, list(array.shape)]))

    def _tensor(self, tensor: Any) -> msgpack.ExtType:
        import torch

        flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy()  # shares memory and keeps the tensor alive
        index = self._buffer(memoryview(raw))
        name = str(tensor.dtype).removeprefix("torch.")
        return msgpack.ExtType(EXT_TENSOR, self.pack([index, name, list(tensor.shape)]))

    def _opaque(self, value: Any) -> msgpack.ExtType:
        import cloudpickle

        oob: list[memoryview] = []

        def keep(buffer: pickle.PickleBuffer) -> bool:
            try:
                oob.append(buffer.raw())
            except BufferError:  # a non-contiguous buffer stays in band
                return True
            return False

        try:
            data = cloudpickle.dumps(value, protocol=5, buffer_callback=keep)
        except Exception as exc:  # pickling runs arbitrary __reduce__ code; any failure is the value's
            raise WireError("encoding_error", f"cannot pickle {type(value).__name__}: {exc}") from exc
        index = self._buffer(memoryview(data))
        indices = [self._buffer(view) for view in oob]
        return msgpack.ExtType(EXT_OPAQUE, self.pack([index, indices]))


def _default_hook(encoder: weakref.ref[_Encoder]) -> Callable[[Any], Any]:
    """``_Encoder._default`` for the encoder's packers, which must not hold the encoder itself.

    A reference cycle would keep the encoder, and the buffers it collected, alive until
    the next garbage collection instead of freeing them with the frame.
    """

    def default(value: Any) -> Any:
        owner = encoder()
        assert owner is not None, "only the encoder's own packers call this"
        return owner._default(value)

    return default


def _raw_dtype(dtype: np.dtype[Any]) -> bool:
    """Whether arrays of ``dtype`` can travel as raw bytes plus ``dtype.str`` (else: pickled)."""
    return dtype.kind in _ARRAY_KINDS and dtype.fields is None and dtype.itemsize > 0


def _is_plain_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return (
        torch is not None
        and type(value) is torch.Tensor
        and value.layout == torch.strided
        and not value.is_quantized
        and value.device.type != "meta"
    )


def _wrap_big_ints(value: Any) -> Any:
    kind = type(value)
    if kind is int and not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        return _Pickled(value)
    if kind is list:
        return [_wrap_big_ints(item) for item in value]
    if kind is dict:
        return {_wrap_big_ints(k): _wrap_big_ints(v) for k, v in value.items()}
    return value


def _byte_view(buffer: Any) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class _V2Fields:
    """Dialect hooks for the schema walker: values stay native, the packer handles them."""

    dialect: Literal["v1", "v2"] = "v2"
    positional = False

    def encode_field(self, kind: str, value: Any, path: str) -> Any:
        match kind:
            case "plan":
                return validate_plan(value, path)
            case "mode":
                return "Forward" if value == "Forward" else {"Fit": record_to_map(value, self, path)}
            case "result":
                if not isinstance(value, PlanSuccess | PlanFailure):
                    raise WireError("encoding_error", f"{path}: expected PlanSuccess or PlanFailure")
                status = "Success" if isinstance(value, PlanSuccess) else "Failed"
                return {"status": status, **record_to_map(value, self, path)}
            case "pickle":
                return bytes(value)
        return value

    def decode_field(self, kind: str, raw: Any, path: str) -> Any:
        decode = _DECODE_KINDS.get(kind)
        return raw if decode is None else decode(raw, path)


_FIELDS = _V2Fields()


def _str_map(raw: Any, path: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        for key in raw:
            if not isinstance(key, str):
                break
        else:
            return raw
    raise WireError("bad_message", f"{path}: expected a map with string keys")


def _gradients(raw: Any, path: str) -> dict[str, Any]:
    return {k: _str_map(v, f"{path}[{k!r}]") for k, v in _str_map(raw, path).items()}


def _mode(raw: Any, path: str) -> Any:
    return mode_from_map(raw, _FIELDS, path)


def _result(raw: Any, path: str) -> Any:
    if isinstance(raw, dict):
        cls = _RESULTS.get(raw.get("status"))  # type: ignore[arg-type]
        if cls is not None:
            body = {k: v for k, v in raw.items() if k != "status"}
            return record_from_map(cls, body, _FIELDS, path)
    raise WireError("bad_message", f"{path}: expected a result with status Success or Failed")


def _pickle(raw: Any, path: str) -> Any:
    if type(raw) is not bytes:
        raise WireError("bad_message", f"{path}: expected bin")
    return raw


def _cache_key(raw: Any, path: str) -> Any:
    if not (isinstance(raw, str) and len(raw) == 64 and all(c in "0123456789abcdef" for c in raw)):
        raise WireError("bad_message", f"{path}: expected 64 lowercase hex digits")
    return raw


_RESULTS: dict[str, type[Record]] = {"Success": PlanSuccess, "Failed": PlanFailure}
# Kinds without an entry (values, states, inputs, outputs) are msgpack-native as they arrive.
_DECODE_KINDS: dict[str, Callable[[Any, str], Any]] = {
    "states": _str_map,
    "values": _str_map,
    "gradients": _gradients,
    "plan": validate_plan,
    "mode": _mode,
    "result": _result,
    "pickle": _pickle,
    "cache_key": _cache_key,
}


def encode_frame_parts(message: Request | Reply) -> list[Part]:
    """A message as frame chunks: header and envelope, then padding and buffer views.

    Joining the chunks gives the frame; sending them one by one avoids copying large
    buffers. Raises ``WireError("encoding_error")`` for values that cannot travel.
    """
    if message.type not in V2_MESSAGES:
        raise WireError("encoding_error", f"{message.type} is not a wire v2 message")
    head: dict[str, Any] = {"v": getattr(message, "v", WIRE_VERSION), "type": message.type}
    correlation = "id" if isinstance(message, Request) else "re"
    if getattr(message, correlation) is not None:
        head[correlation] = getattr(message, correlation)
    body = record_to_map(message, _FIELDS)
    body.pop("v", None)
    return _assemble({**head, **body})


def encode_frame(message: Request | Reply) -> bytes:
    """A message as one frame (``b"".join(encode_frame_parts(message))``)."""
    return b"".join(encode_frame_parts(message))


def encode_value_frame_parts(value: Any) -> list[Part]:
    """One value as an upload/download frame (§4.3): envelope ``{v, type: "Value", value}``."""
    return _assemble({**dict(_VALUE_HEAD), "value": value})


def encode_value_frame(value: Any) -> bytes:
    """One value as a single upload/download frame."""
    return b"".join(encode_value_frame_parts(value))


def encoded_size(value: Any) -> int:
    """The bytes ``value`` adds to a frame (envelope share plus buffers), the §4.5 measure."""
    encoder = _Encoder()
    packed = encoder.pack(value)
    return len(packed) + sum(view.nbytes for view in encoder.buffers)


def measure_value_frame(value: Any) -> tuple[int, list[Part]]:
    """``(encoded_size(value), encode_value_frame_parts(value))``, packing ``value`` once.

    Deciding between inline and upload needs the size, and the upload needs the frame:
    packing a large list twice would double the cost of sending it. The packed value
    stays one part of its own, so a large one is never copied into the frame's head.
    """
    encoder = _Encoder()
    packed = encoder.pack(value)
    size = len(packed) + sum(view.nbytes for view in encoder.buffers)
    pairs = b"".join(encoder.pack(key) + encoder.pack(item) for key, item in _VALUE_HEAD) + encoder.pack("value")
    return size, _framed(len(_VALUE_HEAD) + 1, [pairs, packed], encoder.buffers)


_VALUE_HEAD = (("v", WIRE_VERSION), ("type", "Value"))
_BUFFERS_KEY = msgpack.packb("buffers")
_JOIN_BELOW = 64 << 10
"""Envelope chunks shorter than this are joined into their neighbours; longer ones stay parts."""


def _assemble(envelope: dict[str, Any]) -> list[Part]:
    # One packing for the whole map; its header is rewritten by _framed, which knows
    # whether a ``buffers`` entry follows once the values have been packed.
    encoder = _Encoder()
    packed = encoder.pack(envelope)
    pairs = memoryview(packed)[len(_map_header(len(envelope))) :]
    return _framed(len(envelope), [pairs], encoder.buffers)


def _framed(count: int, pairs: list[Part], buffers: list[memoryview]) -> list[Part]:
    """The frame of an envelope of ``count`` packed ``pairs`` whose values point into ``buffers``.

    ``pairs`` are packed key/value chunks in order; a long one (a list of a million floats)
    becomes a part of its own instead of being copied into the header chunk.
    """
    if not buffers:
        envelope = [_map_header(count), *pairs]
        length = sum(len(chunk) for chunk in envelope)
        return _coalesced([_HEADER.pack(MAGIC, WIRE_VERSION, 0, 0, length), *envelope])
    prefix = [_map_header(count + 1), *pairs, _BUFFERS_KEY]
    prefix_length = sum(len(chunk) for chunk in prefix)
    start = _align(_HEADER.size + prefix_length + 16)
    while True:  # the offsets' encoded width feeds back into where the first buffer starts
        offsets, position = [], start
        for view in buffers:
            offsets.append([position, view.nbytes])
            position = _align(position + view.nbytes)
        table = msgpack.packb(offsets)
        needed = _align(_HEADER.size + prefix_length + len(table))
        if needed <= start:
            break
        start = needed
    length = prefix_length + len(table)
    padding = bytes(start - _HEADER.size - length)
    parts: list[Part] = _coalesced([_HEADER.pack(MAGIC, WIRE_VERSION, 0, 0, length), *prefix, table, padding])
    for i, ((offset, size), view) in enumerate(zip(offsets, buffers, strict=True)):
        parts.append(view)
        padding_after = _align(offset + size) - (offset + size)
        if padding_after and i < len(buffers) - 1:
            parts.append(bytes(padding_after))
    return parts


def _map_header(count: int) -> bytes:
    """The msgpack header of a map of ``count`` entries."""
    return bytes((0x80 | count,)) if count < 16 else msgpack.Packer().pack_map_header(count)


def _coalesced(chunks: list[Part]) -> list[Part]:
    """``chunks`` with runs of short ones joined; long ones are kept as they are (no copy)."""
    parts: list[Part] = []
    run: list[Part] = []
    for chunk in chunks:
        if len(chunk) < _JOIN_BELOW:
            run.append(chunk)
            continue
        if run:
            parts.append(b"".join(run))
            run = []
        parts.append(chunk)
    if run:
        parts.append(b"".join(run))
    return parts


def _align(position: int) -> int:
    return -(-position // ALIGNMENT) * ALIGNMENT


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class FrameHead:
    """What a frame says about itself before its values are decoded.

    ``v``, ``type`` and ``id``/``re`` are read without touching any value, so a
    version refusal happens before anything is materialised.
    """

    v: Any
    type: Any
    id: Any
    re: Any
    envelope: memoryview
    buffers: list[memoryview]
    frame: memoryview


def read_head(data: bytes | bytearray | memoryview) -> FrameHead:
    """Check the framing of ``data`` and read its envelope head; ``WireError`` if broken."""
    frame = _byte_view(data)
    if frame.nbytes < _HEADER.size:
        raise WireError(
            "bad_message", f"truncated frame: {frame.nbytes} bytes, the header alone is {_HEADER.size}"
        )
    magic, version, flags, _reserved, length = _HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise WireError("bad_message", f"not a Soma v2 frame: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != WIRE_VERSION:
        raise version_refusal(version)
    if flags != 0:
        raise WireError("bad_message", f"unsupported frame flags {flags:#04x}")
    end = _HEADER.size + length
    if end > frame.nbytes:
        raise WireError(
            "bad_message",
            f"truncated frame: envelope of {length} bytes, {frame.nbytes - _HEADER.size} present",
        )
    envelope = frame[_HEADER.size : end]
    try:
        head = _scan(envelope)
    except _DECODE_ERRORS as exc:
        raise WireError("bad_message", f"undecodable envelope: {exc}") from exc
    request_id = head.get("id")
    buffers = _buffers(head["buffers"], frame, end, request_id) if "buffers" in head else []
    return FrameHead(head.get("v"), head.get("type"), request_id, head.get("re"), envelope, buffers, frame)


def _buffers(table: Any, frame: memoryview, start: int, request_id: Any) -> list[memoryview]:
    """The views an envelope's ``buffers: [[offset, length], ...]`` names, each checked."""
    request_id = request_id if isinstance(request_id, str) else None
    if not isinstance(table, list):
        raise WireError("bad_message", "envelope buffers must be a list", request_id=request_id)
    buffers = []
    for i, entry in enumerate(table):
        shaped = isinstance(entry, list) and len(entry) == 2
        if not (shaped and type(entry[0]) is int and type(entry[1]) is int):
            raise WireError("bad_message", f"buffers[{i}] must be [offset, length]", request_id=request_id)
        offset, size = entry
        if offset % ALIGNMENT or offset < start or size < 0 or offset + size > frame.nbytes:
            raise WireError(
                "bad_message",
                f"buffers[{i}] = [{offset}, {size}] is not a {ALIGNMENT}-aligned range after the envelope "
                f"inside a frame of {frame.nbytes} bytes",
                request_id=request_id,
            )
        buffers.append(frame[offset : offset + size])
    return buffers


def _scan(envelope: memoryview) -> dict[str, Any]:
    """Read the scalar framing keys of an envelope, skipping every other value undecoded."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, ext_hook=_skip_ext)
    unpacker.feed(envelope)
    found: dict[str, Any] = {}
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        if key in _FRAME_KEYS:
            found[key] = unpacker.unpack()
        else:
            unpacker.skip()
    return found


def _skip_ext(code: int, data: bytes) -> None:
    return None


class _Decoder:
    """Turns extension types back into values, according to the side decoding them."""

    def __init__(self, head: FrameHead, side: Side) -> None:
        self.head = head
        self.side = side

    def unpack(self, payload: bytes | memoryview) -> Any:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=self.ext_hook)

    def buffer(self, index: Any) -> memoryview:
        if type(index) is not int or not 0 <= index < len(self.head.buffers):
            raise WireError("bad_message", f"buffer index {index!r} out of range")
        return self.head.buffers[index]

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_TUPLE:
            items = self.unpack(data)
            if not isinstance(items, list):
                raise WireError("bad_message", "tuple payload must be an array")
            return tuple(items)
        payload = self.unpack(data)
        if code == EXT_NDARRAY:
            return self.ndarray(*_fields(payload, 3, "ndarray"))
        if code == EXT_TENSOR:
            return self.tensor(*_fields(payload, 3, "tensor"))
        if code == EXT_OPAQUE:
            return self.opaque(*_fields(payload, 2, "opaque object"))
        if code == EXT_REF:
            return _ref(payload)
        if code == EXT_NPSCALAR:
            return _np_scalar(*_fields(payload, 2, "numpy scalar"))
        raise WireError("bad_message", f"unknown extension type {code}")

    def ndarray(self, index: Any, dtype_str: Any, shape: Any) -> np.ndarray[Any, Any]:
        dtype = _dtype(dtype_str)
        shape = _shape(shape)
        view = self.buffer(index)
        count = math.prod(shape)
        if count * dtype.itemsize != view.nbytes:
            raise WireError(
                "bad_message",
                f"ndarray {dtype.str}{list(shape)} needs {count * dtype.itemsize} bytes, "
                f"buffer has {view.nbytes}",
            )
        if count == 0:
            array = np.empty(shape, dtype)
        else:
            array = np.frombuffer(view, dtype=dtype, count=count).reshape(shape)
        if self.side == "worker":
            array.flags.writeable = False
        elif not array.flags.writeable:
            array = array.copy()
        return array

    def tensor(self, index: Any, name: Any, shape: Any) -> Any:
        itemsize = _TORCH_ITEMSIZE.get(name) if isinstance(name, str) else None
        if itemsize is None:
            raise WireError("bad_message", f"unknown torch dtype {name!r}")
        shape = _shape(shape)
        view = self.buffer(index)
        if math.prod(shape) * itemsize != view.nbytes:
            raise WireError(
                "bad_message", f"torch {name}{list(shape)} does not match its {view.nbytes}-byte buffer"
            )
        if self.side == "worker" or not _torch_available():
            # A PickleBuffer (not a bare memoryview) lets the worker relay the bytes to a
            # child over the pickle-5 channel without copying them.
            buffer = pickle.PickleBuffer(view) if self.side == "worker" else bytearray(view)
            return TorchData(buffer=buffer, dtype=name, shape=shape)
        import torch

        if view.nbytes == 0:
            return torch.empty(shape, dtype=getattr(torch, name))
        raw = np.frombuffer(view, dtype=np.uint8)
        if not raw.flags.writeable:
            raw = raw.copy()
        return torch.from_numpy(raw).view(getattr(torch, name)).reshape(shape)

    def opaque(self, index: Any, oob: Any) -> Any:
        if not isinstance(oob, list):
            raise WireError("bad_message", "opaque object buffers must be a list of indices")
        data = self.buffer(index)
        buffers = [self.buffer(i) for i in oob]
        if self.side == "worker":
            return Opaque(data=bytes(data), buffers=[pickle.PickleBuffer(b) for b in buffers])
        if not buffers and data.nbytes >= _IN_PLACE_BYTES:
            from soma.isolation.values import blob_array

            array = blob_array(data)  # a cache hit's array, read where it lies in the frame
            if array is not None:
                return array
        try:
            # Writable buffers (a download's) are used in place; a message's are copied to be writable.
            return pickle.loads(data, buffers=[bytearray(b) if b.readonly else b for b in buffers])
        except Exception as exc:  # unpickling runs the sender's reconstructors; any failure is theirs
            raise WireError(
                "unpickle_error", f"cannot unpickle a received object: {type(exc).__name__}: {exc}"
            ) from exc


def _fields(payload: Any, count: int, what: str) -> list[Any]:
    if not isinstance(payload, list) or len(payload) != count:
        raise WireError("bad_message", f"{what} extension must hold {count} items")
    return payload


def _dtype(text: Any) -> np.dtype[Any]:
    if not isinstance(text, str):
        raise WireError("bad_message", f"dtype must be a string, got {type(text).__name__}")
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise WireError("bad_message", f"unknown dtype {text!r}") from None
    if not _raw_dtype(dtype):
        raise WireError("bad_message", f"dtype {text!r} cannot travel as raw bytes")
    return dtype


def _shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise WireError("bad_message", f"shape must be a list of non-negative ints, got {shape!r}")
    return tuple(shape)


def _np_scalar(dtype_str: Any, raw: Any) -> Any:
    dtype = _dtype(dtype_str)
    if type(raw) is not bytes or len(raw) != dtype.itemsize:
        raise WireError("bad_message", f"numpy scalar {dtype.str} needs {dtype.itemsize} bytes")
    return np.frombuffer(raw, dtype=dtype)[0]


def _ref(payload: Any) -> Any:
    tag = payload.get("type") if isinstance(payload, dict) else None
    cls = DATA_REFS.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise WireError("bad_message", f"unknown data reference {payload!r:.80}")
    body = {k: v for k, v in payload.items() if k != "type"}
    return record_from_map(cls, body, _FIELDS, "reference")


_torch_found: bool | None = None


def _torch_available() -> bool:
    global _torch_found
    if _torch_found is None:
        _torch_found = "torch" in sys.modules or importlib.util.find_spec("torch") is not None
    return _torch_found


def _envelope(head: FrameHead, side: Side) -> dict[Any, Any]:
    decoder = _Decoder(head, side)
    envelope = decoder.unpack(head.envelope)
    if not isinstance(envelope, dict):
        raise WireError("bad_message", "the envelope must be a map")
    return envelope



def decode_message(head: FrameHead, side: Side) -> Request | Reply:
    """Build the message of a frame whose head was read (and whose version was accepted)."""
    request_id = head.id if isinstance(head.id, str) else None
    try:
        if not isinstance(head.type, str) or head.type not in V2_MESSAGES:
            raise WireError("bad_message", f"unknown message type {head.type!r:.80}")
        cls = MESSAGE_TYPES[head.type]
        envelope = _envelope(head, side)
        body = {k: v for k, v in envelope.items() if k not in _FRAME_KEYS}
        if head.type in ("Hello", "Welcome"):
            body["v"] = head.v
        key = "id" if issubclass(cls, Request) else "re"
        correlation = envelope.get(key)
        valid = correlation is None or (isinstance(correlation, str) and 0 < len(correlation) <= _MAX_ID)
        # A broken body is reported before a broken id.
        message = record_from_map(cls, body, _FIELDS, given={key: correlation} if valid else None)
        if not valid:
            raise WireError("bad_message", f"envelope {key} must be a string of 1 to {_MAX_ID} characters")
    except WireError as exc:
        exc.request_id = exc.request_id or request_id
        raise
    except _DECODE_ERRORS as exc:
        raise WireError("bad_message", f"undecodable frame: {exc}", request_id=request_id) from exc
    if isinstance(message, PLAN_CARRIERS):
        try:
            check_plan_id(message.plan.plan_id)
        except WireError as exc:
            exc.request_id, exc.plan_id = request_id, message.plan.plan_id
            raise
    return message  # type: ignore[no-any-return]


def decode(data: bytes | bytearray | memoryview, side: Side) -> Request | Reply:
    """Decode one frame without version policy (see ``soma.wire.codec`` for that)."""
    return decode_message(read_head(data), side)


def decode_value_frame(data: bytes | bytearray | memoryview, side: Side) -> Any:
    """The value of an upload/download frame; ``WireError`` for anything else."""
    head = read_head(data)
    if head.v != WIRE_VERSION:
        raise version_refusal(head.v, side=side)
    if head.type != "Value":
        raise WireError("bad_message", f"expected a value frame, got type {head.type!r:.80}")
    try:
        envelope = _envelope(head, side)
    except _DECODE_ERRORS as exc:
        raise WireError("bad_message", f"undecodable value frame: {exc}") from exc
    if "value" not in envelope:
        raise WireError("bad_message", "value frame without a value")
    return envelope["value"]
