"""The async client core: one persistent wire-v2 WebSocket per worker, plus ``/upload`` and ``/download``.

Data flow::

    caller thread (a Graph run)              client loop thread (one daemon thread per process)
    ───────────────────────────              ──────────────────────────────────────────────────
    RemoteClient.request(msg, on_frame) ───▶ AsyncRemoteClient.request
      waits on its own inbox                   connect once: upgrade (soma.v2) ─▶ Hello ─▶ Welcome
                                               send the frame under a fresh request id
                                               reader task: frame ─▶ decode ─▶ the request of ``re``
      on_frame(event) ◀──── inbox ◀─────────── events and progress (only queued on this thread)
      returns the terminal reply ◀──────────── terminal reply, or a soma error

:class:`AsyncRemoteClient` holds every decision: connection state (:class:`~soma.client.state.ClientState`),
correlation, time limits (:class:`~soma.client.timeout.Timeout`) and error mapping
(:func:`~soma.client.errors.error_from_reply`). The synchronous
:class:`~soma.client.sync_client.RemoteClient` only runs it on its loop thread. The network
sits behind :class:`~soma.client.transport.Transport` (aiohttp by default), so tests can put
a fake worker in its place.

Large values cross once where they can: an upload the worker still holds (``HEAD /download``)
is not sent again, and a worker on this host names the file of a download, which the client
maps instead of receiving a copy over TCP.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import mmap
import os
import stat
import urllib.parse
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from soma.client.addresses import http_base, ws_base
from soma.client.aiohttp_transport import AiohttpTransport
from soma.client.errors import error_from_reply
from soma.client.state import ClientState
from soma.client.timeout import DEFAULT, Timeout, _Default
from soma.client.transport import Body, Channel, HttpResponse, Transport
from soma.client.versions import runtime_versions
from soma.digests import parts_digest
from soma.errors import ProtocolError, RemoteError, RemoteTimeoutError, SomaError
from soma.hosts import is_loopback
from soma.log import client_logger
from soma.wire import v2
from soma.wire.codec import check_version
from soma.wire.errors import WireError
from soma.wire.messages import (
    ERROR_CODES,
    CachedRef,
    CancelPlan,
    DataRef,
    Error,
    Event,
    Heartbeat,
    Hello,
    JobProgress,
    LocalRef,
    Reply,
    Request,
    Shutdown,
    Welcome,
)

__all__ = ["SUBPROTOCOL", "AsyncRemoteClient", "FrameCallback"]

SUBPROTOCOL = "soma.v2"
V2_CONTENT_TYPE = "application/vnd.soma.v2"
V2_PATH_CONTENT_TYPE = "application/vnd.soma.v2.path+json"
"""A same-host worker's answer to a download: where its stored frame lies (``soma.worker.server``)."""

FrameCallback = Callable[[Reply], object]
_REMEMBERED_UPLOADS = 256
"""How many uploads (by frame or content digest) a client remembers, to reuse their references (``upload_frame``)."""
_HASH_OFF_LOOP = 4 << 20
"""Frames at least this large are digested on a thread, not on the client's event loop."""
_NON_TERMINAL = (Event, JobProgress)


@dataclass
class _Pending:
    """A request waiting for its terminal reply."""

    request_id: str
    future: asyncio.Future[Reply]
    on_frame: FrameCallback | None
    sent_at: float


