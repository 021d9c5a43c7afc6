"""The daemon as a process: imports, greeting, exit codes, signals, limits, output and dependencies."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import psutil
import pytest
from _harness import DAEMON_COMMAND, DaemonProcess, pickled

from soma.isolation.markers import TorchData

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Identity:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Chatty:
    """Writes to stdout, fd 1 and stderr while computing."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        import logging
        import os

        for i in range(x):
            print(f"line {i}")
        os.write(1, b"raw fd write\n")
        logging.getLogger("user").warning("to stderr")
        return x * 2


def load_identity(child: DaemonProcess) -> None:
    child.ok("LOAD", filters=[{"id": "id", "pickle": pickled(Identity()), "trainable": False}], runtime=None, seed=None)


def blocking_dir(tmp_path: Path, *names: str) -> Path:
    """A directory whose packages shadow ``names`` with modules that fail to import."""
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked for this test')\n")
    return tmp_path


def test_daemon_imports_without_numpy_and_torch(tmp_path: Path) -> None:
    blocked = blocking_dir(tmp_path, "numpy", "torch")
    script = textwrap.dedent(
        """
        import sys
        import soma.isolation.daemon
        import soma.isolation
        child_side = ('child_errors', 'tensors', 'training', 'values')
        absent = sorted(m for m in child_side if f'soma.isolation.{m}' not in sys.modules)
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'numpy', 'torch'})
        process_side = sorted(m for m in ('soma.isolation.process', 'soma.isolation.pool') if m in sys.modules)
        print(absent, heavy, process_side)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The daemon's helper modules are loaded with it, and they too pull in neither numpy nor torch.
    assert done.stdout.strip() == "[] [] []"


def test_greeting_reports_versions_without_importing_them() -> None:
    child = DaemonProcess()
    try:
        greeting = child.greeting
        assert greeting is not None
        assert greeting["kind"] == "ready" and greeting["protocol"] == 1 and greeting["pid"] == child.pid
        assert greeting["python"] == "{}.{}.{}".format(*sys.version_info[:3])
        assert greeting["implementation"] == sys.implementation.name
        assert greeting["cloudpickle"] == cloudpickle.__version__
        assert greeting["numpy"] == version("numpy") and greeting["soma"] == version("soma-runtime")
        assert greeting["torch"] == (version("torch") if _installed("torch") else None)
    finally:
        child.close()


def _installed(name: str) -> bool:
    try:
        version(name)
    except Exception:  # noqa: BLE001 - PackageNotFoundError and friends
        return False
    return True


def test_shutdown_replies_then_exits_zero() -> None:
    child = DaemonProcess()
    try:
        assert child.ok("SHUTDOWN")["ok"]
        assert child.wait() == 0
    finally:
        child.close()


def test_eof_on_the_request_pipe_exits_zero() -> None:
    child = DaemonProcess()
    try:
        os.close(child.request_w)
        assert child.wait() == 0
    finally:
        child.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE-GARBAGE-GARBAGE-",
        struct.pack("<4sIQI", b"SOMD", 7, 0, 0),
        struct.pack("<4sIQI", b"SOMD", 1, 5, 0) + b"\x80\x05junk",
    ],
)
def test_corrupt_request_frame_exits_with_code_3(garbage: bytes) -> None:
    child = DaemonProcess()
    try:
        child.write_raw(garbage)
        assert child.wait() == 3
    finally:
        child.close()
    assert "corrupt request frame" in child.stderr_text()


def test_sigint_is_ignored() -> None:
    child = DaemonProcess()
    try:
        load_identity(child)
        os.kill(child.pid, signal.SIGINT)
        time.sleep(0.2)
        assert child.ok("FORWARD", node_id="id", data=5)["result"] == 5
    finally:
        child.close()


def test_rlimit_as_is_applied() -> None:
    limit = 8 << 30
    child = DaemonProcess("--rlimit-as", str(limit))
    try:
        limits = Path(f"/proc/{child.pid}/limits").read_text()
        line = next(row for row in limits.splitlines() if row.startswith("Max address space"))
        assert line.split()[3:5] == [str(limit), str(limit)]
    finally:
        child.close()


def test_user_output_goes_to_stdout_and_stderr_not_the_channel() -> None:
    child = DaemonProcess()
    try:
        child.ok("LOAD", filters=[{"id": "c", "pickle": pickled(Chatty()), "trainable": False}], runtime=None, seed=None)
        assert child.ok("FORWARD", node_id="c", data=10_000)["result"] == 20_000
        assert child.ok("FORWARD", node_id="c", data=1)["result"] == 2
    finally:
        child.close()
    stdout = b"".join(child.stdout).decode()
    assert stdout.count("\n") == 10_000 + 1 + 1 + 1 and "line 9999\n" in stdout and "raw fd write" in stdout
    assert "to stderr" in child.stderr_text()


class Sleeper:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        import time

        time.sleep(x)
        return x


def test_child_busy_in_user_code_dies_with_its_parent(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    filter_file = tmp_path / "filter.pickle"
    filter_file.write_bytes(pickled(Sleeper()))
    parent_script = textwrap.dedent(
        f"""
        import os, subprocess, time
        from soma.isolation import channel
        r, w = os.pipe()
        r2, w2 = os.pipe()
        child = subprocess.Popen({DAEMON_COMMAND!r} + ["--fds", f"{{r}},{{w2}}"], pass_fds=(r, w2),
                                 start_new_session=True)
        channel.read_frame(r2)
        load = {{"id": 1, "cmd": "LOAD", "runtime": None, "seed": None,
                 "filters": [{{"id": "s", "pickle": open({str(filter_file)!r}, "rb").read(), "trainable": False}}]}}
        channel.write_frame(w, load)
        assert channel.read_frame(r2)["ok"]
        channel.write_frame(w, {{"id": 2, "cmd": "FORWARD", "node_id": "s", "data": 60}})
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_script])
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child_pid = int(pid_file.read_text())
        time.sleep(0.3)  # let the child enter the sleeping forward
        assert psutil.pid_exists(child_pid)
    finally:
        parent.kill()
        parent.wait()
    assert _gone_within(child_pid, 5), "the daemon outlived its SIGKILLed parent"


def _gone_within(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return False


def test_array_to_a_child_without_numpy_is_missing_dependency(tmp_path: Path) -> None:
    blocked = blocking_dir(tmp_path, "numpy")
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = DaemonProcess(env=env)
    try:
        assert child.greeting is not None
        load_identity(child)
        error = child.error("FORWARD", node_id="id", data=np.zeros(3))
        assert error["code"] == "missing_dependency" and "numpy" in error["message"]
        assert child.ok("FORWARD", node_id="id", data=[1.5])["result"] == [1.5]
    finally:
        child.close()


def test_tensor_to_a_child_without_torch_is_missing_dependency(tmp_path: Path) -> None:
    blocked = blocking_dir(tmp_path, "torch")
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = DaemonProcess(env=env)
    try:
        load_identity(child)
        error = child.error("FORWARD", node_id="id", data=TorchData(b"\x00" * 8, "float32", (2,)))
        assert error["code"] == "missing_dependency" and "torch" in error["message"]
        assert child.ok("FORWARD", node_id="id", data="still serving")["result"] == "still serving"
    finally:
        child.close()
