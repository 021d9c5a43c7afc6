"""The parent side of one filter-daemon child: spawn, call with a deadline, kill, reap.

Data flow of one call (isolation.md §3, §6)::

    caller thread                          child (soma.isolation.daemon)
    ─────────────                          ─────────────────────────────
    call(cmd, timeout)
      write_frame(request, deadline) ── request pipe ──▶ read, run user code
      poll {reply pipe, pidfd} until deadline             │ progress frames
      read_frame(reply, deadline) ◀──── reply pipe ──────┘ reply

The wait always includes the child's pidfd, so a death is seen at once even when a
grandchild keeps the reply pipe open; at the deadline the caller kills the process
group, and ``kill(reason)`` does the same from any thread. Whatever ends a
call early becomes a ``ChildFailure`` naming pid, interpreter, exit code or signal and
the stderr tail, and the child is never used again.

Children are started from a long-lived ``Spawner`` thread (``spawner``). The launch
description is ``spec.ChildSpec``, the failures and their mapping to soma errors
live in ``failures``, and the stdout/stderr readers in ``output``: this module holds
only what one running child needs to be called, killed and reaped.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

from soma.errors import SomaConfigError
from soma.isolation import channel
from soma.isolation.failures import PARENT_CODES, ChildFailure
from soma.isolation.limits import apply_affinity, read_rss
from soma.isolation.output import TAIL_LINES, OutputCapture, OutputHook
from soma.isolation.spawner import Spawner, default_spawner
from soma.isolation.spec import ChildSpec
from soma.log import isolation_logger

__all__ = ["COMMAND_CAPS", "Child"]

COMMAND_CAPS: Mapping[str, float] = {
    "LOAD": 120.0,
    "GET_STATE": 60.0,
    "SET_STATE": 60.0,
    "GET_GRADIENTS": 60.0,
    "APPLY_GRADIENTS": 60.0,
    "SHUTDOWN": 5.0,
}
"""Per-command caps on a call's deadline (isolation.md §6)."""

_SHUTDOWN_GRACE = 2.0
_EXIT_WAIT = 0.5
_DEATH_CODES = PARENT_CODES | {"encoding_error"}

_child_numbers = itertools.count(1)


