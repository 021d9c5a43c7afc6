"""The schema walker shared by the codecs: wire records to plain maps and back.

Plain fields are checked against their type hints (lists to tuples and ints to
floats where the hint says so); fields marked with a ``kind`` are handed to the
dialect's :class:`FieldCodec`, which converts values, states, plans, modes, results,
pickles and cache keys its own way. Unknown keys are ignored and logged at DEBUG,
as worker.md §5.1 asks, so additive fields never break an older peer.

Control messages are decoded and encoded per frame, so each record class gets, once
per dialect, a decoder and an encoder compiled from its fields: straight-line code
that converts well-formed input and refuses anything else without saying why. A
refusal reruns the record through the checking walk, which builds the paths and
raises the located ``WireError``; only broken input pays for paths.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
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
    """A compiled decoder's refusal; the checking walk then names what is wrong and where."""


_Convert = Callable[[Any, FieldCodec], Any]
_Encode = Callable[[Any, FieldCodec], dict[str, Any]]


class _Decode(Protocol):
    """A compiled decoder: the record of a wire map, or ``_Mismatch``/``WireError`` if it is broken."""

    def __call__(self, data: Any, codec: FieldCodec, given: Mapping[str, Any] = ..., /) -> Any: ...

_NOTHING: Mapping[str, Any] = types.MappingProxyType({})
# Values the encoders pass through as they are (``_plain_out`` rebuilds records, lists and tuples).
_NATIVE = frozenset({str, int, float, bool, bytes, type(None), dict})
_EXACT = (str, int, bool, bytes)
"""Hints whose values are checked by exact type alone."""


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One wire field of a record, with what the walkers need precomputed."""

    name: str
    required: bool
    optional: bool
    kind: str | None
    hint: Any
    default: Any
    factory: Any


@dataclasses.dataclass(frozen=True)
class _Layout:
    slots: tuple[_Slot, ...]
    names: frozenset[str]


_LAYOUTS: dict[tuple[type, str], _Layout] = {}


def _layout(cls: type[Record], dialect: str) -> _Layout:
    """The wire fields of ``cls`` in ``dialect``, computed once per class."""
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
                default=f.default,
                factory=f.default_factory,
            )
            for f in wire_fields(cls, dialect)
        )
        layout = _LAYOUTS[(cls, dialect)] = _Layout(slots, frozenset(slot.name for slot in slots))
    return layout


# --------------------------------------------------------------------------- records to maps


def record_to_map(record: Record, codec: FieldCodec, path: str = "") -> dict[str, Any]:
    """The wire map of a record, in field order, without ``type``, ``id`` or ``re``."""
    try:
        return _encoder(type(record), codec.dialect)(record, codec)
    except WireError:
        # The compiled encoder passes no paths; the walk redoes the record to locate the error.
        return _checked_map(record, codec, path)


def _checked_map(record: Record, codec: FieldCodec, path: str) -> dict[str, Any]:
    """What the compiled encoder does, with the path of every field at hand for errors."""
    out: dict[str, Any] = {}
    for slot in _layout(type(record), codec.dialect).slots:
        value = getattr(record, slot.name)
        if value is None and slot.optional:
            continue
        if slot.kind:
            out[slot.name] = codec.encode_field(slot.kind, value, _at(path, slot.name))
        else:
            out[slot.name] = _plain_out(value, codec, _at(path, slot.name))
    return out


def _plain_out(value: Any, codec: FieldCodec, path: str) -> Any:
    if isinstance(value, Record):
        return record_to_map(value, codec, path)
    if isinstance(value, list | tuple):
        return [_plain_out(item, codec, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


def _plain_fast(value: Any, codec: FieldCodec) -> Any:
    """``_plain_out`` without paths, for the compiled encoders."""
    if isinstance(value, Record):
        return _encoder(type(value), codec.dialect)(value, codec)
    if isinstance(value, list | tuple):
        return [item if type(item) in _NATIVE else _plain_fast(item, codec) for item in value]
    return value


_ENCODERS: dict[tuple[type, str], _Encode] = {}


def _encoder(cls: type[Record], dialect: str) -> _Encode:
    encode = _ENCODERS.get((cls, dialect))
    if encode is None:
        encode = _ENCODERS[(cls, dialect)] = _compile_encoder(cls, dialect)
    return encode


def _compile_encoder(cls: type[Record], dialect: str) -> _Encode:
    """Straight-line ``_checked_map`` for ``cls``; kind fields get their name as a provisional path."""
    slots = _layout(cls, dialect).slots
    name = f"encode_{cls.__name__}_{dialect}"
    lines = [f"def {name}(record, codec):"]
    if any(slot.kind for slot in slots):
        lines.append("    encode_field = codec.encode_field")
    lines.append("    out = {}")
    for slot in slots:
        key = repr(slot.name)
        lines.append(f"    value = record.{slot.name}")
        if slot.kind:
            value = f"encode_field({slot.kind!r}, value, {key})"
        else:
            value = "value if type(value) in native else plain(value, codec)"
        if slot.optional:
            lines += ["    if value is not None:", f"        out[{key}] = {value}"]
        else:
            lines.append(f"    out[{key}] = {value}")
    lines.append("    return out")
    return _define(lines, name, {"native": _NATIVE, "plain": _plain_fast})


# --------------------------------------------------------------------------- maps to records


def record_from_map(
    cls: type[Record],
    data: Any,
    codec: FieldCodec,
    path: str = "",
    *,
    given: Mapping[str, Any] | None = None,
) -> Any:
    """Build ``cls`` from its wire map (or positional array where the codec allows it).

    ``given`` holds fields that do not travel in the map (a message's ``id`` or ``re``),
    passed to the constructor as they are. Missing required fields and ill-typed plain
    fields raise ``WireError("bad_message")``; unknown keys are ignored with a DEBUG log.
    """
    if codec.positional and isinstance(data, list):
        slots = _layout(cls, codec.dialect).slots
        if len(data) > len(slots):
            raise WireError("bad_message", f"{path or cls.__name__}: too many positional fields")
        data = {slot.name: item for slot, item in zip(slots, data, strict=False)}
    try:
        return _decoder(cls, codec.dialect)(data, codec, given or _NOTHING)
    except (_Mismatch, WireError):
        # The walk raises the located error (or, for unknown keys, logs them and builds the record).
        return _checked_record(cls, data, codec, path, given or _NOTHING)


def _checked_record(
    cls: type[Record], data: Any, codec: FieldCodec, path: str, given: Mapping[str, Any]
) -> Any:
    """What the compiled decoder does, naming what is wrong and where."""
    layout = _layout(cls, codec.dialect)
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
            kwargs[slot.name] = _conform(raw, slot.hint, codec, _at(path, slot.name))
    if not layout.names.issuperset(data):
        unknown = [key for key in data if key not in layout.names]
        wire_logger.debug("ignoring unknown keys %s in %s", unknown, path or cls.__name__)
    return cls(**kwargs, **given)


def _at(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def mode_from_map(raw: Any, codec: FieldCodec, path: str) -> Any:
    """A plan's ``mode``, the same in both dialects: ``"Forward"`` or ``{"Fit": {...}}``."""
    if raw == "Forward":
        return "Forward"
    if isinstance(raw, dict) and len(raw) == 1 and "Fit" in raw:
        return record_from_map(FitMode, raw["Fit"], codec, f"{path}.Fit")
    raise WireError("bad_message", f'{path}: expected "Forward" or {{"Fit": ...}}')


_DECODERS: dict[tuple[type, str], _Decode] = {}


def _decoder(cls: type[Record], dialect: str) -> _Decode:
    decode = _DECODERS.get((cls, dialect))
    if decode is None:
        decode = _DECODERS[(cls, dialect)] = _compile_decoder(cls, dialect)
    return decode


def _compile_decoder(cls: type[Record], dialect: str) -> _Decode:
    """Straight-line ``_checked_record`` for ``cls`` that raises ``_Mismatch`` where the walk explains.

    Unknown keys are a refusal too, so that the walk logs them under their path.
    """
    slots = _layout(cls, dialect).slots
    name = f"decode_{cls.__name__}_{dialect}"
    namespace: dict[str, Any] = {"cls": cls, "Mismatch": _Mismatch, "NOTHING": _NOTHING}
    lines = [f"def {name}(data, codec, given=NOTHING):", "    if type(data) is not dict:"]
    lines.append("        raise Mismatch")
    if any(slot.kind for slot in slots):
        lines.append("    decode_field = codec.decode_field")
    lines.append("    found = 0")
    for i, slot in enumerate(slots):
        key, target = repr(slot.name), f"v{i}"
        lines += [f"    if {key} in data:", f"        raw = data[{key}]", "        found += 1"]
        if slot.kind:
            convert = [f"{target} = decode_field({slot.kind!r}, raw, {key})"]
            if slot.optional:
                convert = _or_none(target, convert)
        else:
            hint = _nullable(slot.hint) if slot.optional else slot.hint
            convert = _conversion(hint, target, f"hint{i}", namespace, dialect)
        lines += [f"        {line}" for line in convert]
        lines.append("    else:")
        if slot.required:
            lines.append("        raise Mismatch")
        elif slot.factory is not dataclasses.MISSING:
            namespace[f"make{i}"] = slot.factory
            lines.append(f"        {target} = make{i}()")
        else:
            namespace[f"default{i}"] = slot.default
            lines.append(f"        {target} = default{i}")
    lines += ["    if found != len(data):", "        raise Mismatch"]
    lines += _construction(cls, slots, namespace)
    return _define(lines, name, namespace)


def _construction(cls: type[Record], slots: tuple[_Slot, ...], namespace: dict[str, Any]) -> list[str]:
    """Lines returning the record of the decoded ``v0``, ``v1``, ... and the ``given`` fields.

    A frozen dataclass's ``__init__`` sets every field through ``object.__setattr__``, which
    costs more than decoding a plain field; where ``__init__`` does nothing else, the record
    gets its instance dict at once, in field order, as unpickling builds it.
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    decoded = {slot.name: f"v{i}" for i, slot in enumerate(slots)}
    others = [f for f in fields if f.name not in decoded]
    if (
        hasattr(cls, "__post_init__")
        or hasattr(cls, "__slots__")
        or not all(f.init for f in fields)
        or any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in others)
    ):
        arguments = "".join(f"{name}={value}, " for name, value in decoded.items())
        return [f"    return cls({arguments}**given)"]
    entries = []
    for f in fields:
        key = repr(f.name)
        if f.name in decoded:
            value = decoded[f.name]
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"make_{f.name}"] = f.default_factory
            value = f"given[{key}] if {key} in given else make_{f.name}()"
        else:
            namespace[f"default_{f.name}"] = f.default
            value = f"given.get({key}, default_{f.name})"
        entries.append(f"{key}: {value}")
    namespace["new"] = object.__new__
    state = "{" + ", ".join(entries) + "}"
    return ["    record = new(cls)", f"    record.__dict__.update({state})", "    return record"]


def _nullable(hint: Any) -> Any:
    """``hint`` with ``None`` allowed: what an optional field accepts."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return hint
    return hint | None


def _or_none(target: str, convert: list[str]) -> list[str]:
    return ["if raw is None:", f"    {target} = None", "else:", *(f"    {line}" for line in convert)]


def _conversion(hint: Any, target: str, name: str, namespace: dict[str, Any], dialect: str) -> list[str]:
    """Lines setting ``target`` from ``raw`` as ``_conform`` would, inlined for common hints."""
    args = typing.get_args(hint)
    if hint is Any:
        return [f"{target} = raw"]
    if hint in _EXACT:
        namespace[name] = hint
        return [f"if type(raw) is not {name}:", "    raise Mismatch", f"{target} = raw"]
    if hint is float:
        return [
            "if type(raw) is float:",
            f"    {target} = raw",
            "elif type(raw) is int:",
            f"    {target} = float(raw)",
            "else:",
            "    raise Mismatch",
        ]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        (arm,) = (arm for arm in args if arm is not type(None))
        return _or_none(target, _conversion(arm, target, name, namespace, dialect))
    namespace[f"convert_{target}"] = _compiled(hint, dialect)
    return [f"{target} = convert_{target}(raw, codec)"]


def _define(lines: list[str], name: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """The function ``name`` defined by the generated source ``lines``."""
    exec(compile("\n".join(lines) + "\n", f"<soma.wire.schema {name}>", "exec"), namespace)
    function: Callable[..., Any] = namespace[name]
    return function


# --------------------------------------------------------------------------- plain fields


_CONVERTERS: dict[tuple[Any, str], _Convert] = {}


def _compiled(hint: Any, dialect: str) -> _Convert:
    """A converter for ``hint`` that does what ``_conform`` does, without building paths.

    It raises ``_Mismatch`` (or a nested ``WireError``) where ``_conform`` raises; the
    caller then runs ``_conform`` for the located message.
    """
    convert = _CONVERTERS.get((hint, dialect))
    if convert is None:
        convert = _CONVERTERS[(hint, dialect)] = _make_converter(hint, dialect)
    return convert


def _identity(raw: Any, codec: FieldCodec) -> Any:
    return raw


def _make_converter(hint: Any, dialect: str) -> _Convert:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return _identity
    if origin in (typing.Union, types.UnionType):
        return _union_converter(args, dialect)
    if origin is Literal:
        allowed = [(value, type(value)) for value in args]

        def literal(raw: Any, codec: FieldCodec) -> Any:
            if (raw, type(raw)) in allowed:
                return raw
            raise _Mismatch

        return literal
    if origin in (list, tuple, dict):
        return _container_converter(origin, args, dialect)
    if isinstance(hint, type) and issubclass(hint, Record):
        return _decoder(hint, dialect)
    if hint is float:

        def floating(raw: Any, codec: FieldCodec) -> Any:
            if type(raw) is float:
                return raw
            if type(raw) is int:
                return float(raw)
            raise _Mismatch

        return floating
    if hint in _EXACT:
        exact: type = hint

        def scalar(raw: Any, codec: FieldCodec) -> Any:
            if type(raw) is exact:
                return raw
            raise _Mismatch

        return scalar
    raise TypeError(f"unsupported field type {hint!r}")  # a schema declaring a type the walker does not know


def _union_converter(args: tuple[Any, ...], dialect: str) -> _Convert:
    nullable = type(None) in args
    arms = [_compiled(arm, dialect) for arm in args if arm is not type(None)]

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


def _container_converter(origin: Any, args: tuple[Any, ...], dialect: str) -> _Convert:
    if origin is list:
        return _list_converter(args[0], dialect)
    if origin is tuple:
        arms = [_compiled(arm, dialect) for arm in args]

        def tupled(raw: Any, codec: FieldCodec) -> Any:
            if not isinstance(raw, list | tuple) or len(raw) != len(arms):
                raise _Mismatch
            return tuple(arm(value, codec) for arm, value in zip(arms, raw, strict=True))

        return tupled
    if args[0] in _EXACT and args[1] is Any:
        exact: type = args[0]

        def keyed(raw: Any, codec: FieldCodec) -> Any:
            if not isinstance(raw, dict):
                raise _Mismatch
            for key in raw:
                if type(key) is not exact:
                    raise _Mismatch
            return dict(raw)

        return keyed
    key_of, value_of = _compiled(args[0], dialect), _compiled(args[1], dialect)

    def mapped(raw: Any, codec: FieldCodec) -> Any:
        if not isinstance(raw, dict):
            raise _Mismatch
        return {key_of(key, codec): value_of(value, codec) for key, value in raw.items()}

    return mapped


def _list_converter(hint: Any, dialect: str) -> _Convert:
    if hint in _EXACT:
        exact: type = hint

        def scalars(raw: Any, codec: FieldCodec) -> Any:
            if not isinstance(raw, list):
                raise _Mismatch
            for value in raw:
                if type(value) is not exact:
                    raise _Mismatch
            return list(raw)

        return scalars
    item = _compiled(hint, dialect)

    def listed(raw: Any, codec: FieldCodec) -> Any:
        if not isinstance(raw, list):
            raise _Mismatch
        return [item(value, codec) for value in raw]

    return listed


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
