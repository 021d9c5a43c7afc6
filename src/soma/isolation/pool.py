"""Pooled filter-daemon children: reuse per pool key, reset between tenants, retirement, pinning.

A plan checks out one child for its whole duration (isolation.md §2.2)::

    checkout(spec) ─▶ idle child of spec.pool_key (newest first) or Child.spawn
      (= acquire/release; take_idle: the idle child only, never blocking)
         │ the plan calls the child
         ▼
    on exit: dead or failed ─▶ discarded          pinned (session) ─▶ kept until kill_pinned
             served max_tasks ─▶ retired          otherwise LOAD {filters: []} ─▶ idle
                                                                      │
    janitor, every second: idle longer than idle_ttl, idle RSS above max_idle_rss,
    dead while idle ─▶ retired; more than max_idle idle ─▶ oldest retired

Retiring is ``Child.shutdown`` (SHUTDOWN, 5 s, then SIGKILL of the group), always done
outside the pool lock. Every child is spawned from the pool's own ``Spawner`` thread,
which lives until ``close``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Self

from soma.errors import SomaConfigError, SomaError
from soma.isolation.failures import ChildFailure
from soma.isolation.limits import MemoryWatch
from soma.isolation.output import OutputHook
from soma.isolation.process import Child
from soma.isolation.spawner import Spawner
from soma.isolation.spec import ChildSpec
from soma.log import isolation_logger

__all__ = ["Pool", "PoolStats", "default_pool"]

RESET_TIMEOUT = 30.0
"""Seconds a returning child gets to drop its tenant's filters (``LOAD {filters: []}``)."""


@dataclass(frozen=True)
class PoolStats:
    """Counts for metrics: children by state, spawns, and children ended by reason.

    ``kills`` reasons: the failure code of a child that died or was killed in use
    (``child_crashed``, ``timeout``, ``memory_limit``, ...), ``reset_failed``, and the
    retirements ``idle_ttl``, ``max_idle``, ``max_tasks``, ``idle_rss``, ``dead_idle``,
    ``released`` (a pinned child let go) and ``closed``.
    """

    idle: int
    busy: int
    pinned: int
    spawned: int
    kills: dict[str, int] = field(default_factory=dict)


@dataclass
class _Idle:
    child: Child
    since: float


