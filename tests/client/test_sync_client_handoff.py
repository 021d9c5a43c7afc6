"""Hand-offs between the calling thread and the client loop thread (sync_client.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _fake_worker import FakeWorker

from soma.client import sync_client
from soma.client.sync_client import RemoteClient, _Mailbox
from soma.wire.messages import Event, Ping, Pong, Reply


@pytest.fixture
def fake() -> Iterator[FakeWorker]:
    worker = FakeWorker(token="secret-token-0123456789").start()
    yield worker
    worker.stop()


def _event(n: int) -> Event:
    return Event(worker_id="w", plan_id="p", event={"event_type": "NodeStarted", "n": n})


def test_an_open_client_connects_without_the_loop_thread(fake: FakeWorker, monkeypatch: Any) -> None:
    with RemoteClient(fake.address, fake.token) as client:
        welcome = client.connect()

        def no_loop() -> None:
            raise AssertionError("connect() went through the loop thread")

        monkeypatch.setattr(sync_client, "_loop", no_loop)
        assert client.connect() is welcome
        monkeypatch.undo()
        assert isinstance(client.request(Ping()), Pong)
    assert len([m for m in fake.seen if m.type == "Hello"]) == 1


def test_a_burst_of_frames_is_taken_in_one_wake_up_in_order() -> None:
    mailbox = _Mailbox()
    for n in range(50):
        mailbox.put(_event(n))
    mailbox.put(None)
    frames = mailbox.take()
    assert [f.event["n"] for f in frames[:-1]] == list(range(50))  # type: ignore[union-attr]
    assert frames[-1] is None


def test_frames_from_another_thread_arrive_all_and_in_order() -> None:
    mailbox = _Mailbox()
    count = 2_000

    def produce() -> None:
        for n in range(count):
            mailbox.put(_event(n))
            if n % 97 == 0:
                time.sleep(0.0005)  # let the consumer catch up and wait again
        mailbox.put(None)

    producer = threading.Thread(target=produce)
    producer.start()
    received: list[Reply] = []
    wake_ups = 0
    done = False
    while not done:
        wake_ups += 1
        for frame in mailbox.take():
            if frame is None:
                done = True
                break
            received.append(frame)
    producer.join()
    assert [f.event["n"] for f in received] == list(range(count))  # type: ignore[attr-defined]
    assert wake_ups < count
