"""The worker's Prometheus metrics (worker spec §4.6), one registry per worker.

Counters and the plan histogram are updated where things happen (the connection counts
requests and bytes, the executor plan durations and cache lookups, the server auth
failures). Readings that already live elsewhere are taken at scrape time instead of being
mirrored: slots, queue and sessions from the executor's ``status()``, children and their
kills from ``Pool.stats()``, store size and deletions from the ``Store``, children's RSS
from the memory watch's view of the process tree. So a scrape always shows the truth,
whoever forgot to update a gauge.

prometheus_client and psutil are imported when the metrics are first used, not when the
worker is made: binding and answering ``/health`` need neither.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from soma.isolation.limits import read_rss

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily, Metric

__all__ = ["CHILD_STATES", "CONTENT_TYPE", "KILL_REASONS", "PREFIX", "WorkerMetrics", "kill_reason"]

PREFIX = "soma_worker_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format 0.0.4 (prometheus_client's ``CONTENT_TYPE_PLAIN_0_0_4``),
what ``/metrics`` answers."""

CHILD_STATES = ("idle", "busy", "pinned")
KILL_REASONS = ("timeout", "cancel", "memory", "crash", "retire")

# Pool kill reasons (isolation layer vocabulary) -> the five §4.6 labels.
_KILL_REASON_MAP = {
    "timeout": "timeout",
    "cancelled": "cancel",
    "memory_limit": "memory",
    "child_crashed": "crash",
    "child_protocol_error": "crash",
    "child_start_failed": "crash",
    "encoding_error": "crash",
    "reset_failed": "crash",
    "dead_idle": "crash",
}

PLAN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def kill_reason(pool_reason: str) -> str:
    """The §4.6 ``reason`` label of a pool kill reason; every retirement counts as ``retire``."""
    return _KILL_REASON_MAP.get(pool_reason, "retire")


StatusSource = Callable[[], Mapping[str, Any]]

