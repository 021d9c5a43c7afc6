"""A worker that dies mid-plan, or cannot be reached, gives a typed error within a time limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _remote_filters as rf
import psutil
import pytest

from soma import Graph
from soma.errors import RemoteError


@pytest.fixture
def worker_process(free_port: int, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A ``soma-worker`` in its own process, ready to be killed (its store and work dirs go with ``tmp_path``)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from soma.worker.cli import main; sys.exit(main())",
            "--port",
            str(free_port),
            "--temp-dir",
            str(tmp_path / "temp"),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{free_port}/health", timeout=1) as response:
                if response.read() == b"ok":
                    break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("soma-worker did not become healthy")
            time.sleep(0.1)
    proc.port = free_port  # type: ignore[attr-defined]
    yield proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def test_a_worker_killed_mid_plan_fails_the_run_with_worker_lost(worker_process: subprocess.Popen[bytes]) -> None:
    graph = Graph()
    graph.add_worker(f"127.0.0.1:{worker_process.port}")  # type: ignore[attr-defined]
    graph.node("sleepy", rf.Sleeps(seconds=60))
    events: list[dict[str, Any]] = []
    graph.on_event(events.append)
    grandchildren: list[psutil.Process] = []

    def kill_when_running() -> None:
        worker = psutil.Process(worker_process.pid)
        while not any(e["event_type"] == "NodeStarted" for e in events):
            time.sleep(0.05)
        time.sleep(0.3)
        grandchildren.extend(worker.children(recursive=True))
        os.kill(worker_process.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        graph.fit(1)
    assert time.monotonic() - start < 20
    assert info.value.code == "worker_lost" and info.value.retryable
    kinds = [(e["event_type"], e.get("node_id")) for e in events]
    assert ("NodeStarted", "sleepy") in kinds
    assert kinds[-2:] == [("NodeFailed", "sleepy"), ("RunFailed", "sleepy")]
    assert info.value.node_id == "sleepy"
    assert not graph.fitted
    killer.join(5)
    # The worker's filter children die with it, whatever their process group.
    _, alive = psutil.wait_procs(grandchildren, timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive


def test_an_unreachable_worker_fails_fast(free_port: int) -> None:
    graph = Graph()
    graph.add_worker(f"127.0.0.1:{free_port}")
    graph.node(rf.Offset())
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        graph.fit([1.0])
    assert time.monotonic() - start < 12
    assert "cannot reach worker" in str(info.value)
    assert not graph.fitted


def test_a_worker_killed_mid_plan_names_the_node_to_a_graph_without_listeners(
    worker_process: subprocess.Popen[bytes],
) -> None:
    graph = Graph()
    graph.add_worker(f"127.0.0.1:{worker_process.port}")  # type: ignore[attr-defined]
    graph.node("sleepy", rf.Sleeps(seconds=60))
    grandchildren: list[psutil.Process] = []

    def kill_when_running() -> None:
        time.sleep(1.5)  # the plan is on its (prewarmed) child well before
        grandchildren.extend(psutil.Process(worker_process.pid).children(recursive=True))
        os.kill(worker_process.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    with pytest.raises(RemoteError) as info:
        graph.fit(1)
    assert info.value.code == "worker_lost" and info.value.node_id == "sleepy"
    killer.join(5)
    _, alive = psutil.wait_procs(grandchildren, timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive
