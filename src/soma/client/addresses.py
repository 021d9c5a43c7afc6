"""Worker addresses: the one place a user's address becomes the WebSocket and HTTP bases.

A worker is named ``ws://host:port`` (or ``http://``, ``wss://``, ``https://``); the client
opens its WebSocket on the ``ws`` form, sends uploads and downloads to the ``http`` form,
and keys its shared connections by the normalised ``ws`` form.
"""

from __future__ import annotations

from soma.errors import SomaConfigError

__all__ = ["http_base", "ws_base"]


def http_base(address: str) -> str:
    """``ws://h:p`` -> ``http://h:p`` (``wss`` -> ``https``), without a trailing slash."""
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ("ws", "wss", "http", "https"):
        raise SomaConfigError(f"invalid worker address '{address}'")
    return f"{'https' if scheme in ('wss', 'https') else 'http'}://{rest.rstrip('/')}"


def ws_base(address: str) -> str:
    """``http://h:p`` -> ``ws://h:p`` (``https`` -> ``wss``), without a trailing slash."""
    base = http_base(address)
    return "ws" + base.removeprefix("http")
