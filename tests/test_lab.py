"""``soma.Lab`` against a real HTTP server on loopback (api.md §10, §11 item 61)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

import soma
from soma.lab import Lab

INFO = {"type": "Register", "worker_id": "w1", "capabilities": {"cpu_cores": 2}, "protocols": [1, 2]}


@dataclass
class FakeWorker:
    """A loopback aiohttp server answering /health and /info like a worker, on its own thread."""

    port: int
    health_status: int = 200
    authorizations: list[str | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def fake_worker(free_port: int) -> Iterator[FakeWorker]:
    worker = FakeWorker(port=free_port)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        worker.authorizations.append(request.headers.get("Authorization"))
        if worker.health_status != 200:
            return web.Response(status=worker.health_status, text="draining")
        return web.Response(text="ok", content_type="text/plain", charset="utf-8")

    async def info(request: web.Request) -> web.Response:
        worker.authorizations.append(request.headers.get("Authorization"))
        return web.json_response(INFO)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:1/elsewhere")

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/info", info)
        app.router.add_get("/moved/health", redirect)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", worker.port).start()
        ready.set()
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10), "fake worker did not start"
    yield worker
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()


def test_connect_checks_health_and_strips_the_trailing_slash(fake_worker: FakeWorker) -> None:
    lab = Lab.connect(fake_worker.url + "/")
    assert lab.url == fake_worker.url
    assert repr(lab) == f"Lab('{fake_worker.url}')"
    assert lab.health() == "ok"
    assert fake_worker.authorizations == [None, None]


def test_info_and_workers_return_the_info_document(fake_worker: FakeWorker) -> None:
    lab = Lab(fake_worker.url)
    assert lab.info() == INFO
    assert lab.workers() == [INFO]


def test_token_travels_as_a_bearer_header(fake_worker: FakeWorker) -> None:
    lab = Lab.connect(fake_worker.url, token="tok&en #1+")
    lab.info()
    assert fake_worker.authorizations == ["Bearer tok&en #1+"] * 2
    assert "tok&en" not in repr(lab)


def test_closed_port_raises_connection_error(free_port: int) -> None:
    url = f"http://127.0.0.1:{free_port}"
    with pytest.raises(ConnectionError, match=rf"^Cannot connect to Soma lab at {url}: ") as info:
        Lab.connect(url)
    assert info.value.__cause__ is not None


def test_unhealthy_worker_raises_connection_error(fake_worker: FakeWorker) -> None:
    fake_worker.health_status = 503
    with pytest.raises(ConnectionError, match="HTTP 503.*draining"):
        Lab.connect(fake_worker.url)


def test_redirects_are_not_followed(fake_worker: FakeWorker) -> None:
    with pytest.raises(ConnectionError, match="HTTP 302"):
        Lab.connect(fake_worker.url + "/moved", token="secret-token-value")


def test_silent_server_times_out(free_port: int) -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", free_port))
        listener.listen(1)
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="Cannot connect to Soma lab"):
            Lab.connect(f"http://127.0.0.1:{free_port}", timeout=0.3)
        assert time.monotonic() - started < 3


def test_malformed_url_raises_connection_error() -> None:
    with pytest.raises(ConnectionError, match="Cannot connect to Soma lab at localhost:3000"):
        Lab.connect("localhost:3000")


def test_repr_needs_no_server() -> None:
    assert repr(Lab("http://localhost:3000")) == "Lab('http://localhost:3000')"
    assert repr(Lab("http://localhost:3000/")) == "Lab('http://localhost:3000')"


def test_lab_is_exported_lazily_without_heavy_imports() -> None:
    assert soma.Lab is Lab
    code = "import sys, soma; soma.Lab; print(sorted({'aiohttp', 'torch', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
