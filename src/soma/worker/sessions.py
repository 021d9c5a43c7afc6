"""Sessions (worker spec §6.8): a child kept pinned after a ``session.keep`` plan, with the slot
and GPUs it holds, for later plans and for the state and gradient messages.

    open (plan answered, child pinned) ──▶ idle timer ──▶ end
    using: one request at a time; the idle timer stops meanwhile and restarts after,
           unless the child died (the session ends)
    end: cancelled, idle, child died, connection closed or worker shutting down;
         the child is killed, slot and GPUs are released

``GetState``, ``SetState``, ``GetGradients`` and ``ApplyGradients`` run one child command per
node on a session's child and answer with one reply each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from soma.errors import SomaConfigError
from soma.isolation.failures import ChildFailure
from soma.isolation.pool import Pool
from soma.isolation.process import Child
from soma.log import worker_logger
from soma.wire.messages import (
    Ack,
    ApplyGradients,
    Error,
    GetGradients,
    GetState,
    GradientsResult,
    Reply,
    SerializedFilter,
    SerializedPlan,
    SetState,
    StateResult,
    make_error,
)
from soma.worker.config import WorkerConfig
from soma.worker.failures import Failed, wire_code
from soma.worker.references import Pins, outbound_map
from soma.worker.slots import GpuLease, Permit
from soma.worker.store import Store
from soma.worker.validate import PlanSpec, Refusal

__all__ = ["Session", "Sessions", "filter_digest"]


@dataclass(eq=False)
class Session:
    """A child pinned after a ``session.keep`` plan (worker spec §6.8), with the slot it holds."""

    key: tuple[int, str]
    session_id: str
    child: Child
    permit: Permit | None
    gpu_lease: GpuLease | None
    digest: tuple[tuple[str, str, bool, bool], ...]
    idle_s: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.TimerHandle | None = None
    ended: bool = False


def filter_digest(filters: Mapping[str, SerializedFilter]) -> tuple[tuple[str, str, bool, bool], ...]:
    """What identifies a plan's filters: a session reloads its child only when this changes."""
    return tuple(
        sorted(
            (f.node_id, hashlib.sha256(f.pickled_filter).hexdigest(), f.trainable, f.differentiable)
            for f in filters.values()
        )
    )


