"""Telling the user's own code apart from installed code, and preparing it for shipping.

A filter class defined in the user's project must travel to children and workers by
value (they cannot import the user's files), and its code takes part in cache keys.
Installed libraries, the standard library and soma itself are imported by name on the
other side and are never fingerprinted.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading

import cloudpickle

__all__ = ["capture_source", "is_user_module", "register_by_value"]

_LIBRARY_ROOTS = frozenset({"soma", "cloudpickle", "numpy", "pandas", "torch", "sklearn", "scipy"})
_INSTALL_DIRS = frozenset({"site-packages", "dist-packages"})

_registered: set[str] = set()
_registered_lock = threading.Lock()


def is_user_module(module_name: str, *, include_main: bool) -> bool:
    """Whether ``module_name`` is the user's code, not the stdlib or an installed package.

    ``__main__`` counts only when ``include_main`` (notebook classes are fingerprinted,
    but cloudpickle already ships ``__main__`` by value). Modules that are not imported,
    frozen, built in, or have no ``__file__`` are never user modules.
    """
    if module_name == "__main__":
        return include_main
    root = module_name.partition(".")[0]
    if root in _LIBRARY_ROOTS or root in sys.stdlib_module_names:
        return False
    if module_name in sys.builtin_module_names:
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.origin in {"frozen", "built-in"}:
        return False
    filename = getattr(module, "__file__", None)
    if not filename:
        return False
    # Split as a str: a PurePath costs more than the rest of this check on a first run.
    return not _INSTALL_DIRS.intersection(os.path.normpath(filename).split(os.sep))


def register_by_value(obj: object) -> None:
    """Make cloudpickle ship the user modules defining ``type(obj)`` and its bases by value.

    Idempotent: each module is registered once per process.
    """
    for cls in type(obj).__mro__:
        name = cls.__module__
        if name in _registered or not is_user_module(name, include_main=False):
            continue
        with _registered_lock:
            if name in _registered:
                continue
            cloudpickle.register_pickle_by_value(sys.modules[name])
            _registered.add(name)


def capture_source(obj: object) -> str:
    """The source of the module defining ``type(obj)``, or ``""`` when it cannot be read."""
    module = inspect.getmodule(type(obj))
    if module is None:
        return ""
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return ""
