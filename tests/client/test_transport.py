"""The client transport against a scripted loopback worker (no real daemon)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from _fake_worker import FakeWorker

from soma.client.errors import error_from_reply
from soma.client.state import ClientState
from soma.client.timeout import Timeout
from soma.client.sync_client import RemoteClient, client_for, close_all
from soma.errors import (
    ChildError,
    ChildTimeoutError,
    FilterError,
    ProtocolError,
    RemoteError,
    RemoteTimeoutError,
    RowMismatchError,
)
from soma.wire.messages import AssignPlan, CachedRef, ErrorInfo, Event, PlanResult, SerializedPlan, make_error


@pytest.fixture
def fake() -> Iterator[FakeWorker]:
    worker = FakeWorker(token="secret-token-0123456789").start()
    yield worker
    worker.stop()


def plan(value: object = None, plan_id: str = "p1") -> AssignPlan:
    return AssignPlan(plan=SerializedPlan(plan_id=plan_id, plan={"type": "Execute", "node_id": "a"}, input=value))


def client(fake: FakeWorker, **timeouts: float) -> RemoteClient:
    return RemoteClient(fake.address, fake.token, timeout=Timeout(**timeouts))


def test_connect_returns_welcome_and_opens(fake: FakeWorker) -> None:
    with client(fake) as c:
        assert c.state.value == "idle"
        welcome = c.connect()
        assert welcome.worker_id == "fake"
        assert welcome.inline_threshold == fake.inline_threshold
        assert c.state is ClientState.OPEN
        hello = fake.seen[0]
        assert hello.type == "Hello" and hello.client["python"] and hello.client["cloudpickle"]
    assert c.state.value == "closed"
    with pytest.raises(RemoteError):
        c.connect()


def test_wrong_token_is_refused_as_unauthorized(fake: FakeWorker) -> None:
    with RemoteClient(fake.address, "not-the-token") as c, pytest.raises(RemoteError) as info:
        c.connect()
    assert info.value.code == "unauthorized"
    assert "not-the-token" not in str(info.value)


def test_worker_without_v2_subprotocol_is_too_old(fake: FakeWorker) -> None:
    fake.grant_v2 = False
    with client(fake) as c, pytest.raises(ProtocolError, match="worker too old"):
        c.connect()
    assert c.state is not ClientState.OPEN


def test_events_reach_the_calling_thread_in_order_before_the_reply(fake: FakeWorker) -> None:
    seen: list[tuple[str, str]] = []

    def on_frame(frame: object) -> None:
        assert isinstance(frame, Event)
        seen.append((frame.event["event_type"], threading.current_thread().name))

    with client(fake) as c:
        reply = c.request(plan([1.5, float("nan")]), on_frame=on_frame)
    assert isinstance(reply, PlanResult)
    output = reply.result.output  # type: ignore[union-attr]
    assert output[0] == 1.5 and np.isnan(output[1])
    me = threading.current_thread().name
    assert seen == [("NodeStarted", me), ("NodeCompleted", me)]


def test_requests_share_one_connection_concurrently(fake: FakeWorker) -> None:
    fake.delay = 0.5
    results: list[object] = []
    with client(fake) as c:
        c.connect()
        start = time.monotonic()
        threads = [threading.Thread(target=lambda i=i: results.append(c.request(plan(i, f"p{i}")))) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        elapsed = time.monotonic() - start
    assert sorted(r.result.output for r in results) == [0, 1, 2, 3]  # type: ignore[attr-defined]
    assert elapsed < 1.5
    assert fake.connections == 1


def test_a_silent_worker_is_lost_after_the_silence_limit(fake: FakeWorker) -> None:
    fake.behaviour = "silent"
    with client(fake, silence=0.5) as c:
        c.connect()
        start = time.monotonic()
        with pytest.raises(RemoteError) as info:
            c.request(plan())
        assert time.monotonic() - start < 2.0
        assert info.value.code == "worker_lost" and info.value.retryable
        assert c.state is ClientState.LOST


def test_heartbeats_keep_a_request_alive_until_its_deadline(fake: FakeWorker) -> None:
    fake.behaviour = "heartbeat"
    with client(fake, silence=0.5) as c:
        start = time.monotonic()
        with pytest.raises(RemoteTimeoutError):
            c.request(plan(), deadline=1.5)
        assert 1.4 < time.monotonic() - start < 3.0


def test_a_dropped_connection_fails_the_request_then_reconnects(fake: FakeWorker) -> None:
    fake.behaviour = "close"
    with client(fake) as c:
        with pytest.raises(RemoteError) as info:
            c.request(plan(1))
        assert info.value.code == "worker_lost"
        fake.behaviour = "ok"
        assert c.request(plan(2)).result.output == 2  # type: ignore[attr-defined]
        assert c.state is ClientState.OPEN
    assert fake.connections == 2


def test_an_undecodable_frame_is_a_protocol_error(fake: FakeWorker) -> None:
    fake.behaviour = "garbage"
    with client(fake) as c, pytest.raises(ProtocolError):
        c.request(plan())


def test_an_error_reply_raises_its_mapped_error(fake: FakeWorker) -> None:
    fake.behaviour = "error"
    with client(fake) as c, pytest.raises(RemoteError, match="remote: all slots taken") as info:
        c.request(plan())
    assert info.value.code == "busy" and info.value.retryable


def test_upload_and_download_round_trip_arrays(fake: FakeWorker) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    array[0, 0] = np.nan
    with client(fake) as c:
        ref = c.upload({"x": array, "t": (1, "a")})
        assert isinstance(ref, CachedRef) and len(ref.cache_key) == 64
        back = c.download(ref)
    assert back["t"] == (1, "a")
    assert back["x"].dtype == np.float32 and back["x"].flags.writeable
    np.testing.assert_array_equal(back["x"], array)


def test_a_failed_download_raises_never_none(fake: FakeWorker) -> None:
    with client(fake) as c, pytest.raises(RemoteError) as info:
        c.download(CachedRef(cache_key="0" * 64))
    assert info.value.code == "unresolved_reference"


def test_an_unreachable_worker_fails_fast(free_port: int) -> None:
    start = time.monotonic()
    with RemoteClient(f"ws://127.0.0.1:{free_port}") as c, pytest.raises(RemoteError) as info:
        c.connect()
    assert time.monotonic() - start < 5
    assert info.value.code == "worker_lost"


def test_a_worker_that_never_answers_the_upgrade_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepted by the kernel, never served
        port = listener.getsockname()[1]
        start = time.monotonic()
        with (
            RemoteClient(f"ws://127.0.0.1:{port}", timeout=Timeout(connect=0.5)) as c,
            pytest.raises(RemoteTimeoutError),
        ):
            c.connect()
        assert time.monotonic() - start < 3


def test_the_sync_client_works_inside_a_running_loop(fake: FakeWorker) -> None:
    async def main() -> object:
        with client(fake) as c:
            return c.request(plan(7)).result.output  # type: ignore[attr-defined]

    assert asyncio.run(main()) == 7


def test_shared_clients_are_keyed_by_address_and_token(fake: FakeWorker) -> None:
    try:
        a = client_for(fake.address, "t1")
        assert client_for(fake.address.replace("ws://", "http://"), "t1") is a
        assert client_for(fake.address, "t2") is not a
    finally:
        close_all()
    assert a.state is ClientState.CLOSED


# ---------------------------------------------------------------------------- error mapping

WHERE = "ws://10.0.0.1:8080"


def test_user_errors_become_filter_errors_with_the_remote_traceback() -> None:
    info = ErrorInfo(
        code="user_error",
        kind="Python",
        message="bad input",
        node_id="scaler",
        method="fit",
        python_type="KeyError",
        traceback="Traceback ...\nKeyError: 'bad input'",
    )
    error = error_from_reply(info, where=WHERE, phase="fit")
    assert isinstance(error, FilterError)
    assert str(error) == "Python fit() error: KeyError: bad input"
    assert error.node_id == "scaler" and error.phase == "fit" and error.code == "user_error"
    assert error.retryable is False and (error.remote_traceback or "").endswith("KeyError: 'bad input'")
    assert isinstance(error.__cause__, KeyError)
    custom = error_from_reply(
        ErrorInfo(
            code="user_error",
            kind="Python",
            message="Python forward() error: MyError: x",
            method="forward",
            python_type="MyError",
        ),
        where=WHERE,
    )
    assert str(custom) == "Python forward() error: MyError: x" and custom.__cause__ is None


def test_child_failures_name_the_worker() -> None:
    crashed = error_from_reply(
        make_error("child_crashed", "killed by SIGSEGV", details={"signal": "SIGSEGV", "rss": 123}), where=WHERE
    )
    assert type(crashed) is ChildError and crashed.where == WHERE and crashed.retryable
    assert crashed.signal == "SIGSEGV" and crashed.rss == 123
    memory = error_from_reply(
        ErrorInfo(code="memory_limit", kind="Resource", message="over 1 GiB", node_id="n"), where=WHERE
    )
    assert (
        type(memory) is ChildError and memory.code == "memory_limit" and memory.node_id == "n" and not memory.retryable
    )
    slow = error_from_reply(ErrorInfo(code="timeout", kind="Resource", message="ran past 2 s"), where=WHERE)
    assert isinstance(slow, ChildTimeoutError) and isinstance(slow, TimeoutError) and slow.where == WHERE


def test_protocol_and_other_codes_map_to_remote_errors() -> None:
    mismatch = error_from_reply(make_error("protocol_mismatch", "speaks [1, 2]"), where=WHERE)
    assert isinstance(mismatch, ProtocolError) and mismatch.code == "protocol_mismatch"
    rows = error_from_reply(make_error("row_mismatch", "x and y have different numbers of rows: 5 vs 4"), where=WHERE)
    assert (
        isinstance(rows, RowMismatchError)
        and (rows.x_rows, rows.y_rows) == (5, 4)
        and vars(rows)["code"] == "row_mismatch"
    )
    busy = error_from_reply(make_error("busy", "no slot"), where=WHERE, node_id="a")
    assert type(busy) is RemoteError and str(busy) == "remote: no slot"
    assert (busy.code, busy.retryable, busy.node_id) == ("busy", True, "a")
