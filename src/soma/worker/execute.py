"""Plan execution on the worker: ``AssignPlan`` from validation to its one terminal reply (worker spec §6).

    run_plan(AssignPlan, conn)
      1 validate, no side effect (validate.py) ─▶ refusal: v1 Failed / v2 Error
      2 slot (FIFO, --max-queue, --queue-timeout; a session's plan uses the session's, sessions.py)
        [GPU lease for resources.gpus] ─────▶ busy
      3 references resolved and pinned (input, y, external, states; references.py)
      4 child checked out (pool key: interpreter, env, GPUs, threads) or the session's child
        LOAD filters, runtime, seed, states (skipped in a session with the same filters)
      5 walk (walk.py): Sequence in order, Parallel members in order, Composite per phase,
        Cached = Execute on a worker miss, Remote inside a block runs here;
        per node: cache lookup ─hit─▶ Opaque(blob) ; miss ─▶ FIT / BATCHED_FIT / FORWARD
        intermediates stay in the child as handles; events stream to the client meanwhile
      6 outputs and states: inline, or stored and referenced at >= inline_threshold (references.py)
      7 child back to the pool (reset) or pinned as a session; pins, GPUs and slot released

This module holds the orchestration: slots and GPU leases, child checkout and return,
cancellation, the plan's time limit (every child command of the walk goes through
``_PlanRun._call``, which checks both), draining and shutdown.

Child I/O is blocking (``Child.call``, ``Pool.acquire`` and ``Pool.release`` are synchronous), so
it runs on the executor's own thread pool and never on the event loop; what cannot block (an
idle child, a memory-only cache, encoding a small result) stays on the loop, since a thread hop
costs more than that work. Cancellation and time limits
kill the child from the loop (``Child.kill`` works from any thread), which ends the call in
flight at once. The worker never unpickles user objects: filters, opaque values and cache
blobs pass through as bytes and markers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from soma.errors import SomaError
from soma.isolation.failures import ChildFailure
from soma.isolation.limits import affinity_for
from soma.isolation.pool import Pool
from soma.isolation.process import Child
from soma.isolation.spec import ChildSpec
from soma.log import worker_logger
from soma.runtime import events as ev
from soma.wire.errors import WireError
from soma.wire.messages import (
    ApplyGradients,
    AssignPlan,
    ErrorInfo,
    Event,
    GetGradients,
    GetState,
    PlanFailure,
    PlanResult,
    PlanSuccess,
    Reply,
    SetState,
    make_error,
)
from soma.worker.blobcache import BlobCache
from soma.worker.config import WorkerConfig
from soma.worker.detect import Detected, Effective, detect_cpus, detect_gpus, detect_ram, effective
from soma.worker.failures import Failed, error_info, wire_code
from soma.worker.references import REFERENCES, Pins, encodes_quickly, outbound
from soma.worker.sessions import Session, Sessions, filter_digest
from soma.worker.slots import GpuLease, GpuLeases, Permit, ResourceBusy, Slots
from soma.worker.store import Store
from soma.worker.validate import PlanSpec, Refusal, validate_plan
from soma.worker.walk import PlanWalk, event, served_by_cache

__all__ = ["Peer", "PlanExecutor"]

_CANCEL_GRACE_S = 0.5
"""How long a cancelled plan may take to report its own ``cancelled`` failure before one is sent for it."""

_CLOSE_WAIT_S = 5.0
_RETURN_WAIT_S = 1.0
"""How long a plan waits for a child being reset before the pool spawns another."""

T = TypeVar("T")


class Peer(Protocol):
    """What the executor needs from a client connection (``soma.worker.connection.Connection``)."""

    @property
    def dialect(self) -> str: ...

    async def send(self, msg: Reply, re: str | None = None) -> None: ...


class _Metrics(Protocol):
    """The counters the executor updates (``soma.worker.metrics.WorkerMetrics``)."""

    @property
    def plan_seconds(self) -> Any: ...

    @property
    def cache_hits(self) -> Any: ...

    @property
    def cache_misses(self) -> Any: ...


# --------------------------------------------------------------------------- the executor


class PlanExecutor:
    """Runs plans and session messages for the worker's connections (worker spec §6.1–§6.8).

    ``pool`` supplies children, ``store`` resolves references and keeps large results,
    ``metrics`` (optional) receives plan durations and cache counts. ``capabilities`` are
    the worker's effective values (CPUs, RAM, allowed GPUs); detected here when not given.
    Every public coroutine runs on the worker's event loop and returns one terminal reply.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        pool: Pool,
        store: Store,
        metrics: _Metrics | None = None,
        capabilities: Effective | None = None,
    ) -> None:
        self._config = config
        self._pool = pool
        self._store = store
        self._metrics = metrics
        self._caps = capabilities if capabilities is not None else _detect(config)
        self._slots = Slots(config.max_concurrent, max_queue=config.max_queue, queue_timeout=config.queue_timeout)
        self._gpu_ids = tuple(gpu.uuid or str(gpu.index) for gpu in self._caps.gpus)
        self._gpus = GpuLeases(self._gpu_ids, queue_timeout=config.queue_timeout)
        self._cache = BlobCache(config.cache_bytes, config.cache_dir)
        self._threads = max(1, self._caps.cpu_cores // config.max_concurrent)
        self._affinity = affinity_for(self._caps.cpu_cores) if config.cpus is not None else None
        self._io = concurrent.futures.ThreadPoolExecutor(
            max_workers=2 * config.max_concurrent + 4, thread_name_prefix="soma-exec"
        )
        self._runs: dict[tuple[int, str], _PlanRun] = {}
        # Children being reset for the pool after their plan answered, by pool key.
        self._returning: dict[tuple[Any, ...], set[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sessions = Sessions(config, pool=pool, store=store, blocking=self._blocking, spawn=self._spawn)
        self._closing = False
        self._closed = False

    # -- public surface ------------------------------------------------------------------

    @property
    def cache(self) -> BlobCache:
        """The worker's blob cache."""
        return self._cache

    def child_spec(
        self, *, threads: int | None = None, gpus: Sequence[str] | None = None, memory: int | None = None
    ) -> ChildSpec:
        """The ``ChildSpec`` of a plan: ``threads`` (default cpu_cores // max_concurrent), the GPUs it
        sees (default every allowed one) and its RSS cap (``memory`` and ``--child-memory``, the lower)."""
        config = self._config
        limits = [m for m in (memory, config.child_memory) if m is not None]
        return ChildSpec(
            interpreter=config.python,
            env_key="base",
            cuda_visible_devices=",".join(self._gpu_ids if gpus is None else gpus),
            threads=threads or self._threads,
            work_root=str(config.work_dir),
            memory_limit=min(limits) if limits else None,
            rlimit_as=config.child_rlimit_as,
            cpu_affinity=self._affinity,
            start_timeout=config.child_start_timeout,
        )

    async def run_plan(self, msg: AssignPlan, conn: Peer) -> Reply:
        """Run one ``AssignPlan`` and return its terminal reply (``PlanResult``, or a v2 ``Error`` refusal)."""
        received = time.monotonic()
        plan = msg.plan
        dialect = conn.dialect
        key = (id(conn), plan.plan_id)
        try:
            if self._closing:
                raise Refusal("shutting_down", "the worker is shutting down; send the plan elsewhere or later")
            spec = validate_plan(plan, dialect, self._caps, self._config.timeout)
            if key in self._runs:
                raise Refusal("bad_plan", f"plan {plan.plan_id!r} is already running on this connection")
            session = self._sessions.for_plan(plan, id(conn), spec)
        except Refusal as refusal:
            worker_logger.info("plan %s refused: %s: %s", plan.plan_id, refusal.code, refusal.message)
            return self._refusal(msg, dialect, refusal)
        run = _PlanRun(self, spec, msg, conn, session, received)
        self._runs[key] = run
        if run.cache_served:
            # No child will need resetting after the reply, so the plan runs in this task: a
            # cached plan saves the task and the wait below, a good part of its time here.
            try:
                return await run.execute()
            except asyncio.CancelledError:
                run.cancel("the request was abandoned")
                raise
            finally:
                self._runs.pop(key, None)
        task = self._spawn(run.execute())
        try:
            # ``answered`` comes before the task ends when the child is reset for the pool after the reply.
            await asyncio.wait({task, run.answered, run.cancelled}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            run.cancel("the request was abandoned")
            raise
        finally:
            self._runs.pop(key, None)
        if run.answered.done():
            return run.answered.result()
        if task.done():
            reply: Reply = task.result()
            return reply
        return run.cancelled_reply()

    async def cancel(self, plan_id: str, conn: Peer) -> bool:
        """``CancelPlan``: dequeue or kill this connection's plan, or end its session; ``False`` if unknown."""
        key = (id(conn), plan_id)
        run = self._runs.get(key)
        if run is not None:
            run.cancel("cancelled by the client")
            return True
        session = self._sessions.find(*key)
        if session is not None:
            await self._sessions.end(session, "cancelled by the client")
            return True
        return False

    async def get_state(self, msg: GetState, conn: Peer) -> Reply:
        """``GetState``: ``GET_STATE`` per node of a session -> ``StateResult``."""
        return await self._sessions.get_state(msg, id(conn), conn.dialect)

    async def set_state(self, msg: SetState, conn: Peer) -> Reply:
        """``SetState``: ``SET_STATE`` per node in order, stopping at the first failure -> ``Ack``."""
        return await self._sessions.set_state(msg, id(conn))

    async def get_gradients(self, msg: GetGradients, conn: Peer) -> Reply:
        """``GetGradients``: ``GET_GRADIENTS`` per node -> ``GradientsResult`` (nodes without any in ``missing``)."""
        return await self._sessions.get_gradients(msg, id(conn), conn.dialect)

    async def apply_gradients(self, msg: ApplyGradients, conn: Peer) -> Reply:
        """``ApplyGradients``: ``APPLY_GRADIENTS`` per node with its learning rate -> ``Ack``."""
        return await self._sessions.apply_gradients(msg, id(conn))

    async def connection_closed(self, conn: Peer) -> None:
        """Cancel every plan of ``conn`` and end its sessions (worker spec §6.6)."""
        owner = id(conn)
        for key, run in list(self._runs.items()):
            if key[0] == owner:
                run.cancel("the connection was closed")
        await self._sessions.end_all("its connection was closed", owner=owner)

    def status(self) -> dict[str, Any]:
        """Running plan ids, queue depth, open sessions and free slots (for ``Status`` and ``/metrics``)."""
        return {
            "running": [run.plan_id for run in self._runs.values() if run.running],
            "queue_depth": self._slots.queue_depth,
            "sessions": len(self._sessions),
            "free_slots": self._slots.free,
            "max_concurrent": self._slots.capacity,
        }

    async def drain(self, drain_s: float) -> None:
        """Refuse new plans (``shutting_down``), give running ones ``drain_s`` seconds, cancel the rest."""
        self._closing = True
        pending = {task for task in self._tasks if not task.done()}
        if pending and drain_s > 0:
            await asyncio.wait(pending, timeout=drain_s)
        for run in list(self._runs.values()):
            run.cancel("the worker is shutting down")
        await self._settle()

    async def close(self) -> None:
        """Cancel every plan, end every session and stop the executor's threads (idempotent)."""
        if self._closed:
            return
        self._closing = True
        for run in list(self._runs.values()):
            run.cancel("the worker is shutting down")
        await self._sessions.end_all("the worker is shutting down")
        await self._settle()
        self._closed = True
        self._io.shutdown(wait=False, cancel_futures=True)

    # -- helpers shared with _PlanRun --------------------------------------------------------

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work (child I/O, files) on the executor's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, functools.partial(fn, *args, **kwargs))

    async def _returned(self, key: tuple[Any, ...]) -> None:
        """With no idle child, wait (briefly) for children of ``key`` still being reset: reusing one
        beats spawning one."""
        returning = self._returning.get(key)
        if returning and self._pool.stats().idle == 0:
            await asyncio.wait(returning, timeout=_RETURN_WAIT_S)

    async def _checkout(self, spec: ChildSpec) -> Child:
        """A child for ``spec``: the idle one at once, else one reset meanwhile or spawned (on a thread)."""
        child = self._pool.take_idle(spec)
        if child is None:
            await self._returned(spec.pool_key)
            child = await self._blocking(self._pool.acquire, spec)
        return child

    async def _give_back(self, key: tuple[Any, ...], child: Child) -> None:
        """Return ``child`` to the pool (which resets it, or discards it) on a thread."""
        loop = asyncio.get_running_loop()
        returning = loop.run_in_executor(self._io, self._pool.release, child)
        self._returning.setdefault(key, set()).add(returning)
        try:
            await returning
        finally:
            waiting = self._returning.get(key)
            if waiting is not None:
                waiting.discard(returning)
                if not waiting:
                    del self._returning[key]

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            worker_logger.error("executor task failed", exc_info=task.exception())

    async def _settle(self) -> None:
        pending = {task for task in self._tasks if not task.done()}
        if pending:
            await asyncio.wait(pending, timeout=_CLOSE_WAIT_S)

    def _count_cache(self, hit: bool) -> None:
        if self._metrics is not None:
            (self._metrics.cache_hits if hit else self._metrics.cache_misses).inc()

    def _observe_plan(self, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.plan_seconds.observe(seconds)

    # -- replies -------------------------------------------------------------------------------

    def _refusal(self, msg: AssignPlan, dialect: str, refusal: Refusal) -> Reply:
        if dialect == "v1":
            info = error_info(refusal.code, refusal.message, node_id=refusal.node_id)
            failed = PlanFailure(error=info)
            return PlanResult(worker_id=self._config.worker_id, plan_id=msg.plan.plan_id, result=failed)
        details = dict(refusal.details or {})
        if refusal.node_id is not None:
            details.setdefault("node_id", refusal.node_id)
        return make_error(
            refusal.code,
            refusal.message,
            worker_id=self._config.worker_id,
            plan_id=msg.plan.plan_id,
            details=details or None,
        )


def _detect(config: WorkerConfig) -> Effective:
    detected = Detected(cpu_cores=detect_cpus(), ram_bytes=detect_ram(), gpus=tuple(detect_gpus()))
    return effective(detected, cpus=config.cpus, memory=config.memory, gpus=config.gpus, tags=config.tags)


# --------------------------------------------------------------------------- one plan


class _PlanRun:
    """The execution of one validated plan; ``execute`` returns its terminal reply."""

    def __init__(
        self,
        executor: PlanExecutor,
        spec: PlanSpec,
        msg: AssignPlan,
        conn: Peer,
        session: Session | None,
        received: float,
    ) -> None:
        self._ex = executor
        self._config = executor._config
        self.spec = spec
        self.msg = msg
        self.conn = conn
        self.session = session
        # Whether the worker's cache holds every state and output the plan computes: then it
        # takes no child (unless an entry is evicted before the walk reads it).
        self.cache_served = session is None and not spec.keep and served_by_cache(spec, executor._cache)
        self.plan_id = spec.plan.plan_id
        self.run_id = (spec.plan.run_id if spec.dialect == "v2" else None) or self.plan_id
        self._received = received
        self._loop = asyncio.get_running_loop()
        self.cancelled: asyncio.Future[None] = self._loop.create_future()
        self.answered: asyncio.Future[Reply] = self._loop.create_future()
        self.cancel_reason: str | None = None
        self.running = False
        self._acquiring: asyncio.Task[Any] | None = None
        self._slot: Permit | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._deadline = math.inf
        self._started = received
        self.child: Child | None = None
        self._child_spec: ChildSpec | None = None
        self._lease: GpuLease | None = None
        self._checked_out = False
        self._pins = Pins(executor._store)
        self._input: Any = None
        self._y: Any = None
        self._external: dict[str, Any] = {}
        self._given: dict[str, Any] = {}

    # -- cancellation ----------------------------------------------------------------------

    def cancel(self, reason: str) -> None:
        """Dequeue the plan or kill its child; the reply follows within ``_CANCEL_GRACE_S``."""
        if self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        if self._acquiring is not None and not self._acquiring.done():
            self._acquiring.cancel()
        if self.child is not None:
            self.child.kill("cancelled", detail=reason)
        self._grace = self._loop.call_later(_CANCEL_GRACE_S, self._give_up)

    def _give_up(self) -> None:
        if not self.cancelled.done():
            self.cancelled.set_result(None)

    def _cancellederror_info(self) -> ErrorInfo:
        return error_info("cancelled", f"plan {self.plan_id!r} was cancelled: {self.cancel_reason}")

    def cancelled_reply(self) -> Reply:
        """The reply sent for a cancelled plan that had not yet answered by itself."""
        return self._failure_reply(self._cancellederror_info())

    def _check_cancel(self) -> None:
        if self.cancel_reason is not None:
            raise Failed(self._cancellederror_info())

    # -- the lifecycle -----------------------------------------------------------------------

    async def execute(self) -> Reply:
        try:
            if self.session is not None:
                async with self._ex._sessions.using(self.session):
                    reply = await self._execute_in_session(self.session)
            else:
                reply = await self._execute_with_slot()
        except Exception as exc:  # a bug here must still give the plan its one terminal reply
            worker_logger.exception("plan %s: the executor failed", self.plan_id)
            reply = self._failure_reply(error_info("internal", f"the worker failed: {type(exc).__name__}: {exc}"))
        finally:
            if self._grace is not None:
                self._grace.cancel()
        self._answer(reply)
        return reply

    def _answer(self, reply: Reply) -> None:
        """Hand ``reply`` to ``run_plan`` (the first answer wins)."""
        if not self.answered.done():
            self.answered.set_result(reply)

    async def _execute_with_slot(self) -> Reply:
        ex = self._ex
        permit: Permit | None = None
        lease: GpuLease | None = None
        try:
            try:
                permit = ex._slots.acquire_now()
                if permit is None:  # wait in the queue, in a task that cancel() can end
                    self._acquiring = asyncio.ensure_future(ex._slots.acquire())
                    permit = await self._acquiring
                if self.spec.resources.gpus:
                    self._acquiring = asyncio.ensure_future(ex._gpus.acquire(self.spec.resources.gpus))
                    lease = await self._acquiring
            except ResourceBusy as exc:
                return self._busy(str(exc))
            except asyncio.CancelledError:
                if self.cancel_reason is None:
                    raise
                return self._failure_reply(self._cancellederror_info())
            finally:
                self._acquiring = None
            self._begin()
            self._slot = permit
            reply, pinned = await self._run_pooled(lease)
            if pinned is not None:
                ex._sessions.open((id(self.conn), self.plan_id), pinned, permit, lease, self.spec)
                permit = lease = None
            return reply
        finally:
            if lease is not None:
                lease.release()
            if permit is not None:
                permit.release()

    def _begin(self) -> None:
        self.running = True
        self._started = time.monotonic()
        self._deadline = self._started + self.spec.budget

    async def _run_pooled(self, lease: GpuLease | None) -> tuple[Reply, Child | None]:
        """Run on a pooled child; returns the reply and the child if it stays pinned as a session.

        A plan whose every node the worker's cache serves needs no child: it takes one only
        if a node turns out to need one after all (an entry evicted meanwhile).
        """
        ex = self._ex
        self._lease = lease
        pinned: Child | None = None
        try:
            try:
                await self._resolve_references()
                self._check_cancel()
                if self.spec.order and not self.cache_served:
                    await self._take_child()
                reply = await self._walk_and_reply()
                if self.spec.keep and self.child is not None and self.child.alive:
                    ex._pool.pin(self.child)
                    pinned = self.child
            except Failed as failed:
                reply = self._failure_reply(failed.info)
            except ChildFailure as failure:  # no child could be started
                reply = self._failure_reply(self._child_failure(failure, None))
            except SomaError as exc:  # the pool was closed under the plan
                reply = self._failure_reply(error_info("shutting_down", str(exc)))
            self._pins.release()
            self._observe()
            if pinned is None:
                # The client gets its answer, and the slot is free, before the child is reset for
                # the pool (a LOAD that collects the child's garbage: tens of ms). A plan that
                # checks out meanwhile waits for the child rather than spawning another
                # (PlanExecutor._returned); GPUs stay leased until the child has let them go.
                self._answer(reply)
                if self._slot is not None:
                    self._slot.release()
            return reply, pinned
        finally:
            self._pins.release()
            if self._checked_out:
                assert self.child is not None
                self._detach_child()
                assert self._child_spec is not None
                await ex._give_back(self._child_spec.pool_key, self.child)
            self._observe()

    async def _take_child(self) -> None:
        """Check a child out of the pool (of the plan's kind of child) and LOAD the plan's filters into it."""
        resources, lease = self.spec.resources, self._lease
        devices = lease.devices if lease is not None else (() if resources.gpus == 0 else None)
        self._child_spec = self._ex.child_spec(threads=resources.threads, gpus=devices, memory=resources.memory)
        self.child = await self._ex._checkout(self._child_spec)
        self._checked_out = True
        if self.cancel_reason is not None:
            self.child.kill("cancelled", detail=self.cancel_reason)
        self._check_cancel()
        self._attach_child()
        await self._load()

    async def _execute_in_session(self, session: Session) -> Reply:
        if session.ended or not session.child.alive:
            await self._ex._sessions.end(session, "its child died")
            return self._ex._sessions.unknown(session.session_id)
        self._begin()
        self.child = session.child
        try:
            self._check_cancel()
            await self._resolve_references()
            self._attach_child()
            if session.digest == filter_digest(self.spec.filters):
                for node_id, state in self._given.items():
                    await self._call("SET_STATE", node_id, node_id=node_id, state=state)
            else:
                await self._load()
                session.digest = filter_digest(self.spec.filters)
            return await self._walk_and_reply()
        except Failed as failed:
            return self._failure_reply(failed.info)
        finally:
            self._pins.release()
            self._detach_child()
            self._observe()

    def _observe(self) -> None:
        """Record the plan's duration once, when it has its reply."""
        if self.running:
            self.running = False
            self._ex._observe_plan(time.monotonic() - self._started)

    def _attach_child(self) -> None:
        child = self.child
        assert child is not None
        child.plan_id = self.plan_id
        if self.spec.logs:
            child.on_output = self._on_output

    def _detach_child(self) -> None:
        child = self.child
        if child is not None:
            child.plan_id = None
            child.on_output = self._ex._pool.on_output

    def _busy(self, message: str) -> Reply:
        if self.spec.dialect == "v1":
            return self._failure_reply(error_info("busy", message))
        return make_error("busy", message, worker_id=self._config.worker_id, plan_id=self.plan_id)

    # -- preparation ---------------------------------------------------------------------------

    async def _resolve_references(self) -> None:
        plan = self.spec.plan
        values = [plan.input, self.spec.y, *plan.external.values(), *(f.state for f in self.spec.filters.values())]
        if any(isinstance(value, REFERENCES) for value in values):
            await self._ex._blocking(self._resolve_all)  # file I/O: one thread hop for all of them
        else:
            self._resolve_all()  # inline values only: a thread hop would cost more than the work

    def _resolve_all(self) -> None:
        plan = self.spec.plan
        resolve = self._pins.resolve
        self._input = resolve(plan.input, "input")
        if self.spec.fit:
            self._y = resolve(self.spec.y, "y")
        for pred, value in plan.external.items() if self.spec.dialect == "v2" else ():
            self._external[pred] = resolve(value, f"external output of `{pred}`")
        for node_id, f in self.spec.filters.items():
            if f.state is not None:
                state = resolve(f.state, f"state of `{node_id}`")
                if state is not None:
                    self._given[node_id] = state

    async def _load(self) -> None:
        runtime = self.spec.plan.runtime
        load_runtime = None
        if isinstance(runtime, dict) and isinstance(runtime.get("python"), str) and isinstance(
            runtime.get("cloudpickle"), str
        ):
            load_runtime = {"python": runtime["python"], "cloudpickle": runtime["cloudpickle"]}
        filters = [
            {"id": f.node_id, "pickle": f.pickled_filter, "trainable": f.trainable, "differentiable": f.differentiable}
            for f in self.spec.filters.values()
        ]
        await self._call(
            "LOAD", None, filters=filters, runtime=load_runtime, seed=self.spec.plan.seed, states=self._given
        )

    # -- child calls and events ------------------------------------------------------------------

    async def _call(self, cmd: str, node: str | None, **fields: Any) -> dict[str, Any]:
        """One child command within the plan's budget; ``node`` names the node it runs for."""
        self._check_cancel()
        if self.child is None:  # a plan the cache was to serve whole needs its child after all
            try:
                await self._take_child()
            except ChildFailure as failure:
                raise Failed(self._child_failure(failure, node)) from None
        child = self.child
        assert child is not None
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise Failed(self._timeouterror_info(node))
        progress = self._on_progress if cmd == "BATCHED_FIT" else None
        try:
            return await self._ex._blocking(child.call, cmd, timeout=remaining, on_progress=progress, **fields)
        except ChildFailure as failure:
            raise Failed(self._child_failure(failure, node)) from None

    def _timeouterror_info(self, node_id: str | None) -> ErrorInfo:
        where = f" while running node `{node_id}`" if node_id is not None else ""
        return error_info(
            "timeout",
            f"plan {self.plan_id!r} ran past its time limit of {self.spec.budget:g} s{where}; its child was killed",
            node_id=node_id,
        )

    def _child_failure(self, failure: ChildFailure, node_id: str | None) -> ErrorInfo:
        if self.cancel_reason is not None and failure.code in ("cancelled", "child_crashed"):
            return self._cancellederror_info()
        error = failure.details.get("error") or {}
        node = error.get("node_id") or failure.details.get("node_id") or node_id
        if failure.code == "timeout" and time.monotonic() >= self._deadline - 0.05:
            return self._timeouterror_info(node)
        code = wire_code(failure)
        if code == "user_error":
            method = error.get("method")
            python_type = error.get("type")
            message = str(error.get("message", failure.message))
            if self.spec.dialect == "v1":
                message = f"Python {method or 'user code'}() error: {python_type}: {message}"
            return error_info(
                code,
                message,
                node_id=node,
                method=method,
                python_type=python_type,
                traceback=error.get("traceback"),
            )
        return error_info(code, failure.message, node_id=node, python_type=error.get("type"))

    async def _emit(self, event: dict[str, Any]) -> None:
        if not self.spec.events or self.cancel_reason is not None:
            return
        message = Event(worker_id=self._config.worker_id, plan_id=self.plan_id, event=event)
        try:
            await self.conn.send(message, self.msg.id)
        except WireError as exc:
            worker_logger.warning("plan %s: event %s not sent: %s", self.plan_id, event.get("event_type"), exc)

    def _emit_from_thread(self, event: dict[str, Any]) -> None:
        """Send an event from a child I/O thread, waiting while the client lags (back-pressure, §6.7)."""
        if not self.spec.events:
            return
        future = asyncio.run_coroutine_threadsafe(self._emit(event), self._loop)
        while True:
            try:
                future.result(timeout=0.1)
                return
            except TimeoutError:
                if self.cancel_reason is not None:
                    future.cancel()
                    return

    def _on_progress(self, frame: dict[str, Any]) -> None:
        self._emit_from_thread(
            ev.batch_progress(
                self.run_id,
                self.spec.phase,
                frame.get("node_id"),
                int(frame.get("batch", 0)),
                int(frame.get("n_batches", 0)),
                int(frame.get("rows", 0)),
                int(frame.get("total_rows", 0)),
            )
        )

    def _on_output(self, stream: str, line: str) -> None:
        node_id = self.child.node_id if self.child is not None else None
        self._emit_from_thread(event("Log", self.run_id, self.spec.phase, node_id=node_id, stream=stream, line=line))

    # -- the walk ----------------------------------------------------------------------------------

    async def _walk_and_reply(self) -> PlanResult:
        ex = self._ex
        walk = PlanWalk(
            self.spec,
            run_id=self.run_id,
            target=self._config.advertise or self._config.worker_id,
            x=self._input,
            y=self._y,
            external=self._external,
            call=self._call,
            emit=self._emit,
            cache=ex._cache,
            count_cache=ex._count_cache,
            blocking=ex._blocking,
        )
        await walk.run()
        results = [walk.values[nid] for nid in self.spec.outputs] if self.spec.order else [self._input]
        if encodes_quickly([*results, *walk.states.values()], self._config.inline_threshold):
            # Small enough to go inline; v2 can carry whatever passed the check, so nothing is measured.
            output, states = self._encode_results(walk, inline=self.spec.dialect == "v2")
        else:
            output, states = await ex._blocking(self._encode_results, walk)
        now = time.monotonic()
        success = PlanSuccess(
            output=output,
            duration_ms=int((now - self._received) * 1000),
            states=states,
            timings={
                "queue_ms": int((self._started - self._received) * 1000),
                "env_ms": 0,
                "exec_ms": int((now - self._started) * 1000),
            },
            metrics=walk.metrics,
        )
        worker_logger.info(
            "plan %s: %d node(s) %s in %d ms", self.plan_id, len(self.spec.order), self.spec.phase, success.duration_ms
        )
        return PlanResult(worker_id=self._config.worker_id, plan_id=self.plan_id, result=success)

    # -- results -----------------------------------------------------------------------------------

    def _encode_results(self, walk: PlanWalk, *, inline: bool = False) -> tuple[Any, dict[str, Any]]:
        """The output (§6.2) and states (§6.3), each inline or by reference (§4.5). Runs in a thread
        unless ``inline``: every value is known to travel inline, as it is."""
        spec = self.spec
        dialect = spec.dialect
        store, threshold = self._ex._store, self._config.inline_threshold

        def sent(value: Any, *, state: bool = False) -> Any:
            return value if inline else outbound(store, threshold, value, dialect, state=state)

        if not spec.order:
            return sent(None if dialect == "v1" else self._input), {}
        if len(spec.outputs) == 1:
            output = sent(walk.values[spec.outputs[0]])
        else:
            output = {node_id: sent(walk.values[node_id]) for node_id in spec.outputs}
        return output, {node_id: sent(state, state=True) for node_id, state in walk.states.items()}

    def _failure_reply(self, info: ErrorInfo) -> PlanResult:
        worker_logger.info("plan %s failed: %s: %s", self.plan_id, info.code, info.message)
        duration_ms = int((time.monotonic() - self._received) * 1000)
        return PlanResult(
            worker_id=self._config.worker_id,
            plan_id=self.plan_id,
            result=PlanFailure(error=info, duration_ms=duration_ms),
        )
