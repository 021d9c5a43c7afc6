"""One client WebSocket on the worker: a state machine with a guaranteed end (worker spec §5, §6.11).

    upgrade ──▶ OPEN ── reader loop: frame ─▶ decode ─▶ one task per request ─▶ its one terminal reply
                 │                           (concurrent; v1 correlates by plan id, v2 by ``re``)
                 │ client closed, protocol mismatch, oversize frame, worker shutdown
                 ▼
              CLOSING ── the executor cancels the connection's requests and ends its sessions;
                 │       every request still without a reply gets an ``Error``
                 ▼
              CLOSED ─── close code sent: 1000 normal, 1001 worker going away,
                         1002 protocol mismatch, 1009 message too big, 1011 internal error

Frames leave through one writer task fed by a bounded queue, so they never interleave and a
slow reader makes senders wait (events are never dropped, §6.7). Light requests are answered
here; plans and session messages are delegated to the ``PlanExecutor``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import WSCloseCode, WSMsgType, web

from soma.log import worker_logger
from soma.wire.codec import Codec, Dialect
from soma.wire.errors import WireError
from soma.wire.messages import (
    PROTOCOLS,
    Ack,
    ApplyGradients,
    AssignPlan,
    AssignPythonJob,
    CancelPlan,
    Capabilities,
    ChunkData,
    Error,
    ErrorInfo,
    GetGradients,
    GetState,
    Heartbeat,
    Hello,
    LoadMetrics,
    Ping,
    PlanFailure,
    PlanResult,
    Pong,
    Register,
    Registered,
    Reply,
    Request,
    SetState,
    Shutdown,
    ShutdownAck,
    Status,
    StatusRequest,
    StreamBegin,
    StreamEnd,
    Welcome,
    make_error,
)

if TYPE_CHECKING:
    from soma.isolation.spec import ChildSpec
    from soma.worker.config import WorkerConfig
    from soma.worker.metrics import WorkerMetrics

__all__ = [
    "EVENT_QUEUE_LIMIT",
    "HEARTBEAT_INTERVAL_S",
    "PING_INTERVAL_S",
    "SUBPROTOCOL_V2",
    "Connection",
    "ConnectionState",
    "Executor",
    "Host",
    "SomaWebSocket",
]

SUBPROTOCOL_V2 = "soma.v2"
"""The WebSocket subprotocol that selects wire v2; none means v1 (Soma 0.2.43 clients)."""

EVENT_QUEUE_LIMIT = 1000
"""Frames queued per connection before senders wait (§6.7: a slow client slows the plan)."""

HEARTBEAT_INTERVAL_S = 5.0
"""v2 ``Heartbeat`` period while requests are in flight."""

PING_INTERVAL_S = 20.0
"""WebSocket ping period (§6.11)."""

_DRAIN_REPLIES_S = 5.0
"""How long a closing connection waits for cancelled requests to produce their replies."""

_FLUSH_S = 5.0
"""How long a closing connection waits for queued frames to leave."""

_DECODE_IN_THREAD_BYTES = 1 << 20
"""Frames this large are decoded off the event loop (v1 JSON of big values takes a while)."""

# Replies that carry user values: encoding a large one can be heavy (v1 JSON), so it runs in a thread.
_VALUE_REPLIES = frozenset({"PlanResult", "StateResult", "GradientsResult", "ChunkResult", "StreamComplete"})

_SMALL_NODES = 512
"""Most containers, items and fields a reply may hold and still be encoded on the event loop."""

_SMALL_BYTES = 256 << 10
"""Most string and buffer bytes a reply may hold and still be encoded on the event loop."""
_UNSUPPORTED = {
    AssignPythonJob.type: "Python jobs (AssignPythonJob) are not available in this build of the worker",
    StreamBegin.type: "streamed execution (StreamBegin) is not available in this build of the worker",
    ChunkData.type: "streamed execution (ChunkData) is not available in this build of the worker",
    StreamEnd.type: "streamed execution (StreamEnd) is not available in this build of the worker",
}
# Requests still accepted while the worker drains: they start nothing.
_ALLOWED_WHILE_DRAINING = frozenset({Hello.type, Ping.type, StatusRequest.type, CancelPlan.type, Shutdown.type})


class Executor(Protocol):
    """What the worker delegates plans and session messages to (``soma.worker.execute.PlanExecutor``)."""

    async def run_plan(self, msg: AssignPlan, conn: Connection) -> Reply: ...
    async def cancel(self, plan_id: str, conn: Connection) -> bool: ...
    async def get_state(self, msg: GetState, conn: Connection) -> Reply: ...
    async def set_state(self, msg: SetState, conn: Connection) -> Reply: ...
    async def get_gradients(self, msg: GetGradients, conn: Connection) -> Reply: ...
    async def apply_gradients(self, msg: ApplyGradients, conn: Connection) -> Reply: ...
    async def connection_closed(self, conn: Connection) -> None: ...
    def status(self) -> dict[str, Any]: ...
    def child_spec(self) -> ChildSpec: ...
    async def drain(self, drain_s: float) -> None: ...
    async def close(self) -> None: ...


class Host(Protocol):
    """The worker as a connection sees it (``soma.worker.server.WorkerState``)."""

    config: WorkerConfig
    metrics: WorkerMetrics
    executor: Executor | None

    @property
    def worker_id(self) -> str: ...

    @property
    def draining(self) -> bool: ...

    @property
    def shutdown_allowed(self) -> bool: ...

    async def settled(self) -> None: ...

    def capabilities(self) -> Capabilities: ...

    def load(self) -> LoadMetrics: ...

    def runtime(self) -> dict[str, Any]: ...

    def status_counts(self) -> Mapping[str, int]: ...

    def request_shutdown(self, drain_s: float | None, reason: str | None) -> None: ...


class ConnectionState(enum.Enum):
    """Where a connection is in its life."""

    OPEN = "open"  # frames are read and requests accepted
    CLOSING = "closing"  # no new requests; outstanding ones are given their terminal replies
    CLOSED = "closed"  # the close frame was sent (or the peer is gone)


class SomaWebSocket(web.WebSocketResponse):
    """A ``WebSocketResponse`` that says why before it closes for an oversized message.

    aiohttp closes with 1009 as soon as a frame exceeds ``max_msg_size``; ``before_close_too_big``
    (set by the connection) sends the typed ``Error`` first, as §4.3 asks.
    """

    before_close_too_big: Callable[[], Awaitable[None]] | None = None

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        hook = self.before_close_too_big
        if code == WSCloseCode.MESSAGE_TOO_BIG and hook is not None and not self.closed:
            self.before_close_too_big = None
            await hook()
        return await super().close(code=code, message=message, drain=drain)


@dataclasses.dataclass
class _Pending:
    """A request between decode and its terminal reply."""

    message: Request
    key: str
    task: asyncio.Task[None] | None = None
    replied: bool = False


_ids = itertools.count(1)


class Connection:
    """One client WebSocket: its dialect, its requests, its writer.

    ``send(msg, re)`` is how the executor emits events and replies. Use ``run`` once per
    upgraded socket; it returns when the connection is closed, every request answered.
    """

    def __init__(self, ws: SomaWebSocket, *, dialect: Dialect, host: Host, peer: str | None) -> None:
        self.ws = ws
        self.dialect: Dialect = dialect
        self.host = host
        self.peer = peer or "unknown"
        self.id = f"conn-{next(_ids)}"
        self.codec = Codec(dialect, side="worker")
        self.state = ConnectionState.OPEN
        self.close_code: int = WSCloseCode.OK
        self._pending: dict[str, _Pending] = {}
        self._anonymous = itertools.count(1)
        self._queue: asyncio.Queue[str | bytes | None] = asyncio.Queue(maxsize=EVENT_QUEUE_LIMIT)
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._broken = False

    def __repr__(self) -> str:
        return f"Connection({self.id}, {self.dialect}, peer={self.peer}, {self.state.value})"

    @property
    def _executor(self) -> Executor:
        executor = self.host.executor
        if executor is None:  # pragma: no cover - connections exist only while the app runs
            raise RuntimeError("the worker has no executor yet")
        return executor

    @property
    def in_flight(self) -> int:
        """Requests of this connection still waiting for their terminal reply."""
        return sum(not pending.replied for pending in self._pending.values())

    def request_tasks(self) -> list[asyncio.Task[None]]:
        """The tasks of requests still running (the drain waits for them)."""
        return [p.task for p in self._pending.values() if p.task is not None and not p.task.done()]

    # -- sending -----------------------------------------------------------------------------

    async def send(self, msg: Reply, re: str | None = None) -> None:
        """Send ``msg`` to the client, correlated with request ``re`` (v2; v1 ignores it), in order.

        Writes at once when nothing is queued, else queues for the writer, waiting while
        ``EVENT_QUEUE_LIMIT`` frames are already queued. Messages to a client that
        is gone are dropped. Raises ``WireError`` (``encoding_error``) if ``msg`` cannot be
        encoded in this connection's dialect; nothing is sent then.
        """
        if re is not None and msg.re is None and self.dialect == "v2":
            msg = dataclasses.replace(msg, re=re)
        if msg.type in _VALUE_REPLIES and not _is_small(msg):
            frame = await asyncio.to_thread(self.codec.encode, msg)
        else:
            frame = self.codec.encode(msg)
        if self._broken or self.state is ConnectionState.CLOSED or self._writer is None or self._writer.done():
            return
        if self._queue.empty():
            # Nothing waits before this frame, and the writer holds none unwritten (an uncompressed
            # frame reaches the transport as soon as it is taken): written now, saving a wake-up.
            await self._write(frame)
            return
        await self._queue.put(frame)

    async def _write_loop(self) -> None:
        while True:
            frame = await self._queue.get()
            if frame is None:
                return
            if not self._broken:
                await self._write(frame)

    async def _write(self, frame: str | bytes) -> None:
        try:
            if isinstance(frame, str):
                await self.ws.send_str(frame)
                size = len(frame.encode())
            else:
                await self.ws.send_bytes(frame)
                size = len(frame)
        except (ConnectionError, RuntimeError) as exc:
            # The peer is gone; the writer keeps consuming so that no sender waits forever.
            worker_logger.debug("%s: send failed: %s", self.id, exc)
            self._broken = True
            return
        self.host.metrics.bytes_sent.inc(size)

    async def _flush(self) -> None:
        """Let queued frames leave, then stop the writer (bounded by ``_FLUSH_S``)."""
        writer = self._writer
        if writer is None or writer.done():
            return
        try:
            async with asyncio.timeout(_FLUSH_S):
                await self._queue.put(None)
                await asyncio.shield(writer)
        except TimeoutError:
            worker_logger.warning("%s: %d frame(s) not delivered before closing", self.id, self._queue.qsize())
            self._broken = True
            writer.cancel()

    # -- the life of a connection ------------------------------------------------------------

    async def run(self) -> None:
        """Read frames until the connection ends, then answer what is outstanding and close."""
        self.ws.before_close_too_big = self._too_big
        self._writer = asyncio.create_task(self._write_loop(), name=f"{self.id}-writer")
        if self.dialect == "v2":
            self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name=f"{self.id}-heartbeat")
        worker_logger.debug("%s: connected from %s (%s)", self.id, self.peer, self.dialect)
        # The reader is its own task so that ``close`` can stop it without touching the socket.
        self._reader = asyncio.create_task(self._read_loop(), name=f"{self.id}-reader")
        try:
            await asyncio.wait([self._reader])
            if not self._reader.cancelled() and self._reader.exception() is not None:
                worker_logger.error("%s: reader failed", self.id, exc_info=self._reader.exception())
                self.close_code = WSCloseCode.INTERNAL_ERROR
        finally:
            self._reader.cancel()
            await self._finish()

    async def _read_loop(self) -> None:
        while self.state is ConnectionState.OPEN:
            frame = await self.ws.receive()
            if frame.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if frame.type is WSMsgType.ERROR:
                worker_logger.info("%s: connection error: %s", self.id, frame.data)
                self.close_code = self.ws.close_code or WSCloseCode.INTERNAL_ERROR
                return
            data: str | bytes = frame.data
            self.host.metrics.bytes_received.inc(len(data))
            await self._receive(data)

    async def _receive(self, data: str | bytes) -> None:
        try:
            if len(data) >= _DECODE_IN_THREAD_BYTES:
                # The reader awaits each decode, so the codec's state is never touched concurrently.
                message = await asyncio.to_thread(self.codec.decode, data)
            else:
                message = self.codec.decode(data)
        except WireError as exc:
            await self._refuse(exc, data)
            return
        if not isinstance(message, Request):
            await self._send_error(
                make_error("bad_message", f"{message.type} is a worker message, not a request"), None
            )
            return
        key = self._key(message)
        if key in self._pending:
            error = make_error("bad_message", f"request id {key!r} is already in flight on this connection")
            await self._send_error(error, message)
            return
        pending = _Pending(message, key)
        self._pending[key] = pending
        pending.task = asyncio.create_task(self._handle(pending), name=f"{self.id}-{message.type}-{key}")

    def _key(self, message: Request) -> str:
        if self.dialect == "v2" and message.id is not None:
            return message.id
        plan_id = getattr(message, "plan_id", None) or getattr(getattr(message, "plan", None), "plan_id", None)
        # v1 correlates by plan id; messages without one are keyed uniquely.
        suffix = plan_id if isinstance(plan_id, str) and message.type == AssignPlan.type else next(self._anonymous)
        return f"{message.type}:{suffix}"

    async def _refuse(self, exc: WireError, data: str | bytes) -> None:
        """Answer an undecodable or refused frame; a version mismatch on v2 also ends the connection."""
        worker_logger.info("%s: refused frame: %s: %s", self.id, exc.code, exc.message)
        self.host.metrics.count_request(_frame_type(data, self.dialect), exc.code)
        if self.dialect == "v1" and exc.plan_id is not None and _frame_type(data, "v1") == AssignPlan.type:
            # Soma 0.2.43 clients wait for the PlanResult of their plan id.
            await self._send_quietly(_failed(self.host.worker_id, exc.plan_id, exc.code, exc.message))
            return
        error = make_error(
            exc.code,
            exc.message,
            worker_id=self.host.worker_id,
            plan_id=exc.plan_id,
            details=exc.details or None,
        )
        await self._send_quietly(error, exc.request_id)
        if exc.code == "protocol_mismatch" and self.dialect == "v2":
            self.close_code = WSCloseCode.PROTOCOL_ERROR
            self.state = ConnectionState.CLOSING

    async def _too_big(self) -> None:
        limit = self.host.config.max_message_bytes
        self.host.metrics.count_request("unknown", "bad_message")
        error = make_error(
            "bad_message",
            f"message larger than the worker's limit of {limit} bytes (--max-message-bytes); "
            "upload large values with POST /upload and send a reference",
            worker_id=self.host.worker_id,
            details={"max_message_bytes": limit},
        )
        frame = self.codec.encode(error)
        try:
            if isinstance(frame, str):
                await self.ws.send_str(frame)
            else:
                await self.ws.send_bytes(frame)
        except (ConnectionError, RuntimeError) as exc:
            worker_logger.debug("%s: could not report the oversized message: %s", self.id, exc)
        self.close_code = WSCloseCode.MESSAGE_TOO_BIG

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            if self.in_flight == 0 or self.state is not ConnectionState.OPEN:
                continue
            try:
                load = await asyncio.to_thread(self.host.load)
                await self.send(Heartbeat(worker_id=self.host.worker_id, load=load))
            except Exception:  # a failed reading must not end the connection
                worker_logger.exception("%s: heartbeat failed", self.id)

    async def _finish(self) -> None:
        """CLOSING: cancel this connection's work, give every request its reply, close with a code."""
        if self.state is ConnectionState.OPEN:
            self.state = ConnectionState.CLOSING
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        outstanding = [p for p in self._pending.values() if p.task is not None and not p.task.done()]
        try:
            if self.host.executor is not None:  # none yet: the connection started nothing
                await self._executor.connection_closed(self)
        except Exception:
            worker_logger.exception("%s: ending the connection's plans and sessions failed", self.id)
        tasks = [p.task for p in outstanding if p.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=_DRAIN_REPLIES_S)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        code = "shutting_down" if self.host.draining else "cancelled"
        for pending in list(self._pending.values()):
            if not pending.replied:
                message = (
                    "the worker is shutting down" if code == "shutting_down" else "the connection was closed"
                )
                await self._reply(pending, make_error(code, message, plan_id=_plan_id_of(pending.message)))
        await self._flush()
        if self.host.draining and self.close_code == WSCloseCode.OK:
            self.close_code = WSCloseCode.GOING_AWAY
        if not self.ws.closed:
            await self.ws.close(code=self.close_code)
        self.state = ConnectionState.CLOSED
        worker_logger.debug("%s: closed (%s)", self.id, self.close_code)

    def close(self, code: int = WSCloseCode.GOING_AWAY) -> None:
        """Ask the connection to end with ``code`` (worker shutdown); ``run`` then answers what is
        outstanding, flushes queued frames and sends the close frame."""
        if self.state is ConnectionState.OPEN:
            self.close_code = code
            self.state = ConnectionState.CLOSING
        if self._reader is not None:
            self._reader.cancel()

    # -- requests ----------------------------------------------------------------------------

    async def _handle(self, pending: _Pending) -> None:
        message = pending.message
        try:
            reply = await self._dispatch(pending)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            worker_logger.exception("%s: %s handler failed", self.id, message.type)
            reply = make_error(
                "internal",
                f"the worker failed while handling {message.type}: {type(exc).__name__}: {exc}",
                plan_id=_plan_id_of(message),
            )
        if reply is not None:
            await self._reply(pending, reply)
        else:
            pending.replied = True
            self.host.metrics.count_request(message.type, "ok")
        self._pending.pop(pending.key, None)

    async def _reply(self, pending: _Pending, reply: Reply) -> None:
        """Send ``pending``'s terminal reply; one that cannot be encoded becomes a typed failure."""
        if pending.replied:
            return
        pending.replied = True
        reply = _with_worker_id(reply, self.host.worker_id)
        try:
            await self.send(reply, pending.message.id)
        except WireError as exc:
            worker_logger.info("%s: %s reply not encodable: %s", self.id, reply.type, exc.message)
            if isinstance(reply, PlanResult):
                reply = _failed(self.host.worker_id, reply.plan_id, exc.code, exc.message)
            else:
                reply = make_error(exc.code, exc.message, worker_id=self.host.worker_id)
            await self._send_quietly(reply, pending.message.id)
        self.host.metrics.count_request(pending.message.type, _outcome(reply))

    async def _send_error(self, error: Error, message: Request | None) -> None:
        error = dataclasses.replace(error, worker_id=self.host.worker_id)
        if message is not None:
            error = dataclasses.replace(error, plan_id=error.plan_id or _plan_id_of(message))
            self.host.metrics.count_request(message.type, error.code)
        await self._send_quietly(error, message.id if message is not None else None)

    async def _send_quietly(self, reply: Reply, re: str | None = None) -> None:
        try:
            await self.send(_with_worker_id(reply, self.host.worker_id), re)
        except WireError:
            worker_logger.exception("%s: could not encode %s", self.id, reply.type)

    async def _dispatch(self, pending: _Pending) -> Reply | None:
        """The terminal reply of one request (``None`` for ``Registered``, which gets none)."""
        host = self.host
        message = pending.message
        await host.settled()  # a request right after the start waits for the executor
        if host.draining and message.type not in _ALLOWED_WHILE_DRAINING:
            return make_error("shutting_down", "the worker is shutting down; send it elsewhere or later",
                              plan_id=_plan_id_of(message))
        if message.type in _UNSUPPORTED:
            return make_error(
                "unsupported_plan",
                _UNSUPPORTED[message.type],
                plan_id=_plan_id_of(message),
                stream_id=getattr(message, "stream_id", None),
            )
        match message:
            case Hello():
                return Welcome(
                    worker_id=host.worker_id,
                    protocols=list(PROTOCOLS),
                    capabilities=host.capabilities(),
                    runtime=host.runtime(),
                    max_concurrent=host.config.max_concurrent,
                    inline_threshold=host.config.inline_threshold,
                    max_message_bytes=host.config.max_message_bytes,
                )
            case Ping():
                return Pong()
            case StatusRequest():
                return await self._status()
            case Registered():
                return None
            case Shutdown():
                return await self._shutdown(message, pending)
            case CancelPlan():
                if await self._executor.cancel(message.plan_id, self):
                    return Ack(worker_id=host.worker_id, plan_id=message.plan_id)
                return make_error(
                    "unknown_plan",
                    f"no running plan, session, job or stream `{message.plan_id}` on this connection",
                    plan_id=message.plan_id,
                )
            case AssignPlan():
                return await self._executor.run_plan(message, self)
            case GetState():
                return await self._executor.get_state(message, self)
            case SetState():
                return await self._executor.set_state(message, self)
            case GetGradients():
                return await self._executor.get_gradients(message, self)
            case ApplyGradients():
                return await self._executor.apply_gradients(message, self)
        return make_error("bad_message", f"{message.type} is not handled by this worker")

    async def _status(self) -> Reply:
        host = self.host
        load = await asyncio.to_thread(host.load)
        if self.dialect == "v1":
            return Register(worker_id=host.worker_id, capabilities=host.capabilities(), load=load)
        counts = host.status_counts()
        return Status(
            worker_id=host.worker_id,
            capabilities=host.capabilities(),
            load=load,
            running=counts.get("running", 0),
            queue_depth=counts.get("queue_depth", 0),
            sessions=counts.get("sessions", 0),
        )

    async def _shutdown(self, message: Shutdown, pending: _Pending) -> Reply:
        host = self.host
        if not host.shutdown_allowed:
            return make_error(
                "unauthorized",
                "this worker listens beyond loopback without a token, so it refuses Shutdown; "
                "stop it on its host, or restart it with --token",
            )
        drain_s = message.drain_s
        if drain_s is not None and not drain_s >= 0:
            return make_error("bad_message", f"Shutdown.drain_s must be >= 0, got {drain_s!r}")
        ack: Reply = ShutdownAck() if self.dialect == "v1" else Ack(worker_id=host.worker_id)
        # Acknowledged first (§6.12): the Ack is queued before the drain can close anything.
        await self._reply(pending, ack)
        worker_logger.info("%s: Shutdown accepted (reason: %s)", self.id, message.reason or "none given")
        host.request_shutdown(drain_s, message.reason)
        return ack


