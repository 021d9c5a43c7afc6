"""Remote execution: the runner of ``Remote`` plan blocks on workers (api.md §5.7, worker.md §5.6, §8).

Data flow of one block::

    Run._remote(step) ──BlockRequest──▶ WorkerRunner.run_block
        client_for(address, token)             one shared connection per worker (sync_client.py)
        Welcome.inline_threshold               values at or above it are uploaded first:
                                               x, y, external outputs, states (each on its own)
        SerializedPlan                         the block's inner plan, filters pickled now (current
                                               parameters; user modules by value), keys, edges, seed
        RemoteDispatched ─▶ AssignPlan         worker events re-emitted with ``worker`` on this thread
        PlanResult                             references downloaded, weights envelopes unwrapped
                                               into the client's filters, cache written as locally
    ◀──BlockResult(outputs needed outside, states)── committed by the executor like local ones

Placement is decided before (``soma.runtime.plan.resolve_placement``): a block's target
is the address of a registered worker.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

from soma.client.errors import error_from_reply
from soma.client.sync_client import RemoteClient, client_for
from soma.client.versions import runtime_versions
from soma.errors import (
    ChildError,
    FilterError,
    RemoteError,
    SomaConfigError,
    SomaError,
    SomaWarning,
    WorkerUnavailableError,
)
from soma.isolation.child_errors import CommandError, UserCodeError
from soma.isolation.training import unwrap_state
from soma.runtime import events as ev
from soma.runtime.cache import Cache
from soma.runtime.filter_pickles import pickle_filter
from soma.runtime.nodes import NodeRecord
from soma.runtime.runners import BlockRequest, BlockResult, RemoteRunnerFactory, RunnerSpec
from soma.wire import v2
from soma.wire.errors import WireError
from soma.wire.messages import (
    AssignPlan,
    CachedRef,
    Event,
    FitMode,
    InlineRef,
    LocalRef,
    PlanFailure,
    PlanResult,
    Reply,
    SerializedFilter,
    SerializedPlan,
)

__all__ = ["WorkerRunner", "measured", "remote_runner_factory", "shutdown_worker", "shutdown_workers"]

_PLAN_ID_CHARS = re.compile(r"[^A-Za-z0-9._:-]")
_NODE_EVENTS = frozenset({"NodeStarted", "NodeCompleted", "NodeFailed"})


def remote_runner_factory(
    nodes: Mapping[str, NodeRecord],
    workers: Mapping[str, Mapping[str, Any]],
    cache: Cache | None,
) -> RemoteRunnerFactory:
    """The executor's factory of runners for ``Remote`` blocks, one per target and run.

    ``workers`` maps registered addresses to ``{"token", ...}``; ``cache`` receives the
    states and outputs that come back, under the keys the executor computed.
    """

    def factory(target: str, spec: RunnerSpec) -> WorkerRunner:
        if target not in workers:
            raise WorkerUnavailableError(target)
        return WorkerRunner(target, workers[target].get("token"), nodes, cache)

    return factory


class WorkerRunner:
    """Runs the ``Remote`` blocks of one run that are placed on one worker."""

    def __init__(
        self,
        address: str,
        token: str | None,
        nodes: Mapping[str, NodeRecord],
        cache: Cache | None,
    ) -> None:
        self.address = address
        self._token = token
        self._nodes = nodes
        self._cache = cache
        self._client: RemoteClient | None = None
        self._blocks = 0
        self._lock = threading.Lock()
        # Large values uploaded during this run, by identity (x and y go to every block that needs them).
        self._uploaded: dict[int, tuple[Any, CachedRef]] = {}

    def __enter__(self) -> Self:
        self._client = client_for(self.address, self._token)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._client = None
        self._uploaded.clear()

    def run_block(self, request: BlockRequest, emit: Callable[[dict[str, Any]], None]) -> BlockResult:
        """Execute one block on the worker; raise its mapped error after ``NodeFailed`` events."""
        client = self._client
        assert client is not None, "WorkerRunner used outside its with-block"
        welcome = client.connect()
        plan = self._serialize(request, client, welcome.inline_threshold)
        emit(
            {
                "event_type": "RemoteDispatched",
                "ts": time.time(),
                "run_id": request.run_id,
                "phase": request.phase,
                "worker": self.address,
                "plan_id": plan.plan_id,
                "node_ids": list(request.nodes),
            }
        )
        kinds = {nid: self._nodes[nid].kind for nid in request.nodes}
        relay = _EventRelay(self.address, request.phase, kinds, emit)
        deadline = client.timeout.plan_deadline(request.timeout)
        try:
            reply = client.request(AssignPlan(plan=plan), on_frame=relay, deadline=deadline)
            if _lost_reference(reply):
                # The worker may evict an upload it still held when asked (HEAD) before the plan
                # resolves it. Nothing ran: upload afresh and send the plan once more.
                self._uploaded.clear()
                client.forget_uploads()
                plan = self._serialize(request, client, welcome.inline_threshold)
                reply = client.request(AssignPlan(plan=plan), on_frame=relay, deadline=deadline)
            if not isinstance(reply, PlanResult):
                raise RemoteError(f"worker {self.address} answered AssignPlan with {reply.type}", code="bad_message")
            if isinstance(reply.result, PlanFailure):
                raise error_from_reply(reply.result.error, where=self.address, phase=request.phase)
            result = self._result(request, client, reply)
        except SomaError as exc:
            error_type = exc.type_name if isinstance(exc, FilterError) else type(exc).__name__
            open_nodes = relay.fail_open(str(exc), error_type, request.run_id)
            # A lost worker names no node; the one it was running is the one that failed
            # (without events, only a block of one node says which).
            running = open_nodes if request.events else list(request.nodes)
            if isinstance(exc, RemoteError | ChildError) and exc.node_id is None and len(running) == 1:
                exc.node_id = running[0]
            raise
        relay.complete_unreported(request.nodes, request.run_id)
        return dataclasses.replace(result, cache_hits=relay.cache_hits)

    # -- the plan ---------------------------------------------------------------------------

    def _plan_id(self, request: BlockRequest) -> str:
        with self._lock:
            self._blocks += 1
            number = self._blocks
        block = _PLAN_ID_CHARS.sub("_", request.block.node_id)
        return f"{request.run_id}.{number}.{block}"[:128]

    def _serialize(self, request: BlockRequest, client: RemoteClient, threshold: int) -> SerializedPlan:
        def carried(value: Any, content: bytes | None = None) -> Any:
            with self._lock:
                known = self._uploaded.get(id(value))
            if known is not None and known[0] is value:
                return known[1]
            sent = _carried(client, value, threshold, content)
            if isinstance(sent, CachedRef):
                with self._lock:
                    self._uploaded[id(value)] = (value, sent)
            return sent

        fit = request.phase == "fit"
        filters = []
        requirements: set[str] = set()
        for nid in request.nodes:
            node = self._nodes[nid]
            fit_key, out_key = request.keys.get(nid, (None, None))
            state = None if fit or not node.trainable else request.states.get(nid)
            filters.append(
                SerializedFilter(
                    node_id=nid,
                    pickled_filter=_pickle_filter(nid, node.filter),
                    state=None if state is None else carried(state),
                    requirements=sorted(node.requirements),
                    trainable=node.trainable,
                    differentiable=node.differentiable,
                    cacheable=node.cacheable,
                    stream_mode=node.stream_mode,  # type: ignore[arg-type]
                    fit_key=fit_key,
                    out_key=out_key,
                )
            )
            requirements.update(node.requirements)
        mode: Any = "Forward"
        if fit:
            mode = FitMode(y=carried(request.y, request.y_digest), batch_size=request.batch_size)
        return SerializedPlan(
            plan_id=self._plan_id(request),
            plan=request.block.plan.to_dict(),
            input=carried(request.x, request.x_digest) if request.has_roots else None,
            filters=filters,
            mode=mode,
            metadata={},
            protocol_version=2,
            edges=[(src, dst) for src, dst in request.edges],
            seed=request.seed,
            runtime=runtime_versions(),
            timeout_s=request.timeout,
            run_id=request.run_id,
            external={pred: carried(value) for pred, value in request.external.items()},
            outputs=list(request.outputs),
            requirements=sorted(requirements),
            resources=_resources(self._nodes[nid].filter for nid in request.nodes),
            events={"enabled": request.events, "logs": False},
        )

    # -- the reply --------------------------------------------------------------------------

    def _result(self, request: BlockRequest, client: RemoteClient, reply: PlanResult) -> BlockResult:
        success = reply.result
        output = _fetched(client, success.output)  # type: ignore[union-attr]
        if len(request.outputs) == 1:
            outputs = {request.outputs[0]: output}
        else:
            if not isinstance(output, dict) or any(nid not in output for nid in request.outputs):
                raise RemoteError(
                    f"worker {self.address} returned outputs for {sorted(output) if isinstance(output, dict) else '?'}"
                    f", expected {list(request.outputs)}",
                    code="bad_message",
                )
            outputs = {nid: _fetched(client, output[nid]) for nid in request.outputs}
        states: dict[str, Any] = {}
        state_keys: dict[str, str | None] = {}
        if request.phase == "fit":
            for nid, raw in success.states.items():  # type: ignore[union-attr]
                if nid not in self._nodes or not self._nodes[nid].trainable:
                    continue
                states[nid] = self._unwrapped(nid, _fetched(client, raw))
                state_keys[nid] = request.keys.get(nid, (None, None))[0]
            missing = [nid for nid in request.nodes if self._nodes[nid].trainable and nid not in states]
            if missing:
                raise RemoteError(f"worker {self.address} returned no state for {missing}", code="bad_message")
        self._remember(request, outputs, states)
        return BlockResult(outputs=outputs, states=states, state_keys=state_keys)

    def _unwrapped(self, nid: str, state: Any) -> Any:
        """The ``fit`` part of a weights envelope, its weights loaded into the client's filter."""
        node = self._nodes[nid]
        try:
            return unwrap_state(node.filter, state)
        except CommandError as exc:
            raise SomaConfigError(f"state of `{nid}` from worker {self.address}: {exc.message}") from exc
        except UserCodeError as exc:
            raise SomaConfigError(f"loading the weights of `{nid}` from worker {self.address} failed: {exc}") from exc

    def _remember(self, request: BlockRequest, outputs: Mapping[str, Any], states: Mapping[str, Any]) -> None:
        """Write what came back into the client's cache, as a local run would have."""
        cache = self._cache
        if cache is None:
            return
        for nid, state in states.items():
            fit_key = request.keys.get(nid, (None, None))[0]
            if fit_key is not None and not _trains_in_place(self._nodes[nid].filter):
                cache.put(fit_key, state, kind="state", node_id=nid, filter_name=self._nodes[nid].filter_name)
        for nid, value in outputs.items():
            out_key = request.keys.get(nid, (None, None))[1]
            if out_key is not None:
                cache.put(out_key, value, kind="output", node_id=nid, filter_name=self._nodes[nid].filter_name)


