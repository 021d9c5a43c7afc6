"""Execution slots and GPU leases: FIFO order, queue limits, timeouts, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from soma.errors import SomaConfigError
from soma.worker.slots import GpuLeases, ResourceBusy, Slots


async def test_permits_up_to_capacity_then_waiters_are_served_in_arrival_order() -> None:
    slots = Slots(2, max_queue=10, queue_timeout=5)
    first, second = await slots.acquire(), await slots.acquire()
    assert (slots.busy, slots.free, slots.queue_depth) == (2, 0, 0)
    order: list[int] = []

    async def wait(n: int) -> None:
        permit = await slots.acquire()
        order.append(n)
        await asyncio.sleep(0)
        permit.release()

    waiters = [asyncio.create_task(wait(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    assert slots.queue_depth == 3
    first.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]
    second.release()
    assert (slots.busy, slots.queue_depth) == (0, 0)


async def test_a_full_queue_is_refused_as_busy_and_retryable() -> None:
    slots = Slots(1, max_queue=1, queue_timeout=5)
    permit = await slots.acquire()
    queued = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceBusy) as caught:
        await slots.acquire()
    assert caught.value.code == "busy" and caught.value.retryable
    assert "--max-queue 1" in str(caught.value)
    permit.release()
    (await queued).release()


async def test_a_wait_longer_than_the_queue_timeout_is_busy_and_leaves_the_queue() -> None:
    slots = Slots(1, max_queue=5, queue_timeout=0.1)
    permit = await slots.acquire()
    with pytest.raises(ResourceBusy, match="--queue-timeout"):
        await slots.acquire()
    assert slots.queue_depth == 0
    permit.release()
    assert slots.free == 1


async def test_cancelling_a_waiter_dequeues_it_and_loses_no_permit() -> None:
    slots = Slots(1, max_queue=5, queue_timeout=5)
    permit = await slots.acquire()
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.queue_depth == 0
    permit.release()
    assert slots.free == 1
    # A permit granted in the same tick as the cancellation is passed on, not lost.
    permit = await slots.acquire()
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0.01)
    permit.release()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.free == 1


async def test_a_slot_is_taken_at_once_only_when_free_and_nobody_waits() -> None:
    slots = Slots(1, max_queue=5, queue_timeout=5)
    permit = slots.acquire_now()
    assert permit is not None and permit.held and slots.free == 0
    assert slots.acquire_now() is None and slots.queue_depth == 0  # nothing queued by asking
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0.01)
    permit.release()  # handed to the waiter, not left for whoever asks next
    assert slots.acquire_now() is None
    (await waiter).release()
    again = slots.acquire_now()
    assert again is not None
    again.release()
    assert slots.free == 1


async def test_release_is_idempotent() -> None:
    slots = Slots(1, max_queue=1, queue_timeout=1)
    permit = await slots.acquire()
    permit.release()
    permit.release()
    assert slots.free == 1 and not permit.held


async def test_gpu_leases_are_exclusive_and_a_larger_request_waits_its_turn() -> None:
    gpus = GpuLeases(["GPU-a", "GPU-b"], queue_timeout=5)
    one = await gpus.acquire(1)
    assert one.devices == ("GPU-a",)
    both = asyncio.create_task(gpus.acquire(2))
    await asyncio.sleep(0.01)
    assert not both.done()
    one.release()
    lease = await both
    assert set(lease.devices) == {"GPU-a", "GPU-b"} and gpus.free == 0
    lease.release()
    assert gpus.free == 2


async def test_gpu_requests_beyond_what_exists_are_refused_at_once() -> None:
    with pytest.raises(SomaConfigError, match="asked for 1 GPUs, only 0 exist"):
        await GpuLeases([], queue_timeout=1).acquire(1)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(SomaConfigError):
        Slots(0, max_queue=1, queue_timeout=1)
    with pytest.raises(SomaConfigError):
        GpuLeases(["x", "x"], queue_timeout=1)
