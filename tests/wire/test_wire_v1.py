"""Wire v1: the exact Soma 0.2.43 JSON, value conversion and the msgpack stream frames."""

from __future__ import annotations

import base64
import json
import logging
import math
import pickle
from typing import Any

import msgpack
import numpy as np
import pytest

from soma.isolation.markers import Opaque, TorchData
from soma.wire import messages as m
from soma.wire import v1
from soma.wire.codec import Codec
from soma.wire.errors import WireError

PICKLED = base64.b64encode(b"\x80\x05scaler-pickle").decode()


def golden_fit() -> str:
    """The §5.2 golden example, written by hand as a Soma 0.2.43 client sends it."""
    return (
        '{"type":"AssignPlan","plan":{"plan_id":"remote_plan_5f0c2a","plan":{"Sequence":['
        '{"Execute":{"node_id":"scaler"}},{"Execute":{"node_id":"d"}}]},'
        '"input":{"source":"Inline","value":{"type":"Tensor","data":{"values":[1.0,2.0,3.0],"shape":[3]}}},'
        '"filters":[{"node_id":"scaler","pickled_filter":"' + PICKLED + '","state":null,"requirements":[],'
        '"trainable":true},{"node_id":"d","pickled_filter":"ZA==","state":null,"requirements":[],"trainable":false}],'
        '"mode":{"Fit":{"y":{"type":"Tensor","data":{"values":[0.0,1.0,1.0],"shape":[3]}},"batch_size":2}},'
        '"metadata":{}}}'
    )


# --------------------------------------------------------------------------- golden frames (item 11)


def test_golden_fit_plan_decodes_to_the_api_plan_form() -> None:
    message = Codec("v1", side="worker").decode(golden_fit())
    assert isinstance(message, m.AssignPlan)
    plan = message.plan
    assert plan.plan_id == "remote_plan_5f0c2a"
    assert plan.plan == {
        "type": "Sequence",
        "steps": [{"type": "Execute", "node_id": "scaler"}, {"type": "Execute", "node_id": "d"}],
    }
    assert plan.input == [1.0, 2.0, 3.0]
    assert [f.node_id for f in plan.filters] == ["scaler", "d"]
    assert plan.filters[0].pickled_filter == b"\x80\x05scaler-pickle"
    assert plan.filters[0].trainable and not plan.filters[1].trainable
    assert plan.filters[0].state is None
    assert plan.mode == m.FitMode(y=[0.0, 1.0, 1.0], batch_size=2)
    assert plan.metadata == {}
    assert plan.edges is None and plan.protocol_version is None  # the 0.2.43 dialect


def test_golden_fit_plan_re_encodes_to_the_same_json() -> None:
    assert v1.encode_json(v1.decode_json(golden_fit())) == golden_fit()


def test_fitted_state_reply_is_exact_json() -> None:
    reply = m.PlanResult(
        worker_id="w1",
        plan_id="remote_plan_5f0c2a",
        result=m.PlanSuccess(
            output=np.array([[1.0, 2.0]]), duration_ms=12, states={"scaler": {"mean": 2.0, "scale": 0.8}}
        ),
    )
    assert v1.encode_json(reply) == (
        '{"type":"PlanResult","worker_id":"w1","plan_id":"remote_plan_5f0c2a","result":{"status":"Success",'
        '"output":{"delivery":"Inline","value":{"type":"Tensor","data":{"values":[1.0,2.0],"shape":[1,2]}}},'
        '"duration_ms":12,"states":{"scaler":{"type":"Json","data":{"mean":2.0,"scale":0.8}}}}}'
    )


def test_next_forward_carries_forward_mode_and_the_state_unchanged() -> None:
    opaque_state = {"type": "Bytes", "data": list(v1.PICKLE_MAGIC + pickle.dumps((1, 2), protocol=5))}
    text = json.dumps(
        {
            "type": "AssignPlan",
            "plan": {
                "plan_id": "remote_plan_2",
                "plan": {"Execute": {"node_id": "scaler"}},
                "input": {
                    "source": "Inline",
                    "value": {"type": "Tensor", "data": {"values": [1.0], "shape": [1]}},
                },
                "filters": [
                    {
                        "node_id": "scaler",
                        "pickled_filter": PICKLED,
                        "state": {"type": "Json", "data": {"mean": 2.0}},
                        "requirements": [],
                        "trainable": True,
                    },
                    {
                        "node_id": "o",
                        "pickled_filter": PICKLED,
                        "state": opaque_state,
                        "requirements": [],
                        "trainable": True,
                    },
                ],
                "mode": "Forward",
                "metadata": {},
            },
        },
        separators=(",", ":"),
    )
    message = v1.decode_json(text)
    assert message.plan.mode == "Forward"
    assert message.plan.filters[0].state == {"mean": 2.0}
    assert message.plan.filters[1].state == Opaque(data=pickle.dumps((1, 2), protocol=5))
    assert v1.encode_json(message) == text


