"""The WebSocket endpoint over a loopback server: dialects, light requests, refusals, shutdown
(worker spec §5, §6.11, §6.12; checklist items 11, 13, 14, 15, 16, 31, 36, 44)."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import psutil
import pytest
from _server_support import WireClient, running, worker_config

from soma.wire.codec import Dialect
from soma.wire.messages import (
    Ack,
    AssignPlan,
    AssignPythonJob,
    CancelPlan,
    ChunkData,
    Error,
    Event,
    GetState,
    Heartbeat,
    Hello,
    JobFile,
    Ping,
    PlanResult,
    PlanSuccess,
    Pong,
    PythonPipelineJob,
    Reply,
    SerializedPlan,
    Shutdown,
    Status,
    StatusRequest,
    StreamBegin,
    StreamEnd,
    Welcome,
)
from soma.worker import connection as connection_module
from soma.worker.execute import PlanExecutor

TRICKY = 'q"uo\'te \\ back\\slash\nnew line\ttab é ünï 日本 \u2028'


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _v1(message: dict[str, Any]) -> str:
    return json.dumps(message)


async def _v1_reply(client: WireClient, timeout: float = 10.0) -> dict[str, Any]:
    frame = await client.receive_raw(timeout)
    assert frame.type is aiohttp.WSMsgType.TEXT, frame
    return json.loads(frame.data)  # type: ignore[no-any-return]


def _no_side_effects(live: Any, tmp_path: Path) -> None:
    """No child spawned, no store file, no environment directory (§5.1 refusals)."""
    assert live.state.pool.stats().spawned == 0
    assert psutil.Process().children(recursive=True) == []
    assert list((tmp_path / "temp" / "store").iterdir()) == []
    assert not (tmp_path / "envs").exists() or list((tmp_path / "envs").iterdir()) == []


# --------------------------------------------------------------------------- v1 (Soma 0.2.43 JSON)


async def test_v1_golden_light_frames(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path, worker_id="w1")) as live:
        async with WireClient.connect(http, live.url, "v1") as client:
            assert client.ws.protocol is None
            await client.send_raw(_v1({"type": "Ping"}))
            frame = await client.receive_raw()
            assert frame.data == '{"type":"Pong"}'
            await client.send_raw(_v1({"type": "Registered", "worker_id": "w1"}))
            await client.send_raw(_v1({"type": "StatusRequest"}))
            register = await _v1_reply(client)  # Registered got no reply: the next frame is the Register
            assert register["type"] == "Register"
            assert register["worker_id"] == "w1"
            assert set(register["capabilities"]) == {"cpu_cores", "ram_bytes", "gpus", "python_envs", "tags"}
            assert {"cpu_usage", "memory_usage", "active_plans", "queue_depth", "timestamp"} <= set(register["load"])
            await client.send_raw('{"type": "Launch", "plan_id": "p"}')
            error = await _v1_reply(client)
            assert error["type"] == "Error"
            assert (error["code"], error["kind"], error["retryable"]) == ("bad_message", "Protocol", False)
            assert error["worker_id"] == "w1"
            await client.send_raw("{this is not json")
            assert (await _v1_reply(client))["code"] == "bad_message"
            await client.send_raw(_v1({"type": "Ping"}))
            assert await _v1_reply(client) == {"type": "Pong"}


async def test_v1_plan_with_an_unknown_protocol_version_is_refused_without_side_effects(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    plan = {
        "plan_id": "remote_plan_3",
        "plan": {"Sequence": [{"Execute": {"node_id": "a"}}]},
        "input": None,
        "filters": [
            {"node_id": "a", "pickled_filter": "AAAA", "state": None, "requirements": ["numpy"], "trainable": True}
        ],
        "mode": "Forward",
        "metadata": {},
        "protocol_version": 3,
    }
    async with running(worker_config(tmp_path)) as live:
        async with WireClient.connect(http, live.url, "v1") as client:
            await client.send_raw(_v1({"type": "AssignPlan", "plan": plan}))
            reply = await _v1_reply(client)
            assert reply["type"] == "PlanResult" and reply["plan_id"] == "remote_plan_3"
            result = reply["result"]
            assert result["status"] == "Failed" and result["code"] == "protocol_mismatch"
            assert "3" in result["error"] and "[1, 2]" in result["error"]
            await client.send_raw(_v1({"type": "Ping"}))
            assert await _v1_reply(client) == {"type": "Pong"}
        _no_side_effects(live, tmp_path)


async def test_v1_garbage_binary_frame_gets_a_text_error_and_the_connection_survives(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running(worker_config(tmp_path)) as live, WireClient.connect(http, live.url, "v1") as client:
        await client.send_raw(b"\xc1\xff garbage \x00")
        error = await _v1_reply(client)
        assert error["type"] == "Error" and error["code"] == "bad_message"
        await client.send_raw(_v1({"type": "Ping"}))
        assert await _v1_reply(client) == {"type": "Pong"}


async def test_v1_shutdown_is_acknowledged_with_shutdown_ack(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path)) as live:
        async with WireClient.connect(http, live.url, "v1") as client:
            await client.send_raw(_v1({"type": "Shutdown", "reason": "test"}))
            assert await _v1_reply(client) == {"type": "ShutdownAck"}
            closing = await client.receive_raw()
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.GOING_AWAY
        await asyncio.wait_for(live.task, 5)


async def test_v1_light_requests_get_exactly_one_reply_each(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path)) as live, WireClient.connect(http, live.url, "v1") as client:
        for message in (
            {"type": "Ping"},
            {"type": "StatusRequest"},
            {"type": "Registered", "worker_id": "x"},
            {"type": "CancelPlan", "plan_id": "nothing"},
            {"type": "GetState", "plan_id": "nothing", "node_ids": ["a"]},
        ):
            await client.send_raw(_v1(message))
        seen: Counter[str] = Counter()
        for _ in range(4):
            seen[(await _v1_reply(client))["type"]] += 1
        assert seen == Counter({"Pong": 1, "Register": 1, "Error": 2})
        assert await client.silent_for(0.3)


# --------------------------------------------------------------------------- v2


async def test_v2_negotiation_hello_and_status(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    config = worker_config(tmp_path, worker_id="w2", max_concurrent=3, max_message_bytes=1 << 20)
    async with running(config) as live:
        async with WireClient.connect(http, live.url, "v2", hello=False) as client:
            assert client.ws.protocol == "soma.v2"
            refused = await client.request(Ping(id="early"))
            assert isinstance(refused, Error) and refused.code == "hello_required" and refused.re == "early"
            welcome = await client.request(Hello(id="h", client={"soma": "0.3.0"}))
            assert isinstance(welcome, Welcome) and welcome.re == "h"
            assert welcome.worker_id == "w2" and welcome.protocols == [1, 2] and welcome.v == 2
            assert welcome.max_concurrent == 3 and welcome.max_message_bytes == 1 << 20
            assert welcome.inline_threshold == 10 * 1024 * 1024
            assert set(welcome.runtime) == {"python", "cloudpickle", "soma"}
            pong = await client.request(Ping(id="p"))
            assert isinstance(pong, Pong) and pong.re == "p"
            status = await client.request(StatusRequest(id="s"))
            assert isinstance(status, Status) and status.re == "s"
            assert status.worker_id == "w2" and status.running == 0 and status.sessions == 0
            assert status.load.max_concurrent == 3 and status.load.free_slots == 3


@pytest.mark.parametrize("peer", [1, 3, None])
async def test_v2_version_refusals_name_both_versions_and_close_with_1002(
    tmp_path: Path, http: aiohttp.ClientSession, peer: int | None
) -> None:
    if peer is None:
        envelope = msgpack.packb({"type": "Hello", "id": "h", "client": {}})
        frame = struct.pack("<4sBBHI", b"SOMA", 2, 0, 0, len(envelope)) + envelope
    else:
        frame = WireClientCodec.encode(Hello(id="h", client={}, v=peer))
    async with running(worker_config(tmp_path)) as live:
        async with WireClient.connect(http, live.url, "v2", hello=False) as client:
            await client.send_raw(frame)
            error = await client.receive()
            assert isinstance(error, Error) and error.code == "protocol_mismatch" and error.kind == "Protocol"
            assert error.details is not None
            assert error.details["worker"] == [1, 2] and error.details["peer"] == peer
            assert "[1, 2]" in error.message and repr(peer) in error.message
            closing = await client.receive_raw()
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.PROTOCOL_ERROR
        _no_side_effects(live, tmp_path)


class WireClientCodec:
    """Encodes v2 frames as a client would (for hand-built refusals)."""

    @staticmethod
    def encode(message: Any) -> bytes:
        from soma.wire import v2

        return v2.encode_frame(message)


async def test_v2_garbage_and_text_frames_get_errors_and_the_connection_survives(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running(worker_config(tmp_path)) as live, WireClient.connect(http, live.url) as client:
        for garbage in (b"\x00\x01garbage", b"SOMA\x02\x00\x00\x00\x40\x00\x00\x00short", '{"type": "Ping"}'):
            await client.send_raw(garbage)
            error = await client.receive()
            assert isinstance(error, Error) and error.code == "bad_message"
            pong = await client.request(Ping(id="after"))
            assert isinstance(pong, Pong)
        pong_from_client = WireClientCodec.encode(Pong(re="x"))
        await client.send_raw(pong_from_client)
        error = await client.receive()
        assert isinstance(error, Error) and error.code == "bad_message" and "not a request" in error.message


async def test_v2_light_requests_get_exactly_one_terminal_reply_each(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    requests = [
        Ping(id="ping-1"),
        Ping(id="ping-2"),
        StatusRequest(id="status-1"),
        StatusRequest(id="status-2"),
        CancelPlan(id="cancel-1", plan_id="unknown"),
        GetState(id="state-1", plan_id="unknown", node_ids=["a"]),
        Hello(id="hello-2", client={}),
    ]
    async with running(worker_config(tmp_path)) as live, WireClient.connect(http, live.url) as client:
        for request in requests:
            await client.send(request)
        replies: dict[str, list[Reply]] = {}
        while len(replies) < len(requests):
            reply = await client.receive()
            assert reply.re is not None
            replies.setdefault(reply.re, []).append(reply)
        assert await client.silent_for(0.3)
    assert {key: len(value) for key, value in replies.items()} == {r.id: 1 for r in requests}
    assert isinstance(replies["cancel-1"][0], Error) and replies["cancel-1"][0].code == "unknown_plan"
    assert isinstance(replies["state-1"][0], Error) and replies["state-1"][0].code == "unknown_session"


@pytest.mark.parametrize("dialect", ["v1", "v2"])
async def test_error_texts_with_quotes_backslashes_newlines_and_unicode_arrive_intact(
    tmp_path: Path, http: aiohttp.ClientSession, dialect: Dialect
) -> None:
    async with running(worker_config(tmp_path)) as live, WireClient.connect(http, live.url, dialect) as client:
        reply = await client.request(CancelPlan(id="c", plan_id=TRICKY))
    assert isinstance(reply, Error) and reply.code == "unknown_plan"
    assert reply.plan_id == TRICKY
    assert f"`{TRICKY}`" in reply.message


async def test_features_outside_this_build_get_a_typed_error(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    plan = SerializedPlan(plan_id="s1", plan={"type": "Empty"}, protocol_version=2)
    job = PythonPipelineJob(
        job_id="j1", pipeline_id="p", investigation_id="i", files=[JobFile("main.py", "print(1)")],
        requirements="", entry_point="main.py",
    )
    requests = [
        AssignPythonJob(id="job", job=job),
        StreamBegin(id="begin", stream_id="st", plan_id="s1", total_chunks=2, plan=plan),
        ChunkData(id="chunk", stream_id="st", chunk_index=0, value=[1.0]),
        StreamEnd(id="end", stream_id="st"),
    ]
    async with running(worker_config(tmp_path)) as live:
        async with WireClient.connect(http, live.url) as client:
            for request in requests:
                reply = await client.request(request)
                assert isinstance(reply, Error), reply
                assert reply.code == "unsupported_plan" and reply.re == request.id
                assert "not available in this build" in reply.message
                if request.id != "job":
                    assert reply.stream_id == "st"
        _no_side_effects(live, tmp_path)


async def test_oversized_messages_get_an_error_then_close_1009(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path, max_message_bytes=1024)) as live:
        async with WireClient.connect(http, live.url) as client:
            await client.send_raw(b"SOMA" + bytes(4096))
            error = await client.receive()
            assert isinstance(error, Error) and error.code == "bad_message"
            assert "1024" in error.message
            closing = await client.receive_raw()
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        async with WireClient.connect(http, live.url) as client:
            assert isinstance(await client.request(Ping(id="p")), Pong)


# --------------------------------------------------------------------------- shutdown


async def test_shutdown_is_acknowledged_first_and_the_server_stops_fast(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running(worker_config(tmp_path)) as live:
        async with WireClient.connect(http, live.url) as client:
            started = time.monotonic()
            ack = await client.request(Shutdown(id="bye", reason="maintenance"))
            assert isinstance(ack, Ack) and ack.re == "bye" and ack.worker_id == "w-test"
            assert time.monotonic() - started < 2.0
            closing = await client.receive_raw()
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.GOING_AWAY
        await asyncio.wait_for(live.task, 2.0)
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{live.url}/health")


async def test_draining_worker_refuses_new_work_with_shutting_down(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gate = asyncio.Event()

    class Slow(PlanExecutor):
        async def get_state(self, msg: GetState, conn: Any) -> Reply:
            await gate.wait()
            return await super().get_state(msg, conn)

    async with running(worker_config(tmp_path), executor_factory=Slow) as live:
        async with WireClient.connect(http, live.url) as client:
            await client.send(GetState(id="slow", plan_id="s", node_ids=[]))
            await asyncio.sleep(0.1)
            live.server.request_stop(5.0)
            async with http.get(f"{live.url}/health") as response:
                assert response.status == 503
            busy = await client.request(GetState(id="late", plan_id="s", node_ids=[]))
            assert isinstance(busy, Error) and busy.code == "shutting_down" and busy.retryable
            assert isinstance(await client.request(Ping(id="ping")), Pong)
            gate.set()
            first = await client.receive()
            assert first.re == "slow" and isinstance(first, Error) and first.code == "unknown_session"


async def test_a_tokenless_worker_beyond_loopback_refuses_shutdown(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path, host="0.0.0.0", insecure=True)) as live:
        url = live.url
        async with WireClient.connect(http, url) as client:
            refused = await client.request(Shutdown(id="bye"))
            assert isinstance(refused, Error) and refused.code == "unauthorized" and refused.kind == "Auth"
            assert isinstance(await client.request(Ping(id="still")), Pong)
        async with http.get(f"{url}/health") as response:
            assert response.status == 200
        assert not live.task.done()


# --------------------------------------------------------------------------- robustness


async def test_a_failing_handler_gives_internal_error_and_later_requests_succeed(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    class Faulty(PlanExecutor):
        async def get_state(self, msg: GetState, conn: Any) -> Reply:
            calls.append(msg.id)
            if len(calls) == 1:
                raise RuntimeError("injected fault")
            return await super().get_state(msg, conn)

    async with running(worker_config(tmp_path), executor_factory=Faulty) as live:
        async with WireClient.connect(http, live.url) as client:
            error = await client.request(GetState(id="g1", plan_id="s", node_ids=["a"]))
            assert isinstance(error, Error) and error.code == "internal" and error.re == "g1"
            assert "RuntimeError: injected fault" in error.message
            again = await client.request(GetState(id="g2", plan_id="s", node_ids=["a"]))
            assert isinstance(again, Error) and again.code == "unknown_session"
            assert isinstance(await client.request(Ping(id="p")), Pong)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and "GetState handler failed" in r.getMessage()]
    assert failures and failures[0].exc_info is not None


async def test_heartbeats_flow_only_while_requests_are_in_flight(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_module, "HEARTBEAT_INTERVAL_S", 0.1)

    class Slow(PlanExecutor):
        async def get_state(self, msg: GetState, conn: Any) -> Reply:
            await asyncio.sleep(0.6)
            return await super().get_state(msg, conn)

    async with running(worker_config(tmp_path), executor_factory=Slow) as live:
        async with WireClient.connect(http, live.url) as client:
            await client.send(GetState(id="slow", plan_id="s", node_ids=[]))
            beats = []
            while True:
                reply = await client.receive()
                if not isinstance(reply, Heartbeat):
                    break
                beats.append(reply)
            assert reply.re == "slow"
            assert len(beats) >= 2
            assert all(beat.worker_id == "w-test" and beat.re is None for beat in beats)
            assert await client.silent_for(0.4)


async def test_duplicate_request_ids_in_flight_are_refused(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    class Slow(PlanExecutor):
        async def get_state(self, msg: GetState, conn: Any) -> Reply:
            await asyncio.sleep(0.3)
            return await super().get_state(msg, conn)

    async with running(worker_config(tmp_path), executor_factory=Slow) as live:
        async with WireClient.connect(http, live.url) as client:
            await client.send(GetState(id="same", plan_id="s", node_ids=[]))
            await client.send(GetState(id="same", plan_id="s", node_ids=[]))
            duplicate = await client.receive()
            assert isinstance(duplicate, Error) and duplicate.code == "bad_message" and "in flight" in duplicate.message
            first = await client.receive()
            assert isinstance(first, Error) and first.code == "unknown_session"


def _chatty(count: int, *, pause_every: int | None = None) -> type[PlanExecutor]:
    """An executor whose plans send ``count`` numbered events, then their reply; with ``pause_every``
    they let other tasks run that often, so that concurrent plans' sends interleave."""

    class Chatty(PlanExecutor):
        async def run_plan(self, msg: AssignPlan, conn: Any) -> Reply:
            for i in range(count):
                event = {"event_type": "Tick", "i": i, "pad": "x" * 200}
                await conn.send(Event(worker_id="w-test", plan_id=msg.plan.plan_id, event=event), msg.id)
                if pause_every is not None and i % pause_every == 0:
                    await asyncio.sleep(0)
            return PlanResult(worker_id="w-test", plan_id=msg.plan.plan_id, result=PlanSuccess(output=count))

    return Chatty


