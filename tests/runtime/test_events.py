"""Events: subscriptions, ordering, failing callbacks, re-entrancy (api.md §8, §11 items 42-45, 63)."""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

import numpy as np
import pytest
from _graph_filters import AddOne, Boom, Identity, MeanCenter, RowCounter, Scale

from soma import Graph, SomaError, SomaWarning
from soma.runtime.events import EventHub

Events = list[dict[str, Any]]


def types(events: Events) -> list[str]:
    return [e["event_type"] for e in events]


def test_hub_delivers_in_subscription_order_and_filters_types() -> None:
    hub = EventHub()
    seen: list[tuple[str, str]] = []
    hub.subscribe(lambda e: seen.append(("first", e["event_type"])))
    hub.subscribe(lambda e: seen.append(("second", e["event_type"])), event_types=["B"])
    hub.emit({"event_type": "A"})
    hub.emit({"event_type": "B"})
    assert seen == [("first", "A"), ("first", "B"), ("second", "B")]


def test_cancel_is_idempotent_and_context_manager_cancels() -> None:
    hub = EventHub()
    seen: Events = []
    sub = hub.subscribe(seen.append)
    sub.cancel()
    sub.cancel()
    hub.emit({"event_type": "A"})
    with hub.subscribe(seen.append) as scoped:
        hub.emit({"event_type": "B"})
    hub.emit({"event_type": "C"})
    assert types(seen) == ["B"]
    assert not scoped.active
    assert not hub.active


