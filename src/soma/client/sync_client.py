"""The synchronous client: :class:`RemoteClient` runs the async core on one private event-loop thread.

It bridges and decides nothing, so sync and async callers get the same behaviour. The loop
thread (one daemon thread per process) is why the synchronous API also works inside a
running event loop (Jupyter, ``asyncio.run``). Connections are shared: one client per
``(address, token)`` for the whole process (:func:`client_for`), closed at interpreter exit
and forgotten in a forked child, which has no loop thread.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import queue
import threading
from collections import deque
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

from soma.client.addresses import ws_base
from soma.client.async_client import AsyncRemoteClient, FrameCallback
from soma.client.state import ClientState
from soma.client.timeout import DEFAULT, Timeout, _Default
from soma.client.transport import Body, Transport
from soma.errors import SomaError
from soma.log import client_logger
from soma.wire.messages import CachedRef, DataRef, Reply, Request, Welcome

__all__ = ["RemoteClient", "client_for", "close_all"]

T = TypeVar("T")


class _LoopThread:
    """One private event loop on a daemon thread, where every client of this process runs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="soma-client-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("the synchronous client cannot be called from its own loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


class _Mailbox:
    """Frames handed from the loop thread to a waiting caller, one wake-up per burst.

    Waking a thread costs far more than queueing a frame, so the loop thread signals only
    when the caller has taken everything signalled before; the caller then takes all
    frames queued so far, in order. ``None`` comes last: the reply (or error) is ready.
    """

    def __init__(self) -> None:
        self._frames: deque[Reply | None] = deque()
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._signalled = False

    def put(self, frame: Reply | None) -> None:
        """Queue ``frame`` (loop thread)."""
        self._frames.append(frame)
        if not self._signalled:
            self._signalled = True
            self._wake.put(None)

    def take(self) -> list[Reply | None]:
        """Wait for a signal, then every frame queued so far (caller thread); may be empty."""
        self._wake.get()
        self._signalled = False  # reset before draining: a frame queued from now on signals again
        frames = []
        while self._frames:
            frames.append(self._frames.popleft())
        return frames


_loop_thread: _LoopThread | None = None
_loop_lock = threading.Lock()


def _loop() -> _LoopThread:
    global _loop_thread
    with _loop_lock:
        if _loop_thread is None:
            _loop_thread = _LoopThread()
        return _loop_thread


class RemoteClient:
    """Synchronous face of :class:`AsyncRemoteClient`, run on the client loop thread.

    Safe to call from any thread, including one with a running event loop. Events and
    progress passed to ``on_frame`` are delivered on the calling thread, in order,
    before ``request`` returns.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        timeout: Timeout | None = None,
        transport: Transport | None = None,
    ) -> None:
        self._core = AsyncRemoteClient(address, token, timeout=timeout, transport=transport)

    def __repr__(self) -> str:
        return f"RemoteClient({self.address!r}, state={self.state.value})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """The worker's ``ws://host:port`` address."""
        return self._core.address

    @property
    def state(self) -> ClientState:
        """The connection state."""
        return self._core.state

    @property
    def timeout(self) -> Timeout:
        """The time limits in force."""
        return self._core.timeout

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future = _loop().submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def connect(self) -> Welcome:
        """Connect if needed; the worker's ``Welcome`` (see :meth:`AsyncRemoteClient.connect`)."""
        core = self._core
        welcome = core.welcome
        if core.state is ClientState.OPEN and welcome is not None:
            return welcome  # already open: no hop to the loop thread
        return self._call(core.connect())

    def request(
        self,
        message: Request,
        *,
        on_frame: FrameCallback | None = None,
        deadline: float | None | _Default = DEFAULT,
    ) -> Reply:
        """Send ``message``; its terminal reply (see :meth:`AsyncRemoteClient.request`)."""
        if on_frame is None:
            return self._call(self._core.request(message, deadline=deadline))
        mailbox = _Mailbox()
        future = _loop().submit(self._core.request(message, on_frame=mailbox.put, deadline=deadline))
        future.add_done_callback(lambda _: mailbox.put(None))
        try:
            while True:
                for frame in mailbox.take():
                    if frame is None:
                        return future.result()
                    on_frame(frame)
        except BaseException:
            future.cancel()
            raise

    def upload(self, value: Any) -> CachedRef:
        """Store ``value`` on the worker; its reference."""
        return self._call(self._core.upload(value))

    def upload_frame(self, frame: Body, *, content: bytes | None = None) -> CachedRef:
        """Store an already encoded value frame (bytes or its parts) on the worker; its reference.

        ``content`` is the value's content digest, where known (see :meth:`held_upload`).
        """
        return self._call(self._core.upload_frame(frame, content=content))

    def held_upload(self, content: bytes) -> CachedRef | None:
        """The reference of a value of this content digest uploaded lately, if the worker still holds it.

        Asks the worker only about a value uploaded lately; otherwise answers at once.
        """
        if not self._core.remembers_upload(content):
            return None
        return self._call(self._core.held_upload(content))

    def forget_uploads(self) -> None:
        """Forget the uploads remembered for reuse: the next ones are sent (see :meth:`upload_frame`)."""
        self._call(self._core.forget_uploads())

    def download(self, ref: DataRef) -> Any:
        """The value stored under ``ref``; raises ``RemoteError`` when it cannot be fetched."""
        return self._call(self._core.download(ref))

    def info(self) -> dict[str, Any]:
        """The worker's ``/info`` document."""
        return self._call(self._core.info())

    def shutdown(self, reason: str | None = None, *, deadline: float = 1.8) -> None:
        """Send ``Shutdown`` and return at the worker's ``Ack`` (not when it has exited)."""
        self._call(self._core.shutdown(reason, deadline=deadline))

    def close(self) -> None:
        """Close the connection; later calls raise."""
        if self._core.state is not ClientState.CLOSED:
            self._call(self._core.close())


# ---------------------------------------------------------------------------- shared clients

_clients: dict[tuple[str, str | None], RemoteClient] = {}
_clients_lock = threading.Lock()


def client_for(address: str, token: str | None = None) -> RemoteClient:
    """The process-wide client of the worker at ``address`` with ``token`` (created on first use)."""
    key = (ws_base(address), token)
    with _clients_lock:
        client = _clients.get(key)
        if client is None or client.state is ClientState.CLOSED:
            client = _clients[key] = RemoteClient(address, token)
        return client


def close_all() -> None:
    """Close every shared client (also run at interpreter exit)."""
    with _clients_lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        try:
            client.close()
        except SomaError as exc:
            client_logger.debug("closing %s: %s", client.address, exc)


def _forget_after_fork() -> None:
    # A forked child has no loop thread; its clients and loop must be made afresh.
    global _loop_thread, _loop_lock, _clients_lock
    _loop_thread = None
    _loop_lock = threading.Lock()
    _clients_lock = threading.Lock()
    _clients.clear()


atexit.register(close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
