"""Wire v2 frames: layout, hand-built bytes, extension types, decoding sides, size and speed."""

from __future__ import annotations

import logging
import math
import struct
import time
from typing import Any

import msgpack
import numpy as np
import pytest

from soma.isolation.markers import Opaque, TorchData
from soma.wire import messages as m
from soma.wire import v2
from soma.wire.errors import WireError


def hand_frame(
    envelope: dict[str, Any],
    buffers: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
    *,
    magic: bytes = b"SOMA",
    version: int = 2,
    flags: int = 0,
    length: int | None = None,
) -> bytes:
    """A frame built byte by byte from the §5.4 layout, buffers placed at the given offsets."""
    if buffers:
        envelope = {**envelope, "buffers": [[offset, len(data)] for offset, data in buffers]}
    packed = msgpack.packb(envelope, use_bin_type=True)
    frame = bytearray(
        magic + struct.pack("<BBHI", version, flags, 0, len(packed) if length is None else length) + packed
    )
    for offset, data in buffers:
        assert offset >= len(frame), "test layout: buffer would overlap the envelope"
        frame += bytes(offset - len(frame)) + data
    return bytes(frame)


def ext(code: int, payload: Any) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(payload, use_bin_type=True))


# --------------------------------------------------------------------------- layout


def test_encoded_frame_layout_matches_the_spec() -> None:
    a = np.arange(6, dtype="<f8").reshape(2, 3)
    b = np.arange(5, dtype="|u1")
    frame = v2.encode_frame(m.ChunkData(stream_id="s", chunk_index=2, value=[a, b], id="r9"))
    magic, version, flags, reserved, length = struct.unpack_from("<4sBBHI", frame)
    assert (magic, version, flags, reserved) == (b"SOMA", 2, 0, 0)
    envelope = msgpack.unpackb(frame[12 : 12 + length], raw=False)
    assert list(envelope)[:3] == ["v", "type", "id"]
    assert (envelope["v"], envelope["type"], envelope["id"]) == (2, "ChunkData", "r9")
    assert envelope["stream_id"] == "s" and envelope["chunk_index"] == 2
    first, second = envelope["value"]
    assert msgpack.unpackb(first.data) == [0, "<f8", [2, 3]] and first.code == 1
    assert msgpack.unpackb(second.data) == [1, "|u1", [5]] and second.code == 1
    (off_a, len_a), (off_b, len_b) = envelope["buffers"]
    assert off_a % 64 == 0 and off_b % 64 == 0 and off_a >= 12 + length and off_b >= off_a + len_a
    assert frame[off_a : off_a + len_a] == a.tobytes() and frame[off_b : off_b + len_b] == b.tobytes()
    assert set(frame[12 + length : off_a]) <= {0} and set(frame[off_a + len_a : off_b]) <= {0}
    assert len(frame) == off_b + len_b


def test_frames_without_buffers_have_no_buffer_list() -> None:
    frame = v2.encode_frame(m.Ping(id="1"))
    (length,) = struct.unpack_from("<I", frame, 8)
    assert len(frame) == 12 + length
    assert msgpack.unpackb(frame[12:]) == {"v": 2, "type": "Ping", "id": "1"}


def test_parts_join_to_the_frame_and_do_not_copy_arrays() -> None:
    array = np.arange(1000.0)
    message = m.ChunkData(stream_id="s", chunk_index=0, value=array)
    parts = v2.encode_frame_parts(message)
    assert b"".join(parts) == v2.encode_frame(message)
    assert any(
        isinstance(p, memoryview) and np.shares_memory(np.frombuffer(p, np.uint8), array) for p in parts
    )


# --------------------------------------------------------------------------- hand-built frames


