"""The filter daemon: a persistent child process that holds filters and runs their user code.

Data flow (isolation.md)::

    parent ── request frame {"id", "cmd", ...} ──▶ read_frame ─▶ materialise (markers -> objects)
                                                              ─▶ command: user code on the main thread
    parent ◀── progress frames (BATCHED_FIT) ───── write_frame ◀─ neutralise (objects -> markers)
    parent ◀── reply frame {"kind": "reply", "id", "ok", ...}

The parent never unpickles user objects: every value that is not a neutral value
(builtin containers and scalars, numpy arrays and scalars) leaves the child as an
``Opaque`` cloudpickle, a tensor as ``TorchData`` raw bytes, or stays here behind a
``Handle``. Errors travel as data (``error`` dicts); the child survives anything its
user code raises, ``SystemExit`` included.

The daemon holds the catalog, dispatches commands and runs the serve loop; the
walks over channel values live in ``values``, the training machinery (envelopes,
composite step, gradients) in ``training``, tensor handling in ``tensors`` and the
two command failures in ``child_errors``. At import time all of them use only the
standard library, ``cloudpickle`` and stdlib-only soma modules: numpy arrives as a
side effect of unpickling arrays, torch is imported only by the composite and
gradient commands or to materialise a ``TorchData``. The marker classes are
exposed here as well, as the channel's vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import io
import os
import pickle
import platform
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import cloudpickle

from soma.errors import RowMismatchError
from soma.isolation import channel
from soma.isolation.child_errors import VERSION_SKEW_HINT, CommandError, UserCodeError, call_user
from soma.isolation.markers import Concat, Handle, Opaque, TorchData
from soma.isolation.tensors import import_torch
from soma.isolation.training import (
    CompositeNode,
    apply_gradients,
    check_phase,
    composite_fit,
    composite_forward,
    match_gradients,
    parameter_owner,
    read_gradients,
    unwrap_state,
    wrap_state,
)
from soma.isolation.values import NeedsNeutralising, cache_blob, materialise, neutralise, reduce_neutral
from soma.log import isolation_logger
from soma.runtime import batching

__all__ = [
    "PROTOCOL",
    "Concat",
    "Daemon",
    "Handle",
    "Opaque",
    "TorchData",
    "greeting",
    "main",
    "serve",
]

PROTOCOL = 1
EXIT_CORRUPT_REQUEST = 3


# --------------------------------------------------------------------------- the catalog


@dataclass
class _Entry:
    filter: Any
    trainable: bool
    state: Any = None
    fallback_optimizer: Any = None  # the SGD that APPLY_GRADIENTS creates for a filter without one


_REQUIRED = object()


def _field(request: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    if name not in request:
        if default is _REQUIRED:
            raise CommandError("bad_request", f"missing field '{name}'")
        return default
    value = request[name]
    allowed = _as_tuple(kinds)
    if not isinstance(value, allowed) or (type(value) is bool and int in allowed and bool not in allowed):
        raise CommandError("bad_request", f"field '{name}' has type {type(value).__name__}, expected {_kind_names(kinds)}")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    return " or ".join(kind.__name__ for kind in _as_tuple(kinds))


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _error_dict(
    code: str,
    message: str,
    *,
    command: str | None,
    node_id: str | None = None,
    method: str | None = None,
    exc: BaseException | None = None,
    user_frames_only: bool = False,
) -> dict[str, Any]:
    formatted = None
    if exc is not None:
        tb = exc.__traceback__
        if user_frames_only and tb is not None and tb.tb_next is not None:
            tb = tb.tb_next  # the first frame is the daemon's own call into user code
        formatted = "".join(traceback.format_exception(type(exc), exc, tb))
    return {
        "code": code,
        "method": method,
        "type": type(exc).__name__ if exc is not None else None,
        "module": type(exc).__module__ if exc is not None else None,
        "message": message,
        "traceback": formatted,
        "node_id": node_id,
        "command": command,
    }


class Daemon:
    """The child's command interpreter: a catalog of filters, held states and handles.

    ``handle(request)`` runs one command and returns its reply dict; ``emit`` sends
    non-terminal frames (progress). Requests are trusted (they come from the parent);
    malformed ones get ``bad_request`` and change nothing.
    """

    def __init__(self, emit: Callable[[dict[str, Any]], Any], *, ring: channel.Ring | None = None) -> None:
        self._emit = emit
        self._ring = ring
        self._catalog: dict[str, _Entry] = {}
        self._handles: dict[str, Any] = {}
        self._handle_count = 0
        self._seed: int | None = None
        self._has_markers = True
        self._result_node_id: str | None = None
        self._command: Any = None
        self.stopping = False
        self._commands: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
            "LOAD": self._load,
            "FIT": self._fit,
            "FORWARD": self._forward,
            "COMPOSITE_FORWARD": self._composite_forward,
            "COMPOSITE_FIT": self._composite_fit,
            "GET_STATE": self._get_state,
            "SET_STATE": self._set_state,
            "GET_GRADIENTS": self._get_gradients,
            "APPLY_GRADIENTS": self._apply_gradients,
            "BATCHED_FIT": self._batched_fit,
            "SHUTDOWN": self._shutdown,
        }

    def handle(self, request: Any, *, has_markers: bool = True) -> dict[str, Any]:
        """Run one request and return its reply (``ok`` true, or false with an ``error`` dict).

        ``has_markers=False`` promises the request holds no marker (the unpickler saw no
        marker class), so its values are used as they are, without a walk. A ``result``
        in the reply is the raw value: send the reply with ``send_reply``.
        """
        self._has_markers = has_markers
        fields = request if isinstance(request, dict) else {}
        command = self._command = fields.get("cmd")
        node_id = fields.get("node_id") if isinstance(fields.get("node_id"), str) else None
        reply: dict[str, Any] = {"kind": "reply", "id": fields.get("id")}
        try:
            if not isinstance(request, dict):
                raise CommandError("bad_request", f"a request must be a dict, got {type(request).__name__}")
            _field(request, "id", int)
            _field(request, "cmd", str)
            run = self._commands.get(command)  # type: ignore[arg-type]
            if run is None:
                raise CommandError("unknown_command", f"unknown command {command!r}; known: {sorted(self._commands)}")
            with self._seed_scope():
                body = run(request)
        except CommandError as exc:
            error = _error_dict(
                exc.code,
                exc.message,
                command=command,
                node_id=exc.node_id or node_id,
                method=exc.method,
                exc=exc.__cause__,
            )
        except UserCodeError as exc:
            error = _error_dict(
                "user_error",
                str(exc.original),
                command=command,
                node_id=exc.node_id or node_id,
                method=exc.method,
                exc=exc.original,
                user_frames_only=True,
            )
        except Exception as exc:  # noqa: BLE001 - user code is wrapped: this is a value the request got wrong
            message = f"{command} failed on its input: {type(exc).__name__}: {exc}"
            error = _error_dict("bad_request", message, command=command, node_id=node_id, exc=exc)
        else:
            return {**reply, "ok": True, **body}
        return {**reply, "ok": False, "error": error}

    def _seed_scope(self) -> contextlib.AbstractContextManager[Any]:
        if self._seed is None:
            return contextlib.nullcontext()
        from soma.context import seeded

        return seeded(self._seed)

    # ------------------------------------------------------------------ values

    def materialise(self, value: Any) -> Any:
        """Turn a request value into objects (``values.materialise``) with this daemon's handles."""
        if not self._has_markers:
            return value
        return materialise(value, self._handles)

    def send_reply(self, write_fd: int, reply: dict[str, Any]) -> None:
        """Write ``reply``, its ``result`` neutralised (isolation.md §3.2).

        Most results are neutral already (numbers, lists of floats, plain arrays), so
        the reply is first pickled as it is, with a reducer that stops at the first
        object needing a marker; only then is the result walked and re-pickled. That
        spares the walk over lists of millions of floats.
        """
        try:
            channel.write_frame(write_fd, reply, reducer_override=reduce_neutral, ring=self._ring)
            return
        except NeedsNeutralising:
            if "result" not in reply:
                raise
        try:
            reply = {**reply, "result": neutralise(reply["result"], self._result_node_id)}
        except CommandError as exc:
            error = _error_dict(exc.code, exc.message, command=self._command, node_id=exc.node_id, exc=exc.__cause__)
            reply = {"kind": "reply", "id": reply["id"], "ok": False, "error": error}
        channel.write_frame(write_fd, reply, ring=self._ring)

    def _reply_value(self, request: Mapping[str, Any], value: Any, node_id: str | None) -> dict[str, Any]:
        mode, want_blob = self._result_options(request)
        body: dict[str, Any] = {"summary": batching.output_summary(value)}
        if mode == "handle":
            self._handle_count += 1
            name = f"h{self._handle_count}"
            self._handles[name] = value
            body["handle"] = name
        else:
            body["result"] = value  # neutralised while the reply is pickled: see encode_reply
            self._result_node_id = node_id
        if want_blob:
            body["blob"] = cache_blob(value, node_id)
        return body

    @staticmethod
    def _result_options(request: Mapping[str, Any]) -> tuple[str, bool]:
        mode = _field(request, "return", str, "value")
        if mode not in ("value", "handle"):
            raise CommandError("bad_request", f"field 'return' must be 'value' or 'handle', got {mode!r}")
        return mode, _field(request, "blob", bool, False)

    # ------------------------------------------------------------------ catalog access

    def _entry(self, node_id: Any) -> _Entry:
        if not isinstance(node_id, str):
            raise CommandError("bad_request", f"node ids are strings, got {type(node_id).__name__}")
        try:
            return self._catalog[node_id]
        except KeyError:
            raise CommandError(
                "unknown_node", f"unknown node {node_id!r}: this plan loaded {sorted(self._catalog)}", node_id=node_id
            ) from None

    def _node_ids(self, request: Mapping[str, Any], name: str = "node_ids") -> list[str]:
        node_ids: list[str] = _field(request, name, list)
        for node_id in node_ids:
            self._entry(node_id)
        return node_ids

    def _owner(self, node_id: str, entry: _Entry) -> Any:
        owner = parameter_owner(entry.filter)
        if owner is None:
            raise CommandError(
                "no_parameters",
                f"node {node_id!r} ({type(entry.filter).__name__}) has no parameter owner: define soma_module(), "
                "named_parameters, or a module/model/net attribute",
                node_id=node_id,
            )
        return owner

    def _fit_state(self, node_id: str, entry: _Entry, state: Any) -> Any:
        try:
            return unwrap_state(entry.filter, state)
        except CommandError as exc:
            exc.node_id = node_id
            raise

    # ------------------------------------------------------------------ commands

    def _load(self, request: Mapping[str, Any]) -> dict[str, Any]:
        filters = _field(request, "filters", list)
        runtime = _field(request, "runtime", (dict, type(None)), None)
        seed = _field(request, "seed", (int, type(None)), None)
        states = _field(request, "states", dict, {})
        specs = []
        for spec in filters:
            if not isinstance(spec, dict):
                raise CommandError("bad_request", f"field 'filters' holds a {type(spec).__name__}, expected dicts")
            specs.append(
                (
                    _field(spec, "id", str),
                    _field(spec, "pickle", (bytes, bytearray, memoryview, pickle.PickleBuffer)),
                    _field(spec, "trainable", bool),
                )
            )
            _field(spec, "differentiable", bool, False)
        self._catalog = {}
        self._handles = {}
        self._seed = None
        if not specs:
            _collect_tenant_garbage()
        _check_runtime(runtime)
        self._seed = seed
        try:
            with self._seed_scope():
                catalog = {
                    node_id: _Entry(_unpickle_filter(node_id, data, trainable, runtime), trainable)
                    for node_id, data, trainable in specs
                }
                self._catalog = catalog
                for node_id, state in states.items():
                    entry = self._entry(node_id)
                    entry.state = self._fit_state(node_id, entry, self.materialise(state))
        except BaseException:
            self._catalog = {}
            self._seed = None
            raise
        return {"loaded": [node_id for node_id, *_ in specs]}

    def _fit(self, request: Mapping[str, Any]) -> dict[str, Any]:
        node_id = _field(request, "node_id", str)
        entry = self._entry(node_id)
        mode, _ = self._result_options(request)
        data = self.materialise(_field(request, "data", object))
        y = self.materialise(request.get("y"))
        if entry.trainable:
            entry.state = call_user("fit", node_id, entry.filter.fit, data, y)
            result = wrap_state(entry.filter, entry.state, snapshot=mode == "handle")
        else:
            entry.state = None
            result = None
        return self._reply_value(request, result, node_id)

    def _forward(self, request: Mapping[str, Any]) -> dict[str, Any]:
        node_id = _field(request, "node_id", str)
        entry = self._entry(node_id)
        self._result_options(request)
        evolve = _field(request, "evolve", bool, False)
        data = self.materialise(_field(request, "data", object))
        state = None
        if entry.trainable:
            if "state" in request:
                state = self._fit_state(node_id, entry, self.materialise(request["state"]))
            else:
                state = entry.state
        output = call_user("forward", node_id, entry.filter.forward, data, state)
        update = getattr(entry.filter, "update", None)
        if evolve and entry.trainable and callable(update):
            entry.state = call_user("update", node_id, update, data, state)
        return self._reply_value(request, output, node_id)

    def _composite_nodes(self, request: Mapping[str, Any]) -> list[CompositeNode]:
        return [
            CompositeNode(node_id, entry.filter, entry.trainable)
            for node_id in self._node_ids(request)
            for entry in (self._catalog[node_id],)
        ]

    def _composite_states(self, request: Mapping[str, Any], nodes: Sequence[CompositeNode]) -> dict[str, Any]:
        given = self.materialise(_field(request, "states", dict, {}))
        states = {}
        for node in nodes:
            entry = self._catalog[node.node_id]
            if node.node_id in given:
                states[node.node_id] = self._fit_state(node.node_id, entry, given[node.node_id])
            else:
                states[node.node_id] = entry.state
        return states

    def _composite_forward(self, request: Mapping[str, Any]) -> dict[str, Any]:
        nodes = self._composite_nodes(request)
        self._result_options(request)
        grad = _field(request, "grad", bool, False)
        data = self.materialise(_field(request, "data", object))
        states = self._composite_states(request, nodes)
        output = composite_forward(nodes, data, states, grad=grad)
        return self._reply_value(request, output, nodes[-1].node_id if nodes else None)

    def _composite_fit(self, request: Mapping[str, Any]) -> dict[str, Any]:
        nodes = self._composite_nodes(request)
        self._result_options(request)
        phase = _field(request, "phase", str, "all")
        check_phase(phase)
        data = self.materialise(_field(request, "data", object))
        y = self.materialise(request.get("y"))
        states = self._composite_states(request, nodes)
        outcome = composite_fit(nodes, data, y, states, phase=phase)
        if phase != "grad":
            for node_id, state in outcome.states.items():
                self._catalog[node_id].state = state
        reply_states = {}
        for node in nodes:
            owner = parameter_owner(node.filter)
            if node.trainable or owner is not None:
                fit_state = outcome.states.get(node.node_id)
                reply_states[node.node_id] = neutralise(
                    wrap_state(node.filter, fit_state), node.node_id
                )
        body = self._reply_value(request, outcome.output, nodes[-1].node_id if nodes else None)
        return {**body, "states": reply_states, "loss": outcome.loss}

    def _get_state(self, request: Mapping[str, Any]) -> dict[str, Any]:
        node_id = _field(request, "node_id", str)
        entry = self._entry(node_id)
        state = wrap_state(entry.filter, entry.state)
        return {"state": neutralise(state, node_id)}

    def _set_state(self, request: Mapping[str, Any]) -> dict[str, Any]:
        node_id = _field(request, "node_id", str)
        entry = self._entry(node_id)
        state = self.materialise(_field(request, "state", object))
        entry.state = self._fit_state(node_id, entry, state)
        return {}

    def _get_gradients(self, request: Mapping[str, Any]) -> dict[str, Any]:
        node_id = _field(request, "node_id", str)
        owner = self._owner(node_id, self._entry(node_id))
        gradients, missing = read_gradients(node_id, owner)
        return {"gradients": gradients, "missing": missing}

    def _apply_gradients(self, request: Mapping[str, Any]) -> dict[str, Any]:
        node_id = _field(request, "node_id", str)
        entry = self._entry(node_id)
        owner = self._owner(node_id, entry)
        gradients = self.materialise(_field(request, "gradients", dict))
        lr = _field(request, "lr", (int, float, type(None)), None)
        tensors = match_gradients(node_id, owner, gradients)
        apply_gradients(node_id, owner, self._optimizer(node_id, entry, owner, lr), tensors)
        return {}

    @staticmethod
    def _optimizer(node_id: str, entry: _Entry, owner: Any, lr: float | None) -> Any:
        """The filter's ``optimizer``, else the SGD kept in the catalog (created at the first ``lr``)."""
        optimizer = getattr(entry.filter, "optimizer", None)
        if optimizer is not None:
            return optimizer
        if entry.fallback_optimizer is None and lr is None:
            raise CommandError(
                "no_optimizer",
                f"node {node_id!r} has no optimizer attribute and the request gives no lr",
                node_id=node_id,
            )
        if entry.fallback_optimizer is None:
            entry.fallback_optimizer = import_torch().optim.SGD(owner.parameters(), lr=lr)
        elif lr is not None:
            for group in entry.fallback_optimizer.param_groups:
                group["lr"] = lr
        return entry.fallback_optimizer

    def _batched_fit(self, request: Mapping[str, Any]) -> dict[str, Any]:
        node_ids = self._node_ids(request)
        if not node_ids:
            raise CommandError("bad_request", "field 'node_ids' is empty")
        preds = _field(request, "preds", (dict, type(None)), None)
        batch_size = _field(request, "batch_size", int, 32)
        if batch_size < 1:
            raise CommandError("bad_request", f"field 'batch_size' must be >= 1, got {batch_size}")
        outputs_wanted = _field(request, "outputs", list, [node_ids[-1]])
        self._result_options(request)
        inputs_of = self._batched_inputs(node_ids, preds, outputs_wanted)
        data = self.materialise(_field(request, "data", object))
        y = self.materialise(request.get("y"))
        given = self.materialise(_field(request, "states", dict, {}))
        request_id = request["id"]
        outputs: dict[str, Any] = {}
        for node_id in node_ids:
            entry = self._catalog[node_id]
            sources = inputs_of[node_id]
            if not sources:
                x = data
            elif len(sources) == 1:
                x = outputs[sources[0]]
            else:
                x = {source: outputs[source] for source in sources}
            state = None
            if entry.trainable:
                if node_id in given:
                    state = self._fit_state(node_id, entry, given[node_id])
                elif batching.has_partial_fit(entry.filter) and batching.is_row_sliceable(x):
                    state = self._partial_fit(request_id, node_id, entry, x, y, batch_size)
                else:
                    state = call_user("fit", node_id, entry.filter.fit, x, y)
                entry.state = state
            outputs[node_id] = call_user("forward", node_id, entry.filter.forward, x, state)
        if len(outputs_wanted) == 1:
            result = outputs[outputs_wanted[0]]
        else:
            result = {node_id: outputs[node_id] for node_id in outputs_wanted}
        states = {
            node_id: neutralise(
                wrap_state(self._catalog[node_id].filter, self._catalog[node_id].state), node_id
            )
            for node_id in node_ids
            if self._catalog[node_id].trainable
        }
        body = self._reply_value(request, result, node_ids[-1])
        return {**body, "states": states}

    def _batched_inputs(
        self, node_ids: list[str], preds: Mapping[str, Any] | None, outputs: list[Any]
    ) -> dict[str, list[str]]:
        inputs_of: dict[str, list[str]] = {}
        for index, node_id in enumerate(node_ids):
            if preds is None:
                sources = [node_ids[index - 1]] if index else []
            else:
                sources = preds.get(node_id, [])
                if not isinstance(sources, list):
                    raise CommandError("bad_request", f"field 'preds' maps {node_id!r} to a {type(sources).__name__}")
            for source in sources:
                if source not in inputs_of:
                    raise CommandError(
                        "bad_request",
                        f"field 'preds': {node_id!r} reads {source!r}, which is not an earlier entry of node_ids",
                    )
            inputs_of[node_id] = sources
        for node_id in outputs:
            if node_id not in inputs_of:
                raise CommandError("bad_request", f"field 'outputs' names {node_id!r}, which is not in node_ids")
        return inputs_of

    def _partial_fit(self, request_id: int, node_id: str, entry: _Entry, x: Any, y: Any, batch_size: int) -> Any:
        def guarded(x_b: Any, y_b: Any, state: Any) -> Any:
            return call_user("partial_fit", node_id, entry.filter.partial_fit, x_b, y_b, state)

        def progress(batch: int, n_batches: int, rows: int, total_rows: int) -> None:
            self._emit(
                {
                    "kind": "progress",
                    "id": request_id,
                    "node_id": node_id,
                    "batch": batch,
                    "n_batches": n_batches,
                    "rows": rows,
                    "total_rows": total_rows,
                }
            )

        try:
            return batching.partial_fit_loop(SimpleNamespace(partial_fit=guarded), x, y, batch_size, progress)
        except RowMismatchError as exc:
            raise CommandError("row_mismatch", str(exc), node_id=node_id) from exc

    def _shutdown(self, request: Mapping[str, Any]) -> dict[str, Any]:
        self.stopping = True
        return {}


