"""Remote execution from a Graph on an embedded worker: placement, events, errors, values, time limits."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import _remote_filters as rf
import numpy as np
import pytest

from soma import Graph, Worker
from soma.client import sync_client
from soma.client.sync_client import client_for, close_all
from soma.errors import (
    ChildError,
    ChildTimeoutError,
    FilterError,
    RemoteError,
    WorkerUnavailableError,
)
from soma.wire.messages import CachedRef


def remote_graph(worker: Worker, token: str, **kwargs: Any) -> Graph:
    graph = Graph(**kwargs)
    graph.add_worker(worker.address, token=token)
    return graph


def record(graph: Graph) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    graph.on_event(events.append)
    return events


def test_fork_join_receives_predecessors_in_edge_order_like_locally(worker: Worker, worker_token: str) -> None:
    def build(g: Graph) -> Graph:
        g.node("src", rf.Source())
        g.node("l", rf.Offset(amount=1.0))
        g.node("r", rf.Offset(amount=-1.0))
        g.node("j", rf.Keys())
        for edge in [("src", "l"), ("src", "r"), ("l", "j"), ("r", "j")]:
            g.edge(*edge)
        return g

    remote, local = build(remote_graph(worker, worker_token)), build(Graph())
    for g in (remote, local):
        g.fit([1.0, 2.0, 3.0])
    out = remote.forward([1.0, 2.0, 3.0])
    assert out == local.forward([1.0, 2.0, 3.0])
    assert out["keys"] == ["l", "r"] and list(out["x"]) == ["l", "r"]
    assert remote.get_state("l") == local.get_state("l") == {"offset": 21.0}
    assert remote.get_state("r") == {"offset": 19.0}
    assert remote.get_state("j") is None


def test_a_chained_fit_always_sees_the_predecessor_output(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token, cache=False)
    graph.node("a", rf.Shift())
    graph.node("b", rf.SeenInFit())
    graph.edge("a", "b")
    for i in range(50):
        graph.fit([float(i), 1.0])
        assert graph.get_state("b") == [i + 100.0, 101.0]
        assert graph.get_state("a") == {"seen": [float(i), 1.0]}


def test_with_workers_the_whole_default_graph_is_one_remote_block(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token)
    graph.node("a", rf.Source())
    graph.node("b", rf.Offset())
    graph.node("c", rf.Keys())
    graph.edge("a", "b")
    graph.edge("a", "c")
    plan = graph.compile()["plan"]
    assert plan["type"] == "Remote" and plan["target"] == worker.address
    assert plan["plan"]["steps"][0] == {"type": "Execute", "node_id": "a"}
    assert {b["node_id"] for b in plan["plan"]["steps"][1]["branches"]} == {"b", "c"}


def test_a_local_node_runs_in_process_and_the_others_on_the_worker(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token)
    graph.node("first", rf.Where())
    graph.node("here", rf.Where(), target="local")
    graph.node("last", rf.Where())
    graph.edge("first", "here")
    graph.edge("here", "last")
    events = record(graph)
    graph.fit("x")
    result = graph.run("x")
    assert graph.get_state("here") == {"pid": os.getpid()}
    assert graph.get_state("first")["pid"] != os.getpid()
    assert result["last"]["fit_pid"] != os.getpid() and result["here"]["forward_pid"] == os.getpid()
    targets = {e["node_id"]: e["target"] for e in events if e["event_type"] == "NodeStarted"}
    assert targets == {"first": worker.address, "here": "local", "last": worker.address}
    assert [p["type"] for p in graph.compile()["plan"]["steps"]] == ["Remote", "Execute", "Remote"]


def test_an_unmatched_tag_fails_before_any_user_code(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token)
    graph.node("a", rf.Where(), target="local")
    graph.node("b", rf.Where(), target="tag:gpu")
    graph.edge("a", "b")
    events = record(graph)
    with pytest.raises(WorkerUnavailableError, match="no worker matches target 'tag:gpu'"):
        graph.fit("x")
    assert events == [] and not graph.fitted


def test_without_workers_targets_are_reported_and_ignored() -> None:
    graph = Graph()
    graph.node("a", rf.Where(), target="tag:gpu")
    diagnostics = graph.compile()["diagnostics"]
    assert {
        "node_id": "a",
        "level": "info",
        "message": "target 'tag:gpu' ignored: no workers configured",
    } in diagnostics
    graph.fit("x")
    assert graph.get_state("a") == {"pid": os.getpid()}


def test_worker_targets_are_resolved_through_info(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token)
    graph.node("a", rf.Where(), target="worker:client-tests")
    events = record(graph)
    graph.fit("x")
    assert graph.get_state("a")["pid"] != os.getpid()
    assert [e["target"] for e in events if e["event_type"] == "NodeStarted"] == [worker.address]
    other = remote_graph(worker, worker_token)
    other.node("a", rf.Where(), target="worker:nobody")
    with pytest.raises(WorkerUnavailableError, match="worker:nobody"):
        other.fit("x")


def test_worker_events_are_reemitted_in_order_with_the_worker(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token)
    graph.node("a", rf.Source())
    graph.node("b", rf.Offset())
    graph.edge("a", "b")
    events = record(graph)
    graph.fit([1.0])
    graph.run([1.0])
    for phase in ("fit", "run"):
        run = [e for e in events if e.get("phase") == phase]
        kinds = [e["event_type"] for e in run]
        assert kinds[0] == "RunStarted" and kinds[1] == "RemoteDispatched" and kinds[-1] == "RunCompleted"
        assert [k for k in kinds if k.startswith("Node") and k != "NodeCacheHit"] == [
            "NodeStarted",
            "NodeCompleted",
            "NodeStarted",
            "NodeCompleted",
        ]
        run_id = run[0]["run_id"]
        assert all(e["run_id"] == run_id for e in run)
        assert run[1]["worker"] == worker.address and run[1]["node_ids"] == ["a", "b"]
        assert all(e["worker"] == worker.address for e in run if e["event_type"].startswith("Node"))


def test_a_remote_user_error_is_a_filter_error_with_its_traceback(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token)
    graph.node("ok", rf.Offset())
    graph.node("bad", rf.Fails())
    graph.edge("ok", "bad")
    events = record(graph)
    with pytest.raises(FilterError) as info:
        graph.fit([1.0, 2.0])
    error = info.value
    assert str(error) == "Python fit() error: ValueError: cannot fit [-0.5, 0.5]"
    assert error.node_id == "bad" and error.code == "user_error" and error.phase == "fit"
    assert isinstance(error.__cause__, ValueError)
    assert "ValueError" in (error.remote_traceback or "")
    kinds = [(e["event_type"], e.get("node_id")) for e in events]
    assert kinds[-2:] == [("NodeFailed", "bad"), ("RunFailed", "bad")]
    assert events[-1]["error"] == str(error)
    assert not graph.fitted and graph.get_state("ok") is None


def test_the_graph_seed_reaches_remote_filters(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token, seed=77)
    graph.node(rf.Seed())
    graph.fit(None)
    assert graph.forward(None) == {"fit": 77, "forward": 77}


def test_large_values_travel_by_reference_once_per_run(
    worker: Worker, worker_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uploads: list[int] = []
    original = sync_client.RemoteClient.upload_frame

    def counting(self: sync_client.RemoteClient, frame: Any, **options: Any) -> CachedRef:
        uploads.append(sum(memoryview(part).nbytes for part in frame))
        return original(self, frame, **options)

    monkeypatch.setattr(sync_client.RemoteClient, "upload_frame", counting)
    x = np.linspace(0.0, 1.0, 1_400_000)  # 11.2 MB, above the 10 MiB inline threshold
    graph = remote_graph(worker, worker_token)
    graph.node("first", rf.Mean())
    graph.node("middle", rf.Mean(), target="local")
    graph.node("last", rf.Mean())
    graph.edge("first", "middle")
    graph.edge("middle", "last")
    graph.fit(x, y=x)
    # x (also y, the same object) once, then the middle output; y is not sent again for "last".
    assert len(uploads) == 2 and min(uploads) > 10 * 2**20
    out = graph.forward(x)
    assert out.dtype == x.dtype and out.shape == x.shape
    np.testing.assert_allclose(out, x - x.mean(), atol=1e-12)
    local = Graph()
    for nid in ("first", "middle", "last"):
        local.node(nid, rf.Mean())
    local.edge("first", "middle")
    local.edge("middle", "last")
    local.fit(x)
    np.testing.assert_array_equal(out, local.forward(x))
    assert graph.get_state("last") == local.get_state("last")


def test_a_large_input_uploaded_by_an_earlier_run_is_neither_encoded_nor_sent_again(
    worker_token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from soma.client import remote

    encoded: list[int] = []
    uploads: list[int] = []
    measure, upload = remote.measured, sync_client.RemoteClient.upload_frame

    def measuring(value: Any) -> Any:
        size, parts = measure(value)
        encoded.append(size)
        return size, parts

    def counting(self: sync_client.RemoteClient, frame: Any, **options: Any) -> CachedRef:
        uploads.append(sum(memoryview(part).nbytes for part in frame))
        return upload(self, frame, **options)

    monkeypatch.setattr(remote, "measured", measuring)
    monkeypatch.setattr(sync_client.RemoteClient, "upload_frame", counting)
    x = np.linspace(0.0, 1.0, 1_400_000)  # 11.2 MB, above the 10 MiB inline threshold
    with Worker(port=0, token=worker_token, temp_dir=tmp_path / "temp", work_dir=tmp_path / "work") as worker:
        for amount in (1.0, 2.0):  # the second graph hits no cache, but its input is on the worker
            graph = remote_graph(worker, worker_token)
            graph.node(rf.Plus(amount))
            graph.fit(x[:3])
            np.testing.assert_array_equal(graph.forward(x), x + amount)
        assert len(uploads) == 1 and sum(size > 2**20 for size in encoded) == 1
        for stored in (tmp_path / "temp" / "store").iterdir():
            stored.unlink()  # swept meanwhile: the input is sent again
        graph = remote_graph(worker, worker_token)
        graph.node(rf.Plus(3.0))
        graph.fit(x[:3])
        np.testing.assert_array_equal(graph.forward(x), x + 3.0)
        assert len(uploads) == 2
        close_all()


def _blocks_sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The phases of the Remote blocks sent to a worker from now on."""
    from soma.client import remote

    sent: list[str] = []
    run_block = remote.WorkerRunner.run_block

    def counting(self: Any, request: Any, emit: Any) -> Any:
        sent.append(request.phase)
        return run_block(self, request, emit)

    monkeypatch.setattr(remote.WorkerRunner, "run_block", counting)
    return sent


