"""Wire v1: the exact JSON of Soma 0.2.43 (worker.md §5.2, §5.3) and its msgpack stream frames (§6.9).

Text frames carry JSON messages tagged by ``type``; binary frames carry the stream
sub-protocol as msgpack maps (positional arrays from Soma 0.2.43 are decoded too).
Values travel as the adjacent-tagged ``Value`` (``Tensor``/``Json``/``Bytes``/``Empty``)
and are converted here, with no user code involved: tensors come in as nested float
lists (``null`` read as NaN); outputs go out by the §5.3 rules, and a non-finite float
in an output is an ``encoding_error`` rather than invalid JSON. Opaque objects are
never unpickled on this path: pickle-magic ``Bytes`` decode to ``Opaque`` markers.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import sys
from typing import Any, Literal

import msgpack
import numpy as np

from soma.isolation.markers import Opaque, TorchData
from soma.wire.errors import WireError
from soma.wire.messages import (
    DATA_REFS,
    ERROR_CODES,
    MESSAGE_TYPES,
    STREAM_MESSAGES,
    V1_MESSAGES,
    CachedRef,
    ErrorInfo,
    InlineRef,
    LocalRef,
    PlanFailure,
    PlanSuccess,
    Record,
    Reply,
    Request,
    S3Ref,
    StreamRef,
    ZarrRef,
    validate_plan,
)
from soma.wire.schema import mode_from_map, record_from_map, record_to_map, wire_fields

__all__ = [
    "PICKLE_MAGIC",
    "decode",
    "decode_json",
    "decode_ref",
    "decode_stream",
    "decode_value",
    "dump_record",
    "encode",
    "encode_json",
    "encode_ref",
    "encode_state",
    "encode_stream",
    "encode_value",
    "encoded_size",
    "load_record",
    "plan_from_v1",
    "plan_to_v1",
]

#: Prefix of ``Bytes`` payloads that hold a pickle (protocol 5) of an opaque object.
PICKLE_MAGIC = b"SOMA-PICKLE5\x00"

_DATA_REF_TYPES = (LocalRef, S3Ref, CachedRef, StreamRef, InlineRef, ZarrRef)
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError)
_TARGET_WORDS = {"any": "Any", "local": "Local", "subprocess": "Subprocess"}


# --------------------------------------------------------------------------- values out


class _NotJson(Exception):
    """Internal: the value has no JSON form and goes as a pickle instead."""


def encode_value(value: Any, path: str = "value") -> dict[str, Any]:
    """The v1 ``Value`` of an input or output (§5.3 "out of filters").

    Raises ``WireError("encoding_error")`` for a non-finite float, naming its path.
    """
    if value is None:
        return {"type": "Empty"}
    if type(value) in (bytes, bytearray):
        return {"type": "Bytes", "data": list(value)}
    if isinstance(value, Opaque):
        return _pickled(value, path)
    array = _as_numeric_array(value, path)
    if array is None and type(value) is list and value:
        array = _numeric_list(value)
    if array is not None:
        return _tensor(array, path)
    nonfinite: list[str] = []
    try:
        data = _to_json(value, path, nonfinite)
    except _NotJson:
        return _pickled(value, path)
    if nonfinite:
        raise _nonfinite_error(nonfinite[0])
    return {"type": "Json", "data": data}


def encode_state(state: Any, path: str = "state") -> dict[str, Any]:
    """The v1 ``Value`` of a state: ``Json`` when exactly JSON, else a pickle-magic ``Bytes``."""
    if _exact_json(state):
        return {"type": "Json", "data": state}
    return _pickled(state, path)


def encoded_size(value: Any) -> int:
    """Bytes of the compact JSON ``Value`` of ``value``, the v1 inline/reference measure (§4.5)."""
    return len(_dumps(encode_value(value)).encode())


def _tensor(array: np.ndarray[Any, Any], path: str) -> dict[str, Any]:
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(flat))
        if bad.size:
            index = np.unravel_index(int(bad[0]), array.shape)
            raise _nonfinite_error(path + "".join(f"[{int(i)}]" for i in index))
    values = flat.astype(np.float64).tolist()
    return {"type": "Tensor", "data": {"values": values, "shape": list(array.shape)}}


def _nonfinite_error(path: str) -> WireError:
    return WireError("encoding_error", f"non-finite value at {path} cannot travel over wire v1; use wire v2")


def _pickled(value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, Opaque):
        if value.buffers:
            raise WireError(
                "encoding_error",
                f"opaque object at {path} has out-of-band buffers and cannot travel over wire v1; "
                "use wire v2",
            )
        payload = bytes(value.data)
    else:
        import cloudpickle

        try:
            payload = cloudpickle.dumps(value, protocol=5)
        except Exception as exc:  # pickling runs arbitrary __reduce__ code; any failure is the value's
            raise WireError(
                "encoding_error", f"cannot pickle {type(value).__name__} at {path}: {exc}"
            ) from exc
    return {"type": "Bytes", "data": list(PICKLE_MAGIC + payload)}


def _is_number(item: Any) -> bool:
    if type(item) in (int, float):
        return True
    return isinstance(item, np.integer | np.floating)


def _numeric_list(value: list[Any]) -> np.ndarray[Any, Any] | None:
    """A 1-D list of numbers, or equal-length lists of numbers, as an array; else None."""
    if all(_is_number(item) for item in value):
        return _float_array(value)
    if all(type(row) is list and row and all(_is_number(x) for x in row) for row in value):
        if len({len(row) for row in value}) == 1:
            return _float_array(value)
    return None


def _float_array(value: Any) -> np.ndarray[Any, Any] | None:
    try:
        return np.asarray(value, dtype=np.float64)
    except OverflowError:  # ints beyond float range have no Tensor form
        return None


def _as_numeric_array(value: Any, path: str) -> np.ndarray[Any, Any] | None:
    """numpy numeric/bool arrays, torch tensors and ``TorchData`` as arrays; else None."""
    array = _as_array(value, path)
    if array is not None and array.dtype.kind in "biuf":
        return array
    return None


def _as_array(value: Any, path: str) -> np.ndarray[Any, Any] | None:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, TorchData):
        return _torch_data_array(value, path)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        if tensor.is_complex() or not tensor.layout == torch.strided:
            return None
        return np.asarray(tensor.numpy())
    return None


_TORCH_NUMPY = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}


def _torch_data_array(data: TorchData, path: str) -> np.ndarray[Any, Any]:
    raw = np.frombuffer(data.buffer, dtype=np.uint8)
    if data.dtype == "bfloat16":
        halves = raw.view("<u2").astype(np.uint32) << 16
        return halves.view("<f4").reshape(data.shape)
    dtype = _TORCH_NUMPY.get(data.dtype)
    if dtype is None:
        raise WireError(
            "encoding_error", f"a torch {data.dtype} tensor at {path} cannot travel over wire v1; use wire v2"
        )
    return raw.view(dtype).reshape(data.shape)


def _to_json(value: Any, path: str, nonfinite: list[str]) -> Any:
    """Convert to JSON-native data (numpy to lists and numbers, keys to strings)."""
    kind = type(value)
    if value is None or kind in (bool, str, int):
        return value
    if kind is float:
        if not math.isfinite(value) and not nonfinite:
            nonfinite.append(path)
        return value
    if kind in (list, tuple):
        return [_to_json(item, f"{path}[{i}]", nonfinite) for i, item in enumerate(value)]
    if kind is dict:
        return {_json_key(k): _to_json(v, f"{path}[{k!r}]", nonfinite) for k, v in value.items()}
    if isinstance(value, np.generic):
        return _to_json(_numpy_scalar(value), path, nonfinite)
    array = _as_array(value, path)
    if array is not None and array.dtype.kind in "biufU":
        return _to_json(array.tolist(), path, nonfinite)
    raise _NotJson


def _numpy_scalar(value: np.generic) -> Any:
    if isinstance(value, np.bool_ | np.integer | np.floating | np.str_):
        return value.item()
    raise _NotJson


def _json_key(key: Any) -> str:
    if isinstance(key, np.generic):
        key = _numpy_scalar(key)
    if type(key) is str:
        return key
    if key is None or type(key) in (bool, int, float):
        return json.dumps(key)
    raise _NotJson


def _exact_json(value: Any) -> bool:
    kind = type(value)
    if value is None or kind in (bool, str, int):
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(_exact_json(item) for item in value)
    if kind is dict:
        return all(type(k) is str and _exact_json(v) for k, v in value.items())
    return False


# --------------------------------------------------------------------------- values in


def decode_value(data: Any, path: str = "value") -> Any:
    """The Python value of a v1 ``Value`` (§5.3 "into filters").

    Tensors become nested float lists (``null`` -> NaN), ``Json`` its data, ``Bytes``
    ``bytes`` (or an ``Opaque`` marker for pickle-magic payloads), ``Empty`` None.
    Accepts Soma 0.2.43 positional arrays (``["Tensor", [values, shape]]``) as well.
    """
    tag: Any
    if isinstance(data, list) and data and isinstance(data[0], str):
        tag, payload, has_payload = data[0], data[1] if len(data) > 1 else None, len(data) > 1
    elif isinstance(data, dict):
        tag, payload, has_payload = data.get("type"), data.get("data"), "data" in data
    else:
        raise WireError("bad_message", f"{path}: expected a Value, got {_type_name(data)}")
    if tag == "Empty":
        return None
    if not has_payload:
        raise WireError("bad_message", f"{path}: {tag} Value without data")
    if tag == "Json":
        return payload
    if tag == "Bytes":
        raw = _bytes(payload, path)
        if raw.startswith(PICKLE_MAGIC):
            return Opaque(data=raw[len(PICKLE_MAGIC) :])
        return raw
    if tag == "Tensor":
        return _tensor_lists(payload, path)
    raise WireError("bad_message", f"{path}: unknown Value type {tag!r}")


def _bytes(payload: Any, path: str) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, list) and all(type(b) is int and 0 <= b < 256 for b in payload):
        return bytes(payload)
    raise WireError("bad_message", f"{path}: Bytes data must be a list of 0-255 ints")


def _tensor_lists(payload: Any, path: str) -> Any:
    if isinstance(payload, list) and len(payload) == 2:
        values, shape = payload
    elif isinstance(payload, dict):
        values, shape = payload.get("values"), payload.get("shape")
    else:
        raise WireError("bad_message", f"{path}: Tensor data must hold values and shape")
    if not isinstance(values, list) or not all(v is None or type(v) in (int, float) for v in values):
        raise WireError("bad_message", f"{path}: Tensor values must be a list of numbers")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise WireError("bad_message", f"{path}: Tensor shape must be a list of non-negative ints")
    if math.prod(shape) != len(values):
        raise WireError(
            "bad_message",
            f"{path}: Tensor has {len(values)} values but shape {shape} needs {math.prod(shape)}",
        )
    try:
        # numpy reads None as NaN in a float array: the 0.2.43 encoding of NaN and ±inf
        return np.array(values, dtype=np.float64).reshape(shape).tolist()
    except OverflowError:
        raise WireError("bad_message", f"{path}: Tensor value out of float range") from None


# --------------------------------------------------------------------------- references, plans


def encode_ref(ref: Record) -> dict[str, Any]:
    """The v1 JSON map of a ``DataRef`` (``Cached.cache_key`` as 32 ints)."""
    return _ref_out(ref, _JSON, "data_ref")


def decode_ref(data: Any) -> Any:
    """The ``DataRef`` of a v1 JSON map (as given to ``/download?ref=``)."""
    return _ref_in(data, _JSON, "data_ref")


def _ref_out(ref: Record, codec: _V1Fields, path: str) -> dict[str, Any]:
    if not isinstance(ref, _DATA_REF_TYPES):
        raise WireError("encoding_error", f"{path}: {type(ref).__name__} is not a data reference")
    return {"type": ref.type, **record_to_map(ref, codec, path)}


def _ref_in(data: Any, codec: _V1Fields, path: str) -> Any:
    tag: Any
    if codec.positional and isinstance(data, list) and data and isinstance(data[0], str):
        tag, data = data[0], data[1:]
    elif isinstance(data, dict):
        tag = data.get("type")
    else:
        raise WireError("bad_message", f"{path}: expected a data reference, got {_type_name(data)}")
    cls = DATA_REFS.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise WireError("bad_message", f"{path}: unknown data reference type {tag!r}")
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "type"}
    return record_from_map(cls, data, codec, path)


def plan_to_v1(plan: dict[str, Any]) -> Any:
    """The Soma 0.2.43 externally tagged ``ExecutionPlan`` of an api.md §7.2 plan dict."""
    plan = validate_plan(plan)
    return _plan_out(plan)


def _plan_out(plan: dict[str, Any]) -> Any:
    match plan["type"]:
        case "Empty":
            return "Empty"
        case "Execute":
            return {"Execute": {"node_id": plan["node_id"]}}
        case "Sequence":
            return {"Sequence": [_plan_out(step) for step in plan["steps"]]}
        case "Parallel":
            return {"Parallel": [_plan_out(branch) for branch in plan["branches"]]}
        case "Composite":
            return {"Composite": {"node_ids": plan["node_ids"]}}
        case "Cached":
            return {"Cached": {"node_id": plan["node_id"], "key": list(bytes.fromhex(plan["key"]))}}
        case "Loop":
            body = _plan_out(plan["body"])
            return {
                "Loop": {"node_id": plan["node_id"], "body": body, "max_iterations": plan["max_iterations"]}
            }
        case "Branch":
            arms = [[label, _plan_out(arm)] for label, arm in plan["arms"]]
            return {"Branch": {"node_id": plan["node_id"], "arms": arms}}
        case _:  # Remote
            target = _target_out(plan["target"])
            return {"Remote": {"node_id": plan["node_id"], "target": target, "plan": _plan_out(plan["plan"])}}


def _target_out(target: str) -> Any:
    if target.startswith("tag:"):
        return {"Tag": target[4:]}
    if target.startswith("worker:"):
        return {"WorkerId": target[7:]}
    if target in _TARGET_WORDS:
        return _TARGET_WORDS[target]
    return {"Tag": target}


def plan_from_v1(data: Any, *, positional: bool = False) -> dict[str, Any]:
    """The api.md §7.2 plan dict of a Soma 0.2.43 ``ExecutionPlan``; ``bad_plan`` if malformed."""
    return validate_plan(_plan_in(data, "plan", positional))


_PLAN_FIELDS = {
    "Execute": ("node_id",),
    "Composite": ("node_ids",),
    "Cached": ("node_id", "key"),
    "Loop": ("node_id", "body", "max_iterations"),
    "Branch": ("node_id", "arms"),
    "Remote": ("node_id", "target", "plan"),
}


def _plan_in(data: Any, path: str, positional: bool) -> dict[str, Any]:
    if data == "Empty":
        return {"type": "Empty"}
    if not (isinstance(data, dict) and len(data) == 1):
        raise WireError("bad_plan", f"{path}: expected an ExecutionPlan, got {_short(data)}")
    ((variant, body),) = data.items()
    if variant in ("Sequence", "Parallel"):
        if not isinstance(body, list):
            raise WireError("bad_plan", f"{path}.{variant}: expected a list of plans")
        items = [_plan_in(item, f"{path}.{variant}[{i}]", positional) for i, item in enumerate(body)]
        return {"type": variant, "steps" if variant == "Sequence" else "branches": items}
    names = _PLAN_FIELDS.get(variant) if isinstance(variant, str) else None
    if names is None:
        raise WireError("bad_plan", f"{path}: unknown plan variant {variant!r}")
    if positional and isinstance(body, list) and len(body) <= len(names):
        body = dict(zip(names, body, strict=False))
    if not isinstance(body, dict):
        raise WireError("bad_plan", f"{path}.{variant}: expected a map")
    out: dict[str, Any] = {"type": variant, **{name: body.get(name) for name in names}}
    where = f"{path}.{variant}"
    if variant == "Cached":
        out["key"] = _key_hex(body.get("key"), f"{where}.key", "bad_plan")
    elif variant == "Loop":
        out["body"] = _plan_in(body.get("body"), f"{where}.body", positional)
    elif variant == "Branch":
        arms = body.get("arms")
        if not isinstance(arms, list) or not all(isinstance(a, list) and len(a) == 2 for a in arms):
            raise WireError("bad_plan", f"{where}.arms: expected a list of [label, plan]")
        out["arms"] = [[a[0], _plan_in(a[1], f"{where}.arms[{i}]", positional)] for i, a in enumerate(arms)]
    elif variant == "Remote":
        out["target"] = _target_in(body.get("target"), f"{where}.target")
        out["plan"] = _plan_in(body.get("plan"), f"{where}.plan", positional)
    return out


def _target_in(data: Any, path: str) -> str:
    if isinstance(data, dict) and len(data) == 1:
        ((key, value),) = data.items()
        if key in ("Tag", "WorkerId") and isinstance(value, str):
            return ("tag:" if key == "Tag" else "worker:") + value
    words = {word: name for name, word in _TARGET_WORDS.items()}
    if isinstance(data, str) and data in words:
        return words[data]
    raise WireError("bad_plan", f"{path}: unknown target {_short(data)}")


def _key_hex(data: Any, path: str, code: str) -> str:
    if isinstance(data, bytes) and len(data) == 32:
        return data.hex()
    if isinstance(data, list) and len(data) == 32 and all(type(b) is int and 0 <= b < 256 for b in data):
        return bytes(data).hex()
    raise WireError(code, f"{path}: expected 32 byte values")


# --------------------------------------------------------------------------- the field codec


class _V1Fields:
    """Dialect hooks for the schema walker: JSON (named) or msgpack (named or positional)."""

    dialect: Literal["v1", "v2"] = "v1"

    def __init__(self, *, positional: bool) -> None:
        self.positional = positional

    def encode_field(self, kind: str, value: Any, path: str) -> Any:
        match kind:
            case "value":
                return None if value is None else encode_value(value, path)
            case "state":
                return None if value is None else encode_state(value, path)
            case "states":
                return {k: encode_state(v, f"{path}[{k!r}]") for k, v in value.items()}
            case "gradients":
                return {k: _gradients_out(v, f"{path}[{k!r}]") for k, v in value.items()}
            case "input":
                if value is None:
                    return None
                if isinstance(value, _DATA_REF_TYPES):
                    return {"source": "Reference", "data_ref": _ref_out(value, self, path)}
                return {"source": "Inline", "value": encode_value(value, path)}
            case "output":
                if isinstance(value, _DATA_REF_TYPES):
                    return {"delivery": "Reference", "data_ref": _ref_out(value, self, path)}
                return {"delivery": "Inline", "value": encode_value(value, path)}
            case "plan":
                return plan_to_v1(value)
            case "mode":
                if value == "Forward":
                    return "Forward"
                return {"Fit": record_to_map(value, self, path)}
            case "result":
                return _result_out(value, self, path)
            case "pickle":
                return base64.b64encode(value).decode("ascii")
            case "cache_key":
                return list(bytes.fromhex(value))
        raise WireError("encoding_error", f"{path}: field kind {kind!r} does not travel on wire v1")

    def decode_field(self, kind: str, raw: Any, path: str) -> Any:
        match kind:
            case "value" | "state":
                return None if raw is None else decode_value(raw, path)
            case "states":
                return {k: decode_value(v, f"{path}[{k!r}]") for k, v in _str_map(raw, path).items()}
            case "gradients":
                return {k: _gradients_in(v, f"{path}[{k!r}]") for k, v in _str_map(raw, path).items()}
            case "input":
                if raw is None:
                    return None
                return self._tagged(raw, path, "source", {"Inline": "value", "Reference": "data_ref"})
            case "output":
                return self._tagged(raw, path, "delivery", {"Inline": "value", "Reference": "data_ref"})
            case "plan":
                return plan_from_v1(raw, positional=self.positional)
            case "mode":
                return mode_from_map(raw, self, path)
            case "result":
                return _result_in(raw, self, path)
            case "pickle":
                return _pickle_in(raw, path)
            case "cache_key":
                return _key_hex(raw, path, "bad_message")
        raise WireError("bad_message", f"{path}: field does not travel on wire v1")

    def _tagged(self, raw: Any, path: str, tag_key: str, slots: dict[str, str]) -> Any:
        if self.positional and isinstance(raw, list) and len(raw) == 2:
            tag, payload = raw
        elif isinstance(raw, dict):
            tag = raw.get(tag_key)
            payload = raw.get(slots.get(tag, ""), _MISSING) if isinstance(tag, str) else _MISSING
        else:
            raise WireError("bad_message", f"{path}: expected a map tagged by {tag_key!r}")
        if tag == "Inline" and payload is not _MISSING:
            return decode_value(payload, path)
        if tag == "Reference" and payload is not _MISSING:
            return _ref_in(payload, self, f"{path}.data_ref")
        raise WireError("bad_message", f"{path}: bad {tag_key} {tag!r}")


_MISSING = object()
_JSON = _V1Fields(positional=False)
_MSGPACK = _V1Fields(positional=True)


def _str_map(raw: Any, path: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise WireError("bad_message", f"{path}: expected a map with string keys")
    return raw


def _gradients_out(grads: Any, path: str) -> dict[str, Any]:
    """One node's gradients as ``Json`` ``{param: nested lists}`` (§5.5)."""
    if not isinstance(grads, dict):
        raise WireError("encoding_error", f"{path}: gradients must be a map of parameter name to array")
    nonfinite: list[str] = []
    try:
        data = _to_json(grads, path, nonfinite)
    except _NotJson:
        raise WireError("encoding_error", f"{path}: gradients must be numeric arrays") from None
    if nonfinite:
        raise _nonfinite_error(nonfinite[0])
    return {"type": "Json", "data": data}


