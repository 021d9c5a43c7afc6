"""The schema walker shared by the codecs: wire records to plain maps and back.

Plain fields are checked against their type hints (lists to tuples and ints to
floats where the hint says so); fields marked with a ``kind`` are handed to the
dialect's :class:`FieldCodec`, which converts values, states, plans, modes, results,
pickles and cache keys its own way. Unknown keys are ignored and logged at DEBUG,
as worker.md §5.1 asks, so additive fields never break an older peer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Protocol

from soma.log import wire_logger
from soma.wire.errors import WireError
from soma.wire.messages import FitMode, Record

__all__ = ["FieldCodec", "mode_from_map", "record_from_map", "record_to_map", "wire_fields"]


class FieldCodec(Protocol):
    """What a dialect supplies to the schema walker."""

    dialect: Literal["v1", "v2"]
    #: Whether records may arrive as positional arrays (Soma 0.2.43 msgpack).
    positional: bool

    def encode_field(self, kind: str, value: Any, path: str) -> Any:
        """Convert a field marked ``kind`` to its wire form."""
        ...

    def decode_field(self, kind: str, raw: Any, path: str) -> Any:
        """Convert the wire form of a field marked ``kind`` back."""
        ...


def wire_fields(cls: type[Record], dialect: str) -> list[dataclasses.Field[Any]]:
    """The fields of ``cls`` that travel in ``dialect``, in wire order (``id``/``re`` excluded)."""
    return [
        f
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in ("id", "re") and f.metadata.get("only") in (None, dialect)
    ]


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def record_to_map(record: Record, codec: FieldCodec, path: str = "") -> dict[str, Any]:
    """The wire map of a record, in field order, without ``type``, ``id`` or ``re``."""
    out: dict[str, Any] = {}
    for f in wire_fields(type(record), codec.dialect):
        value = getattr(record, f.name)
        if value is None and f.metadata.get("optional"):
            continue
        kind = f.metadata.get("kind")
        where = f"{path}.{f.name}" if path else f.name
        out[f.name] = codec.encode_field(kind, value, where) if kind else _plain_out(value, codec, where)
    return out


def _plain_out(value: Any, codec: FieldCodec, path: str) -> Any:
    if isinstance(value, Record):
        return record_to_map(value, codec, path)
    if isinstance(value, list | tuple):
        return [_plain_out(item, codec, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


def record_from_map(cls: type[Record], data: Any, codec: FieldCodec, path: str = "") -> Any:
    """Build ``cls`` from its wire map (or positional array where the codec allows it).

    Missing required fields and ill-typed plain fields raise ``WireError("bad_message")``;
    unknown keys are ignored with a DEBUG log.
    """
    known = wire_fields(cls, codec.dialect)
    if codec.positional and isinstance(data, list):
        if len(data) > len(known):
            raise WireError("bad_message", f"{path or cls.__name__}: too many positional fields")
        data = {f.name: item for f, item in zip(known, data, strict=False)}
    if not isinstance(data, dict):
        raise WireError("bad_message", f"{path or cls.__name__}: expected a map, got {_type_name(data)}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in known:
        where = f"{path}.{f.name}" if path else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError("bad_message", f"{where}: missing in {cls.__name__}")
            continue
        raw = data[f.name]
        kind = f.metadata.get("kind")
        if raw is None and f.metadata.get("optional"):
            kwargs[f.name] = None
        elif kind:
            kwargs[f.name] = codec.decode_field(kind, raw, where)
        else:
            kwargs[f.name] = _conform(raw, hints[f.name], codec, where)
    unknown = [key for key in data if key not in {f.name for f in known}]
    if unknown:
        wire_logger.debug("ignoring unknown keys %s in %s", unknown, path or cls.__name__)
    return cls(**kwargs)


def mode_from_map(raw: Any, codec: FieldCodec, path: str) -> Any:
    """A plan's ``mode``, the same in both dialects: ``"Forward"`` or ``{"Fit": {...}}``."""
    if raw == "Forward":
        return "Forward"
    if isinstance(raw, dict) and set(raw) == {"Fit"}:
        return record_from_map(FitMode, raw["Fit"], codec, f"{path}.Fit")
    raise WireError("bad_message", f'{path}: expected "Forward" or {{"Fit": ...}}')


def _conform(raw: Any, hint: Any, codec: FieldCodec, path: str) -> Any:
    """Check ``raw`` against a type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return raw
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        failures = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _conform(raw, arm, codec, path)
            except WireError as exc:
                failures.append(exc.message)
        raise WireError(
            "bad_message", failures[0] if len(failures) == 1 else f"{path}: unexpected {_type_name(raw)}"
        )
    if origin is Literal:
        if raw in args and type(raw) in {type(a) for a in args}:
            return raw
        raise WireError("bad_message", f"{path}: expected one of {list(args)}, got {raw!r}")
    if origin is list:
        if not isinstance(raw, list):
            raise WireError("bad_message", f"{path}: expected a list, got {_type_name(raw)}")
        return [_conform(item, args[0], codec, f"{path}[{i}]") for i, item in enumerate(raw)]
    if origin is tuple:
        if not isinstance(raw, list | tuple) or len(raw) != len(args):
            raise WireError("bad_message", f"{path}: expected a list of {len(args)} items")
        pairs = enumerate(zip(raw, args, strict=True))
        return tuple(_conform(item, arm, codec, f"{path}[{i}]") for i, (item, arm) in pairs)
    if origin is dict:
        if not isinstance(raw, dict):
            raise WireError("bad_message", f"{path}: expected a map, got {_type_name(raw)}")
        return {
            _conform(key, args[0], codec, f"{path} key"): _conform(value, args[1], codec, f"{path}[{key!r}]")
            for key, value in raw.items()
        }
    if isinstance(hint, type) and issubclass(hint, Record):
        return record_from_map(hint, raw, codec, path)
    if hint is float:
        if type(raw) in (int, float):
            return float(raw)
    elif hint is int:
        if type(raw) is int:
            return raw
    elif hint in (str, bool, bytes):
        if type(raw) is hint:
            return raw
    else:  # pragma: no cover - a schema declaring a type the walker does not know
        raise TypeError(f"unsupported field type {hint!r} at {path}")
    raise WireError("bad_message", f"{path}: expected {hint.__name__}, got {_type_name(raw)}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
