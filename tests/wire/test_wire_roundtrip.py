"""Every message type round-trips through every encoding it travels in (worker.md §9 item 12)."""

from __future__ import annotations

import math
import pickle
from typing import Any

import msgpack
import numpy as np
import pytest
from _wire_samples import messages, same
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from soma.isolation.markers import Opaque
from soma.wire import messages as m
from soma.wire import v1, v2
from soma.wire.schema import wire_fields

V1_SAMPLES = messages(v2=False)
V2_SAMPLES = messages(v2=True)


def _ids(samples: list[Any]) -> list[str]:
    return [f"{i}-{s.type}" for i, s in enumerate(samples)]


def test_samples_cover_every_message_type_of_each_dialect() -> None:
    assert {s.type for s in V1_SAMPLES} == m.V1_MESSAGES
    assert {s.type for s in V2_SAMPLES} == m.V2_MESSAGES
    assert m.V1_MESSAGES | m.V2_MESSAGES == set(m.MESSAGE_TYPES)


@pytest.mark.parametrize("message", V1_SAMPLES, ids=_ids(V1_SAMPLES))
def test_v1_json_round_trip(message: m.Request | m.Reply) -> None:
    text = v1.encode_json(message)
    assert isinstance(text, str)
    assert same(v1.decode_json(text), message)


@pytest.mark.parametrize("message", V1_SAMPLES, ids=_ids(V1_SAMPLES))
def test_v1_msgpack_named_map_round_trip(message: m.Request | m.Reply) -> None:
    frame = v1.encode_stream(message)
    body = msgpack.unpackb(frame)
    assert isinstance(body, dict) and body["type"] == message.type
    assert same(v1.decode_stream(frame), message)


@pytest.mark.parametrize("message", V2_SAMPLES, ids=_ids(V2_SAMPLES))
@pytest.mark.parametrize("side", ["worker", "client"])
def test_v2_frame_round_trip(message: m.Request | m.Reply, side: v2.Side) -> None:
    assert same(v2.decode(v2.encode_frame(message), side), message)


@pytest.mark.parametrize("message", V1_SAMPLES, ids=_ids(V1_SAMPLES))
def test_v1_msgpack_positional_arrays_decode(message: m.Request | m.Reply) -> None:
    named = msgpack.unpackb(v1.encode_stream(message))
    names = [f.name for f in wire_fields(type(message), "v1")]
    positional = [named.pop("type"), *(named.get(name) for name in names)]
    assert same(v1.decode_stream(msgpack.packb(positional)), message)


def test_v1_stream_messages_default_to_binary_frames_and_others_to_text() -> None:
    for message in V1_SAMPLES:
        frame = v1.encode(message)
        assert isinstance(frame, bytes if message.type in m.STREAM_MESSAGES else str), message.type
        assert same(v1.decode(frame), message)


def test_v2_correlation_ids_travel_in_the_envelope() -> None:
    frame = v2.encode_frame(m.Ping(id="abc"))
    head = v2.read_head(frame)
    assert (head.v, head.type, head.id, head.re) == (2, "Ping", "abc", None)
    reply = v2.read_head(v2.encode_frame(m.Pong(re="abc")))
    assert (reply.type, reply.id, reply.re) == ("Pong", None, "abc")


# --------------------------------------------------------------------------- property tests

_DTYPES = st.sampled_from(
    ["<f8", "<f4", "<f2", ">f8", "<i8", "|i1", "<u2", "|b1", "<c16", "<U3", "|S2", "<M8[ns]", "<m8[s]"]
)
_ARRAYS = _DTYPES.flatmap(
    lambda dtype: hnp.arrays(
        dtype=np.dtype(dtype), shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)
    )
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0]),
    st.text(max_size=6),
    st.binary(max_size=6),
    st.complex_numbers(allow_nan=False, max_magnitude=1e6),
    st.frozensets(st.integers(min_value=-5, max_value=5), max_size=3),
    _ARRAYS,
    _ARRAYS.filter(lambda a: a.size > 0).map(lambda a: a.reshape(-1)[0]),
)
_KEYS = st.one_of(
    st.text(max_size=4),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.tuples(st.integers(), st.text(max_size=2)),
)
VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(_KEYS, children, max_size=3),
    ),
    max_leaves=12,
)
_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(VALUES)
def test_v2_values_round_trip_exactly_on_the_client(value: Any) -> None:
    message = m.ChunkData(stream_id="s", chunk_index=0, value=value, id="r")
    decoded = v2.decode(v2.encode_frame(message), "client")
    assert same(decoded.value, value)
    _assert_arrays_writable(decoded.value)


@_SETTINGS
@given(VALUES)
def test_v2_values_survive_a_worker_that_never_unpickles(value: Any) -> None:
    frame = v2.encode_frame(m.ChunkData(stream_id="s", chunk_index=0, value=value, id="r"))
    on_worker = v2.decode(frame, "worker")
    _assert_no_user_objects(on_worker.value)
    reply = m.ChunkResult(stream_id="s", chunk_index=0, value=on_worker.value, re="r")
    back = v2.decode(b"".join(v2.encode_frame_parts(reply)), "client")
    assert same(back.value, value)


@_SETTINGS
@given(VALUES)
def test_value_frames_round_trip_and_encoded_size_bounds_them(value: Any) -> None:
    frame = v2.encode_value_frame(value)
    assert same(v2.decode_value_frame(frame, "client"), value)
    assert v2.encoded_size(value) <= len(frame)


_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=5),
    ),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=10,
)


@_SETTINGS
@given(_JSON)
def test_v1_exact_json_states_come_back_unchanged(state: Any) -> None:
    encoded = v1.encode_state(state)
    assert encoded["type"] == "Json"
    assert same(v1.decode_value(encoded), state)


@_SETTINGS
@given(VALUES)
def test_v1_states_that_are_not_json_travel_as_opaque_pickles(state: Any) -> None:
    reply = m.StateResult(worker_id="w", plan_id="p", states={"a": state})
    decoded = v1.decode_json(v1.encode_json(reply)).states["a"]
    if isinstance(decoded, Opaque):
        assert v1.encode_state(state)["type"] == "Bytes"
        assert same(pickle.loads(decoded.data), state)
    else:
        assert same(decoded, state)


def _assert_arrays_writable(value: Any) -> None:
    if isinstance(value, np.ndarray):
        assert value.flags.writeable
    elif isinstance(value, list | tuple):
        for item in value:
            _assert_arrays_writable(item)
    elif isinstance(value, dict):
        for item in value.values():
            _assert_arrays_writable(item)


def _assert_no_user_objects(value: Any) -> None:
    """On the worker only plain data, read-only arrays, numpy scalars and markers exist."""
    if isinstance(value, np.ndarray):
        assert not value.flags.writeable
    elif isinstance(value, list | tuple):
        for item in value:
            _assert_no_user_objects(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _assert_no_user_objects(key)
            _assert_no_user_objects(item)
    else:
        assert value is None or isinstance(value, bool | int | float | str | bytes | np.generic | Opaque)
