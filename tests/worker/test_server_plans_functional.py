"""The server around running plans: metrics, shutdown drain, disconnects, store pins.

Checklist items 7, 9, 31; worker spec §6.6, §6.12.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import _execute_filters as F
import aiohttp
import psutil
import pytest
from _execute_support import chain, filt, plan
from _server_support import WireClient, running, worker_config

from soma.wire import v2
from soma.wire.messages import Ack, CachedRef, Error, Event, Ping, PlanResult, PlanSuccess, Pong, Reply, Shutdown


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(f"{url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not exposed")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone, also between two looks at it
        return False


async def test_slots_busy_follows_a_running_plan(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path, max_concurrent=2)) as live:
        async with WireClient.connect(http, live.url) as client:
            await client.send(plan(chain("s"), [filt("s", F.Sleeper(1.5))], input=[1], request_id="sleep"))
            busy = 0.0
            for _ in range(50):
                busy = await _metric(http, live.url, "soma_worker_slots_busy")
                if busy == 1:
                    break
                await asyncio.sleep(0.05)
            assert busy == 1
            reply = await client.request(Ping(id="meanwhile"))
            assert isinstance(reply, Pong)
            while not isinstance(reply := await client.receive(30), PlanResult):
                pass
            assert isinstance(reply.result, PlanSuccess)
        assert await _metric(http, live.url, "soma_worker_slots_busy") == 0
        assert await _metric(http, live.url, "soma_worker_plan_seconds_count") == 1
        async with http.get(f"{live.url}/metrics") as response:
            assert 'soma_worker_requests_total{outcome="ok",type="AssignPlan"} 1.0' in await response.text()


async def test_shutdown_acks_first_lets_a_running_plan_finish_then_stops(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running(worker_config(tmp_path)) as live:
        async with WireClient.connect(http, live.url) as client:
            await client.send(plan(chain("s"), [filt("s", F.Sleeper(2.0))], input=[7], request_id="work"))
            await asyncio.sleep(0.5)
            sent = time.monotonic()
            await client.send(Shutdown(id="bye", drain_s=20))
            frames = []
            while True:
                frame = await client.receive_raw(30)
                if frame.type is not aiohttp.WSMsgType.BINARY:
                    break
                reply = client.codec.decode(frame.data)
                assert isinstance(reply, Reply)
                if not isinstance(reply, Event):
                    frames.append((reply, time.monotonic() - sent))
                if len(frames) == 1:
                    late = await client.request(plan(chain("e"), [filt("e", F.Echo())], input=[1], request_id="late"))
                    frames.append((late, time.monotonic() - sent))
            assert frame.type is aiohttp.WSMsgType.CLOSE and frame.data == aiohttp.WSCloseCode.GOING_AWAY
        ack, late, result = (reply for reply, _ in frames)
        assert isinstance(ack, Ack) and ack.re == "bye" and frames[0][1] < 1.0
        assert isinstance(late, Error) and late.code == "shutting_down" and late.re == "late"
        assert isinstance(result, PlanResult) and result.re == "work"
        assert isinstance(result.result, PlanSuccess) and result.result.output == [7]
        await asyncio.wait_for(live.task, 10)


async def test_closing_a_connection_cancels_its_running_plan(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path)) as live:
        async with WireClient.connect(http, live.url) as client:
            pid_reply = await client.request(plan(chain("p"), [filt("p", F.Pid())], input=None, request_id="pid"))
            assert isinstance(pid_reply, PlanResult) and isinstance(pid_reply.result, PlanSuccess)
            pid = pid_reply.result.output
            await client.send(plan(chain("s"), [filt("s", F.Sleeper(60))], input=[1], request_id="long"))
            await asyncio.sleep(0.5)
        for _ in range(100):
            if not _alive(pid):
                break
            await asyncio.sleep(0.05)
        assert not _alive(pid)
        async with WireClient.connect(http, live.url) as client:
            assert isinstance(await client.request(Ping(id="still")), Pong)
        assert await _metric(http, live.url, "soma_worker_slots_busy") == 0


async def test_a_pinned_upload_outlives_its_ttl_until_the_plan_ends_then_both_it_and_the_output_go(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Checklist item 9 with a running plan: pins hold, then uploads and worker-stored outputs are swept."""
    store = tmp_path / "temp" / "store"
    config = worker_config(tmp_path, store_ttl=1.0, store_sweep=1.0, inline_threshold=1024)
    async with running(config) as live, WireClient.connect(http, live.url) as client:
        async with http.post(f"{live.url}/upload", data=v2.encode_value_frame(list(range(1000, 2000)))) as response:
            uploaded = store / f"{(await response.json())['cache_key']}.soma"
        msg = plan(chain("s"), [filt("s", F.Sleeper(3.0))], input=CachedRef(cache_key=uploaded.stem), request_id="p")
        await client.send(msg)
        await asyncio.sleep(2.5)  # beyond the TTL plus a sweep, while the plan holds the pin
        assert uploaded.exists()
        while not isinstance(reply := await client.receive(30), PlanResult):
            pass
        assert isinstance(reply.result, PlanSuccess) and isinstance(reply.result.output, CachedRef)
        output = store / f"{reply.result.output.cache_key}.soma"
        assert output.exists()
        ended = time.monotonic()
        while (uploaded.exists() or output.exists()) and time.monotonic() - ended < 3.0:
            await asyncio.sleep(0.1)
        assert not uploaded.exists() and not output.exists()
