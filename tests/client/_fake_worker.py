"""A scripted wire-v2 worker on loopback, for testing the client without the real daemon.

It runs an aiohttp app on its own event loop thread. ``behaviour`` picks how it
answers ``AssignPlan``: ``"ok"`` (two events, then a result echoing the input),
``"silent"`` (never answers, no heartbeat), ``"heartbeat"`` (heartbeats only),
``"close"`` (drops the connection), ``"garbage"`` (an undecodable frame),
``"error"`` (a typed ``Error``) and ``"slow"`` (answers after ``delay`` seconds).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from soma.wire import v2
from soma.wire.messages import (
    Ack,
    AssignPlan,
    CachedRef,
    Capabilities,
    Event,
    Heartbeat,
    Hello,
    LoadMetrics,
    Ping,
    PlanResult,
    PlanSuccess,
    Pong,
    Shutdown,
    Welcome,
    make_error,
)

LOAD = LoadMetrics(0.0, 0.0, [], 0, 0, "2025-01-01T00:00:00Z")


@dataclass
class FakeWorker:
    token: str | None = None
    behaviour: str = "ok"
    grant_v2: bool = True
    delay: float = 0.0
    inline_threshold: int = 1024
    store: dict[str, bytes] = field(default_factory=dict)
    seen: list[Any] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    def start(self) -> FakeWorker:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    @property
    def address(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_post("/upload", self._upload)
        app.router.add_get("/download", self._download)
        app.router.add_get("/info", self._info)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _authorised(self, request: web.Request) -> bool:
        return self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response({"type": "Register", "worker_id": "fake"})

    async def _upload(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"error": "unauthorized", "message": "no"}, status=401)
        body = await request.read()
        key = hashlib.sha256(len(body).to_bytes(8, "little") + body).hexdigest()
        self.store[key] = body
        return web.json_response({"type": "Cached", "cache_key": key, "size": len(body)})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return web.json_response({"error": "unauthorized", "message": "no"}, status=401)
        ref = json.loads(request.query["ref"])
        body = self.store.get(ref.get("cache_key", ""))
        if body is None:
            return web.json_response({"error": "unresolved_reference", "message": f"{ref} not found"}, status=404)
        return web.Response(body=body, content_type="application/vnd.soma.v2")

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return web.json_response({"error": "unauthorized", "message": "no"}, status=401)
        ws = web.WebSocketResponse(protocols=("soma.v2",) if self.grant_v2 else ())
        await ws.prepare(request)
        self.connections += 1
        tasks: set[asyncio.Task[None]] = set()
        async for frame in ws:
            message = v2.decode(frame.data, "worker")
            self.seen.append(message)
            if isinstance(message, Hello):
                await ws.send_bytes(v2.encode_frame(self._welcome(message.id)))
            elif isinstance(message, Ping):
                await ws.send_bytes(v2.encode_frame(Pong(re=message.id)))
            elif isinstance(message, Shutdown):
                await ws.send_bytes(v2.encode_frame(Ack(worker_id="fake", re=message.id)))
            elif isinstance(message, AssignPlan):
                tasks.add(asyncio.create_task(self._plan(ws, message)))
        for task in tasks:
            task.cancel()
        return ws

    def _welcome(self, re: str | None) -> Welcome:
        return Welcome(
            worker_id="fake",
            protocols=[1, 2],
            capabilities=Capabilities(cpu_cores=1, ram_bytes=1 << 30),
            runtime={},
            max_concurrent=2,
            inline_threshold=self.inline_threshold,
            max_message_bytes=1 << 20,
            re=re,
        )

    async def _plan(self, ws: web.WebSocketResponse, message: AssignPlan) -> None:
        plan_id, re = message.plan.plan_id, message.id
        behaviour = self.behaviour
        if behaviour == "silent":
            return
        if behaviour == "close":
            await ws.close()
            return
        if behaviour == "garbage":
            await ws.send_bytes(b"SOMA\x02\x00\x00\x00\xff\xff\xff\xff nonsense")
            return
        if behaviour == "error":
            error = make_error("busy", "all slots taken", worker_id="fake", plan_id=plan_id, re=re)
            await ws.send_bytes(v2.encode_frame(error))
            return
        if behaviour == "heartbeat":
            for _ in range(100):
                await ws.send_bytes(v2.encode_frame(Heartbeat(worker_id="fake", load=LOAD)))
                await asyncio.sleep(0.1)
            return
        for n in range(2):
            event = {"event_type": "NodeStarted" if n == 0 else "NodeCompleted", "node_id": "a", "ts": 0.0}
            await ws.send_bytes(v2.encode_frame(Event(worker_id="fake", plan_id=plan_id, event=event, re=re)))
        await asyncio.sleep(self.delay)
        value = message.plan.input
        if isinstance(value, CachedRef):
            value = v2.decode_value_frame(self.store[value.cache_key], "worker")
        result = PlanSuccess(output=value, duration_ms=1, states={})
        await ws.send_bytes(v2.encode_frame(PlanResult(worker_id="fake", plan_id=plan_id, result=result, re=re)))
        return
