"""Text renderings of plans and graphs, in the exact formats of api.md §7.4.

Pure string building over ``soma.runtime.plan`` values; nothing here runs or hashes.
"""

from __future__ import annotations

from soma.runtime.plan import (
    Branch,
    Cached,
    Composite,
    Empty,
    Execute,
    GraphShape,
    Loop,
    Parallel,
    PlanStep,
    Remote,
    Sequence,
    children,
)

__all__ = ["graph_graphviz", "graph_mermaid", "graph_text", "plan_mermaid", "plan_text"]

_INDENT = "  "
_ARROW = " \u2192 "


def plan_text(plan: PlanStep) -> str:
    """The indented text form: two spaces per depth, every line ending in ``\\n``."""
    lines: list[str] = []
    _plan_lines(plan, 0, lines)
    return "".join(f"{line}\n" for line in lines)


def _plan_lines(step: PlanStep, depth: int, lines: list[str]) -> None:
    pad = _INDENT * depth
    if isinstance(step, Sequence):
        lines.append(f"{pad}Sequence:")
        for child in step.steps:
            _plan_lines(child, depth + 1, lines)
    elif isinstance(step, Parallel):
        lines.append(f"{pad}Parallel:")
        for child in step.branches:
            _plan_lines(child, depth + 1, lines)
    elif isinstance(step, Execute):
        lines.append(f"{pad}Execute({step.node_id})")
    elif isinstance(step, Cached):
        lines.append(f"{pad}Cached({step.node_id}, {step.key[:16]})")
    elif isinstance(step, Composite):
        lines.append(f"{pad}Composite[{_ARROW.join(step.node_ids)}]")
    elif isinstance(step, Remote):
        lines.append(f"{pad}Remote({step.node_id}, target={step.target}):")
        _plan_lines(step.plan, depth + 1, lines)
    elif isinstance(step, Loop):
        lines.append(f"{pad}Loop({step.node_id}, max={step.max_iterations}):")
        _plan_lines(step.body, depth + 1, lines)
    elif isinstance(step, Branch):
        lines.append(f"{pad}Branch({step.node_id}):")
        for label, arm in step.arms:
            lines.append(f"{pad}{_INDENT}[{label}]:")
            _plan_lines(arm, depth + 2, lines)
    elif isinstance(step, Empty):
        lines.append(f"{pad}Empty")
    else:  # pragma: no cover - PlanStep is a closed union
        raise TypeError(f"not a plan step: {step!r}")


def plan_mermaid(plan: PlanStep, shape: GraphShape) -> str:
    """A top-down Mermaid picture of the plan: cached and remote nodes marked, composites boxed."""
    cached: set[str] = set()
    remote: dict[str, str] = {}
    composite_of: dict[str, int] = {}
    _collect(plan, None, cached, remote, composite_of)
    lines = ["graph TD"]
    open_group: int | None = None
    for nid in shape.order:
        group = composite_of.get(nid)
        if group != open_group:
            if open_group is not None:
                lines.append("    end")
            if group is not None:
                lines.append(f"    subgraph composite_{group}")
            open_group = group
        if nid in remote:
            lines.append(f'    {nid}["{nid} @ {remote[nid]}"]')
        elif nid in cached:
            lines.append(f"    {nid}[/{nid} cached/]")
        else:
            lines.append(f"    {nid}[{nid}]")
    if open_group is not None:
        lines.append("    end")
    lines.extend(f"    {src} --> {dst}" for src, dst in shape.edges)
    return "\n".join(lines)


def _collect(
    step: PlanStep,
    target: str | None,
    cached: set[str],
    remote: dict[str, str],
    composite_of: dict[str, int],
) -> None:
    """Record how each node appears in the plan: cached, inside a Remote (with its target), in a Composite."""
    if isinstance(step, Remote):
        target = step.target
    leaves: tuple[str, ...] = ()
    if isinstance(step, Execute):
        leaves = (step.node_id,)
    elif isinstance(step, Cached):
        cached.add(step.node_id)
        leaves = (step.node_id,)
    elif isinstance(step, Composite):
        group = len(set(composite_of.values()))
        composite_of.update(dict.fromkeys(step.node_ids, group))
        leaves = step.node_ids
    if target is not None:
        remote.update(dict.fromkeys(leaves, target))
    for child in children(step):
        _collect(child, target, cached, remote, composite_of)


def graph_mermaid(shape: GraphShape) -> str:
    """``graph LR``, one ``id[id]`` line per node and one ``src --> tgt`` per edge, insertion order."""
    lines = ["graph LR"]
    lines.extend(f"    {n.node_id}[{n.node_id}]" for n in shape.nodes)
    lines.extend(f"    {src} --> {dst}" for src, dst in shape.edges)
    return "\n".join(lines)


def graph_graphviz(shape: GraphShape) -> str:
    """A Graphviz ``digraph`` with left-to-right boxes, ending in a newline."""
    lines = ["digraph G {", "    rankdir=LR;"]
    lines.extend(f'    "{n.node_id}" [label="{n.node_id}" shape=box];' for n in shape.nodes)
    lines.extend(f'    "{src}" -> "{dst}";' for src, dst in shape.edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def graph_text(shape: GraphShape) -> str:
    """A tree-like listing in canonical order: id, class name when different, predecessors."""
    lines = [f"Graph ({len(shape.nodes)} nodes, {len(shape.edges)} edges)"]
    order = shape.order
    for i, nid in enumerate(order):
        spec = shape.by_id[nid]
        line = ("└── " if i == len(order) - 1 else "├── ") + nid
        if spec.filter_name != nid:
            line += f" ({spec.filter_name})"
        preds = shape.predecessors[nid]
        if preds:
            line += " ← " + ", ".join(preds)
        lines.append(line)
    return "\n".join(lines)
