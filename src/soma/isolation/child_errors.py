"""How a daemon command fails: a refused request, or user code that raised.

The daemon turns both into ``error`` dicts on the reply and keeps serving; the
client's state unwrapping raises the same two classes. ``call_user`` is the one
user-code boundary, shared by the command handlers, the value walks and the
training step, so every user exception is wrapped the same way. Stdlib only: the
daemon imports this at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["VERSION_SKEW_HINT", "CommandError", "UserCodeError", "call_user"]

VERSION_SKEW_HINT = "usual cause: Python or cloudpickle version skew"


class CommandError(Exception):
    """A request the child refuses, with its isolation.md §5 ``code``; the child keeps serving."""

    def __init__(self, code: str, message: str, *, node_id: str | None = None, method: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.node_id = node_id
        self.method = method


class UserCodeError(Exception):
    """User code raised (any ``BaseException``); the original is ``__cause__``.

    ``method`` names the hook that raised (``fit``, ``forward``, ``partial_fit``,
    ``update``, ``loss_fn``, ``optimizer``) or is ``None`` for the runtime's own steps
    on user values (a backward pass, the default loss).
    """

    def __init__(self, method: str | None, node_id: str | None, original: BaseException) -> None:
        super().__init__(f"{method or 'user code'} raised {type(original).__name__}: {original}")
        self.method = method
        self.node_id = node_id
        self.original = original


def call_user(method: str | None, node_id: str | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call user code ``fn``; whatever it raises becomes ``UserCodeError`` naming ``method`` and ``node_id``."""
    try:
        return fn(*args, **kwargs)
    except BaseException as exc:  # the user-code boundary: SystemExit included, the child survives
        raise UserCodeError(method, node_id, exc) from exc

