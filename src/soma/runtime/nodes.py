"""The executor's view of a graph node, and the per-node memos that keep runs cheap.

A ``NodeRecord`` holds a node's filter and the metadata read when it was added
(trainable, cacheable, stream mode, target, version, requirements). It also memoises
what would otherwise be recomputed at every run: the filter identity, the digest of
parameters that have not changed, and the cache keys derived from them. The Graph
owns the records; the executor (``soma.runtime.executor``), the key book
(``soma.runtime.keys``) and the remote runner read them.
"""

from __future__ import annotations

from typing import Any

from soma.filter import params_of
from soma.runtime.hashing import content, filter_identity
from soma.runtime.keys import fit_key, out_key

__all__ = ["NodeRecord", "has_parameter_owner"]


class NodeRecord:
    """One node as the executor sees it: the filter and the metadata read at ``node()`` time."""

    __slots__ = (
        "_identity",
        "_key_memo",
        "_params_memo",
        "cacheable",
        "differentiable",
        "filter",
        "filter_name",
        "node_id",
        "requirements",
        "stream_mode",
        "target",
        "trainable",
        "version",
    )

    def __init__(
        self,
        node_id: str,
        filter_obj: Any,
        *,
        trainable: bool,
        differentiable: bool = False,
        cacheable: bool = True,
        stream_mode: str = "fixed",
        target: str = "any",
        version: Any = None,
        requirements: tuple[str, ...] = (),
    ) -> None:
        self.node_id = node_id
        self.filter = filter_obj
        self.filter_name = type(filter_obj).__name__
        self.trainable = trainable
        self.differentiable = differentiable
        self.cacheable = cacheable
        self.stream_mode = stream_mode
        self.target = target
        self.version = version
        self.requirements = requirements
        self._identity: bytes | None = None
        self._params_memo: tuple[tuple[Any, ...], bytes] | None = None
        self._key_memo: dict[tuple[Any, ...], str] = {}

    @property
    def kind(self) -> str:
        """``"Trainable"`` or ``"Stateless"``, as events name it."""
        return "Trainable" if self.trainable else "Stateless"

    def identity(self) -> bytes:
        """The filter identity of §6.1, computed once: class code, ``_version`` and requirements are fixed."""
        if self._identity is None:
            self._identity = filter_identity(self.filter, self.version, self.requirements)
        return self._identity

    def params_content(self) -> bytes:
        """``content`` of the filter's current parameters (read at every run).

        Raises ``Unhashable``. Parameters made only of immutable scalars are compared
        with the previous run's and their digest reused while unchanged.
        """
        snapshot = _scalar_snapshot(self.filter)
        memo = self._params_memo
        if memo is not None and snapshot is not None and memo[0] == snapshot:
            return memo[1]
        digest = content(params_of(self.filter))
        if snapshot is not None:
            self._params_memo = (snapshot, digest)
        return digest

    def derived_key(self, parts: tuple[Any, ...]) -> str:
        """``fit_key`` (``parts[0] == "state"``) or ``out_key`` of this node, memoised by their parts."""
        key = self._key_memo.get(parts)
        if key is None:
            if len(self._key_memo) >= _KEY_MEMO_LIMIT:
                self._key_memo.clear()
            if parts[0] == "state":
                key = fit_key(self.identity(), *parts[1:])
            else:
                key = out_key(self.identity(), *parts[1:])
            self._key_memo[parts] = key
        return key

    def copy_with(self, filter_obj: Any) -> NodeRecord:
        """The same node around another filter object of the same class (``Graph.with_params``)."""
        twin = NodeRecord(
            self.node_id,
            filter_obj,
            trainable=self.trainable,
            differentiable=self.differentiable,
            cacheable=self.cacheable,
            stream_mode=self.stream_mode,
            target=self.target,
            version=self.version,
            requirements=self.requirements,
        )
        if type(filter_obj) is type(self.filter):
            twin._identity = self._identity
        return twin


_KEY_MEMO_LIMIT = 256
_SCALARS = frozenset({type(None), bool, int, str, bytes})


def _scalar_snapshot(filter_obj: Any) -> tuple[Any, ...] | None:
    """A comparable image of ``params_of(filter_obj)`` when it holds only immutable scalars, else ``None``.

    Types are part of it (``1 == 1.0 == True`` must not match) and floats are compared
    by ``float.hex`` (``0.0 == -0.0`` must not match either). It reads the instance
    ``__dict__`` in place, applying ``params_of``'s rule (public str names), so that
    an unchanged filter costs no copy of its parameters at each run.
    """
    values = getattr(filter_obj, "__dict__", None)
    if not values:
        return ()  # no instance attributes: no parameters
    if type(values) is not dict:
        return None
    items: list[tuple[str, type, Any]] = []
    for name, value in values.items():
        if not isinstance(name, str) or name.startswith("_"):
            continue
        kind = type(value)
        if kind is float:
            items.append((name, kind, value.hex()))
        elif kind in _SCALARS:
            items.append((name, kind, value))
        else:
            return None
    return tuple(items)


def has_parameter_owner(filter_obj: Any) -> bool:
    """Whether a filter trains weights in place (isolation.md §4): its fit states are never cached."""
    if callable(getattr(filter_obj, "soma_module", None)):
        return True
    if callable(getattr(filter_obj, "named_parameters", None)):
        return True
    return any(
        callable(getattr(getattr(filter_obj, name, None), "named_parameters", None))
        for name in ("module", "model", "net")
    )
