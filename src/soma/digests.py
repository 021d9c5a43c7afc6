"""Fast digests of bodies sent in parts: how a client and a worker recognise a frame seen before.

Not a store key (the store keeps SHA-256 of length ‖ body, the Soma 0.2.43 rule): a digest only
spares sending, hashing or writing again a body already uploaded or stored.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

__all__ = ["parts_digest"]


def parts_digest(parts: Iterable[bytes | bytearray | memoryview], salt: bytes = b"") -> bytes:
    """XXH3-128 of ``salt`` and the concatenated ``parts``, followed by their total length (u64 LE)."""
    hasher = xxhash.xxh3_128(salt)
    size = 0
    for part in parts:
        hasher.update(part)
        size += memoryview(part).nbytes
    return hasher.digest() + size.to_bytes(8, "little")
