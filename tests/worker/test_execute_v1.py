"""Soma 0.2.43 clients (wire v1): golden frames in, exact JSON out."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

import _execute_filters as F
import cloudpickle
from _execute_support import RecordingConnection, rig
from _server_support import running, worker_config

from soma.wire import v1
from soma.wire.messages import AssignPlan, PlanResult


def _b64(obj: Any) -> str:
    return base64.b64encode(cloudpickle.dumps(obj, protocol=5)).decode("ascii")


def _tensor(values: list[Any]) -> dict[str, Any]:
    return {"type": "Tensor", "data": {"values": values, "shape": [len(values)]}}


def _golden(plan_id: str, mode: Any, states: dict[str, Any] | None = None, **extra: Any) -> str:
    """The §5.2 golden AssignPlan of a Soma 0.2.43 client's two-node fit, as JSON text."""
    states = states or {}
    message = {
        "type": "AssignPlan",
        "plan": {
            "plan_id": plan_id,
            "plan": {"Sequence": [{"Execute": {"node_id": "scaler"}}, {"Execute": {"node_id": "d"}}]},
            "input": {"source": "Inline", "value": _tensor([1.0, 2.0, 3.0])},
            "filters": [
                {"node_id": "scaler", "pickled_filter": _b64(F.Scaler()), "state": states.get("scaler"),
                 "requirements": [], "trainable": True},
                {"node_id": "d", "pickled_filter": _b64(F.Doubler()), "state": None, "requirements": [],
                 "trainable": False},
            ],
            "mode": mode,
            "metadata": {},
            **extra,
        },
    }
    return json.dumps(message)


async def _run(r: Any, text: str, conn: RecordingConnection | None = None) -> dict[str, Any]:
    msg = v1.decode_json(text)
    assert isinstance(msg, AssignPlan)
    reply = await r.executor.run_plan(msg, conn or RecordingConnection("v1"))
    assert isinstance(reply, PlanResult)
    return json.loads(v1.encode_json(reply))


async def test_the_golden_fit_returns_the_fitted_state_as_json_and_the_next_forward_uses_it(tmp_path: Path) -> None:
    fit = {"Fit": {"y": {"type": "Tensor", "data": {"values": [0.0, 1.0, 0.0], "shape": [3]}}, "batch_size": 2}}
    async with rig(tmp_path) as r:
        reply = await _run(r, _golden("remote_plan_0a1b", fit))
        assert reply["type"] == "PlanResult" and reply["plan_id"] == "remote_plan_0a1b"
        result = reply["result"]
        assert isinstance(result.pop("duration_ms"), int)
        assert result == {
            "status": "Success",
            "output": {"delivery": "Inline", "value": _tensor([-2.0, 0.0, 2.0])},
            "states": {"scaler": {"type": "Json", "data": {"mean": 2.0}}},
        }
        forward = await _run(r, _golden("remote_plan_0a1c", "Forward", states=result["states"]))
        assert forward["result"]["status"] == "Success"
        assert forward["result"]["output"]["value"]["data"]["values"] == [-2.0, 0.0, 2.0]


async def test_an_empty_plan_succeeds_with_an_empty_value(tmp_path: Path) -> None:
    empty = {"plan_id": "p-empty", "plan": "Empty", "filters": [], "mode": "Forward"}
    text = json.dumps({"type": "AssignPlan", "plan": empty})
    async with rig(tmp_path) as r:
        reply = await _run(r, text)
    assert reply["result"]["status"] == "Success"
    assert reply["result"]["output"] == {"delivery": "Inline", "value": {"type": "Empty"}}


async def test_an_unknown_node_fails_with_the_0_2_43_text(tmp_path: Path) -> None:
    text = _golden("p-unknown", "Forward").replace('{"Execute": {"node_id": "d"}}', '{"Execute": {"node_id": "zz"}}')
    async with rig(tmp_path) as r:
        reply = await _run(r, text)
        assert r.pool.stats().spawned == 0
    assert reply["result"]["status"] == "Failed"
    assert reply["result"]["error"] == "node `zz` not found in graph"
    assert reply["result"]["code"] == "unknown_node"


