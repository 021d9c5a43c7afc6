"""Filter pickles in which each by-value class is pickled once, for as long as it stays the same.

cloudpickle pickles a class from ``__main__`` or a user module by value. To do so it walks
every method's globals and scans ``sys.modules`` for each package they name: about 0.4 ms
per filter, paid by every plan sent to a worker. :func:`pickle_filter` keeps the pickle of
such a class and embeds it again while a fresh pickle could not differ:

- the class, its methods and whatever they reach by value are the same objects, with the
  same attributes, defaults, closures and globals as when the pickle was made;
- what they refer to is pickled by reference (modules, importable classes and functions),
  is an immutable constant, or is a tuple, list, dict or set of those, item by item;
- no module has been imported or registered by value since then.

A class that reaches anything else (a global array, an instance, a ufunc) is pickled afresh
each time. The filter instance is always pickled afresh. The receiving side loads an
embedded class with ``pickle.loads``, and cloudpickle's class tracking makes it the same
class object as a fresh pickle would.
"""

from __future__ import annotations

import io
import pickle
import threading
import types
from collections import OrderedDict
from typing import Any

import cloudpickle

__all__ = ["pickle_filter"]

_by_reference: Any = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)

_MEMO_SIZE = 64  # classes kept; a notebook that redefines a class makes a new one each time
_WALK_LIMIT = 4096  # objects looked at per class; a class that reaches more is pickled afresh

_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, type(Ellipsis), type(NotImplemented)})
_IMMUTABLE = frozenset({types.BuiltinFunctionType, types.GenericAlias, types.UnionType})
_EQUAL_WHEN_EQUAL = (int, str, bytes)  # immutable, and equal values pickle to the same bytes
_SKIPPED_CLASS_KEYS = frozenset({"__dict__", "__weakref__"})
_NO_VALUE = object()  # an empty closure cell


class _TooDeep(Exception):
    """The walk met more than ``_WALK_LIMIT`` objects."""


class _Walk:
    """What a fresh pickle of a class depends on, as a flat list of objects in a fixed order.

    Two walks that give lists equal item by item (by identity, or by value for ints, strs and
    bytes) describe classes whose pickles are the same. ``ok`` is false when the class reaches
    something that could change without the list changing.
    """

    def __init__(self, modules: int) -> None:
        self.seen: set[int] = set()
        self.out: list[Any] = [modules]

    def value(self, value: Any) -> bool:
        out = self.out
        if len(out) > _WALK_LIMIT:
            raise _TooDeep
        out.append(value)
        kind = type(value)
        if kind in _ATOMS:
            return True
        if kind is tuple or kind is list or kind is set or kind is frozenset:
            out.append(len(value))
            for item in value:
                if not self.value(item):
                    return False
            return True
        if kind is dict:
            out.append(len(value))
            for key, item in value.items():
                if not (self.value(key) and self.value(item)):
                    return False
            return True
        if kind is types.FunctionType:
            return bool(_by_reference(value)) or self.function(value)
        if kind is types.ModuleType:
            return bool(_by_reference(value))
        if isinstance(value, type):
            return bool(_by_reference(value)) or self.cls(value)
        if kind is staticmethod or kind is classmethod:
            return self.value(value.__func__)
        if kind is property:
            return self.value(value.fget) and self.value(value.fset) and self.value(value.fdel)
        if kind in _IMMUTABLE:
            return True  # pickled by reference or from immutable parts
        return kind.__module__ == "typing"  # type hints: immutable too

    def cls(self, cls: type) -> bool:
        if id(cls) in self.seen:
            return True
        self.seen.add(id(cls))
        if not _plain_metaclass(cls):
            return False
        self.out += [cls.__name__, cls.__qualname__]
        if not self.value(cls.__bases__):
            return False
        for key, item in cls.__dict__.items():
            if key in _SKIPPED_CLASS_KEYS:
                continue
            self.out.append(key)
            if not self.value(item):
                return False
        return True

    def function(self, func: types.FunctionType) -> bool:
        if id(func) in self.seen:
            return True
        self.seen.add(id(func))
        code = func.__code__
        self.out += [code, func.__name__, func.__qualname__, func.__module__, func.__doc__]
        for part in (func.__defaults__, func.__kwdefaults__, func.__annotations__, func.__dict__):
            if not self.value(part):
                return False
        for cell in func.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:
                contents = _NO_VALUE
            self.out.append(cell)
            if contents is not _NO_VALUE and not self.value(contents):
                return False
        namespace = func.__globals__
        for name in _global_names(code):
            self.out.append(name)
            if name in namespace and not self.value(namespace[name]):
                return False
            if name not in namespace:
                self.out.append(_NO_VALUE)
        return True


def _plain_metaclass(cls: type) -> bool:
    """``type`` itself, or a metaclass pickled by reference that is not an ABC's (whose registry changes)."""
    meta = type(cls)
    if meta is type:
        return True
    import abc

    return not issubclass(meta, abc.ABCMeta) and bool(_by_reference(meta))


_names_of_code: dict[types.CodeType, tuple[str, ...]] = {}


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name ``code`` and the code nested in it may read as a global (a superset: attribute names too)."""
    names = _names_of_code.get(code)
    if names is None:
        found = dict.fromkeys(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                found.update(dict.fromkeys(_global_names(const)))
        names = tuple(found)
        if len(_names_of_code) > 4096:
            _names_of_code.clear()
        _names_of_code[code] = names
    return names


def _same(before: list[Any], now: list[Any]) -> bool:
    if len(before) != len(now):
        return False
    for a, b in zip(before, now, strict=True):
        if a is b:
            continue
        if type(a) is not type(b) or type(a) not in _EQUAL_WHEN_EQUAL or a != b:
            return False
    return True


def _walk(cls: type) -> list[Any] | None:
    import sys

    walk = _Walk(len(sys.modules))
    try:
        return walk.out if walk.cls(cls) else None
    except (_TooDeep, RecursionError):
        return None


class _Memo:
    """Pickles of by-value classes, each with the walk it was made after; at most ``_MEMO_SIZE``."""

    def __init__(self) -> None:
        self._entries: OrderedDict[type, tuple[list[Any], bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def pickle_of(self, cls: type) -> bytes | None:
        """The pickle of ``cls`` to embed, or ``None`` when it must be pickled in place."""
        walked = _walk(cls)
        if walked is None:
            return None
        with self._lock:
            entry = self._entries.get(cls)
            if entry is not None and _same(entry[0], walked):
                self._entries.move_to_end(cls)
                return entry[1]
        data: bytes = cloudpickle.dumps(cls, protocol=5)
        with self._lock:
            self._entries[cls] = (walked, data)  # made after the walk: a change meanwhile only misses
            self._entries.move_to_end(cls)
            while len(self._entries) > _MEMO_SIZE:
                self._entries.popitem(last=False)
        return data


_memo = _Memo()


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) and obj.__module__ != "builtins" and not _by_reference(obj):
            data = _memo.pickle_of(obj)
            if data is not None:
                return pickle.loads, (data,)
        return super().reducer_override(obj)


def pickle_filter(filter_obj: Any) -> bytes:
    """``cloudpickle.dumps(filter_obj)``, embedding the kept pickle of its by-value classes.

    Raises what pickling the filter raises.
    """
    if _by_reference is None:  # a cloudpickle without the test this relies on
        return bytes(cloudpickle.dumps(filter_obj, protocol=5))
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=5).dump(filter_obj)
    return buffer.getvalue()
