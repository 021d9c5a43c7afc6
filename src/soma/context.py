"""Context variables every layer may read: the running graph's seed and re-entrancy marks.

Stdlib only, so the child daemon can import it to serve ``current_seed()``.
Executors copy the context (``contextvars.copy_context``) into pool threads, which
is how the seed and the marks reach user code on any thread.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["current_seed"]

_seed: contextvars.ContextVar[int | None] = contextvars.ContextVar("soma_seed", default=None)
_running_graphs: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "soma_running_graphs", default=frozenset()
)


def current_seed() -> int | None:
    """Return the seed of the graph whose user code is running on this thread, else ``None``."""
    return _seed.get()


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Make ``current_seed()`` return ``seed`` inside the block."""
    token = _seed.set(seed)
    try:
        yield
    finally:
        _seed.reset(token)


def is_running(graph_token: int) -> bool:
    """Whether the current context is already running the graph identified by ``graph_token``."""
    return graph_token in _running_graphs.get()


@contextlib.contextmanager
def running(graph_token: int) -> Iterator[None]:
    """Mark the graph identified by ``graph_token`` as running in this context."""
    token = _running_graphs.set(_running_graphs.get() | {graph_token})
    try:
        yield
    finally:
        _running_graphs.reset(token)
