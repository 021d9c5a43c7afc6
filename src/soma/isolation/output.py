"""Capture of a child's stdout and stderr: each line logged, kept in a tail and forwarded.

User code's prints, logging and C-level writes reach the parent on the child's
stdout and stderr pipes (isolation.md §2.5). One reader thread per stream splits
them into lines of at most 64 KiB, logs each on ``soma.worker.child`` tagged with
pid, plan and node, keeps the last 200 lines for crash and start errors, and hands
each to the current ``on_output`` hook. Separate from the call machinery because
it runs on its own threads and shares nothing with a call but the tags.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping
from typing import IO, Protocol

from soma.log import child_logger, isolation_logger

__all__ = ["TAIL_LINES", "OutputCapture", "OutputHook", "OutputSource"]

OutputHook = Callable[[str, str], None]
"""``on_output(stream, line)``: called for every line the child writes to stdout or stderr."""

TAIL_LINES = 200
"""Lines kept per stream for error reports."""

_LINE_LIMIT = 64 * 1024


class OutputSource(Protocol):
    """The tags of each line, read when the line arrives: the child's current user sets them."""

    plan_id: str | None
    node_id: str | None
    on_output: OutputHook | None


class OutputCapture:
    """Reader threads for the streams of child ``pid``; they end when the child closes its pipes."""

    def __init__(self, pid: int, pipes: Mapping[str, IO[bytes]], source: OutputSource) -> None:
        self._pid = pid
        self._source = source
        self._tails: dict[str, collections.deque[str]] = {
            name: collections.deque(maxlen=TAIL_LINES) for name in pipes
        }
        self._readers = [
            threading.Thread(
                target=self._pump,
                args=(name, pipe),
                name=f"soma-child-{pid}-{name}",
                daemon=True,
            )
            for name, pipe in pipes.items()
        ]
        for reader in self._readers:
            reader.start()

    def tail(self, stream: str, lines: int = TAIL_LINES) -> list[str]:
        """The last ``lines`` lines (at most ``TAIL_LINES`` kept) written to ``stream``."""
        return list(self._tails[stream])[-lines:]

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` s per stream for its reader to reach the end of the pipe."""
        for reader in self._readers:
            reader.join(timeout=timeout)

    def _pump(self, stream: str, pipe: IO[bytes]) -> None:
        tail = self._tails[stream]
        source = self._source
        with pipe:
            while line := pipe.readline(_LINE_LIMIT):
                text = line.decode("utf-8", "replace").removesuffix("\n")
                tail.append(text)
                child_logger.info(
                    "child %d plan=%s node=%s %s: %s",
                    self._pid,
                    source.plan_id,
                    source.node_id,
                    stream,
                    text,
                    extra={
                        "pid": self._pid,
                        "plan_id": source.plan_id,
                        "node_id": source.node_id,
                        "stream": stream,
                    },
                )
                hook = source.on_output
                if hook is not None:
                    try:
                        hook(stream, text)
                    except Exception:  # noqa: BLE001 - a failing hook must not stop the pump
                        isolation_logger.exception(
                            "on_output hook of child %d failed", self._pid
                        )
