"""Execution plans: the step types, the compiler, placement and diagnostics (api.md §5.7, §7).

Data flow::

    GraphShape (nodes + edges, a snapshot of the Graph)
        │  canonical_order / levels           (§5.1)
        ▼
    Sequence of levels ── cache resolution ──▶ Cached steps         (§7.2 step 3)
        │             ── placement ──────────▶ Remote blocks        (§7.2 step 4)
        │             ── differentiable runs ▶ Composite            (§7.2 step 5)
        ▼
    simplify ──▶ PlanStep (frozen dataclasses, ``to_dict()`` gives the JSON form)

Everything here is a pure function of its arguments: no I/O, no hashing, no cache
access. The caller (``soma.graph``) computes which nodes are cached and where
remote nodes go, and passes the answers in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from soma.errors import CycleError, SomaConfigError, WorkerUnavailableError

__all__ = [
    "MODES",
    "Branch",
    "Cached",
    "Composite",
    "Empty",
    "Execute",
    "GraphShape",
    "Loop",
    "NodeSpec",
    "Parallel",
    "PlanStep",
    "Remote",
    "Sequence",
    "WorkerEntry",
    "cached_count",
    "check_mode",
    "children",
    "compile_plan",
    "diagnostics",
    "iter_steps",
    "normalize_target",
    "parallel_branches",
    "resolve_placement",
]

MODES = ("inference", "differentiable", "no_cache")


# ---------------------------------------------------------------------------- plan steps


@dataclass(frozen=True, slots=True)
class Execute:
    """Run one node."""

    node_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Execute", "node_id": self.node_id}


@dataclass(frozen=True, slots=True)
class Cached:
    """A node whose output for this input is already in the cache under ``key``."""

    node_id: str
    key: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Cached", "node_id": self.node_id, "key": self.key}


@dataclass(frozen=True, slots=True)
class Composite:
    """Consecutive differentiable nodes run as one unit (locally: one by one, values stay native)."""

    node_ids: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Composite", "node_ids": list(self.node_ids)}


@dataclass(frozen=True, slots=True)
class Sequence:
    """Steps run one after the other."""

    steps: tuple[PlanStep, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Sequence", "steps": [s.to_dict() for s in self.steps]}


@dataclass(frozen=True, slots=True)
class Parallel:
    """Independent steps (one depth level); they may run concurrently."""

    branches: tuple[PlanStep, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Parallel", "branches": [b.to_dict() for b in self.branches]}


@dataclass(frozen=True, slots=True)
class Remote:
    """A block sent as one request to the worker (or coordinator placement) named by ``target``."""

    node_id: str
    target: str
    plan: PlanStep

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "Remote",
            "node_id": self.node_id,
            "target": self.target,
            "plan": self.plan.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class Loop:
    """Reserved: no builder produces it; it serialises and renders, executors refuse it."""

    node_id: str
    body: PlanStep
    max_iterations: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "Loop",
            "node_id": self.node_id,
            "body": self.body.to_dict(),
            "max_iterations": self.max_iterations,
        }


@dataclass(frozen=True, slots=True)
class Branch:
    """Reserved: no builder produces it; it serialises and renders, executors refuse it."""

    node_id: str
    arms: tuple[tuple[str, PlanStep], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "Branch",
            "node_id": self.node_id,
            "arms": [[label, p.to_dict()] for label, p in self.arms],
        }


@dataclass(frozen=True, slots=True)
class Empty:
    """The plan of an empty graph."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Empty"}


PlanStep = Execute | Cached | Composite | Sequence | Parallel | Remote | Loop | Branch | Empty


def children(step: PlanStep) -> tuple[PlanStep, ...]:
    """The direct sub-plans of a step (none for leaves)."""
    if isinstance(step, Sequence):
        return step.steps
    if isinstance(step, Parallel):
        return step.branches
    if isinstance(step, Remote):
        return (step.plan,)
    if isinstance(step, Loop):
        return (step.body,)
    if isinstance(step, Branch):
        return tuple(arm for _, arm in step.arms)
    return ()


