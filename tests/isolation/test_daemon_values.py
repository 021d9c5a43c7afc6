"""LOAD, FIT and FORWARD on a real daemon: values cross intact, errors travel as data."""

from __future__ import annotations

import math
import os
import pickle
import sys
import threading
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
from _harness import DaemonProcess, client_value, pickled, spec

from soma.isolation.markers import Concat, Handle, Opaque

# Filters defined here travel by value, as classes of a client's __main__ do.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Identity:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x


class StatelessProbe:
    _kind = "stateless"

    def fit(self, x: Any, y: Any = None) -> Any:
        raise AssertionError("fit must never be called on a stateless filter")

    def forward(self, x: Any, state: Any) -> Any:
        return {"state_is_none": state is None, "x": x}


class MeanCenter:
    def fit(self, x: Any, y: Any = None) -> Any:
        return x.mean(axis=0)

    def forward(self, x: Any, state: Any) -> Any:
        return x - state


class StateEcho:
    """fit returns its input; forward returns the state it was given."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return x

    def forward(self, x: Any, state: Any) -> Any:
        return state


class Counter:
    """An evolving-stream filter: update adds the rows seen."""

    def fit(self, x: Any, y: Any = None) -> int:
        return 0

    def forward(self, x: Any, state: int) -> int:
        return state

    def update(self, x: Any, state: int) -> int:
        return state + len(x)


class Scale:
    _kind = "stateless"

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def forward(self, x: Any, state: Any) -> Any:
        return x * self.factor


class Raiser:
    _kind = "stateless"

    def __init__(self, message: str) -> None:
        self.message = message

    def forward(self, x: Any, state: Any) -> Any:
        raise ValueError(self.message)


class Exiter:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        sys.exit(3)


class SeedReader:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        import soma

        return soma.current_seed()


class Unencodable:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return threading.Lock()


class ExitsWhenPickled:
    def __reduce__(self) -> Any:
        raise SystemExit(2)


class ReturnsExitsWhenPickled:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return ExitsWhenPickled()


class Point:
    """A user class defined in the client's module."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)


class CreatesFileOnLoad:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def opaque(obj: Any) -> Opaque:
    """A user object as a client sends it: cloudpickled inside an Opaque marker."""
    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return Opaque(data, [bytes(b.raw()) for b in buffers])


def load(daemon: DaemonProcess, *specs: dict[str, Any], seed: int | None = None, **fields: Any) -> dict[str, Any]:
    return daemon.ok("LOAD", filters=list(specs), runtime=None, seed=seed, **fields)


