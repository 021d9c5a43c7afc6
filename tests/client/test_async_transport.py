"""``AsyncRemoteClient`` on a running loop, over an in-memory ``Transport`` (no sockets at all)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from soma.client.async_client import AsyncRemoteClient
from soma.client.state import ClientState
from soma.client.timeout import Timeout
from soma.client.transport import HttpResponse
from soma.errors import ProtocolError, RemoteError
from soma.wire import v2
from soma.wire.messages import (
    AssignPlan,
    Capabilities,
    Event,
    Hello,
    PlanResult,
    PlanSuccess,
    Reply,
    Request,
    SerializedPlan,
    Welcome,
)


class MemoryChannel:
    """Both ends of a WebSocket in one process: ``answer`` plays the worker."""

    def __init__(self, answer: Callable[[Request], list[Reply]], protocol: str | None = "soma.v2") -> None:
        self.protocol = protocol
        self._answer = answer
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sent: list[Request] = []

    async def send(self, data: bytes) -> None:
        message = v2.decode(data, "worker")
        assert isinstance(message, Request)
        self.sent.append(message)
        for reply in self._answer(message):
            await self._inbox.put(v2.encode_frame(reply))

    async def receive(self) -> bytes | str | None:
        return await self._inbox.get()

    async def close(self) -> None:
        await self._inbox.put(None)

    @property
    def close_code(self) -> int | None:
        return 1000


class MemoryTransport:
    def __init__(self, channel: MemoryChannel) -> None:
        self.channel = channel
        self.headers: list[Mapping[str, str]] = []

    async def connect(
        self, url: str, *, headers: Mapping[str, str], protocols: tuple[str, ...], timeout: Timeout
    ) -> MemoryChannel:
        self.headers.append(headers)
        return self.channel

    async def request(
        self, method: str, url: str, *, headers: Mapping[str, str], body: Any = None, timeout: Timeout
    ) -> HttpResponse:
        raise AssertionError("no HTTP expected")

    async def aclose(self) -> None:
        return None


def worker(request: Request) -> list[Reply]:
    if isinstance(request, Hello):
        caps = Capabilities(cpu_cores=1, ram_bytes=1)
        return [
            Welcome(
                worker_id="mem",
                protocols=[2],
                capabilities=caps,
                runtime={},
                max_concurrent=1,
                inline_threshold=100,
                max_message_bytes=10_000,
                re=request.id,
            )
        ]
    assert isinstance(request, AssignPlan)
    plan_id = request.plan.plan_id
    event = Event(worker_id="mem", plan_id=plan_id, event={"event_type": "NodeStarted"}, re=request.id)
    result = PlanSuccess(output=(request.plan.input, "done"))
    return [event, PlanResult(worker_id="mem", plan_id=plan_id, result=result, re=request.id)]


def plan(value: Any) -> AssignPlan:
    return AssignPlan(plan=SerializedPlan(plan_id="p", plan={"type": "Empty"}, input=value))


async def test_requests_run_on_the_callers_loop_over_an_injected_transport() -> None:
    channel = MemoryChannel(worker)
    client = AsyncRemoteClient("ws://mem:1", "tok", transport=MemoryTransport(channel))
    frames: list[Reply] = []
    reply = await client.request(plan([1, 2]), on_frame=frames.append)
    assert isinstance(reply, PlanResult) and reply.result.output == ([1, 2], "done")  # type: ignore[union-attr]
    assert [type(f).__name__ for f in frames] == ["Event"]
    assert client.state is ClientState.OPEN and client.welcome is not None
    assert [m.type for m in channel.sent] == ["Hello", "AssignPlan"]
    assert channel.sent[1].id != channel.sent[0].id
    await client.close()
    with pytest.raises(RemoteError):
        await client.request(plan(1))


async def test_the_bearer_token_goes_in_a_header() -> None:
    transport = MemoryTransport(MemoryChannel(worker))
    client = AsyncRemoteClient("ws://mem:1", "s3cr3t", transport=transport)
    await client.connect()
    assert transport.headers == [{"Authorization": "Bearer s3cr3t"}]
    await client.close()


async def test_a_frame_above_the_workers_message_limit_is_refused_before_sending() -> None:
    channel = MemoryChannel(worker)
    client = AsyncRemoteClient("ws://mem:1", transport=MemoryTransport(channel))
    with pytest.raises(RemoteError, match="message limit of 10000 bytes"):
        await client.request(plan("x" * 20_000))
    assert [m.type for m in channel.sent] == ["Hello"]
    await client.close()


async def test_a_channel_without_the_v2_subprotocol_is_refused() -> None:
    client = AsyncRemoteClient("ws://mem:1", transport=MemoryTransport(MemoryChannel(worker, protocol=None)))
    with pytest.raises(ProtocolError, match="worker too old"):
        await client.connect()
    assert client.state is ClientState.LOST
