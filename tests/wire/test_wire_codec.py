"""The per-connection codec: version refusals (§9 item 14) and garbage frames (§9 item 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import msgpack
import pytest
from _wire_samples import messages, same
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soma.wire import messages as m
from soma.wire import v1, v2
from soma.wire.codec import Codec, check_version
from soma.wire.errors import WireError


def v2_frame(envelope: dict[str, Any]) -> bytes:
    packed = msgpack.packb(envelope, use_bin_type=True)
    return b"SOMA" + bytes([2, 0, 0, 0]) + len(packed).to_bytes(4, "little") + packed


def v1_plan(**extra: Any) -> str:
    plan = {
        "plan_id": "p1",
        "plan": {"Execute": {"node_id": "a"}},
        "filters": [],
        "mode": "Forward",
        "metadata": {},
        **extra,
    }
    return json.dumps({"type": "AssignPlan", "plan": plan})


# --------------------------------------------------------------------------- item 14


@pytest.mark.parametrize("version", [None, 1])
def test_v1_accepts_unversioned_and_version_1_plans(version: int | None) -> None:
    extra = {} if version is None else {"protocol_version": version}
    message = Codec("v1", side="worker").decode(v1_plan(**extra))
    assert isinstance(message, m.AssignPlan) and message.plan.protocol_version == version


@pytest.mark.parametrize(("version", "older"), [(3, "worker"), (2, "client"), (0, "client")])
def test_v1_refuses_other_plan_versions_naming_both(version: int, older: str) -> None:
    with pytest.raises(WireError) as caught:
        Codec("v1", side="worker").decode(v1_plan(protocol_version=version))
    error = caught.value
    assert error.code == "protocol_mismatch" and error.plan_id == "p1"
    assert error.details == {"worker": [1, 2], "peer": version, "older": older}
    assert str(version) in error.message and "[1, 2]" in error.message


@pytest.mark.parametrize(
    ("version", "older"), [(1, "client"), (3, "worker"), (None, "client"), ("2", "client")]
)
def test_v2_refuses_hello_of_another_version(version: Any, older: str) -> None:
    envelope = {"type": "Hello", "id": "h1", "client": {"soma": "9.9"}}
    if version is not None:
        envelope["v"] = version
    codec = Codec("v2", side="worker")
    with pytest.raises(WireError) as caught:
        codec.decode(v2_frame(envelope))
    error = caught.value
    assert error.code == "protocol_mismatch" and error.request_id == "h1"
    assert error.details == {"worker": [1, 2], "peer": version, "older": older}
    reply = m.error_reply(error, worker_id="w1")
    assert reply.kind == "Protocol" and not reply.retryable and reply.details == error.details
    assert v2.decode(v2.encode_frame(reply), "client") == reply
    assert not codec.hello_seen


def test_v2_envelope_without_v_is_refused_after_hello() -> None:
    codec = Codec("v2", side="worker")
    assert isinstance(codec.decode(v2.encode_frame(m.Hello(client={"soma": "0.3.0"}, id="h"))), m.Hello)
    with pytest.raises(WireError) as caught:
        codec.decode(v2_frame({"type": "Ping", "id": "p"}))
    assert caught.value.code == "protocol_mismatch" and caught.value.details["peer"] is None
    assert isinstance(codec.decode(v2.encode_frame(m.Ping(id="p2"))), m.Ping)


def test_v2_plan_versions_other_than_2_are_refused() -> None:
    codec = Codec("v2", side="worker", require_hello=False)
    plan = m.SerializedPlan(plan_id="p", plan={"type": "Empty"}, protocol_version=3)
    with pytest.raises(WireError) as caught:
        codec.decode(v2.encode_frame(m.AssignPlan(plan=plan, id="r")))
    assert (caught.value.code, caught.value.plan_id, caught.value.request_id) == (
        "protocol_mismatch",
        "p",
        "r",
    )


def test_requests_before_hello_are_hello_required() -> None:
    codec = Codec("v2", side="worker")
    with pytest.raises(WireError) as caught:
        codec.decode(v2.encode_frame(m.Ping(id="early")))
    assert caught.value.code == "hello_required" and caught.value.request_id == "early"
    codec.decode(v2.encode_frame(m.Hello(id="h")))
    assert codec.hello_seen
    assert codec.decode(v2.encode_frame(m.Ping(id="late"))) == m.Ping(id="late")


def test_the_client_side_needs_no_hello_and_checks_versions_too() -> None:
    client = Codec("v2", side="client")
    assert client.decode(v2.encode_frame(m.Pong(re="x"))) == m.Pong(re="x")
    with pytest.raises(WireError) as caught:
        client.decode(v2_frame({"v": 3, "type": "Pong"}))
    assert caught.value.details["older"] == "client"
    with pytest.raises(WireError):
        check_version(1, side="client")


# --------------------------------------------------------------------------- item 15


def test_text_frames_on_v2_are_bad_message() -> None:
    with pytest.raises(WireError) as caught:
        Codec("v2", side="worker").decode('{"type":"Ping"}')
    assert caught.value.code == "bad_message"


@pytest.mark.parametrize("dialect", ["v1", "v2"])
def test_a_garbage_binary_frame_gets_a_typed_error_and_the_next_request_works(dialect: str) -> None:
    codec = Codec(dialect, side="worker")  # type: ignore[arg-type]
    if dialect == "v2":
        codec.decode(v2.encode_frame(m.Hello(id="h")))
    with pytest.raises(WireError) as caught:
        codec.decode(b"\x00\xffgarbage\x13")
    assert caught.value.code == "bad_message"
    reply = m.error_reply(caught.value, worker_id="w")
    assert same(
        v1.decode_json(v1.encode_json(reply))
        if dialect == "v1"
        else v2.decode(v2.encode_frame(reply), "client"),
        reply,
    )
    ping = m.Ping() if dialect == "v1" else m.Ping(id="next")
    frame = v1.encode_json(ping) if dialect == "v1" else v2.encode_frame(ping)
    assert codec.decode(frame) == ping


_V2_FRAMES = [v2.encode_frame(sample) for sample in messages(v2=True)]
_V1_FRAMES = [v1.encode(sample) for sample in messages(v2=False)]
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _mutate(frame: bytes, data: st.DataObject) -> bytes:
    raw = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        choice = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        position = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if choice == "flip" and raw:
            raw[position] = data.draw(st.integers(0, 255))
        elif choice == "cut":
            del raw[position : position + data.draw(st.integers(1, 16))]
        else:
            raw[position:position] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


@_FUZZ
@given(st.data())
def test_mutated_v2_frames_decode_or_raise_wire_error_only(data: st.DataObject) -> None:
    frame = _mutate(data.draw(st.sampled_from(_V2_FRAMES)), data)
    side = data.draw(st.sampled_from(["worker", "client"]))
    try:
        Codec("v2", side=side, require_hello=False).decode(frame)
    except WireError as exc:
        assert exc.code in m.ERROR_CODES


@_FUZZ
@given(st.data())
def test_mutated_v1_frames_decode_or_raise_wire_error_only(data: st.DataObject) -> None:
    frame = data.draw(st.sampled_from(_V1_FRAMES))
    raw = frame.encode() if isinstance(frame, str) else frame
    mutated = _mutate(raw, data)
    text_or_bytes: str | bytes = mutated.decode("utf-8", "replace") if isinstance(frame, str) else mutated
    try:
        Codec("v1", side="worker").decode(text_or_bytes)
    except WireError as exc:
        assert exc.code in m.ERROR_CODES


@_FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_raise_wire_error_only(raw: bytes) -> None:
    for codec in (Codec("v1", side="worker"), Codec("v2", side="worker", require_hello=False)):
        try:
            codec.decode(raw)
        except WireError as exc:
            assert exc.code in m.ERROR_CODES
    try:
        v2.decode_value_frame(b"SOMA\x02\x00\x00\x00" + raw, "client")
    except WireError as exc:
        assert exc.code in m.ERROR_CODES


# --------------------------------------------------------------------------- encoding side


def test_codecs_encode_in_their_dialect() -> None:
    assert Codec("v1", side="worker").encode(m.Pong()) == '{"type":"Pong"}'
    v1_chunk = Codec("v1", side="worker").encode(
        m.ChunkResult(stream_id="s", chunk_index=0, value=None, buffered=True)
    )
    assert isinstance(v1_chunk, bytes) and msgpack.unpackb(v1_chunk)["buffered"] is True
    codec = Codec("v2", side="worker")
    parts = codec.encode_parts(m.Pong(re="r"))
    assert b"".join(p for p in parts if not isinstance(p, str)) == codec.encode(m.Pong(re="r"))
    with pytest.raises(WireError) as caught:
        Codec("v1", side="worker").encode(
            m.Welcome(
                worker_id="w",
                protocols=[1, 2],
                capabilities=m.Capabilities(1, 1),
                runtime={},
                max_concurrent=1,
                inline_threshold=1,
                max_message_bytes=1,
            )
        )
    assert caught.value.code == "encoding_error"
    with pytest.raises(WireError):
        codec.encode(m.ShutdownAck())


def test_codec_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="dialect"):
        Codec("v3", side="worker")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="side"):
        Codec("v2", side="server")  # type: ignore[arg-type]


def test_the_wire_layer_imports_nothing_above_it() -> None:
    code = (
        "import sys, soma.wire.codec, soma.wire.v1, soma.wire.v2;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'torch')"
        " or m.startswith(('soma.worker', 'soma.client', 'soma.graph', 'soma.runtime'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("dialect", ["v1", "v2"])
def test_messages_travelling_the_wrong_way_are_bad_message(dialect: str) -> None:
    worker = Codec(dialect, side="worker", require_hello=False)  # type: ignore[arg-type]
    client = Codec(dialect, side="client")  # type: ignore[arg-type]
    pong = m.Pong(re="r") if dialect == "v2" else m.Pong()
    ping = m.Ping(id="r") if dialect == "v2" else m.Ping()
    with pytest.raises(WireError, match="Pong is a worker message, not a request") as caught:
        worker.decode(client.encode(pong))
    assert caught.value.code == "bad_message"
    with pytest.raises(WireError, match="Ping is a request, not a reply"):
        client.decode(worker.encode(ping))
    assert worker.decode(client.encode(ping)) == ping and client.decode(worker.encode(pong)) == pong