class _Spin:
    """How long a caller polls for a reply before sleeping, adapted to whether that pays off.

    Spinning pays off only when the child answers within the spin, which needs a free
    core for it. On a busy machine spinning steals the child's CPU and makes every
    call slower, so failed spins shrink the budget to nothing; every 32nd sleep a
    short spin is tried again.
    """

    _MIN = 20e-6
    _REPROBE_AFTER = 32

    def __init__(self) -> None:
        self.budget = channel.SPIN_SECONDS
        self._sleeps = 0

    def record(self, answered: bool) -> None:
        if answered:
            self.budget = min(channel.SPIN_SECONDS, max(self.budget * 2, self._MIN))
            return
        self.budget = self.budget / 4 if self.budget >= 4 * self._MIN else 0.0
        self._sleeps += 1
        if self.budget == 0.0 and self._sleeps % self._REPROBE_AFTER == 0:
            self.budget = self._MIN


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _make_cwd(work_root: str | None) -> str:
    if work_root is None:
        return tempfile.mkdtemp(prefix="soma-child-")
    os.makedirs(work_root, exist_ok=True)
    while True:
        path = os.path.join(work_root, f"child-{next(_child_numbers)}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path


class Child:
    """One running filter daemon. Create with ``Child.spawn``.

    ``call`` is thread-safe and serves one request at a time; ``kill`` may be called
    from any thread, and makes a call in flight fail with the kill's reason. A child that
    failed in any way other than an error reply is dead and never serves again.
    ``plan_id`` and ``on_output`` may be set by the current user of the child; they tag
    and forward its output lines.
    """

    def __init__(
        self,
        spec: ChildSpec,
        process: subprocess.Popen[bytes],
        request_fd: int,
        reply_fd: int,
        cwd: str,
        *,
        restricted: bool,
        on_output: OutputHook | None,
        ring_fds: tuple[int, int] | None = None,
    ) -> None:
        self.spec = spec
        self.restricted = restricted
        self.on_output = on_output
        self.plan_id: str | None = None
        self.node_id: str | None = None
        self.info: dict[str, Any] = {}
        self.tasks = 0
        self.started_at = time.monotonic()
        self.failure: ChildFailure | None = None
        self._process = process
        self._pid = process.pid
        self._request_fd = request_fd
        self._reply_fd = reply_fd
        self._ring_fds = ring_fds
        # Large buffers go through shared memory; the acks travel on the opposite pipe.
        self._request_ring = self._reply_ring = None
        if ring_fds is not None:
            self._request_ring = channel.Ring(ring_fds[0], ack_fd=reply_fd)
            self._reply_ring = channel.Ring(ring_fds[1], ack_fd=request_fd)
        self._cwd = cwd
        self._pidfd = os.pidfd_open(process.pid) if hasattr(os, "pidfd_open") else None
        self._loads = channel.restricted_loads if restricted else _full_loads
        self._max_frame = (
            {} if spec.max_frame is None else {"max_frame": spec.max_frame}
        )
        self._poller = select.poll()
        self._poller.register(reply_fd, select.POLLIN)
        if self._pidfd is not None:
            self._poller.register(self._pidfd, select.POLLIN)
        self._limit: tuple[str, str | None, float] = ("", None, math.inf)
        self._spin = _Spin()
        self._ids = itertools.count(1)
        self._call_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._kill_reason: tuple[str, str, int | None] | None = None
        self._reaped = False
        self._closed = False
        assert process.stdout is not None and process.stderr is not None
        self._output = OutputCapture(
            self._pid, {"stdout": process.stdout, "stderr": process.stderr}, self
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def spawn(
        cls,
        spec: ChildSpec,
        *,
        restricted: bool = True,
        on_output: OutputHook | None = None,
        spawner: Spawner | None = None,
    ) -> Child:
        """Start a child and wait for its greeting (``spec.start_timeout``).

        ``restricted`` makes the parent decode replies with the restricted unpickler
        (the worker, which must not unpickle user objects); the local runtime passes
        ``False`` to receive user objects directly. Raises ``ChildFailure`` with code
        ``child_start_failed`` naming the interpreter and the stderr tail.
        """
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        memfds = [channel.Ring.create_memfd() for _ in range(2)]
        first, second = memfds
        ring_fds = (first, second) if first is not None and second is not None else None
        if ring_fds is None:
            for memfd in memfds:
                if memfd is not None:
                    os.close(memfd)
        cwd = _make_cwd(spec.work_root)

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                spec.command(request_r, reply_w, ring_fds),
                pass_fds=(request_r, reply_w, *(ring_fds or ())),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=spec.environment(),
                start_new_session=True,
            )

        try:
            process = (spawner or default_spawner).run(start)
        except OSError as exc:
            for fd in (request_r, request_w, reply_r, reply_w, *(ring_fds or ())):
                os.close(fd)
            shutil.rmtree(cwd, ignore_errors=True)
            why = (
                "not found"
                if isinstance(exc, FileNotFoundError)
                else f"could not be started ({exc})"
            )
            raise ChildFailure(
                "child_start_failed",
                f"interpreter {spec.interpreter} {why}",
                {
                    "interpreter": spec.interpreter,
                    "env_key": spec.env_key,
                    "stderr_tail": "",
                },
            ) from exc
        os.close(request_r)
        os.close(reply_w)
        for fd in (request_w, reply_r):
            with contextlib.suppress(OSError):
                channel.tune_pipe(fd)
        child = cls(
            spec,
            process,
            request_w,
            reply_r,
            cwd,
            restricted=restricted,
            on_output=on_output,
            ring_fds=ring_fds,
        )
        apply_affinity(child.pid, spec.cpu_affinity)
        child._await_greeting()
        return child

    def _await_greeting(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout
        problem: str | None = None
        greeting: Any = None
        try:
            greeting = channel.read_frame(
                self._reply_fd, deadline=deadline, loads=channel.restricted_loads
            )
        except TimeoutError:
            problem = f"sent no greeting within {self.spec.start_timeout:g} s"
        except channel.ChannelClosed:
            problem = "exited before its greeting"
        except (channel.FrameError, pickle.UnpicklingError) as exc:
            problem = f"sent a corrupt greeting ({exc})"
        if problem is None and not (
            isinstance(greeting, dict)
            and greeting.get("kind") == "ready"
            and greeting.get("protocol") == 1
        ):
            problem = f"sent an unexpected greeting {greeting!r:.200}"
        if problem is None:
            self.info = greeting
            isolation_logger.debug("child %d ready: %s", self._pid, greeting)
            return
        self.kill("child_start_failed", detail=problem)
        self._finish()
        tail = self.stderr_tail().strip()
        last = tail.splitlines()[-1] if tail else "nothing on stderr"
        exit_note = self._exit_note().strip()
        failure = ChildFailure(
            "child_start_failed",
            f"child {self._pid} ({self.spec.interpreter}) failed to start: {problem}"
            f"{'; it ' + exit_note if exit_note and 'killed' not in exit_note else ''}; stderr: {last}",
            self._details(None),
        )
        self.failure = failure
        raise failure

    @property
    def pid(self) -> int:
        """The child's process id (also its process group id)."""
        return self._pid

    @property
    def alive(self) -> bool:
        """Whether the child can serve: running, never failed and never killed."""
        if self._closed or self.failure is not None or self._kill_reason is not None:
            return False
        return not self._exited()

    @property
    def kill_reason(self) -> str | None:
        """The reason given to the first ``kill``, or ``None``."""
        return None if self._kill_reason is None else self._kill_reason[0]

    def rss(self) -> int | None:
        """Current resident set size in bytes, ``None`` once the child is gone."""
        return None if self._reaped else read_rss(self._pid)

    def stderr_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the child wrote to stderr."""
        return "\n".join(self._output.tail("stderr", lines))

    def output_tail(
        self, stream: str = "stdout", lines: int = TAIL_LINES
    ) -> list[str]:
        """The last lines (at most 200 kept) the child wrote to ``stream``."""
        return self._output.tail(stream, lines)

    def kill(self, reason: str, *, detail: str = "", rss: int | None = None) -> None:
        """SIGKILL the child's process group; callable from any thread.

        ``reason`` becomes the code of the failure raised by a call in flight (a parent
        code such as ``cancelled``, ``timeout`` or ``memory_limit``); the first reason
        given wins. ``detail`` and ``rss`` (read now when not given) are reported with it.
        """
        with self._state_lock:
            if self._kill_reason is None:
                if rss is None and not self._reaped:
                    rss = read_rss(self._pid)
                self._kill_reason = (reason, detail, rss)
            if not self._reaped:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._pid, signal.SIGKILL)

    def shutdown(self, timeout: float = COMMAND_CAPS["SHUTDOWN"]) -> None:
        """Stop the child politely (SHUTDOWN, ``timeout`` s), else kill its group; then reap.

        Safe to call on a dead or already shut down child.
        """
        if (
            not self._closed
            and self.failure is None
            and self._kill_reason is None
            and not self._exited()
        ):
            try:
                self.call("SHUTDOWN", timeout=timeout)
            except ChildFailure:
                pass
            else:
                self._wait_exit(_SHUTDOWN_GRACE)
        self.kill("shutdown")
        self._finish()

    # -- calls -------------------------------------------------------------------------------

    def call(
        self,
        cmd: str,
        *,
        timeout: float,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        budget: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Send one request and return its reply dict (``{"kind": "reply", "ok": True, ...}``).

        ``timeout`` (seconds; ``math.inf`` only where the caller really sets no limit) is
        capped per command by ``COMMAND_CAPS``; when it is what remains of a larger time
        limit, ``budget`` names that limit in the timeout message. Progress frames go to
        ``on_progress``.
        Raises ``ChildFailure``: the child's code for an error reply, or ``encoding_error``
        for a request that cannot be pickled (the child stays usable in both cases), or a
        parent code when the child died, was killed, timed out or broke the protocol (the
        child is then dead). An exception raised by ``on_progress``, or an interrupt,
        kills the child (its channel is out of step) and propagates.
        """
        if not timeout > 0:
            raise SomaConfigError(f"timeout must be > 0 seconds, got {timeout}")
        limit = min(timeout, COMMAND_CAPS.get(cmd, math.inf))
        node_id = fields.get("node_id")
        if node_id is None and fields.get("node_ids"):
            node_id = fields["node_ids"][0]
        with self._call_lock:
            if self.failure is not None:
                raise self.failure
            if self._closed:
                raise ChildFailure(
                    "child_crashed",
                    f"child {self._pid} was shut down",
                    self._details(cmd),
                )
            self.node_id = node_id
            request_id = next(self._ids)
            deadline = None if limit == math.inf else time.monotonic() + limit
            shown = budget if budget is not None and limit == timeout else limit
            self._limit = (cmd, node_id, shown)
            try:
                reply = self._exchange(
                    {"id": request_id, "cmd": cmd, **fields},
                    request_id,
                    cmd,
                    deadline,
                    on_progress,
                )
            except ChildFailure:
                raise
            except BaseException:
                self.kill("cancelled", detail=f"{cmd} was interrupted in the parent")
                with contextlib.suppress(ChildFailure):
                    self._fail_dead(cmd)
                raise
            if reply.get("ok"):
                return reply
            error = reply.get("error") or {}
            details = self._details(cmd)
            details["node_id"] = error.get("node_id", node_id)
            details["error"] = error
            raise ChildFailure(
                str(error.get("code", "internal")),
                str(error.get("message", "")),
                details,
            )

    def _exchange(
        self,
        request: dict[str, Any],
        request_id: int,
        cmd: str,
        deadline: float | None,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        try:
            channel.write_frame(
                self._request_fd, request, deadline=deadline, ring=self._request_ring
            )
        except (BrokenPipeError, ConnectionResetError):
            self._fail_dead(cmd)
        except TimeoutError:
            self.kill("timeout", detail=self._limit_note())
            self._fail_dead(cmd)
        except (
            pickle.PicklingError,
            TypeError,
            AttributeError,
            ValueError,
            RecursionError,
        ) as exc:
            # write_frame pickles before writing anything: the channel is still in step.
            details = self._details(cmd)
            raise ChildFailure(
                "encoding_error",
                f"the {cmd} request could not be pickled: {exc}",
                details,
            ) from exc
        while True:
            self._wait_reply(cmd, deadline)
            try:
                message = channel.read_frame(
                    self._reply_fd,
                    deadline=deadline,
                    loads=self._loads,
                    ring=self._reply_ring,
                    **self._max_frame,
                )
            except channel.ChannelClosed:
                self._fail_dead(cmd)
            except TimeoutError:
                self.kill("timeout", detail=self._limit_note())
                self._fail_dead(cmd)
            except channel.FrameError as exc:
                if not self._wait_exit(_EXIT_WAIT):
                    self.kill(
                        "child_protocol_error",
                        detail=f"corrupt frame in the reply to {cmd}: {exc}",
                    )
                self._fail_dead(cmd)
            except Exception as exc:  # noqa: BLE001 - an unpicklable payload: daemon bug or class missing here
                self.kill(
                    "encoding_error",
                    detail=f"the reply to {cmd} could not be decoded: {exc!r}",
                )
                self._fail_dead(cmd)
            if not isinstance(message, dict) or message.get("id") != request_id:
                self.kill(
                    "child_protocol_error",
                    detail=f"reply to {cmd} out of step: {message!r:.200}",
                )
                self._fail_dead(cmd)
            kind = message.get("kind")
            if kind == "progress":
                if on_progress is not None:
                    on_progress(message)
                continue
            if kind != "reply":
                self.kill(
                    "child_protocol_error",
                    detail=f"unknown frame kind {kind!r} in the reply to {cmd}",
                )
                self._fail_dead(cmd)
            return message

    def _limit_note(self) -> str:
        cmd, node_id, shown = self._limit
        where = f" on node `{node_id}`" if node_id is not None else ""
        return f"{cmd}{where} ran past its {shown:.3g} s limit"

    def _wait_reply(self, cmd: str, deadline: float | None) -> None:
        """Block until the reply pipe is readable; fail at once if the child exited.

        A short spin first (see ``_Spin``): a small reply often arrives within
        microseconds, and sleeping in ``poll`` adds a wake-up to every round trip.
        """
        events = self._poller.poll(0)
        if not events and self._spin.budget:
            spin_until = time.monotonic() + self._spin.budget
            while not events and time.monotonic() < spin_until:
                os.sched_yield()
                events = self._poller.poll(0)
            self._spin.record(bool(events))
        elif not events:
            self._spin.record(False)
        while not events:
            if deadline is None:
                timeout_ms = -1
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.kill("timeout", detail=self._limit_note())
                    self._fail_dead(cmd)
                timeout_ms = max(1, int(remaining * 1000 + 0.999))
            if (
                self._pidfd is None
            ):  # no pidfd (old kernel): look for an exit every 200 ms
                timeout_ms = 200 if timeout_ms < 0 else min(timeout_ms, 200)
                if self._exited():
                    break
            events = self._poller.poll(timeout_ms)
        if any(fd == self._reply_fd for fd, _ in events):
            return
        # Only the pidfd fired. A reply written just before exiting is still in the pipe.
        if _readable(self._reply_fd, 0):
            return
        self._fail_dead(cmd)

    def _fail_dead(self, cmd: str | None) -> NoReturn:
        """The child is dead or must be: kill the group, reap, raise the right failure."""
        if not self._wait_exit(_EXIT_WAIT):
            self.kill("child_crashed", detail="it closed its channel")
        self._finish()
        reason = self._kill_reason
        code = (
            reason[0]
            if reason is not None and reason[0] in _DEATH_CODES
            else "child_crashed"
        )
        detail = reason[1] if reason is not None and reason[0] == code else ""
        node = f" on node `{self.node_id}`" if self.node_id is not None else ""
        if code == "child_crashed":
            message = f"child {self._pid} ({self.spec.interpreter}){self._exit_note()} while running {cmd}{node}"
            if detail:
                message += f" ({detail})"
            tail = self.stderr_tail(5).strip()
            if tail:
                message += f"; stderr: {tail.splitlines()[-1]}"
        else:
            message = (
                f"child {self._pid} ({self.spec.interpreter}) killed: {detail or code}"
            )
        failure = ChildFailure(code, message, self._details(cmd))
        self.failure = failure
        raise failure

    def _exit_note(self) -> str:
        returncode = self._process.returncode
        if returncode is None:
            return ""
        if returncode < 0:
            name = _signal_name(-returncode)
            note = f" was killed by {name}"
            if -returncode == signal.SIGKILL and self._kill_reason is None:
                note += (
                    " (possibly killed by the kernel OOM killer or the memory watch)"
                )
            return note
        return f" exited with code {returncode}"

    def _details(self, cmd: str | None) -> dict[str, Any]:
        returncode = self._process.returncode
        rss = self._kill_reason[2] if self._kill_reason is not None else None
        return {
            "pid": self._pid,
            "interpreter": self.spec.interpreter,
            "env_key": self.spec.env_key,
            "exit_code": returncode
            if returncode is not None and returncode >= 0
            else None,
            "signal": _signal_name(-returncode)
            if returncode is not None and returncode < 0
            else None,
            "rss": rss,
            "stderr_tail": self.stderr_tail(),
            "node_id": self.node_id,
            "command": cmd,
            "plan_id": self.plan_id,
        }

    # -- process plumbing --------------------------------------------------------------------

    def _exited(self) -> bool:
        """Whether the process exited (without reaping it, so its pid stays ours)."""
        if self._reaped:
            return True
        try:
            return (
                os.waitid(os.P_PID, self._pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                is not None
            )
        except ChildProcessError:
            return True

    def _wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the process to exit, without reaping it."""
        if self._pidfd is not None and not self._reaped:
            return _readable(self._pidfd, timeout)
        end = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() >= end:
                return False
            time.sleep(0.01)
        return True

    def _finish(self) -> None:
        """Kill what is left of the group, reap, close the channel and remove the cwd."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            if not self._reaped:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._pid, signal.SIGKILL)
                self._process.wait()
                self._reaped = True
        self._output.join(timeout=1.0)
        for fd in (self._request_fd, self._reply_fd, self._pidfd, *(self._ring_fds or ())):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        shutil.rmtree(self._cwd, ignore_errors=True)

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"<Child pid={self._pid} {state} interpreter={self.spec.interpreter!r} env={self.spec.env_key!r}>"


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` becomes readable within ``timeout`` s (``poll``: no FD_SETSIZE limit)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))


def _full_loads(payload: Any, buffers: Iterable[Any]) -> Any:
    return pickle.loads(payload, buffers=buffers)
