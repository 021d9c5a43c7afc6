"""The one exception the wire layer raises.

Decoding and encoding failures are protocol facts, not Python accidents: each carries
a worker.md §5.8 code so the worker can answer with a typed ``Error`` (or a v1
``Failed``) and the client can map it to ``soma.errors`` at its own boundary.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WireError"]


class WireError(Exception):
    """A frame or value that cannot be decoded or encoded under the agreed protocol.

    ``code`` is a §5.8 error code (``bad_message``, ``protocol_mismatch``,
    ``hello_required``, ``encoding_error``, ``bad_plan``, ``unpickle_error``, ...),
    ``message`` the human-readable reason and ``details`` extra structured data sent
    along in the ``Error`` reply. ``request_id`` (the v2 envelope ``id``) and
    ``plan_id`` (v1 correlation) are filled in when the broken frame still revealed
    them, so the reply can be correlated with its request.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
        plan_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}
        self.request_id = request_id
        self.plan_id = plan_id

    def __repr__(self) -> str:
        return f"WireError({self.code!r}, {self.message!r})"