async def test_other_protocol_versions_are_refused_naming_both(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        reply = await _run(r, _golden("p-v3", "Forward", protocol_version=3))
        assert r.pool.stats().spawned == 0
    assert reply["result"]["code"] == "protocol_mismatch"
    assert "3" in reply["result"]["error"] and "[1, 2]" in reply["result"]["error"]


def _single(plan_id: str, obj: Any, values: list[Any], **plan: Any) -> str:
    return json.dumps(
        {
            "type": "AssignPlan",
            "plan": {
                "plan_id": plan_id,
                "plan": {"Execute": {"node_id": "n"}},
                "input": {"source": "Inline", "value": _tensor(values)},
                "filters": [{"node_id": "n", "pickled_filter": _b64(obj), "state": None}],
                "mode": "Forward",
                **plan,
            },
        }
    )


async def test_null_tensor_entries_reach_the_filter_as_nan(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        reply = await _run(r, _single("p-nan-in", F.NanCheck(), [1.0, None, 3.0]))
    assert reply["result"]["output"]["value"] == {"type": "Json", "data": [False, True, False]}


async def test_a_nan_output_fails_with_encoding_error_within_a_second(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await _run(r, _single("p-warm", F.Echo(), [1.0]))  # a warm child, so the clock measures the failure
        started = time.monotonic()
        reply = await _run(r, _single("p-nan-out", F.MakeNan(), [1.0]))
        elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert reply["result"]["status"] == "Failed" and reply["result"]["code"] == "encoding_error"
    assert "non-finite value at output[1]" in reply["result"]["error"] and "wire v2" in reply["result"]["error"]


async def test_user_errors_keep_the_0_2_43_wording_and_the_text_intact(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        reply = await _run(r, _single("p-fail", F.Failing(), [1.0]))
    assert reply["result"]["code"] == "user_error" and reply["result"]["node_id"] == "n"
    assert reply["result"]["error"] == f"Python forward() error: ValueError: {F.Failing.message}"


async def test_events_are_sent_only_when_the_client_asks_for_them(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        quiet = RecordingConnection("v1")
        await _run(r, _single("p-quiet", F.Echo(), [1.0]), quiet)
        asked = RecordingConnection("v1")
        await _run(r, _single("p-events", F.Echo(), [1.0], metadata={"soma_events": True}), asked)
    assert quiet.events() == []
    assert [e["event_type"] for e in asked.events()] == ["NodeStarted", "NodeCompleted"]
    assert {e["run_id"] for e in asked.events()} == {"p-events"}
    for event in asked.events():
        assert isinstance(event["ts"], float) and event["phase"] == "forward"
    for message, _ in asked.frames:
        assert json.loads(v1.encode_json(message))["type"] == "Event"


async def test_states_holding_objects_travel_as_pickles_and_come_back_working(tmp_path: Path) -> None:
    def text(plan_id: str, mode: Any, state: Any) -> str:
        return json.dumps(
            {
                "type": "AssignPlan",
                "plan": {
                    "plan_id": plan_id,
                    "plan": {"Execute": {"node_id": "o"}},
                    "input": {"source": "Inline", "value": {"type": "Json", "data": [1, 2]}},
                    "filters": [
                        {"node_id": "o", "pickled_filter": _b64(F.ObjectState()), "state": state, "trainable": True}
                    ],
                    "mode": mode,
                },
            }
        )

    async with rig(tmp_path) as r:
        fitted = await _run(r, text("p-obj-fit", {"Fit": {"y": None}}, None))
        state = fitted["result"]["states"]["o"]
        assert state["type"] == "Bytes" and bytes(state["data"]).startswith(v1.PICKLE_MAGIC)
        forward = await _run(r, text("p-obj-forward", "Forward", state))
    assert forward["result"]["output"]["value"]["data"]["values"] == [4.0, 5.0]


async def test_a_stand_alone_0_2_43_client_fits_then_forwards_filter_subclasses(tmp_path: Path) -> None:
    """A plain aiohttp v1 client (no subprotocol, JSON text, query token) whose filters subclass
    ``soma.filter.Filter`` and use ``soma.search``: the classes unpickle in the worker's children."""
    script = Path(__file__).with_name("_v1_client.py")
    token = "compat-token-0123456789abcdef"
    async with running(worker_config(tmp_path, token=token, host="127.0.0.1")) as live:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), live.url, token,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["references"] == {"soma.filter": True, "FilterMeta": True, "soma.search": True}
    fit, forward = report["fit"], report["forward"]
    assert fit["status"] == "Success", fit
    assert fit["states"] == {"centre": {"type": "Json", "data": {"mean": 2.0}}}
    # centre: x - mean + offset (the search default 1.0); d doubles.
    assert fit["output"] == {"delivery": "Inline", "value": _tensor([0.0, 2.0, 4.0])}
    assert forward["status"] == "Success", forward
    assert forward["output"] == {"delivery": "Inline", "value": _tensor([6.0, 8.0])}