def test_hand_built_frame_decodes_on_both_sides() -> None:
    data = np.array([[1.5, -0.0], [np.nan, np.inf]], dtype="<f8")
    envelope = {
        "v": 2,
        "type": "ChunkData",
        "id": "r1",
        "stream_id": "s",
        "chunk_index": 0,
        "value": {
            "array": ext(1, [0, "<f8", [2, 2]]),
            "pair": ext(3, [1, "a"]),
            "scalar": ext(6, ["<i2", struct.pack("<h", -7)]),
            "ref": ext(5, {"type": "Cached", "cache_key": "cd" * 32, "size": 32}),
        },
    }
    frame = hand_frame(envelope, [(256, data.tobytes())])
    for side in ("worker", "client"):
        message = v2.decode(frame, side)
        assert message.id == "r1"
        value = message.value
        assert value["array"].tobytes() == data.tobytes() and value["array"].shape == (2, 2)
        assert value["pair"] == (1, "a")
        assert type(value["scalar"]) is np.int16 and value["scalar"] == -7
        assert value["ref"] == m.CachedRef(cache_key="cd" * 32, size=32)
        assert value["array"].flags.writeable is (side == "client")


@pytest.mark.parametrize(
    ("frame", "code", "fragment"),
    [
        (b"SOM", "bad_message", "truncated"),
        (b"SOMB" + bytes(8), "bad_message", "magic"),
        (hand_frame({"v": 2, "type": "Ping"}, magic=b"JSON"), "bad_message", "magic"),
        (hand_frame({"v": 2, "type": "Ping"}, version=3), "protocol_mismatch", "3"),
        (hand_frame({"v": 2, "type": "Ping"}, flags=1), "bad_message", "flags"),
        (hand_frame({"v": 2, "type": "Ping"}, length=1000), "bad_message", "truncated"),
        (hand_frame({"v": 2, "type": "Ping"})[:-2], "bad_message", "truncated"),
        (b"SOMA\x02\x00\x00\x00\x01\x00\x00\x00\x05", "bad_message", "envelope"),
        (
            hand_frame(
                {
                    "v": 2,
                    "type": "ChunkData",
                    "stream_id": "s",
                    "chunk_index": 0,
                    "value": ext(1, [0, "<f8", [1]]),
                },
                [(100, bytes(8))],
            ),
            "bad_message",
            "aligned",
        ),
        (
            hand_frame(
                {
                    "v": 2,
                    "type": "ChunkData",
                    "stream_id": "s",
                    "chunk_index": 0,
                    "value": ext(1, [0, "<f8", [1]]),
                },
                [(128, bytes(8))],
            )[:-1],
            "bad_message",
            "aligned",
        ),
        (
            hand_frame(
                {
                    "v": 2,
                    "type": "ChunkData",
                    "stream_id": "s",
                    "chunk_index": 0,
                    "value": ext(1, [1, "<f8", [1]]),
                },
                [(128, bytes(8))],
            ),
            "bad_message",
            "index",
        ),
        (
            hand_frame(
                {
                    "v": 2,
                    "type": "ChunkData",
                    "stream_id": "s",
                    "chunk_index": 0,
                    "value": ext(1, [0, "<f8", [2]]),
                },
                [(128, bytes(8))],
            ),
            "bad_message",
            "needs 16 bytes",
        ),
        (
            hand_frame(
                {
                    "v": 2,
                    "type": "ChunkData",
                    "stream_id": "s",
                    "chunk_index": 0,
                    "value": ext(1, [0, "|O", [1]]),
                },
                [(128, bytes(8))],
            ),
            "bad_message",
            "raw bytes",
        ),
        (
            hand_frame(
                {
                    "v": 2,
                    "type": "ChunkData",
                    "stream_id": "s",
                    "chunk_index": 0,
                    "value": ext(1, [0, "nonsense", [1]]),
                },
                [(128, bytes(8))],
            ),
            "bad_message",
            "dtype",
        ),
        (
            hand_frame(
                {
                    "v": 2,
                    "type": "ChunkData",
                    "stream_id": "s",
                    "chunk_index": 0,
                    "value": ext(2, [0, "float128", [1]]),
                },
                [(128, bytes(16))],
            ),
            "bad_message",
            "torch dtype",
        ),
        (
            hand_frame(
                {"v": 2, "type": "ChunkData", "stream_id": "s", "chunk_index": 0, "value": ext(9, [])}
            ),
            "bad_message",
            "extension type 9",
        ),
        (
            hand_frame(
                {
                    "v": 2,
                    "type": "ChunkData",
                    "stream_id": "s",
                    "chunk_index": 0,
                    "value": ext(6, ["<f8", b"123"]),
                }
            ),
            "bad_message",
            "8 bytes",
        ),
        (hand_frame({"v": 2, "type": "Teleport"}), "bad_message", "unknown message type"),
        (hand_frame({"v": 2, "type": "Registered", "worker_id": "w"}), "bad_message", "unknown message type"),
        (hand_frame({"v": 2, "type": "CancelPlan", "plan_id": 3}), "bad_message", "plan_id"),
        (hand_frame({"v": 2, "type": "Ping", "id": "x" * 65}), "bad_message", "id"),
        (hand_frame({"v": 2, "type": "Ping", "buffers": "none"}), "bad_message", "buffers"),
    ],
)
def test_broken_frames_are_refused_with_a_code(frame: bytes, code: str, fragment: str) -> None:
    for side in ("worker", "client"):
        with pytest.raises(WireError) as caught:
            v2.decode(frame, side)
        assert caught.value.code == code
        assert fragment in caught.value.message