class WorkerMetrics:
    """Every ``soma_worker_*`` metric of one worker, in its own ``CollectorRegistry``.

    Update the counters directly (``metrics.requests.labels(type=..., outcome=...).inc()``);
    attach the live sources with ``attach`` so gauges read them at scrape time; ``render``
    produces the ``/metrics`` body. The registry and counters are made on first use (or by
    ``prepare``), so that making a worker does not import prometheus_client.
    """

    registry: CollectorRegistry
    requests: Counter
    plan_seconds: Histogram
    bytes_received: Counter
    bytes_sent: Counter
    env_builds: Counter
    cache_hits: Counter
    cache_misses: Counter
    auth_failures: Counter

    def __init__(self, *, slots_total: int, memory_limit_bytes: int | None = None) -> None:
        self.slots_total = slots_total
        self.memory_limit_bytes = memory_limit_bytes
        self._status: StatusSource | None = None
        self._pool: Any = None
        self._store: Any = None
        self._preparing = threading.Lock()

    if not TYPE_CHECKING:  # hidden from type checkers, which would let any attribute name pass

        def __getattr__(self, name: str) -> Any:
            # Only reached before ``prepare``, which sets every instrument as a plain attribute.
            if name in _INSTRUMENTS:
                self.prepare()
                return self.__dict__[name]
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def prepare(self) -> None:
        """Make the registry and every counter now (idempotent, thread-safe).

        The worker calls it on a thread once it serves, so that no request pays for the import.
        """
        with self._preparing:
            if "registry" in self.__dict__:
                return
            self.__dict__.update(_instruments(self))

    def attach(self, *, status: StatusSource | None = None, pool: Any = None, store: Any = None) -> None:
        """Give the scrape-time sources: the executor's ``status`` callable, the ``Pool`` and the ``Store``.

        Any of them may be left out (a worker still starting); its gauges then read 0.
        """
        if status is not None:
            self._status = status
        if pool is not None:
            self._pool = pool
        if store is not None:
            self._store = store

    def count_request(self, message_type: str, outcome: str) -> None:
        """One answered request: ``outcome`` is ``ok`` or the error code of its terminal reply."""
        self.requests.labels(type=message_type, outcome=outcome).inc()

    def render(self) -> bytes:
        """The ``/metrics`` body (text format 0.0.4). Reads the store and process tree: call it in a thread."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    # -- scrape-time readings ------------------------------------------------------------------

    def _status_reading(self) -> Mapping[str, Any]:
        return self._status() if self._status is not None else {}

    def _children(self) -> tuple[dict[str, int], dict[str, int]]:
        states = dict.fromkeys(CHILD_STATES, 0)
        kills = dict.fromkeys(KILL_REASONS, 0)
        if self._pool is not None:
            stats = self._pool.stats()
            states = {"idle": stats.idle, "busy": stats.busy, "pinned": stats.pinned}
            for reason, count in stats.kills.items():
                kills[kill_reason(reason)] += count
        return states, kills

    def _store_reading(self) -> tuple[int, int]:
        if self._store is None:
            return 0, 0
        try:
            used = self._store.bytes_used()
        except OSError:  # the store directory vanished under us: report it empty
            used = 0
        return used, self._store.deleted_total


# The attributes ``WorkerMetrics.prepare`` sets, all at once: those the class declares (see ``_instruments``).
_INSTRUMENTS = frozenset(WorkerMetrics.__annotations__)


def _instruments(metrics: WorkerMetrics) -> dict[str, Any]:
    """The registry of ``metrics`` with every counter and the scrape-time collector, by attribute name."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry(auto_describe=True)
    instruments: dict[str, Any] = {
        "registry": registry,
        "requests": Counter(
            f"{PREFIX}requests", "Requests answered, by message type and outcome", ["type", "outcome"],
            registry=registry,
        ),
        "plan_seconds": Histogram(
            f"{PREFIX}plan_seconds", "Plan duration from slot to reply", buckets=PLAN_BUCKETS, registry=registry
        ),
        "bytes_received": Counter(
            f"{PREFIX}bytes_received", "Bytes received in WebSocket frames and uploads", registry=registry
        ),
        "bytes_sent": Counter(
            f"{PREFIX}bytes_sent", "Bytes sent in WebSocket frames and downloads", registry=registry
        ),
        "env_builds": Counter(
            f"{PREFIX}env_builds", "Environment builds by outcome", ["outcome"], registry=registry
        ),
        "cache_hits": Counter(f"{PREFIX}cache_hits", "Worker cache hits", registry=registry),
        "cache_misses": Counter(f"{PREFIX}cache_misses", "Worker cache misses", registry=registry),
        "auth_failures": Counter(
            f"{PREFIX}auth_failures", "Requests refused for a missing or wrong token", registry=registry
        ),
    }
    for outcome in ("success", "failed"):
        instruments["env_builds"].labels(outcome=outcome)
    registry.register(_LiveCollector(metrics))
    return instruments


def _children_rss() -> int:
    """RSS of every descendant of this process (children, their process groups, builds)."""
    import psutil

    total = 0
    try:
        descendants = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return 0
    for process in descendants:
        total += read_rss(process.pid) or 0
    return total


class _LiveCollector:
    """Gauges and counters read from their owners at scrape time."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        # Describing by collecting would touch the pool and store at registration time.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        metrics = self._metrics
        status = metrics._status_reading()
        free = int(status.get("free_slots", metrics.slots_total))
        yield _gauge("slots_total", "Execution slots (--max-concurrent)", metrics.slots_total)
        yield _gauge("slots_busy", "Slots held by plans, jobs, streams and sessions", metrics.slots_total - free)
        yield _gauge("queue_depth", "Requests waiting for a slot", int(status.get("queue_depth", 0)))
        yield _gauge("sessions", "Open sessions", int(status.get("sessions", 0)))
        states, kills = metrics._children()
        children = GaugeMetricFamily(f"{PREFIX}children", "Children by state", labels=["state"])
        for state, count in states.items():
            children.add_metric([state], count)
        yield children
        killed = CounterMetricFamily(f"{PREFIX}child_kills", "Children ended, by reason", labels=["reason"])
        for reason, count in kills.items():
            killed.add_metric([reason], count)
        yield killed
        used, deleted = metrics._store_reading()
        yield _gauge("store_bytes", "Bytes held in the upload/output store", used)
        yield CounterMetricFamily(f"{PREFIX}store_deleted", "Store files deleted by the sweeper", value=deleted)
        yield _gauge("memory_limit_bytes", "Memory-watch limit over all children", metrics.memory_limit_bytes or 0)
        yield _gauge("children_rss_bytes", "Resident memory of the worker's descendants", _children_rss())


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(f"{PREFIX}{name}", documentation, value=value)
