"""The network under the client core: the :class:`Transport` interface, one method per kind of call.

The async core talks to workers only through a :class:`Transport` (WebSocket connections
as :class:`Channel`, complete HTTP responses as :class:`HttpResponse`), so tests can put a
fake worker in its place. Implementations raise soma errors only;
:class:`~soma.client.aiohttp_transport.AiohttpTransport` is the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from soma.client.timeout import Timeout

__all__ = ["Body", "Channel", "HttpResponse", "Transport"]

Body = bytes | Sequence[bytes | memoryview]


class Channel(Protocol):
    """One open WebSocket as the client core sees it."""

    #: The subprotocol the worker granted (``None`` when it granted none).
    protocol: str | None

    async def send(self, data: bytes) -> None:
        """Send one binary message; raises ``RemoteError`` when the connection is gone."""
        ...

    async def receive(self) -> bytes | str | None:
        """The next data message; ``None`` once the connection is closed."""
        ...

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        ...

    @property
    def close_code(self) -> int | None:
        """The close code once closed, else ``None``."""
        ...


@dataclass(frozen=True)
class HttpResponse:
    """A complete HTTP response."""

    status: int
    content_type: str
    body: bytes | bytearray | memoryview


class Transport(Protocol):
    """The network under a client: WebSocket connections and HTTP requests.

    Implementations raise soma errors only (``RemoteError``, ``RemoteTimeoutError``,
    ``ProtocolError``), never those of their library.
    """

    async def connect(
        self, url: str, *, headers: Mapping[str, str], protocols: tuple[str, ...], timeout: Timeout
    ) -> Channel:
        """Open a WebSocket to ``url`` offering ``protocols``."""
        ...

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: Body | None = None,
        timeout: Timeout,
    ) -> HttpResponse:
        """One HTTP request; any status comes back as a response. A body given as parts is streamed."""
        ...

    async def aclose(self) -> None:
        """Release connections and sessions."""
        ...
