"""The worker cache under client keys (worker spec §6.5): exact keys, opaque blobs, shared disk, failures."""

from __future__ import annotations

import asyncio
import logging
import pickle
import sys
import uuid
from pathlib import Path

import _execute_filters as F
import pytest
from _execute_support import RecordingConnection, chain, failure, filt, fit_mode, plan, rig, success

from soma.isolation.pool import Pool, PoolStats
from soma.runtime.cache import Cache, DiskTier
from soma.wire import v2
from soma.wire.messages import AssignPlan, CachedRef, PlanResult, PlanSuccess, Reply
from soma.worker.metrics import WorkerMetrics

K1, K2, K3, K4 = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)


def _client_view(reply: Reply) -> PlanSuccess:
    """The reply as a client decodes it (opaque blobs become objects again)."""
    decoded = v2.decode(v2.encode_frame(reply), "client")
    assert isinstance(decoded, PlanResult) and isinstance(decoded.result, PlanSuccess), decoded
    return decoded.result


def _hits(conn: RecordingConnection) -> list[tuple[str, str, str]]:
    return [(e["node_id"], e["what"], e["key"]) for e in conn.events("NodeCacheHit")]


def _completed_hit(conn: RecordingConnection) -> list[bool]:
    return [e["cache_hit"] for e in conn.events("NodeCompleted")]


def _scaler_fit() -> AssignPlan:
    """Fit of one Scaler on [1.0, 3.0], its state cached under K1 and its output under K2."""
    return plan(
        chain("s"), [filt("s", F.Scaler(), trainable=True, fit_key=K1, out_key=K2)], input=[1.0, 3.0], mode=fit_mode()
    )


