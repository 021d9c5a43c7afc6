"""Every error Soma raises, in one tree.

    RuntimeError
    └── SomaError                       any runtime failure
        ├── SomaConfigError (ValueError) bad arguments or declarations
        │   └── RowMismatchError         x and y with different row counts
        ├── GraphError                   structural problems
        │   ├── NodeNotFoundError (LookupError)
        │   ├── CycleError
        │   └── NotFittedError
        ├── FilterError                  an exception raised by user code
        ├── CacheError                   unusable cache directory
        ├── CompileError                 a plan variant an executor cannot run
        ├── StrategyError                distributed-training refusals
        ├── StudyError                   a study run whose trials all failed
        ├── ChildError                   the child running user code died or was killed
        │   └── ChildTimeoutError (TimeoutError)
        └── RemoteError                  transport, worker or protocol failures
            ├── WorkerUnavailableError
            ├── RemoteTimeoutError (TimeoutError)
            └── ProtocolError

    UserWarning
    └── SomaWarning                      non-fatal reports

    Exception
    └── TrialPruned                      a signal from a study trial, not an error

This module imports only the standard library: every layer, the child daemon
included, may import it.
"""

from __future__ import annotations

from typing import Any

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
    "RowMismatchError",
    "SomaConfigError",
    "SomaError",
    "SomaWarning",
    "StrategyError",
    "StudyError",
    "TrialPruned",
    "WorkerUnavailableError",
]


class SomaError(RuntimeError):
    """Base of every runtime failure Soma raises."""


class SomaConfigError(SomaError, ValueError):
    """Raised for a bad argument or declaration; nothing was changed."""


class RowMismatchError(SomaConfigError):
    """Raised when x and y given to a batched fit have different row counts."""

    def __init__(self, x_rows: int, y_rows: int) -> None:
        super().__init__(f"x and y have different numbers of rows: {x_rows} vs {y_rows}")
        self.x_rows = x_rows
        self.y_rows = y_rows


class GraphError(SomaError):
    """Base of structural problems in a graph."""


class NodeNotFoundError(GraphError, LookupError):
    """Raised when a node id is not part of the graph."""

    def __init__(self, node_id: object) -> None:
        super().__init__(f"node `{node_id}` not found in graph")
        self.node_id = node_id


class CycleError(GraphError):
    """Raised when an edge would close a cycle; the graph is left unchanged."""

    def __init__(self, message: str = "cycle detected in graph") -> None:
        super().__init__(message)


class NotFittedError(GraphError):
    """Raised by ``forward`` on a graph that was never fitted."""

    def __init__(self, message: str = "graph must be fitted before forward") -> None:
        super().__init__(message)


class FilterError(SomaError):
    """Raised when user code (``fit``, ``forward``, ...) raised, locally or remotely.

    The message is ``Python <method>() error: <Type>: <msg>``; ``original`` is the
    exception (also ``__cause__``), ``remote_traceback`` the traceback text when the
    code ran in a child or on a worker.
    """

    def __init__(
        self,
        method: str,
        original: BaseException | None,
        *,
        node_id: str | None = None,
        phase: str | None = None,
        type_name: str | None = None,
        message: str | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        type_name = type_name or (type(original).__name__ if original is not None else "Exception")
        message = message if message is not None else str(original)
        super().__init__(f"Python {method}() error: {type_name}: {message}")
        self.method = method
        self.original = original
        self.node_id = node_id
        self.phase = phase
        self.type_name = type_name
        self.remote_traceback = remote_traceback
        self.code = "user_error"
        self.retryable = False


class CacheError(SomaError):
    """Raised when a cache directory cannot be created or used at construction."""


class CompileError(SomaError):
    """Raised when an executor is handed a plan variant it cannot run (Loop, Branch)."""


class StrategyError(SomaError):
    """Raised when a distributed-training strategy refuses the data or setup."""


class StudyError(SomaError):
    """Raised when every trial of a study run failed."""


class ChildError(SomaError):
    """Raised when the child process running user code died, hit its memory limit or was killed.

    Attributes: ``code`` (``child_crashed``, ``memory_limit``, ``child_start_failed``,
    ``child_protocol_error``, ``timeout``, ``cancelled``), ``signal`` (name or None),
    ``exit_code``, ``rss`` (bytes or None), ``stderr_tail`` (str), ``where``
    (``"subprocess"`` or a worker address), ``node_id``.
    """

    retryable_codes = frozenset({"child_start_failed", "child_crashed", "child_protocol_error"})

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        signal: str | None = None,
        exit_code: int | None = None,
        rss: int | None = None,
        stderr_tail: str = "",
        where: str = "subprocess",
        node_id: str | None = None,
    ) -> None:
        super().__init__(f"child {code}: {detail}")
        self.code = code
        self.detail = detail
        self.signal = signal
        self.exit_code = exit_code
        self.rss = rss
        self.stderr_tail = stderr_tail
        self.where = where
        self.node_id = node_id
        self.retryable = code in self.retryable_codes


class ChildTimeoutError(ChildError, TimeoutError):
    """Raised when user code ran past its time limit and its child was killed."""


class RemoteError(SomaError):
    """Raised for transport, worker or protocol failures not raised by user code.

    The message is ``remote: <error>``; ``code`` is a wire error code
    (worker spec §5.8), ``retryable`` whether another try may succeed.
    """

    default_code = "internal"

    def __init__(
        self,
        error: str,
        *,
        code: str | None = None,
        retryable: bool = False,
        node_id: str | None = None,
        details: dict[str, Any] | None = None,
        prefixed: bool = True,
    ) -> None:
        super().__init__(f"remote: {error}" if prefixed else error)
        self.error = error
        self.code = code or self.default_code
        self.retryable = retryable
        self.node_id = node_id
        self.details = details or {}


class WorkerUnavailableError(RemoteError):
    """Raised when no reachable or matching worker exists for a node's target."""

    default_code = "worker_unavailable"

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(f"no worker matches target '{target}'", prefixed=False, **kwargs)
        self.target = target


class RemoteTimeoutError(RemoteError, TimeoutError):
    """Raised when a worker gave no answer within the client's deadline."""

    default_code = "timeout"


class ProtocolError(RemoteError):
    """Raised for a wire version mismatch or an undecodable frame."""

    default_code = "bad_message"


class SomaWarning(UserWarning):
    """A non-fatal report: a failing event callback, an unreachable coordinator, ..."""


class TrialPruned(Exception):  # noqa: N818 - the name users know from optuna
    """Raise inside a study executor to end the trial as pruned."""
