"""Plan validation with no side effect (worker spec §6.1 step 1): a plan either becomes a
``PlanSpec``, the description of its walk, or raises ``Refusal`` before anything runs.

``validate_plan`` flattens the plan tree (Sequence, Parallel, Composite, Cached, Remote) into
``Unit`` steps, checks nodes, edges, outputs, mode, time limit, events, session and resources
against the worker's capabilities, and checks that composites run as one command are chains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from soma.errors import SomaConfigError
from soma.wire.messages import FitMode, SerializedFilter, SerializedPlan, version_refusal
from soma.worker.config import parse_size
from soma.worker.detect import Effective

__all__ = ["SESSION_IDLE_S", "PlanSpec", "Refusal", "Resources", "Unit", "validate_plan"]

SESSION_IDLE_S = 600.0
"""Default idle time after which a session ends (``session.idle_s``)."""

_FIT = "fit"
_FORWARD = "forward"


class Refusal(Exception):
    """A request refused before any side effect (v1 ``Failed``, v2 ``Error``)."""

    def __init__(self, code: str, message: str, *, node_id: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.node_id = node_id
        self.details = details


@dataclass(frozen=True)
class Unit:
    """One step of the walk: a node (``cached_key`` from a ``Cached`` step) or a composite."""

    node_ids: tuple[str, ...]
    composite: bool = False
    cached_key: str | None = None


@dataclass(frozen=True)
class Resources:
    """What a plan asks of the worker: threads, GPUs and an RSS cap (``None``: the default)."""

    threads: int | None = None
    gpus: int | None = None
    memory: int | None = None


@dataclass
class PlanSpec:
    """A validated plan: what runs, in which order, fed by what, under which limits."""

    plan: SerializedPlan
    dialect: str
    units: list[Unit]
    order: list[str]
    preds: dict[str, list[str]]
    filters: dict[str, SerializedFilter]
    outputs: list[str]
    fit: bool
    y: Any
    batch_size: int | None
    budget: float
    composite_phase: str
    events: bool
    logs: bool
    resources: Resources
    keep: bool
    idle_s: float

    @property
    def phase(self) -> str:
        return _FIT if self.fit else _FORWARD

    @property
    def one_command_composites(self) -> bool:
        """Whether composites run as one COMPOSITE_FIT/COMPOSITE_FORWARD rather than node by node (§6.3, §6.4)."""
        if self.dialect == "v1":
            return True
        return self.fit and self.composite_phase in ("grad", "all")

    @property
    def cached(self) -> bool:
        """Whether the worker cache is used at all (never for v1 plans, §6.5)."""
        return self.dialect == "v2"


def _flatten(plan: Mapping[str, Any], units: list[Unit]) -> None:
    kind = plan["type"]
    if kind == "Empty":
        return
    if kind == "Execute":
        units.append(Unit((plan["node_id"],)))
    elif kind == "Cached":
        units.append(Unit((plan["node_id"],), cached_key=plan["key"]))
    elif kind == "Composite":
        if not plan["node_ids"]:
            raise Refusal("bad_plan", "a Composite step names no nodes")
        units.append(Unit(tuple(plan["node_ids"]), composite=True))
    elif kind == "Sequence":
        for step in plan["steps"]:
            _flatten(step, units)
    elif kind == "Parallel":
        for branch in plan["branches"]:
            _flatten(branch, units)
    elif kind == "Remote":
        _flatten(plan["plan"], units)
    else:
        raise Refusal(
            "unsupported_plan",
            f"{kind} steps (node `{plan.get('node_id')}`) are reserved and not executed by this worker",
            node_id=plan.get("node_id"),
        )


def _resources(raw: Any, caps: Effective) -> Resources:
    if raw is None:
        return Resources()
    if not isinstance(raw, dict):
        raise Refusal("bad_plan", f"resources must be a map, got {type(raw).__name__}")

    def count(name: str, minimum: int) -> int | None:
        value = raw.get(name)
        if value is None:
            return None
        if type(value) is not int or value < minimum:
            raise Refusal("bad_plan", f"resources.{name} must be an int >= {minimum}, got {value!r}")
        return value

    cpus, gpus = count("cpus", 1), count("gpus", 0)
    memory = raw.get("memory")
    if memory is not None:
        try:
            memory = parse_size(memory)
        except SomaConfigError as exc:
            raise Refusal("bad_plan", f"resources.memory: {exc}") from None
        if memory < 1:
            raise Refusal("bad_plan", "resources.memory must be a positive size")
    if cpus is not None and cpus > caps.cpu_cores:
        raise Refusal(
            "insufficient_resources", f"the plan needs {cpus} CPUs and this worker has {caps.cpu_cores}"
        )
    if gpus is not None and gpus > len(caps.gpus):
        raise Refusal(
            "insufficient_resources", f"the plan needs {gpus} GPUs and this worker allows {len(caps.gpus)}"
        )
    if memory is not None and memory > caps.ram_bytes:
        raise Refusal(
            "insufficient_resources",
            f"the plan needs {memory} bytes of memory and this worker has {caps.ram_bytes}",
        )
    return Resources(threads=cpus, gpus=gpus, memory=memory)


def validate_plan(plan: SerializedPlan, dialect: str, caps: Effective, worker_timeout: float) -> PlanSpec:
    """Check a plan (worker spec §6.1 step 1) and describe its walk; raises ``Refusal``."""
    accepted = (None, 1) if dialect == "v1" else (None, 2)
    if plan.protocol_version not in accepted:
        refusal = version_refusal(plan.protocol_version)
        raise Refusal(refusal.code, refusal.message, details=refusal.details)
    filters: dict[str, SerializedFilter] = {}
    for serialized in plan.filters:
        if serialized.node_id in filters:
            raise Refusal("bad_plan", f"node `{serialized.node_id}` appears twice in filters")
        filters[serialized.node_id] = serialized
    units: list[Unit] = []
    _flatten(plan.plan, units)
    order = [nid for unit in units for nid in unit.node_ids]
    for nid in order:
        if nid not in filters:
            raise Refusal("unknown_node", f"node `{nid}` not found in graph", node_id=nid)
    if len(set(order)) != len(order):
        twice = next(nid for nid in order if order.count(nid) > 1)
        raise Refusal("bad_plan", f"node `{twice}` appears twice in the plan", node_id=twice)
    position = {nid: i for i, nid in enumerate(order)}
    external = plan.external if dialect == "v2" else {}
    preds = _predecessors(plan, order, position, external)
    outputs: list[str] = []
    if dialect == "v2":
        outputs = list(dict.fromkeys(plan.outputs))
        for nid in outputs:
            if nid not in position:
                raise Refusal("bad_plan", f"outputs names `{nid}`, which is not a node of the plan", node_id=nid)
        if not outputs:
            feeding = {p for sources in preds.values() for p in sources}
            outputs = [nid for nid in order if nid not in feeding]
    elif order:
        outputs = [order[-1]]
    fit = isinstance(plan.mode, FitMode)
    batch_size = plan.mode.batch_size if isinstance(plan.mode, FitMode) else None
    if batch_size is not None and batch_size < 1:
        raise Refusal("bad_plan", f"mode.Fit.batch_size must be >= 1, got {batch_size}")
    timeout_s = plan.timeout_s
    if timeout_s is not None and not (timeout_s > 0):
        raise Refusal("bad_plan", f"timeout_s must be > 0, got {timeout_s!r}")
    metadata = plan.metadata if isinstance(plan.metadata, dict) else {}
    if dialect == "v2":
        events_opt = plan.events or {}
        events, logs = events_opt.get("enabled", True) is not False, events_opt.get("logs") is True
    else:
        events, logs = metadata.get("soma_events") is True, False
    session = plan.session or {}
    idle_s = session.get("idle_s", SESSION_IDLE_S)
    if isinstance(idle_s, bool) or not isinstance(idle_s, int | float) or not idle_s > 0:
        raise Refusal("bad_plan", f"session.idle_s must be a positive number of seconds, got {idle_s!r}")
    spec = PlanSpec(
        plan=plan,
        dialect=dialect,
        units=units,
        order=order,
        preds=preds,
        filters=filters,
        outputs=outputs,
        fit=fit,
        y=plan.mode.y if isinstance(plan.mode, FitMode) else None,
        batch_size=batch_size,
        budget=min(timeout_s if timeout_s is not None else math.inf, worker_timeout),
        composite_phase=plan.composite_phase if dialect == "v2" else "all",
        events=events,
        logs=logs,
        resources=_resources(plan.resources, caps) if dialect == "v2" else Resources(),
        keep=session.get("keep") is True,
        idle_s=float(idle_s),
    )
    _check_composites(spec)
    return spec


def _predecessors(
    plan: SerializedPlan, order: list[str], position: dict[str, int], external: Mapping[str, Any]
) -> dict[str, list[str]]:
    if plan.edges is None:
        # Soma 0.2.43 dialect: each node reads the node before it in flattened plan order.
        return {nid: [order[i - 1]] if i else [] for i, nid in enumerate(order)}
    preds: dict[str, list[str]] = {nid: [] for nid in order}
    for src, dst in plan.edges:
        if dst not in position:
            raise Refusal("bad_plan", f"edge {src} -> {dst} ends outside the plan's nodes", node_id=dst)
        if src in position:
            if position[src] >= position[dst]:
                raise Refusal(
                    "bad_plan",
                    f"edge {src} -> {dst} goes against the plan order or closes a cycle",
                    node_id=dst,
                )
        elif src not in external:
            raise Refusal(
                "bad_plan",
                f"edge {src} -> {dst} starts outside the plan and `{src}` has no value in external",
                node_id=dst,
            )
        if src not in preds[dst]:
            preds[dst].append(src)
    return preds


def _check_composites(spec: PlanSpec) -> None:
    """A composite run as one command must be a chain whose inner outputs nobody else reads."""
    if not spec.one_command_composites:
        return
    readers: dict[str, set[str]] = {}
    for nid, sources in spec.preds.items():
        for source in sources:
            readers.setdefault(source, set()).add(nid)
    for unit in spec.units:
        if not unit.composite:
            continue
        ids = unit.node_ids
        for i, nid in enumerate(ids):
            if i and spec.preds[nid] != [ids[i - 1]]:
                raise Refusal("bad_plan", f"composite {list(ids)} is not a chain at `{nid}`", node_id=nid)
            if i < len(ids) - 1 and (nid in spec.outputs or readers.get(nid, set()) - {ids[i + 1]}):
                raise Refusal(
                    "bad_plan",
                    f"the output of `{nid}` inside composite {list(ids)} is needed outside it",
                    node_id=nid,
                )
