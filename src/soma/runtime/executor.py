"""The executor: walks a plan for ``fit``, ``forward``, ``run`` and streamed ``forward``.

Data flow of one run::

    Graph ──(plan, node records, x, y, states)──▶ Run
      Run.execute:
        check the plan (Loop/Branch, Remote without a remote runner -> CompileError)
        open one NodeRunner per runner kind ("local", "subprocess", ...) and one
        RemoteRunner per Remote target, for the nodes each will execute
        RunStarted
        walk: Sequence in order; Parallel on a thread pool when max_parallel > 1;
              Execute/Cached/Composite node by node:
                input (x, the predecessor's output, or {pred: output})
                keys (KeyBook, §6.1) -> cache lookups (§6.4) -> runner.fit/forward
              Remote: one RemoteRunner.run_block call for the whole block
        RunCompleted / RunFailed
      -> RunOutcome(outputs, states, state_keys); the Graph commits states on success.

The walker never calls user code itself: a ``NodeRunner`` does (``soma.runtime.runners``
holds that seam and the ``Remote`` block contract). Cache keys come from a ``KeyBook``
(``soma.runtime.keys``), nodes are ``NodeRecord``s (``soma.runtime.nodes``). What stays
here is the walk itself: the plan walk with its thread pool, cache lookups and shared
fits, and the streamed forward, which drives the same runners, events and failure
bookkeeping chunk by chunk.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from soma.errors import ChildError, CompileError, FilterError
from soma.runtime import events as ev
from soma.runtime.batching import (
    concat_chunks,
    has_partial_fit,
    is_row_sliceable,
    n_rows,
    output_summary,
    split_chunks,
)
from soma.runtime.cache import Cache, CacheHit
from soma.runtime.events import EventHub
from soma.runtime.keys import KeyBook
from soma.runtime.nodes import NodeRecord, has_parameter_owner
from soma.runtime.plan import (
    Branch,
    Cached,
    Composite,
    Empty,
    Execute,
    GraphShape,
    Loop,
    Parallel,
    PlanStep,
    Remote,
    Sequence,
    cached_count,
    iter_steps,
    parallel_branches,
)
from soma.runtime.runners import (
    BlockRequest,
    NodeRunner,
    RemoteRunner,
    RemoteRunnerFactory,
    RunnerFactory,
    RunnerSpec,
    default_runners,
)

__all__ = ["PlanFacts", "Run", "RunOutcome"]

# The run whose pool thread this context belongs to: a Parallel step nested in a pool
# member of the same run executes inline instead of waiting on its own busy pool.
_pool_member_of: contextvars.ContextVar[object] = contextvars.ContextVar(
    "soma_pool_member_of", default=None
)


@dataclass(frozen=True)
class PlanFacts:
    """What a run needs to know about its plan before walking it (computed once per plan)."""

    refused: str | None
    """Why the plan cannot run here (a ``Loop`` or ``Branch`` step), or ``None``."""
    remote: Mapping[str, tuple[str, ...]]
    """The node ids of the ``Remote`` blocks of each target, in plan order."""

    @classmethod
    def of(cls, plan: PlanStep) -> PlanFacts:
        refused: str | None = None
        remote: dict[str, list[str]] = {}
        for step in iter_steps(plan):
            if isinstance(step, (Loop, Branch)) and refused is None:
                refused = f"{type(step).__name__} steps cannot be executed by this version"
            elif isinstance(step, Remote):
                remote.setdefault(step.target, []).extend(_leaf_ids(step.plan))
        return cls(refused, {target: tuple(ids) for target, ids in remote.items()})


@dataclass
class RunOutcome:
    """What a successful run produced; the Graph commits ``states`` after a fit."""

    outputs: dict[str, Any]
    states: dict[str, Any]
    state_keys: dict[str, str | None]
    result: Any = None


class Run:
    """One execution of a plan. Create, then call ``execute()`` (or ``stream()``) once."""

    def __init__(
        self,
        *,
        phase: str,
        shape: GraphShape,
        nodes: Mapping[str, NodeRecord],
        plan: PlanStep,
        hub: EventHub,
        facts: PlanFacts | None = None,
        x: Any = None,
        y: Any = None,
        batch_size: int | None = None,
        states: Mapping[str, Any] | None = None,
        state_keys: Mapping[str, str | None] | None = None,
        cache: Cache | None = None,
        keys: KeyBook | None = None,
        seed: int | None = None,
        max_parallel: int = 1,
        timeout: float | None = None,
        isolation: str | None = None,
        runners: Mapping[str, RunnerFactory] | None = None,
        remote_runner: RemoteRunnerFactory | None = None,
        warn_uncached: Callable[[str, str], None] | None = None,
    ) -> None:
        self.phase = phase
        self.shape = shape
        self.nodes = nodes
        self.plan = plan
        self.facts = facts if facts is not None else PlanFacts.of(plan)
        self.hub = hub
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.states = states or {}
        self.state_keys = state_keys or {}
        self.cache = cache
        self.seed = seed
        self.max_parallel = max_parallel
        self.timeout = timeout
        self.isolation = isolation
        self.runner_factories = runners if runners is not None else default_runners()
        self.remote_runner = remote_runner
        self.warn_uncached = warn_uncached
        self.keys = keys or KeyBook(
            shape, nodes, x=x, y=y, seed=seed, batch_size=batch_size, state_keys=self.state_keys
        )
        self.outputs: dict[str, Any] = {}
        self.new_states: dict[str, Any] = {}
        self.new_state_keys: dict[str, str | None] = {}
        self._hits: dict[str, bool] = {}
        self._node_runners: dict[str, NodeRunner] = {}
        self._remotes: dict[str, RemoteRunner] = {}
        self._fit_claims: dict[str, threading.Event] = {}
        self._fit_shared: dict[str, Any] = {}
        self._claims_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._run_id: str | None = None
        self._failed_at: dict[int, str] = {}

    # -- identity and events --------------------------------------------------------

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            self._run_id = f"graph_{self.phase}_{os.urandom(8).hex()}"
        return self._run_id

    def _emit(self, make: Callable[..., dict[str, Any]], *args: Any) -> None:
        if self.hub.active:
            self.hub.emit(make(self.run_id, self.phase, *args))

    # -- entry points ---------------------------------------------------------------

    def execute(self) -> RunOutcome:
        """Run the plan; raise the first failure (after ``NodeFailed`` and ``RunFailed``)."""
        self._check_plan()
        return self._lifecycle(self._walk_plan)

    def stream(self, chunk_size: int) -> RunOutcome:
        """Streamed forward of a linear graph (§5.6): chunks flow through the nodes, nothing cached."""
        self._check_plan()
        if self.facts.remote:
            raise CompileError(
                "streamed forward of nodes placed on workers needs the remote stream runner"
            )
        return self._lifecycle(lambda: self._walk_stream(chunk_size))

    def _check_plan(self) -> None:
        if self.facts.refused is not None:
            raise CompileError(self.facts.refused)
        if self.facts.remote and self.remote_runner is None:
            target = next(iter(self.facts.remote))
            raise CompileError(
                f"Remote blocks for {target} cannot run: no remote runner is available"
            )

    def _lifecycle(self, body: Callable[[], Any]) -> RunOutcome:
        start = time.perf_counter()
        if self.hub.active:
            summary = {
                "total_nodes": len(self.shape.nodes),
                "cached_nodes": cached_count(self.plan),
                "parallel_branches": parallel_branches(self.plan),
            }
            self._emit(ev.run_started, summary, self.seed, len(self.shape.nodes))
        try:
            with contextlib.ExitStack() as stack:
                self._open_runners(stack)
                result = body()
        except BaseException as exc:
            self._emit(
                ev.run_failed, str(exc), self._failed_at.get(id(exc), getattr(exc, "node_id", None))
            )
            raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        if self.hub.active:
            hits = sum(self._hits.values())
            elapsed = time.perf_counter() - start
            self._emit(ev.run_completed, elapsed, len(self._hits) - hits, hits)
        return RunOutcome(self.outputs, self.new_states, self.new_state_keys, result)

    # -- runners --------------------------------------------------------------------

    def _open_runners(self, stack: contextlib.ExitStack) -> None:
        """Open one runner per runner kind and one remote runner per target, for their nodes."""
        in_remote = {nid for ids in self.facts.remote.values() for nid in ids}
        isolated = self.isolation == "subprocess"
        local_nodes: dict[str, list[str]] = {}
        for nid in self.shape.order:
            if nid in in_remote:
                continue
            kind = "subprocess" if isolated or self.nodes[nid].target == "subprocess" else "local"
            if kind not in self.runner_factories:
                kind = "local"
            local_nodes.setdefault(kind, []).append(nid)
        for kind, ids in local_nodes.items():
            runner = stack.enter_context(self.runner_factories[kind](self._spec(ids)))
            self._node_runners.update(dict.fromkeys(ids, runner))
        for target, block_ids in self.facts.remote.items():
            assert self.remote_runner is not None
            remote = self.remote_runner(target, self._spec(block_ids))
            self._remotes[target] = stack.enter_context(remote)

    def _spec(self, node_ids: list[str] | tuple[str, ...]) -> RunnerSpec:
        return RunnerSpec(
            phase=self.phase,
            node_ids=tuple(node_ids),
            filters={nid: self.nodes[nid].filter for nid in node_ids},
            seed=self.seed,
            timeout=self.timeout,
        )

    # -- walking --------------------------------------------------------------------

    def _walk_plan(self) -> Any:
        self._step(self.plan)
        return self._result()

    def _result(self) -> Any:
        if self.phase == "run":
            return {nid: self.outputs[nid] for nid in self.shape.order}
        sinks = self.shape.sinks
        if not sinks:
            return self.x
        if len(sinks) == 1:
            return self.outputs[sinks[0]]
        return {nid: self.outputs[nid] for nid in sinks}

    def _step(self, step: PlanStep) -> None:
        if isinstance(step, (Execute, Cached)):
            self._node(step.node_id)
        elif isinstance(step, Sequence):
            for child in step.steps:
                # Most children are single nodes: dispatched here, one call fewer per node.
                if type(child) is Execute:
                    self._node(child.node_id)
                else:
                    self._step(child)
        elif isinstance(step, Parallel):
            self._parallel(step.branches)
        elif isinstance(step, Composite):
            for nid in step.node_ids:
                self._node(nid)
        elif isinstance(step, Remote):
            self._remote(step)
        elif not isinstance(step, Empty):  # pragma: no cover - refused by _check_plan
            raise CompileError(f"cannot execute {type(step).__name__}")

    def _parallel(self, branches: tuple[PlanStep, ...]) -> None:
        if self.max_parallel <= 1 or len(branches) == 1 or _pool_member_of.get() is self:
            for branch in branches:
                self._step(branch)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_parallel, thread_name_prefix="soma-node")
        stop = threading.Event()

        def member(branch: PlanStep) -> None:
            if stop.is_set():
                return
            _pool_member_of.set(self)  # only in this member's own context copy
            try:
                self._step(branch)
            except BaseException:
                stop.set()
                raise

        # Each member gets its own copy of the caller's context: the seed and the
        # re-entrancy mark reach user code and event callbacks on pool threads.
        futures: list[Future[None]] = [
            self._pool.submit(contextvars.copy_context().run, member, branch) for branch in branches
        ]
        # Wait for every member (running ones finish, queued ones see ``stop``), then
        # raise the failure of the earliest member in canonical order.
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    # -- one node -------------------------------------------------------------------

    def _input(self, nid: str) -> Any:
        preds = self.shape.predecessors[nid]
        if not preds:
            return self.x
        if len(preds) == 1:
            return self.outputs[preds[0]]
        return {p: self.outputs[p] for p in preds}

    def _node(self, nid: str) -> None:
        node = self.nodes[nid]
        runner = self._node_runners[nid]
        if self.hub.active:
            self._emit(ev.node_started, nid, node.kind, runner.where)
        start = time.perf_counter()
        try:
            hit = self._compute(node, runner)
        except BaseException as exc:
            self._node_failed(nid, exc, time.perf_counter() - start)
            raise
        self._hits[nid] = hit
        if self.hub.active:
            summary = output_summary(self.outputs[nid])
            self._emit(ev.node_completed, nid, time.perf_counter() - start, hit, summary)

    def _node_failed(self, nid: str, exc: BaseException, duration_s: float) -> None:
        if isinstance(exc, (FilterError, ChildError)) and exc.node_id is None:
            exc.node_id = nid
        if isinstance(exc, FilterError) and exc.phase is None:
            exc.phase = self.phase
        self._failed_at.setdefault(id(exc), nid)
        error_type = exc.type_name if isinstance(exc, FilterError) else type(exc).__name__
        self._emit(ev.node_failed, nid, str(exc), error_type, duration_s)

    def _compute(self, node: NodeRecord, runner: NodeRunner) -> bool:
        """Produce the node's output (and state, in fit); return whether no user method ran."""
        nid = node.node_id
        x = self._input(nid)
        keyed = self.cache is not None and node.cacheable
        in_key: Any = self.keys.in_key(nid, self.outputs) if keyed else None
        hit = True
        state_key: str | None
        if not node.trainable:
            state, state_key = None, "stateless"
        elif self.phase == "fit":
            state, state_key, fitted = self._fit_state(
                node, runner, x, in_key if keyed else None, keyed
            )
            hit = not fitted
        else:
            state = self.states.get(nid)
            state_key = self.state_keys.get(nid)
        okey = self.keys.out_key(nid, in_key, state_key) if keyed else None
        if okey is None or node.differentiable:
            if keyed and okey is None and not node.differentiable:
                self._warn_uncached(nid)
            self.outputs[nid] = runner.forward(nid, x, state)
            return False
        found = self._lookup(nid, okey, "output")
        if found is not None:
            self.outputs[nid] = found.value
            return hit
        output = runner.forward(nid, x, state)
        assert self.cache is not None  # keyed implies a cache
        self.cache.put(okey, output, kind="output", node_id=nid, filter_name=node.filter_name)
        self.outputs[nid] = output
        return False

    def _fit_state(
        self, node: NodeRecord, runner: NodeRunner, x: Any, in_key: Any, keyed: bool
    ) -> tuple[Any, str | None, bool]:
        """The node's new state: from the cache, shared with an identical sibling, or fitted."""
        nid = node.node_id
        fkey = self.keys.fit_key(nid, in_key) if in_key is not None else None
        if has_parameter_owner(node.filter):
            # Weights are trained in place on the filter object: a skipped fit would
            # leave them untrained, so the state is never cached (§6.4).
            state = self._call_fit(node, runner, x)
            self._commit_state(nid, state, fkey)
            return state, fkey, True
        if fkey is None:
            if keyed:
                self._warn_uncached(nid)
            state = self._call_fit(node, runner, x)
            self._commit_state(nid, state, None)
            return state, None, True
        found = self._lookup(nid, fkey, "state")
        if found is not None:
            self._commit_state(nid, found.value, fkey)
            return found.value, fkey, False
        with self._claims_lock:
            claim = self._fit_claims.get(fkey)
            owner = claim is None
            if owner:
                claim = self._fit_claims[fkey] = threading.Event()
        assert claim is not None
        if not owner:
            # An identical sibling is fitting the same state on another thread; it
            # holds no lock this thread has, so waiting for it cannot deadlock.
            claim.wait()
            found = self._lookup(nid, fkey, "state")
            if found is not None:
                self._commit_state(nid, found.value, fkey)
                return found.value, fkey, False
            if fkey in self._fit_shared:  # the cache did not keep it (budget, no tier)
                self._emit(ev.node_cache_hit, nid, fkey, "memory", "state", 0)
                self._commit_state(nid, self._fit_shared[fkey], fkey)
                return self._fit_shared[fkey], fkey, False
        try:
            state = self._call_fit(node, runner, x)
            assert self.cache is not None
            self.cache.put(fkey, state, kind="state", node_id=nid, filter_name=node.filter_name)
            self._fit_shared[fkey] = state
        finally:
            if owner:
                claim.set()
        self._commit_state(nid, state, fkey)
        return state, fkey, True

    def _commit_state(self, nid: str, state: Any, key: str | None) -> None:
        self.new_states[nid] = state
        self.new_state_keys[nid] = key

    def _call_fit(self, node: NodeRecord, runner: NodeRunner, x: Any) -> Any:
        nid = node.node_id
        if self.batch_size is not None and has_partial_fit(node.filter) and is_row_sliceable(x):

            def on_batch(batch: int, n_batches: int, rows: int, total: int) -> None:
                self._emit(ev.batch_progress, nid, batch, n_batches, rows, total)

            return runner.partial_fit(nid, x, self.y, self.batch_size, on_batch)
        return runner.fit(nid, x, self.y)

    def _lookup(self, nid: str, key: str, what: str) -> CacheHit | None:
        assert self.cache is not None
        found = self.cache.lookup(key)
        if found is not None and self.hub.active:
            self._emit(ev.node_cache_hit, nid, key, found.tier, what, found.load_time_ms)
        return found

    def _warn_uncached(self, nid: str) -> None:
        if self.warn_uncached is not None:
            self.warn_uncached(nid, self.keys.reasons.get(nid, "its cache key cannot be computed"))

    # -- remote blocks --------------------------------------------------------------

    def _remote(self, step: Remote) -> None:
        ids = _leaf_ids(step.plan)
        inside = set(ids)
        order = [nid for nid in self.shape.order if nid in inside]
        external = {
            p: self.outputs[p]
            for nid in order
            for p in self.shape.predecessors[nid]
            if p not in inside
        }
        needed = tuple(
            nid
            for nid in order
            if self.phase == "run"
            or not self.shape.successors[nid]
            or any(s not in inside for s in self.shape.successors[nid])
        )
        keys: dict[str, tuple[str | None, str | None]] = {}
        if self.cache is not None:
            for nid in order:
                if self.nodes[nid].cacheable:
                    okey = self.keys.predict(nid, self.outputs)
                    fkey = self.keys.fit_keys.get(nid) if self.phase == "fit" else None
                    keys[nid] = (fkey, None if self.nodes[nid].differentiable else okey)
            if self._serve_block_from_cache(order, keys):
                return
        request = BlockRequest(
            run_id=self.run_id,
            phase=self.phase,
            block=step,
            nodes=tuple(order),
            edges=tuple(e for e in self.shape.edges if e[1] in inside),
            x=self.x,
            has_roots=any(not self.shape.predecessors[nid] for nid in order),
            external=external,
            y=self.y,
            batch_size=self.batch_size,
            states={nid: self.states.get(nid) for nid in order if self.nodes[nid].trainable},
            keys=keys,
            outputs=needed,
            seed=self.seed,
            timeout=self.timeout,
            events=self.hub.active,
            x_digest=self.keys.data_digest("x"),
            y_digest=self.keys.data_digest("y"),
        )
        result = self._remotes[step.target].run_block(request, self.hub.emit)
        self.outputs.update(result.outputs)
        if self.phase == "fit":
            for nid, state in result.states.items():
                self._commit_state(
                    nid, state, result.state_keys.get(nid, keys.get(nid, (None, None))[0])
                )
        for nid in order:
            self._hits.setdefault(nid, nid in result.cache_hits)

    def _serve_block_from_cache(
        self, order: list[str], keys: Mapping[str, tuple[str | None, str | None]]
    ) -> bool:
        """Serve a ``Remote`` block from this process's cache when it holds every output (and, in
        fit, every state) of the block, as local nodes are served: no request is sent.

        Otherwise the worker gets the whole block; it holds the same keys in its own cache.
        """
        cache = self.cache
        assert cache is not None
        fit = self.phase == "fit"
        wanted: list[tuple[str, str | None, str]] = []
        for nid in order:
            node = self.nodes[nid]
            fkey, okey = keys.get(nid, (None, None))
            stateful = fit and node.trainable
            if okey is None or not cache.contains(okey):
                return False
            if stateful and (fkey is None or has_parameter_owner(node.filter) or not cache.contains(fkey)):
                return False
            wanted.append((nid, fkey if stateful else None, okey))
        found: list[tuple[str, str | None, CacheHit | None, str, CacheHit]] = []
        for nid, fkey, okey in wanted:
            state = cache.lookup(fkey) if fkey is not None else None
            output = cache.lookup(okey)
            if output is None or (fkey is not None and state is None):  # evicted meanwhile
                return False
            found.append((nid, fkey, state, okey, output))
        for nid, fkey, state, okey, output in found:
            node = self.nodes[nid]
            start = time.perf_counter()
            if self.hub.active:
                self._emit(ev.node_started, nid, node.kind, "local")
            if state is not None:
                if self.hub.active:
                    self._emit(ev.node_cache_hit, nid, fkey, state.tier, "state", state.load_time_ms)
                self._commit_state(nid, state.value, fkey)
            if self.hub.active:
                self._emit(ev.node_cache_hit, nid, okey, output.tier, "output", output.load_time_ms)
            self.outputs[nid] = output.value
            self._hits[nid] = True
            if self.hub.active:
                summary = output_summary(output.value)
                self._emit(ev.node_completed, nid, time.perf_counter() - start, True, summary)
        return True

    # -- streamed forward -----------------------------------------------------------

    def _walk_stream(self, chunk_size: int) -> Any:
        order = list(self.shape.order)
        if not order:
            return self.x
        chunks = split_chunks(self.x, chunk_size)
        total = n_rows(self.x) if is_row_sliceable(self.x) else 1
        evolving = {
            nid: self.states.get(nid) for nid in order if self.nodes[nid].stream_mode == "evolving"
        }
        barriers = [i for i, nid in enumerate(order) if self.nodes[nid].stream_mode == "barrier"]
        buffers: dict[int, list[Any]] = {i: [] for i in barriers}
        started: dict[str, float] = {}
        last_output: dict[str, Any] = {}
        results: list[Any] = []
        failing: list[str] = []

        def call(nid: str, value: Any) -> Any:
            node = self.nodes[nid]
            runner = self._node_runners[nid]
            if nid not in started:
                started[nid] = 0.0
                self._emit(ev.node_started, nid, node.kind, runner.where)
            begin = time.perf_counter()
            try:
                if nid in evolving:
                    state = evolving[nid]
                    out = runner.forward(nid, value, state)
                    if callable(getattr(node.filter, "update", None)):
                        evolving[nid] = runner.update(nid, value, state)
                else:
                    out = runner.forward(
                        nid, value, self.states.get(nid) if node.trainable else None
                    )
            except BaseException:
                failing.append(nid)
                started[nid] += time.perf_counter() - begin
                raise
            started[nid] += time.perf_counter() - begin
            last_output[nid] = out
            return out

        def push(start: int, value: Any) -> None:
            for i in range(start, len(order)):
                if i in buffers:
                    buffers[i].append(value)
                    return
                value = call(order[i], value)
            results.append(value)

        def complete(nids: list[str]) -> None:
            for nid in nids:
                if nid in started:
                    self._hits[nid] = False
                    if self.hub.active:
                        summary = output_summary(last_output.get(nid))
                        self._emit(ev.node_completed, nid, started.pop(nid), False, summary)

        first_barrier = barriers[0] if barriers else len(order)
        try:
            for number, chunk in enumerate(chunks, start=1):
                push(0, chunk)
                rows = n_rows(chunk) if is_row_sliceable(chunk) else 1
                self._emit(ev.batch_progress, None, number, len(chunks), rows, total)
            complete(order[:first_barrier])
            for k, index in enumerate(barriers):
                segment_end = barriers[k + 1] if k + 1 < len(barriers) else len(order)
                out = call(order[index], concat_chunks(buffers.pop(index)))
                push(index + 1, out)
                complete(order[index:segment_end])
        except BaseException as exc:
            nid = failing[0] if failing else None
            # Nodes upstream of the failure did their share of the stream: close them.
            complete([n for n in order if n in started and n != nid])
            if nid is not None:
                self._node_failed(nid, exc, started.pop(nid, 0.0))
            raise
        return concat_chunks(results)


def _leaf_ids(step: PlanStep) -> list[str]:
    ids: list[str] = []
    for s in iter_steps(step):
        if isinstance(s, (Execute, Cached)):
            ids.append(s.node_id)
        elif isinstance(s, Composite):
            ids.extend(s.node_ids)
    return ids
