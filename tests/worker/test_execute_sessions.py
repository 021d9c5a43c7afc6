"""Sessions (worker spec §6.8): a pinned child reached by later plans and state messages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import _execute_filters as F
import psutil
from _execute_support import RecordingConnection, chain, failure, filt, fit_mode, plan, rig, success

from soma.wire.messages import Ack, Error, GetGradients, GetState, SetState, StateResult


def _pid_alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


async def test_a_kept_session_serves_state_messages_and_later_plans(tmp_path: Path) -> None:
    conn = RecordingConnection()
    adder = filt("a", F.StatefulAdd(), trainable=True)
    pid_filter = filt("p", F.Pid())
    async with rig(tmp_path, max_concurrent=1) as r:
        opening = plan(chain("a"), [adder], input=5, mode=fit_mode(), session={"keep": True})
        opened = success(await r.run(opening, conn))
        session_id = opening.plan.plan_id
        assert opened.output == 6 and r.executor.status()["sessions"] == 1
        assert r.executor.status()["free_slots"] == 0  # the session holds the plan's slot

        state = await r.executor.get_state(GetState(plan_id=session_id, node_ids=["a"]), conn)
        assert isinstance(state, StateResult) and state.states == {"a": {"add": 1}}

        in_session = plan(chain("a"), [adder], input=5, session_id=session_id)
        assert success(await r.run(in_session, conn)).output == 6
        set_state = SetState(plan_id=session_id, states={"a": {"add": 10}})
        assert isinstance(await r.executor.set_state(set_state, conn), Ack)
        assert success(await r.run(plan(chain("a"), [adder], input=5, session_id=session_id), conn)).output == 15

        other_filters = plan(chain("p"), [pid_filter], input=None, session_id=session_id)
        pid = success(await r.run(other_filters, conn)).output  # another filter set: LOAD again, same child

        stranger = RecordingConnection()
        refused = await r.executor.get_state(GetState(plan_id=session_id, node_ids=["a"]), stranger)
        assert isinstance(refused, Error) and refused.code == "unknown_session"
        reply = await r.run(plan(chain("a"), [adder], input=5, session_id=session_id), stranger)
        assert isinstance(reply, Error) and reply.code == "unknown_session"

        await r.executor.connection_closed(conn)
        assert r.executor.status()["sessions"] == 0 and r.executor.status()["free_slots"] == 1
        assert not _pid_alive(pid)
        gone = await r.executor.get_state(GetState(plan_id=session_id, node_ids=["a"]), conn)
        assert isinstance(gone, Error) and gone.code == "unknown_session"


async def test_state_calls_on_two_sessions_at_once_both_complete(tmp_path: Path) -> None:
    conn = RecordingConnection()
    async with rig(tmp_path, max_concurrent=2) as r:
        ids = []
        for n in range(2):
            adder = filt("a", F.StatefulAdd(), trainable=True)
            msg = plan(chain("a"), [adder], input=n, mode=fit_mode(), session={"keep": True})
            success(await r.run(msg, conn))
            ids.append(msg.plan.plan_id)
        replies = await asyncio.wait_for(
            asyncio.gather(*(r.executor.get_state(GetState(plan_id=i, node_ids=["a"]), conn) for i in ids)), 10
        )
        assert all(isinstance(reply, StateResult) and reply.states == {"a": {"add": 1}} for reply in replies)


async def test_cancel_or_idle_time_ends_a_session(tmp_path: Path) -> None:
    conn = RecordingConnection()
    async with rig(tmp_path) as r:
        adder = filt("a", F.StatefulAdd(), trainable=True)
        cancelled = plan(chain("a"), [adder], input=1, mode=fit_mode(), session={"keep": True})
        success(await r.run(cancelled, conn))
        assert await r.executor.cancel(cancelled.plan.plan_id, conn)
        reply = await r.executor.get_state(GetState(plan_id=cancelled.plan.plan_id, node_ids=["a"]), conn)
        assert isinstance(reply, Error) and reply.code == "unknown_session"

        idle = plan(
            chain("a"), [filt("a", F.StatefulAdd(), trainable=True)], input=1, mode=fit_mode(),
            session={"keep": True, "idle_s": 0.5},
        )  # fmt: skip
        success(await r.run(idle, conn))
        assert r.executor.status()["sessions"] == 1
        await asyncio.sleep(1.2)
        assert r.executor.status()["sessions"] == 0
        assert r.executor.status()["free_slots"] == r.config.max_concurrent


async def test_session_message_errors_are_typed(tmp_path: Path) -> None:
    conn = RecordingConnection()
    async with rig(tmp_path) as r:
        msg = plan(
            chain("a", "b"),
            [filt("a", F.StatefulAdd(), trainable=True), filt("b", F.Echo())],
            input=1,
            mode=fit_mode(),
            session={"keep": True},
        )
        success(await r.run(msg, conn))
        sid = msg.plan.plan_id
        unknown = await r.executor.set_state(SetState(plan_id=sid, states={"a": {"add": 2}, "zz": 1}), conn)
        assert isinstance(unknown, Error) and unknown.code == "unknown_node"
        assert unknown.details == {"node_id": "zz", "set": ["a"]} and "already set: `a`" in unknown.message
        grads = await r.executor.get_gradients(GetGradients(plan_id=sid, node_ids=["a"]), conn)
        assert isinstance(grads, Error) and grads.code == "no_parameters" and grads.details == {"node_id": "a"}
        # A failing plan in the session leaves the session usable.
        failing = plan(chain("f"), [filt("f", F.Failing())], input=1, session_id=sid)
        assert failure(await r.run(failing, conn)).error.code == "user_error"
        assert r.executor.status()["sessions"] == 1


async def test_a_failed_plan_opens_no_session(tmp_path: Path) -> None:
    conn = RecordingConnection()
    async with rig(tmp_path) as r:
        msg = plan(chain("f"), [filt("f", F.Failing())], input=1, session={"keep": True})
        failure(await r.run(msg, conn))
        assert r.executor.status()["sessions"] == 0
        assert r.executor.status()["free_slots"] == r.config.max_concurrent
