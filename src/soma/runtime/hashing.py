"""Content hashing and filter identity: pure functions, no I/O.

    value ──content()──► 32-byte digest of a canonical encoding
    filter ──filter_identity()──► class name + code fingerprint + _version + requirements

These digests are what cache keys (``soma.runtime.keys``) are made of. The encoding
is process-independent: every value gets a type tag, then its payload with variable
parts length-prefixed, so equal values of different types never collide and nothing
depends on hash randomisation or memory addresses. Large buffers (arrays, tensors,
bytes, pickles) enter it as an XXH3-128 digest taken straight from their memory, so an
80 MB array costs one pass at memory speed. Classes and functions enter it through
their code (``soma.runtime.fingerprint``).

numpy, torch and pandas are recognised by ``type(value).__module__`` and never
imported here: a value of those types implies the library is already loaded.
"""

from __future__ import annotations

import array
import hashlib
import pickle
import struct
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle
import xxhash

from soma.runtime.fingerprint import code_digest, code_fingerprint

__all__ = ["Unhashable", "content", "filter_identity"]

_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_C128 = struct.Struct("<dd")
_LITTLE_ENDIAN = sys.byteorder == "little"
_INLINE_ITEMS = 32
_NDARRAY_TYPES = frozenset({"ndarray"})
_NUMPY_SCALAR_TYPES = frozenset({"generic"})
_TORCH_TYPES = frozenset({"Tensor"})
_PANDAS_TYPES = frozenset({"DataFrame", "Series", "Index"})


class Unhashable(Exception):  # noqa: N818 - the name api §6 gives it
    """Raised when a value has no canonical encoding (the message says why)."""


# --- filter identity ---------------------------------------------------------------------


def filter_identity(filter_obj: object, version: Any, requirements: tuple[str, ...]) -> bytes:
    """What identifies a filter's code in cache keys (api §6.1); the node id plays no part."""
    cls = type(filter_obj)
    return content(
        (
            f"{cls.__module__}:{cls.__qualname__}",
            code_fingerprint(cls),
            repr(version),
            tuple(sorted({str(r) for r in requirements})),
        )
    )


# --- content hashing ----------------------------------------------------------------------


def content(value: Any) -> bytes:
    """The 32-byte digest of ``value``'s canonical encoding (api §6.2).

    Equal values of the same type give equal bytes in any process; ``1``, ``1.0`` and
    ``True``, or ``[1]`` and ``(1,)``, give different bytes.

    Raises:
        Unhashable: for a reference cycle, nesting too deep to walk, or a value that
            neither pickle nor cloudpickle can serialise.
    """
    if value is None:  # the y of every unsupervised fit: skip building an encoder
        return _NONE_DIGEST
    encoder = _Encoder()
    try:
        encoder.encode(value)
    except RecursionError as exc:
        raise Unhashable("value is nested too deeply to hash") from exc
    return hashlib.sha256(encoder.out).digest()


_NONE_DIGEST = hashlib.sha256(b"N").digest()  # the encoding of None is its tag alone


def _buffer_digest(buffer: Any) -> bytes:
    return xxhash.xxh3_128_digest(buffer)


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _library_class(value: object, root: str, names: frozenset[str]) -> bool:
    """Whether ``value`` is an instance of one of ``names`` from the already-imported ``root``."""
    module = sys.modules.get(root)
    if module is None:
        return False
    return any(
        isinstance(value, cls)
        for cls in (getattr(module, name, None) for name in names)
        if isinstance(cls, type)
    )


def _is_filter(value: object) -> bool:
    return any(
        klass.__module__ == "soma.filter" and klass.__qualname__ == "Filter"
        for klass in type(value).__mro__
    )


