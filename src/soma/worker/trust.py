"""Client TLS trust for a worker run from the command line, loaded once it serves.

Importing aiohttp builds its two default client SSL contexts, and each reads the system CA
bundle: about a fifth of a worker's start on a small machine. A worker serves before it
ever connects out, so ``soma-worker`` imports aiohttp with that loading deferred and loads
the same contexts once it listens. Until then they trust no authority, so a connection
made early fails verification rather than passing it.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Iterator

__all__ = ["deferred_trust", "load_deferred_trust"]

_load_default_paths = ssl.SSLContext.set_default_verify_paths
_pending: list[ssl.SSLContext] = []
_pending_lock = threading.Lock()


@contextlib.contextmanager
def deferred_trust() -> Iterator[None]:
    """Within the block, contexts that ask for the default CA paths get them later (:func:`load_deferred_trust`)."""

    def defer(context: ssl.SSLContext) -> None:
        with _pending_lock:
            _pending.append(context)

    own = ssl.SSLContext.__dict__.get("set_default_verify_paths")
    ssl.SSLContext.set_default_verify_paths = defer  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        if own is None:
            del ssl.SSLContext.set_default_verify_paths  # back to the inherited method
        else:
            ssl.SSLContext.set_default_verify_paths = own  # type: ignore[method-assign]


def load_deferred_trust() -> None:
    """Load the default CA paths into every context deferred so far (blocking file I/O)."""
    with _pending_lock:
        contexts = list(_pending)
        _pending.clear()
    for context in contexts:
        _load_default_paths(context)
