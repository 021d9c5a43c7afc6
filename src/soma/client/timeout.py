"""The client's time limits: one :class:`Timeout` with a named limit per phase of a call.

Kept apart from the clients so the async core, the synchronous facade and the transports
share one definition, and :data:`DEFAULT` ("use the client's configured limit") stays
distinct from ``None`` ("no limit") everywhere a call takes a deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT", "Timeout"]


class _Default:
    """The "use the configured default" sentinel, distinct from ``None`` (which means no limit)."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


@dataclass(frozen=True)
class Timeout:
    """The client's time limits in seconds, one per phase (worker.md §8); ``None`` means no limit.

    - ``connect``: TCP connection and WebSocket upgrade (or an HTTP connection).
    - ``welcome``: from ``Hello`` to ``Welcome``.
    - ``silence``: while a request is in flight, this long without any frame from the
      worker (heartbeats count) means the worker is lost (``RemoteError``, ``worker_lost``).
    - ``grace``: the overall deadline of a plan is its ``timeout_s`` plus this.
    - ``request``: the overall deadline of a request that names no time limit.

    >>> Timeout(silence=2.0).plan_deadline(30)
    90.0
    """

    connect: float | None = 10.0
    welcome: float | None = 10.0
    silence: float = 15.0
    grace: float = 60.0
    request: float | None = None

    def plan_deadline(self, timeout_s: float | None) -> float | None:
        """The overall deadline of a plan whose ``timeout_s`` is given (``request`` when none)."""
        return self.request if timeout_s is None else timeout_s + self.grace
