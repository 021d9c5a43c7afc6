"""Walking plans on the worker: topology, fit and forward, validation, references, isolation, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import _execute_filters as F
import numpy as np
import pytest
from _execute_support import RecordingConnection, chain, failure, filt, fit_mode, plan, rig, success

from soma.graph import Graph
from soma.wire import v2
from soma.wire.messages import ERROR_CODES, CachedRef, Error, InlineRef, LocalRef, S3Ref

FORK_JOIN = {
    "type": "Sequence",
    "steps": [
        {"type": "Execute", "node_id": "src"},
        {"type": "Parallel", "branches": [{"type": "Execute", "node_id": "l"}, {"type": "Execute", "node_id": "r"}]},
        {"type": "Execute", "node_id": "j"},
    ],
}


async def test_fit_returns_the_output_and_the_state_of_every_trainable_node(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        msg = plan(
            chain("s", "d"),
            [filt("s", F.Scaler(), trainable=True), filt("d", F.Doubler())],
            input=[1.0, 2.0, 3.0],
            mode=fit_mode(),
            outputs=["d"],
        )
        result = success(await r.run(msg))
    assert result.output == [-2.0, 0.0, 2.0]
    assert result.states == {"s": {"mean": 2.0}}
    assert set(result.timings or {}) == {"queue_ms", "env_ms", "exec_ms"}


async def test_forward_runs_with_the_states_the_client_sends(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        msg = plan(
            chain("s", "d"),
            [filt("s", F.Scaler(), trainable=True, state={"mean": 1.0}), filt("d", F.Doubler())],
            input=[1.0, 2.0],
            outputs=["d"],
        )
        result = success(await r.run(msg))
    assert result.output == [0.0, 2.0]
    assert result.states == {}


async def test_fork_join_receives_predecessors_in_edge_order_and_equals_local(tmp_path: Path) -> None:
    filters = [filt("src", F.Echo()), filt("l", F.AddOne()), filt("r", F.Doubler()), filt("j", F.Keys())]
    async with rig(tmp_path) as r:
        forward = plan(
            FORK_JOIN, filters, input=[1, 2], edges=[("src", "l"), ("src", "r"), ("l", "j"), ("r", "j")], outputs=["j"]
        )
        result = success(await r.run(forward))
        swapped = plan(
            FORK_JOIN, filters, input=[1, 2], edges=[("src", "l"), ("src", "r"), ("r", "j"), ("l", "j")], outputs=["j"]
        )
        swapped_result = success(await r.run(swapped))
    assert result.output == {"keys": ["l", "r"], "values": [[2, 3], [2, 4]]}
    assert swapped_result.output["keys"] == ["r", "l"]
    local = Graph()
    for node_id, obj in (("src", F.Echo()), ("l", F.AddOne()), ("r", F.Doubler()), ("j", F.Keys())):
        obj._kind = "stateless"
        local.node(node_id, obj)
    for edge in (("src", "l"), ("src", "r"), ("l", "j"), ("r", "j")):
        local.edge(*edge)
    local.fit([1, 2])
    assert local.forward([1, 2]) == result.output


async def test_in_a_chain_fit_the_second_node_always_fits_on_the_first_nodes_output(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        for run in range(50):
            msg = plan(
                chain("a", "b"),
                [filt("a", F.Doubler()), filt("b", F.FitRecorder(), trainable=True)],
                input=[run, 1],
                mode=fit_mode(y=[0, 1]),
                outputs=["b"],
            )
            result = success(await r.run(msg))
            assert result.states["b"] == {"x": [2 * run, 2], "y": [0, 1]}


async def test_several_outputs_come_back_as_a_map_and_external_predecessors_feed_the_block(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        msg = plan(
            {"type": "Remote", "node_id": "a", "target": "tag:gpu", "plan": chain("a", "b")},
            [filt("a", F.AddOne()), filt("b", F.Doubler())],
            edges=[("outside", "a"), ("a", "b")],
            external={"outside": [10, 20]},
            outputs=["a", "b"],
        )
        result = success(await r.run(msg))
    assert result.output == {"a": [11, 21], "b": [22, 42]}


async def test_an_empty_plan_answers_with_its_input_and_starts_no_child(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        result = success(await r.run(plan({"type": "Empty"}, [], input={"x": [1, 2]})))
        assert result.output == {"x": [1, 2]}
        assert r.pool.stats().spawned == 0


@pytest.mark.parametrize(
    ("steps", "edges", "code", "text"),
    [
        (chain("a", "zz"), [("a", "zz")], "unknown_node", "node `zz` not found in graph"),
        ({"type": "Loop", "node_id": "a", "body": chain("a"), "max_iterations": 2}, [], "unsupported_plan", "Loop"),
        ({"type": "Branch", "node_id": "a", "arms": [["x", chain("a")]]}, [], "unsupported_plan", "Branch"),
        (chain("a", "a"), [], "bad_plan", "appears twice"),
        (chain("a", "b"), [("b", "a")], "bad_plan", "against the plan order"),
        (chain("a", "b"), [("nowhere", "b")], "bad_plan", "has no value in external"),
    ],
)
async def test_invalid_plans_are_refused_before_any_child_starts(
    tmp_path: Path, steps: dict, edges: list, code: str, text: str
) -> None:
    async with rig(tmp_path) as r:
        msg = plan(steps, [filt("a", F.Echo()), filt("b", F.Echo())], edges=edges, input=[1])
        reply = await r.run(msg)
        assert isinstance(reply, Error), reply
        assert reply.code == code and text in reply.message
        assert (reply.kind, reply.retryable) == ERROR_CODES[code]
        assert reply.plan_id == msg.plan.plan_id
        assert r.pool.stats().spawned == 0
        assert list((r.store.store_dir).iterdir()) == []


async def test_resources_beyond_the_worker_are_insufficient_and_spawn_nothing(tmp_path: Path) -> None:
    async with rig(tmp_path, cpu_cores=2) as r:
        for resources, needle in (({"gpus": 1}, "GPUs"), ({"cpus": 3}, "CPUs"), ({"memory": "1T"}, "memory")):
            reply = await r.run(plan(chain("a"), [filt("a", F.Echo())], input=[1], resources=resources))
            assert isinstance(reply, Error) and reply.code == "insufficient_resources" and needle in reply.message
        reply = await r.run(plan(chain("a"), [filt("a", F.Echo())], input=[1], resources={"cpus": "two"}))
        assert isinstance(reply, Error) and reply.code == "bad_plan"
        assert r.pool.stats().spawned == 0


async def test_a_failing_parallel_member_fails_the_plan_naming_the_node(tmp_path: Path) -> None:
    steps = {
        "type": "Parallel",
        "branches": [{"type": "Execute", "node_id": "ok"}, {"type": "Execute", "node_id": "bad"}],
    }
    conn = RecordingConnection()
    async with rig(tmp_path) as r:
        msg = plan(steps, [filt("ok", F.Echo()), filt("bad", F.Failing())], edges=[], input=[1])
        error = failure(await r.run(msg, conn)).error
        assert (error.code, error.kind, error.node_id) == ("user_error", "Python", "bad")
        assert (error.method, error.python_type) == ("forward", "ValueError")
        assert error.message == F.Failing.message
        assert error.traceback and "ValueError" in error.traceback
        failed = conn.events("NodeFailed")
        assert [e["node_id"] for e in failed] == ["bad"]
        assert failed[0]["error_type"] == "ValueError"
        # The worker keeps serving on the same pool.
        assert success(await r.run(plan(chain("ok"), [filt("ok", F.Echo())], input=[7]))).output == [7]


async def test_a_plan_never_sees_the_filter_or_state_of_an_earlier_plan(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        scaler_a = filt("scaler", F.TaggedTrainable("A"), trainable=True)
        first = plan(chain("scaler"), [scaler_a], input=[1], mode=fit_mode())
        assert success(await r.run(first)).states == {"scaler": {"fitted_by": "A"}}
        second = plan(chain("scaler"), [filt("scaler", F.TaggedTrainable("B"), trainable=True)], input=[1])
        assert success(await r.run(second)).output == {"tag": "B", "state": None}
        third = plan(chain("scaler"), [filt("scaler", F.Tagged("C"))], input=[1])
        assert success(await r.run(third)).output == {"tag": "C", "state": None}
        assert r.pool.stats().spawned == 1  # the same child served all three, reset in between


async def test_unresolvable_and_forbidden_references_fail_the_plan_naming_them(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        missing = plan(chain("a"), [filt("a", F.Echo())], input=CachedRef(cache_key="0" * 64))
        error = failure(await r.run(missing)).error
        assert error.code == "unresolved_reference"
        assert "0" * 64 in error.message and str(r.store.store_dir) in error.message
        for path in ("/etc/passwd", str(r.store.store_dir / ".." / ".." / "x")):
            forbidden = plan(chain("a"), [filt("a", F.Echo())], input=LocalRef(path=path))
            assert failure(await r.run(forbidden)).error.code == "forbidden_path"
        link = r.store.store_dir / "escape.json"
        link.symlink_to("/etc/hostname")
        escaping = plan(chain("a"), [filt("a", F.Echo())], input=LocalRef(path=str(link)))
        assert failure(await r.run(escaping)).error.code == "forbidden_path"
        s3 = plan(chain("a"), [filt("a", F.Echo())], input=S3Ref(bucket="b", key="k"))
        assert failure(await r.run(s3)).error.code == "unsupported_reference"
        inline = plan(chain("a"), [filt("a", F.Echo())], input=InlineRef(value={"k": 1}))
        assert success(await r.run(inline)).output == {"k": 1}


async def test_referenced_inputs_resolve_and_stay_pinned_while_the_plan_runs(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        array = np.arange(6, dtype=np.float32).reshape(3, 2)
        key = r.store.put_bytes(v2.encode_value_frame(array), ".soma")
        filters = [filt("wait", F.Sleeper(0.5)), filt("shape", F.Shape())]
        msg = plan(chain("wait", "shape"), filters, input=CachedRef(cache_key=key))
        task = asyncio.create_task(r.run(msg))
        await asyncio.sleep(0.3)
        pinned_during = r.store.is_pinned(key)
        result = success(await task)
        assert pinned_during and not r.store.is_pinned(key)
        assert result.output == {"type": "ndarray", "shape": [3, 2], "dtype": "float32", "sum": 15.0}
        local = r.store.path_for(key)
        by_path = plan(chain("shape"), [filt("shape", F.Shape())], input=LocalRef(path=str(local)))
        assert success(await r.run(by_path)).output["shape"] == [3, 2]


async def test_a_batched_fit_threads_the_state_through_partial_fit_and_reports_each_batch(tmp_path: Path) -> None:
    conn = RecordingConnection()
    async with rig(tmp_path) as r:
        msg = plan(
            chain("c"),
            [filt("c", F.PartialCounter(), trainable=True)],
            input=[1, 2, 3, 4, 5],
            mode=fit_mode(y=[0, 1, 0, 1, 0], batch_size=2),
            outputs=["c"],
        )
        result = success(await r.run(msg, conn))
    assert result.states == {"c": {"batches": 3, "rows": 5}}
    progress = conn.events("BatchProgress")
    assert [(e["batch"], e["n_batches"], e["rows"], e["total_rows"]) for e in progress] == [
        (1, 3, 2, 5),
        (2, 3, 2, 5),
        (3, 3, 1, 5),
    ]
    assert {e["node_id"] for e in progress} == {"c"}


async def test_seed_and_runtime_reach_the_child(tmp_path: Path) -> None:
    import platform

    import cloudpickle

    async with rig(tmp_path) as r:
        seeded = plan(chain("s"), [filt("s", F.Seed())], input=None, seed=1234)
        assert success(await r.run(seeded)).output == 1234
        runtime = {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__}
        same = plan(chain("s"), [filt("s", F.Seed())], input=None, runtime=runtime)
        assert success(await r.run(same)).output is None
        other = plan(chain("s"), [filt("s", F.Seed())], input=None, runtime={**runtime, "python": "2.7.18"})
        error = failure(await r.run(other)).error
        assert error.code == "runtime_mismatch" and "2.7" in error.message