def _lost_reference(reply: Reply) -> bool:
    """Whether the worker refused a plan because a reference it was sent no longer resolves."""
    return (
        isinstance(reply, PlanResult)
        and isinstance(reply.result, PlanFailure)
        and reply.result.error.code == "unresolved_reference"
    )


def _pickle_filter(node_id: str, filter_obj: Any) -> bytes:
    try:
        data = pickle_filter(filter_obj)
    except Exception as exc:  # pickling runs the filter's own reducers; any failure is the filter's
        raise SomaConfigError(
            f"filter of node `{node_id}` ({type(filter_obj).__name__}) cannot be pickled for a worker: "
            f"{type(exc).__name__}: {exc}; keep unpicklable resources out of its parameters"
        ) from exc
    return data


def _carried(client: RemoteClient, value: Any, threshold: int, content: bytes | None = None) -> Any:
    """``value`` itself, or a reference to an uploaded copy when its encoded size reaches ``threshold``.

    With the value's ``content`` digest, an upload of the same content that the worker still
    holds is reused without encoding the value again.
    """
    if content is not None:
        held = client.held_upload(content)
        if held is not None:
            return held
    try:
        size, parts = measured(value)
    except WireError as exc:
        raise RemoteError(f"a value cannot be sent to a worker: {exc.message}", code=exc.code) from exc
    return value if size < threshold else client.upload_frame(parts, content=content)