def test_refusals_keep_the_request_id_for_the_error_reply() -> None:
    frame = hand_frame({"v": 2, "type": "CancelPlan", "id": "r42", "plan_id": 3})
    with pytest.raises(WireError) as caught:
        v2.decode(frame, "worker")
    reply = m.error_reply(caught.value, worker_id="w")
    assert reply.re == "r42" and reply.code == "bad_message"


def test_invalid_plan_ids_and_trees_are_bad_plan() -> None:
    good = m.SerializedPlan(plan_id="p", plan={"type": "Empty"})
    envelope = {
        "v": 2,
        "type": "AssignPlan",
        "id": "r1",
        "plan": {"plan_id": "has space", "plan": {"type": "Empty"}},
    }
    with pytest.raises(WireError) as caught:
        v2.decode(hand_frame(envelope), "worker")
    assert (caught.value.code, caught.value.request_id, caught.value.plan_id) == (
        "bad_plan",
        "r1",
        "has space",
    )
    envelope["plan"] = {"plan_id": "p", "plan": {"type": "Sequence", "steps": [{"type": "Jump"}]}}
    with pytest.raises(WireError, match=r"plan\.plan\.steps\[0\]") as caught:
        v2.decode(hand_frame(envelope), "worker")
    assert caught.value.code == "bad_plan"
    assert v2.decode(v2.encode_frame(m.AssignPlan(plan=good)), "worker") == m.AssignPlan(plan=good)


def test_unknown_envelope_keys_are_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    frame = hand_frame({"v": 2, "type": "CancelPlan", "id": "r", "plan_id": "p", "priority": [1, {"x": 2}]})
    with caplog.at_level(logging.DEBUG, logger="soma.wire"):
        assert v2.decode(frame, "client") == m.CancelPlan(plan_id="p", id="r")
    assert any("priority" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------- values and sides


class Holder:
    """A user object carrying an array (pickled with an out-of-band buffer)."""

    def __init__(self, array: np.ndarray[Any, Any]) -> None:
        self.array = array

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Holder) and np.array_equal(self.array, other.array)


def test_worker_never_unpickles_and_passes_opaque_objects_on() -> None:
    holder = Holder(np.arange(50.0))
    frame = v2.encode_frame(m.ChunkData(stream_id="s", chunk_index=0, value={"obj": holder, "big": 2**100}))
    on_worker = v2.decode(frame, "worker").value
    assert isinstance(on_worker["obj"], Opaque) and len(on_worker["obj"].buffers) == 1
    assert isinstance(on_worker["big"], Opaque)
    back = v2.decode(
        v2.encode_frame(m.ChunkResult(stream_id="s", chunk_index=0, value=on_worker)), "client"
    ).value
    assert back["obj"] == holder and back["big"] == 2**100
    assert back["obj"].array.flags.writeable