async def test_events_of_concurrent_plans_each_arrive_in_order_to_a_slow_reader(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    count = 800
    async with running(worker_config(tmp_path), executor_factory=_chatty(count, pause_every=7)) as live:
        async with WireClient.connect(http, live.url) as client:
            for name in ("a", "b"):
                plan = SerializedPlan(plan_id=name, plan={"type": "Empty"}, protocol_version=2)
                await client.send(AssignPlan(id=name, plan=plan))
            await asyncio.sleep(1.0)  # a client that does not read for a while
            seen: dict[str, list[int]] = {"a": [], "b": []}
            finished: list[str] = []
            while len(finished) < 2:
                reply = await client.receive()
                assert reply.re is not None
                if isinstance(reply, Event):
                    assert reply.re not in finished  # no event after its plan's reply
                    seen[reply.re].append(reply.event["i"])
                else:
                    assert isinstance(reply, PlanResult)
                    finished.append(reply.re)
    assert seen == {"a": list(range(count)), "b": list(range(count))}


async def test_a_slow_reader_still_receives_every_event_in_order(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    count = 1500
    plan = SerializedPlan(plan_id="chatty", plan={"type": "Empty"}, protocol_version=2)
    async with running(worker_config(tmp_path), executor_factory=_chatty(count)) as live:
        async with WireClient.connect(http, live.url) as client:
            await client.send(AssignPlan(id="run", plan=plan))
            await asyncio.sleep(1.0)  # a client that does not read for a while
            seen = []
            while True:
                reply = await client.receive()
                if isinstance(reply, Event):
                    seen.append(reply.event["i"])
                    continue
                break
    assert seen == list(range(count))
    assert isinstance(reply, PlanResult) and reply.re == "run"