def _gradients_in(raw: Any, path: str) -> dict[str, Any]:
    value = decode_value(raw, path)
    if not isinstance(value, dict):
        raise WireError("bad_message", f"{path}: gradients must be a Json map")
    return value


def _pickle_in(raw: Any, path: str) -> bytes:
    if isinstance(raw, str):
        try:
            return base64.b64decode(raw, validate=True)
        except binascii.Error:
            raise WireError("bad_message", f"{path}: not standard padded base64") from None
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, list):
        return _bytes(raw, path)
    raise WireError("bad_message", f"{path}: expected base64 text")


def _result_out(result: Any, codec: _V1Fields, path: str) -> dict[str, Any]:
    if isinstance(result, PlanSuccess):
        return {"status": "Success", **record_to_map(result, codec, path)}
    if isinstance(result, PlanFailure):
        out: dict[str, Any] = {"status": "Failed", "error": result.error.message}
        out["duration_ms"] = result.duration_ms
        out["code"] = result.error.code
        if result.error.node_id is not None:
            out["node_id"] = result.error.node_id
        return out
    raise WireError("encoding_error", f"{path}: expected PlanSuccess or PlanFailure")


def _result_in(raw: Any, codec: _V1Fields, path: str) -> Any:
    if codec.positional and isinstance(raw, list) and raw:
        status, rest = raw[0], raw[1:]
        names = (
            ("output", "duration_ms", "states")
            if status == "Success"
            else ("error", "duration_ms", "code", "node_id")
        )
        raw = {"status": status, **dict(zip(names, rest, strict=False))}
    if not isinstance(raw, dict):
        raise WireError("bad_message", f"{path}: expected a PlanResult map")
    status = raw.get("status")
    body = {k: v for k, v in raw.items() if k != "status"}
    if status == "Success":
        return record_from_map(PlanSuccess, body, codec, path)
    if status == "Failed":
        message, code, node_id = raw.get("error"), raw.get("code", "internal"), raw.get("node_id")
        duration = raw.get("duration_ms", 0)
        if not isinstance(message, str) or code not in ERROR_CODES or type(duration) is not int:
            raise WireError("bad_message", f"{path}: Failed needs error text, a known code and duration_ms")
        if node_id is not None and not isinstance(node_id, str):
            raise WireError("bad_message", f"{path}.node_id: expected str")
        info = ErrorInfo(code=code, kind=ERROR_CODES[code][0], message=message, node_id=node_id)
        return PlanFailure(error=info, duration_ms=duration)
    raise WireError("bad_message", f'{path}.status: expected "Success" or "Failed", got {status!r}')


