"""Content hashing and cache keys: pure functions, no I/O.

    value ──content()──► 32-byte digest of a canonical encoding
    filter ──filter_identity()──► class name + code fingerprint + _version + requirements
    parts ──cache_key()──► SHA-256 hex  (fit_key, out_key, fanin_key build on it)

The encoding is process-independent: every value gets a type tag, then its payload
with variable parts length-prefixed, so equal values of different types never
collide and nothing depends on hash randomisation or memory addresses. Large buffers
(arrays, tensors, bytes, pickles) enter it as an XXH3-128 digest taken straight from
their memory, so an 80 MB array costs one pass at memory speed.

numpy, torch and pandas are recognised by ``type(value).__module__`` and never
imported here: a value of those types implies the library is already loaded.
"""

from __future__ import annotations

import array
import ast
import hashlib
import inspect
import linecache
import pickle
import struct
import sys
import textwrap
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle
import xxhash

from soma.errors import SomaConfigError
from soma.runtime.usercode import is_user_module

__all__ = [
    "Unhashable",
    "cache_key",
    "code_fingerprint",
    "content",
    "fanin_key",
    "filter_identity",
    "fit_key",
    "out_key",
]

_KEY_PREFIX = b"soma-cache-v1"
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


# --- cache keys ---------------------------------------------------------------------------


def cache_key(*parts: bytes | str) -> str:
    """SHA-256 hex over ``soma-cache-v1`` then each part prefixed by its u64 LE byte length."""
    digest = hashlib.sha256(_KEY_PREFIX)
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"cache key parts must be bytes or str, got {type(part).__name__}")
        digest.update(_U64.pack(len(data)))
        digest.update(data)
    return digest.hexdigest()


def _seed_part(seed: int | None) -> str:
    if seed is None:
        return "none"
    if type(seed) is not int:
        raise SomaConfigError(f"seed must be None or an int, got {seed!r}")
    return str(seed)


def _batch_part(batch_size: int | None) -> str:
    if batch_size is None:
        return ""
    if type(batch_size) is not int or batch_size < 1:
        raise SomaConfigError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    return str(batch_size)


def fit_key(
    identity: bytes,
    params: bytes,
    in_key: bytes | str,
    y: bytes,
    seed: int | None,
    batch_size: int | None,
) -> str:
    """Key of the state a node's ``fit`` produces (api §6.1).

    ``params`` and ``y`` are ``content()`` digests; ``in_key`` is the input's key or digest.
    """
    return cache_key(
        "state", identity, params, in_key, y, _seed_part(seed), _batch_part(batch_size)
    )


def out_key(
    identity: bytes, params: bytes, state_key: str, in_key: bytes | str, seed: int | None
) -> str:
    """Key of a node's ``forward`` output given the key of the state it used (api §6.1)."""
    return cache_key("output", identity, params, state_key, in_key, _seed_part(seed))


def fanin_key(pairs: list[tuple[str, bytes | str]]) -> str:
    """Input key of a node with several predecessors: ``(pred_id, ref)`` pairs in edge order."""
    flat: list[bytes | str] = ["fanin"]
    for pred_id, ref in pairs:
        flat.append(pred_id)
        flat.append(ref)
    return cache_key(*flat)


# --- filter identity and code fingerprints ------------------------------------------------

_fingerprints: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()
_fingerprints_lock = threading.Lock()


def code_fingerprint(cls: type) -> str:
    """SHA-256 hex over the code of the user-defined classes in ``cls.__mro__``, memoised.

    Each class contributes the AST of its source (so comments and formatting never
    matter), or a digest of its functions' code objects when the source is unavailable.
    Library classes (``Filter``, ``object``, anything installed) contribute nothing.
    """
    with _fingerprints_lock:
        known = _fingerprints.get(cls)
    if known is not None:
        return known
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        if not is_user_module(klass.__module__, include_main=True):
            continue
        digest.update(_framed(f"{klass.__module__}:{klass.__qualname__}".encode()))
        digest.update(_framed(_class_code_digest(klass)))
    fingerprint = digest.hexdigest()
    with _fingerprints_lock:
        _fingerprints[cls] = fingerprint
    return fingerprint


