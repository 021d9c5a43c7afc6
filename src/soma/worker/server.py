"""The worker's HTTP surface (worker spec §4): one route table, authentication, transfers, metrics.

    request ─▶ error middleware (JSON bodies for 404/405/…) ─▶ auth middleware (protected routes)
            ─▶ GET /health · GET /info · POST /upload · GET /download · GET /ws · GET /metrics

Long-lived resources are built in ``cleanup_ctx`` so shutdown mirrors startup: the store
(temp-dir lock, startup sweep, periodic sweeper), the work dir, then the plan executor, made in
the background after the bind together with the memory watch and child pool it runs on.
``WorkerState`` (under the ``STATE`` app key) is what handlers and WebSocket connections share.
Blocking work (hashing, decoding stored values, scraping) runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import importlib
import json
import platform
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger, AbstractStreamWriter

from soma.errors import SomaConfigError
from soma.hosts import is_loopback
from soma.isolation.markers import Opaque
from soma.log import worker_logger
from soma.wire.errors import WireError
from soma.worker.config import WorkerConfig
from soma.worker.detect import Effective, LoadMeter
from soma.worker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from soma.worker.metrics import WorkerMetrics
from soma.worker.store import BadRequest, Store, StoredValue, StoreError, Upload

if TYPE_CHECKING:
    from soma.isolation.limits import MemoryWatch
    from soma.isolation.pool import Pool
    from soma.wire.codec import Dialect
    from soma.wire.messages import Capabilities, LoadMetrics
    from soma.worker.connection import Connection, Executor

# The wire messages and the WebSocket connection are imported where they are used: a starting
# worker answers /health before it needs them (they load while the executor does, after the bind).

__all__ = [
    "MEMORY_WATCH_FRACTION",
    "PROTECTED_PATHS",
    "STATE",
    "V2_CONTENT_TYPE",
    "V2_MAGIC",
    "V2_PATH_CONTENT_TYPE",
    "ExecutorFactory",
    "MaskingAccessLogger",
    "WorkerState",
    "build_app",
    "check_token",
    "mask_token",
    "soma_version",
]

V2_CONTENT_TYPE = "application/vnd.soma.v2"
"""Content type of a v2 value frame on ``/upload`` and ``/download``."""

V2_PATH_CONTENT_TYPE = "application/vnd.soma.v2.path+json"
"""A ``/download`` answer a same-host client may accept instead of the frame: ``{"path", "size"}`` of the
stored v2 frame, which it maps (read-only file, private copy-on-write map). Given only on a loopback peer."""

V2_MAGIC = b"SOMA"
"""How a v2 frame begins (``soma.wire.v2.MAGIC``). The wire codecs are imported where values
are decoded, not at import: they load numpy, which the worker does not need to bind."""

PROTECTED_PATHS = frozenset({"/upload", "/download", "/ws", "/metrics"})
"""Routes that need the token when one is set; ``/health`` and ``/info`` never do (§4.2)."""

MEMORY_WATCH_FRACTION = 0.9
"""Without ``--memory`` the children may use this share of the detected RAM in total (§3.3)."""

QUERY_TOKEN_WARNING_S = 3600.0
AUTH_FAILURE_WARNING_S = 60.0
_CHUNK = 1 << 20
_RECEIVE_WINDOW = 8 << 20
_WRITE_STEP = 8 << 20
_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&#]*", re.IGNORECASE)


def soma_version() -> str:
    """The installed ``soma-runtime`` version (``0+unknown`` in an uninstalled tree)."""
    return _package_version("soma-runtime") or "0+unknown"


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version  # scans installed packages: when asked

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- shared state


class ExecutorFactory(Protocol):
    """Builds the plan executor once the pool and store exist (a test seam; default ``PlanExecutor``)."""

    def __call__(
        self, config: WorkerConfig, *, pool: Pool, store: Store, metrics: WorkerMetrics, capabilities: Effective
    ) -> Any: ...


def _default_executor(
    config: WorkerConfig, *, pool: Pool, store: Store, metrics: WorkerMetrics, capabilities: Effective
) -> Any:
    from soma.worker.execute import PlanExecutor

    return PlanExecutor(config, pool=pool, store=store, metrics=metrics, capabilities=capabilities)


@dataclass
class WorkerState:
    """Everything the routes and connections of one worker share.

    ``store``, ``pool`` and ``executor`` are set while the app runs (``cleanup_ctx``); the executor
    shortly after the start (await ``settled``).
    ``on_shutdown`` is called once when a ``Shutdown`` is accepted; the lifecycle owner
    (``soma.worker.app``) then drains and stops the server.
    """

    config: WorkerConfig
    effective: Effective
    metrics: WorkerMetrics
    load_meter: LoadMeter
    started_at: str = field(default_factory=_now_rfc3339)
    store: Store | None = None
    pool: Pool | None = None
    memory_watch: MemoryWatch | None = None
    executor: Executor | None = None
    connections: set[Connection] = field(default_factory=set)
    on_shutdown: Callable[[float | None, str | None], None] | None = None
    #: Interpreter probes still running at startup; ``settled`` puts their result into ``effective``.
    python_envs: asyncio.Future[tuple[str, ...]] | None = None
    #: The executor being made at startup (``cleanup_ctx``); ``settled`` waits for it.
    executor_pending: asyncio.Future[None] | None = None
    _draining: bool = False
    _warned: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    async def settled(self) -> None:
        """Wait until startup is complete: the executor exists and ``effective`` holds the
        interpreter probes. Raises what making the executor raised."""
        making = self.executor_pending
        if making is not None:
            await asyncio.shield(making)  # a caller that gives up must not cancel it
        pending = self.python_envs
        if pending is None:
            return
        envs = await asyncio.shield(pending)  # a caller that gives up must not cancel the probes
        if self.python_envs is pending:
            self.effective = dataclasses.replace(self.effective, python_envs=envs)
            self.python_envs = None

    @property
    def draining(self) -> bool:
        """Whether shutdown began: ``/health`` answers 503 and new requests get ``shutting_down``."""
        return self._draining

    def start_draining(self) -> None:
        """Enter the draining state (idempotent)."""
        self._draining = True

    @property
    def shutdown_allowed(self) -> bool:
        """A tokenless worker bound beyond loopback refuses ``Shutdown`` (§4.2)."""
        return self.config.token is not None or is_loopback(self.config.host)

    def request_shutdown(self, drain_s: float | None, reason: str | None) -> None:
        """Start the §6.12 shutdown: draining at once, the rest by the lifecycle owner."""
        first = not self._draining
        self._draining = True
        if first and self.on_shutdown is not None:
            self.on_shutdown(drain_s, reason)

    def capabilities(self) -> Capabilities:
        """The wire ``Capabilities`` record."""
        from soma.wire.messages import Capabilities, GpuInfo

        caps = self.effective.capabilities()
        return Capabilities(
            cpu_cores=caps["cpu_cores"],
            ram_bytes=caps["ram_bytes"],
            gpus=[GpuInfo(**gpu) for gpu in caps["gpus"]],
            python_envs=list(caps["python_envs"]),
            tags=list(caps["tags"]),
        )

    def executor_status(self) -> Mapping[str, Any]:
        """The executor's ``status()`` (empty before it exists)."""
        return self.executor.status() if self.executor is not None else {}

    def status_counts(self) -> dict[str, int]:
        """``running``, ``queue_depth``, ``sessions`` and ``free_slots`` from the executor."""
        status = self.executor_status()
        running = status.get("running", ())
        return {
            "running": running if isinstance(running, int) else len(running),
            "queue_depth": int(status.get("queue_depth", 0)),
            "sessions": int(status.get("sessions", 0)),
            "free_slots": int(status.get("free_slots", self.config.max_concurrent)),
        }

    def load_dict(self) -> dict[str, Any]:
        """A ``LoadMetrics`` dict. Reads the process tree: call it in a thread."""
        counts = self.status_counts()
        return self.load_meter.load_metrics(
            active_plans=counts["running"],
            queue_depth=counts["queue_depth"],
            free_slots=counts["free_slots"],
            max_concurrent=self.config.max_concurrent,
            sessions=counts["sessions"],
        )

    def load(self) -> LoadMetrics:
        """The ``LoadMetrics`` record (blocking; see ``load_dict``)."""
        from soma.wire.messages import LoadMetrics

        return LoadMetrics(**self.load_dict())

    def runtime(self) -> dict[str, Any]:
        """What ``Welcome.runtime`` reports: the worker's Python, cloudpickle and soma versions."""
        return {
            "python": platform.python_version(),
            "cloudpickle": _package_version("cloudpickle"),
            "soma": soma_version(),
        }

    def memory_limit(self) -> int:
        """The memory watch's limit over all children: ``--memory``, else 90 % of detected RAM."""
        if self.config.memory is not None:
            return self.config.memory
        return int(self.effective.ram_bytes * MEMORY_WATCH_FRACTION)

    def limits(self) -> dict[str, Any]:
        """Every enforced limit of §3.3 and §4.3, for ``/info.limits``."""
        config = self.config
        gpus = self.effective.gpus
        return {
            "cpu_cores": self.effective.cpu_cores,
            "ram_bytes": self.effective.ram_bytes,
            "max_concurrent": config.max_concurrent,
            "max_queue": config.max_queue,
            "queue_timeout_s": config.queue_timeout,
            "timeout_s": config.timeout,
            "threads_per_child": max(1, self.effective.cpu_cores // config.max_concurrent),
            "cuda_visible_devices": ",".join(gpu.uuid or str(gpu.index) for gpu in gpus),
            "memory_limit_bytes": self.memory_limit(),
            "child_memory_bytes": config.child_memory,
            "child_rlimit_as_bytes": config.child_rlimit_as,
            "max_upload_bytes": config.max_upload_bytes,
            "max_message_bytes": config.max_message_bytes,
            "inline_threshold": config.inline_threshold,
            "store_ttl_s": config.store_ttl,
            "store_max_bytes": config.store_max_bytes,
            "drain_timeout_s": config.drain_timeout,
        }

    def info(self) -> dict[str, Any]:
        """The ``/info`` body (§4.1). Reads load: call it in a thread."""
        from soma.wire.messages import PROTOCOLS

        return {
            "type": "Register",
            "worker_id": self.worker_id,
            "capabilities": self.effective.capabilities(),
            "version": soma_version(),
            "protocols": list(PROTOCOLS),
            "auth": self.config.auth,
            "max_concurrent": self.config.max_concurrent,
            "limits": self.limits(),
            "gpu_devices": self.effective.gpu_devices(),
            "started_at": self.started_at,
            "load": self.load_dict(),
        }

    def warn_once_per(self, kind: str, remote: str, period: float, message: str, *args: Any) -> None:
        """Log a WARNING at most once per ``period`` seconds for (``kind``, ``remote``)."""
        now = time.monotonic()
        last = self._warned.get((kind, remote))
        if last is None or now - last >= period:
            self._warned[(kind, remote)] = now
            worker_logger.warning(message, *args)


STATE: web.AppKey[WorkerState] = web.AppKey("soma_worker_state", WorkerState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

routes = web.RouteTableDef()


# --------------------------------------------------------------------------- errors and auth


def _json_error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


@web.middleware
async def _error_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text 404/405 (and any HTTP error without a JSON body) into ``{"error", "message"}``."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _json_error(404, "not_found", f"no route {request.method} {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return _json_error(
            405, "method_not_allowed", f"{request.method} is not allowed on {request.path}; use {allowed}",
            headers={"Allow": allowed},
        )


def check_token(given: str, expected: str) -> bool:
    """Constant-time token comparison whatever the lengths: ``compare_digest`` of SHA-256 digests."""
    return hmac.compare_digest(
        hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest(),
        hashlib.sha256(expected.encode("utf-8", "surrogateescape")).digest(),
    )


def _presented(request: web.Request) -> tuple[str | None, str]:
    """The token a request presents and how: ``Authorization: Bearer`` first, then ``?token=``."""
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            return value.strip(), "bearer"
    if "token" in request.query:
        return request.query["token"], "query"
    return None, "none"


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse protected routes without the right token (401 before any WebSocket upgrade)."""
    state = request.app[STATE]
    expected = state.config.token
    if expected is None or request.path not in PROTECTED_PATHS:
        return await handler(request)
    remote = request.remote or "unknown"
    token, how = _presented(request)
    if token is not None and check_token(token, expected):
        if how == "query":
            state.warn_once_per(
                "query-token", remote, QUERY_TOKEN_WARNING_S,
                "client %s sent its token in the URL query (?token=...), which proxies and logs may keep; "
                "send it as 'Authorization: Bearer <token>' instead",
                remote,
            )
        return await handler(request)
    state.metrics.auth_failures.inc()
    state.warn_once_per(
        "auth-failure", remote, AUTH_FAILURE_WARNING_S,
        "refused %s %s from %s: %s", request.method, request.path, remote,
        "no token presented" if token is None else "wrong token",
    )
    return _json_error(
        401,
        "unauthorized",
        "this worker requires a token: send 'Authorization: Bearer <token>'",
        headers={"WWW-Authenticate": 'Bearer realm="soma"'},
    )


def mask_token(path_qs: str) -> str:
    """``path_qs`` with any ``token=`` query value replaced by ``***`` (access logs)."""
    return _TOKEN_IN_QUERY.sub(r"\1***", path_qs)


class MaskingAccessLogger(AbstractAccessLogger):
    """One access-log line per request, with ``token=***`` in place of a query token."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %s %.3fs',
            request.remote,
            request.method,
            mask_token(request.raw_path),
            request.version.major,
            request.version.minor,
            response.status,
            response.body_length,
            time,
        )


# --------------------------------------------------------------------------- status routes


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """``ok`` while serving, 503 ``draining`` once shutdown began."""
    if request.app[STATE].draining:
        return web.Response(status=503, text="draining", content_type="text/plain", charset="utf-8")
    return web.Response(text="ok", content_type="text/plain", charset="utf-8")


@routes.get("/info")
async def info(request: web.Request) -> web.Response:
    """The §4.1 ``Register`` document plus version, protocols, auth, limits, GPUs and load."""
    state = request.app[STATE]
    await state.settled()
    body = await asyncio.to_thread(state.info)
    return web.json_response(body)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format 0.0.4."""
    body = await asyncio.to_thread(request.app[STATE].metrics.render)
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


# --------------------------------------------------------------------------- uploads


def _format_of(content_type: str, head: bytes) -> str:
    """``soma`` (v2 frame), ``json`` (v1 Value) or ``msgpack`` (named-map Value): by type, else sniffed."""
    if content_type == V2_CONTENT_TYPE:
        return "soma"
    if content_type == "application/json":
        return "json"
    if content_type == "application/msgpack":
        return "msgpack"
    if head.startswith(V2_MAGIC):
        return "soma"
    return "json" if head.lstrip()[:1] == b"{" else "msgpack"


_NOT_KEPT = object()


def _decode_stored(stored: StoredValue) -> Any:
    """The value of a stored file as the worker sees it (never unpickled). Raises ``WireError``."""
    if stored.kind == "npy":
        return stored.load_array()
    return _decode_body(stored.read_bytes(), stored.kind)


def _decode_body(data: bytes | bytearray | memoryview, kind: str) -> Any:
    """The value of a stored body of ``kind`` ``soma``, ``json`` or ``msgpack``. Raises ``WireError``."""
    from soma.wire import v1, v2

    if kind == "soma":
        return v2.decode_value_frame(data, "worker")
    try:
        raw = json.loads(bytes(data)) if kind == "json" else msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError("bad_message", f"undecodable {kind} value: {exc}") from exc
    return v1.decode_value(raw)


def _validate_upload(store: Store, key: str, body: bytes | bytearray | memoryview | None = None) -> StoredValue:
    """Decode a freshly stored upload (from ``body`` when given, else its file); an undecodable
    one is removed and raises ``WireError``. A v2 value is kept decoded for the plans that use it."""
    stored = store.find_cached(key)
    if stored.kind == "soma" and store.recent.get(key, _NOT_KEPT) is not _NOT_KEPT:
        return stored  # the same bytes were uploaded and decoded lately
    try:
        value = _decode_stored(stored) if body is None else _decode_body(body, stored.kind)
    except (WireError, ValueError, OSError) as exc:
        stored.path.unlink(missing_ok=True)
        if isinstance(exc, WireError):
            raise
        raise WireError("bad_message", f"undecodable upload: {exc}") from exc
    if stored.kind == "soma":
        store.recent.put(key, value, stored.size)
    return stored


def _commit_upload(store: Store, pending: Upload, body: memoryview) -> tuple[str, StoredValue]:
    """Store and validate a body received whole (and written): the file is never read back.

    A v2 value decodes to read-only views on ``body``, which the values kept decoded hold on to.
    """
    with pending:
        key = pending.commit()
    return key, _validate_upload(store, key, body)


@routes.post("/upload")
async def upload(request: web.Request) -> web.Response:
    """Store one value (§4.3) and answer its reference: v1 ``Local{path}``, v2 ``Cached{cache_key, size}``."""
    state = request.app[STATE]
    store = _store(state)
    limit = state.config.max_upload_bytes
    size = request.content_length
    if size is not None and size > limit:
        return _json_error(413, "too_large", f"body of {size} bytes exceeds the upload limit of {limit} bytes")
    reader = request.content
    head = await reader.read(_CHUNK)
    if not head:
        return _json_error(400, "bad_message", "empty body: upload one encoded value")
    kind = _format_of(request.content_type, head)
    suffix = {"soma": ".soma", "json": ".json", "msgpack": ".msgpack"}[kind]
    try:
        pending = await asyncio.to_thread(store.open_upload, suffix, size=size, limit=limit)
        if size is not None:
            # Validation decodes the whole body anyway: receiving it into one buffer spares a
            # thread hop per chunk and reading the file back.
            body = await _receive(reader, head, size, pending)
            key, stored = await asyncio.to_thread(_commit_upload, store, pending, body)
        else:
            with pending:
                chunk = head
                while chunk:
                    await asyncio.to_thread(pending.write, chunk)
                    chunk = await _read_at_least(reader, _CHUNK)
                key = await asyncio.to_thread(pending.commit)
            stored = await asyncio.to_thread(_validate_upload, store, key)
    except StoreError as exc:
        return _json_error(exc.http_status, exc.code, str(exc))
    except WireError as exc:
        return _json_error(400, exc.code, f"undecodable {kind} value: {exc.message}")
    state.metrics.bytes_received.inc(stored.size)
    if kind == "soma":
        return web.json_response({"type": "Cached", "cache_key": key, "size": stored.size})
    return web.json_response({"type": "Local", "path": str(stored.path)})


async def _receive(reader: Any, head: bytes, size: int, pending: Upload) -> memoryview:
    """The body of ``Content-Length`` ``size`` in one buffer (what arrived, if the peer stopped early).

    It is written to ``pending`` step by step while the rest arrives, so the file write and
    the hash overlap the network rather than following it. Aborts ``pending`` on failure.
    The buffer is a numpy allocation, which the kernel backs with huge pages: a 100 MB
    ``bytearray`` would take 25,000 page faults to fill.
    """
    import numpy as np

    view = np.empty(size, dtype=np.uint8).data
    position = len(head)
    view[:position] = head
    written = 0
    writing: asyncio.Future[None] | None = None
    reader.set_read_chunk_size(_RECEIVE_WINDOW)
    try:
        while position < size:
            chunk = await reader.readany()
            if not chunk:
                break
            end = min(size, position + len(chunk))
            view[position:end] = chunk[: end - position]
            position = end
            if position - written >= _WRITE_STEP and (writing is None or writing.done()):
                if writing is not None:
                    writing.result()
                writing = asyncio.ensure_future(asyncio.to_thread(pending.write, view[written:position]))
                written = position
        if writing is not None:
            await writing
        if written < position:
            await asyncio.to_thread(pending.write, view[written:position])
    except BaseException:
        if writing is not None and not writing.done():
            await asyncio.wait([writing])  # never close the file under a write in flight
        pending.abort()
        raise
    return view if position == size else view[:position]


async def _read_at_least(reader: Any, n: int) -> bytes:
    """Up to ``n`` bytes, gathered from as many network chunks as arrive (so a thread hop moves ~1 MiB)."""
    parts = []
    total = 0
    while total < n:
        chunk = await reader.read(n - total)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


def _store(state: WorkerState) -> Store:
    if state.store is None:  # pragma: no cover - routes only run inside cleanup_ctx
        raise web.HTTPServiceUnavailable(text="the store is not open")
    return state.store


# --------------------------------------------------------------------------- downloads


def _parse_ref(text: str | None) -> Any:
    """The ``DataRef`` of a ``?ref=`` JSON document (``Cached`` keys as hex or 32 ints). Raises ``BadRequest``."""
    if not text:
        raise BadRequest("missing ?ref=<JSON DataRef>")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"?ref= is not JSON: {exc}") from exc
    from soma.wire.messages import CachedRef

    if isinstance(data, dict) and data.get("type") == "Cached" and isinstance(data.get("cache_key"), str):
        return CachedRef(cache_key=data["cache_key"])
    from soma.wire import v1

    try:
        return v1.decode_ref(data)
    except WireError as exc:
        raise BadRequest(f"?ref= is not a DataRef: {exc.message}") from exc


def _resolve(store: Store, ref: Any) -> StoredValue | Any:
    """A ``StoredValue`` for store/data-store references, the value itself for ``Inline``."""
    from soma.wire.messages import CachedRef, InlineRef, LocalRef

    if isinstance(ref, LocalRef):
        return store.resolve_local(ref.path)
    if isinstance(ref, CachedRef):
        return store.find_cached(ref.cache_key)
    if isinstance(ref, InlineRef):
        return ref
    raise _Unsupported(f"{ref.type} references are not supported by this worker; upload the value instead")


class _Unsupported(StoreError):
    code = "unsupported_reference"
    http_status = 400


class _NotAcceptable(Exception):
    """The value has no form in the requested format (406)."""


def _holds_opaque(value: Any) -> bool:
    if isinstance(value, Opaque):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_opaque(item) for item in value)
    if isinstance(value, dict):
        return any(_holds_opaque(key) or _holds_opaque(item) for key, item in value.items())
    return False


def _converted(value: Any, want_v2: bool) -> bytes:
    """``value`` as a v2 frame or a v1 JSON ``Value``; raises ``_NotAcceptable`` when v1 cannot carry it."""
    from soma.wire import v1, v2

    if want_v2:
        return v2.encode_value_frame(value)
    if _holds_opaque(value):
        raise _NotAcceptable("the value holds objects that only wire v2 carries; request Accept: " + V2_CONTENT_TYPE)
    try:
        encoded = v1.encode_value(value)
        return json.dumps(encoded, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (WireError, ValueError) as exc:
        message = exc.message if isinstance(exc, WireError) else str(exc)
        raise _NotAcceptable(f"{message}; request Accept: {V2_CONTENT_TYPE}") from exc


async def _send_file(
    request: web.Request, stored: StoredValue, content_type: str, metrics: WorkerMetrics
) -> web.StreamResponse:
    """Send a stored file as is (its pin is held by the caller until the last byte left).

    ``FileResponse`` uses ``sendfile``: the kernel copies the bytes from the page cache to
    the socket, with no read into Python and no thread hop per chunk.
    """
    response = _SentFile(stored.path, headers={"Content-Type": content_type})
    await response.prepare(request)
    if request.method != "HEAD":  # a HEAD (does the worker still hold it?) sends no body
        metrics.bytes_sent.inc(stored.size)
    return response


class _SentFile(web.FileResponse):
    """A ``FileResponse`` sent inside the handler, while the caller holds the file's pin.

    aiohttp prepares the response a handler returns; unlike ``StreamResponse.prepare``,
    ``FileResponse.prepare`` would send the file again, so a prepared one is left alone.
    """

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)


def _wants_path(request: web.Request) -> bool:
    """Whether to answer a download with the stored file's path: the client accepts that form and
    connects from this host (loopback), where it can map the file instead of copying it."""
    return V2_PATH_CONTENT_TYPE in request.headers.get("Accept", "") and is_loopback(request.remote or "")


@routes.get("/download")
async def download(request: web.Request) -> web.StreamResponse:
    """Send a stored value: a v2 frame with ``Accept: application/vnd.soma.v2``, else a v1 JSON ``Value``;
    to a same-host client accepting ``V2_PATH_CONTENT_TYPE``, where its stored frame lies."""
    from soma.wire.messages import InlineRef

    state = request.app[STATE]
    store = _store(state)
    want_v2 = V2_CONTENT_TYPE in request.headers.get("Accept", "")
    content_type = V2_CONTENT_TYPE if want_v2 else "application/json"
    try:
        ref = _parse_ref(request.query.get("ref"))
        resolved = await asyncio.to_thread(_resolve, store, ref)
    except StoreError as exc:
        return _json_error(exc.http_status, exc.code, str(exc))
    if isinstance(resolved, InlineRef):
        try:
            body = await asyncio.to_thread(_converted, resolved.value, want_v2)
        except _NotAcceptable as exc:
            return _json_error(406, "encoding_error", str(exc))
        state.metrics.bytes_sent.inc(len(body))
        return web.Response(body=body, headers={"Content-Type": content_type})
    stored: StoredValue = resolved
    pin = await asyncio.to_thread(store.pin, stored.key) if stored.key is not None else None
    try:
        if stored.kind == "soma" and _wants_path(request):
            # Same host: the client maps the file itself rather than receiving a copy over TCP.
            document = {"path": str(stored.path), "size": stored.size}
            return web.json_response(document, content_type=V2_PATH_CONTENT_TYPE)
        if (stored.kind == "soma" and want_v2) or (stored.kind == "json" and not want_v2):
            return await _send_file(request, stored, content_type, state.metrics)
        try:
            body = await asyncio.to_thread(lambda: _converted(_decode_stored(stored), want_v2))
        except _NotAcceptable as exc:
            return _json_error(406, "encoding_error", str(exc))
        except WireError as exc:
            return _json_error(500, "internal", f"stored value {stored.path.name} is unreadable: {exc.message}")
        state.metrics.bytes_sent.inc(len(body))
        return web.Response(body=body, headers={"Content-Type": content_type})
    finally:
        if pin is not None:
            await asyncio.to_thread(pin.release)


# --------------------------------------------------------------------------- WebSocket


@routes.get("/ws")
async def websocket(request: web.Request) -> web.StreamResponse:
    """Upgrade to a wire connection: subprotocol ``soma.v2`` selects v2, none v1 (§5.1)."""
    from soma.worker.connection import PING_INTERVAL_S, SUBPROTOCOL_V2, Connection, SomaWebSocket

    state = request.app[STATE]
    if state.draining:
        return _json_error(503, "shutting_down", "the worker is shutting down; connect elsewhere or later")
    ws = SomaWebSocket(
        protocols=(SUBPROTOCOL_V2,),
        max_msg_size=state.config.max_message_bytes,
        heartbeat=PING_INTERVAL_S,
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        return _json_error(400, "bad_message", "GET /ws expects a WebSocket upgrade")
    await ws.prepare(request)
    dialect: Dialect = "v2" if ws.ws_protocol == SUBPROTOCOL_V2 else "v1"
    connection = Connection(ws, dialect=dialect, host=state, peer=request.remote)
    state.connections.add(connection)
    try:
        await connection.run()
    finally:
        state.connections.discard(connection)
    return ws


# --------------------------------------------------------------------------- resources


async def _store_lifetime(app: web.Application) -> AsyncIterator[None]:
    """Open the store (lock, startup sweep), sweep it periodically, release the lock at the end."""
    state = app[STATE]
    config = state.config
    fresh = config.temp_dir is None
    root = Path(tempfile.mkdtemp(prefix=f"soma-worker-{config.worker_id}-")) if fresh else config.temp_dir
    assert root is not None
    store = Store(root, ttl=config.store_ttl, max_bytes=config.store_max_bytes, data_store=config.data_store)
    await asyncio.to_thread(store.open)
    state.store = store
    state.metrics.attach(store=store)
    sweeper = asyncio.create_task(_sweep_forever(store, config.store_sweep), name="soma-store-sweeper")
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        store.close()
        if fresh:
            await asyncio.to_thread(shutil.rmtree, root, True)


async def _sweep_forever(store: Store, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            deleted = await asyncio.to_thread(store.sweep)
        except OSError as exc:
            worker_logger.warning("store sweep failed: %s", exc)
            continue
        if deleted:
            worker_logger.debug("store sweep deleted %d file(s)", deleted)


async def _pool_lifetime(app: web.Application) -> AsyncIterator[None]:
    """The work dir now; the memory watch (§3.3) and the child pool once made (``_open_pool``, after the
    bind); on exit every child is killed."""
    state = app[STATE]
    config = state.config
    try:
        await asyncio.to_thread(config.work_dir.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise SomaConfigError(f"cannot create the work dir {config.work_dir}: {exc.strerror or exc}") from exc
    try:
        yield
    finally:
        if state.pool is not None:
            await asyncio.to_thread(state.pool.close)
        if state.memory_watch is not None:
            await asyncio.to_thread(state.memory_watch.stop)


async def _open_pool(state: WorkerState) -> None:
    """Start the memory watch and make the child pool (their modules load on a thread)."""
    await asyncio.to_thread(importlib.import_module, "soma.isolation.pool")
    from soma.isolation.limits import MemoryWatch
    from soma.isolation.pool import Pool

    config = state.config
    watch = MemoryWatch(total_limit=state.memory_limit(), child_limit=config.child_memory)
    watch.start()
    state.memory_watch = watch
    state.pool = Pool(
        max_idle=config.max_idle_children if config.max_idle_children is not None else config.max_concurrent,
        idle_ttl=config.child_idle_ttl,
        max_tasks=config.child_max_tasks,
        max_idle_rss=config.child_max_idle_rss,
        restricted=True,
        memory_watch=watch,
    )
    state.metrics.attach(pool=state.pool)


def _executor_ctx(factory: ExecutorFactory) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        # Made in the background: the worker binds, and answers /health, while the executor's
        # modules load; whatever needs the executor waits for it (WorkerState.settled).
        making = asyncio.ensure_future(_make_executor(state, factory))
        state.executor_pending = making
        try:
            yield
        finally:
            if not making.done():
                making.cancel()
            await asyncio.wait([making])
            if state.executor is not None:
                await state.executor.close()

    return lifetime


async def _make_executor(state: WorkerState, factory: ExecutorFactory) -> None:
    await _open_pool(state)
    assert state.pool is not None and state.store is not None
    # Imported on a thread: compiling these modules would otherwise hold the loop.
    await asyncio.to_thread(importlib.import_module, "soma.worker.connection")
    if factory is _default_executor:
        await asyncio.to_thread(importlib.import_module, "soma.worker.execute")
    state.executor = factory(
        state.config, pool=state.pool, store=state.store, metrics=state.metrics, capabilities=state.effective
    )
    state.metrics.attach(status=state.executor_status)


def build_app(
    config: WorkerConfig,
    *,
    effective: Effective,
    on_shutdown: Callable[[float | None, str | None], None] | None = None,
    executor_factory: ExecutorFactory | None = None,
) -> web.Application:
    """The worker's ``web.Application`` for ``config`` and the detected-and-capped ``effective`` values.

    ``on_shutdown(drain_s, reason)`` is called once when a client's ``Shutdown`` is accepted.
    ``executor_factory`` replaces the default ``PlanExecutor`` (tests).
    """
    app = web.Application(middlewares=[_error_bodies, _authenticate], client_max_size=config.max_upload_bytes)
    metrics = WorkerMetrics(slots_total=config.max_concurrent)
    state = WorkerState(
        config=config,
        effective=effective,
        metrics=metrics,
        load_meter=LoadMeter(
            cpu_cores=effective.cpu_cores,
            ram_bytes=effective.ram_bytes,
            gpu_uuids=tuple(gpu.uuid for gpu in effective.gpus),
        ),
        on_shutdown=on_shutdown,
    )
    metrics.memory_limit_bytes = state.memory_limit()
    app[STATE] = state
    app.add_routes(routes)
    app.cleanup_ctx.extend([_store_lifetime, _pool_lifetime, _executor_ctx(executor_factory or _default_executor)])
    return app
