"""Event subscriptions and in-order synchronous delivery (api.md §8).

Events are plain dicts with ``event_type`` and ``ts``. An ``EventHub`` belongs to one
graph (or study): ``emit`` delivers on the calling thread, under the hub's delivery
lock, to every subscription in subscription order, so a run's events reach every
subscriber in the same order and before the run returns. A raising callback is
logged on ``soma.events`` with its traceback and reported once per subscription as a
``SomaWarning``; delivery to the others continues.

Emitters check ``hub.active`` before building an event, so an unobserved run pays
nothing for events.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self

from soma.errors import SomaConfigError, SomaWarning
from soma.log import events_logger

__all__ = [
    "EventCallback",
    "EventHub",
    "Subscription",
    "batch_progress",
    "node_cache_hit",
    "node_completed",
    "node_failed",
    "node_started",
    "run_completed",
    "run_failed",
    "run_started",
]

Event = dict[str, Any]
EventCallback = Callable[[Event], object]


class Subscription:
    """A registered callback; ``cancel()`` stops delivery (idempotent). Also a context manager."""

    __slots__ = ("__weakref__", "_callback", "_event_types", "_hub", "_warned")

    def __init__(
        self, hub: EventHub, callback: EventCallback, event_types: frozenset[str] | None
    ) -> None:
        self._hub: EventHub | None = hub
        self._callback = callback
        self._event_types = event_types
        self._warned = False

    @property
    def active(self) -> bool:
        """Whether the subscription still receives events."""
        return self._hub is not None

    def cancel(self) -> None:
        """Stop delivery to this callback; calling it again does nothing."""
        hub, self._hub = self._hub, None
        if hub is not None:
            hub._remove(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

    def __repr__(self) -> str:
        name = getattr(self._callback, "__qualname__", repr(self._callback))
        return f"Subscription({name}, active={self.active})"

    def _deliver(self, event: Event) -> None:
        if self._event_types is not None and event["event_type"] not in self._event_types:
            return
        try:
            self._callback(event)
        except Exception as exc:  # noqa: BLE001 - a failing callback must never stop the run
            events_logger.exception(
                "event callback %r raised on %s", self._callback, event["event_type"]
            )
            if not self._warned:
                self._warned = True
                warnings.warn(
                    SomaWarning(
                        f"event callback {getattr(self._callback, '__qualname__', self._callback)!s} raised "
                        f"{type(exc).__name__}: {exc}; the run continues and further errors of this "
                        "subscription are only logged on 'soma.events'"
                    ),
                    stacklevel=2,
                )


class EventHub:
    """The subscriptions of one graph and their delivery lock."""

    __slots__ = ("_deliver_lock", "_subs", "_subs_lock")

    def __init__(self) -> None:
        # Copy-on-write tuple: emit iterates a snapshot without taking the subscription lock.
        self._subs: tuple[Subscription, ...] = ()
        self._subs_lock = threading.Lock()
        self._deliver_lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether anyone is subscribed (emitters skip building events otherwise)."""
        return bool(self._subs)

    def subscribe(
        self, callback: EventCallback, event_types: Iterable[str] | None = None
    ) -> Subscription:
        """Register ``callback`` for events emitted from now on, optionally only of ``event_types``."""
        if not callable(callback):
            raise TypeError(f"on_event() expects a callable, got {type(callback).__name__}")
        if isinstance(event_types, str):
            raise SomaConfigError("event_types must be a list of event type names, not a string")
        types = frozenset(event_types) if event_types is not None else None
        sub = Subscription(self, callback, types)
        with self._subs_lock:
            self._subs = (*self._subs, sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._subs_lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to every subscription, in order, on this thread."""
        subs = self._subs
        if not subs:
            return
        with self._deliver_lock:
            for sub in subs:
                if sub.active:
                    sub._deliver(event)


# ---------------------------------------------------------------------------- constructors


def _event(event_type: str, run_id: str, phase: str, **fields: Any) -> Event:
    return {"event_type": event_type, "ts": time.time(), "run_id": run_id, "phase": phase, **fields}


def run_started(
    run_id: str, phase: str, plan_summary: dict[str, int], seed: int | None, n_nodes: int
) -> Event:
    return _event(
        "RunStarted", run_id, phase, plan_summary=plan_summary, seed=seed, n_nodes=n_nodes
    )


def node_started(run_id: str, phase: str, node_id: str, kind: str, target: str) -> Event:
    return _event("NodeStarted", run_id, phase, node_id=node_id, kind=kind, target=target)


def node_cache_hit(
    run_id: str, phase: str, node_id: str, key: str, tier: str, what: str, load_time_ms: int
) -> Event:
    return _event(
        "NodeCacheHit",
        run_id,
        phase,
        node_id=node_id,
        key=key,
        tier=tier,
        what=what,
        load_time=load_time_ms,
    )


def batch_progress(
    run_id: str,
    phase: str,
    node_id: str | None,
    batch: int,
    n_batches: int,
    rows: int,
    total_rows: int,
) -> Event:
    return _event(
        "BatchProgress",
        run_id,
        phase,
        node_id=node_id,
        batch=batch,
        n_batches=n_batches,
        rows=rows,
        total_rows=total_rows,
    )


def node_completed(
    run_id: str, phase: str, node_id: str, duration_s: float, cache_hit: bool, output_summary: str
) -> Event:
    return _event(
        "NodeCompleted",
        run_id,
        phase,
        node_id=node_id,
        duration=int(duration_s * 1000),
        duration_s=duration_s,
        cache_hit=cache_hit,
        output_summary=output_summary,
    )


def node_failed(
    run_id: str, phase: str, node_id: str, error: str, error_type: str, duration_s: float
) -> Event:
    return _event(
        "NodeFailed",
        run_id,
        phase,
        node_id=node_id,
        error=error,
        error_type=error_type,
        duration=int(duration_s * 1000),
        duration_s=duration_s,
    )


def run_completed(
    run_id: str, phase: str, duration_s: float, nodes_executed: int, cache_hits: int
) -> Event:
    return _event(
        "RunCompleted",
        run_id,
        phase,
        duration=int(duration_s * 1000),
        duration_s=duration_s,
        nodes_executed=nodes_executed,
        cache_hits=cache_hits,
    )


def run_failed(run_id: str, phase: str, error: str, node_id: str | None) -> Event:
    return _event("RunFailed", run_id, phase, error=error, node_id=node_id)