def _class_code_digest(klass: type) -> bytes:
    tree = _class_tree(klass)
    if tree is None:
        return b"code:" + _functions_digest(klass)
    return b"ast:" + hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).digest()


# ``inspect.getsource`` would find the same source, but its block finder runs the
# pure-Python tokenizer, whose set-up alone costs tens of milliseconds in a fresh
# process (a cache hit there must cost well under one), and it parses the whole
# file for every class. Here a class is found from the line of one of its methods
# and only its own lines are parsed; the whole file is parsed (once per version of
# the file) only when that cannot be done with certainty.


def _class_tree(klass: type) -> ast.Module | None:
    """The AST of ``klass``'s dedented source as ``inspect.getsource`` gives it, or ``None``."""
    filename, lines = _source_lines(klass)
    if not lines:
        return None
    method_line = _first_method_line(klass, filename)
    if method_line is not None:
        tree = _parse_around(lines, method_line, klass.__name__)
        if tree is not None:
            return tree
    span = _span_in_module(filename, lines, klass.__qualname__, method_line)
    return None if span is None else _parse_span(lines, *span)


def _source_lines(klass: type) -> tuple[str, list[str]]:
    """The name and current lines of the file defining ``klass``, as ``inspect.findsource`` reads them."""
    try:
        filename = inspect.getsourcefile(klass)
        if filename:
            linecache.checkcache(filename)  # a file edited since it was read is read again
        else:
            filename = inspect.getfile(klass)
            if not (filename.startswith("<") and filename.endswith(">")):
                return filename, []
    except (OSError, TypeError):  # built in, or a module without a file
        return "", []
    module = sys.modules.get(klass.__module__)
    return filename, linecache.getlines(filename, module.__dict__ if module else None)


def _first_method_line(klass: type, filename: str) -> int | None:
    """The 0-based first line (its first decorator's) of the earliest function defined in ``klass``'s body."""
    found = [
        function.__code__.co_firstlineno - 1
        for attribute in vars(klass).values()
        for function in _functions_of(attribute)
        if function.__qualname__.rpartition(".")[0] == klass.__qualname__
        and function.__code__.co_filename == filename
    ]
    return min(found, default=None)


def _parse_around(lines: list[str], method_line: int, name: str) -> ast.Module | None:
    """Parse the class named ``name`` whose body holds the function starting at ``method_line``.

    Its lines are guessed from indentation and checked by parsing them: the result
    must be one class ``name`` with a statement starting at ``method_line``. ``None``
    when the guess fails (multi-line strings or brackets crossing the class's
    indentation); the caller then parses the whole file.
    """
    if method_line >= len(lines):
        return None
    limit = _indent(lines[method_line])
    start = next(
        (
            i
            for i in range(method_line - 1, -1, -1)
            if _indent(lines[i]) < limit and _is_class_line(lines[i], name)
        ),
        None,
    )
    if start is None:
        return None
    depth = _indent(lines[start])
    first = _first_decorator_line(lines, start, depth)
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if _is_code(lines[i]) and _indent(lines[i]) <= depth and not _closes(lines[i])
        ),
        len(lines),
    )
    while not _is_code(lines[end - 1]):  # trailing comments would change the dedent
        end -= 1
    tree = _parse_span(lines, first, end)
    if tree is None or len(tree.body) != 1:
        return None
    node = tree.body[0]
    if not isinstance(node, ast.ClassDef) or node.name != name:
        return None
    wanted = method_line - first + 1  # 1-based within the parsed lines
    if not any(_first_line(statement) == wanted for statement in node.body):
        return None
    return tree


def _first_decorator_line(lines: list[str], start: int, depth: int) -> int:
    """The first line of the decorators above the class line ``start`` (``start`` without any).

    Going up, lines indented more than the class and closing brackets at its
    indentation continue a decorator (or the statement before); the first other line
    at or above its indentation ends the search.
    """
    first = start
    for i in range(start - 1, -1, -1):
        line = lines[i]
        if not _is_code(line) or _indent(line) > depth:
            continue
        if _indent(line) < depth:
            break
        if line.lstrip().startswith("@"):
            first = i
        elif not _closes(line):
            break
    return first


