"""BATCHED_FIT on a real daemon: the shared partial_fit loop, progress frames, fan-in, row checks."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
from _harness import DaemonProcess, spec

from soma.runtime.batching import partial_fit_loop

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class BatchRecorder:
    """partial_fit threads a tuple of call records: (x rows, y rows, rows of the incoming state)."""

    def __init__(self, touch: str | None = None) -> None:
        self.touch = touch

    def fit(self, x: Any, y: Any = None) -> Any:
        raise AssertionError("fit must not run when partial_fit applies")

    def partial_fit(self, x: Any, y: Any, state: Any) -> Any:
        if self.touch:
            open(self.touch, "w").close()
        incoming = None if state is None else len(state)
        return (state or ()) + ((x.tolist(), None if y is None else y.tolist(), incoming),)

    def forward(self, x: Any, state: Any) -> Any:
        return {"rows": x.tolist(), "batches": len(state)}


class FitCounter:
    def fit(self, x: Any, y: Any = None) -> Any:
        return {"fit_rows": len(x), "y": y}

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Double:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x * 2


class SumInputs:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return {"keys": list(x), "total": x["a"] + x["b"]}


class RunningMax:
    """Keeps NaN-aware statistics in its state, batch by batch."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"max": float(np.nanmax(x))}

    def partial_fit(self, x: Any, y: Any, state: Any) -> Any:
        seen = [] if state is None else state["seen"]
        return {"seen": seen + [x.tolist()]}

    def forward(self, x: Any, state: Any) -> Any:
        return x


def load(daemon: DaemonProcess, *specs: dict[str, Any]) -> None:
    daemon.ok("LOAD", filters=list(specs), runtime=None, seed=None)


X = np.arange(10, dtype=np.float64).reshape(5, 2)
Y = np.array([10, 11, 12, 13, 14])


def test_partial_fit_runs_per_batch_with_state_threaded_and_progress(daemon: DaemonProcess) -> None:
    load(daemon, spec("r", BatchRecorder()))
    reply = daemon.ok("BATCHED_FIT", node_ids=["r"], data=X, y=Y, batch_size=2)
    calls = reply["states"]["r"]
    assert [c[0] for c in calls] == [X[0:2].tolist(), X[2:4].tolist(), X[4:5].tolist()]
    assert [c[1] for c in calls] == [[10, 11], [12, 13], [14]]
    assert [c[2] for c in calls] == [None, 1, 2]
    assert reply["result"] == {"rows": X.tolist(), "batches": 3}
    progress = reply["_progress"]
    assert [(p["batch"], p["n_batches"], p["rows"], p["total_rows"]) for p in progress] == [
        (1, 3, 2, 5),
        (2, 3, 2, 5),
        (3, 3, 1, 5),
    ]
    assert all(p["node_id"] == "r" and p["id"] == reply["id"] and p["kind"] == "progress" for p in progress)


def test_batched_result_equals_the_local_loop(daemon: DaemonProcess) -> None:
    load(daemon, spec("r", BatchRecorder()))
    remote = daemon.ok("BATCHED_FIT", node_ids=["r"], data=X, y=Y, batch_size=2)
    local_filter = BatchRecorder()
    local_state = partial_fit_loop(local_filter, X, Y, 2)
    assert remote["states"]["r"] == local_state
    assert remote["result"] == local_filter.forward(X, local_state)
    assert daemon.ok("GET_STATE", node_id="r")["state"] == local_state


def test_filter_without_partial_fit_gets_one_fit(daemon: DaemonProcess) -> None:
    load(daemon, spec("f", FitCounter()))
    reply = daemon.ok("BATCHED_FIT", node_ids=["f"], data=X, y=Y, batch_size=2)
    assert reply["states"]["f"]["fit_rows"] == 5
    np.testing.assert_array_equal(reply["states"]["f"]["y"], Y)
    assert reply["_progress"] == []
    np.testing.assert_array_equal(reply["result"], X)


def test_y_with_another_row_count_fails_before_any_call(daemon: DaemonProcess, tmp_path: Path) -> None:
    touched = tmp_path / "called"
    load(daemon, spec("r", BatchRecorder(str(touched))))
    error = daemon.error("BATCHED_FIT", node_ids=["r"], data=X, y=Y[:4], batch_size=2)
    assert error["code"] == "row_mismatch" and error["node_id"] == "r"
    assert error["message"] == "x and y have different numbers of rows: 5 vs 4"
    assert not touched.exists()


def test_chain_fan_in_and_several_outputs(daemon: DaemonProcess) -> None:
    load(daemon, spec("a", Double()), spec("b", FitCounter()), spec("c", SumInputs()))
    reply = daemon.ok(
        "BATCHED_FIT",
        node_ids=["a", "b", "c"],
        preds={"a": [], "b": [], "c": ["b", "a"]},
        data=np.ones(3),
        outputs=["a", "c"],
    )
    np.testing.assert_array_equal(reply["result"]["a"], np.full(3, 2.0))
    assert reply["result"]["c"]["keys"] == ["b", "a"]
    np.testing.assert_array_equal(reply["result"]["c"]["total"], np.full(3, 3.0))
    assert list(reply["states"]) == ["b"]


def test_default_chain_feeds_each_node_its_predecessor(daemon: DaemonProcess) -> None:
    load(daemon, spec("a", Double()), spec("b", Double()), spec("r", BatchRecorder()))
    reply = daemon.ok("BATCHED_FIT", node_ids=["a", "b", "r"], data=X, batch_size=4)
    assert reply["result"] == {"rows": (X * 4).tolist(), "batches": 2}


def test_given_state_skips_fitting(daemon: DaemonProcess) -> None:
    load(daemon, spec("f", FitCounter()))
    reply = daemon.ok("BATCHED_FIT", node_ids=["f"], data=X, states={"f": {"fit_rows": -1, "y": None}})
    assert reply["states"]["f"] == {"fit_rows": -1, "y": None}


def test_nan_inf_and_negative_zero_survive_batched_fit(daemon: DaemonProcess) -> None:
    load(daemon, spec("m", RunningMax()))
    data = np.array([[math.nan, -0.0], [math.inf, -math.inf], [1.0, 2.0]])
    reply = daemon.ok("BATCHED_FIT", node_ids=["m"], data=data, batch_size=2)
    assert reply["result"].tobytes() == data.tobytes()
    seen = reply["states"]["m"]["seen"]
    assert math.isnan(seen[0][0][0]) and math.copysign(1, seen[0][0][1]) == -1
    assert seen[0][1] == [math.inf, -math.inf] and seen[1] == [[1.0, 2.0]]


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"node_ids": ["r"], "batch_size": 0}, "batch_size"),
        ({"node_ids": ["r"], "outputs": ["zz"]}, "outputs"),
        ({"node_ids": ["r"], "preds": {"r": ["later"]}}, "preds"),
        ({"node_ids": []}, "node_ids"),
    ],
)
def test_malformed_batched_fit_is_a_bad_request(daemon: DaemonProcess, fields: dict[str, Any], names: str) -> None:
    load(daemon, spec("r", BatchRecorder()))
    error = daemon.error("BATCHED_FIT", data=X, **fields)
    assert error["code"] == "bad_request" and names in error["message"]


def test_unknown_node_in_batched_fit(daemon: DaemonProcess) -> None:
    load(daemon, spec("r", BatchRecorder()))
    error = daemon.error("BATCHED_FIT", node_ids=["r", "ghost"], data=X)
    assert error["code"] == "unknown_node" and "ghost" in error["message"]
