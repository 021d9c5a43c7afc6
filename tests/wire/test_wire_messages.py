"""Message records, the §5.8 error table and the schema checks shared by both codecs."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from soma.wire import messages as m
from soma.wire import v1, v2
from soma.wire.errors import WireError

SPEC_TABLE = {
    "Protocol": (
        False,
        "protocol_mismatch hello_required bad_message bad_plan unsupported_plan "
        "unknown_plan unknown_session unknown_stream unknown_node",
    ),
    "Auth": (False, "unauthorized forbidden_path"),
    "Concurrency": (True, "busy shutting_down"),
    "Encoding": (False, "unresolved_reference unsupported_reference encoding_error"),
    "Env": (False, "env_failed env_timeout runtime_mismatch insufficient_resources"),
    "Python": (
        False,
        "user_error unpickle_error state_mismatch no_parameters no_gradient gradient_mismatch "
        "no_optimizer row_mismatch missing_dependency",
    ),
    "Resource": (False, "timeout cancelled memory_limit"),
}


def test_error_table_matches_the_spec() -> None:
    expected: dict[str, tuple[str, bool]] = {}
    for kind, (retryable, codes) in SPEC_TABLE.items():
        expected.update({code: (kind, retryable) for code in codes.split()})
    expected.update(
        child_start_failed=("Python", True),
        child_crashed=("Python", True),
        child_protocol_error=("Python", True),
        internal=("Transport", False),
        worker_lost=("Transport", True),
    )
    assert m.ERROR_CODES == expected
    assert m.RETRY_ONCE == {"child_start_failed", "child_crashed", "child_protocol_error"}


def test_make_error_fills_kind_and_retryable() -> None:
    error = m.make_error("busy", "all slots busy", worker_id="w1", plan_id="p", re="r1")
    assert (error.kind, error.retryable, error.worker_id, error.plan_id, error.re) == (
        "Concurrency",
        True,
        "w1",
        "p",
        "r1",
    )
    assert m.make_error("cancelled", "stop").retryable is False
    with pytest.raises(ValueError, match="unknown wire error code 'oops'"):
        m.make_error("oops", "x")


def test_error_reply_carries_the_wire_error() -> None:
    exc = WireError("bad_plan", "plan.steps[0]: bad", details={"at": "steps[0]"}, request_id="r", plan_id="p")
    reply = m.error_reply(exc, worker_id="w")
    assert reply == m.Error(
        worker_id="w", code="bad_plan", kind="Protocol", message="plan.steps[0]: bad", retryable=False,
        plan_id="p", details={"at": "steps[0]"}, re="r",
    )  # fmt: skip
    assert repr(exc) == "WireError('bad_plan', 'plan.steps[0]: bad')"


def test_messages_are_frozen_and_tagged() -> None:
    ping = m.Ping(id="1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ping.id = "2"  # type: ignore[misc]
    for name, cls in m.MESSAGE_TYPES.items():
        assert cls.type == name
        assert issubclass(cls, m.Request) == (name in m.CLIENT_MESSAGES)
        assert issubclass(cls, m.Reply) == (name in m.WORKER_MESSAGES)
    assert m.INLINE_THRESHOLD_BYTES == 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("plan", "where"),
    [
        ("Empty", "plan"),
        ({"type": "Execute"}, "plan.node_id"),
        ({"type": "Cached", "node_id": "a", "key": "AB" * 32}, "plan.key"),
        ({"type": "Composite", "node_ids": ["a", 1]}, "plan.node_ids"),
        ({"type": "Sequence", "steps": [{"type": "Execute", "node_id": "a"}, {}]}, "plan.steps[1].type"),
        ({"type": "Parallel", "branches": None}, "plan.branches"),
        ({"type": "Remote", "node_id": "r", "target": "tag:x", "plan": None}, "plan.plan"),
        (
            {"type": "Loop", "node_id": "l", "body": {"type": "Empty"}, "max_iterations": -1},
            "plan.max_iterations",
        ),
        ({"type": "Branch", "node_id": "b", "arms": [["x"]]}, "plan.arms[0]"),
        ({"type": "Warp"}, "plan.type"),
    ],
)
def test_malformed_plan_dicts_are_bad_plan_naming_the_place(plan: Any, where: str) -> None:
    with pytest.raises(WireError) as caught:
        m.validate_plan(plan)
    assert caught.value.code == "bad_plan" and caught.value.message.startswith(where)


def test_validate_plan_returns_a_normalised_copy() -> None:
    plan = {
        "type": "Branch",
        "node_id": "b",
        "arms": [("x", {"type": "Empty", "extra": 1})],
        "note": "dropped",
    }
    assert m.validate_plan(plan) == {"type": "Branch", "node_id": "b", "arms": [["x", {"type": "Empty"}]]}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"node_ids": ["a"]}, "plan_id: missing in GetState"),
        ({"plan_id": "s", "node_ids": [1]}, "node_ids[0]: expected str, got int"),
        ({"plan_id": None, "node_ids": []}, "plan_id: expected str, got null"),
        ({"plan_id": "s", "node_ids": {"a": 1}}, "node_ids: expected a list, got dict"),
    ],
)
def test_schema_checks_name_the_field(body: dict[str, Any], fragment: str) -> None:
    with pytest.raises(WireError) as caught:
        v1.load_record(m.GetState, body)
    assert caught.value.code == "bad_message" and fragment in caught.value.message


def test_numbers_are_checked_by_kind() -> None:
    shutdown = v1.decode_json('{"type":"Shutdown","drain_s":3}')
    assert shutdown.drain_s == 3.0 and type(shutdown.drain_s) is float
    with pytest.raises(WireError, match="chunk_index"):
        v1.decode_json('{"type":"ChunkData","stream_id":"s","chunk_index":true,"value":null}')
    plan = {
        "plan_id": "p",
        "plan": {"type": "Empty"},
        "filters": [{"node_id": "a", "pickled_filter": b"", "stream_mode": "sideways"}],
    }
    packed = msgpack.packb({"v": 2, "type": "AssignPlan", "plan": plan}, use_bin_type=True)
    with pytest.raises(WireError, match=r"plan\.filters\[0\]\.stream_mode: expected one of"):
        v2.decode(b"SOMA\x02\x00\x00\x00" + len(packed).to_bytes(4, "little") + packed, "worker")
    assert v1.decode_json('{"type":"ApplyGradients","plan_id":"s","gradients":{},"lr":{"a":1}}').lr == {
        "a": 1.0
    }
