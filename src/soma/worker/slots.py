"""Execution slots and GPU leases: first-come, first-served permits with a bounded, timed queue.

    acquire() ──free──▶ Permit ── release() ──▶ handed to the oldest waiter, else freed
        │ none free
        ▼
    queue (FIFO) ── more than max_queue waiters, or waiting longer than queue_timeout ──▶ ResourceBusy
        │ the awaiting task is cancelled
        ▼
    dequeued (a permit granted at that very moment is passed on, never lost)

``Slots`` counts the worker's ``--max-concurrent`` permits (worker spec §3.3); ``GpuLeases``
hands out specific GPUs exclusively to plans asking for ``resources.gpus``. Both run on the
event loop only (no locks): waiting never blocks the loop, and a cancelled wait leaves no trace.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from soma.errors import SomaConfigError, SomaError

__all__ = ["GpuLease", "GpuLeases", "Permit", "ResourceBusy", "Slots"]


class ResourceBusy(SomaError):
    """Raised when no permit can be had: the queue is full or the wait ran past its limit.

    The wire code is ``busy`` (retryable): the client may try another worker or later.
    """

    code = "busy"
    retryable = True


@dataclass
class _Waiter:
    count: int
    future: asyncio.Future[tuple[str, ...]]


@dataclass
class _FifoPool:
    """Named items handed out in FIFO order of requests; the head of the queue is served first."""

    items: list[str]
    max_queue: int | None
    queue_timeout: float
    what: str
    free: list[str] = field(init=False)
    waiters: collections.deque[_Waiter] = field(init=False, default_factory=collections.deque)

    def __post_init__(self) -> None:
        self.free = list(self.items)

    async def take(self, count: int) -> tuple[str, ...]:
        if count > len(self.items):
            raise SomaConfigError(f"asked for {count} {self.what}, only {len(self.items)} exist")
        taken = self.take_now(count)
        if taken is not None:
            return taken
        if self.max_queue is not None and len(self.waiters) >= self.max_queue:
            raise ResourceBusy(
                f"all {len(self.items)} {self.what} are busy and {len(self.waiters)} requests already wait "
                f"(--max-queue {self.max_queue}); retry later or on another worker"
            )
        waiter = _Waiter(count, asyncio.get_running_loop().create_future())
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(None if math.isinf(self.queue_timeout) else self.queue_timeout):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            if self._granted(waiter):
                return waiter.future.result()
            self._forget(waiter)
            raise ResourceBusy(
                f"waited {self.queue_timeout:g} s for {count} of {len(self.items)} {self.what} "
                "(--queue-timeout); retry later or on another worker"
            ) from None
        except asyncio.CancelledError:
            if self._granted(waiter):
                self.give(waiter.future.result())
            else:
                self._forget(waiter)
            raise

    def take_now(self, count: int) -> tuple[str, ...] | None:
        """``count`` items if they are free and nobody waits before us, else ``None`` (nothing queued)."""
        if not self.waiters and len(self.free) >= count:
            return self._grab(count)
        return None

    def give(self, items: Sequence[str]) -> None:
        self.free.extend(items)
        self._serve()

    def _grab(self, count: int) -> tuple[str, ...]:
        taken = tuple(self.free[:count])
        del self.free[:count]
        return taken

    def _serve(self) -> None:
        while self.waiters and len(self.free) >= self.waiters[0].count:
            waiter = self.waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(self._grab(waiter.count))

    @staticmethod
    def _granted(waiter: _Waiter) -> bool:
        return waiter.future.done() and not waiter.future.cancelled()

    def _forget(self, waiter: _Waiter) -> None:
        waiter.future.cancel()
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass
        # A large request leaving the head may unblock smaller ones behind it.
        self._serve()


class Permit:
    """One held slot; ``release`` (idempotent) gives it back to the next waiter."""

    def __init__(self, pool: _FifoPool, items: tuple[str, ...]) -> None:
        self._pool = pool
        self._items = items
        self._held = True

    @property
    def held(self) -> bool:
        """Whether the permit is still held."""
        return self._held

    def release(self) -> None:
        """Give the permit back (once; later calls do nothing)."""
        if self._held:
            self._held = False
            self._pool.give(self._items)


class Slots:
    """The worker's execution slots (``--max-concurrent``), FIFO with ``--max-queue`` and ``--queue-timeout``.

    ``await acquire()`` returns a ``Permit`` or raises ``ResourceBusy``; cancelling the awaiting
    task dequeues it. Use on one event loop only.
    """

    def __init__(self, capacity: int, *, max_queue: int, queue_timeout: float) -> None:
        if capacity < 1 or max_queue < 0 or not queue_timeout > 0:
            raise SomaConfigError(
                f"slots need capacity >= 1, max_queue >= 0 and queue_timeout > 0, got {capacity}, "
                f"{max_queue} and {queue_timeout}"
            )
        self._pool = _FifoPool([str(i) for i in range(capacity)], max_queue, queue_timeout, "execution slots")

    @property
    def capacity(self) -> int:
        """Total number of slots."""
        return len(self._pool.items)

    @property
    def free(self) -> int:
        """Slots not held right now."""
        return len(self._pool.free)

    @property
    def busy(self) -> int:
        """Slots held right now."""
        return self.capacity - self.free

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._pool.waiters)

    async def acquire(self) -> Permit:
        """Wait (FIFO) for a slot. Raises ``ResourceBusy`` when the queue is full or the wait too long."""
        return Permit(self._pool, await self._pool.take(1))

    def acquire_now(self) -> Permit | None:
        """A slot if one is free and nobody is queued for one, else ``None``: no waiting, nothing queued."""
        taken = self._pool.take_now(1)
        return None if taken is None else Permit(self._pool, taken)


@dataclass(frozen=True)
class GpuLease:
    """GPUs held exclusively by one plan: ``devices`` are the ``CUDA_VISIBLE_DEVICES`` entries."""

    devices: tuple[str, ...]
    permit: Permit

    def release(self) -> None:
        """Give the GPUs back (idempotent)."""
        self.permit.release()


class GpuLeases:
    """The allowed GPUs, leased exclusively to plans that ask for ``resources.gpus`` (worker spec §3.3).

    ``devices`` are UUIDs (or indices where unknown). Requests wait FIFO like slots, bounded by
    ``queue_timeout``; a request for more GPUs than exist is refused before it waits.
    """

    def __init__(self, devices: Sequence[str], *, queue_timeout: float) -> None:
        if len(set(devices)) != len(devices):
            raise SomaConfigError(f"GPU device ids must be unique, got {list(devices)}")
        self._pool = _FifoPool(list(devices), None, queue_timeout, "GPUs")

    @property
    def devices(self) -> tuple[str, ...]:
        """Every allowed GPU, in order."""
        return tuple(self._pool.items)

    @property
    def free(self) -> int:
        """GPUs not leased right now."""
        return len(self._pool.free)

    async def acquire(self, count: int) -> GpuLease:
        """Wait (FIFO) for ``count`` GPUs.

        Raises ``SomaConfigError`` if more than exist, ``ResourceBusy`` after the queue timeout.
        """
        if count < 1:
            raise SomaConfigError(f"a GPU lease needs at least one GPU, got {count}")
        taken = await self._pool.take(count)
        # Devices come back from other leases in release order; hand them out in the
        # worker's own order so CUDA_VISIBLE_DEVICES does not depend on timing.
        rank = {device: i for i, device in enumerate(self._pool.items)}
        devices = tuple(sorted(taken, key=rank.__getitem__))
        return GpuLease(devices, Permit(self._pool, taken))
