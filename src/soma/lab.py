"""``soma.Lab``: a small synchronous handle on a running Soma worker (api.md §10).

Built on ``urllib.request`` so that ``import soma`` stays light and no event loop is needed.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["Lab"]

DEFAULT_TIMEOUT_S = 5.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects, so the token in the Authorization header never reaches another host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No ProxyHandler: like the aiohttp client, Lab ignores proxy environment variables.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


class Lab:
    """A Soma lab (worker) at ``url``, reached over HTTP with an optional Bearer ``token``.

    ``Lab(url)`` only records the address; ``Lab.connect(url)`` also checks ``/health``.
    Every request failure raises ``ConnectionError("Cannot connect to Soma lab at <url>: <cause>")``.

    >>> lab = Lab.connect("http://127.0.0.1:8080")   # doctest: +SKIP
    >>> lab.health()                                  # doctest: +SKIP
    'ok'
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not isinstance(url, str):
            raise TypeError(f"Lab url must be a str, got {type(url).__name__}")
        if token is not None and not isinstance(token, str):
            raise TypeError(f"Lab token must be a str or None, got {type(token).__name__}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def connect(cls, url: str, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> Lab:
        """Return a ``Lab`` for ``url`` after a successful ``GET /health`` (``timeout`` seconds).

        Raises ``ConnectionError`` naming the URL and the cause on any failure.
        """
        lab = cls(url, token, timeout=timeout)
        lab.health()
        return lab

    def _get(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path, method="GET")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace").strip()[:200]
            cause = f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
            raise ConnectionError(f"Cannot connect to Soma lab at {self.url}: {cause}") from exc
        except urllib.error.URLError as exc:
            raise ConnectionError(f"Cannot connect to Soma lab at {self.url}: {exc.reason}") from exc
        except (OSError, ValueError, http.client.HTTPException) as exc:
            cause = str(exc) or type(exc).__name__
            raise ConnectionError(f"Cannot connect to Soma lab at {self.url}: {cause}") from exc

    def health(self) -> str:
        """The text of ``GET /health`` (``"ok"`` for a serving worker)."""
        return self._get("/health").decode("utf-8", errors="replace")

    def info(self) -> dict[str, Any]:
        """The ``GET /info`` document: worker id, capabilities, version, load, ..."""
        body = self._get("/info")
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise ConnectionError(f"Cannot connect to Soma lab at {self.url}: /info is not JSON") from exc
        if not isinstance(document, dict):
            raise ConnectionError(f"Cannot connect to Soma lab at {self.url}: /info is not a JSON object")
        return document

    def workers(self) -> list[dict[str, Any]]:
        """The lab's workers: ``[self.info()]``."""
        return [self.info()]

    def __repr__(self) -> str:
        return f"Lab({self.url!r})"