# -- helpers -------------------------------------------------------------------------------------


def _plan_id_of(message: Request) -> str | None:
    plan_id = getattr(message, "plan_id", None)
    if plan_id is None:
        plan_id = getattr(getattr(message, "plan", None), "plan_id", None)
    if plan_id is None:
        plan_id = getattr(getattr(message, "job", None), "job_id", None)
    return plan_id if isinstance(plan_id, str) else None


def _with_worker_id(reply: Reply, worker_id: str) -> Reply:
    if getattr(reply, "worker_id", None) == "":
        return dataclasses.replace(reply, worker_id=worker_id)  # type: ignore[call-arg]
    return reply


def _failed(worker_id: str, plan_id: str, code: str, message: str) -> PlanResult:
    """A ``Failed`` plan result: how refusals reach clients that wait for their plan id (v1)."""
    kind = make_error(code, message).kind
    return PlanResult(
        worker_id=worker_id,
        plan_id=plan_id,
        result=PlanFailure(error=ErrorInfo(code=code, kind=kind, message=message)),
    )


def _outcome(reply: Reply) -> str:
    if isinstance(reply, Error):
        return reply.code
    if isinstance(reply, PlanResult) and isinstance(reply.result, PlanFailure):
        return reply.result.error.code
    return "ok"


