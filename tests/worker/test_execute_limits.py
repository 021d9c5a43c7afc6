"""Slots, cancellation, time limits, resources and child failures, as the executor enforces them."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from pathlib import Path

import _execute_filters as F
import psutil
import pytest
from _execute_support import CAPS, RecordingConnection, chain, failure, filt, fit_mode, plan, rig, success

from soma.isolation.limits import MemoryWatch
from soma.wire.messages import Error
from soma.worker.detect import GpuDevice
from soma.worker.execute import PlanExecutor


def _sleep(seconds: float, **fields: object) -> object:
    return plan(chain("s"), [filt("s", F.Sleeper(seconds))], input=[1], **fields)


async def _pid(r: object) -> int:
    return success(await r.run(plan(chain("p"), [filt("p", F.Pid())], input=None))).output  # type: ignore[attr-defined]


async def test_max_concurrent_plans_run_together_and_the_rest_queue(tmp_path: Path) -> None:
    async with rig(tmp_path, max_concurrent=2) as r:
        await asyncio.to_thread(r.pool.prewarm, r.executor.child_spec(), 2)
        started = time.monotonic()
        pair = await asyncio.gather(r.run(_sleep(1.0)), r.run(_sleep(1.0)))
        assert time.monotonic() - started < 1.6
        for reply in pair:
            success(reply)
        started = time.monotonic()
        three = asyncio.gather(*(r.run(_sleep(1.0)) for _ in range(3)))
        await asyncio.sleep(0.5)
        status = r.executor.status()
        assert status["queue_depth"] == 1 and status["free_slots"] == 0 and len(status["running"]) == 2
        for reply in await three:
            success(reply)
        assert time.monotonic() - started >= 2.0
        assert r.executor.status()["free_slots"] == 2


async def test_a_full_queue_or_a_long_wait_is_busy_and_retryable(tmp_path: Path) -> None:
    async with rig(tmp_path, max_concurrent=1, max_queue=0) as r:
        running = asyncio.create_task(r.run(_sleep(1.0)))
        await asyncio.sleep(0.3)
        reply = await r.run(_sleep(0.0))
        assert isinstance(reply, Error) and reply.code == "busy" and reply.retryable
        success(await running)
    async with rig(tmp_path / "second", max_concurrent=1, queue_timeout=0.3) as r:
        running = asyncio.create_task(r.run(_sleep(1.5)))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        reply = await r.run(_sleep(0.0))
        assert isinstance(reply, Error) and reply.code == "busy" and "--queue-timeout" in reply.message
        assert time.monotonic() - started < 1.0
        success(await running)


async def test_cancelling_a_running_plan_kills_its_child_and_answers_within_a_second(tmp_path: Path) -> None:
    conn = RecordingConnection()
    async with rig(tmp_path) as r:
        pid = await _pid(r)
        msg = _sleep(60.0)
        running = asyncio.create_task(r.run(msg, conn))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        assert await r.executor.cancel(msg.plan.plan_id, conn)
        reply = await running
        assert time.monotonic() - started < 1.0
        error = failure(reply).error
        assert error.code == "cancelled" and error.kind == "Resource" and "cancelled" in error.message
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert not await r.executor.cancel(msg.plan.plan_id, conn)  # finished ids are unknown
        assert not await r.executor.cancel("never-sent", conn)
        assert success(await r.run(plan(chain("e"), [filt("e", F.Echo())], input=[3]))).output == [3]


async def test_cancelling_a_queued_plan_dequeues_it(tmp_path: Path) -> None:
    conn = RecordingConnection()
    async with rig(tmp_path, max_concurrent=1) as r:
        running = asyncio.create_task(r.run(_sleep(1.0), conn))
        await asyncio.sleep(0.3)
        queued_msg = _sleep(0.0)
        queued = asyncio.create_task(r.run(queued_msg, conn))
        await asyncio.sleep(0.1)
        assert r.executor.status()["queue_depth"] == 1
        started = time.monotonic()
        assert await r.executor.cancel(queued_msg.plan.plan_id, conn)
        assert failure(await queued).error.code == "cancelled"
        assert time.monotonic() - started < 1.0
        assert r.executor.status()["queue_depth"] == 0
        success(await running)


async def test_another_connection_cannot_cancel_a_plan(tmp_path: Path) -> None:
    owner, stranger = RecordingConnection(), RecordingConnection()
    async with rig(tmp_path) as r:
        msg = _sleep(0.5)
        running = asyncio.create_task(r.run(msg, owner))
        await asyncio.sleep(0.2)
        assert not await r.executor.cancel(msg.plan.plan_id, stranger)
        success(await running)


async def test_a_plan_over_its_time_limit_fails_with_timeout_naming_the_node(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        msg = plan(chain("spin"), [filt("spin", F.Spinner(), trainable=True)], input=[1], mode=fit_mode(), timeout_s=2)
        started = time.monotonic()
        error = failure(await r.run(msg)).error
        assert time.monotonic() - started < 4.0
        assert error.code == "timeout" and error.node_id == "spin" and "`spin`" in error.message
        assert success(await r.run(plan(chain("e"), [filt("e", F.Echo())], input=[1]))).output == [1]
    async with rig(tmp_path / "worker-limit", timeout=1.0) as r:
        error = failure(await r.run(_sleep(30.0, timeout_s=60))).error
        assert error.code == "timeout" and "1 s" in error.message


async def test_closing_a_connection_cancels_its_plans(tmp_path: Path) -> None:
    conn = RecordingConnection()
    async with rig(tmp_path) as r:
        running = asyncio.create_task(r.run(_sleep(60.0), conn))
        await asyncio.sleep(0.5)
        await r.executor.connection_closed(conn)
        assert failure(await asyncio.wait_for(running, 2.0)).error.code == "cancelled"


async def test_a_child_that_dies_fails_the_plan_and_the_next_plan_gets_a_new_child(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        first = await _pid(r)
        started = time.monotonic()
        error = failure(await r.run(plan(chain("c"), [filt("c", F.Crash())], input=None))).error
        assert time.monotonic() - started < 1.5
        assert error.code == "child_crashed" and error.kind == "Python" and "SIGKILL" in error.message
        assert await _pid(r) != first


async def test_a_missing_interpreter_is_child_start_failed_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    async with rig(tmp_path, python="/nonexistent/bin/python3") as r:
        error = failure(await r.run(plan(chain("e"), [filt("e", F.Echo())], input=[1]))).error
        assert error.code == "child_start_failed" and "/nonexistent/bin/python3" in error.message
        healthy = PlanExecutor(
            dataclasses.replace(r.config, python=sys.executable),
            pool=r.pool,
            store=r.store,
            capabilities=CAPS,
        )
        try:
            reply = await healthy.run_plan(plan(chain("e"), [filt("e", F.Echo())], input=[2]), RecordingConnection())
            assert success(reply).output == [2]
        finally:
            await healthy.close()


@pytest.mark.parametrize("how", ["plan resources", "--child-memory"])
async def test_a_child_over_its_memory_limit_is_killed_with_memory_limit(tmp_path: Path, how: str) -> None:
    watch = MemoryWatch(interval=0.1)
    watch.start()
    try:
        options = {"child_memory": 80 << 20} if how == "--child-memory" else {}
        async with rig(tmp_path, memory_watch=watch, **options) as r:
            resources = {"memory": "80M"} if how == "plan resources" else None
            msg = plan(chain("hog"), [filt("hog", F.Hog(200))], input=None, resources=resources)
            error = failure(await r.run(msg)).error
            assert error.code == "memory_limit" and "limit" in error.message
            assert success(await r.run(plan(chain("e"), [filt("e", F.Echo())], input=[1]))).output == [1]
    finally:
        watch.stop()


async def test_a_child_is_replaced_after_child_max_tasks_plans(tmp_path: Path) -> None:
    async with rig(tmp_path, pool_options={"max_tasks": 2}) as r:
        pids = [await _pid(r) for _ in range(3)]
    assert pids[0] == pids[1] != pids[2]


async def test_children_get_the_gpu_thread_and_cpu_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    probe = plan(chain("env"), [filt("env", F.Environment())], input=None)
    async with rig(tmp_path, cpus=1, gpus=0, max_concurrent=4, cpu_cores=1) as r:
        seen = success(await r.run(probe)).output
    assert seen["CUDA_VISIBLE_DEVICES"] == "" and seen["OMP_NUM_THREADS"] == "1"
    if seen["affinity"] is not None and len(psutil.Process().cpu_affinity()) > 1:
        assert len(seen["affinity"]) == 1
    async with rig(tmp_path / "two", cpu_cores=2, max_concurrent=2) as r:
        two = plan(chain("env"), [filt("env", F.Environment())], input=None, resources={"cpus": 2})
        assert success(await r.run(two)).output["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    async with rig(tmp_path / "operator", cpus=1, max_concurrent=4, cpu_cores=1) as r:
        assert success(await r.run(probe)).output["OMP_NUM_THREADS"] == "3"


async def test_gpu_plans_get_exclusive_gpus_and_others_see_every_allowed_gpu(tmp_path: Path) -> None:
    gpus = tuple(GpuDevice(index=i, uuid=f"GPU-{i}", name="Test GPU", memory_bytes=1 << 30) for i in range(2))
    probe = [filt("env", F.Environment()), filt("s", F.Sleeper(0.5))]
    async with rig(tmp_path, gpu_devices=gpus, max_concurrent=3) as r:
        def gpu_plan(count: int | None) -> object:
            resources = None if count is None else {"gpus": count}
            return plan(chain("env", "s"), probe, input=None, outputs=["env"], resources=resources)

        one, two = await asyncio.gather(r.run(gpu_plan(1)), r.run(gpu_plan(1)))
        seen = {success(one).output["CUDA_VISIBLE_DEVICES"], success(two).output["CUDA_VISIBLE_DEVICES"]}
        assert seen == {"GPU-0", "GPU-1"}
        assert success(await r.run(gpu_plan(None))).output["CUDA_VISIBLE_DEVICES"] == "GPU-0,GPU-1"
        assert success(await r.run(gpu_plan(0))).output["CUDA_VISIBLE_DEVICES"] == ""
        started = time.monotonic()
        both, single = await asyncio.gather(r.run(gpu_plan(2)), r.run(gpu_plan(1)))
        assert success(both).output["CUDA_VISIBLE_DEVICES"] == "GPU-0,GPU-1"
        assert time.monotonic() - started >= 1.0  # the second plan waited for the GPUs like a slot
        success(single)


async def test_drain_lets_running_plans_finish_refuses_new_ones_and_cancels_the_rest(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        short = asyncio.create_task(r.run(_sleep(0.5)))
        long = asyncio.create_task(r.run(_sleep(60.0)))
        await asyncio.sleep(0.3)
        draining = asyncio.create_task(r.executor.drain(1.5))
        await asyncio.sleep(0.05)
        refused = await r.run(_sleep(0.0))
        assert isinstance(refused, Error) and refused.code == "shutting_down" and refused.retryable
        success(await short)
        assert failure(await long).error.code == "cancelled"
        await draining
