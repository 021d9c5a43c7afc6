"""``soma.Worker``, the embedded worker (api.md §10, worker spec §2.4; api item 60, checklist 31, 39, 52)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

import aiohttp
import pytest

import soma
from soma.errors import RemoteError, SomaConfigError, SomaError
from soma.worker.app import BindError
from soma.worker.embedded import Worker
from soma.worker.store import StoreLocked

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SUMMARY = re.compile(r'^\d+ CPUs, \d+\.\d GB RAM, GPUs: (none|.+), Python: \[.*\], tags: \[.*"cpu".*\]$')


def _health(url: str) -> int:
    with _OPENER.open(f"{url}/health", timeout=5) as response:
        return int(response.status)


class Dirs(TypedDict):
    temp_dir: Path
    work_dir: Path
    env_dir: Path


def _dirs(tmp_path: Path, name: str) -> Dirs:
    return {"temp_dir": tmp_path / f"{name}-temp", "work_dir": tmp_path / f"{name}-work", "env_dir": tmp_path / "envs"}


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory: pytest.TempPathFactory) -> Dirs:
    return _dirs(tmp_path_factory.mktemp("embedded"), "shared")


@pytest.fixture(scope="module")
def worker(shared_dirs: Dirs) -> Iterator[Worker]:
    """One started worker shared by the tests that only read from it."""
    with Worker(port=0, tags="x, y", worker_id="emb-1", **shared_dirs) as running:
        yield running


def _wait_down(url: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _health(url)
        except urllib.error.URLError:
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- construction


def test_soma_exports_the_embedded_worker() -> None:
    assert soma.Worker is Worker


def test_a_public_host_needs_a_token_or_insecure() -> None:
    with pytest.raises(SomaConfigError) as caught:
        Worker(host="0.0.0.0")
    assert str(caught.value) == "refusing to listen on 0.0.0.0 without a token; pass token=... or insecure=True"
    assert isinstance(caught.value, ValueError)
    assert Worker(host="0.0.0.0", insecure=True).address.startswith("ws://0.0.0.0:")
    assert Worker(host="0.0.0.0", token="t" * 20).address == "ws://0.0.0.0:8080"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 70000},
        {"port": "80"},
        {"memory": "lots"},
        {"max_concurrent": 0},
        {"worker_id": "bad id!"},
        {"token": ""},
    ],
)
def test_bad_constructor_arguments_raise_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(SomaConfigError):
        Worker(**kwargs)  # type: ignore[arg-type]


def test_repr_shows_port_tags_and_auth() -> None:
    assert repr(Worker(port=9, tags=["gpu", "x"], token="t" * 20)) == 'Worker(port=9, tags=["gpu", "x"], auth=true)'
    assert repr(Worker(port=10, tags="a, b,,a")) == 'Worker(port=10, tags=["a", "b"], auth=false)'


def test_worker_id_defaults_to_the_sanitised_host_name() -> None:
    expected = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64]
    assert Worker().worker_id == expected
    assert Worker(worker_id="w-7").worker_id == "w-7"


def test_set_data_store_validates_at_call_time(tmp_path: Path) -> None:
    worker = Worker(port=0)
    with pytest.raises(SomaConfigError, match="^local store requires 'path'$"):
        worker.set_data_store("local")
    with pytest.raises(SomaConfigError, match="^store type 's3' is not supported by this build$"):
        worker.set_data_store("s3", bucket="b")
    with pytest.raises(ValueError, match=r"^unknown store type: 'redis'\. Available: local$"):
        worker.set_data_store("redis")
    with pytest.raises(SomaConfigError, match="not a directory"):
        worker.set_data_store("local", path=tmp_path / "missing")
    worker.set_data_store("local", path=tmp_path)


# --------------------------------------------------------------------------- a running worker


def test_a_started_worker_reports_its_bound_port_and_address(worker: Worker) -> None:
    assert worker.port != 0
    assert worker.address == f"ws://127.0.0.1:{worker.port}"
    assert worker.worker_id == "emb-1"
    assert _health(f"http://127.0.0.1:{worker.port}") == 200
    assert repr(worker) == f'Worker(port={worker.port}, tags=["x", "y"], auth=false)'


def test_info_is_the_capability_summary(worker: Worker) -> None:
    summary = worker.info()
    assert SUMMARY.match(summary), summary
    assert summary.endswith('tags: ["cpu", "x", "y"]')
    with _OPENER.open(f"http://127.0.0.1:{worker.port}/info", timeout=5) as response:
        info = json.loads(response.read())
    assert info["worker_id"] == "emb-1" and info["capabilities"]["tags"] == ["cpu", "x", "y"]


def test_info_before_start_detects_capabilities() -> None:
    assert SUMMARY.match(Worker(port=0, tags=["z"]).info())


def test_starting_twice_is_refused(worker: Worker) -> None:
    with pytest.raises(SomaError, match="already serving"):
        worker.start()


def test_set_data_store_applies_to_a_running_worker(worker: Worker, tmp_path: Path) -> None:
    (tmp_path / "v.json").write_text(json.dumps({"type": "Json", "data": 7}))
    url = f"http://127.0.0.1:{worker.port}/download?ref=" + urllib.parse.quote(
        json.dumps({"type": "Local", "path": str(tmp_path / "v.json")})
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        _OPENER.open(url, timeout=5)
    caught.value.close()
    assert caught.value.code == 403
    worker.set_data_store("local", path=tmp_path)
    with _OPENER.open(url, timeout=5) as response:
        assert json.loads(response.read()) == {"type": "Json", "data": 7}


# --------------------------------------------------------------------------- start and stop


def test_the_context_manager_stops_the_worker(tmp_path: Path) -> None:
    with Worker(port=0, **_dirs(tmp_path, "cm")) as worker:
        url = f"http://127.0.0.1:{worker.port}"
        assert _health(url) == 200
    with pytest.raises(urllib.error.URLError):
        _health(url)
    worker.stop()  # idempotent


def test_start_raises_bind_failures_as_remote_errors(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RemoteError) as caught:
            Worker(port=port, **_dirs(tmp_path, "bind")).start()
    assert isinstance(caught.value.__cause__, BindError)
    assert f"cannot bind 127.0.0.1:{port}" in str(caught.value)


def test_start_raises_when_another_worker_owns_the_temp_dir(
    worker: Worker, shared_dirs: Dirs, tmp_path: Path
) -> None:
    with pytest.raises(RemoteError) as caught:
        Worker(port=0, temp_dir=shared_dirs["temp_dir"], work_dir=tmp_path / "w").start()
    assert isinstance(caught.value.__cause__, StoreLocked)
    assert "in use by another worker" in str(caught.value)
    assert _health(f"http://127.0.0.1:{worker.port}") == 200


def test_shutdown_message_stops_a_started_worker_without_touching_the_host(tmp_path: Path) -> None:
    from soma.wire import v2
    from soma.wire.messages import Ack, Hello, Shutdown

    worker = Worker(port=0, **_dirs(tmp_path, "bye")).start()
    url = f"http://127.0.0.1:{worker.port}"

    async def shutdown() -> object:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws", protocols=("soma.v2",)) as ws:
            await ws.send_bytes(v2.encode_frame(Hello(id="h", client={})))
            await ws.receive(timeout=10)
            await ws.send_bytes(v2.encode_frame(Shutdown(id="s", reason="done")))
            return v2.decode((await ws.receive(timeout=10)).data, "client")

    assert isinstance(asyncio.run(shutdown()), Ack)
    assert _wait_down(url)  # stopped by the message alone
    worker.stop(timeout=1.0)  # the thread already ended: returns at once, raises nothing


SERVE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, threading, urllib.request
    import aiohttp
    from soma import Worker
    from soma.wire.codec import Codec
    from soma.wire.messages import Hello, Shutdown

    port, temp = int(sys.argv[1]), sys.argv[2]

    async def shutdown():
        codec = Codec("v2", side="client")
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws", protocols=("soma.v2",))
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            await ws.send_bytes(codec.encode(Hello(id="h", client={})))
            await ws.receive()
            await ws.send_bytes(codec.encode(Shutdown(id="s")))
            print("reply", type(codec.decode((await ws.receive()).data)).__name__, flush=True)
            await ws.close()

    threading.Thread(target=asyncio.run, args=(shutdown(),)).start()
    Worker(port=port, temp_dir=temp + "/a", work_dir=temp + "/w").serve()
    print("serve returned", flush=True)
    with Worker(port=port, temp_dir=temp + "/b", work_dir=temp + "/w") as again:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        print("second worker", opener.open(f"http://127.0.0.1:{again.port}/health").read().decode(), flush=True)
    print("host alive", flush=True)
    """
)


def test_serve_returns_after_shutdown_and_the_same_port_serves_again(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, str(port), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["reply Ack", "serve returned", "second worker ok", "host alive"]
