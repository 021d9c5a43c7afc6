"""Error mapping: a worker's ``Error`` reply or failed node becomes the soma exception a user catches.

One function (:func:`error_from_reply`, worker.md §5.8) so that a request's ``Error`` and a
plan result's per-node ``ErrorInfo`` raise the same types with the same fields, and a user
error from a remote filter reads as it would locally (its builtin type rebuilt as the cause).
"""

from __future__ import annotations

import builtins
import re
from typing import Any

from soma.errors import (
    ChildError,
    ChildTimeoutError,
    FilterError,
    ProtocolError,
    RemoteError,
    RowMismatchError,
    SomaConfigError,
    SomaError,
)
from soma.wire.messages import ERROR_CODES, Error, ErrorInfo

__all__ = ["error_from_reply"]

_CHILD_CODES = frozenset({"child_crashed", "child_start_failed", "child_protocol_error", "memory_limit"})
_ROWS = re.compile(r"(\d+) vs (\d+)")


def _rebuilt(type_name: str, message: str) -> Exception | None:
    """A builtin exception of the remote type and message, so ``__cause__`` reads as locally."""
    cls = getattr(builtins, type_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return None
    try:
        return cls(message)
    except TypeError:
        return None


def error_from_reply(
    error: Error | ErrorInfo,
    *,
    where: str,
    node_id: str | None = None,
    phase: str | None = None,
) -> SomaError:
    """The user-facing exception for a worker's ``Error`` reply or failed ``PlanResult`` (worker.md §5.8).

    ``user_error`` -> ``FilterError`` ("Python <method>() error: <Type>: <msg>", with
    ``remote_traceback``); ``row_mismatch`` -> ``RowMismatchError``; child deaths and
    ``memory_limit`` -> ``ChildError`` (``where`` = the worker address); ``timeout`` ->
    ``ChildTimeoutError``; ``protocol_mismatch``/``bad_message`` -> ``ProtocolError``;
    anything else -> ``RemoteError("remote: <message>")``. Every result carries ``code``,
    ``retryable`` and ``node_id``.
    """
    code = error.code
    retryable = error.retryable if isinstance(error, Error) else ERROR_CODES.get(code, ("", False))[1]
    node = (error.node_id if isinstance(error, ErrorInfo) else None) or node_id
    details: dict[str, Any] = dict(error.details or {}) if isinstance(error, Error) else {}
    result: SomaError
    if code == "user_error":
        method = (error.method if isinstance(error, ErrorInfo) else None) or str(details.get("method") or "forward")
        type_name = (error.python_type if isinstance(error, ErrorInfo) else None) or str(
            details.get("python_type") or "Exception"
        )
        message = error.message.removeprefix(f"Python {method}() error: {type_name}: ")
        traceback = error.traceback if isinstance(error, ErrorInfo) else details.get("traceback")
        original = _rebuilt(type_name, message)
        result = FilterError(
            method,
            original,
            node_id=node,
            phase=phase,
            type_name=type_name,
            message=message,
            remote_traceback=traceback,
        )
        result.__cause__ = original
        return result
    if code == "row_mismatch":
        rows = _ROWS.search(error.message)
        result = RowMismatchError(int(rows.group(1)), int(rows.group(2))) if rows else SomaConfigError(error.message)
    elif code in _CHILD_CODES or code == "timeout":
        cls = ChildTimeoutError if code == "timeout" else ChildError
        result = cls(
            code,
            error.message,
            signal=details.get("signal"),
            exit_code=details.get("exit_code"),
            rss=details.get("rss"),
            stderr_tail=str(details.get("stderr_tail") or ""),
            where=where,
            node_id=node,
        )
    elif code in ("protocol_mismatch", "bad_message"):
        result = ProtocolError(error.message, code=code, node_id=node, details=details)
    else:
        result = RemoteError(error.message, code=code, retryable=retryable, node_id=node, details=details)
    # RowMismatchError and SomaConfigError do not declare these; every mapped error carries them.
    for name, value in (("code", code), ("retryable", retryable), ("node_id", node)):
        setattr(result, name, value)
    return result
