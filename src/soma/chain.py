"""Topology builders: lazy, immutable descriptions of how filters connect.

``a >> b`` runs b after a (a :class:`Chain`), ``a | b`` runs both from the same
inputs (a :class:`Fork`), and a list stands for a fork of its items. Every operator
returns a new object; nothing is built until ``Graph.somatize`` hands the
description to :func:`walk`, which creates the nodes and edges in order.

Python binds ``>>`` tighter than ``|``: ``A >> B | C`` is ``(A >> B) | C``, a fork
with two roots. Write ``A >> (B | C) >> M`` for fan-out and fan-in.

Stdlib only, and independent of ``soma.filter`` (which delegates its operators here),
so worker children can unpickle topology objects without the rest of Soma.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NoReturn

__all__ = ["Chain", "Fork", "walk"]


class _Frozen:
    """Refuses attribute assignment after construction: topology objects are shared freely."""

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable; operators return new objects")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable; operators return new objects")


class Chain(_Frozen):
    """Steps run one after another, each fed by the previous one's terminals.

    ``steps`` is a tuple of filters, chains and forks; a list given as a step is
    stored as ``Fork.from_list(step)``.
    """

    steps: tuple[Any, ...]

    def __init__(self, steps: list[Any] | tuple[Any, ...]) -> None:
        _require_sequence("Chain", "steps", steps)
        object.__setattr__(
            self, "steps", tuple(Fork.from_list(s) if isinstance(s, list) else s for s in steps)
        )

    def __rshift__(self, other: Any) -> Chain:
        """``c >> g``: a chain's steps are concatenated, anything else is appended."""
        return _followed_by(self.steps, other)

    def __rrshift__(self, other: Any) -> Any:
        if isinstance(other, list):
            return Fork.from_list(other) >> self
        return NotImplemented

    def __or__(self, other: Any) -> Fork:
        """``c | g``: a fork of this chain and g's branches."""
        return Fork([self, *_branches(other)])

    def __ror__(self, other: Any) -> Any:
        if isinstance(other, list):
            return Fork.from_list(other) | self
        return NotImplemented

    def to(self, other: Any) -> Chain:
        """Append ``other`` as one step (a chain stays nested; a list becomes a fork)."""
        return Chain([*self.steps, other])

    def collect(self, step: Any) -> Chain:
        """Append ``step``, typically a filter gathering a fork's outputs."""
        return Chain([*self.steps, step])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chain):
            return NotImplemented
        return self.steps == other.steps

    def __hash__(self) -> int:
        return hash((Chain, self.steps))

    def __repr__(self) -> str:
        return f"Chain([{', '.join(repr(step) for step in self.steps)}])"


class Fork(_Frozen):
    """Branches that all start from the same inputs; its terminals are every branch's, in order.

    ``branches`` is a tuple of chains; any other item is wrapped as a one-step chain.
    """

    branches: tuple[Chain, ...]

    def __init__(self, branches: list[Any] | tuple[Any, ...]) -> None:
        _require_sequence("Fork", "branches", branches)
        object.__setattr__(
            self, "branches", tuple(b if isinstance(b, Chain) else Chain([b]) for b in branches)
        )

    @classmethod
    def from_list(cls, items: Iterable[Any]) -> Fork:
        """Fork over ``items``: chains are kept, forks are spliced in, anything else is wrapped."""
        branches: list[Chain] = []
        for item in items:
            if isinstance(item, Fork):
                branches.extend(item.branches)
            elif isinstance(item, Chain):
                branches.append(item)
            else:
                branches.append(Chain([item]))
        return cls(branches)

    def __rshift__(self, other: Any) -> Chain:
        """``k >> g``: a chain starting with this fork (a chain g is spliced in)."""
        return _followed_by((self,), other)

    def __rrshift__(self, other: Any) -> Any:
        if isinstance(other, list):
            return Fork.from_list(other) >> self
        return NotImplemented

    def __or__(self, other: Any) -> Fork:
        """``k | g``: this fork's branches followed by g's."""
        return Fork([*self.branches, *_branches(other)])

    def __ror__(self, other: Any) -> Any:
        if isinstance(other, list):
            return Fork.from_list(other) | self
        return NotImplemented

    def to(self, other: Any) -> Chain:
        """Same as ``self >> other``."""
        return _followed_by((self,), other)

    def collect(self, step: Any) -> Chain:
        """A chain of this fork followed by ``step``, which receives every branch's output."""
        return Chain([self, step])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fork):
            return NotImplemented
        return self.branches == other.branches

    def __hash__(self) -> int:
        return hash((Fork, self.branches))

    def __repr__(self) -> str:
        return f"Fork([{', '.join(repr(branch) for branch in self.branches)}])"


def walk(
    topology: Any,
    sources: list[str],
    add_node: Callable[[Any], str],
    connect: Callable[[str, str], None],
) -> list[str]:
    """Create the nodes and edges ``topology`` describes; return its terminal node ids.

    A chain threads ``sources`` through its steps in order (an empty chain returns
    them); a fork walks every branch from the same sources and returns all their
    terminals in branch order; a list is ``Fork.from_list(list)``. Anything else
    becomes a node (``add_node(obj)``), connected from each source in order.
    """
    if isinstance(topology, list):
        topology = Fork.from_list(topology)
    if isinstance(topology, Chain):
        terminals = list(sources)
        for step in topology.steps:
            terminals = walk(step, terminals, add_node, connect)
        return terminals
    if isinstance(topology, Fork):
        terminals = []
        for branch in topology.branches:
            terminals.extend(walk(branch, sources, add_node, connect))
        return terminals
    node_id = add_node(topology)
    for source in sources:
        connect(source, node_id)
    return [node_id]


def _followed_by(steps: tuple[Any, ...], other: Any) -> Chain:
    """``steps`` then ``other``, splicing in a chain's steps (the ``>>`` rule)."""
    tail = other.steps if isinstance(other, Chain) else (other,)
    return Chain([*steps, *tail])


def _branches(other: Any) -> list[Chain]:
    """The branches ``other`` contributes to a fork (``br(g)`` in the spec)."""
    if isinstance(other, Fork):
        return list(other.branches)
    if isinstance(other, list):
        return list(Fork.from_list(other).branches)
    if isinstance(other, Chain):
        return [other]
    return [Chain([other])]


def _require_sequence(builder: str, what: str, items: Any) -> None:
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{builder}() expects a list of {what}, got {type(items).__name__}")
