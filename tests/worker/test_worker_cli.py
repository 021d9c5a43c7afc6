"""``soma-worker`` from the command line (worker spec §2.1–§2.3; checklist items 1, 2, 4, 31, 52).

Flag parsing itself is ``test_config.py``'s; here are exit codes, the console script and a
few real worker processes (kept to three: each costs detection and an interpreter start).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from soma.wire import v2
from soma.wire.messages import Error, Hello, Ping, Pong, Shutdown
from soma.worker.cli import main
from soma.worker.config import config_from_args

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CliWorker:
    """A ``python -m soma.worker.cli`` process with its stderr in a file; always killed at the end."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.log_path = tmp_path / "worker.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "soma.worker.cli", "--prewarm", "0",
                   "--temp-dir", str(tmp_path / "temp"), "--work-dir", str(tmp_path / "work"), *args]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOMA_")}
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=self._log, env=env, start_new_session=True
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, url: str, timeout: float = 30.0) -> float:
        """Seconds until ``/health`` answered 200; fails the test if the process died or it never did."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log}")
            try:
                with _OPENER.open(f"{url}/health", timeout=1.0) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        pytest.fail(f"worker did not answer /health within {timeout} s:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        self._log.close()


@pytest.fixture
def cli_workers(tmp_path: Path) -> Iterator[list[CliWorker]]:
    workers: list[CliWorker] = []
    yield workers
    for worker in workers:
        worker.close()


def _get_json(url: str) -> dict[str, Any]:
    with _OPENER.open(url, timeout=5.0) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- in-process main()


def test_help_names_the_worker_and_its_main_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Soma distributed execution worker" in out
    for flag in ("--port", "--cpus", "--token", "--coordinator", "--host", "--python", "--insecure"):
        assert flag in out


def test_version_prints_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("soma-worker ")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--memory", "lots"], "--memory"),
        (["--host", "0.0.0.0"], "without a token"),
        (["--token", ""], "--token"),
        (["--port", "70000"], "--port"),
        (["--max-concurrent", "0"], "--max-concurrent"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_invalid_flags_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("soma-worker: error: ")
    assert fragment in err


def test_default_host_is_loopback_without_a_token_and_everywhere_with_one() -> None:
    assert config_from_args([], environ={}).host == "127.0.0.1"
    assert config_from_args([], environ={"SOMA_TOKEN": "t" * 20}).host == "0.0.0.0"
    assert config_from_args(["--token", "t" * 20], environ={}).host == "0.0.0.0"


def test_the_console_script_is_installed() -> None:
    script = shutil.which("soma-worker", path=os.path.dirname(sys.executable))
    assert script is not None
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "Soma distributed execution worker" in result.stdout


# --------------------------------------------------------------------------- real processes


def test_a_cli_worker_serves_health_and_info_then_stops_on_sigterm(
    tmp_path: Path, cli_workers: list[CliWorker]
) -> None:
    port = _free_port()
    worker = CliWorker(tmp_path, "--port", str(port), "--id", "w1", "--coordinator", "http://127.0.0.1:9")
    cli_workers.append(worker)
    url = f"http://127.0.0.1:{port}"
    assert worker.wait_healthy(url) < 10.0
    with _OPENER.open(f"{url}/health", timeout=5) as response:
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.read() == b"ok"
    info = _get_json(f"{url}/info")
    assert info["worker_id"] == "w1" and info["type"] == "Register"
    assert set(info["capabilities"]) == {"cpu_cores", "ram_bytes", "gpus", "python_envs", "tags"}
    assert worker.stop(signal.SIGTERM) == 0
    log = worker.log
    assert f"listening on ws://127.0.0.1:{port}" in log
    assert "--coordinator http://127.0.0.1:9 is not supported by this build" in log
    assert "worker w1 stopped" in log


def test_an_insecure_cli_worker_warns_and_refuses_shutdown(tmp_path: Path, cli_workers: list[CliWorker]) -> None:
    import asyncio

    import aiohttp

    port = _free_port()
    worker = CliWorker(tmp_path, "--port", str(port), "--host", "0.0.0.0", "--insecure")
    cli_workers.append(worker)
    url = f"http://127.0.0.1:{port}"
    worker.wait_healthy(url)

    async def try_shutdown() -> tuple[object, object]:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws", protocols=("soma.v2",)) as ws:
            await ws.send_bytes(v2.encode_frame(Hello(id="h", client={})))
            await ws.receive(timeout=10)
            await ws.send_bytes(v2.encode_frame(Shutdown(id="s")))
            refused = v2.decode((await ws.receive(timeout=10)).data, "client")
            await ws.send_bytes(v2.encode_frame(Ping(id="p")))
            return refused, v2.decode((await ws.receive(timeout=10)).data, "client")

    refused, pong = asyncio.run(try_shutdown())
    assert isinstance(refused, Error) and refused.code == "unauthorized"
    assert isinstance(pong, Pong)
    assert worker.process.poll() is None
    assert worker.stop(signal.SIGINT) == 0
    assert "without a token (--insecure)" in worker.log


def test_a_port_in_use_exits_1_with_cannot_bind(tmp_path: Path, cli_workers: list[CliWorker]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = CliWorker(tmp_path, "--port", str(port))
        cli_workers.append(worker)
        assert worker.process.wait(60) == 1
    log = worker.log
    assert f"cannot bind 127.0.0.1:{port}: Address already in use" in log
    assert "Traceback" not in log