def test_client_arrays_are_writable_with_one_copy_at_most() -> None:
    array = np.arange(12.0).reshape(3, 4)
    frame = v2.encode_value_frame(array)
    from_bytes = v2.decode_value_frame(frame, "client")
    assert from_bytes.flags.writeable and not np.shares_memory(from_bytes, np.frombuffer(frame, np.uint8))
    writable = bytearray(frame)
    in_place = v2.decode_value_frame(writable, "client")
    assert in_place.flags.writeable and np.shares_memory(in_place, np.frombuffer(writable, np.uint8))
    on_worker = v2.decode_value_frame(writable, "worker")
    assert not on_worker.flags.writeable and np.shares_memory(on_worker, np.frombuffer(writable, np.uint8))
    np.testing.assert_array_equal(from_bytes, array)


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12.0).reshape(3, 4)[:, ::2],
        np.asfortranarray(np.arange(6).reshape(2, 3)),
        np.arange(6, dtype=">i4"),
        np.array(7.5),
        np.zeros((0, 3)),
        np.array(["ab", "c"]),
        np.array([1 + 2j]),
        np.array(["2026-01-01"], dtype="M8[D]"),
        np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        np.array([{"x": 1}, None], dtype=object),
    ],
)
def test_arrays_keep_dtype_shape_and_content(value: np.ndarray[Any, Any]) -> None:
    back = v2.decode_value_frame(v2.encode_value_frame(value), "client")
    assert type(back) is np.ndarray and back.dtype == value.dtype and back.shape == value.shape
    assert back.tolist() == value.tolist()


def test_exact_types_are_kept() -> None:
    value = {
        3: "int key",
        (1, "t"): "tuple key",
        "floats": [1.0, -0.0, math.nan, math.inf, -math.inf],
        "f64": np.float64(2.5),
        "f32": np.float32(1.25),
        "b": np.bool_(True),
        "tuple": (1, (2, [3])),
        "set": {1, 2},
        "bytes": b"\x00",
        "huge": -(2**64),
        "u64": 2**64 - 1,
        "complex": 1 - 2j,
    }
    back = v2.decode_value_frame(v2.encode_value_frame(value), "client")
    assert list(back) == list(value)
    for key in value:
        assert type(back[key]) is type(value[key]), key
    assert struct.pack("<d", back["floats"][1]) == struct.pack("<d", -0.0)
    assert math.isnan(back["floats"][2]) and back["floats"][3:] == [math.inf, -math.inf]
    assert back["tuple"] == (1, (2, [3])) and back["set"] == {1, 2} and back["huge"] == -(2**64)


def test_references_travel_as_extension_5() -> None:
    ref = m.LocalRef(path="/store/x.soma")
    plan = m.SerializedPlan(
        plan_id="p",
        plan={"type": "Execute", "node_id": "a"},
        input=ref,
        external={"b": m.CachedRef(cache_key="0" * 64)},
    )
    back = v2.decode(v2.encode_frame(m.AssignPlan(plan=plan)), "worker")
    assert back.plan.input == ref and back.plan.external == {"b": m.CachedRef(cache_key="0" * 64)}


def test_unpicklable_values_are_encoding_errors_and_bad_pickles_unpickle_errors() -> None:
    with pytest.raises(WireError) as caught:
        v2.encode_value_frame(lambda_holder())
    assert caught.value.code == "encoding_error"
    frame = v2.encode_value_frame(Opaque(data=b"\x80\x05not a pickle"))
    assert v2.decode_value_frame(frame, "worker") == Opaque(data=b"\x80\x05not a pickle")
    with pytest.raises(WireError) as caught:
        v2.decode_value_frame(frame, "client")
    assert caught.value.code == "unpickle_error"


def lambda_holder() -> Any:
    import threading

    return {"lock": threading.Lock()}


def test_value_frames_and_encoded_size() -> None:
    array = np.zeros(1000, dtype=np.uint8)
    frame = v2.encode_value_frame(array)
    assert v2.read_head(frame).type == "Value"
    size = v2.encoded_size(array)
    assert 1000 < size < 1000 + 32
    assert v2.encoded_size([1.0, 2.0]) == len(msgpack.packb([1.0, 2.0]))
    with pytest.raises(WireError, match="value frame"):
        v2.decode_value_frame(v2.encode_frame(m.Ping()), "client")
    with pytest.raises(WireError) as caught:
        v2.decode_value_frame(hand_frame({"v": 3, "type": "Value", "value": 1}), "client")
    assert caught.value.code == "protocol_mismatch"


