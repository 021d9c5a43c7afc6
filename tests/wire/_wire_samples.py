"""Shared test data for the wire tests: one sample of every message, and exact comparison."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from soma.isolation.markers import Opaque, TorchData
from soma.wire import messages as m

CAPS = m.Capabilities(
    cpu_cores=8,
    ram_bytes=16 * 2**30,
    gpus=[m.GpuInfo(name="NVIDIA H200", memory_bytes=141 * 2**30)],
    python_envs=["Python 3.11.7 (/usr/bin/python3.11)"],
    tags=["gpu", "cpu"],
)
LOAD = m.LoadMetrics(
    cpu_usage=0.25,
    memory_usage=0.5,
    gpu_usage=[0.0],
    active_plans=1,
    queue_depth=0,
    timestamp="2026-01-02T03:04:05Z",
    free_slots=3,
)
KEY = "ab" * 32


def plan(*, v2: bool, value: Any = None) -> m.SerializedPlan:
    """A two-node plan; with ``v2`` every v2-only field is set too."""
    base: dict[str, Any] = dict(
        plan_id="remote_plan_0a1b",
        plan={
            "type": "Sequence",
            "steps": [
                {"type": "Execute", "node_id": "scaler"},
                {
                    "type": "Parallel",
                    "branches": [{"type": "Cached", "node_id": "d", "key": KEY}, {"type": "Empty"}],
                },
                {"type": "Composite", "node_ids": ["a", "b"]},
                {
                    "type": "Remote",
                    "node_id": "r",
                    "target": "tag:gpu",
                    "plan": {"type": "Execute", "node_id": "r"},
                },
                {
                    "type": "Loop",
                    "node_id": "l",
                    "body": {"type": "Execute", "node_id": "l"},
                    "max_iterations": None,
                },
                {"type": "Branch", "node_id": "br", "arms": [["yes", {"type": "Execute", "node_id": "x"}]]},
            ],
        },
        input=[1.0, 2.0, 3.0] if value is None else value,
        filters=[
            m.SerializedFilter(
                node_id="scaler", pickled_filter=b"\x80\x05pickle", state={"mean": [2.0]}, trainable=True
            ),
            m.SerializedFilter(node_id="d", pickled_filter=b"", requirements=["numpy==2.4.6"]),
        ],
        mode=m.FitMode(y=[[1.0, 2.0], [3.0, 4.0]], batch_size=2),
        metadata={"soma_events": True},
        protocol_version=2 if v2 else 1,
        edges=[("scaler", "d")],
        seed=7,
        runtime={"python": "3.11"},
        timeout_s=30.0,
    )
    if v2:
        base.update(
            run_id="graph_fit_0123456789abcdef",
            external={"up": np.arange(3.0)},
            outputs=["d"],
            composite_phase="grad",
            requirements=["numpy==2.4.6"],
            resources={"cpus": 2},
            session={"keep": True, "idle_s": 60},
            session_id="sess-1",
            events={"enabled": True, "logs": False},
        )
        base["filters"] = [
            dataclasses.replace(
                base["filters"][0],
                differentiable=True,
                cacheable=False,
                stream_mode="evolving",
                fit_key=KEY,
                out_key=None,
            ),
            base["filters"][1],
        ]
    return m.SerializedPlan(**base)


def job() -> m.PythonPipelineJob:
    return m.PythonPipelineJob(
        job_id="job-1",
        pipeline_id="pipe",
        investigation_id="inv",
        files=[m.JobFile(path="main.py", content="print('hi \"there\"')\n")],
        requirements="numpy\n# comment\n",
        entry_point="main.py",
        input_data={"rows": [1, 2]},
        params={"lr": 0.1},
        timeout_s=5.0,
    )


def success(*, v2: bool) -> m.PlanSuccess:
    extra: dict[str, Any] = (
        dict(timings={"queue_ms": 1, "env_ms": 0, "exec_ms": 5}, metrics={"loss": 0.5}) if v2 else {}
    )
    return m.PlanSuccess(output={"a": [1, "x"]}, duration_ms=12, states={"scaler": {"mean": [2.0]}}, **extra)


def failure(*, v2: bool) -> m.PlanFailure:
    if v2:
        info = m.ErrorInfo(
            code="user_error",
            kind="Python",
            message='bad "value"\n\\ é',
            node_id="scaler",
            method="fit",
            python_type="ValueError",
            traceback="Traceback...",
        )
    else:
        info = m.ErrorInfo(code="user_error", kind="Python", message='bad "value"\n\\ é', node_id="scaler")
    return m.PlanFailure(error=info, duration_ms=3)


def messages(*, v2: bool) -> list[m.Request | m.Reply]:
    """One or more samples of every message type of a dialect, with values that survive it."""
    rid: dict[str, Any] = {"id": "req-1"} if v2 else {}
    rre: dict[str, Any] = {"re": "req-1"} if v2 else {}
    out: list[m.Request | m.Reply] = [
        m.AssignPlan(plan=plan(v2=v2), **rid),
        m.AssignPlan(plan=m.SerializedPlan(plan_id="p", plan={"type": "Empty"}), **rid),
        m.AssignPlan(
            plan=m.SerializedPlan(
                plan_id="p", plan={"type": "Execute", "node_id": "a"}, input=m.LocalRef(path="/tmp/x.json")
            ),
            **rid,
        ),
        m.AssignPlan(
            plan=m.SerializedPlan(
                plan_id="p", plan={"type": "Execute", "node_id": "a"}, input=m.CachedRef(cache_key=KEY)
            ),
            **rid,
        ),
        m.CancelPlan(plan_id="p", **rid),
        m.StatusRequest(**rid),
        m.Ping(**rid),
        m.Shutdown(reason="maintenance", drain_s=2.5, **rid),
        m.Shutdown(**rid),
        m.GetState(plan_id="sess-1", node_ids=["a", "b"], **rid),
        m.SetState(plan_id="sess-1", states={"a": {"w": [1.0]}, "b": None}, **rid),
        m.GetGradients(plan_id="sess-1", node_ids=["a"], **rid),
        m.ApplyGradients(plan_id="sess-1", gradients={"a": {"w": [[1.0, 2.0]]}}, lr=0.1, **rid),
        m.ApplyGradients(plan_id="sess-1", gradients={}, lr={"a": 0.5}, **rid),
        m.AssignPythonJob(job=job(), **rid),
        m.StreamBegin(stream_id="st", plan_id="p", total_chunks=3, plan=plan(v2=v2), **rid),
        m.StreamBegin(stream_id="st", plan_id="p", total_chunks=None, plan=plan(v2=v2), **rid),
        m.ChunkData(stream_id="st", chunk_index=0, value=[1.0, 2.5], **rid),
        m.StreamEnd(stream_id="st", **rid),
        m.PlanResult(worker_id="w1", plan_id="p", result=success(v2=v2), **rre),
        m.PlanResult(worker_id="w1", plan_id="p", result=failure(v2=v2), **rre),
        m.PlanResult(
            worker_id="w1", plan_id="p", result=m.PlanSuccess(output=m.CachedRef(cache_key=KEY)), **rre
        ),
        m.Event(
            worker_id="w1",
            plan_id="p",
            event={"event_type": "NodeCompleted", "node_id": "a", "duration": 3},
            **rre,
        ),
        m.JobProgress(
            worker_id="w1", job_id="job-1", phase="environment", step=1, total=4, metrics=None, **rre
        ),
        m.JobProgress(
            worker_id="w1", job_id="job-1", phase="metrics", step=3, total=4, metrics={"loss": 0.1}, **rre
        ),
        m.JobResult(
            worker_id="w1",
            job_id="job-1",
            success=True,
            metrics={"acc": 1},
            output="done\n",
            duration_ms=40,
            **rre,
        ),
        m.StateResult(worker_id="w1", plan_id="sess-1", states={"a": {"w": [1.0]}}, **rre),
        m.GradientsResult(
            worker_id="w1", plan_id="sess-1", gradients={"a": {"w": [1.0, 2.0]}}, missing=["b"], **rre
        ),
        m.ChunkResult(stream_id="st", chunk_index=1, value=[3.0], buffered=False, **rre),
        m.ChunkResult(stream_id="st", chunk_index=2, value=None, buffered=True, **rre),
        m.StreamComplete(stream_id="st", result=success(v2=v2), chunks=3, **rre),
        m.Heartbeat(worker_id="w1", load=LOAD, **rre),
        m.Ack(worker_id="w1", plan_id="p", **rre),
        m.Ack(worker_id="w1", **rre),
        m.Pong(**rre),
        m.make_error(
            "unknown_stream", "stream `st` is unknown", worker_id="w1", stream_id="st", chunk_index=4, **rre
        ),
        m.make_error("busy", "all 4 slots busy", worker_id="w1", plan_id="p", details={"queue": 64}, **rre),
        m.Register(worker_id="w1", capabilities=CAPS, load=LOAD, **rre),
        m.Register(worker_id="w1", capabilities=CAPS, **rre),
    ]
    if v2:
        out += [
            m.Hello(client={"soma": "0.3.0", "python": "3.11.7", "torch": None}, **rid),
            m.Welcome(
                worker_id="w1",
                protocols=[1, 2],
                capabilities=CAPS,
                runtime={"python": "3.11.7", "cloudpickle": "3.1.3", "soma": "0.3.0"},
                max_concurrent=4,
                inline_threshold=m.INLINE_THRESHOLD_BYTES,
                max_message_bytes=256 * 2**20,
                **rre,
            ),
            m.Status(
                worker_id="w1", capabilities=CAPS, load=LOAD, running=1, queue_depth=2, sessions=0, **rre
            ),
        ]
    else:
        out += [m.Registered(worker_id="w1"), m.ShutdownAck()]
    return out


def same(a: Any, b: Any) -> bool:
    """Equal with exact types, NaN equal to NaN, ``0.0`` distinct from ``-0.0``, arrays bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, Opaque):
        return bytes(a.data) == bytes(b.data) and [bytes(x) for x in a.buffers] == [
            bytes(y) for y in b.buffers
        ]
    if isinstance(a, TorchData):
        return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and bytes(a.buffer) == bytes(b.buffer)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if type(a).__module__ == "torch":
        return a.dtype == b.dtype and a.shape == b.shape and _torch_bytes(a) == _torch_bytes(b)
    return bool(a == b)


def _torch_bytes(tensor: Any) -> bytes:
    import torch

    return bytes(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