# --------------------------------------------------------------------------- messages


def dump_record(record: Record) -> dict[str, Any]:
    """The v1 JSON-ready map of a record (``Capabilities``, ``LoadMetrics``, ...)."""
    return record_to_map(record, _JSON)


def load_record(cls: type[Record], data: Any) -> Any:
    """Build a record from its v1 JSON map; ``WireError("bad_message")`` if it does not fit."""
    return record_from_map(cls, data, _JSON, cls.__name__)


def encode_json(message: Request | Reply) -> str:
    """A message as a v1 JSON text frame."""
    return _dumps(_message_map(message, _JSON))


def encode_stream(message: Request | Reply) -> bytes:
    """A message as a v1 msgpack binary frame (named-map encoding)."""
    body = _message_map(message, _MSGPACK)
    try:
        return msgpack.packb(body, use_bin_type=True, default=_numpy_default)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError("encoding_error", f"{message.type} cannot be encoded as msgpack: {exc}") from exc


def encode(message: Request | Reply) -> str | bytes:
    """The default v1 frame of a message: stream messages binary, everything else JSON text."""
    return encode_stream(message) if message.type in STREAM_MESSAGES else encode_json(message)


def decode_json(text: str | bytes) -> Request | Reply:
    """Decode a v1 JSON text frame; any malformation is ``WireError("bad_message")``."""
    try:
        data = json.loads(text)
    except _DECODE_ERRORS as exc:
        raise WireError("bad_message", f"undecodable JSON frame: {exc}") from exc
    return _decode_map(data, _JSON)


