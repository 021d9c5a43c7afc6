"""What a child failure is, and the user-facing error it becomes.

``ChildFailure`` is what the parent side raises for any call, start or kill that
went wrong, with a child or parent code (isolation.md §5); ``failure_to_error``
maps it to the soma error tree (worker.md §5.8, api.md §5.7). Kept apart from the
process machinery because the worker and the local runtime map failures without
touching a process, and the mapping is pure.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping
from typing import Any

from soma.errors import (
    ChildError,
    ChildTimeoutError,
    FilterError,
    RowMismatchError,
    SomaConfigError,
    SomaError,
)

__all__ = ["PARENT_CODES", "ChildFailure", "failure_to_error"]

PARENT_CODES = frozenset(
    {
        "child_start_failed",
        "child_crashed",
        "child_protocol_error",
        "timeout",
        "cancelled",
        "memory_limit",
    }
)
"""Failure codes raised by the parent about the child (isolation.md §5)."""


class ChildFailure(Exception):
    """A call, start or kill of a child failed.

    ``code`` is a child code passed through from the child's error reply (``user_error``,
    ``unknown_node``, ...) or a parent code of ``PARENT_CODES``; ``details`` holds pid,
    interpreter, env_key, exit_code, signal, rss, stderr_tail, node_id, command and, for
    child errors, the child's error object under ``error``.
    """

    def __init__(
        self, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


_ROWS = re.compile(r"(\d+) vs (\d+)")
_CHILD_ERROR_CODES = PARENT_CODES - {"timeout"}
_CONFIG_CODES = frozenset({"state_mismatch", "gradient_mismatch"})
_INTERNAL_CODES = frozenset({"bad_request", "unknown_command", "unknown_node"})


def _rebuild(error: Mapping[str, Any]) -> Exception | None:
    """A builtin exception equal in type and message to the child's, else ``None``."""
    if error.get("module") != "builtins":
        return None
    cls = getattr(builtins, str(error.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return None
    try:
        return cls(error.get("message", ""))
    except TypeError:
        return None


def failure_to_error(
    failure: ChildFailure, *, where: str, phase: str | None = None
) -> SomaError:
    """The user-facing error for a child failure (worker.md §5.8, api.md §5.7).

    ``user_error`` -> ``FilterError`` ("Python <method>() error: <Type>: <msg>", with
    ``remote_traceback``; ``original`` is a rebuilt builtin exception or ``None``);
    ``row_mismatch`` -> ``RowMismatchError``; ``timeout`` -> ``ChildTimeoutError``;
    the other parent codes -> ``ChildError``; ``state_mismatch`` and
    ``gradient_mismatch`` -> ``SomaConfigError``; anything else -> ``SomaError``.
    Every result carries ``code``, ``retryable`` and ``node_id``; its ``__cause__`` is
    the rebuilt exception or the failure.
    """
    details = failure.details
    error: Mapping[str, Any] = details.get("error") or {}
    node_id = error.get("node_id") or details.get("node_id")
    result: SomaError
    if failure.code == "user_error":
        original = _rebuild(error)
        result = FilterError(
            str(error.get("method") or "forward"),
            original,
            node_id=node_id,
            phase=phase,
            type_name=str(error.get("type") or "Exception"),
            message=str(error.get("message", failure.message)),
            remote_traceback=error.get("traceback"),
        )
        result.__cause__ = original or failure
        return result
    if failure.code == "row_mismatch":
        match = _ROWS.search(failure.message)
        if match:
            result = RowMismatchError(int(match.group(1)), int(match.group(2)))
        else:
            result = SomaConfigError(failure.message)
    elif failure.code == "timeout" or failure.code in _CHILD_ERROR_CODES:
        cls = ChildTimeoutError if failure.code == "timeout" else ChildError
        result = cls(
            failure.code,
            failure.message,
            signal=details.get("signal"),
            exit_code=details.get("exit_code"),
            rss=details.get("rss"),
            stderr_tail=details.get("stderr_tail") or "",
            where=where,
            node_id=node_id,
        )
    elif failure.code in _CONFIG_CODES:
        result = SomaConfigError(failure.message)
    elif failure.code in _INTERNAL_CODES:
        result = SomaError(
            f"internal error in the {where} child protocol: {failure.code}: {failure.message}"
        )
    else:
        result = SomaError(f"{failure.code}: {failure.message}")
    # Like the worker's client mapping, every error carries code, retryable and node_id.
    tags: dict[str, Any] = {"node_id": node_id}
    if not isinstance(result, ChildError):
        tags["code"] = "internal" if failure.code in _INTERNAL_CODES else failure.code
        tags["retryable"] = False
    for name, value in tags.items():
        setattr(result, name, value)
    result.__cause__ = failure
    return result