def test_empty_plan_success_is_an_empty_value() -> None:
    reply = m.PlanResult(worker_id="w1", plan_id="p", result=m.PlanSuccess(output=None, duration_ms=0))
    assert v1.encode_json(reply) == (
        '{"type":"PlanResult","worker_id":"w1","plan_id":"p","result":{"status":"Success",'
        '"output":{"delivery":"Inline","value":{"type":"Empty"}},"duration_ms":0,"states":{}}}'
    )


def test_unknown_node_failure_keeps_the_0_2_43_wording_and_adds_code() -> None:
    info = m.ErrorInfo(
        code="unknown_node", kind="Protocol", message="node `zz` not found in graph", node_id="zz"
    )
    reply = m.PlanResult(worker_id="w1", plan_id="p", result=m.PlanFailure(error=info, duration_ms=1))
    assert v1.encode_json(reply) == (
        '{"type":"PlanResult","worker_id":"w1","plan_id":"p","result":{"status":"Failed",'
        '"error":"node `zz` not found in graph","duration_ms":1,"code":"unknown_node","node_id":"zz"}}'
    )


def test_a_0_2_43_failure_without_code_decodes_as_internal() -> None:
    text = '{"type":"PlanResult","worker_id":"w","plan_id":"p","result":{"status":"Failed","error":"boom","duration_ms":4}}'
    result = v1.decode_json(text).result
    assert result == m.PlanFailure(
        error=m.ErrorInfo(code="internal", kind="Transport", message="boom"), duration_ms=4
    )


def test_ping_status_registered_and_shutdown_frames() -> None:
    assert isinstance(v1.decode_json('{"type":"Ping"}'), m.Ping)
    assert v1.encode_json(m.Pong()) == '{"type":"Pong"}'
    assert isinstance(v1.decode_json('{"type":"StatusRequest"}'), m.StatusRequest)
    assert v1.decode_json('{"type":"Registered","worker_id":"w9"}') == m.Registered(worker_id="w9")
    assert v1.decode_json('{"type":"Shutdown","reason":"bye"}') == m.Shutdown(reason="bye")
    assert v1.encode_json(m.ShutdownAck()) == '{"type":"ShutdownAck"}'
    caps = m.Capabilities(
        cpu_cores=2, ram_bytes=1024, gpus=[m.GpuInfo("A100", 80)], python_envs=["py"], tags=["cpu"]
    )
    assert v1.encode_json(m.Register(worker_id="w1", capabilities=caps)) == (
        '{"type":"Register","worker_id":"w1","capabilities":{"cpu_cores":2,"ram_bytes":1024,'
        '"gpus":[{"name":"A100","memory_bytes":80}],"python_envs":["py"],"tags":["cpu"]}}'
    )


