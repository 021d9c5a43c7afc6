"""Resource limits for children: thread variables, CPU affinity, RSS readings and the memory watch.

These are mechanisms only; the worker wires them to its flags (worker.md §3.3) and the
local runtime picks its own values. The memory watch is one thread polling the RSS of
the children registered with it and killing the offender with reason ``memory_limit``
(isolation.md §8).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from soma.errors import SomaConfigError
from soma.log import isolation_logger

__all__ = [
    "THREAD_VARIABLES",
    "MemoryWatch",
    "Watched",
    "affinity_for",
    "apply_affinity",
    "format_bytes",
    "read_rss",
    "thread_env",
]

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
"""The variables numerical libraries read to size their thread pools."""


def thread_env(
    cpu_cores: int, max_concurrent: int, operator_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Thread variables for a child: ``max(1, cpu_cores // max_concurrent)`` each.

    A variable the operator set in ``operator_env`` (default: this process's environment)
    keeps the operator's value, so a deliberate setting is never overridden.
    Raises ``SomaConfigError`` for a non-positive count.
    """
    if cpu_cores < 1 or max_concurrent < 1:
        raise SomaConfigError(
            f"cpu_cores and max_concurrent must be >= 1, got {cpu_cores} and {max_concurrent}"
        )
    operator_env = os.environ if operator_env is None else operator_env
    threads = str(max(1, cpu_cores // max_concurrent))
    return {name: operator_env.get(name, threads) for name in THREAD_VARIABLES}


def _own_cpus() -> frozenset[int]:
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def affinity_for(n: int, own: Iterable[int] | None = None) -> frozenset[int] | None:
    """The first ``n`` CPUs of ``own`` (default: this process's affinity set).

    Returns ``None`` when ``n`` covers every CPU of ``own``: no restriction is needed.
    Raises ``SomaConfigError`` when ``n < 1``.
    """
    if n < 1:
        raise SomaConfigError(f"the CPU count must be >= 1, got {n}")
    cpus = sorted(_own_cpus() if own is None else set(own))
    if n >= len(cpus):
        return None
    return frozenset(cpus[:n])


def apply_affinity(pid: int, cpus: Iterable[int] | None) -> bool:
    """Restrict ``pid`` to ``cpus`` (Linux); returns whether the restriction was applied.

    A process that already exited, or a platform without ``sched_setaffinity``, is not an
    error: the child either is gone or runs unrestricted, which the caller may log.
    """
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(pid, set(cpus))
    except ProcessLookupError:
        return False
    return True


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_rss(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes, or ``None`` when it cannot be read.

    Reads ``/proc/<pid>/statm`` (cheap enough for a 1 s poll of many children) and falls
    back to psutil where procfs is missing (macOS).
    """
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return None


def format_bytes(n: int) -> str:
    """``n`` bytes as a short human figure (``"1.5 GiB"``) for error messages."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class Watched(Protocol):
    """What the memory watch needs from a child: its pid and a way to kill it with a reason."""

    @property
    def pid(self) -> int: ...

    def kill(
        self, reason: str, *, detail: str = "", rss: int | None = None
    ) -> None: ...


@dataclass
class _Entry:
    target: Watched
    limit: int | None


class MemoryWatch:
    """A thread that kills children whose memory use crosses a limit.

    Every ``interval`` seconds it reads the RSS of each registered child. A child above
    its own limit (given to ``register``, else ``child_limit``) is killed; then, if the
    total is above ``total_limit``, the largest child is killed. Each kill uses reason
    ``memory_limit`` and a detail stating the limit and the RSS, which the child's
    failing call reports. Where RSS cannot be read at all the watch logs one WARNING and
    stays off.
    """

    def __init__(
        self,
        *,
        total_limit: int | None = None,
        child_limit: int | None = None,
        interval: float = 1.0,
    ) -> None:
        if interval <= 0:
            raise SomaConfigError(f"interval must be > 0, got {interval}")
        for name, value in (("total_limit", total_limit), ("child_limit", child_limit)):
            if value is not None and value < 1:
                raise SomaConfigError(
                    f"{name} must be a positive number of bytes, got {value}"
                )
        self.total_limit = total_limit
        self.child_limit = child_limit
        self.interval = interval
        self.kills = 0
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start polling; returns ``False`` (after one WARNING) where RSS is unreadable."""
        if self._thread is not None:
            return True
        if read_rss(os.getpid()) is None:
            isolation_logger.warning(
                "memory watch disabled: neither /proc/<pid>/statm nor psutil can read RSS here"
            )
            return False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="soma-memory-watch", daemon=True
        )
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop polling and wait for the thread to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def register(self, target: Watched, limit: int | None = None) -> None:
        """Watch ``target``; ``limit`` (bytes) tightens ``child_limit`` for this child."""
        if limit is not None and limit < 1:
            raise SomaConfigError(
                f"memory limit must be a positive number of bytes, got {limit}"
            )
        with self._lock:
            self._entries[id(target)] = _Entry(target, limit)

    def unregister(self, target: Watched) -> None:
        """Stop watching ``target``; unknown targets are ignored."""
        with self._lock:
            self._entries.pop(id(target), None)

    def _limit_of(self, entry: _Entry) -> int | None:
        limits = [v for v in (entry.limit, self.child_limit) if v is not None]
        return min(limits) if limits else None

    def check(self) -> None:
        """One poll: read every RSS and kill what is over a limit (the thread calls this)."""
        with self._lock:
            entries = list(self._entries.values())
        readings: list[tuple[int, _Entry]] = []
        for entry in entries:
            rss = read_rss(entry.target.pid)
            if rss is None:
                continue
            limit = self._limit_of(entry)
            if limit is not None and rss > limit:
                self._kill(
                    entry,
                    rss,
                    f"RSS {format_bytes(rss)} above the child memory limit {format_bytes(limit)}",
                )
            else:
                readings.append((rss, entry))
        total = sum(rss for rss, _ in readings)
        if self.total_limit is not None and readings and total > self.total_limit:
            rss, entry = max(readings, key=lambda reading: reading[0])
            self._kill(
                entry,
                rss,
                f"children use {format_bytes(total)} in total, above the limit "
                f"{format_bytes(self.total_limit)}; this child was the largest at {format_bytes(rss)}",
            )

    def _kill(self, entry: _Entry, rss: int, detail: str) -> None:
        isolation_logger.warning("killing child %d: %s", entry.target.pid, detail)
        self.kills += 1
        self.unregister(entry.target)
        entry.target.kill("memory_limit", detail=detail, rss=rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()
