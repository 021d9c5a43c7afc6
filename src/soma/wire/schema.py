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
from collections.abc import Callable
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


class _Mismatch(Exception):
    """A compiled converter's refusal; the checking walk then names what is wrong and where."""


_Convert = Callable[[Any, "FieldCodec"], Any]


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One wire field of a record, with what the walkers need precomputed."""

    name: str
    required: bool
    optional: bool
    kind: str | None
    hint: Any
    convert: _Convert


@dataclasses.dataclass(frozen=True)
class _Layout:
    slots: tuple[_Slot, ...]
    names: frozenset[str]


_LAYOUTS: dict[tuple[type, str], _Layout] = {}


def _layout(cls: type[Record], dialect: str) -> _Layout:
    """The wire fields of ``cls`` in ``dialect``, computed once per class (messages are decoded per frame)."""
    layout = _LAYOUTS.get((cls, dialect))
    if layout is None:
        hints = typing.get_type_hints(cls)
        slots = tuple(
            _Slot(
                name=f.name,
                required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                optional=bool(f.metadata.get("optional")),
                kind=f.metadata.get("kind"),
                hint=hints[f.name],
                convert=_compiled(hints[f.name]),
            )
            for f in wire_fields(cls, dialect)
        )
        layout = _LAYOUTS[(cls, dialect)] = _Layout(slots, frozenset(slot.name for slot in slots))
    return layout


def record_to_map(record: Record, codec: FieldCodec, path: str = "") -> dict[str, Any]:
    """The wire map of a record, in field order, without ``type``, ``id`` or ``re``."""
    out: dict[str, Any] = {}
    for slot in _layout(type(record), codec.dialect).slots:
        value = getattr(record, slot.name)
        if value is None and slot.optional:
            continue
        if slot.kind:
            out[slot.name] = codec.encode_field(slot.kind, value, _at(path, slot.name))
        elif isinstance(value, Record | list | tuple):
            out[slot.name] = _plain_out(value, codec, _at(path, slot.name))
        else:
            out[slot.name] = value
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
    layout = _layout(cls, codec.dialect)
    if codec.positional and isinstance(data, list):
        if len(data) > len(layout.slots):
            raise WireError("bad_message", f"{path or cls.__name__}: too many positional fields")
        data = {slot.name: item for slot, item in zip(layout.slots, data, strict=False)}
    if not isinstance(data, dict):
        raise WireError("bad_message", f"{path or cls.__name__}: expected a map, got {_type_name(data)}")
    kwargs: dict[str, Any] = {}
    for slot in layout.slots:
        if slot.name not in data:
            if slot.required:
                raise WireError("bad_message", f"{_at(path, slot.name)}: missing in {cls.__name__}")
            continue
        raw = data[slot.name]
        if raw is None and slot.optional:
            kwargs[slot.name] = None
        elif slot.kind:
            kwargs[slot.name] = codec.decode_field(slot.kind, raw, _at(path, slot.name))
        else:
            try:
                kwargs[slot.name] = slot.convert(raw, codec)
            except (_Mismatch, WireError):
                # The checking walk says what is wrong, and where (it raises).
                kwargs[slot.name] = _conform(raw, slot.hint, codec, _at(path, slot.name))
    if not layout.names.issuperset(data):
        unknown = [key for key in data if key not in layout.names]
        wire_logger.debug("ignoring unknown keys %s in %s", unknown, path or cls.__name__)
    return cls(**kwargs)


def _at(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def mode_from_map(raw: Any, codec: FieldCodec, path: str) -> Any:
    """A plan's ``mode``, the same in both dialects: ``"Forward"`` or ``{"Fit": {...}}``."""
    if raw == "Forward":
        return "Forward"
    if isinstance(raw, dict) and set(raw) == {"Fit"}:
        return record_from_map(FitMode, raw["Fit"], codec, f"{path}.Fit")
    raise WireError("bad_message", f'{path}: expected "Forward" or {{"Fit": ...}}')


_CONVERTERS: dict[Any, _Convert] = {}


def _compiled(hint: Any) -> _Convert:
    """A converter for ``hint`` that does what ``_conform`` does, without building paths.

    It raises ``_Mismatch`` (or a nested ``WireError``) where ``_conform`` raises; the
    caller then runs ``_conform`` for the located message.
    """
    convert = _CONVERTERS.get(hint)
    if convert is None:
        convert = _CONVERTERS[hint] = _make_converter(hint)
    return convert


def _identity(raw: Any, codec: FieldCodec) -> Any:
    return raw


def _make_converter(hint: Any) -> _Convert:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return _identity
    if origin in (typing.Union, types.UnionType):
        return _union_converter(args)
    if origin is Literal:
        allowed = [(value, type(value)) for value in args]

        def literal(raw: Any, codec: FieldCodec) -> Any:
            if (raw, type(raw)) in allowed:
                return raw
            raise _Mismatch

        return literal
    if origin in (list, tuple, dict):
        return _container_converter(origin, args)
    if isinstance(hint, type) and issubclass(hint, Record):
        record: type[Record] = hint
        return lambda raw, codec: record_from_map(record, raw, codec)
    if hint is float:

        def floating(raw: Any, codec: FieldCodec) -> Any:
            if type(raw) is float:
                return raw
            if type(raw) is int:
                return float(raw)
            raise _Mismatch

        return floating
    if hint in (int, str, bool, bytes):
        exact: type = hint

        def scalar(raw: Any, codec: FieldCodec) -> Any:
            if type(raw) is exact:
                return raw
            raise _Mismatch

        return scalar
    raise TypeError(f"unsupported field type {hint!r}")  # a schema declaring a type the walker does not know


def _union_converter(args: tuple[Any, ...]) -> _Convert:
    nullable = type(None) in args
    arms = [_compiled(arm) for arm in args if arm is not type(None)]

    def union(raw: Any, codec: FieldCodec) -> Any:
        if raw is None and nullable:
            return None
        for arm in arms:
            try:
                return arm(raw, codec)
            except (_Mismatch, WireError):
                continue
        raise _Mismatch

    return union


def _container_converter(origin: Any, args: tuple[Any, ...]) -> _Convert:
    if origin is list:
        item = _compiled(args[0])

        def listed(raw: Any, codec: FieldCodec) -> Any:
            if not isinstance(raw, list):
                raise _Mismatch
            return [item(value, codec) for value in raw]

        return listed
    if origin is tuple:
        arms = [_compiled(arm) for arm in args]

        def tupled(raw: Any, codec: FieldCodec) -> Any:
            if not isinstance(raw, list | tuple) or len(raw) != len(arms):
                raise _Mismatch
            return tuple(arm(value, codec) for arm, value in zip(arms, raw, strict=True))

        return tupled
    key_of, value_of = _compiled(args[0]), _compiled(args[1])

    def mapped(raw: Any, codec: FieldCodec) -> Any:
        if not isinstance(raw, dict):
            raise _Mismatch
        return {key_of(key, codec): value_of(value, codec) for key, value in raw.items()}

    return mapped


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
