"""``Graph.shutdown_worker`` / ``shutdown_workers`` (worker spec §9 item 36, api.md §4.6)."""

from __future__ import annotations

import time

import pytest

from soma import Graph, Lab, Worker
from soma.errors import RemoteError, SomaWarning


def wait_until_down(worker: Worker, limit: float = 15.0) -> None:
    lab = Lab(f"http://127.0.0.1:{worker.port}", timeout=1.0)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if lab.health() != "ok":
                return
        except ConnectionError:
            return
        time.sleep(0.1)
    pytest.fail(f"worker on port {worker.port} still serving {limit} s after Shutdown")


def test_shutdown_worker_returns_at_once_and_the_worker_stops() -> None:
    worker = Worker(port=0, token="shutdown-token-0123456789").start()
    try:
        graph = Graph()
        graph.add_worker(worker.address, token="shutdown-token-0123456789")
        start = time.monotonic()
        graph.shutdown_worker(worker.address, reason="test")
        assert time.monotonic() - start < 2.0
        wait_until_down(worker)
    finally:
        worker.stop()


def test_shutdown_without_the_registered_token_is_refused() -> None:
    with Worker(port=0, token="shutdown-token-0123456789") as worker:
        start = time.monotonic()
        with pytest.raises(RemoteError) as info:
            Graph().shutdown_worker(worker.address)
        assert time.monotonic() - start < 2.0
        assert info.value.code == "unauthorized"
        assert Lab(f"http://127.0.0.1:{worker.port}").health() == "ok"


def test_shutdown_of_an_unreachable_worker_raises_within_two_seconds(free_port: int) -> None:
    start = time.monotonic()
    with pytest.raises(RemoteError):
        Graph().shutdown_worker(f"127.0.0.1:{free_port}")
    assert time.monotonic() - start < 2.0


def test_shutdown_workers_reports_failures_in_one_warning(free_port: int) -> None:
    worker = Worker(port=0).start()
    try:
        graph = Graph()
        graph.add_worker(f"ws://127.0.0.1:{free_port}")
        graph.add_worker(worker.address)
        with pytest.warns(SomaWarning, match=rf"1 worker\(s\) could not be shut down: ws://127.0.0.1:{free_port}"):
            graph.shutdown_workers(reason="test")
        wait_until_down(worker)
    finally:
        worker.stop()
