"""Plans through a running worker over a real WebSocket (loopback server; worker spec §6, isolation.md §10)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import _execute_filters as F
import aiohttp
import psutil
import pytest
from _execute_support import chain, filt, fit_mode, plan
from _server_support import WireClient, running, worker_config

from soma.client.sync_client import close_all
from soma.graph import Graph
from soma.wire.messages import (
    Ack,
    AssignPlan,
    CancelPlan,
    Error,
    Event,
    GetState,
    PlanFailure,
    PlanResult,
    PlanSuccess,
    Ping,
    Pong,
    StateResult,
)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


async def _result(client: WireClient, msg: AssignPlan, timeout: float = 30.0) -> Any:
    reply = await client.request(msg, timeout)
    assert isinstance(reply, PlanResult), reply
    return reply.result


async def test_a_v2_fork_join_fit_streams_events_then_its_result(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    steps = {
        "type": "Sequence",
        "steps": [
            {"type": "Execute", "node_id": "src"},
            {
                "type": "Parallel",
                "branches": [{"type": "Execute", "node_id": "l"}, {"type": "Execute", "node_id": "r"}],
            },
            {"type": "Execute", "node_id": "j"},
        ],
    }
    msg = plan(
        steps,
        [filt("src", F.Scaler(), trainable=True), filt("l", F.AddOne()), filt("r", F.Doubler()), filt("j", F.Keys())],
        edges=[("src", "l"), ("src", "r"), ("l", "j"), ("r", "j")],
        input=[1.0, 3.0],
        mode=fit_mode(),
        outputs=["j"],
        request_id="fit-1",
    )
    async with running(worker_config(tmp_path)) as live, WireClient.connect(http, live.url) as client:
        await client.send(msg)
        frames = []
        while not frames or not isinstance(frames[-1], PlanResult):
            frames.append(await client.receive(30))
    events = [f.event for f in frames if isinstance(f, Event)]
    assert [e["event_type"] for e in events] == ["NodeStarted", "NodeCompleted"] * 4
    assert all(f.re == "fit-1" for f in frames)
    result = frames[-1].result
    assert isinstance(result, PlanSuccess)
    assert result.output == {"keys": ["l", "r"], "values": [[0.0, 2.0], [-2.0, 2.0]]}
    assert result.states == {"src": {"mean": 2.0}}


async def test_a_v1_golden_fit_through_the_websocket(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    msg = plan(
        chain("scaler", "d"),
        [filt("scaler", F.Scaler(), trainable=True), filt("d", F.Doubler())],
        dialect="v1",
        plan_id="remote_plan_abc",
        input=[1.0, 2.0, 3.0],
        mode=fit_mode(y=[0.0, 1.0, 0.0], batch_size=2),
    )
    async with running(worker_config(tmp_path)) as live, WireClient.connect(http, live.url, "v1") as client:
        await client.send(msg)
        frame = await client.receive_raw(30)
    reply = json.loads(frame.data)
    assert reply["type"] == "PlanResult" and reply["plan_id"] == "remote_plan_abc"
    assert reply["result"]["states"] == {"scaler": {"type": "Json", "data": {"mean": 2.0}}}
    assert reply["result"]["output"]["value"]["data"]["values"] == [-2.0, 0.0, 2.0]


async def test_cancel_plan_answers_within_a_second_and_the_child_is_gone(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running(worker_config(tmp_path)) as live, WireClient.connect(http, live.url) as client:
        pid = (await _result(client, plan(chain("p"), [filt("p", F.Pid())], input=None))).output
        long = plan(chain("s"), [filt("s", F.Sleeper(60))], input=[1], request_id="long")
        await client.send(long)
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await client.send(CancelPlan(plan_id=long.plan.plan_id, id="cancel"))
        replies = {}
        while len(replies) < 2:
            reply = await client.receive(5)
            if not isinstance(reply, Event):
                replies[reply.re] = reply
        assert time.monotonic() - started < 1.0
        assert isinstance(replies["cancel"], Ack)
        assert isinstance(replies["long"].result, PlanFailure) and replies["long"].result.error.code == "cancelled"
        assert not _alive(pid)
        unknown = await client.request(CancelPlan(plan_id="nothing-here", id="c2"))
        assert isinstance(unknown, Error) and unknown.code == "unknown_plan"


async def test_an_endless_fit_times_out_and_the_worker_keeps_answering(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running(worker_config(tmp_path)) as live, WireClient.connect(http, live.url) as client:
        msg = plan(chain("spin"), [filt("spin", F.Spinner(), trainable=True)], input=[1], mode=fit_mode(), timeout_s=2)
        started = time.monotonic()
        pending = asyncio.create_task(_result(client, msg))
        await asyncio.sleep(1.0)
        async with http.get(f"{live.url}/health") as health:
            assert health.status == 200
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        result = await pending
        assert time.monotonic() - started < 4.0
        assert isinstance(result, PlanFailure) and result.error.code == "timeout" and result.error.node_id == "spin"
        await asyncio.sleep(0.2)
        assert not any(_alive(pid) for pid in before)
        assert isinstance(await client.request(Ping(id="ping")), Pong)


async def test_a_child_over_child_memory_is_killed_and_the_worker_stays_up(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = worker_config(tmp_path, child_memory=80 << 20)
    async with running(config) as live, WireClient.connect(http, live.url) as client:
        result = await _result(client, plan(chain("hog"), [filt("hog", F.Hog(200))], input=None))
        assert isinstance(result, PlanFailure) and result.error.code == "memory_limit"
        assert (await _result(client, plan(chain("e"), [filt("e", F.Echo())], input=[1]))).output == [1]


async def test_a_bad_interpreter_is_child_start_failed_and_the_worker_keeps_serving(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = worker_config(tmp_path, python="/nonexistent/python3.11")
    async with running(config) as live, WireClient.connect(http, live.url) as client:
        result = await _result(client, plan(chain("e"), [filt("e", F.Echo())], input=[1]))
        assert isinstance(result, PlanFailure) and result.error.code == "child_start_failed"
        assert "/nonexistent/python3.11" in result.error.message
        assert isinstance(await client.request(Ping(id="ping")), Pong)
        empty = await _result(client, plan({"type": "Empty"}, [], input=[5]))
        assert isinstance(empty, PlanSuccess) and empty.output == [5]


async def test_children_are_replaced_after_max_tasks_and_none_outlives_the_worker(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    config = worker_config(tmp_path, child_max_tasks=2)
    async with running(config) as live, WireClient.connect(http, live.url) as client:
        pids = [(await _result(client, plan(chain("p"), [filt("p", F.Pid())], input=None))).output for _ in range(3)]
    assert pids[0] == pids[1] != pids[2]
    assert not any(_alive(pid) for pid in pids)


async def test_closing_the_connection_ends_its_session(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path)) as live:
        async with WireClient.connect(http, live.url) as client:
            opening = plan(
                chain("a", "p"),
                [filt("a", F.StatefulAdd(), trainable=True), filt("p", F.Pid())],
                input=1,
                mode=fit_mode(),
                outputs=["p"],
                session={"keep": True},
            )
            pid = (await _result(client, opening)).output
            state = await client.request(GetState(plan_id=opening.plan.plan_id, node_ids=["a"], id="gs"))
            assert isinstance(state, StateResult) and state.states == {"a": {"add": 1}}
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not _alive(pid)
        async with WireClient.connect(http, live.url) as other:
            reply = await other.request(GetState(plan_id=opening.plan.plan_id, node_ids=["a"], id="gs2"))
            assert isinstance(reply, Error) and reply.code == "unknown_session"


async def test_health_stays_fast_while_cpu_bound_plans_run(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path, max_concurrent=4)) as live, WireClient.connect(http, live.url) as client:
        for n in range(4):
            spin = filt("spin", F.Spinner(), trainable=True)
            msg = plan(chain("spin"), [spin], input=[1], mode=fit_mode(), timeout_s=4, request_id=f"spin-{n}")
            await client.send(msg)
        await asyncio.sleep(1.0)
        latencies = []
        for _ in range(60):
            started = time.perf_counter()
            async with http.get(f"{live.url}/health") as health:
                assert health.status == 200
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
        results = []
        while len(results) < 4:
            reply = await client.receive(10)
            if isinstance(reply, PlanResult):
                results.append(reply.result)
        assert all(isinstance(r, PlanFailure) and r.error.code == "timeout" for r in results)
    assert statistics.quantiles(latencies, n=100)[98] < 0.05


async def test_a_cache_dir_shared_by_a_local_graph_and_the_worker_is_hit_from_both_sides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOMA_CACHE_DIR", raising=False)
    shared = tmp_path / "shared-cache"

    def graph(**options: Any) -> Graph:
        g = Graph(**options)
        g.node("s", F.Scaler())
        return g

    def hits(g: Graph, x: list[float]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        g.on_event(events.append)
        g.fit(x)
        return [e for e in events if e["event_type"] == "NodeCacheHit"]

    async with running(worker_config(tmp_path, cache_dir=shared)) as live:
        try:
            local = graph(cache_dir=shared)
            assert await asyncio.to_thread(hits, local, [1.0, 2.0, 3.0]) == []
            remote = graph()  # a private memory cache: only the worker's disk tier can hit
            remote.add_worker(live.url)
            remote_hits = await asyncio.to_thread(hits, remote, [1.0, 2.0, 3.0])
            assert [(e["what"], e["tier"]) for e in remote_hits] == [("state", "disk"), ("output", "disk")]
            assert all("worker" in e for e in remote_hits)
            assert remote.get_state("s") == local.get_state("s") == {"mean": 2.0}

            fresh_remote = graph()
            fresh_remote.add_worker(live.url)
            assert await asyncio.to_thread(hits, fresh_remote, [4.0, 8.0]) == []  # the worker writes the entries
            local_hits = await asyncio.to_thread(hits, graph(cache_dir=shared), [4.0, 8.0])
            assert [(e["what"], e["tier"]) for e in local_hits] == [("state", "disk"), ("output", "disk")]
        finally:
            await asyncio.to_thread(close_all)
