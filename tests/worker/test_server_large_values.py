"""Large values on a real worker: upload reuse (HEAD /download), same-host downloads by path, mapping."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from _server_support import running, worker_config
from aiohttp.test_utils import make_mocked_request

from soma.client.async_client import AsyncRemoteClient
from soma.errors import RemoteError
from soma.wire import v2
from soma.wire.messages import CachedRef
from soma.worker.server import V2_CONTENT_TYPE, V2_PATH_CONTENT_TYPE, _wants_path

TOKEN = "large-values-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _ref(key: str) -> dict[str, str]:
    return {"ref": json.dumps({"type": "Cached", "cache_key": key})}


async def _upload(http: aiohttp.ClientSession, url: str, value: Any) -> str:
    frame = v2.encode_value_frame(value)
    headers = {**AUTH, "Content-Type": V2_CONTENT_TYPE}
    async with http.post(f"{url}/upload", data=io.BytesIO(frame), headers=headers) as response:
        assert response.status == 200
        return str((await response.json())["cache_key"])


async def test_head_download_says_whether_a_value_is_stored_without_sending_it(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running(worker_config(tmp_path, token=TOKEN)) as server:
        key = await _upload(http, server.url, np.arange(200_000, dtype=np.float64))
        headers = {**AUTH, "Accept": V2_CONTENT_TYPE}
        async with http.head(f"{server.url}/download", params=_ref(key), headers=headers) as response:
            assert response.status == 200 and await response.read() == b""
        async with http.head(f"{server.url}/download", params=_ref("0" * 64), headers=headers) as response:
            assert response.status == 404
        async with http.get(f"{server.url}/metrics", headers=AUTH) as response:
            metrics = await response.text()
    assert "soma_worker_bytes_sent_total 0.0" in metrics  # a HEAD sends no body


async def test_a_same_host_client_is_told_where_the_frame_lies(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    value = np.arange(150_000, dtype=np.int64)
    async with running(worker_config(tmp_path, token=TOKEN)) as server:
        key = await _upload(http, server.url, value)
        accept = {**AUTH, "Accept": f"{V2_PATH_CONTENT_TYPE}, {V2_CONTENT_TYPE};q=0.9"}
        async with http.get(f"{server.url}/download", params=_ref(key), headers=accept) as response:
            assert response.status == 200 and response.content_type == V2_PATH_CONTENT_TYPE
            where = await response.json(content_type=V2_PATH_CONTENT_TYPE)
        assert Path(where["path"]).read_bytes() == v2.encode_value_frame(value)
        assert where["size"] == Path(where["path"]).stat().st_size
        # Without the path form in Accept, the frame itself comes, as for any client.
        async with http.get(f"{server.url}/download", params=_ref(key), headers={**AUTH, "Accept": V2_CONTENT_TYPE}) as r:
            assert r.content_type == V2_CONTENT_TYPE
            np.testing.assert_array_equal(v2.decode_value_frame(await r.read(), "client"), value)


@pytest.mark.parametrize(("peer", "expected"), [("127.0.0.1", True), ("::1", True), ("10.1.2.3", False)])
def test_only_a_loopback_peer_is_answered_with_a_path(peer: str, expected: bool) -> None:
    class Transport:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return (peer, 50000) if name == "peername" else default

    accept = {"Accept": f"{V2_PATH_CONTENT_TYPE}, {V2_CONTENT_TYPE};q=0.9"}
    request = make_mocked_request("GET", "/download", headers=accept, transport=Transport())
    assert _wants_path(request) is expected
    plain = make_mocked_request("GET", "/download", headers={"Accept": V2_CONTENT_TYPE}, transport=Transport())
    assert not _wants_path(plain)


async def test_the_client_maps_a_same_host_download_copy_on_write(tmp_path: Path) -> None:
    value = np.random.default_rng(3).standard_normal((700, 400))
    async with running(worker_config(tmp_path, token=TOKEN)) as server:
        client = AsyncRemoteClient(server.url, TOKEN)
        try:
            ref = await client.upload(value)
            again = await client.upload(value.copy())  # the worker still holds it: not sent again
            back = await client.download(ref)
            stored = Path(server.state.store.path_for(ref.cache_key)).read_bytes()  # type: ignore[union-attr]
        finally:
            await client.close()
    assert again == ref
    np.testing.assert_array_equal(back, value)
    assert back.flags.writeable and not back.flags.owndata
    back[:] = 0.0  # a private copy: the worker's stored frame is unchanged
    assert stored == v2.encode_value_frame(value)


async def test_a_path_the_client_cannot_open_falls_back_to_receiving_the_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import soma.client.async_client as core

    monkeypatch.setattr(core, "_mapped", lambda document: None)  # as on the far side of an SSH tunnel
    value = [0.5, 1.5] * 100_000
    async with running(worker_config(tmp_path, token=TOKEN)) as server:
        client = AsyncRemoteClient(server.url, TOKEN)
        try:
            ref = await client.upload(value)
            assert await client.download(ref) == value
            with pytest.raises(RemoteError, match="unresolved"):
                await client.download(CachedRef(cache_key="0" * 64))
        finally:
            await client.close()