class Sessions:
    """The open sessions of a worker's connections, keyed by (connection id, session id).

    ``blocking`` runs blocking work on the executor's threads; ``spawn`` runs a coroutine as a
    task the executor waits for on shutdown (an idle session ending).
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        pool: Pool,
        store: Store,
        blocking: Callable[..., Awaitable[Any]],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self._config = config
        self._pool = pool
        self._store = store
        self._blocking = blocking
        self._spawn = spawn
        self._sessions: dict[tuple[int, str], Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    async def end_all(self, reason: str, *, owner: int | None = None) -> None:
        """End every session, or only those of connection ``owner``."""
        for key, session in list(self._sessions.items()):
            if owner is None or key[0] == owner:
                await self.end(session, reason)

    async def get_state(self, msg: GetState, owner: int, dialect: str) -> Reply:
        """``GetState``: ``GET_STATE`` per node of a session -> ``StateResult``."""
        states: dict[str, Any] = {}
        async with self._held(owner, msg.plan_id) as session:
            if session is None:
                return self.unknown(msg.plan_id)
            for node_id in msg.node_ids:
                try:
                    reply = await self._call(session, "GET_STATE", node_id=node_id)
                except ChildFailure as failure:
                    return self._message_error(msg.plan_id, failure, node_id)
                states[node_id] = reply.get("state")
        try:
            states = await self._blocking(outbound_map, self._store, self._config.inline_threshold, states, dialect)
        except Failed as failed:
            return make_error(failed.info.code, failed.info.message, plan_id=msg.plan_id)
        return StateResult(worker_id=self._config.worker_id, plan_id=msg.plan_id, states=states)

    async def set_state(self, msg: SetState, owner: int) -> Reply:
        """``SetState``: ``SET_STATE`` per node in order, stopping at the first failure -> ``Ack``."""
        done: list[str] = []
        async with self._held(owner, msg.plan_id) as session, Pins(self._store) as pins:
            if session is None:
                return self.unknown(msg.plan_id)
            for node_id, value in msg.states.items():
                try:
                    state = await self._blocking(pins.resolve, value, f"state of `{node_id}`")
                    await self._call(session, "SET_STATE", node_id=node_id, state=state)
                except Failed as failed:
                    return self._set_state_error(msg.plan_id, node_id, done, failed.info.code, failed.info.message)
                except ChildFailure as failure:
                    return self._set_state_error(msg.plan_id, node_id, done, wire_code(failure), failure.message)
                done.append(node_id)
        return Ack(worker_id=self._config.worker_id, plan_id=msg.plan_id)

    async def get_gradients(self, msg: GetGradients, owner: int, dialect: str) -> Reply:
        """``GetGradients``: ``GET_GRADIENTS`` per node -> ``GradientsResult`` (nodes without any in ``missing``)."""
        gradients: dict[str, Any] = {}
        missing: list[str] = []
        async with self._held(owner, msg.plan_id) as session:
            if session is None:
                return self.unknown(msg.plan_id)
            for node_id in msg.node_ids:
                try:
                    reply = await self._call(session, "GET_GRADIENTS", node_id=node_id)
                except ChildFailure as failure:
                    if failure.code == "no_gradient":
                        missing.append(node_id)
                        continue
                    return self._message_error(msg.plan_id, failure, node_id)
                gradients[node_id] = reply.get("gradients", {})
        try:
            if dialect == "v2":
                gradients = {
                    node_id: await self._blocking(outbound_map, self._store, self._config.inline_threshold, grads, "v2")
                    for node_id, grads in gradients.items()
                }
        except Failed as failed:
            return make_error(failed.info.code, failed.info.message, plan_id=msg.plan_id)
        return GradientsResult(
            worker_id=self._config.worker_id, plan_id=msg.plan_id, gradients=gradients, missing=missing
        )

    async def apply_gradients(self, msg: ApplyGradients, owner: int) -> Reply:
        """``ApplyGradients``: ``APPLY_GRADIENTS`` per node with its learning rate -> ``Ack``."""
        async with self._held(owner, msg.plan_id) as session, Pins(self._store) as pins:
            if session is None:
                return self.unknown(msg.plan_id)
            for node_id, grads in msg.gradients.items():
                lr = msg.lr.get(node_id) if isinstance(msg.lr, dict) else msg.lr
                try:
                    resolved = {
                        name: await self._blocking(pins.resolve, value, f"gradient {name} of `{node_id}`")
                        for name, value in grads.items()
                    }
                    await self._call(session, "APPLY_GRADIENTS", node_id=node_id, gradients=resolved, lr=lr)
                except Failed as failed:
                    return make_error(failed.info.code, failed.info.message, plan_id=msg.plan_id)
                except ChildFailure as failure:
                    return self._message_error(msg.plan_id, failure, node_id)
        return Ack(worker_id=self._config.worker_id, plan_id=msg.plan_id)

    def for_plan(self, plan: SerializedPlan, owner: int, spec: PlanSpec) -> Session | None:
        """The session a plan runs in (``None``: a pooled child); raises ``Refusal`` for an unknown one
        or a ``session.keep`` plan whose id is already a session of the connection."""
        if plan.session_id is None:
            if spec.keep and (owner, plan.plan_id) in self._sessions:
                raise Refusal("bad_plan", f"a session {plan.plan_id!r} is already open on this connection")
            return None
        session = self.find(owner, plan.session_id)
        if session is None:
            raise Refusal("unknown_session", self._unknown_text(plan.session_id))
        return session

    def find(self, owner: int, session_id: str) -> Session | None:
        """Connection ``owner``'s open session ``session_id``, if any."""
        session = self._sessions.get((owner, session_id))
        if session is None or session.ended:
            return None
        return session

    @staticmethod
    def _unknown_text(session_id: str) -> str:
        return (
            f"no session {session_id!r} on this connection: it never existed, ended (cancelled, idle, "
            "child died) or belongs to another connection"
        )

    def unknown(self, session_id: str) -> Error:
        """The ``unknown_session`` error for ``session_id``."""
        return make_error(
            "unknown_session",
            self._unknown_text(session_id),
            worker_id=self._config.worker_id,
            plan_id=session_id,
        )

    @contextlib.asynccontextmanager
    async def using(self, session: Session) -> AsyncIterator[Session]:
        """Hold a session for one request: one user at a time, idle timer stopped meanwhile."""
        async with session.lock:
            if session.timer is not None:
                session.timer.cancel()
                session.timer = None
            try:
                yield session
            finally:
                if not session.ended:
                    if not session.child.alive:
                        await self.end(session, "its child died")
                    else:
                        self._arm_idle_timer(session)

    @contextlib.asynccontextmanager
    async def _held(self, owner: int, session_id: str) -> AsyncIterator[Session | None]:
        """Connection ``owner``'s session ``session_id``, held for one request (``using``); ``None``
        when it is not open, or ended while the request waited for it."""
        session = self.find(owner, session_id)
        if session is None:
            yield None
            return
        async with self.using(session):
            yield None if session.ended else session

    def _arm_idle_timer(self, session: Session) -> None:
        loop = asyncio.get_running_loop()
        session.timer = loop.call_later(
            session.idle_s, lambda: self._spawn(self.end(session, f"idle for {session.idle_s:g} s"))
        )

    def open(
        self, key: tuple[int, str], child: Child, permit: Permit | None, lease: GpuLease | None, spec: PlanSpec
    ) -> Session:
        """Register a child already pinned in the pool as a session holding ``permit`` and ``lease``."""
        # Returning a pinned child to the pool stops its memory watch: watch it again.
        watch = self._pool.memory_watch
        if watch is not None:
            watch.register(child, child.spec.memory_limit)
        session = Session(
            key=key,
            session_id=key[1],
            child=child,
            permit=permit,
            gpu_lease=lease,
            digest=filter_digest(spec.filters),
            idle_s=spec.idle_s,
        )
        self._sessions[key] = session
        self._arm_idle_timer(session)
        worker_logger.info("session %s opened on child %d", key[1], child.pid)
        return session

    async def end(self, session: Session, reason: str) -> None:
        """Kill the session's child and release its slot and GPUs (idempotent)."""
        if session.ended:
            return
        session.ended = True
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        worker_logger.info("session %s ended: %s", session.session_id, reason)
        session.child.kill("cancelled", detail=f"its session ended ({reason})")
        with contextlib.suppress(SomaConfigError):
            await self._blocking(self._pool.kill_pinned, session.child, "released")
        if session.permit is not None:
            session.permit.release()
        if session.gpu_lease is not None:
            session.gpu_lease.release()

    async def _call(self, session: Session, cmd: str, **fields: Any) -> dict[str, Any]:
        # Child.call caps state and gradient commands at 60 s (isolation.md §6).
        reply: dict[str, Any] = await self._blocking(session.child.call, cmd, timeout=self._config.timeout, **fields)
        return reply

    def _message_error(self, session_id: str, failure: ChildFailure, node_id: str) -> Error:
        return make_error(
            wire_code(failure),
            f"node `{node_id}`: {failure.message}",
            worker_id=self._config.worker_id,
            plan_id=session_id,
            details={"node_id": node_id},
        )

    def _set_state_error(self, session_id: str, node_id: str, done: list[str], code: str, message: str) -> Error:
        already = ", ".join(f"`{n}`" for n in done) or "none"
        return make_error(
            code,
            f"SetState failed at node `{node_id}` (already set: {already}): {message}",
            worker_id=self._config.worker_id,
            plan_id=session_id,
            details={"node_id": node_id, "set": list(done)},
        )
