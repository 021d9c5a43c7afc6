"""The default :class:`~soma.client.transport.Transport`: WebSockets and HTTP over one aiohttp session.

The only client module that imports aiohttp, and the boundary where its exceptions become
soma errors (an unreachable worker is ``RemoteError``, a slow one ``RemoteTimeoutError``,
a body longer than it announced ``ProtocolError``), so the core above never sees a library error. Large
bodies are streamed a slice at a time on the way out and read into one buffer on the way in,
so arrays cross without extra copies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from soma.client.timeout import Timeout
from soma.client.transport import Body, Channel, HttpResponse
from soma.errors import ProtocolError, RemoteError, RemoteTimeoutError
from soma.log import client_logger

__all__ = ["AiohttpTransport"]

_LARGE_BODY = 1 << 20
_SEND_SLICE = 1 << 20


def _unreachable(url: str, exc: BaseException) -> RemoteError:
    cause = str(exc) or type(exc).__name__
    return RemoteError(
        f"cannot reach worker {url}: {cause}; check that it is running and the address is right",
        code="worker_lost",
        retryable=True,
    )


class _AiohttpChannel:
    """``Channel`` over an aiohttp client WebSocket."""

    def __init__(self, ws: Any, url: str) -> None:
        self._ws = ws
        self._url = url
        self.protocol: str | None = ws.protocol

    async def send(self, data: bytes) -> None:
        import aiohttp

        try:
            await self._ws.send_bytes(data)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise RemoteError(
                f"connection to worker {self._url} broke while sending: {exc}", code="worker_lost", retryable=True
            ) from exc

    async def receive(self) -> bytes | str | None:
        import aiohttp

        while True:
            try:
                msg = await self._ws.receive()
            except (aiohttp.ClientError, ConnectionError) as exc:
                client_logger.debug("receive from %s failed: %s", self._url, exc)
                return None
            if msg.type is aiohttp.WSMsgType.BINARY:
                return bytes(msg.data)
            if msg.type is aiohttp.WSMsgType.TEXT:
                return str(msg.data)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return None
            if msg.type is aiohttp.WSMsgType.ERROR:
                client_logger.debug("WebSocket error from %s: %s", self._url, msg.data)
                return None

    async def close(self) -> None:
        await self._ws.close()

    @property
    def close_code(self) -> int | None:
        code = self._ws.close_code
        return None if code is None else int(code)


class AiohttpTransport:
    """The default ``Transport``: one aiohttp ``ClientSession`` (no proxies from the environment)."""

    def __init__(self) -> None:
        self._session: Any = None

    def _client_session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(trust_env=False)
        return self._session

    async def connect(
        self, url: str, *, headers: Mapping[str, str], protocols: tuple[str, ...], timeout: Timeout
    ) -> Channel:
        import aiohttp

        session = self._client_session()
        try:
            async with asyncio.timeout(timeout.connect):
                ws = await session.ws_connect(
                    url,
                    protocols=protocols,
                    headers=dict(headers),
                    autoping=True,
                    max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                )
        except TimeoutError as exc:
            raise RemoteTimeoutError(
                f"connecting to worker {url} took longer than {timeout.connect:g} s", code="worker_lost", retryable=True
            ) from exc
        except aiohttp.WSServerHandshakeError as exc:
            raise _handshake_error(url, exc.status, exc.message) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _unreachable(url, exc) from exc
        return _AiohttpChannel(ws, url)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: Body | None = None,
        timeout: Timeout,
    ) -> HttpResponse:
        import aiohttp

        limits = aiohttp.ClientTimeout(total=None, sock_connect=timeout.connect, sock_read=timeout.silence)
        all_headers = dict(headers)
        data: Any = body
        if body is not None and not isinstance(body, bytes):
            # Streamed part by part with a known length: large buffers are never joined or copied.
            all_headers["Content-Length"] = str(sum(memoryview(part).nbytes for part in body))
            data = _stream(body)
        try:
            async with self._client_session().request(
                method, url, data=data, headers=all_headers, timeout=limits, allow_redirects=False
            ) as response:
                return HttpResponse(response.status, response.content_type, await _read_body(response))
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise RemoteTimeoutError(
                f"{method} {_redact(url)}: no data from the worker for {timeout.silence:g} s",
                code="worker_lost",
                retryable=True,
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _unreachable(_redact(url), exc) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_body(response: Any) -> bytes | memoryview:
    """The body; a large one is read straight into one writable buffer (arrays decode without a copy).

    The buffer is a numpy allocation: numpy asks the kernel for huge pages, so the first
    touch of a 100 MB body faults a few dozen pages instead of 25,000.
    """
    length = response.content_length
    if response.method == "HEAD":
        return b""
    if length is None or length < _LARGE_BODY or response.status != 200:
        return bytes(await response.read())
    import numpy as np

    view = np.empty(length, dtype=np.uint8).data
    position = 0
    async for chunk in response.content.iter_any():
        end = position + len(chunk)
        if end > length:
            raise ProtocolError(f"{response.url} sent more than its Content-Length of {length} bytes")
        view[position:end] = chunk
        position = end
    if position != length:
        raise RemoteError(
            f"{response.url} ended after {position} of {length} bytes", code="worker_lost", retryable=True
        )
    return view


async def _stream(parts: Sequence[bytes | memoryview]) -> AsyncIterator[bytes | memoryview]:
    # A slice at a time: the socket takes most of each at once, and only the rest is copied
    # into the transport's buffer (a 100 MB part written whole would be copied whole).
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, view.nbytes, _SEND_SLICE):
            yield view[start : start + _SEND_SLICE]


def _redact(url: str) -> str:
    return url.split("?", 1)[0]


def _handshake_error(url: str, status: int, reason: str) -> RemoteError:
    if status == 401:
        return RemoteError(
            f"worker {url} refused the connection (HTTP 401): the token is missing or wrong",
            code="unauthorized",
        )
    return RemoteError(f"worker {url} refused the WebSocket upgrade: HTTP {status} {reason}", code="internal")
