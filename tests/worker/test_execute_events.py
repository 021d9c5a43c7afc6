"""Live node events from a running plan (worker spec §6.7, api.md §8)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import _execute_filters as F
from _execute_support import RecordingConnection, chain, filt, fit_mode, plan, rig, success

from soma.wire.messages import Event


async def test_node_events_stream_live_with_the_clients_run_id_before_the_reply(tmp_path: Path) -> None:
    conn = RecordingConnection()
    async with rig(tmp_path) as r:
        await asyncio.to_thread(r.pool.prewarm, r.executor.child_spec(), 1)
        msg = plan(
            chain("a", "b", "c"),
            [filt("a", F.Sleeper(1.0)), filt("b", F.Sleeper(1.0)), filt("c", F.Sleeper(1.0))],
            input=[1, 2],
            run_id="graph_forward_00112233aabbccdd",
            outputs=["c"],
            request_id="r-17",
        )
        success(await r.run(msg, conn))
        replied = asyncio.get_running_loop().time()
    events = conn.events()
    assert [(e["event_type"], e["node_id"]) for e in events] == [
        ("NodeStarted", "a"), ("NodeCompleted", "a"),
        ("NodeStarted", "b"), ("NodeCompleted", "b"),
        ("NodeStarted", "c"), ("NodeCompleted", "c"),
    ]  # fmt: skip
    assert {e["run_id"] for e in events} == {"graph_forward_00112233aabbccdd"}
    assert {e["phase"] for e in events} == {"forward"}
    assert all(re == "r-17" for _, re in conn.frames)
    assert all(isinstance(m, Event) and m.plan_id == msg.plan.plan_id for m, _ in conn.frames)
    first_completed = conn.times[1]
    assert replied - first_completed >= 1.0
    completed = [e for e in events if e["event_type"] == "NodeCompleted"]
    assert all(e["duration"] >= 900 and e["cache_hit"] is False for e in completed)
    assert completed[0]["output_summary"] == "list(len=2)"
    assert events[0]["kind"] == "Stateless" and events[0]["target"] == "w-test"


async def test_a_slow_client_still_receives_every_batch_event_in_order(tmp_path: Path) -> None:
    conn = RecordingConnection(delay=0.03)
    rows = list(range(40))
    async with rig(tmp_path) as r:
        msg = plan(
            chain("c"),
            [filt("c", F.PartialCounter(), trainable=True)],
            input=rows,
            mode=fit_mode(y=rows, batch_size=2),
        )
        result = success(await r.run(msg, conn))
    assert result.states["c"] == {"batches": 20, "rows": 40}
    batches = [e["batch"] for e in conn.events("BatchProgress")]
    assert batches == list(range(1, 21))
    types = [e["event_type"] for e in conn.events()]
    assert types[0] == "NodeStarted" and types[-1] == "NodeCompleted"
    assert {e["phase"] for e in conn.events()} == {"fit"}


async def test_log_events_only_when_asked_and_no_events_when_disabled(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        logs = RecordingConnection()
        await r.run(plan(chain("p"), [filt("p", F.Printer())], input=[1], events={"enabled": True, "logs": True}), logs)
        quiet = RecordingConnection()
        await r.run(plan(chain("p"), [filt("p", F.Printer())], input=[1]), quiet)
        silent = RecordingConnection()
        await r.run(plan(chain("p"), [filt("p", F.Printer())], input=[1], events={"enabled": False}), silent)
    lines = {(e["stream"], e["line"], e["node_id"]) for e in logs.events("Log")}
    assert ("stdout", "hello from forward", "p") in lines and ("stderr", "warning line", "p") in lines
    assert quiet.events("Log") == [] and len(quiet.events()) == 2
    assert silent.frames == []
