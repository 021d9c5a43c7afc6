"""Cache keys (api §6.1): SHA-256 hex over length-prefixed parts, no I/O.

    parts ──cache_key()──► SHA-256 hex  (fit_key, out_key, fanin_key build on it)

The parts are ``content`` digests (``soma.runtime.hashing``), the keys of
predecessors, the seed and the batch size. These functions take digests, never
values, so deriving a key costs one small SHA-256 whatever the data.
"""

from __future__ import annotations

import hashlib
import struct

from soma.errors import SomaConfigError

__all__ = ["cache_key", "fanin_key", "fit_key", "out_key"]

_KEY_PREFIX = b"soma-cache-v1"
_U64 = struct.Struct("<Q")


def cache_key(*parts: bytes | str) -> str:
    """SHA-256 hex over ``soma-cache-v1`` then each part prefixed by its u64 LE byte length."""
    digest = hashlib.sha256(_KEY_PREFIX)
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"cache key parts must be bytes or str, got {type(part).__name__}")
        digest.update(_U64.pack(len(data)))
        digest.update(data)
    return digest.hexdigest()


def _seed_part(seed: int | None) -> str:
    if seed is None:
        return "none"
    if type(seed) is not int:
        raise SomaConfigError(f"seed must be None or an int, got {seed!r}")
    return str(seed)


def _batch_part(batch_size: int | None) -> str:
    if batch_size is None:
        return ""
    if type(batch_size) is not int or batch_size < 1:
        raise SomaConfigError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    return str(batch_size)


def fit_key(
    identity: bytes,
    params: bytes,
    in_key: bytes | str,
    y: bytes,
    seed: int | None,
    batch_size: int | None,
) -> str:
    """Key of the state a node's ``fit`` produces (api §6.1).

    ``params`` and ``y`` are ``content()`` digests; ``in_key`` is the input's key or digest.
    """
    return cache_key(
        "state", identity, params, in_key, y, _seed_part(seed), _batch_part(batch_size)
    )


def out_key(
    identity: bytes, params: bytes, state_key: str, in_key: bytes | str, seed: int | None
) -> str:
    """Key of a node's ``forward`` output given the key of the state it used (api §6.1)."""
    return cache_key("output", identity, params, state_key, in_key, _seed_part(seed))


def fanin_key(pairs: list[tuple[str, bytes | str]]) -> str:
    """Input key of a node with several predecessors: ``(pred_id, ref)`` pairs in edge order."""
    flat: list[bytes | str] = ["fanin"]
    for pred_id, ref in pairs:
        flat.append(pred_id)
        flat.append(ref)
    return cache_key(*flat)
