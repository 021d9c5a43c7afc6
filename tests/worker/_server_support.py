"""Shared pieces of the worker server tests: a loopback worker in the test's event loop, wire clients.

``running(config)`` starts a ``WorkerServer`` on 127.0.0.1 with an ephemeral port and fixed
capabilities (no detection probes), and always stops it. ``WireClient`` speaks v1 or v2 over
a real WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from soma.wire.codec import Codec, Dialect
from soma.wire.messages import Hello, Reply, Request
from soma.worker.app import Serving, WorkerServer
from soma.worker.config import WorkerConfig
from soma.worker.detect import Detected
from soma.worker.server import WorkerState

__all__ = ["FIXED_CAPS", "LiveWorker", "WireClient", "running", "worker_config"]

FIXED_CAPS = Detected(cpu_cores=2, ram_bytes=8 << 30, gpus=(), python_envs=("Python 3.11.7 (/usr/bin/python3)",))


def worker_config(tmp_path: Path, **overrides: Any) -> WorkerConfig:
    """A loopback, ephemeral-port config whose directories live under ``tmp_path``; no prewarm."""
    options: dict[str, Any] = {
        "worker_id": "w-test",
        "python": sys.executable,
        "port": 0,
        "temp_dir": tmp_path / "temp",
        "work_dir": tmp_path / "work",
        "env_dir": tmp_path / "envs",
        "prewarm": 0,
    }
    options.update(overrides)
    return WorkerConfig(**options)


class LiveWorker:
    """A worker serving in a task of the test's loop, as ``soma-worker`` serves in its own."""

    def __init__(self, server: WorkerServer, task: asyncio.Task[None]) -> None:
        self.server = server
        self.task = task

    @property
    def url(self) -> str:
        assert self.server.serving is not None
        return self.server.serving.http_url

    @property
    def state(self) -> WorkerState:
        assert self.server.state is not None
        return self.server.state

    def request_stop(self, drain_s: float = 0.0) -> None:
        self.server.request_stop(drain_s)


@contextlib.asynccontextmanager
async def running(config: WorkerConfig, **options: Any) -> AsyncIterator[LiveWorker]:
    """A serving worker (``live.url``); stopped with no drain on exit if still running."""
    server = WorkerServer(config, detector=lambda _: FIXED_CAPS, **options)
    ready: asyncio.Future[Serving] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve(on_ready=ready.set_result))
    waits: list[asyncio.Future[Any]] = [task, ready]
    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the startup failure
    try:
        yield LiveWorker(server, task)
    finally:
        server.request_stop(0.0)
        await task


class WireClient:
    """One WebSocket to a worker in a fixed dialect (``v2`` offers the ``soma.v2`` subprotocol)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, dialect: Dialect) -> None:
        self.ws = ws
        self.dialect = dialect
        self.codec = Codec(dialect, side="client")

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        session: aiohttp.ClientSession,
        base_url: str,
        dialect: Dialect = "v2",
        *,
        hello: bool = True,
        headers: dict[str, str] | None = None,
    ) -> AsyncIterator[WireClient]:
        protocols = ("soma.v2",) if dialect == "v2" else ()
        async with session.ws_connect(f"{base_url}/ws", protocols=protocols, headers=headers) as ws:
            client = cls(ws, dialect)
            if dialect == "v2" and hello:
                await client.send(Hello(id="hello", client={}))
                await client.receive()
            yield client

    async def send(self, message: Request) -> None:
        frame = self.codec.encode(message)
        if isinstance(frame, str):
            await self.ws.send_str(frame)
        else:
            await self.ws.send_bytes(frame)

    async def send_raw(self, data: str | bytes) -> None:
        if isinstance(data, str):
            await self.ws.send_str(data)
        else:
            await self.ws.send_bytes(data)

    async def receive_raw(self, timeout: float = 10.0) -> aiohttp.WSMessage:
        return await self.ws.receive(timeout=timeout)

    async def receive(self, timeout: float = 10.0) -> Reply:
        frame = await self.receive_raw(timeout)
        assert frame.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), frame
        message = self.codec.decode(frame.data)
        assert isinstance(message, Reply), message
        return message

    async def request(self, message: Request, timeout: float = 10.0) -> Reply:
        """Send ``message`` and return the first frame that is not a ``Heartbeat`` or ``Event``."""
        await self.send(message)
        while True:
            reply = await self.receive(timeout)
            if reply.type not in ("Heartbeat", "Event"):
                return reply

    async def silent_for(self, seconds: float) -> bool:
        """Whether no frame arrives within ``seconds``."""
        try:
            frame = await asyncio.wait_for(self.ws.receive(), seconds)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected frame {frame!r}")