class Pool:
    """Children pooled per ``ChildSpec.pool_key``; thread-safe.

    ``max_idle`` caps idle children over all keys, ``idle_ttl`` (s) retires children
    idle that long, ``max_tasks`` retires a child after that many checkouts, and
    ``max_idle_rss`` (bytes) retires idle children that grew past it. ``restricted``
    decodes replies with the restricted unpickler (the worker); the local runtime sets
    it to ``False``. ``memory_watch``, when given, watches every checked-out child with
    its spec's ``memory_limit``. ``on_output`` is the default output hook of children.
    """

    def __init__(
        self,
        *,
        max_idle: int = 4,
        idle_ttl: float = 300.0,
        max_tasks: int = 100,
        max_idle_rss: int = 2 << 30,
        restricted: bool = True,
        memory_watch: MemoryWatch | None = None,
        on_output: OutputHook | None = None,
        janitor_interval: float = 1.0,
    ) -> None:
        if (
            max_idle < 0
            or max_tasks < 1
            or idle_ttl <= 0
            or max_idle_rss < 1
            or janitor_interval <= 0
        ):
            raise SomaConfigError(
                "pool limits must be positive (max_idle may be 0): got "
                f"max_idle={max_idle}, idle_ttl={idle_ttl}, max_tasks={max_tasks}, "
                f"max_idle_rss={max_idle_rss}, janitor_interval={janitor_interval}"
            )
        self.max_idle = max_idle
        self.idle_ttl = idle_ttl
        self.max_tasks = max_tasks
        self.max_idle_rss = max_idle_rss
        self.restricted = restricted
        self.memory_watch = memory_watch
        self.on_output = on_output
        self._janitor_interval = janitor_interval
        self._idle: dict[tuple[Any, ...], list[_Idle]] = collections.defaultdict(list)
        self._busy: set[Child] = set()
        self._pinned: set[Child] = set()
        self._spawned = 0
        self._kills: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._spawner = Spawner("soma-pool-spawner")
        self._janitor = threading.Thread(
            target=self._janitor_loop, name="soma-pool-janitor", daemon=True
        )
        self._janitor.start()

    # -- checkout ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def checkout(self, spec: ChildSpec) -> Iterator[Child]:
        """Yield a child for ``spec`` (an idle one of its key, newest first, else a new one).

        On exit the child is reset and parked, or discarded if it failed; a child
        ``pin``-ned inside the block stays with the caller. Raises ``ChildFailure``
        (``child_start_failed``) when no child could be started, ``SomaError`` after
        ``close``.
        """
        child = self.acquire(spec)
        try:
            yield child
        finally:
            self.release(child)

    def take_idle(self, spec: ChildSpec) -> Child | None:
        """Check out the newest idle child of ``spec``'s key if it is alive, else return ``None``.

        Never spawns, resets or retires anything, so it does not block: an event loop calls
        it before sending ``acquire`` to a thread. Give the child back with ``release``.
        """
        with self._lock:
            self._check_open()
            idle = self._idle.get(spec.pool_key)
            if not idle or not idle[-1].child.alive:
                return None
            child = idle.pop().child
            self._busy.add(child)
        self._start_use(child, spec)
        return child

    def acquire(self, spec: ChildSpec) -> Child:
        """``checkout``'s entry (blocking: it may spawn); give the child back with ``release``."""
        key = spec.pool_key
        while True:
            with self._lock:
                self._check_open()
                idle = self._idle.get(key)
                entry = idle.pop() if idle else None
                if entry is not None:
                    self._busy.add(entry.child)
            if entry is None:
                break
            if entry.child.alive:
                self._start_use(entry.child, spec)
                return entry.child
            with self._lock:
                self._busy.discard(entry.child)
            self._discard(entry.child, "dead_idle")
        child = self._spawn(spec)
        with self._lock:
            if self._closed:
                closed = True
            else:
                closed = False
                self._busy.add(child)
        if closed:
            child.shutdown()
            self._check_open()
        self._start_use(child, spec)
        return child

    def _spawn(self, spec: ChildSpec) -> Child:
        child = Child.spawn(spec, restricted=self.restricted, on_output=self.on_output, spawner=self._spawner)
        with self._lock:
            self._spawned += 1
        return child

    def _start_use(self, child: Child, spec: ChildSpec) -> None:
        child.tasks += 1
        if self.memory_watch is not None:
            self.memory_watch.register(child, spec.memory_limit)

    def release(self, child: Child) -> None:
        """``checkout``'s exit: reset and park ``child``, or discard it (blocking: it calls the child)."""
        with self._lock:
            if child in self._pinned:
                return  # a session child stays watched until kill_pinned
            self._busy.discard(child)
            closed = self._closed
        if self.memory_watch is not None:
            self.memory_watch.unregister(child)
        reason: str | None = None
        if closed:
            reason = "closed"
        elif not child.alive:
            reason = (
                child.failure.code
                if child.failure is not None
                else child.kill_reason or "child_crashed"
            )
        elif child.tasks >= self.max_tasks:
            reason = "max_tasks"
        else:
            try:
                child.call(
                    "LOAD", timeout=RESET_TIMEOUT, filters=[], runtime=None, seed=None
                )
            except ChildFailure as exc:
                isolation_logger.warning(
                    "child %d failed its reset and is killed: %s", child.pid, exc
                )
                child.kill("reset_failed")
                reason = "reset_failed"
        if reason is not None:
            self._discard(child, reason)
            return
        child.plan_id = None
        child.node_id = None
        child.on_output = self.on_output
        with self._lock:
            if self._closed:
                reason = "closed"
            else:
                self._idle[child.spec.pool_key].append(_Idle(child, time.monotonic()))
        if reason is not None:
            self._discard(child, reason)
        self._trim_idle()

    # -- sessions ----------------------------------------------------------------------------

    def pin(self, child: Child) -> None:
        """Detach a checked-out child: leaving ``checkout`` no longer returns it to the pool.

        Its catalog, states and handles stay for later messages (isolation.md §2.3).
        End it with ``kill_pinned``; ``close`` kills pinned children too.
        """
        with self._lock:
            if child not in self._busy:
                raise SomaConfigError(f"{child!r} is not checked out from this pool")
            self._busy.discard(child)
            self._pinned.add(child)

    def kill_pinned(self, child: Child, reason: str = "released") -> None:
        """Kill a pinned child (its session ended); a pinned child is never pooled again."""
        with self._lock:
            if child not in self._pinned:
                raise SomaConfigError(f"{child!r} is not pinned in this pool")
            self._pinned.discard(child)
        if self.memory_watch is not None:
            self.memory_watch.unregister(child)
        child.kill("cancelled", detail=f"its session ended ({reason})")
        self._discard(child, reason)

    # -- warm-up, stats, close ---------------------------------------------------------------

    def prewarm(self, spec: ChildSpec, n: int = 1) -> None:
        """Spawn ``n`` idle children of ``spec`` now (still capped by ``max_idle``)."""
        if n < 0:
            raise SomaConfigError(f"prewarm count must be >= 0, got {n}")
        for _ in range(n):
            self._check_open()
            child = self._spawn(spec)
            with self._lock:
                closed = self._closed
                if not closed:
                    self._idle[spec.pool_key].append(_Idle(child, time.monotonic()))
            if closed:
                self._discard(child, "closed")
        self._trim_idle()

    def stats(self) -> PoolStats:
        """A snapshot of the pool's counts."""
        with self._lock:
            return PoolStats(
                idle=sum(len(entries) for entries in self._idle.values()),
                busy=len(self._busy),
                pinned=len(self._pinned),
                spawned=self._spawned,
                kills=dict(self._kills),
            )

    def close(self) -> None:
        """Kill every child (idle, busy and pinned) and stop the pool's threads; idempotent.

        Busy children are killed with reason ``cancelled``: a call in flight fails with it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = [entry.child for entries in self._idle.values() for entry in entries]
            self._idle.clear()
            others = list(self._busy | self._pinned)
            self._pinned.clear()
        self._stop.set()
        for child in others:
            child.kill("cancelled", detail="the pool was closed")
        for child in idle:
            self._discard(child, "closed")
        for child in others:
            if child not in self._busy:
                self._discard(child, "closed")
        self._janitor.join()
        self._spawner.stop()

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- retirement --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SomaError("the child pool is closed")

    def _discard(self, child: Child, reason: str) -> None:
        with self._lock:
            self._kills[reason] += 1
        isolation_logger.debug("child %d retired: %s", child.pid, reason)
        child.shutdown()

    def _trim_idle(self) -> None:
        """Retire the oldest idle children beyond ``max_idle``."""
        with self._lock:
            entries = sorted(
                (entry for entries in self._idle.values() for entry in entries),
                key=lambda entry: entry.since,
            )
            excess = entries[: max(0, len(entries) - self.max_idle)]
            for entry in excess:
                self._idle[entry.child.spec.pool_key].remove(entry)
        for entry in excess:
            self._discard(entry.child, "max_idle")

    def _retire_idle(self) -> None:
        """Retire idle children that are dead, too old or too large."""
        now = time.monotonic()
        retired: list[tuple[Child, str]] = []
        with self._lock:
            for entries in self._idle.values():
                for entry in list(entries):
                    reason = None
                    if not entry.child.alive:
                        reason = "dead_idle"
                    elif now - entry.since > self.idle_ttl:
                        reason = "idle_ttl"
                    else:
                        rss = entry.child.rss()
                        if rss is not None and rss > self.max_idle_rss:
                            reason = "idle_rss"
                    if reason is not None:
                        entries.remove(entry)
                        retired.append((entry.child, reason))
        for child, reason in retired:
            self._discard(child, reason)

    def _janitor_loop(self) -> None:
        while not self._stop.wait(self._janitor_interval):
            try:
                self._retire_idle()
            except Exception:  # noqa: BLE001 - the janitor must outlive its own bugs
                isolation_logger.exception(
                    "child pool janitor failed; it keeps running"
                )


_default_pool: Pool | None = None
_default_lock = threading.Lock()


def default_pool() -> Pool:
    """The process-wide pool of the local runtime (``"subprocess"`` nodes).

    Created on first use with ``restricted=False`` (the local runtime receives user
    objects) and closed at interpreter exit; a closed default pool is replaced by a new
    one on the next call.
    """
    global _default_pool
    with _default_lock:
        if _default_pool is None or _default_pool.closed:
            if _default_pool is None:
                atexit.register(_close_default_pool)
            _default_pool = Pool(restricted=False)
        return _default_pool


def _close_default_pool() -> None:
    with _default_lock:
        pool = _default_pool
    if pool is not None:
        pool.close()
