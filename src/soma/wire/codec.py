"""One entry point per connection: the codec of its dialect and the version policy (worker.md §5.1).

The dialect is fixed when the WebSocket is opened (``soma.v2`` subprotocol or none),
so a connection builds one :class:`Codec` and feeds it every frame. Refusals are
``WireError`` codes raised before any value is materialised:

- v2: every envelope carries ``v``; missing or different -> ``protocol_mismatch``
  (details ``{"worker": [1, 2], "peer": v, "older": ...}``); on the worker side a
  request before ``Hello`` -> ``hello_required``; text frames -> ``bad_message``.
- v1: ``plan.protocol_version`` absent or ``1`` is accepted, anything else is
  ``protocol_mismatch``; binary frames carry the stream sub-protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeAlias

from soma.wire.errors import WireError
from soma.wire.messages import (
    CLIENT_MESSAGES,
    MESSAGE_TYPES,
    PLAN_CARRIERS,
    WIRE_VERSION,
    WORKER_MESSAGES,
    Hello,
    Reply,
    Request,
    SerializedPlan,
    version_refusal,
)

if TYPE_CHECKING:
    from soma.wire.v2 import Side

__all__ = ["Codec", "Dialect", "check_version"]

Dialect: TypeAlias = Literal["v1", "v2"]
Frame: TypeAlias = str | bytes | bytearray | memoryview


def check_version(peer: object, *, side: Side = "worker", plan_id: str | None = None) -> None:
    """Raise the ``protocol_mismatch`` refusal unless ``peer`` is this package's v2."""
    if type(peer) is not int or peer != WIRE_VERSION:
        error = version_refusal(peer, side=side)
        error.plan_id = plan_id
        raise error


class Codec:
    """Encoder and decoder of one connection.

    ``side`` is who decodes: ``"worker"`` never unpickles and keeps arrays as read-only
    views; ``"client"`` materialises values. A worker-side v2 codec also enforces that
    the first request is ``Hello`` (``require_hello``, default on there).
    """

    def __init__(self, dialect: Dialect, *, side: Side, require_hello: bool | None = None) -> None:
        if dialect not in ("v1", "v2"):
            raise ValueError(f"unknown wire dialect {dialect!r}; use 'v1' or 'v2'")
        if side not in ("worker", "client"):
            raise ValueError(f"unknown side {side!r}; use 'worker' or 'client'")
        self.dialect: Dialect = dialect
        self.side: Side = side
        self.require_hello = (
            (dialect == "v2" and side == "worker") if require_hello is None else require_hello
        )
        self.hello_seen = False

    def __repr__(self) -> str:
        return f"Codec({self.dialect!r}, side={self.side!r})"

    def encode(self, message: Request | Reply) -> str | bytes:
        """One frame: ``str`` for a text frame (v1 JSON), ``bytes`` for a binary frame."""
        # Imported on first use: they load numpy, which a starting worker does not need to bind.
        from soma.wire import v1, v2

        if self.dialect == "v1":
            return v1.encode(message)
        return v2.encode_frame(message)

    def encode_parts(self, message: Request | Reply) -> list[str | bytes | memoryview]:
        """Like :meth:`encode`, but a binary frame comes as chunks that avoid copying buffers."""
        from soma.wire import v1, v2

        if self.dialect == "v1":
            return [v1.encode(message)]
        return list(v2.encode_frame_parts(message))

    def decode(self, data: Frame) -> Request | Reply:
        """Decode one frame; every failure is a ``WireError`` carrying a §5.8 code.

        A worker-side codec accepts only requests and a client-side one only replies:
        a message travelling the wrong way is ``bad_message``.
        """
        if self.dialect == "v1":
            from soma.wire import v1

            message = v1.decode(data)
            self._check_direction(message.type, None)
            plan = _plan_of(message)
            if plan is not None and plan.protocol_version not in (None, 1):
                error = version_refusal(plan.protocol_version, side=self.side)
                error.plan_id = plan.plan_id
                raise error
            return message
        if isinstance(data, str):
            raise WireError("bad_message", "text frames are not part of wire v2; send binary frames")
        from soma.wire import v2

        head = v2.read_head(data)
        request_id = head.id if isinstance(head.id, str) else None
        try:
            check_version(head.v, side=self.side)
            self._check_direction(head.type, request_id)
            if self.require_hello and not self.hello_seen and head.type != Hello.type:
                raise WireError("hello_required", f"the first frame must be Hello, got {head.type!r:.80}")
        except WireError as exc:
            exc.request_id = request_id
            raise
        message = v2.decode_message(head, self.side)
        plan = _plan_of(message)
        if plan is not None and plan.protocol_version not in (None, WIRE_VERSION):
            error = version_refusal(plan.protocol_version, side=self.side)
            error.plan_id, error.request_id = plan.plan_id, request_id
            raise error
        if isinstance(message, Hello):
            self.hello_seen = True
        return message

    def _check_direction(self, kind: object, request_id: str | None) -> None:
        incoming = CLIENT_MESSAGES if self.side == "worker" else WORKER_MESSAGES
        if isinstance(kind, str) and kind in MESSAGE_TYPES and kind not in incoming:
            wrong = "a worker message, not a request" if self.side == "worker" else "a request, not a reply"
            raise WireError("bad_message", f"{kind} is {wrong}", request_id=request_id)



def _plan_of(message: Request | Reply) -> SerializedPlan | None:
    if isinstance(message, PLAN_CARRIERS):
        return message.plan
    return None