def _collect_tenant_garbage() -> None:
    """Free the last tenant's cyclic garbage (the reset, isolation.md §2.2), finalizers included.

    What survives is the child's long-lived heap (soma, numpy, modules imported by
    reference): freezing it keeps every later collection, automatic ones during user
    code included, from walking it again. A full walk costs 5-20 ms; a frozen heap
    leaves only the tenant's own objects to scan. Freezing frees nothing and keeps
    nothing reachable, so no tenant sees a difference; the price is that a frozen
    object that later becomes part of a garbage cycle stays (a pooled child is retired
    after ``max_tasks`` plans or above ``max_idle_rss``).
    """
    gc.collect()
    gc.freeze()


def _check_runtime(runtime: Mapping[str, Any] | None) -> None:
    """Refuse a client runtime of another Python or cloudpickle minor (isolation.md §7)."""
    if runtime is None:
        return
    client_python = _field(runtime, "python", str)
    client_cloudpickle = _field(runtime, "cloudpickle", str)
    child_python = platform.python_version()
    child_cloudpickle = cloudpickle.__version__
    if (_major_minor(client_python), _major_minor(client_cloudpickle)) != (
        _major_minor(child_python),
        _major_minor(child_cloudpickle),
    ):
        raise CommandError(
            "runtime_mismatch",
            f"client Python {_major_minor(client_python)} / cloudpickle {_major_minor(client_cloudpickle)}; "
            f"child {sys.executable} is Python {_major_minor(child_python)} / cloudpickle "
            f"{_major_minor(child_cloudpickle)}",
        )
    if (client_python, client_cloudpickle) != (child_python, child_cloudpickle):
        isolation_logger.warning(
            "patch versions differ: client Python %s / cloudpickle %s, child %s is Python %s / cloudpickle %s",
            client_python,
            client_cloudpickle,
            sys.executable,
            child_python,
            child_cloudpickle,
        )


