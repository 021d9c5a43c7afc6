"""The child pool: reuse per key, reset between tenants, retirement, pinning, close, no orphans."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest

from soma.errors import SomaConfigError, SomaError
from soma.isolation import pool as pool_module
from soma.isolation.failures import ChildFailure
from soma.isolation.pool import Pool, default_pool
from soma.isolation.process import Child
from soma.isolation.spec import ChildSpec

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Identity:
    _kind = "stateless"

    def fit(self, x: Any, y: Any = None) -> None:
        return None

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Sleeper(Identity):
    def forward(self, x: Any, state: Any) -> Any:
        time.sleep(60)


def load(child: Child, node_id: str, obj: Any = None) -> None:
    entry = {
        "id": node_id,
        "pickle": cloudpickle.dumps(obj or Identity()),
        "trainable": False,
        "differentiable": False,
    }
    child.call("LOAD", timeout=30, filters=[entry], runtime=None, seed=None)


def forward(child: Child, node_id: str, data: Any) -> Any:
    return child.call("FORWARD", timeout=30, node_id=node_id, data=data)["result"]


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(max_idle=4)
    yield p
    p.close()


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def test_sequential_plans_reuse_one_child_and_are_isolated(pool: Pool) -> None:
    """isolation.md §10 item 9."""
    with pool.checkout(ChildSpec()) as child:
        load(child, "first")
        assert forward(child, "first", 1) == 1
        pid = child.pid
    assert pool.stats().idle == 1
    with pool.checkout(ChildSpec()) as child:
        assert child.pid == pid
        with pytest.raises(ChildFailure) as info:
            forward(child, "first", 1)
        assert info.value.code == "unknown_node"
    stats = pool.stats()
    assert (stats.idle, stats.busy, stats.spawned) == (1, 0, 1)


def test_children_are_pooled_per_key_and_handed_out_newest_first(pool: Pool) -> None:
    plain, other = ChildSpec(), ChildSpec(env_key="other")
    with (
        pool.checkout(plain) as a,
        pool.checkout(plain) as b,
        pool.checkout(other) as c,
    ):
        pids = (a.pid, b.pid, c.pid)
        assert len(set(pids)) == 3
        assert pool.stats().busy == 3
    # b was returned before a, so a is the newest idle child of the key.
    with pool.checkout(plain) as again:
        assert again.pid == pids[0]
    with pool.checkout(other) as again:
        assert again.pid == pids[2]


def test_a_child_is_replaced_after_max_tasks(pool: Pool) -> None:
    """isolation.md §10 item 27 (first half)."""
    pool.max_tasks = 2
    pids = []
    for _ in range(3):
        with pool.checkout(ChildSpec()) as child:
            pids.append(child.pid)
    assert pids[0] == pids[1] != pids[2]
    assert pool.stats().kills == {"max_tasks": 1}
    assert (
        not psutil.pid_exists(pids[0])
        or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
    )


def test_idle_children_beyond_max_idle_are_retired_oldest_first() -> None:
    with Pool(max_idle=2) as pool:
        pool.prewarm(ChildSpec(), 2)
        with pool.checkout(ChildSpec(env_key="b")) as newest:
            pid = newest.pid
        stats = pool.stats()
        assert stats.idle == 2 and stats.kills == {"max_idle": 1}
        with pool.checkout(ChildSpec(env_key="b")) as child:
            assert child.pid == pid


def test_janitor_retires_children_idle_past_the_ttl() -> None:
    with Pool(idle_ttl=0.3, janitor_interval=0.05) as pool:
        pool.prewarm(ChildSpec(), 1)
        wait_for(lambda: pool.stats().idle == 0)
        assert pool.stats().kills == {"idle_ttl": 1}


def test_janitor_retires_idle_children_above_the_rss_limit() -> None:
    with Pool(max_idle_rss=1 << 20, janitor_interval=0.05) as pool:
        pool.prewarm(ChildSpec(), 1)
        wait_for(lambda: pool.stats().idle == 0)
        assert pool.stats().kills == {"idle_rss": 1}


def test_a_failed_child_is_discarded_not_pooled(pool: Pool) -> None:
    with pool.checkout(ChildSpec()) as child:
        child.kill("cancelled")
        first = child.pid
    assert pool.stats().idle == 0 and pool.stats().kills == {"cancelled": 1}
    with pool.checkout(ChildSpec()) as child:
        assert child.pid != first and child.alive


def test_an_exception_in_the_block_still_returns_a_healthy_child(pool: Pool) -> None:
    with pytest.raises(KeyError), pool.checkout(ChildSpec()) as child:
        load(child, "a")
        raise KeyError("caller bug")
    assert pool.stats().idle == 1


def test_pinned_child_stays_with_its_session_until_killed(pool: Pool) -> None:
    with pool.checkout(ChildSpec()) as child:
        load(child, "kept")
        pool.pin(child)
    assert pool.stats().pinned == 1 and pool.stats().idle == 0
    assert forward(child, "kept", "state survives") == "state survives"
    with pool.checkout(ChildSpec()) as other:
        assert other.pid != child.pid
    pool.kill_pinned(child, "session_idle")
    assert not child.alive
    assert pool.stats().pinned == 0 and pool.stats().kills == {"session_idle": 1}
    with pytest.raises(SomaConfigError):
        pool.kill_pinned(child)


def test_close_kills_busy_children_and_fails_their_call(pool: Pool) -> None:
    errors: list[BaseException] = []
    started = threading.Event()

    def plan() -> None:
        try:
            with pool.checkout(ChildSpec()) as child:
                load(child, "s", Sleeper())
                started.set()
                forward(child, "s", 1)
        except ChildFailure as exc:
            errors.append(exc)

    thread = threading.Thread(target=plan)
    thread.start()
    assert started.wait(30)
    time.sleep(0.2)
    pool.close()
    thread.join(10)
    assert [e.code for e in errors] == ["cancelled"]  # type: ignore[attr-defined]
    with pytest.raises(SomaError, match="closed"), pool.checkout(ChildSpec()):
        pass


def test_concurrent_checkouts_each_get_their_own_child(pool: Pool) -> None:
    pids: list[int] = []
    lock = threading.Lock()

    def plan(i: int) -> None:
        with pool.checkout(ChildSpec()) as child:
            load(child, f"n{i}")
            assert forward(child, f"n{i}", i) == i
            with lock:
                pids.append(child.pid)
            time.sleep(0.3)

    threads = [threading.Thread(target=plan, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(pids)) == 3
    assert pool.stats().idle == 3


def test_default_pool_is_shared_unrestricted_and_renewed_after_close() -> None:
    first = default_pool()
    try:
        assert default_pool() is first and not first.restricted
    finally:
        first.close()
    second = default_pool()
    try:
        assert second is not first and not second.closed
    finally:
        second.close()
    assert pool_module._default_pool is second


def test_pool_limits_are_validated() -> None:
    with pytest.raises(SomaConfigError):
        Pool(max_tasks=0)
    with pytest.raises(SomaConfigError):
        Pool(idle_ttl=0)


def running(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


_OWNER = textwrap.dedent(
    """
    import sys, time
    from soma.isolation.pool import Pool
    from soma.isolation.spec import ChildSpec

    spec = ChildSpec(work_root=sys.argv[1])
    pool = Pool()
    pool.prewarm(spec, 2)
    busy = pool.checkout(spec)
    child = busy.__enter__()
    print(child.pid, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_no_child_outlives_a_parent_killed_by(signum: int, tmp_path: Path) -> None:
    """isolation.md §10 item 27 (second half): prewarmed and busy children both die with the parent."""
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        busy_pid = int(owner.stdout.readline())
        pids = {p.pid for p in psutil.Process(owner.pid).children()}
        assert busy_pid in pids and len(pids) == 2
        owner.send_signal(signum)
        owner.wait(10)
        wait_for(lambda: not any(running(pid) for pid in pids))
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