def iter_steps(step: PlanStep) -> Iterator[PlanStep]:
    """Every step of a plan, depth first, the step itself first."""
    yield step
    for child in children(step):
        yield from iter_steps(child)


def cached_count(step: PlanStep) -> int:
    """Number of ``Cached`` steps (``compile()["cached_nodes"]``)."""
    return sum(1 for s in iter_steps(step) if isinstance(s, Cached))


def parallel_branches(step: PlanStep) -> int:
    """Parallel -> its child count; Sequence -> sum over steps; Remote -> its inner plan; others 0."""
    if isinstance(step, Parallel):
        return len(step.branches)
    if isinstance(step, Sequence):
        return sum(parallel_branches(s) for s in step.steps)
    if isinstance(step, Remote):
        return parallel_branches(step.plan)
    return 0


# ---------------------------------------------------------------------------- graph description


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """What the compiler needs to know about one node."""

    node_id: str
    filter_name: str
    trainable: bool
    differentiable: bool = False
    cacheable: bool = True
    target: str = "any"


@dataclass(frozen=True)
class GraphShape:
    """An immutable snapshot of a graph's nodes (insertion order) and edges (insertion order)."""

    nodes: tuple[NodeSpec, ...]
    edges: tuple[tuple[str, str], ...] = ()
    by_id: dict[str, NodeSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_id", {n.node_id: n for n in self.nodes})

    @cached_property
    def predecessors(self) -> dict[str, tuple[str, ...]]:
        """Predecessors of each node, in edge insertion order (the fan-in dict order)."""
        preds: dict[str, list[str]] = {n.node_id: [] for n in self.nodes}
        for src, dst in self.edges:
            preds[dst].append(src)
        return {k: tuple(v) for k, v in preds.items()}

    @cached_property
    def successors(self) -> dict[str, tuple[str, ...]]:
        """Successors of each node, in edge insertion order."""
        succ: dict[str, list[str]] = {n.node_id: [] for n in self.nodes}
        for src, dst in self.edges:
            succ[src].append(dst)
        return {k: tuple(v) for k, v in succ.items()}

    @cached_property
    def depths(self) -> dict[str, int]:
        """``0`` for a node without predecessors, else ``1 + max(depth(p))``."""
        depth: dict[str, int] = {}
        preds = self.predecessors
        remaining = [n.node_id for n in self.nodes]
        # Insertion order is not always topological (edges may point backwards in
        # insertion order), so iterate until every node's predecessors are known.
        while remaining:
            pending: list[str] = []
            for nid in remaining:
                ps = preds[nid]
                if all(p in depth for p in ps):
                    depth[nid] = 1 + max((depth[p] for p in ps), default=-1)
                else:
                    pending.append(nid)
            if len(pending) == len(remaining):
                raise CycleError()
            remaining = pending
        return depth

    @cached_property
    def order(self) -> tuple[str, ...]:
        """The canonical order: nodes sorted by ``(depth, insertion index)`` (§5.1)."""
        index = {n.node_id: i for i, n in enumerate(self.nodes)}
        depths = self.depths
        return tuple(sorted(index, key=lambda nid: (depths[nid], index[nid])))

    @cached_property
    def levels(self) -> tuple[tuple[str, ...], ...]:
        """Node ids grouped by depth, each group in canonical order."""
        groups: dict[int, list[str]] = {}
        for nid in self.order:
            groups.setdefault(self.depths[nid], []).append(nid)
        return tuple(tuple(groups[d]) for d in sorted(groups))

    @cached_property
    def roots(self) -> tuple[str, ...]:
        return tuple(nid for nid in self.order if not self.predecessors[nid])

    @cached_property
    def sinks(self) -> tuple[str, ...]:
        return tuple(nid for nid in self.order if not self.successors[nid])

    @cached_property
    def is_linear(self) -> bool:
        """One root and every node with at most one predecessor and one successor (§5.6)."""
        return len(self.roots) == 1 and all(
            len(self.predecessors[n]) <= 1 and len(self.successors[n]) <= 1 for n in self.by_id
        )

    def ancestors(self, node_id: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.predecessors[node_id])
        while stack:
            nid = stack.pop()
            if nid not in seen:
                seen.add(nid)
                stack.extend(self.predecessors[nid])
        return seen

    def descendants(self, node_id: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.successors[node_id])
        while stack:
            nid = stack.pop()
            if nid not in seen:
                seen.add(nid)
                stack.extend(self.successors[nid])
        return seen


# ---------------------------------------------------------------------------- placement

_TAG = re.compile(r"^[\w.\-]+$")


def normalize_target(raw: str | None) -> str:
    """Normalise a target string to ``local``, ``subprocess``, ``any``, ``tag:<t>`` or ``worker:<id>``.

    ``None`` means ``any``; a bare string other than local/subprocess/any is a tag.
    Raises ``SomaConfigError("invalid target '<t>'")`` for anything else.
    """
    if raw is None:
        return "any"
    if not isinstance(raw, str):
        raise SomaConfigError(f"invalid target {raw!r}: expected a string")
    if raw in ("local", "subprocess", "any"):
        return raw
    prefix, sep, rest = raw.partition(":")
    if sep and prefix in ("tag", "worker"):
        if _TAG.match(rest):
            return raw
    elif not sep and _TAG.match(raw):
        return f"tag:{raw}"
    raise SomaConfigError(f"invalid target '{raw}'")


@dataclass(frozen=True, slots=True)
class WorkerEntry:
    """A directly registered worker as placement sees it."""

    address: str
    tags: tuple[str, ...] = ()
    worker_id: str | None = None


def resolve_placement(
    shape: GraphShape,
    workers: SequenceABC[WorkerEntry],
    *,
    coordinator: bool = False,
) -> dict[str, str]:
    """Map each remotely placed node to its ``Remote`` target (§5.7).

    Nodes that run on this machine (``local``, ``subprocess``, or every node when
    neither workers nor a coordinator are registered) are absent from the result.
    A direct worker is named by its address; a node left to the coordinator keeps its
    normalised target (``any``, ``tag:<t>``, ``worker:<id>``).
    Raises ``WorkerUnavailableError`` for a target nothing can serve.
    """
    if not workers and not coordinator:
        return {}
    placement: dict[str, str] = {}
    for nid in shape.order:
        target = shape.by_id[nid].target
        if target in ("local", "subprocess"):
            continue
        match: WorkerEntry | None = None
        if target == "any":
            match = workers[0] if workers else None
        elif target.startswith("tag:"):
            tag = target[4:]
            match = next((w for w in workers if tag in w.tags), None)
        else:
            wid = target[7:]
            match = next((w for w in workers if w.worker_id == wid), None)
        if match is not None:
            placement[nid] = match.address
        elif coordinator:
            placement[nid] = target
        else:
            raise WorkerUnavailableError(target)
    return placement


# ---------------------------------------------------------------------------- compiler


def check_mode(mode: object) -> str:
    """Return ``mode`` if it is a compile mode, else raise ``SomaConfigError``."""
    if mode not in MODES:
        raise SomaConfigError(
            f"Unknown mode: {mode}. Use 'inference', 'differentiable', or 'no_cache'."
        )
    return str(mode)


def compile_plan(
    shape: GraphShape,
    *,
    cached: Mapping[str, str] | None = None,
    placement: Mapping[str, str] | None = None,
) -> PlanStep:
    """Compile a graph into a plan (§7.2).

    ``cached`` maps node ids to the cache key of their already stored output (the
    caller resolves step 3, only in inference mode with x); ``placement`` maps remote
    node ids to their target (``resolve_placement``).
    """
    if not shape.nodes:
        return Empty()
    cached = cached or {}
    placement = placement or {}

    def leaf(nid: str) -> PlanStep:
        if nid in cached:
            return Cached(nid, cached[nid])
        if nid in placement:
            return Remote(nid, placement[nid], Execute(nid))
        return Execute(nid)

    levels: list[PlanStep] = []
    for level in shape.levels:
        members = [leaf(nid) for nid in level]
        levels.append(members[0] if len(members) == 1 else _group_remote_parallel(members))
    return _simplify(_composites(_merge_remote_runs(levels), shape))


def _group_remote_parallel(members: list[PlanStep]) -> PlanStep:
    targets = {m.target for m in members if isinstance(m, Remote)}
    if len(targets) == 1 and all(isinstance(m, Remote) for m in members):
        first = members[0]
        assert isinstance(first, Remote)
        inner = tuple(m.plan for m in members if isinstance(m, Remote))
        return Remote(first.node_id, first.target, Parallel(inner))
    return Parallel(tuple(members))


def _merge_remote_runs(steps: list[PlanStep]) -> Sequence:
    merged: list[PlanStep] = []
    run: list[Remote] = []

    def flush() -> None:
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            merged.append(
                Remote(run[0].node_id, run[0].target, Sequence(tuple(r.plan for r in run)))
            )
        run.clear()

    for step in steps:
        if isinstance(step, Remote) and (not run or run[0].target == step.target):
            run.append(step)
            continue
        flush()
        if isinstance(step, Remote):
            run.append(step)
        else:
            merged.append(step)
    flush()
    return Sequence(tuple(merged))


def _composites(step: PlanStep, shape: GraphShape) -> PlanStep:
    """Turn runs of >= 2 consecutive differentiable ``Execute`` steps of every Sequence into Composites."""
    if isinstance(step, Sequence):
        out: list[PlanStep] = []
        run: list[str] = []

        def flush() -> None:
            if len(run) >= 2:
                out.append(Composite(tuple(run)))
            else:
                out.extend(Execute(n) for n in run)
            run.clear()

        for child in step.steps:
            child = _composites(child, shape)
            if isinstance(child, Execute) and shape.by_id[child.node_id].differentiable:
                run.append(child.node_id)
            else:
                flush()
                out.append(child)
        flush()
        return Sequence(tuple(out))
    if isinstance(step, Parallel):
        return Parallel(tuple(_composites(b, shape) for b in step.branches))
    if isinstance(step, Remote):
        return Remote(step.node_id, step.target, _composites(step.plan, shape))
    return step


def _simplify(step: PlanStep) -> PlanStep:
    if isinstance(step, (Sequence, Parallel)):
        children = [
            _simplify(c) for c in (step.steps if isinstance(step, Sequence) else step.branches)
        ]
        children = [c for c in children if not isinstance(c, Empty)]
        if not children:
            return Empty()
        if len(children) == 1:
            return children[0]
        return (
            Sequence(tuple(children)) if isinstance(step, Sequence) else Parallel(tuple(children))
        )
    if isinstance(step, Remote):
        return Remote(step.node_id, step.target, _simplify(step.plan))
    return step


# ---------------------------------------------------------------------------- diagnostics


def diagnostics(
    shape: GraphShape,
    *,
    unhashable_params: Iterable[str] = (),
    workers_configured: bool = False,
) -> list[dict[str, Any]]:
    """The diagnostics of §7.3, in canonical node order.

    ``unhashable_params`` are the nodes whose parameters cannot be hashed. Without
    workers (and coordinator) every tag or worker target is reported as ignored.
    """
    unhashable = set(unhashable_params)
    has_differentiable = any(n.differentiable for n in shape.nodes)
    out: list[dict[str, Any]] = []
    for nid in shape.order:
        spec = shape.by_id[nid]
        if has_differentiable and not spec.differentiable:
            upstream = any(shape.by_id[a].differentiable for a in shape.ancestors(nid))
            if upstream and any(shape.by_id[d].differentiable for d in shape.descendants(nid)):
                kind = "Trainable" if spec.trainable else "Stateless"
                out.append(
                    _diag(
                        nid,
                        "warning",
                        f"gradient flow interrupted at `{nid}` ({kind}). Gradients from upstream "
                        "will not reach downstream filters through this node.",
                    )
                )
        if nid in unhashable:
            out.append(
                _diag(
                    nid,
                    "warning",
                    f"parameters of `{nid}` cannot be hashed; node will not be cached",
                )
            )
        if not workers_configured and spec.target not in ("local", "subprocess", "any"):
            out.append(_diag(nid, "info", f"target '{spec.target}' ignored: no workers configured"))
    return out


def _diag(node_id: str | None, level: str, message: str) -> dict[str, Any]:
    return {"node_id": node_id, "level": level, "message": message}
