"""The life of a client's connection to one worker, as an explicit state enum.

The async core moves between these states; the synchronous facade and the shared-client
registry only read them (a closed client is replaced, never reused).
"""

from __future__ import annotations

import enum

__all__ = ["ClientState"]


class ClientState(enum.Enum):
    """Where a client's connection is in its life."""

    IDLE = "idle"  # never connected: the first request connects
    CONNECTING = "connecting"  # upgrade and Hello in progress
    OPEN = "open"  # Welcome received; requests are multiplexed on the connection
    LOST = "lost"  # the connection dropped or went silent; the next request reconnects
    CLOSED = "closed"  # close() was called; every request raises
