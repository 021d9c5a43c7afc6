"""One filter-daemon child driven from the parent: spawn, calls, output, errors, shutdown."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import numpy as np
import pytest

from soma.errors import (
    ChildError,
    ChildTimeoutError,
    FilterError,
    RowMismatchError,
    SomaConfigError,
    SomaError,
)
from soma.isolation.failures import ChildFailure, failure_to_error
from soma.isolation.markers import Opaque
from soma.isolation.process import Child
from soma.isolation.spec import ChildSpec

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Identity:
    _kind = "stateless"

    def fit(self, x: Any, y: Any = None) -> None:
        return None

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Scripted:
    """A stateless filter whose forward runs ``action(x)``: the way tests inject behaviour."""

    _kind = "stateless"

    def __init__(self, action: Any) -> None:
        self.action = action

    def fit(self, x: Any, y: Any = None) -> None:
        return None

    def forward(self, x: Any, state: Any) -> Any:
        return self.action(x)


class Box:
    """A user class the restricted parent must not unpickle."""

    def __init__(self, value: int) -> None:
        self.value = value


def load(child: Child, **filters: Any) -> dict[str, Any]:
    entries = [
        {
            "id": node_id,
            "pickle": cloudpickle.dumps(obj),
            "trainable": False,
            "differentiable": False,
        }
        for node_id, obj in filters.items()
    ]
    return child.call("LOAD", timeout=30, filters=entries, runtime=None, seed=None)


def forward(child: Child, node_id: str, data: Any, timeout: float = 30) -> Any:
    return child.call("FORWARD", timeout=timeout, node_id=node_id, data=data)["result"]


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child.spawn(ChildSpec())
    yield c
    c.shutdown()


def test_spawn_greets_with_versions_and_serves_arrays(child: Child) -> None:
    assert child.info["pid"] == child.pid
    assert child.info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert child.alive and child.rss() is not None
    load(child, a=Identity())
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    out = forward(child, "a", x)
    assert out.dtype == np.float32 and out.shape == (8, 2)
    np.testing.assert_array_equal(out, x)


def test_restricted_parent_receives_user_objects_as_opaque(child: Child) -> None:
    load(child, a=Scripted(lambda x: Box(x)))
    out = forward(child, "a", 7)
    assert isinstance(out, Opaque)
    assert cloudpickle.loads(out.data, buffers=out.buffers).value == 7


def test_unrestricted_parent_can_unpickle_replies() -> None:
    child = Child.spawn(ChildSpec(), restricted=False)
    try:
        load(child, a=Scripted(lambda x: {"k": np.float64(x)}))
        assert forward(child, "a", 2.5) == {"k": 2.5}
    finally:
        child.shutdown()


def test_environment_drops_soma_secrets_and_sets_child_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOMA_TOKEN", "secret")
    monkeypatch.setenv("SOMA_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("MKL_NUM_THREADS", "5")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spec = ChildSpec(threads=2, cuda_visible_devices="", extra_env={"MY_VAR": "1"})
    child = Child.spawn(spec)
    try:
        load(child, a=Scripted(lambda names: {n: os.environ.get(n) for n in names}))
        names = [
            "SOMA_TOKEN",
            "SOMA_LOG_LEVEL",
            "SOMA_CHILD",
            "PYTHONUNBUFFERED",
            "OMP_NUM_THREADS",
            "MKL_NUM_THREADS",
            "CUDA_VISIBLE_DEVICES",
            "MY_VAR",
            "PYTHONPATH",
        ]
        env = forward(child, "a", names)
    finally:
        child.shutdown()
    assert env["SOMA_TOKEN"] is None
    assert env["SOMA_LOG_LEVEL"] == "DEBUG"
    assert env["SOMA_CHILD"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["OMP_NUM_THREADS"] == "2" and env["MKL_NUM_THREADS"] == "5"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["MY_VAR"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == spec.pythonpath


def test_pool_key_names_interpreter_env_gpus_and_threads() -> None:
    spec = ChildSpec(
        env_key="e1", cuda_visible_devices="0", threads=4, memory_limit=1 << 30
    )
    assert spec.pool_key == (os.path.realpath(sys.executable), "e1", "0", 4)
    assert (
        spec.pool_key
        == ChildSpec(env_key="e1", cuda_visible_devices="0", threads=4).pool_key
    )
    with pytest.raises(SomaConfigError):
        ChildSpec(threads=0)
    with pytest.raises(SomaConfigError):
        ChildSpec(memory_limit=0)


def test_cwd_is_a_fresh_directory_removed_at_exit(tmp_path: Any) -> None:
    child = Child.spawn(ChildSpec(work_root=str(tmp_path)))
    load(child, a=Scripted(lambda _: os.getcwd()))
    cwd = forward(child, "a", None)
    assert os.path.dirname(cwd) == str(tmp_path) and os.path.basename(cwd).startswith(
        "child-"
    )
    assert os.path.isdir(cwd)
    child.shutdown()
    assert not os.path.exists(cwd)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only"
)
def test_cpu_affinity_is_applied_right_after_spawn() -> None:
    cpu = min(os.sched_getaffinity(0))
    child = Child.spawn(ChildSpec(cpu_affinity=frozenset({cpu})))
    try:
        assert os.sched_getaffinity(child.pid) == {cpu}
    finally:
        child.shutdown()


def noisy(x: Any) -> Any:
    for i in range(10_000):
        print(f"line {i}")
    os.write(1, b"raw fd write\n")
    logging.getLogger("user").error("to stderr")
    print("x" * (70 * 1024))
    return x


def test_output_of_user_code_never_corrupts_the_channel_and_is_logged(
    child: Child, caplog: pytest.LogCaptureFixture
) -> None:
    """isolation.md §10 item 7, and the 64 KiB line split."""
    seen: list[tuple[str, str]] = []
    child.on_output = lambda stream, line: seen.append((stream, line))
    child.plan_id = "plan-7"
    load(child, a=Scripted(noisy))
    with caplog.at_level(logging.INFO, logger="soma.worker.child"):
        assert forward(child, "a", [1, 2]) == [1, 2]
        end = time.monotonic() + 10
        while ("stderr", "to stderr") not in seen or len(seen) < 10_004:
            assert time.monotonic() < end, f"only {len(seen)} lines forwarded"
            time.sleep(0.01)
    stdout = [line for stream, line in seen if stream == "stdout"]
    assert stdout[:3] == ["line 0", "line 1", "line 2"] and "line 9999" in stdout
    assert "raw fd write" in stdout
    assert [len(line) for line in stdout[-2:]] == [64 * 1024, 6 * 1024]
    records = [r for r in caplog.records if r.name == "soma.worker.child"]
    assert any(r.getMessage().endswith("stdout: line 9999") for r in records)
    record = records[0]
    tags = (record.pid, record.plan_id, record.node_id)  # type: ignore[attr-defined]
    assert tags == (child.pid, "plan-7", "a")
    assert f"child {child.pid} plan=plan-7" in record.getMessage()
    assert child.output_tail("stdout")[-3] == "raw fd write"


def test_user_error_reply_keeps_the_child_and_maps_to_filter_error(
    child: Child,
) -> None:
    load(child, a=Scripted(lambda x: 1 / x), b=Identity())
    with pytest.raises(ChildFailure) as info:
        forward(child, "a", 0)
    failure = info.value
    assert failure.code == "user_error"
    assert failure.details["error"]["type"] == "ZeroDivisionError"
    assert failure.details["node_id"] == "a" and failure.details["command"] == "FORWARD"
    error = failure_to_error(failure, where="subprocess", phase="forward")
    assert isinstance(error, FilterError)
    assert str(error) == "Python forward() error: ZeroDivisionError: division by zero"
    assert (
        isinstance(error.original, ZeroDivisionError)
        and error.__cause__ is error.original
    )
    assert (
        error.remote_traceback is not None and "in <lambda>" in error.remote_traceback
    )
    assert error.node_id == "a" and error.phase == "forward"
    assert forward(child, "b", "still serving") == "still serving"


def test_system_exit_in_user_code_is_a_user_error(child: Child) -> None:
    """isolation.md §10 item 23."""
    load(child, a=Scripted(lambda x: sys.exit(3)), b=Identity())
    with pytest.raises(ChildFailure) as info:
        forward(child, "a", 0)
    assert info.value.code == "user_error"
    error = failure_to_error(info.value, where="subprocess", phase="forward")
    assert isinstance(error, FilterError) and error.original is None
    assert str(error) == "Python forward() error: SystemExit: 3"
    assert forward(child, "b", 1) == 1


def test_unknown_node_and_command_are_error_replies(child: Child) -> None:
    with pytest.raises(ChildFailure) as info:
        forward(child, "ghost", 1)
    assert info.value.code == "unknown_node"
    with pytest.raises(ChildFailure) as info:
        child.call("NOPE", timeout=5)
    assert info.value.code == "unknown_command"
    mapped = failure_to_error(info.value, where="subprocess", phase=None)
    assert type(mapped) is SomaError and mapped.code == "internal"  # type: ignore[attr-defined]
    load(child, a=Identity())
    assert forward(child, "a", 5) == 5


def test_unpicklable_request_fails_before_anything_is_sent(child: Child) -> None:
    load(child, a=Identity())
    with pytest.raises(ChildFailure) as info:
        forward(child, "a", threading.Lock())
    assert info.value.code == "encoding_error"
    assert child.alive
    assert forward(child, "a", 3) == 3


def test_progress_frames_reach_the_callback(child: Child) -> None:
    class Counter:
        _kind = "trainable"

        def fit(self, x: Any, y: Any = None) -> Any:
            return len(x)

        def partial_fit(self, x: Any, y: Any, state: Any) -> Any:
            return (state or 0) + len(x)

        def forward(self, x: Any, state: Any) -> Any:
            return state

    entry = {
        "id": "c",
        "pickle": cloudpickle.dumps(Counter()),
        "trainable": True,
        "differentiable": False,
    }
    child.call("LOAD", timeout=30, filters=[entry], runtime=None, seed=None)
    frames: list[dict[str, Any]] = []
    reply = child.call(
        "BATCHED_FIT",
        timeout=30,
        on_progress=frames.append,
        node_ids=["c"],
        data=[1, 2, 3, 4, 5],
        y=None,
        batch_size=2,
    )
    assert reply["result"] == 5
    assert [(f["batch"], f["n_batches"], f["rows"]) for f in frames] == [
        (1, 3, 2),
        (2, 3, 2),
        (3, 3, 1),
    ]


def test_bad_timeout_is_refused(child: Child) -> None:
    with pytest.raises(SomaConfigError):
        child.call("FORWARD", timeout=0, node_id="a", data=1)


def test_shutdown_exits_cleanly_and_is_idempotent(child: Child) -> None:
    child.shutdown()
    assert not child.alive
    assert child._process.returncode == 0
    child.shutdown()
    with pytest.raises(ChildFailure):
        child.call("FORWARD", timeout=1, node_id="a", data=1)


def test_nonexistent_interpreter_is_a_start_failure_naming_it() -> None:
    """isolation.md §10 item 18."""
    with pytest.raises(ChildFailure) as info:
        Child.spawn(ChildSpec(interpreter="/nonexistent/bin/python3"))
    assert info.value.code == "child_start_failed"
    assert "/nonexistent/bin/python3" in info.value.message
    error = failure_to_error(info.value, where="subprocess")
    assert (
        isinstance(error, ChildError)
        and error.code == "child_start_failed"
        and error.retryable
    )
    child = Child.spawn(ChildSpec())
    child.shutdown()


def test_interpreter_without_cloudpickle_names_the_missing_module(
    tmp_path: Any,
) -> None:
    """isolation.md §10 item 19: a bare venv has neither cloudpickle nor the dev packages."""
    import venv

    venv.EnvBuilder(with_pip=False, symlinks=True).create(tmp_path / "bare")
    interpreter = str(tmp_path / "bare" / "bin" / "python")
    with pytest.raises(ChildFailure) as info:
        Child.spawn(ChildSpec(interpreter=interpreter, start_timeout=20))
    failure = info.value
    assert failure.code == "child_start_failed"
    assert interpreter in failure.message
    assert "No module named 'cloudpickle'" in failure.message
    assert "cloudpickle" in failure.details["stderr_tail"]
    assert failure.details["exit_code"] not in (None, 0)


def test_failure_to_error_maps_parent_codes() -> None:
    details = {
        "signal": "SIGKILL",
        "exit_code": None,
        "rss": 123,
        "stderr_tail": "boom",
        "node_id": "n",
    }
    crash = failure_to_error(
        ChildFailure("child_crashed", "died", details), where="subprocess"
    )
    assert type(crash) is ChildError
    assert (
        crash.code,
        crash.signal,
        crash.rss,
        crash.stderr_tail,
        crash.where,
        crash.node_id,
    ) == (
        "child_crashed",
        "SIGKILL",
        123,
        "boom",
        "subprocess",
        "n",
    )
    assert str(crash) == "child child_crashed: died"
    timeout = failure_to_error(
        ChildFailure("timeout", "too slow", details), where="10.0.0.1:8765"
    )
    assert isinstance(timeout, ChildTimeoutError) and isinstance(timeout, TimeoutError)
    assert timeout.where == "10.0.0.1:8765" and not timeout.retryable
    memory = failure_to_error(
        ChildFailure("memory_limit", "big", details), where="subprocess"
    )
    assert type(memory) is ChildError and memory.code == "memory_limit"
    rows = failure_to_error(
        ChildFailure(
            "row_mismatch", "x and y have different numbers of rows: 5 vs 4", {}
        ),
        where="subprocess",
    )
    assert isinstance(rows, RowMismatchError) and isinstance(rows, ValueError)
    assert str(rows) == "x and y have different numbers of rows: 5 vs 4"
    state = failure_to_error(
        ChildFailure("state_mismatch", "missing: w", {}), where="subprocess"
    )
    assert isinstance(state, SomaConfigError) and state.code == "state_mismatch"  # type: ignore[attr-defined]