def _is_small(value: Any) -> bool:
    """Whether ``value`` is certainly cheap to encode (well under a millisecond), so that encoding it
    on the event loop costs less than a hop to a thread.

    Conservative and bounded: the walk stops at ``_SMALL_NODES`` nodes or ``_SMALL_BYTES`` bytes,
    and any type it does not know (an object array, a foreign object) counts as large.
    """
    numpy = sys.modules.get("numpy")  # an array exists only if numpy is loaded; never load it here
    nodes = 0
    size = 0
    stack = [value]
    while stack:
        item = stack.pop()
        nodes += 1
        if nodes > _SMALL_NODES:
            return False
        if item is None or isinstance(item, bool | int | float):
            continue
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, bytes | bytearray | memoryview):
            size += memoryview(item).nbytes
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif numpy is not None and isinstance(item, numpy.ndarray):
            if item.dtype.hasobject:
                return False
            size += item.nbytes
        else:
            return False
        if size > _SMALL_BYTES:
            return False
    return True


def _frame_type(data: str | bytes, dialect: Dialect) -> str:
    """The ``type`` a refused frame claimed, for metrics and v1 correlation (``unknown`` if none)."""
    if dialect == "v1" and isinstance(data, str):
        try:
            decoded = json.loads(data)
        except ValueError:
            return "unknown"
        kind = decoded.get("type") if isinstance(decoded, dict) else None
        return kind if isinstance(kind, str) and len(kind) <= 32 else "unknown"
    return "unknown"
