"""The worker's HTTP routes over a loopback server (worker spec §4, checklist items 2, 6, 7, 8, 9)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from yarl import URL
from _server_support import running, worker_config

from soma.wire import v2
from soma.wire.messages import Ping

TOKEN = "s3cret-token-value-0123456789"
V2 = "application/vnd.soma.v2"

METRIC_NAMES = (
    "slots_total",
    "slots_busy",
    "queue_depth",
    "sessions",
    "requests_total",
    "plan_seconds",
    "children",
    "child_kills_total",
    "bytes_received_total",
    "bytes_sent_total",
    "store_bytes",
    "store_deleted_total",
    "env_builds_total",
    "cache_hits_total",
    "cache_misses_total",
    "memory_limit_bytes",
    "children_rss_bytes",
    "auth_failures_total",
)


class Opaque:
    """An object only wire v2 can carry (pickled by value into an ext-4 frame)."""

    def __init__(self, n: int) -> None:
        self.n = n


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --------------------------------------------------------------------------- status routes


async def test_health_answers_ok_as_text_then_503_draining(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path)) as server:
        url = server.url
        async with http.get(f"{url}/health") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert await response.text() == "ok"
        server.request_stop(0.0)
        async with http.get(f"{url}/health") as response:
            assert response.status == 503
            assert await response.text() == "draining"


async def test_info_is_a_register_document_with_exact_capabilities(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    config = worker_config(tmp_path, worker_id="w1", tags=("x",), max_concurrent=3, token=TOKEN)
    async with running(config) as server, http.get(f"{server.url}/info") as response:
        assert response.status == 200
        info = await response.json()
    assert info["type"] == "Register"
    assert info["worker_id"] == "w1"
    assert set(info["capabilities"]) == {"cpu_cores", "ram_bytes", "gpus", "python_envs", "tags"}
    assert info["capabilities"]["tags"] == ["cpu", "x"]
    assert info["protocols"] == [1, 2]
    assert info["auth"] is True
    assert info["max_concurrent"] == 3
    assert info["limits"]["max_concurrent"] == 3
    assert info["limits"]["threads_per_child"] == 1
    assert info["limits"]["memory_limit_bytes"] == int(0.9 * (8 << 30))
    assert info["gpu_devices"] == []
    assert info["started_at"].endswith("Z")
    assert set(info["load"]) >= {"cpu_usage", "memory_usage", "gpu_usage", "active_plans", "queue_depth", "timestamp"}
    assert info["load"]["free_slots"] == 3


async def test_unknown_paths_and_wrong_methods_get_json_errors(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path)) as server:
        url = server.url
        async with http.get(f"{url}/nowhere") as response:
            assert response.status == 404
            assert (await response.json())["error"] == "not_found"
        async with http.post(f"{url}/health") as response:
            assert response.status == 405
            body = await response.json()
            assert body["error"] == "method_not_allowed"
            assert "GET" in body["message"]
        async with http.get(f"{url}/upload") as response:
            assert response.status == 405


async def test_metrics_expose_every_spec_name_in_text_format(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path, max_concurrent=2)) as server:
        url = server.url
        async with http.post(f"{url}/upload", data=json.dumps({"type": "Json", "data": [1]})) as response:
            assert response.status == 200
        async with http.get(f"{url}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await response.text()
    for name in METRIC_NAMES:
        assert f"soma_worker_{name}" in text, name
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples["soma_worker_slots_total"]) == 2
    assert float(samples["soma_worker_slots_busy"]) == 0
    assert float(samples["soma_worker_bytes_received_total"]) > 0
    assert float(samples["soma_worker_store_bytes"]) > 0
    assert 'soma_worker_child_kills_total{reason="memory"}' in samples


# --------------------------------------------------------------------------- authentication


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[str]:
    async with running(worker_config(tmp_path, token=TOKEN)) as server:
        yield server.url


@pytest.mark.parametrize(("method", "path"), [("GET", "/metrics"), ("POST", "/upload"), ("GET", "/download")])
async def test_protected_routes_refuse_a_missing_or_wrong_token(
    secured: str, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        async with http.request(method, f"{secured}{path}", headers=headers) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="soma"'
            assert (await response.json())["error"] == "unauthorized"


async def test_websocket_is_refused_before_the_upgrade(secured: str, http: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await http.ws_connect(f"{secured}/ws", protocols=("soma.v2",))
    assert caught.value.status == 401
    async with http.ws_connect(f"{secured}/ws", headers={"Authorization": f"bearer {TOKEN}"}) as ws:
        await ws.send_str(json.dumps({"type": "Ping"}))
        assert json.loads((await ws.receive(timeout=10)).data) == {"type": "Pong"}


async def test_health_and_info_stay_open_with_a_token(secured: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{secured}/health") as response:
        assert response.status == 200
    async with http.get(f"{secured}/info") as response:
        assert response.status == 200


async def test_bearer_scheme_is_case_insensitive(secured: str, http: aiohttp.ClientSession) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        async with http.get(f"{secured}/metrics", headers={"Authorization": f"{scheme} {TOKEN}"}) as response:
            assert response.status == 200


async def test_query_token_works_with_one_warning_per_address(
    secured: str, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(3):
        async with http.get(f"{secured}/metrics", params={"token": TOKEN}) as response:
            assert response.status == 200
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "query" in r.getMessage()]
    assert len(warnings) == 1
    assert "Authorization: Bearer" in warnings[0].getMessage()


@pytest.mark.parametrize("token", ["a&b=c#d+e f%20g", "spaced token with + and &", "ünïcødé/?#&+"])
async def test_tokens_with_url_characters_work_by_header_and_query(
    tmp_path: Path, http: aiohttp.ClientSession, token: str
) -> None:
    async with running(worker_config(tmp_path, token=token)) as server:
        url = server.url
        async with http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
        quoted = urllib.parse.quote(token, safe="")
        async with http.get(URL(f"{url}/metrics?token={quoted}", encoded=True)) as response:
            assert response.status == 200
        async with http.get(URL(f"{url}/metrics?token={quoted}x", encoded=True)) as response:
            assert response.status == 401


async def test_the_token_never_reaches_the_logs(
    tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(worker_config(tmp_path, token=TOKEN, log_level="debug")) as server:
        url = server.url
        async with http.get(f"{url}/metrics", params={"token": TOKEN}) as response:
            assert response.status == 200
        async with http.get(f"{url}/metrics", params={"token": TOKEN + "x"}) as response:
            assert response.status == 401
        async with http.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200
        async with http.ws_connect(f"{url}/ws?token={TOKEN}") as ws:
            await ws.send_str("{not json")
            await ws.receive(timeout=10)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert TOKEN not in text
    access = [r.getMessage() for r in caplog.records if r.name == "soma.worker.access"]
    assert any("token=***" in line for line in access)


async def test_auth_failures_are_counted(secured: str, http: aiohttp.ClientSession) -> None:
    for _ in range(2):
        async with http.get(f"{secured}/metrics") as response:
            assert response.status == 401
    async with http.get(f"{secured}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        text = await response.text()
    assert "soma_worker_auth_failures_total 2.0" in text


# --------------------------------------------------------------------------- upload and download


def _ref(data: Mapping[str, object]) -> dict[str, str]:
    return {"ref": json.dumps(data)}


async def test_v1_json_upload_round_trips_and_deduplicates(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    body = json.dumps({"type": "Tensor", "data": {"values": [1.0, 2.5, -3.0], "shape": [3]}})
    async with running(worker_config(tmp_path)) as server:
        url = server.url
        async with http.post(f"{url}/upload", data=body, headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200
            first = await response.json()
        async with http.post(f"{url}/upload", data=body) as response:  # sniffed as JSON
            second = await response.json()
        assert first == second
        assert first["type"] == "Local"
        path = Path(first["path"])
        assert path.is_absolute() and path.suffix == ".json"
        assert path.read_text() == body
        async with http.get(f"{url}/download", params=_ref(first)) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json"
            assert await response.text() == body
        async with http.get(f"{url}/download", params=_ref(first), headers={"Accept": V2}) as response:
            assert response.status == 200
            assert v2.decode_value_frame(await response.read(), "client") == [1.0, 2.5, -3.0]


async def test_v2_frame_upload_round_trips_and_converts_to_v1(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    frame = v2.encode_value_frame({"x": array, "note": "é"})
    async with running(worker_config(tmp_path)) as server:
        url = server.url
        async with http.post(f"{url}/upload", data=frame, headers={"Content-Type": V2}) as response:
            assert response.status == 200
            ref = await response.json()
        async with http.post(f"{url}/upload", data=frame) as response:  # sniffed by magic
            assert await response.json() == ref
        assert ref["type"] == "Cached" and len(ref["cache_key"]) == 64 and ref["size"] == len(frame)
        async with http.get(f"{url}/download", params=_ref(ref), headers={"Accept": V2}) as response:
            assert response.headers["Content-Type"] == V2
            back = v2.decode_value_frame(await response.read(), "client")
        assert back["note"] == "é"
        np.testing.assert_array_equal(back["x"], array)
        assert back["x"].dtype == np.float32
        # The v1 form of a Cached key is 32 byte values.
        v1_ref = {"type": "Cached", "cache_key": list(bytes.fromhex(ref["cache_key"]))}
        async with http.get(f"{url}/download", params=_ref(v1_ref)) as response:
            assert response.status == 200
            value = await response.json()
        assert value["type"] == "Json"
        assert value["data"]["x"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


async def test_msgpack_upload_is_accepted(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    import msgpack

    body = msgpack.packb({"type": "Json", "data": {"a": 1}})
    async with running(worker_config(tmp_path)) as server:
        url = server.url
        async with http.post(f"{url}/upload", data=body, headers={"Content-Type": "application/msgpack"}) as response:
            assert response.status == 200
            ref = await response.json()
        assert ref["path"].endswith(".msgpack")
        async with http.get(f"{url}/download", params=_ref(ref)) as response:
            assert await response.json() == {"type": "Json", "data": {"a": 1}}


async def test_values_v1_cannot_carry_are_not_acceptable_as_json(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    import cloudpickle

    cloudpickle.register_pickle_by_value(__import__(__name__))
    async with running(worker_config(tmp_path)) as server:
        url = server.url
        for value in ([1.0, math.nan], {"obj": Opaque(3)}):
            frame = v2.encode_value_frame(value)
            async with http.post(f"{url}/upload", data=frame, headers={"Content-Type": V2}) as response:
                ref = await response.json()
            async with http.get(f"{url}/download", params=_ref(ref)) as response:
                assert response.status == 406
                assert V2 in (await response.json())["message"]
            async with http.get(f"{url}/download", params=_ref(ref), headers={"Accept": V2}) as response:
                assert response.status == 200
                assert await response.read() == frame


async def test_undecodable_uploads_are_refused_and_not_kept(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path)) as server:
        url = server.url
        bodies = [
            (b'{"type": "Tensor", "data": {"values": [1.0], "shape": [5]}}', "application/json"),
            (b"{not json", "application/json"),
            (b"SOMA\x02\x00\x00\x00\xff\xff\x00\x00", V2),
            (b"", "application/json"),
        ]
        for body, content_type in bodies:
            async with http.post(f"{url}/upload", data=body, headers={"Content-Type": content_type}) as response:
                assert response.status == 400, body
                assert (await response.json())["error"] == "bad_message"
    assert list((tmp_path / "temp" / "store").iterdir()) == []


async def test_oversized_uploads_get_413_by_length_and_while_streaming(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    body = json.dumps({"type": "Json", "data": "x" * 4000}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    async with running(worker_config(tmp_path, max_upload_bytes=1000)) as server:
        url = server.url
        async with http.post(f"{url}/upload", data=body) as response:
            assert response.status == 413
        async with http.post(f"{url}/upload", data=chunks()) as response:
            assert response.status == 413
            assert (await response.json())["error"] == "too_large"
        async with http.post(f"{url}/upload", data=json.dumps({"type": "Json", "data": 1})) as response:
            assert response.status == 200
    assert len(list((tmp_path / "temp" / "store").iterdir())) == 1


async def test_references_outside_the_stores_are_forbidden(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path)) as server:
        url = server.url
        store_dir = tmp_path / "temp" / "store"
        escape = store_dir / "escape.json"
        escape.symlink_to("/etc/passwd")
        for path in ("/etc/passwd", f"{store_dir}/../../../../etc/passwd", str(escape), "relative/path.json"):
            async with http.get(f"{url}/download", params=_ref({"type": "Local", "path": path})) as response:
                assert response.status == 403, path
                assert (await response.json())["error"] == "forbidden_path"


async def test_bad_missing_and_unsupported_references(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path)) as server:
        url = server.url
        async with http.get(f"{url}/download") as response:
            assert response.status == 400
        async with http.get(f"{url}/download", params={"ref": "{nope"}) as response:
            assert response.status == 400
        async with http.get(f"{url}/download", params=_ref({"type": "Cached", "cache_key": "xyz"})) as response:
            assert response.status == 400
        async with http.get(f"{url}/download", params=_ref({"type": "Cached", "cache_key": "0" * 64})) as response:
            assert response.status == 404
            body = await response.json()
            assert body["error"] == "unresolved_reference"
            assert "0" * 64 in body["message"] and str(tmp_path / "temp" / "store") in body["message"]
        s3 = {"type": "S3", "bucket": "b", "key": "k", "region": None}
        async with http.get(f"{url}/download", params=_ref(s3)) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "unsupported_reference"


async def test_data_store_files_are_served_read_only(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "matrix.npy", np.eye(2))
    (data / "value.json").write_text(json.dumps({"type": "Json", "data": [1, 2]}))
    async with running(worker_config(tmp_path, data_store=data)) as server:
        url = server.url
        ref = _ref({"type": "Local", "path": str(data / "matrix.npy")})
        async with http.get(f"{url}/download", params=ref, headers={"Accept": V2}) as response:
            np.testing.assert_array_equal(v2.decode_value_frame(await response.read(), "client"), np.eye(2))
        json_ref = _ref({"type": "Local", "path": str(data / "value.json")})
        async with http.get(f"{url}/download", params=json_ref) as response:
            assert await response.json() == {"type": "Json", "data": [1, 2]}
    assert sorted(os.listdir(data)) == ["matrix.npy", "value.json"]


async def test_idle_uploads_are_swept_after_the_ttl(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path, store_ttl=1.0, store_sweep=1.0)) as server:
        url = server.url
        async with http.post(f"{url}/upload", data=v2.encode_value_frame([1, 2, 3])) as response:
            ref = await response.json()
        stored = tmp_path / "temp" / "store" / f"{ref['cache_key']}.soma"
        assert stored.exists()
        for _ in range(30):
            if not stored.exists():
                break
            await asyncio.sleep(0.1)
        assert not stored.exists()
        async with http.get(f"{url}/metrics") as response:
            assert "soma_worker_store_deleted_total 1.0" in await response.text()


async def test_requests_are_counted_by_type_and_outcome(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    from _server_support import WireClient

    async with running(worker_config(tmp_path)) as server:
        url = server.url
        async with WireClient.connect(http, url) as client:
            await client.request(Ping(id="p1"))
            await client.request(Ping(id="p2"))
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
    assert 'soma_worker_requests_total{outcome="ok",type="Ping"} 2.0' in text
    assert 'soma_worker_requests_total{outcome="ok",type="Hello"} 1.0' in text


async def test_uploads_get_507_when_the_disk_is_nearly_full(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with running(worker_config(tmp_path)) as server:
        assert server.state.store is not None
        server.state.store.min_free_fraction = 1.01  # no disk is ever that free
        async with http.post(f"{server.url}/upload", data=json.dumps({"type": "Json", "data": 1})) as response:
            assert response.status == 507
            assert (await response.json())["error"] == "disk_low"
    assert list((tmp_path / "temp" / "store").iterdir()) == []


async def test_an_unusable_work_dir_fails_startup_and_releases_the_store(tmp_path: Path) -> None:
    from soma.errors import SomaConfigError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = worker_config(tmp_path, work_dir=blocker / "work")
    with pytest.raises(SomaConfigError, match="cannot create the work dir"):
        async with running(config):
            pass
    async with running(worker_config(tmp_path)) as server:  # the temp-dir lock was released
        assert server.state.store is not None
