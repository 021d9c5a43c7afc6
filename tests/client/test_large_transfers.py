"""Large values between the client and a worker: uploads reused while stored, downloads without copies."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import pytest
from _fake_worker import FakeWorker
from aiohttp import web

from soma.client.sync_client import RemoteClient
from soma.wire import v2
from soma.wire.messages import CachedRef


class CountingWorker(FakeWorker):
    """The scripted worker, counting the requests its store routes receive."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.requests: list[str] = []

    async def _upload(self, request: web.Request) -> web.Response:
        self.requests.append(request.method)
        return await super()._upload(request)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.method)
        return await super()._download(request)


@pytest.fixture
def worker() -> Iterator[CountingWorker]:
    fake = CountingWorker(token="secret-token-0123456789").start()
    yield fake
    fake.stop()


@pytest.fixture
def client(worker: CountingWorker) -> Iterator[RemoteClient]:
    remote = RemoteClient(worker.address, worker.token)
    yield remote
    remote.close()


def test_a_frame_the_worker_still_holds_is_not_uploaded_again(worker: CountingWorker, client: RemoteClient) -> None:
    array = np.arange(100_000, dtype=np.float64)
    first = client.upload_frame(v2.encode_value_frame_parts(array))
    second = client.upload_frame(v2.encode_value_frame_parts(array.copy()))
    assert second == first
    assert worker.requests == ["POST", "HEAD"]


def test_a_frame_the_worker_lost_is_uploaded_again(worker: CountingWorker, client: RemoteClient) -> None:
    parts = v2.encode_value_frame_parts([1.5] * 1000)
    ref = client.upload_frame(parts)
    worker.store.clear()  # swept, or a restarted worker on the same address
    again = client.upload_frame(parts)
    assert again == ref
    assert worker.requests == ["POST", "HEAD", "POST"]
    assert client.download(again) == [1.5] * 1000


def test_an_upload_is_found_by_its_content_digest_while_the_worker_holds_it(
    worker: CountingWorker, client: RemoteClient
) -> None:
    content = hashlib.sha256(b"the value's canonical encoding").digest()
    assert client.held_upload(content) is None and worker.requests == []  # never uploaded: no request
    ref = client.upload_frame(v2.encode_value_frame_parts([2.5] * 1000), content=content)
    assert client.held_upload(content) == ref
    assert worker.requests == ["POST", "HEAD"]
    worker.store.clear()
    assert client.held_upload(content) is None  # gone from the worker, and forgotten here
    assert client.held_upload(content) is None
    assert worker.requests == ["POST", "HEAD", "HEAD"]


def test_different_frames_are_each_uploaded(worker: CountingWorker, client: RemoteClient) -> None:
    one = client.upload_frame(v2.encode_value_frame_parts(np.zeros(1000)))
    two = client.upload_frame(v2.encode_value_frame_parts(np.ones(1000)))
    assert one != two
    assert worker.requests == ["POST", "POST"]
    assert client.download(two).tolist() == [1.0] * 1000


def test_a_large_download_decodes_to_a_writable_array_over_the_received_body(
    worker: CountingWorker, client: RemoteClient
) -> None:
    array = np.random.default_rng(0).standard_normal((600, 500))  # above the fake's upload limit
    frame = v2.encode_value_frame(array)
    key = hashlib.sha256(len(frame).to_bytes(8, "little") + frame).hexdigest()
    worker.store[key] = frame
    back = client.download(CachedRef(cache_key=key))
    assert back.flags.writeable and back.flags.c_contiguous
    assert not back.flags.owndata  # a view on the body as received: no copy was made
    np.testing.assert_array_equal(back, array)
    back[0, 0] = 42.0  # writable, as a local result is