def bits_equal(a: Any, b: Any) -> bool:
    """Equal values of the same type, NaN and the sign of zero included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, np.ndarray):
        return (a.dtype, a.shape) == (b.dtype, b.shape) and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(bits_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(bits_equal(a[k], b[k]) for k in a)
    return bool(a == b)


SPECIALS = {
    "array": np.array([[math.nan, math.inf], [-math.inf, -0.0]], dtype=np.float64),
    "floats": [math.nan, math.inf, -math.inf, -0.0],
    "nested": {"deep": {"x": (-0.0, math.nan)}, "f32": np.array([-0.0, math.nan], dtype=np.float32)},
}


def test_float32_array_reaches_forward_with_dtype_and_shape(daemon: DaemonProcess) -> None:
    load(daemon, spec("id", Identity()))
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    reply = daemon.ok("FORWARD", node_id="id", data=x)
    assert reply["result"].dtype == np.float32 and reply["result"].shape == (8, 2)
    np.testing.assert_array_equal(reply["result"], x)
    assert reply["summary"] == "ndarray(shape=(8, 2), dtype=float32)"


def test_nan_inf_and_negative_zero_survive_fit_and_forward(daemon: DaemonProcess) -> None:
    load(daemon, spec("echo", StateEcho()), spec("id", Identity()))
    fitted = daemon.ok("FIT", node_id="echo", data=SPECIALS)["result"]
    assert bits_equal(fitted, SPECIALS)
    assert bits_equal(daemon.ok("FORWARD", node_id="echo", data=None)["result"], SPECIALS)
    assert bits_equal(daemon.ok("FORWARD", node_id="id", data=SPECIALS)["result"], SPECIALS)


def test_stateless_filter_gets_none_and_fit_is_never_called(daemon: DaemonProcess) -> None:
    load(daemon, spec("probe", StatelessProbe()))
    fitted = daemon.ok("FIT", node_id="probe", data=[1, 2])
    assert fitted["result"] is None
    out = daemon.ok("FORWARD", node_id="probe", data=[1, 2], state={"ignored": True})["result"]
    assert out == {"state_is_none": True, "x": [1, 2]}


def test_ndarray_state_from_fit_comes_back_as_an_equal_ndarray(daemon: DaemonProcess) -> None:
    load(daemon, spec("m", MeanCenter()), spec("echo", StateEcho()))
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    state = daemon.ok("FIT", node_id="m", data=x)["result"]
    assert isinstance(state, np.ndarray)
    np.testing.assert_array_equal(state, [2.0, 4.0])
    given = daemon.ok("FORWARD", node_id="echo", data=None, state=state)["result"]
    assert isinstance(given, np.ndarray) and given.dtype == state.dtype
    np.testing.assert_array_equal(given, state)
    np.testing.assert_array_equal(daemon.ok("FORWARD", node_id="m", data=x)["result"], x - state)


def test_python_values_round_trip_with_their_types(daemon: DaemonProcess) -> None:
    load(daemon, spec("id", Identity()))
    value = {
        "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True)],
        "dtype": np.dtype("int16"),
        "object_array": np.array([Point(7, 8), None], dtype=object),
        "tuple": (1, "two", b"three"),
        "bytes": b"\x00\xff",
        "set": {1, 2, 3},
        "frozenset": frozenset({"a"}),
        "point": Point(1, 2),
        "points": [Point(3, 4), (Point(5, 6),)],
        "int_keys": {1: "a", (2, 3): "b"},
        "complex": 1 + 2j,
    }
    sent = {
        **value,
        "point": opaque(value["point"]),
        "points": [opaque(Point(3, 4)), (opaque(Point(5, 6)),)],
        "object_array": opaque(value["object_array"]),
    }
    result = client_value(daemon.ok("FORWARD", node_id="id", data=sent)["result"])
    object_array = result.pop("object_array")
    assert object_array.dtype == object and list(object_array) == [Point(7, 8), None]
    assert result == {k: v for k, v in value.items() if k != "object_array"}
    assert [type(v) for v in result["np_scalars"]] == [np.float32, np.int64, np.bool_]
    assert type(result["tuple"]) is tuple and type(result["set"]) is set
    assert type(result["point"]) is Point


def test_opaque_input_is_materialised_before_user_code(daemon: DaemonProcess) -> None:
    load(daemon, spec("id", Identity()))
    reply = daemon.ok("FORWARD", node_id="id", data=opaque([Point(1, 1), np.ones(3)]))
    assert reply["summary"] == "list(len=2)"
    point, ones = client_value(reply["result"])
    assert point == Point(1, 1)
    np.testing.assert_array_equal(ones, np.ones(3))


def test_concat_marker_is_resolved_along_axis_zero(daemon: DaemonProcess) -> None:
    load(daemon, spec("id", Identity()))
    chunks = [np.zeros((2, 3)), np.ones((1, 3))]
    result = daemon.ok("FORWARD", node_id="id", data=Concat(chunks))["result"]
    np.testing.assert_array_equal(result, np.concatenate(chunks))
    assert daemon.ok("FORWARD", node_id="id", data=Concat([[1], [2, 3]]))["result"] == [1, 2, 3]


def test_handle_chain_moves_no_intermediate_and_matches_value_mode(daemon: DaemonProcess) -> None:
    load(daemon, spec("a", Scale(2.0)), spec("b", Scale(3.0)), spec("c", Scale(0.5)))
    x = np.random.default_rng(1).standard_normal((256, 256))
    by_value = x
    for node_id in "abc":
        by_value = daemon.ok("FORWARD", node_id=node_id, data=by_value)["result"]
    before_sent, before_received = daemon.bytes_sent, daemon.bytes_received
    first = daemon.ok("FORWARD", node_id="a", data=x, **{"return": "handle"})
    assert first["summary"] == "ndarray(shape=(256, 256), dtype=float64)" and "result" not in first
    second = daemon.ok("FORWARD", node_id="b", data=Handle(first["handle"]), **{"return": "handle"})
    assert second["handle"] != first["handle"]
    sent_after_chain = daemon.bytes_sent - before_sent
    received_after_chain = daemon.bytes_received - before_received
    last = daemon.ok("FORWARD", node_id="c", data=Handle(second["handle"]))["result"]
    assert sent_after_chain < x.nbytes + 4096  # x once, no intermediate back
    assert received_after_chain < 4096
    assert bits_equal(last, by_value)


def test_unknown_handle_is_a_bad_request_and_load_clears_handles(daemon: DaemonProcess) -> None:
    load(daemon, spec("id", Identity()))
    handle = daemon.ok("FORWARD", node_id="id", data=[1], **{"return": "handle"})["handle"]
    assert daemon.ok("FORWARD", node_id="id", data=Handle(handle))["result"] == [1]
    load(daemon, spec("id", Identity()))
    error = daemon.error("FORWARD", node_id="id", data=Handle(handle))
    assert error["code"] == "bad_request" and handle in error["message"]


def test_fit_state_held_and_evolved_by_update(daemon: DaemonProcess) -> None:
    load(daemon, spec("n", Counter()))
    assert daemon.ok("FIT", node_id="n", data=[1])["result"] == 0
    assert daemon.ok("FORWARD", node_id="n", data=[1, 2], evolve=True)["result"] == 0
    assert daemon.ok("FORWARD", node_id="n", data=[1, 2, 3], evolve=True)["result"] == 2
    assert daemon.ok("FORWARD", node_id="n", data=[1])["result"] == 5
    assert daemon.ok("GET_STATE", node_id="n")["state"] == 5
    daemon.ok("SET_STATE", node_id="n", state=40)
    assert daemon.ok("FORWARD", node_id="n", data=[])["result"] == 40


def test_load_applies_given_states(daemon: DaemonProcess) -> None:
    load(daemon, spec("m", MeanCenter()), states={"m": np.array([1.0, 1.0])})
    np.testing.assert_array_equal(daemon.ok("FORWARD", node_id="m", data=np.ones((1, 2)))["result"], [[0.0, 0.0]])


def test_blob_unpickles_to_the_result_and_works_as_a_cached_state(daemon: DaemonProcess) -> None:
    load(daemon, spec("m", MeanCenter()), spec("echo", StateEcho()))
    x = np.array([[1.0, 3.0], [3.0, 5.0]])
    fitted = daemon.ok("FIT", node_id="m", data=x, blob=True)
    blob = fitted["blob"]
    assert isinstance(blob, bytes)
    np.testing.assert_array_equal(pickle.loads(blob), fitted["result"])
    out = daemon.ok("FORWARD", node_id="m", data=x, state=Opaque(blob, []))["result"]
    np.testing.assert_array_equal(out, x - fitted["result"])
    sets = daemon.ok("FIT", node_id="echo", data={"s": {1, 2}, "p": opaque(Point(0, 1))}, blob=True)
    assert pickle.loads(sets["blob"]) == client_value(sets["result"]) == {"s": {1, 2}, "p": Point(0, 1)}


def test_seed_is_visible_to_user_code_for_the_tenant(daemon: DaemonProcess) -> None:
    load(daemon, spec("s", SeedReader()), seed=1234)
    assert daemon.ok("FORWARD", node_id="s", data=None)["result"] == 1234
    load(daemon, spec("s", SeedReader()), seed=None)
    assert daemon.ok("FORWARD", node_id="s", data=None)["result"] is None


def test_a_tenant_reaches_only_the_nodes_it_loaded(daemon: DaemonProcess) -> None:
    load(daemon, spec("first", Identity()))
    assert daemon.ok("FORWARD", node_id="first", data=1)["result"] == 1
    load(daemon, spec("second", Identity()))
    error = daemon.error("FORWARD", node_id="first", data=1)
    assert error["code"] == "unknown_node" and "'first'" in error["message"] and error["node_id"] == "first"


def test_non_filter_gives_unpickle_error_naming_the_type_and_loads_nothing(daemon: DaemonProcess) -> None:
    error = daemon.error(
        "LOAD", filters=[spec("good", Identity()), spec("bad", Point(1, 2), trainable=True)], runtime=None, seed=None
    )
    assert error["code"] == "unpickle_error" and error["node_id"] == "bad"
    assert "not a filter, got" in error["message"] and "Point" in error["message"]
    assert "version skew" in error["message"]
    assert daemon.error("FORWARD", node_id="good", data=1)["code"] == "unknown_node"


def test_load_with_a_state_for_an_unknown_node_loads_nothing(daemon: DaemonProcess) -> None:
    error = daemon.error("LOAD", filters=[spec("m", MeanCenter())], runtime=None, seed=None, states={"ghost": 1})
    assert error["code"] == "unknown_node" and "ghost" in error["message"]
    assert daemon.error("FORWARD", node_id="m", data=np.ones((1, 2)))["code"] == "unknown_node"


def test_corrupt_filter_pickle_gives_unpickle_error(daemon: DaemonProcess) -> None:
    error = daemon.error(
        "LOAD", filters=[{"id": "x", "pickle": b"not a pickle", "trainable": True}], runtime=None, seed=None
    )
    assert error["code"] == "unpickle_error" and "version skew" in error["message"]


@pytest.mark.parametrize(
    "runtime",
    [
        {"python": "3.9.18", "cloudpickle": cloudpickle.__version__},
        {"python": "{}.{}.0".format(*sys.version_info[:2]), "cloudpickle": "2.2.1"},
    ],
)
def test_runtime_mismatch_refuses_before_unpickling(daemon: DaemonProcess, tmp_path: Path, runtime: dict[str, str]) -> None:
    marker = tmp_path / "unpickled"
    filters = [{"id": "x", "pickle": pickled(CreatesFileOnLoad(str(marker))), "trainable": True}]
    error = daemon.error("LOAD", filters=filters, runtime=runtime, seed=None)
    assert error["code"] == "runtime_mismatch"
    assert f"client Python {'.'.join(runtime['python'].split('.')[:2])}" in error["message"]
    assert sys.executable in error["message"]
    assert not marker.exists()


def test_patch_version_difference_only_warns() -> None:
    python = "{}.{}.99".format(*sys.version_info[:2])
    runtime = {"python": python, "cloudpickle": cloudpickle.__version__}
    child = DaemonProcess()
    try:
        child.ok("LOAD", filters=[spec("id", Identity())], runtime=runtime, seed=None)
        assert child.ok("FORWARD", node_id="id", data=7)["result"] == 7
    finally:
        child.close()
    assert "patch versions differ" in child.stderr_text() and python in child.stderr_text()


def test_unknown_command_and_missing_field_are_answered_and_serving_continues(daemon: DaemonProcess) -> None:
    load(daemon, spec("id", Identity()))
    unknown = daemon.error("EXPLODE")
    assert unknown["code"] == "unknown_command" and "EXPLODE" in unknown["message"]
    missing = daemon.error("FORWARD", data=1)
    assert missing["code"] == "bad_request" and "node_id" in missing["message"]
    typed = daemon.error("FORWARD", node_id="id", data=1, evolve="yes")
    assert typed["code"] == "bad_request" and "evolve" in typed["message"]
    bad_return = daemon.error("FORWARD", node_id="id", data=1, **{"return": "pointer"})
    assert bad_return["code"] == "bad_request"
    assert daemon.ok("FORWARD", node_id="id", data=2)["result"] == 2


def test_user_exception_is_an_error_reply_with_its_details(daemon: DaemonProcess) -> None:
    message = "it's \"quoted\", back\\slashed,\nmulti-line and \x00 nul"
    load(daemon, spec("r", Raiser(message)))
    error = daemon.error("FORWARD", node_id="r", data=1)
    assert error["code"] == "user_error"
    assert error["message"] == message
    assert (error["type"], error["module"], error["method"]) == ("ValueError", "builtins", "forward")
    assert (error["node_id"], error["command"]) == ("r", "FORWARD")
    assert error["traceback"].startswith("Traceback") and "daemon.py" not in error["traceback"]
    assert "in forward" in error["traceback"] and error["traceback"].rstrip().endswith(message.rstrip())


def test_sys_exit_in_forward_is_a_user_error_and_the_child_survives(daemon: DaemonProcess) -> None:
    load(daemon, spec("exit", Exiter()), spec("id", Identity()))
    error = daemon.error("FORWARD", node_id="exit", data=1)
    assert (error["code"], error["type"], error["message"]) == ("user_error", "SystemExit", "3")
    assert daemon.ok("FORWARD", node_id="id", data=2)["result"] == 2
    assert daemon.process.poll() is None


def test_unencodable_output_is_an_encoding_error_naming_node_and_type(daemon: DaemonProcess) -> None:
    load(daemon, spec("u", Unencodable()), spec("id", Identity()))
    error = daemon.error("FORWARD", node_id="u", data=None)
    assert error["code"] == "encoding_error" and error["node_id"] == "u"
    assert "lock" in error["message"].lower() and "'u'" in error["message"]
    assert daemon.ok("FORWARD", node_id="id", data=3)["result"] == 3


def test_sys_exit_while_encoding_an_output_is_an_encoding_error(daemon: DaemonProcess) -> None:
    load(daemon, spec("e", ReturnsExitsWhenPickled()), spec("id", Identity()))
    error = daemon.error("FORWARD", node_id="e", data=None)
    assert error["code"] == "encoding_error" and "ExitsWhenPickled" in error["message"]
    assert daemon.ok("FORWARD", node_id="id", data=4)["result"] == 4


def test_pid_is_stable_across_tenants(daemon: DaemonProcess) -> None:
    assert daemon.greeting is not None and daemon.greeting["pid"] == daemon.pid
    load(daemon, spec("id", Identity()))
    assert daemon.ok("FORWARD", node_id="id", data=os.getpid())["result"] == os.getpid()