@pytest.mark.parametrize("listening", [False, True], ids=["unobserved", "observed"])
def test_a_remote_block_the_clients_cache_holds_is_served_like_a_local_node(
    worker: Worker, worker_token: str, monkeypatch: pytest.MonkeyPatch, listening: bool
) -> None:
    sent = _blocks_sent(monkeypatch)
    remote, local = remote_graph(worker, worker_token), Graph()
    events: dict[int, list[dict[str, Any]]] = {}
    outputs: dict[int, list[Any]] = {}
    for graph in (remote, local):  # two sinks: the reply of a fit carries both outputs
        graph.node("first", rf.Offset(amount=1.0))
        graph.node("second", rf.Offset(amount=2.0))
        graph.fit([1.0, 2.0, 3.0])  # the worker's cache may answer this one from an earlier test
        if listening:
            events[id(graph)] = record(graph)
        outputs[id(graph)] = [graph.forward([1.0, 2.0, 3.0])]  # forward after fit: served by the cache
        graph.fit([1.0, 2.0, 3.0])  # the same fit again: states and outputs from the cache
        outputs[id(graph)].append(graph.forward([1.0, 2.0, 3.0]))
    assert sent == ["fit"]
    assert outputs[id(remote)] == outputs[id(local)]
    for nid in ("first", "second"):
        assert remote.get_state(nid) == local.get_state(nid)
    if listening:

        def hits(graph: Graph) -> list[tuple[str, str]]:
            return [(e["node_id"], e["what"]) for e in events[id(graph)] if e["event_type"] == "NodeCacheHit"]

        assert hits(remote) == hits(local)
        assert hits(remote).count(("second", "state")) == 1 and len(hits(remote)) == 8


