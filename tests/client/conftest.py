"""Client fixtures: one embedded worker per test module, and a leak check that knows about it.

The embedded worker's filter children are children of the test process that outlive
single tests by design (the worker pools them). The leak check below lets children of
a live module worker pass and checks instead, when the worker stops, that none is left.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest

from soma import Worker
from soma.client.sync_client import close_all

TOKEN = "client-tests-token-0123456789"
_live_workers: list[Worker] = []


def _worker_child(proc: psutil.Process) -> bool:
    try:
        return proc.ppid() == os.getpid() and any("soma.isolation.daemon" in part for part in proc.cmdline())
    except psutil.Error:
        return False


def _check_gone(before: set[int], *, allow_worker_children: bool) -> None:
    me = psutil.Process()
    leftover = [
        p
        for p in me.children(recursive=True)
        if p.pid not in before and not (allow_worker_children and _worker_child(p))
    ]
    if not leftover:
        return
    _, alive = psutil.wait_procs(leftover, timeout=5)
    if alive:
        for proc in alive:
            proc.kill()
        pytest.fail(f"test leaked child processes: {[p.pid for p in alive]}")


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Fail a test that leaves child processes running, except the pooled children of a live worker."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    _check_gone(before, allow_worker_children=bool(_live_workers))


@pytest.fixture(scope="module")
def worker_token() -> str:
    return TOKEN


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    """An embedded worker on a free loopback port with a token and two slots, stopped after the module."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = Worker(port=0, token=TOKEN, max_concurrent=2, worker_id="client-tests").start()
    _live_workers.append(started)
    try:
        yield started
    finally:
        _live_workers.remove(started)
        close_all()
        started.stop()
        _check_gone(before, allow_worker_children=False)
