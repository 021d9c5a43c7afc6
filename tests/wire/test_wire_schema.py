"""The compiled record decoders and encoders against the checking walk they stand in for."""

from __future__ import annotations

import dataclasses
import gc
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from _wire_samples import messages, same

from soma.wire import messages as m
from soma.wire import schema, v1, v2
from soma.wire.errors import WireError

CODECS = [pytest.param(v2._FIELDS, id="v2"), pytest.param(v1._JSON, id="v1")]
WRONG = [None, 1, 2.5, "s", True, b"x", [], [1], ["a"], {}, {"x": 1}, {1: "x"}, [["a", "b"]]]


def samples(codec: schema.FieldCodec) -> list[m.Request | m.Reply]:
    return messages(v2=codec.dialect == "v2")


def records(record: m.Record) -> Iterator[m.Record]:
    """``record`` and every record nested in its plain fields."""
    yield record
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        values = getattr(record, f.name)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, m.Record):
                yield from records(value)


def variants(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``data`` with each key dropped, given each wrong value, and with an unknown key."""
    for key in data:
        yield {k: v for k, v in data.items() if k != key}
        for wrong in WRONG:
            yield {**data, key: wrong}
    yield {**data, "later_field": 1}


def walk(cls: type[m.Record], data: Any, codec: schema.FieldCodec) -> Any:
    return schema._checked_record(cls, data, codec, "", {})


def outcome(build: Any) -> tuple[str, Any]:
    try:
        return "ok", build()
    except WireError as exc:
        return exc.code, exc.message


@pytest.mark.parametrize("codec", CODECS)
def test_compiled_decoders_build_what_the_walk_builds(codec: schema.FieldCodec) -> None:
    for message in samples(codec):
        for record in records(message):
            data = schema.record_to_map(record, codec)
            given = {key: getattr(record, key) for key in ("id", "re") if hasattr(record, key)}  # not in maps
            fast = schema._decoder(type(record), codec.dialect)(data, codec, given)
            slow = schema._checked_record(type(record), data, codec, "", given)
            assert same(fast, slow) and fast == record, type(record).__name__
            assert list(vars(fast)) == list(vars(slow))  # every field, defaults included, in field order


@pytest.mark.parametrize("codec", CODECS)
def test_compiled_decoders_refuse_exactly_what_the_walk_refuses_or_logs(codec: schema.FieldCodec) -> None:
    checked = 0
    for message in samples(codec):
        for record in records(message):
            cls = type(record)
            for data in variants(schema.record_to_map(record, codec)):
                slow = outcome(lambda: walk(cls, data, codec))  # noqa: B023 - called at once
                try:
                    fast = schema._decoder(cls, codec.dialect)(data, codec)
                except (schema._Mismatch, WireError):
                    # Refused: broken input, or unknown keys the walk logs under their path.
                    assert slow[0] != "ok" or "later_field" in data, (cls.__name__, data)
                else:
                    assert slow[0] == "ok" and same(fast, slow[1]), (cls.__name__, data)
                assert outcome(lambda: schema.record_from_map(cls, data, codec)) == slow  # noqa: B023
                checked += 1
    assert checked > 1000


@pytest.mark.parametrize("codec", CODECS)
def test_compiled_encoders_write_what_the_walk_writes(codec: schema.FieldCodec) -> None:
    for message in samples(codec):
        for record in records(message):
            fast = schema._encoder(type(record), codec.dialect)(record, codec)
            slow = schema._checked_map(record, codec, "")
            assert same(fast, slow) and list(fast) == list(slow), type(record).__name__


def test_encoding_errors_name_the_nested_field() -> None:
    broken = m.AssignPlan(plan=m.SerializedPlan(plan_id="p", plan={"type": "Teleport"}), id="r1")
    with pytest.raises(WireError) as caught:
        v2.encode_frame(broken)
    assert caught.value.code == "bad_plan"
    assert caught.value.message == "plan.plan.type: unknown plan variant 'Teleport'"


def frame(envelope: dict[str, Any]) -> bytes:
    packed = msgpack.packb(envelope, use_bin_type=True)
    return b"SOMA\x02\x00\x00\x00" + len(packed).to_bytes(4, "little") + packed


def test_decoding_errors_name_the_nested_field_of_a_kind() -> None:
    filters = [{"node_id": "a", "pickled_filter": "text"}]
    plan = {"plan_id": "p", "plan": {"type": "Empty"}, "filters": filters}
    with pytest.raises(WireError) as caught:
        v2.decode(frame({"v": 2, "type": "AssignPlan", "id": "r1", "plan": plan}), "worker")
    assert caught.value.code == "bad_message"
    assert caught.value.message == "plan.filters[0].pickled_filter: expected bin"
    assert caught.value.request_id == "r1"


def test_a_broken_body_is_reported_before_a_broken_id() -> None:
    with pytest.raises(WireError, match=r"^plan: missing in AssignPlan$"):
        v2.decode(frame({"v": 2, "type": "AssignPlan", "id": 7}), "worker")
    with pytest.raises(WireError, match=r"^envelope id must be a string of 1 to 64 characters$"):
        v2.decode(frame({"v": 2, "type": "Ping", "id": 7}), "worker")
    assert v2.decode(frame({"v": 2, "type": "Ping", "id": "p1"}), "worker") == m.Ping(id="p1")
    assert v2.decode(frame({"v": 2, "type": "Pong"}), "client") == m.Pong()


def test_unknown_keys_of_a_nested_record_are_logged_once_under_its_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    filters = [{"node_id": "a", "pickled_filter": b"", "z": 1}]
    plan = {"plan_id": "p", "plan": {"type": "Empty"}, "filters": filters}
    with caplog.at_level(logging.DEBUG, logger="soma.wire"):
        message = v2.decode(frame({"v": 2, "type": "AssignPlan", "id": "r1", "plan": plan}), "worker")
    assert isinstance(message, m.AssignPlan)
    assert message.plan.filters == [m.SerializedFilter(node_id="a", pickled_filter=b"")]
    logged = [r.getMessage() for r in caplog.records if "unknown keys" in r.getMessage()]
    assert logged == ["ignoring unknown keys ['z'] in plan.filters[0]"]


def test_the_encoder_frees_its_buffers_without_waiting_for_the_collector() -> None:
    encoder = v2._Encoder()
    encoder.pack({"pair": (1, 2), "raw": bytearray(8)})
    gone = weakref.ref(encoder)
    gc.disable()
    try:
        del encoder
        assert gone() is None
    finally:
        gc.enable()


def test_a_long_value_of_a_message_is_a_part_of_its_own() -> None:
    floats = [i / 7 for i in range(100_000)]
    message = m.ChunkData(stream_id="s", chunk_index=0, value=floats, id="c1")
    parts = v2.encode_frame_parts(message)
    assert len(parts) == 2 and len(parts[0]) < 64 and memoryview(parts[1]).nbytes > 800_000
    assert v2.decode(b"".join(parts), "worker") == message
