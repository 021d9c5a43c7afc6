"""Children that crash, hang, bloat or corrupt their channel: each a named failure, never a hang."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import psutil
import pytest

from soma.errors import ChildError, ChildTimeoutError
from soma.isolation.failures import ChildFailure, failure_to_error
from soma.isolation.limits import MemoryWatch
from soma.isolation.pool import Pool
from soma.isolation.process import Child
from soma.isolation.spec import ChildSpec

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Scripted:
    """A filter whose ``fit`` and ``forward`` run ``action(x)``."""

    _kind = "trainable"

    def __init__(self, action: Any) -> None:
        self.action = action

    def fit(self, x: Any, y: Any = None) -> Any:
        return self.action(x)

    def forward(self, x: Any, state: Any) -> Any:
        return self.action(x)


def load(child: Child, action: Any) -> None:
    entry = {
        "id": "n",
        "pickle": cloudpickle.dumps(Scripted(action)),
        "trainable": True,
        "differentiable": False,
    }
    child.call("LOAD", timeout=30, filters=[entry], runtime=None, seed=None)


def echo(x: Any) -> Any:
    return x


def sigkill_self(x: Any) -> Any:
    os.kill(os.getpid(), signal.SIGKILL)


def exit_hard(x: Any) -> Any:
    os._exit(3)


def spin_forever(x: Any) -> Any:
    import subprocess

    # A grandchild in the same process group: a timeout must take it down too.
    subprocess.Popen(["sleep", "60"])
    while True:
        pass


def sleep_long(x: Any) -> Any:
    time.sleep(60)


def allocate(x: Any) -> Any:
    blocks = []
    for _ in range(40):
        blocks.append(b"\x01" * (10 << 20))
        time.sleep(0.05)
    return len(blocks)


def write_garbage(x: Any) -> Any:
    reply_fd = int(sys.argv[sys.argv.index("--fds") + 1].split(",")[1])
    os.write(reply_fd, b"this is not a frame" * 8)
    return x


@pytest.fixture
def pool() -> Iterator[Pool]:
    with Pool(restricted=True, max_idle=2) as p:
        yield p


def assert_group_gone(pgid: int) -> None:
    end = time.monotonic() + 5
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process group {pgid} is still alive")


def test_sigkill_inside_forward_is_a_crash_reported_within_a_second(pool: Pool) -> None:
    """isolation.md §10 item 20."""
    with pool.checkout(ChildSpec()) as child:
        load(child, sigkill_self)
        start = time.monotonic()
        with pytest.raises(ChildFailure) as info:
            child.call("FORWARD", timeout=30, node_id="n", data=1)
        assert time.monotonic() - start < 1.0
        dead_pid = child.pid
    failure = info.value
    assert failure.code == "child_crashed" and failure.details["signal"] == "SIGKILL"
    assert (
        "possibly killed by the kernel OOM killer or the memory watch"
        in failure.message
    )
    assert "FORWARD on node `n`" in failure.message
    error = failure_to_error(failure, where="subprocess", phase="forward")
    assert (
        isinstance(error, ChildError) and error.signal == "SIGKILL" and error.retryable
    )
    with pool.checkout(ChildSpec()) as child:
        assert child.pid != dead_pid
        load(child, echo)
        assert child.call("FORWARD", timeout=30, node_id="n", data=2)["result"] == 2
    assert pool.stats().kills.get("child_crashed") == 1


def test_exit_inside_fit_names_the_exit_code() -> None:
    child = Child.spawn(ChildSpec())
    try:
        load(child, exit_hard)
        with pytest.raises(ChildFailure) as info:
            child.call("FIT", timeout=30, node_id="n", data=1)
    finally:
        child.shutdown()
    assert info.value.code == "child_crashed"
    assert info.value.details["exit_code"] == 3 and info.value.details["signal"] is None
    assert "exited with code 3 while running FIT" in info.value.message


def test_endless_loop_times_out_and_the_whole_group_is_killed(pool: Pool) -> None:
    """isolation.md §10 item 21."""
    with pool.checkout(ChildSpec()) as child:
        load(child, spin_forever)
        start = time.monotonic()
        with pytest.raises(ChildFailure) as info:
            child.call("FIT", timeout=2, node_id="n", data=1)
        elapsed = time.monotonic() - start
        pgid = child.pid
    assert 2 <= elapsed < 4
    assert info.value.code == "timeout"
    assert info.value.details["rss"] > 1 << 20, "RSS at the kill is reported"
    assert "FIT on node `n` ran past its 2 s limit" in info.value.message
    assert_group_gone(pgid)
    error = failure_to_error(info.value, where="subprocess", phase="fit")
    assert isinstance(error, ChildTimeoutError) and error.code == "timeout"
    with pool.checkout(ChildSpec()) as child:
        assert child.alive


def test_kill_from_another_thread_fails_the_call_in_flight(pool: Pool) -> None:
    with pool.checkout(ChildSpec()) as child:
        load(child, sleep_long)
        timer = threading.Timer(
            0.5,
            child.kill,
            args=("cancelled",),
            kwargs={"detail": "plan p1 was cancelled"},
        )
        timer.start()
        start = time.monotonic()
        with pytest.raises(ChildFailure) as info:
            child.call("FORWARD", timeout=30, node_id="n", data=1)
        timer.join()
    assert time.monotonic() - start < 3
    assert (
        info.value.code == "cancelled" and "plan p1 was cancelled" in info.value.message
    )
    assert pool.stats().kills == {"cancelled": 1}


def test_allocation_beyond_the_child_memory_limit(pool: Pool) -> None:
    """isolation.md §10 item 22: the watch kills the child, the parent stays up."""
    watch = MemoryWatch(interval=0.1)
    assert watch.start()
    pool.memory_watch = watch
    try:
        with pool.checkout(ChildSpec(memory_limit=150 << 20)) as child:
            load(child, allocate)
            with pytest.raises(ChildFailure) as info:
                child.call("FORWARD", timeout=30, node_id="n", data=1)
    finally:
        watch.stop()
    failure = info.value
    assert failure.code == "memory_limit"
    assert "above the child memory limit 150.0 MiB" in failure.message
    assert failure.details["rss"] > 150 << 20
    error = failure_to_error(failure, where="subprocess")
    assert type(error) is ChildError and error.rss == failure.details["rss"]
    with pool.checkout(ChildSpec()) as child:
        load(child, echo)
        assert (
            child.call("FORWARD", timeout=30, node_id="n", data="ok")["result"] == "ok"
        )


def test_garbage_on_the_reply_pipe_is_a_protocol_error(pool: Pool) -> None:
    """isolation.md §10 item 24."""
    with pool.checkout(ChildSpec()) as child:
        load(child, write_garbage)
        with pytest.raises(ChildFailure) as info:
            child.call("FORWARD", timeout=30, node_id="n", data=1)
        pgid = child.pid
    assert info.value.code == "child_protocol_error"
    assert "bad frame magic" in info.value.message
    assert_group_gone(pgid)
    with pool.checkout(ChildSpec()) as child:
        load(child, echo)
        assert child.call("FORWARD", timeout=30, node_id="n", data=[1])["result"] == [1]


def test_a_child_that_dies_while_idle_is_not_handed_out(pool: Pool) -> None:
    with pool.checkout(ChildSpec()) as child:
        first = child.pid
    os.kill(first, signal.SIGKILL)
    end = time.monotonic() + 5
    while (
        psutil.Process(first).status() != psutil.STATUS_ZOMBIE
        and time.monotonic() < end
    ):
        time.sleep(0.02)
    with pool.checkout(ChildSpec()) as child:
        assert child.pid != first
        load(child, echo)
        assert child.call("FORWARD", timeout=30, node_id="n", data=1)["result"] == 1