def test_bad_subscriptions_are_refused() -> None:
    hub = EventHub()
    with pytest.raises(TypeError):
        hub.subscribe("not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="list of event type names"):
        hub.subscribe(print, event_types="RunStarted")
    assert not hub.active


def test_fit_emits_run_and_node_events_before_returning() -> None:
    g = Graph.somatize(AddOne() >> MeanCenter())
    events: Events = []
    g.on_event(events.append)
    g.fit(np.arange(4.0))
    assert types(events) == [
        "RunStarted",
        "NodeStarted",
        "NodeCompleted",
        "NodeStarted",
        "NodeCompleted",
        "RunCompleted",
    ]
    for event in events:
        assert isinstance(event["ts"], float)
        assert event["phase"] == "fit"
        assert re.fullmatch(r"graph_fit_[0-9a-f]{16}", event["run_id"])
    assert len({e["run_id"] for e in events}) == 1
    json.dumps(events)  # plain JSON-serialisable values
    started, completed = events[1], events[2]
    assert (
        started["node_id"] == "add_one"
        and started["kind"] == "Stateless"
        and started["target"] == "local"
    )
    assert events[3]["kind"] == "Trainable"
    assert completed["cache_hit"] is False
    assert completed["output_summary"] == "ndarray(shape=(4,), dtype=float64)"
    assert isinstance(completed["duration"], int) and isinstance(completed["duration_s"], float)
    assert events[0]["plan_summary"] == {
        "total_nodes": 2,
        "cached_nodes": 0,
        "parallel_branches": 0,
    }
    assert events[0]["n_nodes"] == 2 and events[0]["seed"] is None
    assert events[-1]["nodes_executed"] == 2 and events[-1]["cache_hits"] == 0


def test_forward_and_run_events_carry_their_phase_and_cache_hits() -> None:
    g = Graph.somatize(AddOne() >> MeanCenter(), seed=3)
    x = np.arange(4.0)
    g.fit(x)
    events: Events = []
    g.on_event(events.append)
    g.forward(x)
    g.run(x)
    forward = [e for e in events if e["phase"] == "forward"]
    run = [e for e in events if e["phase"] == "run"]
    assert forward[0]["run_id"].startswith("graph_forward_")
    assert forward[0]["plan_summary"]["cached_nodes"] == 2
    hits = [e for e in forward if e["event_type"] == "NodeCacheHit"]
    assert [(h["node_id"], h["what"], h["tier"]) for h in hits] == [
        ("add_one", "output", "memory"),
        ("mean_center", "output", "memory"),
    ]
    assert all(
        re.fullmatch(r"[0-9a-f]{64}", h["key"]) and isinstance(h["load_time"], int) for h in hits
    )
    assert forward[-1]["cache_hits"] == 2 and forward[-1]["nodes_executed"] == 0
    assert run[0]["run_id"].startswith("graph_run_") and "NodeCacheHit" not in types(run)
    assert run[0]["seed"] == 3


def test_failing_node_emits_node_failed_then_run_failed() -> None:
    g = Graph.somatize(AddOne() >> Boom("fit") >> AddOne())
    events: Events = []
    g.on_event(events.append)
    with pytest.raises(SomaError) as info:
        g.fit(1)
    assert types(events) == [
        "RunStarted",
        "NodeStarted",
        "NodeCompleted",
        "NodeStarted",
        "NodeFailed",
        "RunFailed",
    ]
    failed, run_failed = events[-2], events[-1]
    assert failed["node_id"] == "boom" and failed["error_type"] == "ValueError"
    assert failed["error"] == str(info.value)
    assert run_failed["error"] == str(info.value) and run_failed["node_id"] == "boom"


def test_two_subscribers_see_the_same_events_in_the_same_order() -> None:
    g = Graph.somatize(AddOne() >> (Identity() | MeanCenter()))
    first: Events = []
    second: Events = []
    g.on_event(first.append)
    g.on_event(second.append)
    g.fit(np.ones(3))
    assert first == second and len(first) == 8


def test_raising_callback_warns_once_per_subscription_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = Graph.somatize(AddOne() >> AddOne() >> AddOne())
    received: Events = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("callback bug")

    g.on_event(broken)
    g.on_event(broken)
    g.on_event(received.append)
    with (
        caplog.at_level(logging.ERROR, logger="soma.events"),
        pytest.warns(SomaWarning, match="callback bug") as record,
    ):
        g.fit(0)
    assert len([w for w in record if issubclass(w.category, SomaWarning)]) == 2
    assert len(received) == 8 and received[-1]["event_type"] == "RunCompleted"
    assert g.fitted
    assert any(r.exc_info for r in caplog.records if r.name == "soma.events")


def test_cancel_stops_delivery_and_event_types_filter() -> None:
    g = Graph.somatize(AddOne())
    seen: Events = []
    only_runs: Events = []
    sub = g.on_event(seen.append)
    g.on_event(only_runs.append, event_types=["RunStarted", "RunCompleted"])
    g.fit(0)
    sub.cancel()
    g.forward(0)
    assert types(seen) == ["RunStarted", "NodeStarted", "NodeCompleted", "RunCompleted"]
    assert types(only_runs) == ["RunStarted", "RunCompleted"] * 2


def test_events_emitted_before_subscribing_are_not_delivered() -> None:
    g = Graph.somatize(AddOne())
    g.fit(0)
    seen: Events = []
    g.on_event(seen.append)
    assert seen == []


def test_parallel_runs_pair_every_node_started() -> None:
    roots = [Boom("forward") if i == 2 else AddOne() for i in range(6)]
    g = Graph(max_parallel=4)
    for f in roots:
        g.node(f)
    events: Events = []
    g.on_event(events.append)
    with pytest.raises(SomaError):
        g.fit(1)
    names = types(events)
    assert names.count("NodeStarted") == names.count("NodeCompleted") + names.count("NodeFailed")
    assert names[0] == "RunStarted" and names[-1] == "RunFailed"
    for nid in {e["node_id"] for e in events if e["event_type"] == "NodeStarted"}:
        own = [
            e["event_type"]
            for e in events
            if e.get("node_id") == nid and e["event_type"].startswith("Node")
        ]
        assert own[0] == "NodeStarted" and own[-1] in ("NodeCompleted", "NodeFailed")


def test_parallel_success_delivers_everything_once() -> None:
    g = Graph(max_parallel=4)
    for _ in range(8):
        g.node(Scale())
    events: Events = []
    g.on_event(events.append)
    g.fit(np.ones(3))
    names = types(events)
    assert names.count("NodeStarted") == names.count("NodeCompleted") == 8
    assert sorted(e["node_id"] for e in events if e["event_type"] == "NodeCompleted") == sorted(
        g.nodes()
    )


def test_fit_inside_an_event_callback_is_refused() -> None:
    g = Graph.somatize(AddOne())
    errors: list[BaseException] = []

    def reenter(event: dict[str, Any]) -> None:
        if event["event_type"] == "NodeStarted":
            try:
                g.fit(1)
            except SomaError as exc:
                errors.append(exc)

    g.on_event(reenter)
    g.fit(0)
    assert len(errors) == 1
    assert str(errors[0]) == "graph is already running (re-entrant call)"


def test_reentrant_call_from_a_pool_thread_callback_is_refused() -> None:
    g = Graph(max_parallel=2)
    g.node(AddOne())
    g.node(AddOne())
    errors: list[BaseException] = []
    threads: set[str] = set()

    def reenter(event: dict[str, Any]) -> None:
        if event["event_type"] == "NodeStarted":
            threads.add(threading.current_thread().name)
            try:
                g.run(0)
            except SomaError as exc:
                errors.append(exc)

    g.on_event(reenter)
    g.fit(0)
    assert len(errors) == 2 and all("re-entrant" in str(e) for e in errors)
    assert any(name.startswith("soma-node") for name in threads)


def test_batch_progress_events_per_batch() -> None:
    g = Graph.somatize(RowCounter())
    events: Events = []
    g.on_event(events.append, event_types=["BatchProgress"])
    g.fit(list(range(10)), batch_size=4)
    assert [
        (e["node_id"], e["batch"], e["n_batches"], e["rows"], e["total_rows"]) for e in events
    ] == [
        ("row_counter", 1, 3, 4, 10),
        ("row_counter", 2, 3, 4, 10),
        ("row_counter", 3, 3, 2, 10),
    ]