def _unpickle_filter(node_id: str, data: Any, trainable: bool, runtime: Mapping[str, Any] | None) -> Any:
    hint = f"; {VERSION_SKEW_HINT}" if runtime is None else ""
    try:
        obj = cloudpickle.loads(data)
    except BaseException as exc:  # unpickling runs user code (__setstate__, imports): any failure is reported
        raise CommandError(
            "unpickle_error",
            f"cannot unpickle filter {node_id!r}: {type(exc).__name__}: {exc}{hint}",
            node_id=node_id,
        ) from exc
    if not callable(getattr(obj, "forward", None)) or (trainable and not callable(getattr(obj, "fit", None))):
        raise CommandError(
            "unpickle_error",
            f"not a filter, got {type(obj).__module__}.{type(obj).__qualname__}; {VERSION_SKEW_HINT}",
            node_id=node_id,
        )
    return obj


# --------------------------------------------------------------------------- process entry point


def greeting() -> dict[str, Any]:
    """The ready frame (isolation.md §2.1); versions come from package metadata, nothing is imported."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "kind": "ready",
        "protocol": PROTOCOL,
        "pid": os.getpid(),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "cloudpickle": cloudpickle.__version__,
        "soma": installed("soma-runtime"),
        "numpy": installed("numpy"),
        "torch": installed("torch"),
    }


class _MissingGlobal:
    """Stands in for a class or function the request names but this environment cannot import."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _MissingGlobal:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _RequestUnpickler(pickle.Unpickler):
    """Full unpickling, except that a missing module (numpy absent) becomes a placeholder.

    The request is then still readable, so its id gets a ``missing_dependency`` reply
    instead of the child exiting as if the frame were corrupt.
    """

    def __init__(self, payload: Any, buffers: list[Any]) -> None:
        super().__init__(io.BytesIO(payload), buffers=buffers)
        self.missing: list[str] = []
        self.has_markers = False

    def find_class(self, module: str, name: str) -> Any:
        if module == Opaque.__module__:
            self.has_markers = True
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            self.missing.append(f"{module}.{name}")
            return _MissingGlobal