def decode_stream(data: bytes | bytearray | memoryview) -> Request | Reply:
    """Decode a v1 msgpack binary frame (named map or Soma 0.2.43 positional array)."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_no_ext)
    except (*_DECODE_ERRORS, msgpack.UnpackException) as exc:
        raise WireError("bad_message", f"undecodable msgpack frame: {exc}") from exc
    if isinstance(body, list) and body and isinstance(body[0], str) and body[0] in V1_MESSAGES:
        names = [f.name for f in wire_fields(MESSAGE_TYPES[body[0]], "v1")]
        if len(body) - 1 > len(names):
            raise WireError("bad_message", f"{body[0]}: too many positional fields")
        body = {"type": body[0], **dict(zip(names, body[1:], strict=False))}
    return _decode_map(body, _MSGPACK)


def decode(data: str | bytes | bytearray | memoryview) -> Request | Reply:
    """Decode one v1 WebSocket frame: text is JSON, binary is the msgpack stream sub-protocol."""
    if isinstance(data, str):
        return decode_json(data)
    return decode_stream(data)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of wire v1")


def _message_map(message: Request | Reply, codec: _V1Fields) -> dict[str, Any]:
    if message.type not in V1_MESSAGES:
        raise WireError("encoding_error", f"{message.type} is not a wire v1 message")
    return {"type": message.type, **record_to_map(message, codec)}


def _decode_map(data: Any, codec: _V1Fields) -> Request | Reply:
    if not isinstance(data, dict):
        raise WireError("bad_message", f"expected a message map, got {_type_name(data)}")
    kind = data.get("type")
    plan_id = _correlation(data)
    if not isinstance(kind, str) or kind not in V1_MESSAGES:
        raise WireError("bad_message", f"unknown message type {_short(kind)}", plan_id=plan_id)
    body = {k: v for k, v in data.items() if k != "type"}
    try:
        return record_from_map(MESSAGE_TYPES[kind], body, codec)  # type: ignore[no-any-return]
    except WireError as exc:
        exc.plan_id = exc.plan_id or plan_id
        raise
    except _DECODE_ERRORS as exc:
        raise WireError("bad_message", f"malformed {kind}: {exc}", plan_id=plan_id) from exc


def _correlation(data: dict[Any, Any]) -> str | None:
    """The plan, job or stream id a v1 reply must name, when the frame reveals it."""
    for holder, key in (
        (data, "plan_id"),
        (data.get("plan"), "plan_id"),
        (data.get("job"), "job_id"),
        (data, "stream_id"),
    ):
        if isinstance(holder, dict) and isinstance(holder.get(key), str):
            return holder[key]  # type: ignore[no-any-return]
    return None


def _dumps(data: Any) -> str:
    try:
        return json.dumps(
            data, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_numpy_default
        )
    except ValueError as exc:
        raise WireError(
            "encoding_error", f"non-finite value cannot travel over wire v1; use wire v2 ({exc})"
        ) from exc
    except TypeError as exc:
        raise WireError("encoding_error", f"value cannot travel over wire v1: {exc}") from exc


def _numpy_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