class AsyncRemoteClient:
    """The client of one worker: a shared v2 connection, requests multiplexed by id.

    Use it on one event loop. ``request`` connects when needed (after a lost
    connection too), so a client outlives a worker restart.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        timeout: Timeout | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.address = ws_base(address)
        self.token = token
        self.timeout = timeout or Timeout()
        self.state = ClientState.IDLE
        self.welcome: Welcome | None = None
        self._http = http_base(address)
        self._same_host = is_loopback(urllib.parse.urlsplit(self._http).hostname or "")
        self._transport: Transport = transport or AiohttpTransport()
        self._channel: Channel | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._connect_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._last_frame = 0.0
        self._background: set[asyncio.Task[None]] = set()
        # Values uploaded lately, by the digest of their frame or of their content (see
        # upload_frame), with the worker's reference.
        self._uploads: collections.OrderedDict[bytes, CachedRef] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"AsyncRemoteClient({self.address!r}, state={self.state.value})"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> Welcome:
        """Open the connection if needed and return the worker's ``Welcome``.

        Raises ``ProtocolError`` when the worker does not speak wire v2 ("worker too
        old"), ``RemoteTimeoutError`` past the connect or Welcome limit, ``RemoteError``
        when the worker cannot be reached or refuses the token.
        """
        if self.state is ClientState.CLOSED:
            raise RemoteError(f"the client of worker {self.address} is closed", code="internal")
        if self.state is ClientState.OPEN and self.welcome is not None:
            return self.welcome  # the common case: no lock to take
        async with self._connect_lock:
            if self.state is ClientState.OPEN and self.welcome is not None:
                return self.welcome
            self.state = ClientState.CONNECTING
            try:
                self.welcome = await self._open()
            except BaseException:
                if self.state is ClientState.CONNECTING:
                    self.state = ClientState.LOST
                raise
            self.state = ClientState.OPEN
            return self.welcome

    async def _open(self) -> Welcome:
        channel = await self._transport.connect(
            f"{self.address}/ws", headers=self._headers(), protocols=(SUBPROTOCOL,), timeout=self.timeout
        )
        try:
            if channel.protocol != SUBPROTOCOL:
                raise ProtocolError(
                    f"worker too old: {self.address} did not accept the {SUBPROTOCOL} subprotocol "
                    "(it speaks only the Soma 0.2.43 wire); upgrade the worker",
                    code="protocol_mismatch",
                )
            hello_id = f"h{next(self._ids)}"
            await channel.send(v2.encode_frame(Hello(client=runtime_versions(), id=hello_id)))
            try:
                async with asyncio.timeout(self.timeout.welcome):
                    data = await channel.receive()
            except TimeoutError as exc:
                raise RemoteTimeoutError(
                    f"worker {self.address} sent no Welcome within {self.timeout.welcome:g} s",
                    code="worker_lost",
                    retryable=True,
                ) from exc
            if data is None:
                raise RemoteError(
                    f"worker {self.address} closed the connection during the handshake "
                    f"(close code {channel.close_code})",
                    code="worker_lost",
                    retryable=True,
                )
            reply = self._decode(data)
            if isinstance(reply, Error):
                raise error_from_reply(reply, where=self.address)
            if not isinstance(reply, Welcome):
                raise ProtocolError(f"worker {self.address} answered Hello with {reply.type}, expected Welcome")
        except WireError as exc:
            await channel.close()
            raise ProtocolError(
                f"undecodable handshake frame from {self.address}: {exc.message}", code=exc.code
            ) from exc
        except BaseException:
            await channel.close()
            raise
        self._channel = channel
        self._last_frame = asyncio.get_running_loop().time()
        self._reader = asyncio.create_task(self._read_loop(channel), name=f"soma-client-reader {self.address}")
        return reply

    def _decode(self, data: bytes | str) -> Reply:
        if isinstance(data, str):
            raise WireError("bad_message", "the worker sent a text frame on a wire v2 connection")
        head = v2.read_head(data)
        try:
            check_version(head.v, side="client")
            message = v2.decode_message(head, "client")
        except WireError as exc:
            exc.request_id = head.re if isinstance(head.re, str) else None
            raise
        if not isinstance(message, Reply):
            raise WireError("bad_message", f"the worker sent a request ({message.type})")
        return message

    async def _read_loop(self, channel: Channel) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await channel.receive()
            if data is None:
                self._lose(
                    channel,
                    RemoteError(
                        f"the connection to worker {self.address} closed (close code {channel.close_code})",
                        code="worker_lost",
                        retryable=True,
                    ),
                )
                return
            self._last_frame = loop.time()
            try:
                reply = self._decode(data)
            except WireError as exc:
                error = ProtocolError(f"undecodable frame from worker {self.address}: {exc.message}", code=exc.code)
                pending = self._pending.get(exc.request_id) if exc.request_id else None
                if pending is None:
                    # The frame cannot be attributed, so nothing on this connection can be trusted.
                    self._lose(channel, error)
                    return
                if not pending.future.done():
                    pending.future.set_exception(error)
                continue
            self._dispatch(reply)

    def _dispatch(self, reply: Reply) -> None:
        if isinstance(reply, Heartbeat):
            return
        pending = self._pending.get(reply.re) if reply.re is not None else None
        if pending is None and isinstance(reply, Error) and reply.re is None and len(self._pending) == 1:
            pending = next(iter(self._pending.values()))
        if pending is None:
            client_logger.debug(
                "dropping %s from %s for no waiting request (re=%r)", reply.type, self.address, reply.re
            )
            return
        if isinstance(reply, _NON_TERMINAL):
            if pending.on_frame is not None:
                try:
                    pending.on_frame(reply)
                except Exception:  # a caller's callback must not kill the connection's reader
                    client_logger.exception("frame callback for %s failed", pending.request_id)
            return
        if not pending.future.done():
            pending.future.set_result(reply)

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        # The loop keeps only weak references to tasks: hold them until they finish.
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _lose(self, channel: Channel, error: RemoteError) -> None:
        """Mark the connection lost and fail every request waiting on it."""
        if self._channel is not channel:
            return
        self._channel = None
        if self.state is not ClientState.CLOSED:
            self.state = ClientState.LOST
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(error)
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._in_background(channel.close())
        client_logger.info("connection to worker %s lost: %s", self.address, error.error)

    # -- requests -------------------------------------------------------------------------

    async def request(
        self,
        message: Request,
        *,
        on_frame: FrameCallback | None = None,
        deadline: float | None | _Default = DEFAULT,
    ) -> Reply:
        """Send ``message`` and return its terminal reply; events and progress go to ``on_frame``.

        ``deadline`` bounds the whole call in seconds (``DEFAULT``: ``timeout.request``).
        An ``Error`` reply raises its mapped exception (:func:`error_from_reply`); a lost
        or silent worker raises ``RemoteError`` (``worker_lost``); the deadline raises
        ``RemoteTimeoutError`` after a best-effort ``CancelPlan`` for plans.
        """
        limit = self.timeout.request if isinstance(deadline, _Default) else deadline
        scope = asyncio.timeout(limit)
        try:
            async with scope:
                await self.connect()
                return await self._exchange(message, on_frame)
        except TimeoutError as exc:
            if not scope.expired():
                raise
            plan_id = getattr(getattr(message, "plan", None), "plan_id", None)
            if plan_id is not None and self.state is ClientState.OPEN:
                self._in_background(self._cancel_quietly(plan_id))
            raise RemoteTimeoutError(
                f"worker {self.address} did not answer {message.type} within {limit:g} s",
                code="timeout",
            ) from exc

    async def _exchange(self, message: Request, on_frame: FrameCallback | None) -> Reply:
        loop = asyncio.get_running_loop()
        request_id = f"r{next(self._ids)}"
        try:
            frame = v2.encode_frame(dataclasses.replace(message, id=request_id))
        except WireError as exc:
            raise RemoteError(f"cannot encode {message.type}: {exc.message}", code=exc.code) from exc
        welcome = self.welcome
        if welcome is not None and len(frame) > welcome.max_message_bytes:
            raise RemoteError(
                f"{message.type} is {len(frame)} bytes, above worker {self.address}'s message limit of "
                f"{welcome.max_message_bytes} bytes; large values must be uploaded",
                code="bad_message",
            )
        pending = _Pending(request_id, loop.create_future(), on_frame, loop.time())
        self._pending[request_id] = pending
        try:
            channel = self._channel
            if channel is None:
                raise RemoteError(
                    f"the connection to worker {self.address} is gone", code="worker_lost", retryable=True
                )
            async with self._send_lock:
                try:
                    await channel.send(frame)
                except RemoteError as exc:
                    self._lose(channel, exc)
                    raise
            reply = await self._wait(pending, channel)
        finally:
            self._pending.pop(request_id, None)
        if isinstance(reply, Error):
            raise error_from_reply(reply, where=self.address)
        return reply

    async def _wait(self, pending: _Pending, channel: Channel) -> Reply:
        loop = asyncio.get_running_loop()
        silence = self.timeout.silence
        while True:
            quiet = loop.time() - max(self._last_frame, pending.sent_at)
            if quiet >= silence:
                self._lose(
                    channel,
                    RemoteError(
                        f"worker {self.address} sent nothing for {silence:g} s while a request was in flight; "
                        "it is presumed lost",
                        code="worker_lost",
                        retryable=True,
                    ),
                )
            if pending.future.done():
                return pending.future.result()
            await asyncio.wait({pending.future}, timeout=silence - quiet)

    async def _cancel_quietly(self, plan_id: str) -> None:
        try:
            await asyncio.wait_for(self._exchange(CancelPlan(plan_id=plan_id), None), self.timeout.silence)
        except (SomaError, TimeoutError) as exc:
            client_logger.debug("CancelPlan %s on %s: %s", plan_id, self.address, exc)

    async def shutdown(self, reason: str | None = None, *, deadline: float = 1.8) -> None:
        """Ask the worker to drain and stop; returns at its ``Ack`` without waiting for it to exit."""
        await self.request(Shutdown(reason=reason), deadline=deadline)

    # -- HTTP -----------------------------------------------------------------------------

    async def upload_frame(self, frame: Body, *, content: bytes | None = None) -> CachedRef:
        """Store one encoded value frame on the worker; returns its reference.

        ``frame`` is ``v2.encode_value_frame(value)`` or its parts
        (``v2.encode_value_frame_parts``), which are streamed without being joined. A frame
        this client uploaded lately is not sent again while the worker still holds it
        (``HEAD /download`` says so): runs repeated on the same data upload it once.
        ``content``, the value's ``soma.runtime.hashing.content`` digest where known, lets
        :meth:`held_upload` find the upload before the value is encoded again.
        """
        parts: list[bytes | memoryview] = [frame] if isinstance(frame, bytes) else list(frame)
        size = sum(memoryview(part).nbytes for part in parts)
        digest = await asyncio.to_thread(parts_digest, parts) if size >= _HASH_OFF_LOOP else parts_digest(parts)
        ref = await self._held(digest)
        if ref is None:
            ref = await self._post_upload(frame)
        self._remember_upload(digest, ref)
        if content is not None:
            self._remember_upload(content, ref)
        return ref

    async def forget_uploads(self) -> None:
        """Forget the uploads remembered for reuse (after the worker lost one it said it held)."""
        self._uploads.clear()

    def remembers_upload(self, content: bytes) -> bool:
        """Whether a value of this ``content`` digest was uploaded lately (no I/O: it may be gone since)."""
        return content in self._uploads

    async def held_upload(self, content: bytes) -> CachedRef | None:
        """The reference of a value of this ``content`` digest uploaded lately, if the worker still holds it."""
        return await self._held(content)

    async def _held(self, digest: bytes) -> CachedRef | None:
        known = self._uploads.get(digest)
        if known is None:
            return None
        if await self._holds(known):
            self._uploads.move_to_end(digest)
            return known
        self._uploads.pop(digest, None)
        return None

    def _remember_upload(self, digest: bytes, ref: CachedRef) -> None:
        self._uploads[digest] = ref
        self._uploads.move_to_end(digest)
        while len(self._uploads) > _REMEMBERED_UPLOADS:
            self._uploads.popitem(last=False)

    async def _post_upload(self, frame: Body) -> CachedRef:
        response = await self._transport.request(
            "POST",
            f"{self._http}/upload",
            headers={**self._headers(), "Content-Type": V2_CONTENT_TYPE},
            body=frame,
            timeout=self.timeout,
        )
        if response.status != 200:
            raise _http_error(response, f"upload to {self._http}")
        try:
            document = json.loads(bytes(response.body))
            return CachedRef(cache_key=document["cache_key"], size=document.get("size"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(
                f"worker {self._http} answered an upload with {bytes(response.body[:200])!r}"
            ) from exc

    async def _holds(self, ref: CachedRef) -> bool:
        """Whether the worker still stores ``ref`` (it may have swept it, or restarted)."""
        response = await self._download_request(ref, V2_CONTENT_TYPE, method="HEAD")
        return response.status == 200

    async def upload(self, value: Any) -> CachedRef:
        """Store ``value`` on the worker (one v2 value frame); returns its reference."""
        try:
            parts = v2.encode_value_frame_parts(value)
        except WireError as exc:
            raise RemoteError(f"cannot encode a value for upload: {exc.message}", code=exc.code) from exc
        return await self.upload_frame(parts)

    async def download(self, ref: DataRef) -> Any:
        """The value a worker stored under ``ref``; raises (never returns ``None``) when it cannot be had.

        From a worker on this host (a loopback address) the stored frame is mapped rather than
        received: the worker names its file, and the client maps it copy-on-write, so a large
        array costs no copy at all. Where the file cannot be opened here, it is received.
        """
        if not isinstance(ref, CachedRef | LocalRef):
            raise RemoteError(f"cannot download a {ref.type} reference", code="unsupported_reference")
        body: bytes | bytearray | memoryview | None = None
        if self._same_host:
            response = await self._download_request(ref, f"{V2_PATH_CONTENT_TYPE}, {V2_CONTENT_TYPE};q=0.9")
            if response.status == 200 and response.content_type == V2_PATH_CONTENT_TYPE:
                body = _mapped(response.body)
                if body is None:
                    client_logger.debug("the frame of %s is not readable here; receiving it", _ref_json(ref))
                    response = await self._download_request(ref, V2_CONTENT_TYPE)
        else:
            response = await self._download_request(ref, V2_CONTENT_TYPE)
        if body is None:
            if response.status != 200:
                raise _http_error(response, f"download of {_ref_json(ref)} from {self._http}")
            body = response.body
        try:
            return v2.decode_value_frame(body, "client")
        except WireError as exc:
            raise ProtocolError(f"undecodable download from {self._http}: {exc.message}", code=exc.code) from exc

    async def _download_request(
        self, ref: CachedRef | LocalRef, accept: str, *, method: str = "GET"
    ) -> HttpResponse:
        query = urllib.parse.urlencode({"ref": _ref_json(ref)})
        return await self._transport.request(
            method,
            f"{self._http}/download?{query}",
            headers={**self._headers(), "Accept": accept},
            timeout=self.timeout,
        )

    async def info(self) -> dict[str, Any]:
        """The worker's ``GET /info`` document."""
        response = await self._transport.request("GET", f"{self._http}/info", headers={}, timeout=self.timeout)
        if response.status != 200:
            raise _http_error(response, f"GET {self._http}/info")
        try:
            document = json.loads(bytes(response.body))
        except ValueError as exc:
            raise ProtocolError(f"{self._http}/info is not JSON") from exc
        if not isinstance(document, dict):
            raise ProtocolError(f"{self._http}/info is not a JSON object")
        return document

    async def close(self) -> None:
        """Close the connection and the HTTP session; later requests raise."""
        self.state = ClientState.CLOSED
        channel, self._channel = self._channel, None
        error = RemoteError(f"the client of worker {self.address} was closed", code="internal")
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(error)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
        if channel is not None:
            await channel.close()
        await self._transport.aclose()


def _http_error(response: HttpResponse, what: str) -> RemoteError:
    code, message = "internal", bytes(response.body[:300]).decode("utf-8", "replace")
    try:
        document = json.loads(bytes(response.body))
        if isinstance(document, dict):
            code = str(document.get("error") or code)
            message = str(document.get("message") or message)
    except ValueError:
        pass
    if response.status == 401:
        code = "unauthorized"
    elif response.status == 404 and code == "internal":
        code = "unresolved_reference"
    retryable = ERROR_CODES.get(code, ("", False))[1]
    return RemoteError(f"{what} failed (HTTP {response.status}): {message}", code=code, retryable=retryable)


def _mapped(document: bytes | bytearray | memoryview) -> memoryview | None:
    """A same-host worker's stored frame, mapped privately (writable, copy on write); ``None`` when the
    file named by ``document`` (``{"path", "size"}``) cannot be opened here or is not that frame."""
    try:
        where = json.loads(bytes(document))
        path, size = where["path"], where["size"]
        if not isinstance(path, str) or type(size) is not int or size < len(v2.MAGIC):
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except (ValueError, KeyError, TypeError, OSError):
        return None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_size != size:
            return None
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, AttributeError):  # AttributeError: no MAP_PRIVATE on this platform
        return None
    finally:
        os.close(fd)
    if hasattr(mmap, "MADV_WILLNEED"):
        # The pages are in the page cache: mapped ahead, decoding them costs no fault per page.
        mapped.madvise(mmap.MADV_WILLNEED)
    frame = memoryview(mapped)
    return frame if frame[: len(v2.MAGIC)] == v2.MAGIC else None


def _ref_json(ref: CachedRef | LocalRef) -> str:
    if isinstance(ref, CachedRef):
        return json.dumps({"type": "Cached", "cache_key": ref.cache_key})
    return json.dumps({"type": "Local", "path": ref.path})

