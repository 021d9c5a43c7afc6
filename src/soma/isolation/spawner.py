"""``Spawner``: the long-lived thread every child process is started from.

The daemon asks the kernel (``PR_SET_PDEATHSIG``) to kill it when the *thread* that
forked it exits, so a child started from a short-lived thread would die with that
thread (isolation.md §2.4). This module owns that constraint; the pool keeps its
own spawner, and children started outside a pool use ``default_spawner``.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Spawner", "default_spawner"]

T = TypeVar("T")


class Spawner:
    """A long-lived thread that starts child processes.

    The daemon asks the kernel to SIGKILL it when the thread that forked it exits, so
    children must never be started from short-lived threads; every ``Popen`` goes through
    one of these instead. ``stop()`` ends the thread, which kills children it started
    that are still alive.
    """

    def __init__(self, name: str = "soma-spawner") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None
        ]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the spawner thread and return its result (or raise its exception)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=self._name, daemon=True
                )
                self._thread.start()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future.result()

    def stop(self) -> None:
        """End the thread after the jobs already queued."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - the waiting caller re-raises it
                future.set_exception(exc)


default_spawner = Spawner("soma-spawner-default")
"""The spawner of children started without one (``Child.spawn(spawner=None)``)."""
