"""A tiny parent for daemon tests: spawn the real child, send requests, read its frames."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import IO, Any

import cloudpickle

from soma.isolation import channel
from soma.isolation.markers import Opaque, TorchData

__all__ = ["DAEMON_COMMAND", "DaemonProcess", "client_value", "pickled"]

DAEMON_COMMAND = [sys.executable, "-c", "import soma.isolation.daemon as d; d.main()"]


def pickled(obj: Any) -> bytes:
    """What a client sends in LOAD: the filter cloudpickled (test modules register by value)."""
    return cloudpickle.dumps(obj, protocol=5)


def spec(
    node_id: str, obj: Any, *, trainable: bool | None = None, differentiable: bool = False
) -> dict[str, Any]:
    """A LOAD entry for ``obj``; trainable unless told otherwise or the filter is stateless."""
    if trainable is None:
        trainable = getattr(obj, "_kind", "trainable") != "stateless"
    return {"id": node_id, "pickle": pickled(obj), "trainable": trainable, "differentiable": differentiable}


def client_value(value: Any) -> Any:
    """Decode a reply value as a client does: Opaque -> cloudpickle.loads, TorchData -> tensor."""
    if isinstance(value, Opaque):
        return cloudpickle.loads(value.data, buffers=value.buffers)
    if isinstance(value, TorchData):
        import torch

        dtype = getattr(torch, value.dtype)
        if not all(value.shape):
            return torch.empty(value.shape, dtype=dtype)
        return torch.frombuffer(value.buffer, dtype=dtype).reshape(value.shape)
    if type(value) is list:
        return [client_value(v) for v in value]
    if type(value) is tuple:
        return tuple(client_value(v) for v in value)
    if type(value) is dict:
        return {k: client_value(v) for k, v in value.items()}
    return value


class DaemonProcess:
    """One real daemon child on its own pipe pair, stdout and stderr captured line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, greet: bool = True) -> None:
        request_r, self.request_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        self.process = subprocess.Popen(
            [*DAEMON_COMMAND, "--fds", f"{request_r},{reply_w}", *args],
            pass_fds=(request_r, reply_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
        os.close(request_r)
        os.close(reply_w)
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        self._drains = [
            threading.Thread(target=_drain, args=(stream, lines), daemon=True)
            for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))
        ]
        for drain in self._drains:
            drain.start()
        self.bytes_received = 0
        self.bytes_sent = 0
        self._next_id = 0
        self.greeting = self.read(timeout=60) if greet else None

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: Any) -> None:
        self.bytes_sent += channel.write_frame(self.request_w, message)

    def write_raw(self, data: bytes) -> None:
        os.write(self.request_w, data)

    def read(self, timeout: float = 60) -> Any:
        """The next frame from the child, decoded as the parent does (restricted unpickler)."""

        def counting_loads(payload: Any, buffers: list[Any]) -> Any:
            self.bytes_received += len(payload) + sum(memoryview(b).nbytes for b in buffers)
            return channel.restricted_loads(payload, buffers)

        return channel.read_frame(self.reply_r, deadline=time.monotonic() + timeout, loads=counting_loads)

    def call(self, cmd: str, *, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; progress frames are in ``reply["_progress"]``."""
        self._next_id += 1
        request_id = self._next_id
        self.send({"id": request_id, "cmd": cmd, **fields})
        progress = []
        while True:
            message = self.read(timeout)
            if message["kind"] == "progress":
                progress.append(message)
                continue
            assert message["kind"] == "reply" and message["id"] == request_id, message
            message["_progress"] = progress
            return message

    def ok(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """``call`` that fails the test on an error reply."""
        reply = self.call(cmd, **fields)
        assert reply["ok"], reply["error"]
        return reply

    def error(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """``call`` expecting an error reply; returns the error dict."""
        reply = self.call(cmd, **fields)
        assert not reply["ok"], reply
        return reply["error"]

    def wait(self, timeout: float = 10) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        """SHUTDOWN a live child (kill it if it does not comply), reap it, close every pipe."""
        if self.process.poll() is None:
            try:
                self.send({"id": -1, "cmd": "SHUTDOWN"})
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(5)
        for fd in (self.request_w, self.reply_r):
            try:
                os.close(fd)
            except OSError:
                pass
        for drain in self._drains:
            drain.join(5)

    def stderr_text(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")


def _drain(stream: IO[bytes] | None, lines: list[bytes]) -> None:
    assert stream is not None
    with stream:
        for line in stream:
            lines.append(line)