def _load_request(payload: Any, buffers: list[Any]) -> tuple[Any, list[str], bool]:
    unpickler = _RequestUnpickler(payload, buffers)
    return unpickler.load(), unpickler.missing, unpickler.has_markers


def serve(read_fd: int, write_fd: int, ring_fds: tuple[int, int] | None = None) -> int:
    """Answer requests until SHUTDOWN or EOF (0), or a corrupt request frame (3); return the exit code.

    ``ring_fds`` are the memfds of the request and reply ``channel.Ring`` (large buffers).
    """
    request_ring = reply_ring = None
    if ring_fds is not None:
        request_ring = channel.Ring(ring_fds[0], ack_fd=write_fd)
        reply_ring = channel.Ring(ring_fds[1], ack_fd=read_fd)
    daemon = Daemon(lambda message: channel.write_frame(write_fd, message, ring=reply_ring), ring=reply_ring)
    while True:
        try:
            request, missing, has_markers = channel.read_frame(read_fd, loads=_load_request, ring=request_ring)
        except channel.ChannelClosed:
            return 0
        except Exception as exc:  # noqa: BLE001 - a frame or payload we cannot parse: the channel is out of step
            isolation_logger.error("corrupt request frame, exiting: %s: %s", type(exc).__name__, exc)
            return EXIT_CORRUPT_REQUEST
        command = request.get("cmd") if isinstance(request, dict) else None
        if missing:
            reply = {
                "kind": "reply",
                "id": request.get("id") if isinstance(request, dict) else None,
                "ok": False,
                "error": _error_dict(
                    "missing_dependency",
                    f"the request holds values of {sorted(set(missing))}, which the child ({sys.executable}) "
                    "cannot import; install the package in the filter's environment",
                    command=command,
                ),
            }
        else:
            reply = daemon.handle(request, has_markers=has_markers)
        try:
            daemon.send_reply(write_fd, reply)
        except BrokenPipeError:
            return 0
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - pickling fails before any byte is written
            error = _error_dict(
                "encoding_error", f"the reply could not be pickled: {type(exc).__name__}: {exc}", command=command, exc=exc
            )
            channel.write_frame(write_fd, {"kind": "reply", "id": reply.get("id"), "ok": False, "error": error})
        if daemon.stopping:
            return 0
        # Drop this call's values before waiting: their receive buffers can then be reused warm.
        del request, reply


def _die_with_parent() -> None:
    # A SIGKILLed parent closes nothing we would notice while user code runs: ask the
    # kernel to kill us when the parent thread that spawned us exits.
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="soma.isolation.daemon", add_help=False)
    parser.add_argument("--fds", required=True, help="R,W: the request and reply pipe ends")
    parser.add_argument("--rings", default=None, help="Q,P: the memfds of the request and reply rings")
    parser.add_argument("--rlimit-as", type=int, default=None)
    args = parser.parse_args(argv)
    read_fd, _, write_fd = args.fds.partition(",")
    args.read_fd, args.write_fd = int(read_fd), int(write_fd)
    args.ring_fds = None
    if args.rings is not None:
        request_ring, _, reply_ring = args.rings.partition(",")
        args.ring_fds = (int(request_ring), int(reply_ring))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run the daemon on the fds of ``--fds R,W`` and exit with ``serve``'s code."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable()
    if args.rlimit_as:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (args.rlimit_as, args.rlimit_as))
    channel.write_frame(args.write_fd, greeting())
    gc.freeze()  # the interpreter and soma's modules: see _collect_tenant_garbage
    sys.exit(serve(args.read_fd, args.write_fd, args.ring_fds))