class _Encoder:
    """Appends the canonical encoding of values to ``out``; one instance per ``content()``."""

    __slots__ = ("_active", "out")

    def __init__(self) -> None:
        self.out = bytearray()
        self._active: set[int] = set()

    def encode(self, value: Any) -> None:
        handler = _EXACT.get(type(value))
        if handler is not None:
            handler(self, value)
        else:
            self._encode_other(value)

    def encode_separately(self, value: Any) -> bytes:
        """The encoding of ``value`` on its own, for sorting dict keys and set elements."""
        saved = self.out
        self.out = bytearray()
        try:
            self.encode(value)
            return bytes(self.out)
        finally:
            self.out = saved

    def _enter(self, value: object) -> None:
        marker = id(value)
        if marker in self._active:
            raise Unhashable(f"reference cycle through a {type(value).__name__}")
        self._active.add(marker)

    def _leave(self, value: object) -> None:
        self._active.discard(id(value))

    def _tag(self, tag: bytes, count: int) -> None:
        self.out += tag
        self.out += _U64.pack(count)

    def _text(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self.out += _U64.pack(len(data))
        self.out += data

    # builtins, dispatched on the exact type

    def _none(self, value: None) -> None:
        self.out += b"N"

    def _bool(self, value: bool) -> None:
        self.out += b"B1" if value else b"B0"

    def _int(self, value: int) -> None:
        data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        self.out += b"I" + _U64.pack(len(data)) + data

    def _float(self, value: float) -> None:
        self.out += b"F" + _F64.pack(value)

    def _complex(self, value: complex) -> None:
        self.out += b"X"
        self.out += _C128.pack(value.real, value.imag)

    def _str(self, value: str) -> None:
        self.out += b"S"
        self._text(value)

    def _bytes(self, value: bytes) -> None:
        self._tag(b"Y", len(value))
        self.out += _buffer_digest(value)

    def _bytearray(self, value: bytearray) -> None:
        self._tag(b"A", len(value))
        self.out += _buffer_digest(value)

    def _memoryview(self, value: memoryview) -> None:
        self._tag(b"V", value.nbytes)
        self._text(value.format)
        self._shape(value.shape or ())
        self.out += _buffer_digest(value if value.c_contiguous else value.tobytes())

    def _list(self, value: list[Any]) -> None:
        self._sequence(b"L", value)

    def _tuple(self, value: tuple[Any, ...]) -> None:
        self._sequence(b"T", value)

    def _sequence(self, tag: bytes, value: list[Any] | tuple[Any, ...]) -> None:
        self._tag(tag, len(value))
        # Homogeneous float or int sequences (feature rows, label lists) are packed in
        # one C call; which form is used depends only on the value, so it stays canonical.
        kinds = set(map(type, value))
        if kinds == {float}:
            self._packed(b"f", array.array("d", value))
            return
        if kinds == {int}:
            try:
                packed = array.array("q", value)
            except OverflowError:
                pass
            else:
                self._packed(b"i", packed)
                return
        self._enter(value)
        self.out += b"*"
        exact = _EXACT
        for item in value:  # dispatch inlined: this loop is the hot path for nested data
            handler = exact.get(type(item))
            if handler is None:
                self._encode_other(item)
            else:
                handler(self, item)
        self._leave(value)

    def _packed(self, tag: bytes, values: array.array[Any]) -> None:
        if not _LITTLE_ENDIAN:  # pragma: no cover - no big-endian test machine
            values.byteswap()
        # The length is already encoded, so raw bytes for short rows and a digest for
        # long ones cannot be confused; short rows skip the digest call's overhead.
        payload = values.tobytes() if len(values) <= _INLINE_ITEMS else _buffer_digest(values)
        self.out += tag + payload

    def _dict(self, value: dict[Any, Any]) -> None:
        self._enter(value)
        entries = sorted(
            ((self.encode_separately(k), v) for k, v in value.items()), key=lambda e: e[0]
        )
        self._tag(b"D", len(entries))
        for encoded_key, item in entries:
            self.out += encoded_key
            self.encode(item)
        self._leave(value)

    def _set(self, value: set[Any] | frozenset[Any]) -> None:
        self._enter(value)
        self._tag(b"E" if type(value) is set else b"Z", len(value))
        for encoded in sorted(self.encode_separately(item) for item in value):
            self.out += encoded
        self._leave(value)

    def _shape(self, shape: Iterable[int]) -> None:
        dims = tuple(shape)
        self.out += _U64.pack(len(dims))
        for dim in dims:
            self.out += _U64.pack(dim)

    # everything else, in order of precedence

    def _encode_other(self, value: Any) -> None:
        cls = type(value)
        if getattr(cls, "__soma_hash__", None) is not None:
            self._soma_hash(value)
            return
        if _is_filter(value):
            self._filter(value)
            return
        root = cls.__module__.partition(".")[0]
        if root == "numpy" and self._numpy(value):
            return
        if root == "torch" and self._tensor(value):
            return
        if root == "pandas" and self._pandas(value):
            return
        if cls is types.FunctionType:
            self._function(value)
            return
        if isinstance(value, type):
            self.out += b"C"
            self._text(_qualified_name(value))
            self._text(code_fingerprint(value))
            return
        self._pickled(value)

    def _soma_hash(self, value: Any) -> None:
        try:
            result = value.__soma_hash__()
        except Exception as exc:  # user code: report it as the reason the value is unhashable
            raise Unhashable(
                f"{type(value).__name__}.__soma_hash__() raised {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(result, str):
            result = result.encode("utf-8")
        if not isinstance(result, (bytes, bytearray)):
            raise Unhashable(
                f"{type(value).__name__}.__soma_hash__() must return bytes or str, "
                f"got {type(result).__name__}"
            )
        self.out += b"H"
        self._text(_qualified_name(type(value)))
        self.out += _U64.pack(len(result))
        self.out += result

    def _filter(self, value: Any) -> None:
        self._enter(value)
        self.out += b"Q"
        requirements = tuple(getattr(value, "_requirements", ()) or ())
        self.out += filter_identity(value, getattr(value, "_version", None), requirements)
        params = {
            name: param
            for name, param in getattr(value, "__dict__", {}).items()
            if isinstance(name, str) and not name.startswith("_")
        }
        self.encode(params)
        self._leave(value)

    def _numpy(self, value: Any) -> bool:
        if _library_class(value, "numpy", _NDARRAY_TYPES):
            if type(value) is sys.modules["numpy"].ndarray:
                # numpy is never imported here, so its array type joins the exact-type
                # table when first met: later arrays skip the checks that led here.
                _EXACT[type(value)] = _Encoder._ndarray
            self._ndarray(value)
            return True
        if _library_class(value, "numpy", _NUMPY_SCALAR_TYPES):
            self.out += b"n"
            self._text(value.dtype.str)
            data = value.tobytes()
            self.out += _U64.pack(len(data))
            self.out += data
            return True
        return False

    def _ndarray(self, value: Any) -> None:
        dtype = value.dtype
        self.out += b"a"
        self._text(_qualified_name(type(value)))
        self._text(dtype.str if dtype.fields is None else str(dtype.descr))
        self._shape(value.shape)
        if dtype.hasobject:
            self.out += b"o"
            self.encode(value.tolist())
            return
        if not value.flags.c_contiguous:
            value = value.copy(order="C")
        self.out += b"b"
        self.out += _buffer_digest(value.reshape(-1).view("u1"))

    def _tensor(self, value: Any) -> bool:
        if not _library_class(value, "torch", _TORCH_TYPES):
            return False
        torch = sys.modules["torch"]
        try:
            tensor = value.detach()
            if tensor.layout != torch.strided:
                tensor = tensor.to_dense()
            tensor = tensor.cpu().resolve_conj().resolve_neg().contiguous()
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
        except (RuntimeError, TypeError, NotImplementedError):
            # Meta, quantized and other exotic tensors: let pickle describe them.
            return False
        self.out += b"t"
        self._text(_qualified_name(type(value)))
        self._text(str(value.dtype))
        self._shape(value.shape)
        self._text(value.device.type)
        self.out += b"g1" if value.requires_grad else b"g0"
        self.out += _buffer_digest(raw)
        return True

    def _pandas(self, value: Any) -> bool:
        if not _library_class(value, "pandas", _PANDAS_TYPES):
            return False
        pandas = sys.modules["pandas"]
        try:
            rows = pandas.util.hash_pandas_object(value, index=True).to_numpy()
        except TypeError:
            # Unhashable cells (lists, dicts) make pandas refuse; pickle still describes them.
            return False
        self.out += b"p"
        self._text(_qualified_name(type(value)))
        if isinstance(value, pandas.DataFrame):
            self.encode(list(value.columns))
            self.encode(list(value.columns.names))
            self.encode([str(dtype) for dtype in value.dtypes])
            index = value.index
        elif isinstance(value, pandas.Series):
            self.encode(value.name)
            self.encode(str(value.dtype))
            index = value.index
        else:
            index = value
        self.encode(list(index.names))
        self.encode(str(index.dtype))
        self.out += _U64.pack(len(rows))
        self.out += _buffer_digest(rows)
        return True

    def _function(self, value: types.FunctionType) -> None:
        self._enter(value)
        self.out += b"U"
        self._text(value.__module__ or "")
        self._text(value.__qualname__)
        self.out += code_digest(value.__code__)
        self.encode(value.__defaults__)
        self.encode(value.__kwdefaults__)
        cells = value.__closure__ or ()
        self.out += _U64.pack(len(cells))
        for cell in cells:
            try:
                contents = cell.cell_contents
            except ValueError:  # a cell not yet assigned
                self.out += b"-"
            else:
                self.out += b"+"
                self.encode(contents)
        self._leave(value)

    def _pickled(self, value: Any) -> None:
        try:
            blob = pickle.dumps(value, protocol=5)
        except Exception as exc:  # user __reduce__ methods may raise anything
            try:
                blob = cloudpickle.dumps(value, protocol=5)
            except Exception as fallback_exc:  # same: arbitrary user code runs here
                raise Unhashable(
                    f"cannot hash a {_qualified_name(type(value))}: pickle failed ({exc}) "
                    f"and cloudpickle failed ({fallback_exc}); give the class a "
                    "__soma_hash__() method returning bytes"
                ) from fallback_exc
        self.out += b"P"
        self._text(_qualified_name(type(value)))
        self.out += _U64.pack(len(blob))
        self.out += _buffer_digest(blob)


_EXACT: dict[type, Callable[[_Encoder, Any], None]] = {
    type(None): _Encoder._none,
    bool: _Encoder._bool,
    int: _Encoder._int,
    float: _Encoder._float,
    complex: _Encoder._complex,
    str: _Encoder._str,
    bytes: _Encoder._bytes,
    bytearray: _Encoder._bytearray,
    memoryview: _Encoder._memoryview,
    list: _Encoder._list,
    tuple: _Encoder._tuple,
    dict: _Encoder._dict,
    set: _Encoder._set,
    frozenset: _Encoder._set,
}