def measured(value: Any) -> tuple[int, list[bytes | memoryview]]:
    """The encoded size of ``value`` (``v2.encoded_size``, the §4.5 measure) and its upload frame.

    Packing is done once (``v2.measure_value_frame``).
    """
    return v2.measure_value_frame(value)


def _fetched(client: RemoteClient, value: Any) -> Any:
    """Resolve a reference the worker answered with; other values pass unchanged."""
    if isinstance(value, CachedRef | LocalRef):
        return client.download(value)
    if isinstance(value, InlineRef):
        return value.value
    return value


def _trains_in_place(filter_obj: Any) -> bool:
    from soma.runtime.nodes import has_parameter_owner

    return has_parameter_owner(filter_obj)


def _resources(filters: Any) -> dict[str, Any] | None:
    """The union of the filters' ``_resources``: the largest request of each kind."""
    merged: dict[str, Any] = {}
    for filter_obj in filters:
        declared = getattr(filter_obj, "_resources", None)
        if not isinstance(declared, Mapping):
            continue
        for name, value in declared.items():
            current = merged.get(name)
            if current is None or (isinstance(value, int) and isinstance(current, int) and value > current):
                merged[name] = value
    return merged or None


class _EventRelay:
    """Re-emits a block's worker events on the calling thread and keeps node events paired."""

    def __init__(
        self, address: str, phase: str, kinds: Mapping[str, str], emit: Callable[[dict[str, Any]], None]
    ) -> None:
        self._address = address
        self._phase = phase
        self._kinds = kinds
        self._emit = emit
        self._open: dict[str, float] = {}
        self._seen: set[str] = set()
        self._hits: set[str] = set()

    @property
    def cache_hits(self) -> frozenset[str]:
        """Nodes the worker reported as completed without running user code."""
        return frozenset(self._hits)

    def __call__(self, frame: Reply) -> None:
        if not isinstance(frame, Event):
            return
        event = {**frame.event, "worker": self._address, "phase": self._phase}
        kind = event.get("event_type")
        node_id = event.get("node_id")
        if kind in _NODE_EVENTS and isinstance(node_id, str):
            if kind == "NodeStarted":
                event["target"] = self._address
                self._open[node_id] = time.perf_counter()
                self._seen.add(node_id)
            else:
                self._open.pop(node_id, None)
                if kind == "NodeCompleted" and event.get("cache_hit") is True:
                    self._hits.add(node_id)
        self._emit(event)

    def fail_open(self, error: str, error_type: str, run_id: str) -> list[str]:
        """``NodeFailed`` for every node the worker started but never finished (a lost worker); their ids."""
        failed = list(self._open)
        for node_id, started in self._open.items():
            event = ev.node_failed(run_id, self._phase, node_id, error, error_type, time.perf_counter() - started)
            self._emit({**event, "worker": self._address})
        self._open.clear()
        return failed

    def complete_unreported(self, node_ids: tuple[str, ...], run_id: str) -> None:
        """Pair the node events of a worker that streamed none (api.md §8 rule 4)."""
        for node_id in node_ids:
            if node_id in self._seen:
                continue
            started = ev.node_started(run_id, self._phase, node_id, self._kinds[node_id], self._address)
            self._emit({**started, "worker": self._address})
            done = ev.node_completed(run_id, self._phase, node_id, 0.0, False, "<remote>")
            self._emit({**done, "worker": self._address})


# ---------------------------------------------------------------------------- shutdown


def shutdown_worker(address: str, token: str | None = None, reason: str | None = None) -> None:
    """Send ``Shutdown`` to the worker at ``address`` and return at its ``Ack`` (within 2 s).

    Does not wait for the worker to exit. Raises ``RemoteError`` when it cannot be
    reached or refuses (``RemoteTimeoutError`` when it does not answer in time).
    """
    client_for(address, token).shutdown(reason, deadline=1.8)


def shutdown_workers(workers: Mapping[str, Mapping[str, Any]], reason: str | None = None) -> None:
    """``shutdown_worker`` for each worker; failures are reported together in one ``SomaWarning``."""
    failures = []
    for address, info in workers.items():
        try:
            shutdown_worker(address, info.get("token"), reason)
        except RemoteError as exc:
            failures.append(f"{address}: {exc}")
    if failures:
        warnings.warn(
            SomaWarning(f"{len(failures)} worker(s) could not be shut down: " + "; ".join(failures)), stacklevel=3
        )
