"""The life of one worker process (worker spec §2.3, §6.12), shared by ``soma-worker`` and ``soma.Worker``.

    detect CPUs, RAM, GPUs ─▶ effective caps ─▶ app setup: store (lock, sweep), work dir
        ─▶ bind (failure: BindError "cannot bind <host>:<port>: <reason>") ─▶ /health answers
        ─▶ meanwhile, on threads: the pool's and executor's modules load (then the memory watch,
           pool and executor are made), the interpreter probes run (<= 15 s) and the metrics
           registry is made ─▶ all done: summary log ─▶ prewarm
        ─▶ serve until SIGINT/SIGTERM, ``stop()`` or an accepted ``Shutdown``
        ─▶ drain: /health 503, new requests ``shutting_down``, running ones get ``drain_s``
        ─▶ connections closed (1001) ─▶ app cleanup (executor, children, watch, store lock)

Whatever the first ``/health`` does not need waits until the worker listens (the time to it is
``worker_startup_s`` in ``benchmarks/remote.py``); a request that needs it waits for it.
``WorkerServer`` runs on whatever event loop calls it; it never exits the process. The CLI
turns its errors into exit codes, the embedded ``Worker`` into exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import WSCloseCode, web

from soma.errors import SomaError
from soma.log import access_logger, worker_logger
from soma.worker.config import WorkerConfig
from soma.worker.detect import Detected, detect_machine, detect_python_envs, effective
from soma.worker.server import STATE, ExecutorFactory, MaskingAccessLogger, WorkerState, build_app, soma_version

__all__ = ["BindError", "Serving", "WorkerServer"]

_CLOSE_CONNECTIONS_S = 10.0
_RUNNER_SHUTDOWN_S = 5.0


class BindError(SomaError, OSError):
    """Raised when the worker cannot listen on its host and port (in use, not local, no permission)."""


@dataclass(frozen=True)
class Serving:
    """Where a started worker listens and what it offers."""

    host: str
    port: int
    worker_id: str
    summary: str

    @property
    def address(self) -> str:
        """``ws://<host>:<port>``: what clients pass to ``Graph.add_worker``."""
        return f"ws://{_url_host(self.host)}:{self.port}"

    @property
    def http_url(self) -> str:
        """``http://<host>:<port>``, the base of the HTTP routes (a wildcard bind is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        return f"http://{_url_host(host)}:{self.port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class WorkerServer:
    """One worker on the running event loop: ``start``, then ``wait``/``request_stop``, then ``stop``.

    ``detector`` replaces capability detection (tests); ``executor_factory`` the plan executor.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        executor_factory: ExecutorFactory | None = None,
        detector: Callable[[WorkerConfig], Detected] | None = None,
    ) -> None:
        self.config = config
        self._executor_factory = executor_factory
        self._detector = detector
        self._runner: web.AppRunner | None = None
        self._stop_requested = asyncio.Event()
        self._drain_s: float | None = None
        self.state: WorkerState | None = None
        self.serving: Serving | None = None

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> Serving:
        """Detect, set up the app, bind and start background work; returns where it listens.

        Raises ``BindError`` when the address cannot be bound, ``SomaConfigError`` for a temp
        dir owned by another worker; nothing is left running after a failure.
        """
        config = self.config
        bound = asyncio.Event()
        python_envs: asyncio.Future[tuple[str, ...]] | None = None
        if self._detector is not None:
            detected = await asyncio.wait_for(asyncio.to_thread(self._detector, config), timeout=30.0)
        else:
            detected = await asyncio.wait_for(asyncio.to_thread(detect_machine), timeout=30.0)
            # Interpreter probes run programs (slow, and they take CPU from the startup): they
            # begin once the worker listens, and whatever reports capabilities waits for them
            # (WorkerState.settled).
            python_envs = asyncio.ensure_future(_probe_interpreters(bound, config.python))
        try:
            port = await self._listen(detected, python_envs)
        except BaseException:
            if python_envs is not None:
                python_envs.cancel()
            raise
        bound.set()
        runner = self._runner
        assert self.state is not None and runner is not None
        # Made on a thread now that /health answers, rather than by the first request that counts.
        metrics_ready = asyncio.ensure_future(asyncio.to_thread(self.state.metrics.prepare))
        try:
            await self.state.settled()
            await metrics_ready
        except BaseException:
            for pending in (metrics_ready, python_envs):
                if pending is not None:
                    pending.cancel()
            await runner.cleanup()
            self._runner = None
            raise
        caps = self.state.effective
        self.serving = Serving(host=config.host, port=port, worker_id=config.worker_id, summary=caps.summary())
        self._log_started(self.serving)
        # §2.3 step 6: children are warm before the worker reports itself ready (it already
        # answers /health meanwhile); a failure only costs the first plan its spawn time.
        await self._prewarm()
        return self.serving

    async def _listen(self, detected: Detected, python_envs: asyncio.Future[tuple[str, ...]] | None) -> int:
        """Set up the app for ``detected`` and bind; returns the port. A bind failure undoes the setup."""
        config = self.config
        caps = effective(detected, cpus=config.cpus, memory=config.memory, gpus=config.gpus, tags=config.tags)
        app = build_app(config, effective=caps, on_shutdown=self.request_stop, executor_factory=self._executor_factory)
        self.state = app[STATE]
        self.state.python_envs = python_envs
        runner = web.AppRunner(
            app,
            access_log=access_logger,
            access_log_class=MaskingAccessLogger,
            handle_signals=False,
            shutdown_timeout=_RUNNER_SHUTDOWN_S,
        )
        try:
            await runner.setup()
        except BaseException:
            await runner.cleanup()  # undoes the resources that did start (store lock, pool)
            raise
        self._runner = runner
        try:
            site = web.TCPSite(runner, config.host, config.port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            self._runner = None
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise BindError(f"cannot bind {config.host}:{config.port}: {reason}") from exc
        return _bound_port(runner, config.port)

    def _log_started(self, serving: Serving) -> None:
        config = self.config
        worker_logger.info(
            "soma-worker %s (soma %s) listening on %s%s",
            serving.worker_id,
            soma_version(),
            serving.address,
            " (ephemeral port)" if config.port == 0 else "",
        )
        worker_logger.info("capabilities: %s", serving.summary)
        if config.auth:
            worker_logger.info("authentication: token required on /upload, /download, /ws and /metrics")
            if config.weak_token:
                worker_logger.warning("the token is shorter than 16 characters; use a longer random token")
        elif config.insecure_bind:
            worker_logger.warning(
                "listening on %s without a token (--insecure): anyone who can reach it can run code here",
                config.host,
            )
        else:
            worker_logger.info("authentication: none (loopback only)")
        if config.coordinator is not None:
            worker_logger.warning(
                "--coordinator %s is not supported by this build; the worker serves direct clients only",
                config.coordinator,
            )

    async def _prewarm(self) -> None:
        """Start ``--prewarm`` idle children of the default interpreter, keyed as plans will ask for them."""
        state = self.state
        if self.config.prewarm < 1 or state is None or state.pool is None or state.executor is None:
            return
        try:
            spec = state.executor.child_spec()
            await asyncio.to_thread(state.pool.prewarm, spec, self.config.prewarm)
        except Exception as exc:  # a worker that cannot prewarm still serves; plans report the cause
            worker_logger.warning("prewarming %d child(ren) failed: %s", self.config.prewarm, exc)

    # -- stop --------------------------------------------------------------------------------

    def request_stop(self, drain_s: float | None = None, reason: str | None = None) -> None:
        """Begin shutdown (idempotent; call on the loop): ``wait`` returns and ``stop`` drains.

        ``drain_s`` (default and cap ``--drain-timeout``) bounds the wait for running requests.
        """
        if self._stop_requested.is_set():
            return
        if drain_s is not None:
            self._drain_s = drain_s
        if self.state is not None:
            self.state.start_draining()
        worker_logger.info("shutting down%s", f" ({reason})" if reason else "")
        self._stop_requested.set()

    async def wait(self) -> None:
        """Block until a stop is requested."""
        await self._stop_requested.wait()

    async def stop(self) -> None:
        """Drain (§6.12) and release everything; idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        state = self.state
        assert state is not None
        state.start_draining()
        drain = self.config.drain_timeout if self._drain_s is None else min(self._drain_s, self.config.drain_timeout)
        try:
            waits = [_drain_requests(state, drain)]
            if state.executor is not None:
                waits.append(state.executor.drain(drain))
            await asyncio.gather(*waits)
        finally:
            await _close_connections(state)
            await runner.cleanup()
        worker_logger.info("worker %s stopped", state.worker_id)

    async def serve(
        self,
        *,
        on_ready: Callable[[Serving], None] | None = None,
        install_signals: bool = False,
    ) -> None:
        """``start``, call ``on_ready``, serve until stopped (SIGINT/SIGTERM too when ``install_signals``), ``stop``."""
        await self.start()
        installed = _install_signal_handlers(self.request_stop) if install_signals else ()
        try:
            if on_ready is not None and self.serving is not None:
                on_ready(self.serving)
            await self.wait()
        finally:
            _remove_signal_handlers(installed)
            await self.stop()


async def _probe_interpreters(bound: asyncio.Event, python: str) -> tuple[str, ...]:
    """The interpreter probes (§3.1), begun once ``bound`` is set: they run programs, which would
    take CPU from the path to the first ``/health``."""
    await bound.wait()
    return await asyncio.to_thread(detect_python_envs, python=python)


async def _drain_requests(state: WorkerState, drain_s: float) -> None:
    """Give the requests running on every connection (plans, state messages) up to ``drain_s``."""
    tasks = [task for connection in state.connections for task in connection.request_tasks()]
    current = asyncio.current_task()
    tasks = [task for task in tasks if task is not current]
    if tasks and drain_s > 0:
        await asyncio.wait(tasks, timeout=drain_s)


async def _close_connections(state: WorkerState) -> None:
    for connection in list(state.connections):
        connection.close(WSCloseCode.GOING_AWAY)
    deadline = asyncio.get_running_loop().time() + _CLOSE_CONNECTIONS_S
    while state.connections and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    if state.connections:
        worker_logger.warning("%d connection(s) did not close in time", len(state.connections))


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested


def _install_signal_handlers(stop: Callable[[], None]) -> tuple[signal.Signals, ...]:
    """SIGINT and SIGTERM request a stop with the default drain, on the main thread only (§2.4)."""
    if threading.current_thread() is not threading.main_thread():
        return ()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
    return tuple(installed)


def _remove_signal_handlers(installed: tuple[signal.Signals, ...]) -> None:
    if not installed:
        return
    loop = asyncio.get_running_loop()
    for sig in installed:
        loop.remove_signal_handler(sig)

