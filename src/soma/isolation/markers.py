"""Marker classes for values that cross the child channel and the v2 wire without being materialised.

Stdlib only: the child daemon, the worker (which never unpickles user objects) and
the wire codecs all import these. The worker's restricted unpickler allows exactly
these classes besides builtin containers and numpy reconstructors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Concat", "Handle", "Opaque", "TorchData"]


@dataclass(eq=True)
class Opaque:
    """Any object, cloudpickled (protocol 5) by whoever holds the real object.

    ``buffers`` holds its out-of-band buffers (empty for in-band cache blobs).
    """

    data: bytes
    buffers: list[Any] = field(default_factory=list)

    def __hash__(self) -> int:
        # Opaque objects can be dict keys (big ints, frozensets) on a worker that never unpickles them.
        return hash(bytes(self.data))


@dataclass(eq=True)
class TorchData:
    """A torch tensor as raw bytes, its torch dtype name (``"bfloat16"``) and shape."""

    buffer: Any
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Handle:
    """A value kept in the child under ``name`` (``"h<n>"``)."""

    name: str


@dataclass(eq=True)
class Concat:
    """Concatenate these items along axis 0 (stream barriers), resolved by the child."""

    items: list[Any]