def test_a_remote_block_the_clients_cache_holds_in_part_goes_to_the_worker_whole(
    worker: Worker, worker_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = _blocks_sent(monkeypatch)
    graph = remote_graph(worker, worker_token)
    second = rf.Offset(amount=2.0)
    graph.node("first", rf.Offset(amount=1.0))
    graph.node("second", second)
    graph.fit([1.0, 2.0, 3.0])
    before = graph.get_state("second")
    second.amount = 5.0  # the second node's keys change, the first's do not
    graph.fit([1.0, 2.0, 3.0])
    graph.forward([1.0, 2.0, 3.0])  # both outputs are in the cache now
    assert sent == ["fit", "fit"]
    assert graph.get_state("second") == {"offset": before["offset"] + 3.0}


def test_a_chain_whose_inner_output_stayed_on_the_worker_is_sent_there_again(
    worker: Worker, worker_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = _blocks_sent(monkeypatch)
    remote, local = remote_graph(worker, worker_token), Graph()
    for graph in (remote, local):
        graph.node("first", rf.Offset(amount=1.0))
        graph.node("second", rf.Offset(amount=2.0))
        graph.edge("first", "second")
        graph.fit([1.0, 2.0, 3.0])
    assert remote.forward([1.0, 2.0, 3.0]) == local.forward([1.0, 2.0, 3.0])
    assert sent == ["fit", "forward"]  # the worker's cache answers it


def test_a_remote_node_predicted_cached_but_evicted_runs_on_its_worker(
    worker: Worker, worker_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = remote_graph(worker, worker_token)
    graph.node("where", rf.Where())
    graph.fit([1])
    record(graph)  # an observed run predicts Cached steps for its plan summary
    cache = graph.cache
    assert cache is not None
    cache.clear()
    monkeypatch.setattr(cache, "contains", lambda key: True)  # there when asked, gone when read
    out = graph.forward([1])
    assert out["forward_pid"] != os.getpid() and out["fit_pid"] != os.getpid()


def test_an_upload_the_worker_evicts_after_saying_it_held_it_is_sent_again(
    worker_token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.linspace(0.0, 1.0, 1_400_000)  # above the 10 MiB inline threshold
    held = sync_client.RemoteClient.held_upload

    def held_then_evicted(self: sync_client.RemoteClient, content: bytes) -> CachedRef | None:
        ref = held(self, content)
        for stored in (tmp_path / "temp" / "store").iterdir():
            stored.unlink()  # LRU eviction (--store-max-bytes) right after the HEAD that found it
        return ref

    with Worker(port=0, token=worker_token, temp_dir=tmp_path / "temp", work_dir=tmp_path / "work") as worker:
        for amount in (1.0, 2.0):
            graph = remote_graph(worker, worker_token)
            graph.node(rf.Plus(amount))
            graph.fit(x[:3])
            if amount == 2.0:
                monkeypatch.setattr(sync_client.RemoteClient, "held_upload", held_then_evicted)
            np.testing.assert_array_equal(graph.forward(x), x + amount)
        close_all()


def test_a_failed_download_raises(worker: Worker, worker_token: str) -> None:
    with pytest.raises(RemoteError) as info:
        client_for(worker.address, worker_token).download(CachedRef(cache_key="ab" * 32))
    assert info.value.code == "unresolved_reference"


def test_fit_works_inside_a_running_event_loop(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token)
    graph.node(rf.Offset())

    async def main() -> Any:
        graph.fit([2.0, 4.0])
        return graph.forward([3.0])

    assert asyncio.run(main()) == [0.0]


def test_a_remote_time_limit_is_a_child_timeout(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token)
    graph.node(rf.Sleeps(seconds=30))
    with pytest.raises(ChildTimeoutError) as info:
        graph.fit(1, timeout=1)
    assert info.value.where == worker.address and info.value.code == "timeout"


def test_a_crashing_child_is_a_child_error_naming_the_worker(worker: Worker, worker_token: str) -> None:
    graph = remote_graph(worker, worker_token)
    graph.node(rf.Crashes())
    with pytest.raises(ChildError) as info:
        graph.fit(1)
    assert info.value.where == worker.address and info.value.code == "child_crashed"
    assert info.value.node_id == "crashes"


def test_the_worker_streams_events_only_to_a_graph_that_listens(
    worker: Worker, worker_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from soma.client import remote

    relayed: list[str] = []
    relay_call = remote._EventRelay.__call__

    def spy(self: Any, frame: Any) -> None:
        relayed.append(type(frame).__name__)
        relay_call(self, frame)

    monkeypatch.setattr(remote._EventRelay, "__call__", spy)
    quiet = remote_graph(worker, worker_token, cache=False)
    quiet.node("offset", rf.Offset(amount=1.0))
    quiet.fit([1.0, 2.0])
    assert relayed == []  # nobody listens: the worker sends the reply alone
    listening = remote_graph(worker, worker_token, cache=False)
    listening.node("offset", rf.Offset(amount=1.0))
    events = record(listening)
    listening.fit([1.0, 2.0])
    assert relayed and set(relayed) == {"Event"}
    assert [(e["event_type"], e["worker"]) for e in events if e["event_type"].startswith("Node")] == [
        ("NodeStarted", worker.address),
        ("NodeCompleted", worker.address),
    ]
    assert quiet.get_state("offset") == listening.get_state("offset")
