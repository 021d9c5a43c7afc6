"""Shared fixtures: free ports, and a check that no test leaks child processes."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psutil
import pytest


@pytest.fixture
def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Fail a test that leaves child processes of the test process running."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leftover = [p for p in me.children(recursive=True) if p.pid not in before]
    if not leftover:
        return
    _, alive = psutil.wait_procs(leftover, timeout=5)
    if alive:
        for proc in alive:
            proc.kill()
        pytest.fail(f"test leaked child processes: {[p.pid for p in alive]}")