def test_malformed_message_is_a_typed_error_that_encodes() -> None:
    with pytest.raises(WireError) as caught:
        v1.decode_json('{"type":"AssignPlan","plan":{"plan_id":"p7","plan":{"Execute":{}}}}')
    assert caught.value.code == "bad_plan" and caught.value.plan_id == "p7"
    reply = json.loads(v1.encode_json(m.error_reply(caught.value, worker_id="w1")))
    assert reply["type"] == "Error" and reply["code"] == "bad_plan" and reply["kind"] == "Protocol"
    assert reply["retryable"] is False and reply["plan_id"] == "p7" and reply["worker_id"] == "w1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1, 2]",
        '{"no_type": 1}',
        '{"type": "Hello", "v": 2}',
        '{"type": "Nope"}',
        '{"type": "CancelPlan"}',
        '{"type": "CancelPlan", "plan_id": 5}',
        '{"type": "GetState", "plan_id": "s", "node_ids": "a"}',
        '{"type": "AssignPlan", "plan": {"plan_id": "p", "plan": "Empty", "mode": {"Train": {}}}}',
        '{"type": "AssignPlan", "plan": {"plan_id": "p", "plan": "Empty", "filters": [{"node_id": "a", "pickled_filter": "%%%"}]}}',
        '{"type": "AssignPlan", "plan": {"plan_id": "p", "plan": "Empty", "input": {"source": "Pipe"}}}',
        '{"type": "ChunkData", "stream_id": "s", "chunk_index": 0, "value": {"type": "Tensor", "data": {"values": [1.0], "shape": [2]}}}',
        '{"type": "ChunkData", "stream_id": "s", "chunk_index": 0, "value": {"type": "Tensor", "data": {"values": ["1"], "shape": [1]}}}',
        '{"type": "ChunkData", "stream_id": "s", "chunk_index": 0, "value": {"type": "Bytes", "data": [256]}}',
        '{"type": "ChunkData", "stream_id": "s", "chunk_index": 0, "value": {"type": "Json"}}',
        "[" * 100000,
    ],
)
def test_malformed_frames_raise_wire_errors_only(text: str) -> None:
    with pytest.raises(WireError) as caught:
        v1.decode_json(text)
    assert caught.value.code in m.ERROR_CODES


def test_unknown_keys_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="soma.wire"):
        message = v1.decode_json('{"type":"CancelPlan","plan_id":"p","future_field":[1]}')
    assert message == m.CancelPlan(plan_id="p")
    assert any("future_field" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------- values in (items 17)


def test_null_tensor_entries_read_as_nan() -> None:
    value = v1.decode_value({"type": "Tensor", "data": {"values": [1.0, None, 3.0, None], "shape": [2, 2]}})
    assert value[0][0] == 1.0 and math.isnan(value[0][1]) and value[1][0] == 3.0 and math.isnan(value[1][1])


@pytest.mark.parametrize(
    ("values", "shape", "expected"),
    [
        ([1, 2, 3], [3], [1.0, 2.0, 3.0]),
        ([1, 2, 3, 4, 5, 6], [2, 3], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
        (list(range(8)), [2, 2, 2], [[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]]),
        ([], [0, 0], []),
        ([], [2, 0], [[], []]),
        ([4.5], [], 4.5),
    ],
)
def test_tensors_become_nested_float_lists_in_their_shape(
    values: list[Any], shape: list[int], expected: Any
) -> None:
    value = v1.decode_value({"type": "Tensor", "data": {"values": values, "shape": shape}})
    assert value == expected
    assert all(type(x) is float for x in np.ravel(np.array(value, dtype=object)).tolist())


def test_other_values_decode() -> None:
    assert v1.decode_value({"type": "Json", "data": {"a": [1, "x"]}}) == {"a": [1, "x"]}
    assert v1.decode_value({"type": "Bytes", "data": [0, 255]}) == b"\x00\xff"
    assert v1.decode_value({"type": "Empty"}) is None
    payload = pickle.dumps({1, 2}, protocol=5)
    assert v1.decode_value({"type": "Bytes", "data": list(v1.PICKLE_MAGIC + payload)}) == Opaque(data=payload)


# --------------------------------------------------------------------------- values out


def test_outputs_follow_the_conversion_rules() -> None:
    assert v1.encode_value(None) == {"type": "Empty"}
    fortran = np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3))
    assert v1.encode_value(fortran) == {
        "type": "Tensor",
        "data": {"values": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "shape": [2, 3]},
    }
    assert v1.encode_value(np.array([True, False])) == {
        "type": "Tensor",
        "data": {"values": [1.0, 0.0], "shape": [2]},
    }
    assert v1.encode_value([1, 2.5]) == {"type": "Tensor", "data": {"values": [1.0, 2.5], "shape": [2]}}
    assert v1.encode_value([[1, 2], [3, 4]]) == {
        "type": "Tensor",
        "data": {"values": [1.0, 2.0, 3.0, 4.0], "shape": [2, 2]},
    }
    assert v1.encode_value([True, False]) == {"type": "Json", "data": [True, False]}
    assert v1.encode_value([[1, 2], [3]]) == {"type": "Json", "data": [[1, 2], [3]]}
    assert v1.encode_value([]) == {"type": "Json", "data": []}
    assert v1.encode_value({"a": np.arange(2), 3: np.float32(0.5), "t": (1, "x")}) == {
        "type": "Json",
        "data": {"a": [0, 1], "3": 0.5, "t": [1, "x"]},
    }
    assert v1.encode_value("text") == {"type": "Json", "data": "text"}
    assert v1.encode_value(np.int64(3)) == {"type": "Json", "data": 3}
    assert v1.encode_value(b"\x01\x02") == {"type": "Bytes", "data": [1, 2]}


