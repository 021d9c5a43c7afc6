"""Soma: filters composed into graphs, run locally with a content-addressed cache or on workers.

Only small stdlib-only modules are imported eagerly (worker children import ``soma``
without its dependencies, and ``soma-worker`` imports it on its way to serving); every
other export is resolved lazily on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from soma import search as _search_module
from soma.context import current_seed
from soma.errors import (
    CacheError,
    ChildError,
    ChildTimeoutError,
    CompileError,
    CycleError,
    FilterError,
    GraphError,
    NodeNotFoundError,
    NotFittedError,
    ProtocolError,
    RemoteError,
    RemoteTimeoutError,
    SomaConfigError,
    SomaError,
    SomaWarning,
    StrategyError,
    StudyError,
    TrialPruned,
    WorkerUnavailableError,
)

if TYPE_CHECKING:
    from soma.chain import Chain, Fork
    from soma.filter import Filter

# Importing the submodule bound ``soma.search`` to the module; the package attribute
# is the function, while ``import soma.search`` still finds the module for pickles.
search = _search_module.search

_LAZY: dict[str, tuple[str, str]] = {
    "Filter": ("soma.filter", "Filter"),
    "Chain": ("soma.chain", "Chain"),
    "Fork": ("soma.chain", "Fork"),
    "Graph": ("soma.graph", "Graph"),
    "Cache": ("soma.runtime.cache", "Cache"),
    "Lab": ("soma.lab", "Lab"),
    "Worker": ("soma.worker.embedded", "Worker"),
}

__all__ = [
    "CacheError",
    "ChildError",
    "ChildTimeoutError",
    "CompileError",
    "CycleError",
    "FilterError",
    "GraphError",
    "NodeNotFoundError",
    "NotFittedError",
    "ProtocolError",
    "RemoteError",
    "RemoteTimeoutError",
    "SomaConfigError",
    "SomaError",
    "SomaWarning",
    "StrategyError",
    "StudyError",
    "TrialPruned",
    "WorkerUnavailableError",
    "__version__",
    "current_seed",
    "search",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value: Any = version("soma-runtime")
        except PackageNotFoundError:  # pragma: no cover - only in an uninstalled source tree
            value = "0+unknown"
    elif name in _LAZY:
        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
    else:
        raise AttributeError(f"module 'soma' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
