"""The runner seam: how the executor has user code run, in process or elsewhere.

The walker never calls user code itself; it calls a ``NodeRunner``. A runner factory
receives a ``RunnerSpec`` (the run's phase, the node ids and filters it will execute,
the seed and the timeout) and returns a context manager, opened once per run, with
``fit(node_id, x, y)``, ``partial_fit(node_id, x, y, batch_size, on_batch)`` (the whole
§5.4 batch loop), ``forward(node_id, x, state)``, ``update(node_id, x, state)`` and a
``where`` string (``NodeStarted.target``). ``InProcessRunner`` calls user code directly
and converts its exceptions to ``FilterError``. Runners for other places (a
``"subprocess"`` runner executing nodes in an isolated child) are added to the mapping
passed to the run as ``runners``, keyed by runner kind; a node's kind is
``"subprocess"`` for that target or ``Graph(isolation="subprocess")``, else
``"local"``; a kind without a registered factory runs in process. Runners may raise
``FilterError`` or ``ChildError`` themselves: the walker passes them through, filling
``node_id`` and ``phase``.

``Remote`` blocks go to a ``RemoteRunner`` (``remote_runner(target, spec)``) with one
``run_block(BlockRequest, emit) -> BlockResult`` call per block; without one, a plan
with a ``Remote`` step raises ``CompileError`` before any user code runs.

These types are what other places implement (``soma.runtime.subprocess_runner``,
``soma.client.remote``), so they live apart from the walker that calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

from soma.errors import FilterError, RowMismatchError
from soma.runtime.batching import BatchCallback, partial_fit_loop
from soma.runtime.plan import Remote

__all__ = [
    "BlockRequest",
    "BlockResult",
    "InProcessRunner",
    "NodeRunner",
    "RemoteRunner",
    "RemoteRunnerFactory",
    "RunnerFactory",
    "RunnerSpec",
    "default_runners",
]


@dataclass(frozen=True)
class RunnerSpec:
    """What a runner is told when a run opens it."""

    phase: str
    node_ids: tuple[str, ...]
    filters: Mapping[str, Any]
    seed: int | None
    timeout: float | None


class NodeRunner(Protocol):
    """Executes user methods of the nodes it was opened for (see the module docstring)."""

    where: str

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def fit(self, node_id: str, x: Any, y: Any) -> Any: ...

    def partial_fit(
        self, node_id: str, x: Any, y: Any, batch_size: int, on_batch: BatchCallback
    ) -> Any: ...

    def forward(self, node_id: str, x: Any, state: Any) -> Any: ...

    def update(self, node_id: str, x: Any, state: Any) -> Any: ...


RunnerFactory = Callable[[RunnerSpec], NodeRunner]


class InProcessRunner:
    """Calls user code on the calling thread; user exceptions become ``FilterError``."""

    where = "local"

    def __init__(self, spec: RunnerSpec) -> None:
        self._filters = spec.filters
        self._phase = spec.phase

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def _error(self, method: str, node_id: str, exc: Exception) -> FilterError:
        return FilterError(method, exc, node_id=node_id, phase=self._phase)

    def fit(self, node_id: str, x: Any, y: Any) -> Any:
        try:
            return self._filters[node_id].fit(x, y)
        except Exception as exc:
            raise self._error("fit", node_id, exc) from exc

    def partial_fit(
        self, node_id: str, x: Any, y: Any, batch_size: int, on_batch: BatchCallback
    ) -> Any:
        try:
            return partial_fit_loop(self._filters[node_id], x, y, batch_size, on_batch)
        except RowMismatchError:
            raise
        except Exception as exc:
            raise self._error("partial_fit", node_id, exc) from exc

    def forward(self, node_id: str, x: Any, state: Any) -> Any:
        try:
            return self._filters[node_id].forward(x, state)
        except Exception as exc:
            raise self._error("forward", node_id, exc) from exc

    def update(self, node_id: str, x: Any, state: Any) -> Any:
        try:
            return self._filters[node_id].update(x, state)
        except Exception as exc:
            raise self._error("update", node_id, exc) from exc


def _subprocess_runner(spec: RunnerSpec) -> NodeRunner:
    """Open a ``SubprocessRunner``, imported only when a node runs in a child.

    The import pulls in the child pool and process machinery (~90 ms), which a
    process that never isolates a node should not pay on its first run; it is also
    circular at module level (the subprocess runner imports ``RunnerSpec`` from here).
    """
    from soma.runtime.subprocess_runner import SubprocessRunner

    return SubprocessRunner(spec)


def default_runners() -> dict[str, RunnerFactory]:
    """The runner factories available in this process, by runner kind."""
    return {"local": InProcessRunner, "subprocess": _subprocess_runner}


@dataclass(frozen=True)
class BlockRequest:
    """One ``Remote`` block to execute (the fields of a serialised plan, worker.md §5.6)."""

    run_id: str
    phase: str
    block: Remote
    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]
    x: Any
    has_roots: bool
    external: Mapping[str, Any]
    y: Any
    batch_size: int | None
    states: Mapping[str, Any]
    keys: Mapping[str, tuple[str | None, str | None]]
    outputs: tuple[str, ...]
    seed: int | None
    timeout: float | None
    #: Whether anyone listens to the run's events: if not, the worker need not stream them.
    events: bool = True
    #: ``content`` of x and y where the run's cache keys computed it (``None`` otherwise): a
    #: worker still holding an upload of the same content need not be sent it again.
    x_digest: bytes | None = None
    y_digest: bytes | None = None


@dataclass(frozen=True)
class BlockResult:
    """What a block sends back: the outputs needed outside it and, in fit, the new states.

    ``cache_hits`` names the block's nodes for which no user method ran (served from
    the worker's cache), so ``RunCompleted`` counts them as cache hits.
    """

    outputs: Mapping[str, Any]
    states: Mapping[str, Any] = field(default_factory=dict)
    state_keys: Mapping[str, str | None] = field(default_factory=dict)
    cache_hits: frozenset[str] = frozenset()


class RemoteRunner(Protocol):
    """Executes ``Remote`` blocks for one target; emits (or re-emits) their node events via ``emit``."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def run_block(
        self, request: BlockRequest, emit: Callable[[dict[str, Any]], None]
    ) -> BlockResult: ...


RemoteRunnerFactory = Callable[[str, RunnerSpec], RemoteRunner]