async def test_output_keys_are_used_exactly_as_sent(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        first = RecordingConnection()
        out = _client_view(await r.run(plan(chain("n"), [filt("n", F.Doubler(), out_key=K1)], input=[1, 2]), first))
        assert out.output == [2, 4] and _hits(first) == [] and _completed_hit(first) == [False]
        other_node = RecordingConnection()
        reply = await r.run(plan(chain("m"), [filt("m", F.AddOne(), out_key=K1)], input=[1, 2]), other_node)
        assert _client_view(reply).output == [2, 4]  # another node id, the same key: a hit, AddOne never ran
        assert _hits(other_node) == [("m", "output", K1)] and _completed_hit(other_node) == [True]
        other_key = RecordingConnection()
        out = _client_view(await r.run(plan(chain("n"), [filt("n", F.AddOne(), out_key=K2)], input=[1, 2]), other_key))
        assert out.output == [2, 3] and _hits(other_key) == []


async def test_fit_states_and_outputs_hit_and_no_user_method_runs(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        msg = _scaler_fit()
        first = success(await r.run(msg))
        assert first.states == {"s": {"mean": 2.0}}
        conn = RecordingConnection()
        again = plan(
            chain("s"),
            [filt("s", F.FailingTrainable(), trainable=True, fit_key=K1, out_key=K2)],
            input=[1.0, 3.0],
            mode=fit_mode(),
        )
        view = _client_view(await r.run(again, conn))
        assert view.states == {"s": {"mean": 2.0}} and view.output == [-1.0, 1.0]
        assert _hits(conn) == [("s", "state", K1), ("s", "output", K2)] and _completed_hit(conn) == [True]


async def test_a_state_hit_feeds_the_forward_that_follows(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        scaler = filt("s", F.Scaler(), trainable=True, fit_key=K3)
        await r.run(plan(chain("s"), [scaler], input=[2.0, 4.0], mode=fit_mode()))
        conn = RecordingConnection()
        msg = plan(chain("s"), [filt("s", F.Scaler(), trainable=True, fit_key=K3)], input=[5.0], mode=fit_mode())
        result = success(await r.run(msg, conn))
        assert result.output == [2.0] and _hits(conn) == [("s", "state", K3)]
        assert _completed_hit(conn) == [False]  # forward still ran


async def test_a_cached_step_runs_like_execute_on_a_miss_then_hits(tmp_path: Path) -> None:
    step = {"type": "Cached", "node_id": "n", "key": K4}
    async with rig(tmp_path) as r:
        assert _client_view(await r.run(plan(step, [filt("n", F.Doubler())], input=[3]))).output == [6]
        conn = RecordingConnection()
        assert _client_view(await r.run(plan(step, [filt("n", F.Failing())], input=[3]), conn)).output == [6]
        assert _hits(conn) == [("n", "output", K4)]


async def test_uncacheable_nodes_null_keys_and_v1_plans_are_never_cached(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        for _ in range(2):
            conn = RecordingConnection()
            await r.run(plan(chain("n"), [filt("n", F.Doubler(), out_key=K1, cacheable=False)], input=[1]), conn)
            await r.run(plan(chain("k"), [filt("k", F.Doubler())], input=[1]), conn)
            assert _hits(conn) == []
        v1 = plan({"type": "Cached", "node_id": "n", "key": K2}, [filt("n", F.Doubler())], dialect="v1", input=[1])
        assert success(await r.run(v1)).output == [2]
        assert r.executor.cache.info()["entries"] == 0


async def test_a_disk_cache_shared_with_a_local_cache_is_hit_from_both_sides(tmp_path: Path) -> None:
    shared = tmp_path / "shared-cache"
    async with rig(tmp_path, cache_dir=shared) as r:
        await r.run(plan(chain("n"), [filt("n", F.Doubler(), out_key=K1)], input=[5, 6]))
        assert Cache(directory=shared).get(K1) == [10, 12]
        Cache(directory=shared).put(K2, {"made": "locally"}, kind="output", node_id="x")
        conn = RecordingConnection()
        reply = await r.run(plan(chain("x"), [filt("x", F.Failing(), out_key=K2)], input=[1]), conn)
        assert _client_view(reply).output == {"made": "locally"}
        assert [(n, w) for n, w, _ in _hits(conn)] == [("x", "output")]
        assert conn.events("NodeCacheHit")[0]["tier"] == "disk"


async def test_the_worker_never_unpickles_a_cache_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = f"ghost_{uuid.uuid4().hex}"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{module}.py").write_text(
        "class Ghost:\n    def __init__(self, n):\n        self.n = n\n"
    )
    sys.path.insert(0, str(code_dir))
    try:
        ghost = __import__(module).Ghost(7)
        blob = pickle.dumps(ghost, protocol=5)
    finally:
        sys.path.remove(str(code_dir))
        del sys.modules[module]
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(blob)  # this process (the worker) cannot even load it
    shared = tmp_path / "cache"
    DiskTier(shared).write_bytes(K3, blob, {"kind": "output", "node_id": "g"})
    monkeypatch.setenv("PYTHONPATH", str(code_dir))  # only children can import the class
    async with rig(tmp_path, cache_dir=shared) as r:
        filters = [filt("g", F.Failing(), out_key=K3), filt("t", F.Shape())]
        msg = plan(chain("g", "t"), filters, input=None, outputs=["g", "t"])
        result = success(await r.run(msg))
    assert result.output["t"] == {"type": "Ghost", "len": None}
    assert result.output["g"].data == blob and module not in sys.modules


async def test_an_unusable_cache_dir_logs_a_warning_and_plans_still_succeed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "cache-file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="soma.worker"):
        async with rig(tmp_path, cache_dir=blocked) as r:
            assert _client_view(await r.run(plan(chain("n"), [filt("n", F.Doubler(), out_key=K1)], input=[1]))).output == [2]
        assert "disk tier disabled" in caplog.text
    shared = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="soma.worker"):
        async with rig(tmp_path / "second", cache_dir=shared) as r:
            (shared / "v1" / K2[:2]).write_text("a file where the bucket should be")
            assert _client_view(await r.run(plan(chain("n"), [filt("n", F.Doubler(), out_key=K2)], input=[1]))).output == [2]
    assert "not written to disk" in caplog.text



async def test_cache_lookups_and_plan_durations_reach_the_metrics(tmp_path: Path) -> None:
    metrics = WorkerMetrics(slots_total=4)
    async with rig(tmp_path, metrics=metrics) as r:
        for _ in range(2):
            await r.run(plan(chain("n"), [filt("n", F.Doubler(), out_key=K1)], input=[1]))
    sample = metrics.registry.get_sample_value
    assert sample("soma_worker_cache_misses_total") == 1 and sample("soma_worker_cache_hits_total") == 1
    assert sample("soma_worker_plan_seconds_count") == 2


async def _settled(pool: Pool) -> PoolStats:
    """The pool's counts once no child is busy (a child goes back to the pool after the reply)."""
    for _ in range(500):
        stats = pool.stats()
        if stats.busy == 0:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"a child stayed busy: {pool.stats()}")


async def test_a_plan_the_cache_serves_whole_takes_no_child(tmp_path: Path) -> None:
    async with rig(tmp_path, pool_options={"max_tasks": 1}) as r:
        msg = _scaler_fit()
        first = success(await r.run(msg))
        before = await _settled(r.pool)
        assert before.spawned == 1 and before.kills.get("max_tasks") == 1  # each checkout retires its child
        view = _client_view(await r.run(msg))
        assert view.states == first.states and view.output == [-1.0, 1.0]
        after = await _settled(r.pool)
        assert after.spawned == 1 and after.kills.get("max_tasks") == 1


async def test_a_plan_the_cache_serves_waits_its_turn_for_a_slot_and_can_be_cancelled_there(tmp_path: Path) -> None:
    conn = RecordingConnection()
    async with rig(tmp_path, max_concurrent=1) as r:
        cached = plan(chain("n"), [filt("n", F.Doubler(), out_key=K1)], input=[1])
        assert _client_view(await r.run(cached)).output == [2]
        running = asyncio.create_task(r.run(plan(chain("s"), [filt("s", F.Sleeper(1.0))], input=[1]), conn))
        await asyncio.sleep(0.3)
        queued_msg = plan(chain("n"), [filt("n", F.Doubler(), out_key=K1)], input=[1])
        queued = asyncio.create_task(r.run(queued_msg, conn))
        await asyncio.sleep(0.1)
        assert r.executor.status()["queue_depth"] == 1 and not queued.done()
        assert await r.executor.cancel(queued_msg.plan.plan_id, conn)
        assert failure(await queued).error.code == "cancelled"
        success(await running)
        assert _client_view(await r.run(cached)).output == [2] and r.executor.status()["free_slots"] == 1


async def test_a_plan_the_cache_was_to_serve_takes_a_child_when_an_entry_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The memory tier can drop an entry between the check and the lookup: the node then runs after all.
    import soma.worker.execute

    monkeypatch.setattr(soma.worker.execute, "served_by_cache", lambda spec, cache: True)
    async with rig(tmp_path) as r:
        conn = RecordingConnection()
        msg = plan(
            chain("s", "d"),
            [filt("s", F.Scaler(), trainable=True, fit_key=K3, out_key=K4), filt("d", F.Doubler())],
            input=[1.0, 3.0],
            mode=fit_mode(),
        )
        result = success(await r.run(msg, conn))
        assert result.states == {"s": {"mean": 2.0}} and result.output == [-2.0, 2.0]
        assert [e["event_type"] for e in conn.events()] == ["NodeStarted", "NodeCompleted"] * 2
        assert r.pool.stats().spawned == 1


async def test_a_cached_output_is_answered_as_the_bytes_a_later_hit_answers(tmp_path: Path) -> None:
    # The first answer is the cache blob too, so a large output is stored once for both.
    big = list(range(3 * 2**20 // 8))
    async with rig(tmp_path, inline_threshold=2**20) as r:
        miss = success(await r.run(plan(chain("n"), [filt("n", F.Echo(), out_key=K1)], input=big)))
        hit = success(await r.run(plan(chain("n"), [filt("n", F.Failing(), out_key=K1)], input=big)))
    assert isinstance(miss.output, CachedRef) and miss.output == hit.output
