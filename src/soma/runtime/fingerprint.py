"""Code fingerprints of classes and digests of code objects: pure functions, no I/O.

    class ──code_fingerprint()──► SHA-256 hex over the AST of each user class in its MRO
    code object ──code_digest()──► digest of bytecode, constants and names

A filter's cache keys change when its code changes, and only then: a class contributes
the AST of its own source (comments and formatting play no part), or, when no source
can be found, a digest of its functions' code objects. Finding a class's lines is most
of the work and the reason this is a module of its own: ``inspect.getsource`` costs
tens of milliseconds in a fresh process, so a class is located from the first line of
one of its methods and only its own lines are parsed. Fingerprints are memoised per
class. ``soma.runtime.hashing`` uses both digests to hash classes, functions and filters.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import linecache
import struct
import sys
import textwrap
import threading
import types
import weakref

from soma.runtime.usercode import is_user_module

__all__ = ["code_digest", "code_fingerprint"]

_U64 = struct.Struct("<Q")

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
            digest.update(code_digest(function.__code__))
    return digest.digest()


def _functions_of(attribute: object) -> list[types.FunctionType]:
    if isinstance(attribute, (staticmethod, classmethod)):
        attribute = attribute.__func__
    if isinstance(attribute, property):
        candidates: tuple[object, ...] = (attribute.fget, attribute.fset, attribute.fdel)
    else:
        candidates = (attribute,)
    return [c for c in candidates if isinstance(c, types.FunctionType)]


def code_digest(code: types.CodeType) -> bytes:
    """Digest of bytecode, constants (recursively) and names; line numbers play no part."""
    # Constants are hashed as values, and ``content`` hashes function values with this
    # digest: the two modules need each other, so ``content`` is imported at call time.
    from soma.runtime.hashing import content

    digest = hashlib.sha256()
    digest.update(_framed(code.co_code))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            digest.update(b"c" + code_digest(const))
        else:
            digest.update(b"k" + content(const))
    for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        digest.update(_framed("\0".join(names).encode()))
    return digest.digest()


def _framed(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data