def test_objects_without_json_form_go_as_pickles() -> None:
    encoded = v1.encode_value({1, 2})
    assert encoded["type"] == "Bytes"
    raw = bytes(encoded["data"])
    assert raw.startswith(v1.PICKLE_MAGIC) and pickle.loads(raw[len(v1.PICKLE_MAGIC) :]) == {1, 2}
    # a NaN inside a pickled object travels inside the pickle, so it is no error
    assert v1.encode_value({"s": {1}, "x": math.nan})["type"] == "Bytes"
    opaque = Opaque(data=b"\x80\x05K\x01.")
    assert bytes(v1.encode_value(opaque)["data"]) == v1.PICKLE_MAGIC + opaque.data


def test_opaque_with_out_of_band_buffers_cannot_travel_on_v1() -> None:
    with pytest.raises(WireError) as caught:
        v1.encode_value(Opaque(data=b"x", buffers=[b"y"]))
    assert caught.value.code == "encoding_error"


@pytest.mark.parametrize(
    ("value", "path"),
    [
        (np.array([[1.0, 2.0], [3.0, np.nan]]), "output[1][1]"),
        ([1.0, math.inf], "output[1]"),
        ({"a": [1.0, -math.inf]}, "output['a'][1]"),
        (math.nan, "output"),
        ({"w": np.array([0.0, np.nan])}, "output['w'][1]"),
    ],
)
def test_non_finite_outputs_are_encoding_errors_naming_the_place(value: Any, path: str) -> None:
    reply = m.PlanResult(worker_id="w", plan_id="p", result=m.PlanSuccess(output=value))
    with pytest.raises(WireError) as caught:
        v1.encode_json(reply)
    assert caught.value.code == "encoding_error"
    assert (
        caught.value.message == f"non-finite value at result.{path} cannot travel over wire v1; use wire v2"
    )


def test_states_are_json_only_when_exactly_json() -> None:
    assert v1.encode_state({"a": [1, 2.5, None, True, "x"]}) == {
        "type": "Json",
        "data": {"a": [1, 2.5, None, True, "x"]},
    }
    for state in [(1, 2), np.arange(3), {"w": math.nan}, {1: "int key"}, b"raw"]:
        encoded = v1.encode_state(state)
        assert encoded["type"] == "Bytes", state
        decoded = v1.decode_value(encoded)
        assert isinstance(decoded, Opaque)
        restored = pickle.loads(decoded.data)
        assert type(restored) is type(state)


def test_gradients_travel_as_json_nested_lists() -> None:
    reply = m.GradientsResult(worker_id="w", plan_id="s", gradients={"lin": {"weight": np.ones((2, 2))}})
    data = json.loads(v1.encode_json(reply))
    assert data["gradients"] == {"lin": {"type": "Json", "data": {"weight": [[1.0, 1.0], [1.0, 1.0]]}}}
    assert v1.decode_json(json.dumps(data)).gradients == {"lin": {"weight": [[1.0, 1.0], [1.0, 1.0]]}}
    bad = m.GradientsResult(worker_id="w", plan_id="s", gradients={"lin": {"weight": np.array([np.inf])}})
    with pytest.raises(WireError, match="non-finite") as caught:
        v1.encode_json(bad)
    assert caught.value.code == "encoding_error"


