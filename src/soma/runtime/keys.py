"""Cache keys (api §6.1): how keys are derived from digests, and the keys of one run.

    parts ──cache_key()──► SHA-256 hex  (fit_key, out_key, fanin_key build on it)
    run (shape, nodes, x, y, seed) ──KeyBook──► input, fit and output keys per node

A key is a SHA-256 over length-prefixed parts: ``content`` digests
(``soma.runtime.hashing``), the keys of predecessors, the seed and the batch size.
The derivation functions take digests, never values, so deriving a key costs one
small SHA-256 whatever the data. ``KeyBook`` applies them along the edges of one run,
hashing x and y at most once.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from soma.errors import SomaConfigError
from soma.runtime.batching import has_partial_fit
from soma.runtime.hashing import Unhashable, content
from soma.runtime.plan import GraphShape

if TYPE_CHECKING:
    from soma.runtime.nodes import NodeRecord

__all__ = ["KeyBook", "cache_key", "fanin_key", "fit_key", "out_key"]

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


_UNKNOWN: Any = object()  # a key that cannot be known before the run produces an output


class KeyBook:
    """The cache keys of one run (§6.1): x and y hashed at most once, keys derived along edges.

    A key is a 64-hex ``str``, ``None`` when undefined (a part cannot be hashed; the
    reason is in ``reasons``), or unknown yet (absent) when it depends on the actual
    output of a node that has not run.
    """

    def __init__(
        self,
        shape: GraphShape,
        nodes: Mapping[str, NodeRecord],
        *,
        x: Any,
        y: Any = None,
        seed: int | None,
        batch_size: int | None = None,
        state_keys: Mapping[str, str | None] | None = None,
    ) -> None:
        self._shape = shape
        self._nodes = nodes
        self._x = x
        self._y = y
        self._seed = seed
        self._batch_size = batch_size
        self.state_keys: dict[str, str | None] = dict(state_keys or {})
        self._data: dict[str, bytes | None] = {}
        self._params: dict[str, bytes | None] = {}
        self._output_content: dict[str, bytes | str | None] = {}
        self.in_keys: dict[str, bytes | str | None] = {}
        self.fit_keys: dict[str, str | None] = {}
        self.out_keys: dict[str, str | None] = {}
        self.reasons: dict[str, str] = {}

    def _content(self, value: Any) -> bytes | None:
        try:
            return content(value)
        except Unhashable:
            return None

    def _run_data(self, name: str, nid: str) -> bytes | None:
        """``content`` of the run's x or y, hashed at most once per run."""
        if name not in self._data:
            self._data[name] = self._content(self._x if name == "x" else self._y)
        digest = self._data[name]
        if digest is None:
            self.reasons.setdefault(
                nid, "its input x cannot be hashed" if name == "x" else "y cannot be hashed"
            )
        return digest

    def data_digest(self, name: str) -> bytes | None:
        """``content`` of the run's x or y (``name``) if a key needed it already, else ``None``."""
        return self._data.get(name)

    def params(self, nid: str) -> bytes | None:
        """``content`` of the node's current parameters (read at each run), ``None`` if unhashable."""
        if nid in self._params:
            digest = self._params[nid]
        else:
            try:
                digest = self._nodes[nid].params_content()
            except Unhashable:
                digest = None
            self._params[nid] = digest
        if digest is None:
            self.reasons.setdefault(nid, "its parameters cannot be hashed")
        return digest

    def ref(self, pid: str, outputs: Mapping[str, Any]) -> Any:
        """``out_key(p)`` for a cacheable p with a defined key, else ``content`` of p's actual output."""
        if self._nodes[pid].cacheable:
            key = self.out_keys.get(pid)
            if key is not None:
                return key
        if pid in self._output_content:
            return self._output_content[pid]
        if pid not in outputs:
            return _UNKNOWN
        digest = self._content(outputs[pid])
        self._output_content[pid] = digest
        return digest

    def in_key(self, nid: str, outputs: Mapping[str, Any]) -> Any:
        """The input key of a node; ``_UNKNOWN`` while it depends on an output not produced yet."""
        if nid in self.in_keys:
            return self.in_keys[nid]
        preds = self._shape.predecessors[nid]
        if not preds:
            key: Any = self._run_data("x", nid)
            self.in_keys[nid] = key
            return key
        refs: list[tuple[str, bytes | str]] = []
        for pred in preds:
            ref = self.ref(pred, outputs)
            if ref is _UNKNOWN:
                return _UNKNOWN
            if ref is None:
                self.reasons.setdefault(nid, f"the output of `{pred}` cannot be hashed")
                self.in_keys[nid] = None
                return None
            refs.append((pred, ref))
        key = refs[0][1] if len(refs) == 1 else fanin_key(refs)
        self.in_keys[nid] = key
        return key

    def fit_key(self, nid: str, in_key: Any) -> str | None:
        """The state key of a trainable node in a fit (batch size counted for ``partial_fit`` filters)."""
        if nid in self.fit_keys:
            return self.fit_keys[nid]
        node = self._nodes[nid]
        key: str | None = None
        params = self.params(nid)
        y = self._run_data("y", nid)
        if in_key is not None and params is not None and y is not None:
            batch = self._batch_size if has_partial_fit(node.filter) else None
            key = node.derived_key(("state", params, in_key, y, self._seed, batch))
        self.fit_keys[nid] = key
        return key

    def out_key(self, nid: str, in_key: Any, state_key: str | None) -> str | None:
        """The output key of a node given its input key and the key of the state it runs with."""
        if nid in self.out_keys:
            return self.out_keys[nid]
        key: str | None = None
        params = self.params(nid)
        if in_key is not None and params is not None:
            if state_key is None:
                self.reasons.setdefault(nid, "its state was produced without a cache key")
            else:
                key = self._nodes[nid].derived_key(
                    ("output", params, state_key, in_key, self._seed)
                )
        self.out_keys[nid] = key
        return key

    def predict(self, nid: str, outputs: Mapping[str, Any]) -> str | None:
        """The output key of a cacheable node if it can be known now (fit keys use this run's x and y)."""
        in_key = self.in_key(nid, outputs)
        if in_key is _UNKNOWN:
            return None
        node = self._nodes[nid]
        if not node.trainable:
            state_key: str | None = "stateless"
        elif nid in self.state_keys:
            state_key = self.state_keys[nid]
        else:
            state_key = self.fit_key(nid, in_key)
        return self.out_key(nid, in_key, state_key)
