"""The ``"subprocess"`` runner: a run's nodes execute in one pooled filter-daemon child.

Data flow of one run (api.md §5.7)::

    Run opens SubprocessRunner(spec)
      checkout a child from default_pool() ── LOAD {filters (cloudpickle, user modules
                                               by value), runtime, seed}
      fit          ── FIT {data, y}                      ──▶ state (weights envelope unwrapped)
      partial_fit  ── BATCHED_FIT {[node], batch_size}   ──▶ state, progress -> on_batch
      forward      ── FORWARD {data, state}              ──▶ output
      update       ── FORWARD {evolve} + GET_STATE       ──▶ new state
    Run closes it: the child is reset and parked in the pool

Values cross by pickle: objects that are not plain containers, scalars or numpy arrays
travel as ``Opaque`` cloudpickles (user modules by value), and replies are turned back
into objects here, so nodes see equal values, not the same objects. User exceptions
raise ``FilterError`` with the child's traceback; a crash, the memory watch or a
time limit raise ``ChildError`` / ``ChildTimeoutError`` with ``where="subprocess"``.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import sys
import time
from types import TracebackType
from typing import Any, Self

import cloudpickle

from soma.errors import ChildTimeoutError, SomaError
from soma.filter import read_meta
from soma.isolation.failures import ChildFailure, failure_to_error
from soma.isolation.markers import Opaque
from soma.isolation.pool import Pool, default_pool
from soma.isolation.process import Child
from soma.isolation.spec import ChildSpec
from soma.isolation.values import materialise
from soma.runtime.batching import BatchCallback
from soma.runtime.filter_pickles import pickle_filter
from soma.runtime.runners import RunnerSpec
from soma.runtime.usercode import register_by_value

__all__ = ["SubprocessRunner"]

WHERE = "subprocess"
_LEAVES = (type(None), bool, int, float, complex, str, bytes)


def _is_plain_numpy(value: object) -> bool:
    """A numpy array or scalar without Python objects inside: pickled natively, no user code."""
    if not type(value).__module__.startswith("numpy"):
        return False
    dtype = getattr(value, "dtype", None)
    return dtype is not None and not dtype.hasobject


def _is_tensor(value: object) -> bool:
    return type(value).__module__.startswith("torch") and type(value).__name__ in (
        "Tensor",
        "Parameter",
    )


def encode(value: Any) -> Any:
    """Turn a value into one the child can unpickle without the user's files.

    Containers are walked; leaves, numpy arrays and tensors pickle natively; any other
    object becomes an ``Opaque`` cloudpickle with its user modules shipped by value.
    """
    kind = type(value)
    if kind in _LEAVES:
        return value
    if kind is list:
        return [encode(item) for item in value]
    if kind is tuple:
        return tuple(encode(item) for item in value)
    if kind is dict:
        return {key: encode(item) for key, item in value.items()}
    if _is_plain_numpy(value) or _is_tensor(value):
        return value
    register_by_value(value)
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        raise SomaError(
            f"cannot send a {kind.__module__}.{kind.__qualname__} to the subprocess: {type(exc).__name__}: {exc}"
        ) from exc
    return Opaque(data, list(buffers))


class SubprocessRunner:
    """A ``NodeRunner`` executing its nodes in one child checked out for the run.

    ``pool`` defaults to the process-wide ``default_pool()`` and ``child_spec`` to a
    child of this interpreter. ``spec.timeout`` bounds the run's time in the child,
    counted from the moment the filters are loaded.
    """

    where = WHERE

    def __init__(
        self,
        spec: RunnerSpec,
        *,
        pool: Pool | None = None,
        child_spec: ChildSpec | None = None,
    ) -> None:
        self._spec = spec
        self._pool = pool
        self._child_spec = child_spec or ChildSpec()
        self._stack = contextlib.ExitStack()
        self._child: Child | None = None
        self._deadline = math.inf
        self._forward_memo: dict[str, tuple[Any, Any, Any]] = {}

    def __enter__(self) -> Self:
        pool = self._pool or default_pool()
        try:
            self._child = self._stack.enter_context(pool.checkout(self._child_spec))
        except ChildFailure as failure:
            raise failure_to_error(failure, where=WHERE, phase=self._spec.phase)
        try:
            if self._spec.timeout is not None:
                self._deadline = time.monotonic() + self._spec.timeout
            self._call(
                "LOAD",
                None,
                filters=self._filters(),
                runtime=_runtime(),
                seed=self._spec.seed,
            )
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._forward_memo.clear()
        self._stack.close()

    def _filters(self) -> list[dict[str, Any]]:
        entries = []
        for node_id in self._spec.node_ids:
            filter_obj = self._spec.filters[node_id]
            register_by_value(filter_obj)
            try:
                data = pickle_filter(filter_obj)
            except Exception as exc:
                raise SomaError(
                    f"cannot pickle the filter of node `{node_id}` ({type(filter_obj).__name__}) for the "
                    f"subprocess: {type(exc).__name__}: {exc}"
                ) from exc
            trainable = read_meta(filter_obj).kind == "trainable"
            entries.append(
                {
                    "id": node_id,
                    "pickle": data,
                    "trainable": trainable,
                    "differentiable": False,
                }
            )
        return entries

    def _call(self, cmd: str, node: str | None, **fields: Any) -> dict[str, Any]:
        assert self._child is not None, "the runner is used outside its with-block"
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise ChildTimeoutError(
                "timeout",
                f"the run's time limit of {self._spec.timeout:g} s was spent before {cmd}"
                + (f" on node `{node}`" if node is not None else ""),
                where=WHERE,
                node_id=node,
            )
        try:
            return self._child.call(
                cmd, timeout=remaining, budget=self._spec.timeout, **fields
            )
        except ChildFailure as failure:
            raise failure_to_error(failure, where=WHERE, phase=self._spec.phase)

    def _decode(self, value: Any) -> Any:
        try:
            # The daemon's own walk: both directions use one definition of the channel's values.
            return materialise(value, {})
        except Exception as exc:
            raise SomaError(
                f"cannot read a value returned by the subprocess: {exc}; is every module it needs "
                "importable in this process?"
            ) from exc

    def _state(self, node_id: str, value: Any) -> Any:
        """A state from the child: weights trained there are loaded into our filter object."""
        from soma.isolation.training import is_envelope, unwrap_state

        state = self._decode(value)
        if is_envelope(state):
            try:
                state = unwrap_state(self._spec.filters[node_id], state)
            except Exception as exc:
                raise SomaError(
                    f"cannot load the weights node `{node_id}` trained in the subprocess: {exc}"
                ) from exc
        return state

    # -- the NodeRunner methods ----------------------------------------------------------------

    def fit(self, node_id: str, x: Any, y: Any) -> Any:
        """``fit(x, y)`` in the child; returns the state."""
        reply = self._call("FIT", node_id, node_id=node_id, data=encode(x), y=encode(y))
        return self._state(node_id, reply["result"])

    def partial_fit(
        self, node_id: str, x: Any, y: Any, batch_size: int, on_batch: BatchCallback
    ) -> Any:
        """The §5.4 batch loop in the child; ``on_batch`` hears of every batch; returns the state.

        The child also computes the forward output on the whole input; it is kept for the
        ``forward`` call that follows with the same input and state, so ``forward`` runs once.
        """

        def progress(frame: dict[str, Any]) -> None:
            on_batch(
                frame["batch"], frame["n_batches"], frame["rows"], frame["total_rows"]
            )

        reply = self._call(
            "BATCHED_FIT",
            node_id,
            node_ids=[node_id],
            data=encode(x),
            y=encode(y),
            batch_size=batch_size,
            on_progress=progress,
        )
        state = self._state(node_id, reply["states"][node_id])
        self._forward_memo[node_id] = (x, state, reply["result"])
        return state

    def forward(self, node_id: str, x: Any, state: Any) -> Any:
        """``forward(x, state)`` in the child; returns the output."""
        memo = self._forward_memo.pop(node_id, None)
        if memo is not None and memo[0] is x and memo[1] is state:
            return self._decode(memo[2])
        reply = self._call(
            "FORWARD", node_id, node_id=node_id, data=encode(x), state=encode(state)
        )
        return self._decode(reply["result"])

    def update(self, node_id: str, x: Any, state: Any) -> Any:
        """``update(x, state)`` in the child; returns the new state.

        The daemon updates a held state only after a forward (FORWARD with ``evolve``),
        whose output stays in the child as a handle; GET_STATE then fetches the state.
        """
        self._call(
            "FORWARD",
            node_id,
            node_id=node_id,
            data=encode(x),
            state=encode(state),
            evolve=True,
            **{"return": "handle"},
        )
        reply = self._call("GET_STATE", node_id, node_id=node_id)
        return self._state(node_id, reply["state"])


def _runtime() -> dict[str, str]:
    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "cloudpickle": cloudpickle.__version__,
    }
