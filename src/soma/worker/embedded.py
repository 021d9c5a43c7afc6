"""``soma.Worker``: a worker inside a Python program (api.md §10, worker spec §2.4).

``serve()`` blocks the calling thread; ``start()`` serves from a daemon thread with its own
event loop and returns once ``/health`` answers. Whatever message arrives, the host
interpreter keeps running: a ``Shutdown`` makes ``serve()`` return, never ``sys.exit``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from types import TracebackType

from soma.datastore import check_store_type
from soma.errors import RemoteError, RemoteTimeoutError, SomaConfigError, SomaError
from soma.worker.app import Serving, WorkerServer
from soma.worker.config import embedded_config
from soma.worker.detect import detect, effective

__all__ = ["Worker"]

START_TIMEOUT_S = 30.0
"""How long ``start()`` waits for ``/health`` to answer."""


class Worker:
    """A Soma worker served from this process.

    ``Worker(port=0).start()`` picks a free port (``worker.port``); use it as a context
    manager to stop it on exit. Arguments are validated here and raise ``SomaConfigError``
    (a ``ValueError``); a non-loopback ``host`` needs ``token`` or ``insecure=True``.
    """

    def __init__(
        self,
        port: int = 8080,
        tags: Iterable[str] | str | None = None,
        token: str | None = None,
        cpus: int | None = None,
        memory: int | str | None = None,
        gpus: int | None = None,
        max_concurrent: int = 4,
        worker_id: str | None = None,
        coordinator: str | None = None,
        *,
        host: str = "127.0.0.1",
        insecure: bool = False,
        python: str | None = None,
        env_dir: str | os.PathLike[str] | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        temp_dir: str | os.PathLike[str] | None = None,
        data_store: str | os.PathLike[str] | None = None,
        timeout: float = 3600.0,
        log_level: str | None = None,
    ) -> None:
        self._config = embedded_config(
            port,
            tags,
            token,
            cpus,
            memory,
            gpus,
            max_concurrent,
            worker_id,
            coordinator,
            host=host,
            insecure=insecure,
            python=python,
            env_dir=env_dir,
            work_dir=work_dir,
            temp_dir=temp_dir,
            data_store=data_store,
            timeout=timeout,
            log_level=log_level or "info",
        )
        # Only an explicit level touches the "soma" logger; by default the host's logging rules.
        self._log_level = log_level
        self._lock = threading.Lock()
        self._server: WorkerServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving: Serving | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._done.set()
        self._failure: BaseException | None = None
        self._summary: str | None = None

    # -- attributes --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port while serving (also with ``port=0``), else the configured one."""
        return self._serving.port if self._serving is not None else self._config.port

    @property
    def address(self) -> str:
        """``ws://<host>:<port>``, what clients pass to ``Graph.add_worker``."""
        host = self._config.host
        return f"ws://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def worker_id(self) -> str:
        """The worker id (the sanitised host name unless given)."""
        return self._config.worker_id

    def info(self) -> str:
        """The capability summary: ``"<n> CPUs, <x.x> GB RAM, GPUs: ..., Python: [...], tags: [...]"``.

        Before the worker serves, capabilities are detected on the first call.
        """
        if self._serving is not None:
            return self._serving.summary
        if self._summary is None:
            config = self._config
            detected = detect(python=config.python)
            caps = effective(detected, cpus=config.cpus, memory=config.memory, gpus=config.gpus, tags=config.tags)
            self._summary = caps.summary()
        return self._summary

    def set_data_store(
        self,
        store_type: str,
        path: str | os.PathLike[str] | None = None,
        bucket: str | None = None,
        prefix: str | None = None,
        endpoint: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Serve references from the read-only directory ``path`` (``store_type="local"``).

        Same signature and errors as ``Graph.set_data_store``; the directory must exist.
        Takes effect at once on a serving worker.
        """
        root = check_store_type(store_type, path).expanduser()
        if not root.is_dir():
            raise SomaConfigError(f"data store {str(path)!r} is not a directory")
        with self._lock:
            self._config = dataclasses.replace(self._config, data_store=root)
            server = self._server
        state = server.state if server is not None else None
        if state is not None and state.store is not None:
            state.store.set_data_store(root)

    def __repr__(self) -> str:
        tags = json.dumps(list(self._config.tags), ensure_ascii=False)
        return f"Worker(port={self.port}, tags={tags}, auth={'true' if self._config.auth else 'false'})"

    # -- serving -----------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve on this thread until a ``Shutdown`` message, ``stop()`` or (on the main thread) SIGINT.

        Raises ``SomaError`` subclasses for startup failures (``BindError`` when the port is
        taken); never exits the interpreter.
        """
        self._begin()
        try:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                asyncio.run(self._serve(install_signals=True))
            else:
                # Called from inside a running loop (Jupyter): serve on a helper thread, block here.
                helper = threading.Thread(target=asyncio.run, args=(self._serve(install_signals=False),))
                helper.start()
                helper.join()
                if self._failure is not None:
                    raise self._failure
        finally:
            self._end()

    def start(self) -> Worker:
        """Serve from a daemon thread; return once ``/health`` answers (within 30 s).

        Raises ``RemoteError`` chained to the cause when the worker cannot start.
        """
        self._begin()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name=f"soma-worker-{self.worker_id}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.wait(0.05):
            if self._done.is_set() or time.monotonic() > deadline:
                break
        if not ready.is_set():
            self._join(deadline)
            cause = self._failure
            if cause is None:
                self.stop()
                raise RemoteTimeoutError(f"the worker did not start within {START_TIMEOUT_S:g} s", prefixed=False)
            raise RemoteError(f"the worker failed to start: {cause}", prefixed=False) from cause
        self._await_health(deadline)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (drain for at most half of ``timeout``) and wait up to ``timeout`` seconds.

        Does nothing when not serving. Raises ``RemoteTimeoutError`` when the worker is still
        running after ``timeout``.
        """
        with self._lock:
            loop, server = self._loop, self._server
        if loop is not None and server is not None and not self._done.is_set():
            drain = max(0.0, min(timeout / 2, self._config.drain_timeout))
            try:
                loop.call_soon_threadsafe(server.request_stop, drain, "stop() called")
            except RuntimeError:  # the loop closed meanwhile: already stopped
                pass
        if not self._done.wait(timeout):
            raise RemoteTimeoutError(f"the worker did not stop within {timeout:g} s", prefixed=False)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------

    def _begin(self) -> None:
        if self._log_level is not None:
            logging.getLogger("soma").setLevel(self._config.logging_level)
        with self._lock:
            if not self._done.is_set():
                raise SomaError(f"{self!r} is already serving; stop() it first")
            self._done.clear()
            self._failure = None
            self._server = WorkerServer(self._config)

    def _end(self) -> None:
        with self._lock:
            self._loop = None
            self._serving = None
        self._done.set()

    async def _serve(self, *, install_signals: bool, ready: threading.Event | None = None) -> None:
        server = self._server
        assert server is not None
        with self._lock:
            self._loop = asyncio.get_running_loop()

        def on_ready(serving: Serving) -> None:
            self._serving = serving
            if ready is not None:
                ready.set()

        try:
            await server.serve(on_ready=on_ready, install_signals=install_signals)
        except BaseException as exc:
            self._failure = exc
            raise

    def _thread_main(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(install_signals=False, ready=ready))
        except Exception:  # recorded in self._failure by _serve; start() raises it
            pass
        finally:
            self._end()

    def _join(self, deadline: float) -> None:
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def _await_health(self, deadline: float) -> None:
        serving = self._serving
        assert serving is not None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._done.is_set():
                break
            try:
                with opener.open(f"{serving.http_url}/health", timeout=2.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.05)
        cause = self._failure or last
        self.stop()
        raise RemoteError(f"the worker at {serving.address} did not answer /health: {cause}", prefixed=False) from cause