def test_inline_threshold_boundary_is_measurable() -> None:
    threshold = m.INLINE_THRESHOLD_BYTES
    overhead = v2.encoded_size(np.zeros(threshold, dtype=np.uint8)) - threshold
    just_under = threshold - 1 - overhead
    assert v2.encoded_size(np.zeros(just_under, dtype=np.uint8)) == threshold - 1
    assert v2.encoded_size(np.zeros(just_under + 1, dtype=np.uint8)) == threshold


def test_nan_and_infinities_round_trip_exactly() -> None:
    values = np.array([np.nan, np.inf, -np.inf, -0.0])
    message = m.PlanResult(
        worker_id="w", plan_id="p", result=m.PlanSuccess(output={"a": values, "f": [math.nan, -math.inf]})
    )
    back = v2.decode(v2.encode_frame(message), "client").result.output
    assert back["a"].tobytes() == values.tobytes()
    assert math.isnan(back["f"][0]) and back["f"][1] == -math.inf


# --------------------------------------------------------------------------- torch


def test_torch_tensors_round_trip_on_the_client() -> None:
    torch = pytest.importorskip("torch")
    tensors = {
        "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "bf16": torch.tensor([1.5, -2.25, float("nan")], dtype=torch.bfloat16),
        "strided": torch.arange(12.0).reshape(3, 4)[:, ::2],
        "grad": torch.ones(2, requires_grad=True),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "bool": torch.tensor([True, False]),
    }
    back = v2.decode_value_frame(v2.encode_value_frame(tensors), "client")
    for name, tensor in tensors.items():
        got = back[name]
        assert type(got) is torch.Tensor and got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.nan_to_num(), tensor.detach().nan_to_num()), name
    back["f32"] += 1  # writable, like a local tensor


def test_torch_tensors_are_torch_data_on_the_worker_and_pass_through() -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.tensor([[0.5, 1.0]], dtype=torch.bfloat16)
    on_worker = v2.decode_value_frame(v2.encode_value_frame(tensor), "worker")
    assert isinstance(on_worker, TorchData) and on_worker.dtype == "bfloat16" and on_worker.shape == (1, 2)
    assert bytes(on_worker.buffer) == tensor.view(torch.uint8).numpy().tobytes()
    back = v2.decode_value_frame(v2.encode_value_frame(on_worker), "client")
    assert back.dtype == torch.bfloat16 and torch.equal(back, tensor)


# --------------------------------------------------------------------------- speed


def test_a_100_mb_array_encodes_and_decodes_without_copies_fast() -> None:
    array = np.ones(100 * 2**20 // 8)
    message = m.ChunkData(stream_id="s", chunk_index=0, value=array, id="r")
    writable = bytearray(b"".join(v2.encode_frame_parts(message)))  # the transport's job
    start = time.perf_counter()
    parts = v2.encode_frame_parts(message)
    on_worker = v2.decode(writable, "worker").value
    on_client = v2.decode(writable, "client").value
    elapsed = time.perf_counter() - start
    assert sum(memoryview(p).nbytes for p in parts) == len(writable)
    assert np.shares_memory(on_worker, np.frombuffer(writable, np.uint8))
    assert np.shares_memory(on_client, np.frombuffer(writable, np.uint8))
    assert on_client.shape == array.shape and on_client[-1] == 1.0
    assert elapsed < 0.1, f"encode+decode of 100 MB took {elapsed:.3f} s"


def test_error_texts_arrive_intact() -> None:
    text = 'quote " backslash \\ newline \n nul \x00 é 漢字 \u2028 🙂'
    error = m.make_error("user_error", text, worker_id="w", re="r", details={"why": text})
    assert v2.decode(v2.encode_frame(error), "client") == error
    failure = m.PlanFailure(error=m.ErrorInfo(code="user_error", kind="Python", message=text, traceback=text))
    reply = v2.decode(v2.encode_frame(m.PlanResult(worker_id="w", plan_id="p", result=failure)), "client")
    assert reply.result == failure