def _is_class_line(line: str, name: str) -> bool:
    """Whether ``line`` starts with ``class <name>`` (string tests: a first regex costs ms)."""
    words = line.split(maxsplit=1)
    if len(words) != 2 or words[0] != "class" or not words[1].startswith(name):
        return False
    after = words[1][len(name) : len(name) + 1]
    return not after or not ("_" + after).isidentifier()  # not a longer name (``<name>2``)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _is_code(line: str) -> bool:
    """Whether the line holds more than blanks or a comment."""
    stripped = line.lstrip()
    return bool(stripped) and not stripped.startswith("#")


def _closes(line: str) -> bool:
    """Whether the line starts with a closing bracket: it continues a statement, never starts one."""
    return line.lstrip()[:1] in (")", "]", "}")


def _first_line(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", None)
    return decorators[0].lineno if decorators else node.lineno


def _parse_span(lines: list[str], first: int, end: int) -> ast.Module | None:
    try:
        return ast.parse(textwrap.dedent("".join(lines[first:end])))
    except SyntaxError:
        return None


# The classes of each parsed file by qualname, as (first, end) line spans in source
# order, with the lines they were found in: linecache gives a new list when the file
# changes, so an identity check tells whether the spans are still valid.
_module_spans: dict[str, tuple[list[str], dict[str, list[tuple[int, int]]]]] = {}


def _span_in_module(
    filename: str, lines: list[str], qualname: str, method_line: int | None
) -> tuple[int, int] | None:
    """The 0-based lines of the class ``qualname`` found by parsing its whole file.

    Like ``inspect.getsource``, the first class of that qualified name in the file,
    unless a later one holds the line of one of its methods.
    """
    known = _module_spans.get(filename)
    if known is None or known[0] is not lines:
        try:
            tree = ast.parse("".join(lines))
        except SyntaxError:
            return None
        known = (lines, _class_spans(tree))
        _module_spans[filename] = known
    spans = known[1].get(qualname, [])
    if method_line is not None:
        for first, end in spans:
            if first <= method_line < end:
                return first, end
    return spans[0] if spans else None


def _class_spans(tree: ast.Module) -> dict[str, list[tuple[int, int]]]:
    """Every class in ``tree`` by qualified name (``f.<locals>.C``, ``Outer.Inner``)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    found: list[tuple[int, str, int]] = []
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                qualname = prefix + child.name
                found.append((_first_line(child) - 1, qualname, child.end_lineno or child.lineno))
                stack.append((child, qualname + "."))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((child, f"{prefix}{child.name}.<locals>."))
            else:
                stack.append((child, prefix))
    for first, qualname, end in sorted(found):
        spans.setdefault(qualname, []).append((first, end))
    return spans


def _functions_digest(klass: type) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(vars(klass)):
        for function in _functions_of(vars(klass)[name]):
            digest.update(_framed(name.encode()))
            digest.update(_code_digest(function.__code__))
    return digest.digest()


def _functions_of(attribute: object) -> list[types.FunctionType]:
    if isinstance(attribute, (staticmethod, classmethod)):
        attribute = attribute.__func__
    if isinstance(attribute, property):
        candidates: tuple[object, ...] = (attribute.fget, attribute.fset, attribute.fdel)
    else:
        candidates = (attribute,)
    return [c for c in candidates if isinstance(c, types.FunctionType)]


def _code_digest(code: types.CodeType) -> bytes:
    """Digest of bytecode, constants (recursively) and names; line numbers play no part."""
    digest = hashlib.sha256()
    digest.update(_framed(code.co_code))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            digest.update(b"c" + _code_digest(const))
        else:
            digest.update(b"k" + content(const))
    for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        digest.update(_framed("\0".join(names).encode()))
    return digest.digest()


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


def _framed(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data


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
        self.out += _code_digest(value.__code__)
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
