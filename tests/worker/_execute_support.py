"""Shared pieces of the plan-executor tests: a recording connection, plan builders, a worker rig.

The executor is driven directly, the way the server's connection drives it: ``run_plan``
and the session coroutines get a ``RecordingConnection`` that keeps every frame sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import _execute_filters
import cloudpickle

from soma.isolation.limits import MemoryWatch
from soma.wire import v1, v2
from soma.isolation.pool import Pool
from soma.wire.messages import (
    AssignPlan,
    Event,
    FitMode,
    PlanFailure,
    PlanResult,
    PlanSuccess,
    Reply,
    SerializedFilter,
    SerializedPlan,
)
from soma.worker.config import WorkerConfig
from soma.worker.detect import Effective, GpuDevice
from soma.worker.execute import PlanExecutor
from soma.worker.metrics import WorkerMetrics
from soma.worker.store import Store

cloudpickle.register_pickle_by_value(_execute_filters)

__all__ = [
    "CAPS",
    "RecordingConnection",
    "Rig",
    "chain",
    "failure",
    "filt",
    "fit_mode",
    "plan",
    "rig",
    "success",
    "through_wire",
]

_plan_ids = itertools.count(1)

CAPS = Effective(cpu_cores=2, ram_bytes=8 << 30, gpus=(), python_envs=(), tags=("cpu",))
"""The capabilities the test worker advertises (no detection)."""


class RecordingConnection:
    """A connection that records ``(message, re)``; ``delay`` slows each send (a lagging client)."""

    def __init__(self, dialect: str = "v2", *, delay: float = 0.0) -> None:
        self.dialect = dialect
        self.delay = delay
        self.frames: list[tuple[Reply, str | None]] = []
        self.times: list[float] = []

    async def send(self, msg: Reply, re: str | None = None) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.frames.append((msg, re))
        self.times.append(asyncio.get_running_loop().time())

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        """The event dicts sent so far, optionally of one type."""
        found = [msg.event for msg, _ in self.frames if isinstance(msg, Event)]
        return [e for e in found if event_type is None or e["event_type"] == event_type]


def filt(node_id: str, obj: Any, *, trainable: bool = False, **fields: Any) -> SerializedFilter:
    """A ``SerializedFilter`` of ``obj`` pickled by value."""
    pickled = cloudpickle.dumps(obj, protocol=5)
    return SerializedFilter(node_id=node_id, pickled_filter=pickled, trainable=trainable, **fields)


def chain(*node_ids: str) -> dict[str, Any]:
    """A ``Sequence`` of ``Execute`` steps."""
    return {"type": "Sequence", "steps": [{"type": "Execute", "node_id": n} for n in node_ids]}


def fit_mode(y: Any = None, batch_size: int | None = None) -> FitMode:
    return FitMode(y=y, batch_size=batch_size)


def plan(
    steps: Mapping[str, Any],
    filters: Iterable[SerializedFilter],
    *,
    dialect: str = "v2",
    edges: Iterable[tuple[str, str]] | None = None,
    request_id: str | None = None,
    **fields: Any,
) -> AssignPlan:
    """An ``AssignPlan``; v2 plans get ``protocol_version: 2`` and, unless given, chain edges."""
    filters = list(filters)
    plan_id = fields.pop("plan_id", f"plan-{next(_plan_ids)}")
    if dialect == "v2":
        fields.setdefault("protocol_version", 2)
        fields.setdefault("run_id", f"run-{plan_id}")
        if edges is None:
            ids = [f.node_id for f in filters]
            edges = list(zip(ids, ids[1:]))
    serialized = SerializedPlan(
        plan_id=plan_id,
        plan=dict(steps),
        filters=filters,
        edges=None if edges is None else [tuple(e) for e in edges],
        **fields,
    )
    return AssignPlan(plan=serialized, id=request_id or f"req-{plan_id}")


def success(reply: Reply) -> PlanSuccess:
    """The ``PlanSuccess`` of a reply; fails the test with the error otherwise."""
    assert isinstance(reply, PlanResult), reply
    assert isinstance(reply.result, PlanSuccess), reply.result
    return reply.result


def failure(reply: Reply) -> PlanFailure:
    """The ``PlanFailure`` of a reply; fails the test otherwise."""
    assert isinstance(reply, PlanResult), reply
    assert isinstance(reply.result, PlanFailure), reply.result
    return reply.result


class Rig:
    """An executor with its own pool and store, as the server builds them."""

    def __init__(self, executor: PlanExecutor, pool: Pool, store: Store, config: WorkerConfig) -> None:
        self.executor = executor
        self.pool = pool
        self.store = store
        self.config = config

    async def run(self, msg: AssignPlan, conn: RecordingConnection | None = None) -> Reply:
        """Send ``msg`` through the wire codec of its dialect, run it, check the reply encodes."""
        dialect = "v2" if msg.plan.protocol_version == 2 else "v1"
        conn = conn or RecordingConnection(dialect)
        reply = await self.executor.run_plan(through_wire(msg, dialect), conn)
        (v2.encode_frame if dialect == "v2" else v1.encode_json)(reply)
        return reply


def through_wire(msg: AssignPlan, dialect: str) -> AssignPlan:
    """``msg`` as the worker decodes it (v2: read-only arrays, markers; v1: JSON values)."""
    if dialect == "v2":
        decoded = v2.decode(v2.encode_frame(msg), "worker")
    else:
        decoded = v1.decode_json(v1.encode_json(msg))
    assert isinstance(decoded, AssignPlan)
    return decoded


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path,
    *,
    cpu_cores: int = 2,
    gpu_devices: tuple[GpuDevice, ...] = (),
    memory_watch: MemoryWatch | None = None,
    metrics: WorkerMetrics | None = None,
    pool_options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[Rig]:
    """A worker's executor over a fresh pool and store under ``tmp_path``; everything is closed after."""
    options: dict[str, Any] = {
        "worker_id": "w-test",
        "python": sys.executable,
        "work_dir": tmp_path / "work",
        "temp_dir": tmp_path / "temp",
        "timeout": 60.0,
    }
    options.update(overrides)
    config = WorkerConfig(**options)
    store = Store(config.temp_dir, ttl=3600, data_store=config.data_store).open()
    pool = Pool(max_idle=config.max_concurrent, idle_ttl=60, memory_watch=memory_watch, **(pool_options or {}))
    caps = dataclasses.replace(CAPS, cpu_cores=cpu_cores, gpus=gpu_devices)
    executor = PlanExecutor(config, pool=pool, store=store, metrics=metrics, capabilities=caps)
    try:
        yield Rig(executor, pool, store, config)
    finally:
        await executor.close()
        await asyncio.to_thread(pool.close)
        store.close()