def test_torch_values_become_tensors() -> None:
    torch = pytest.importorskip("torch")
    assert v1.encode_value(torch.tensor([[1.5, 2.0]], dtype=torch.bfloat16)) == {
        "type": "Tensor",
        "data": {"values": [1.5, 2.0], "shape": [1, 2]},
    }
    raw = torch.tensor([0.25, -3.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    assert v1.encode_value(TorchData(buffer=raw, dtype="bfloat16", shape=(2,)))["data"]["values"] == [
        0.25,
        -3.0,
    ]


def test_encoded_size_is_the_compact_json_length() -> None:
    value = {"a": [1, 2], "é": "x"}
    assert v1.encoded_size(value) == len(
        json.dumps(v1.encode_value(value), separators=(",", ":"), ensure_ascii=False).encode()
    )


# --------------------------------------------------------------------------- plans and references


def test_every_plan_variant_converts_both_ways() -> None:
    key = "0f" * 32
    plan = {
        "type": "Sequence",
        "steps": [
            {
                "type": "Parallel",
                "branches": [
                    {"type": "Execute", "node_id": "a"},
                    {"type": "Cached", "node_id": "b", "key": key},
                ],
            },
            {"type": "Composite", "node_ids": ["c", "d"]},
            {"type": "Loop", "node_id": "l", "body": {"type": "Empty"}, "max_iterations": 3},
            {"type": "Branch", "node_id": "br", "arms": [["left", {"type": "Execute", "node_id": "x"}]]},
            {
                "type": "Remote",
                "node_id": "r",
                "target": "worker:w2",
                "plan": {"type": "Execute", "node_id": "r"},
            },
            {"type": "Remote", "node_id": "q", "target": "any", "plan": {"type": "Execute", "node_id": "q"}},
        ],
    }
    external = v1.plan_to_v1(plan)
    assert external == {
        "Sequence": [
            {"Parallel": [{"Execute": {"node_id": "a"}}, {"Cached": {"node_id": "b", "key": [15] * 32}}]},
            {"Composite": {"node_ids": ["c", "d"]}},
            {"Loop": {"node_id": "l", "body": "Empty", "max_iterations": 3}},
            {"Branch": {"node_id": "br", "arms": [["left", {"Execute": {"node_id": "x"}}]]}},
            {"Remote": {"node_id": "r", "target": {"WorkerId": "w2"}, "plan": {"Execute": {"node_id": "r"}}}},
            {"Remote": {"node_id": "q", "target": "Any", "plan": {"Execute": {"node_id": "q"}}}},
        ]
    }
    assert v1.plan_from_v1(external) == plan
    assert (
        v1.plan_from_v1({"Remote": {"node_id": "g", "target": {"Tag": "gpu"}, "plan": "Empty"}})["target"]
        == "tag:gpu"
    )


@pytest.mark.parametrize(
    "external",
    [
        {"Execute": {}},
        {"Jump": {}},
        {"Sequence": {}},
        {"Cached": {"node_id": "a", "key": [1, 2]}},
        5,
        {"Remote": {"node_id": "r", "target": {"Planet": "x"}, "plan": "Empty"}},
    ],
)
def test_malformed_plans_are_bad_plan(external: Any) -> None:
    with pytest.raises(WireError) as caught:
        v1.plan_from_v1(external)
    assert caught.value.code == "bad_plan"


def test_data_references_use_the_0_2_43_shapes() -> None:
    key = "ab" * 32
    assert v1.encode_ref(m.LocalRef(path="/s/k.json")) == {"type": "Local", "path": "/s/k.json"}
    assert v1.encode_ref(m.CachedRef(cache_key=key, size=10)) == {"type": "Cached", "cache_key": [0xAB] * 32}
    refs = [
        m.LocalRef(path="/p"),
        m.CachedRef(cache_key=key),
        m.S3Ref(bucket="b", key="k", region="eu"),
        m.StreamRef(endpoint="tcp://x", format="msgpack"),
        m.InlineRef(value={"a": 1}),
        m.ZarrRef(bucket="b", array_path="a/b", region=None),
    ]
    for ref in refs:
        assert v1.decode_ref(json.loads(json.dumps(v1.encode_ref(ref)))) == ref
    with pytest.raises(WireError):
        v1.decode_ref({"type": "Ftp", "path": "x"})


def test_references_as_input_and_output() -> None:
    plan = m.SerializedPlan(
        plan_id="p", plan={"type": "Execute", "node_id": "a"}, input=m.LocalRef(path="/s/in.json")
    )
    data = json.loads(v1.encode_json(m.AssignPlan(plan=plan)))
    assert data["plan"]["input"] == {
        "source": "Reference",
        "data_ref": {"type": "Local", "path": "/s/in.json"},
    }
    reply = m.PlanResult(
        worker_id="w", plan_id="p", result=m.PlanSuccess(output=m.LocalRef(path="/s/out.json"))
    )
    assert json.loads(v1.encode_json(reply))["result"]["output"] == {
        "delivery": "Reference",
        "data_ref": {"type": "Local", "path": "/s/out.json"},
    }


def test_records_dump_and_load_as_plain_json() -> None:
    load = m.LoadMetrics(
        cpu_usage=0.5,
        memory_usage=0.25,
        gpu_usage=[],
        active_plans=1,
        queue_depth=0,
        timestamp="2026-01-01T00:00:00Z",
    )
    data = v1.dump_record(load)
    assert data == {
        "cpu_usage": 0.5,
        "memory_usage": 0.25,
        "gpu_usage": [],
        "active_plans": 1,
        "queue_depth": 0,
        "timestamp": "2026-01-01T00:00:00Z",
    }
    assert v1.load_record(m.LoadMetrics, data) == load
    with pytest.raises(WireError, match="cpu_usage"):
        v1.load_record(m.LoadMetrics, {**data, "cpu_usage": "high"})


# --------------------------------------------------------------------------- error texts (item 16)

NASTY = "quote \" apostrophe ' backslash \\ newline \n tab \t nul \x00 é 漢字 \u2028 emoji 🙂"


def test_error_texts_arrive_intact() -> None:
    error = m.make_error("user_error", NASTY, worker_id="w", plan_id="p", details={"why": NASTY})
    text = v1.encode_json(error)
    assert json.loads(text)["message"] == NASTY
    assert v1.decode_json(text) == error
    failure = m.PlanFailure(error=m.ErrorInfo(code="user_error", kind="Python", message=NASTY), duration_ms=0)
    reply = m.PlanResult(worker_id="w", plan_id="p", result=failure)
    assert v1.decode_json(v1.encode_json(reply)).result.error.message == NASTY
    assert v1.decode_stream(v1.encode_stream(error)) == error


# --------------------------------------------------------------------------- stream sub-protocol (§6.9)


def test_positional_0_2_43_stream_frames_decode() -> None:
    tensor = ["Tensor", [[1.0, 2.0], [2]]]
    chunk = v1.decode_stream(msgpack.packb(["ChunkData", "st", 0, tensor]))
    assert chunk == m.ChunkData(stream_id="st", chunk_index=0, value=[1.0, 2.0])
    plan = ["p1", {"Execute": ["a"]}, ["Inline", ["Empty"]], [["a", PICKLED, None, [], False]], "Forward", {}]
    begin = v1.decode_stream(msgpack.packb(["StreamBegin", "st", "p1", None, plan]))
    assert isinstance(begin, m.StreamBegin)
    assert begin.plan.plan == {"type": "Execute", "node_id": "a"}
    assert begin.plan.filters[0].pickled_filter == b"\x80\x05scaler-pickle"
    assert begin.total_chunks is None and begin.plan.input is None
    assert v1.decode_stream(msgpack.packb(["StreamEnd", "st"])) == m.StreamEnd(stream_id="st")
    result = v1.decode_stream(msgpack.packb(["ChunkResult", "st", 1, ["Json", {"k": 1}], False]))
    assert result == m.ChunkResult(stream_id="st", chunk_index=1, value={"k": 1}, buffered=False)
    complete = v1.decode_stream(
        msgpack.packb(["StreamComplete", "st", ["Success", ["Inline", ["Empty"]], 5, {}], 3])
    )
    assert complete == m.StreamComplete(
        stream_id="st", result=m.PlanSuccess(output=None, duration_ms=5), chunks=3
    )


def test_named_stream_frames_are_written_as_maps() -> None:
    frame = v1.encode_stream(m.ChunkResult(stream_id="st", chunk_index=0, value=[1.0], buffered=False))
    assert msgpack.unpackb(frame) == {
        "type": "ChunkResult",
        "stream_id": "st",
        "chunk_index": 0,
        "value": {"type": "Tensor", "data": {"values": [1.0], "shape": [1]}},
        "buffered": False,
    }


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        b"\x92\xa5Nopes\x01",
        msgpack.packb({"type": "ChunkData"}),
        msgpack.packb(["ChunkData", "s", 0, None, 1, 2]),
        msgpack.packb(msgpack.ExtType(1, b"x")),
        b"\x91" * 5000,
    ],
)
def test_undecodable_binary_frames_are_bad_message(frame: bytes) -> None:
    with pytest.raises(WireError) as caught:
        v1.decode_stream(frame)
    assert caught.value.code == "bad_message"
