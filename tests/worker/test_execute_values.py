"""Inline versus reference (worker spec §4.5), in both directions, at the exact threshold."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import _execute_filters as F
import numpy as np
import pytest
from _execute_support import chain, failure, filt, fit_mode, plan, rig, success

from soma.isolation.markers import Opaque
from soma.wire import v1, v2
from soma.wire.messages import CachedRef, LocalRef
from soma.worker.references import encodes_quickly

THRESHOLD = 4096


def _sized(size: int, make: Any = lambda n: b"x" * n, measure: Any = v2.encoded_size) -> int:
    """The length ``n`` for which ``make(n)`` has exactly ``size`` encoded bytes."""
    n = size
    while measure(make(n)) > size:
        n -= 1
    assert measure(make(n)) == size
    return n


async def test_outputs_and_returned_states_go_by_reference_from_the_threshold_on(tmp_path: Path) -> None:
    under, at = _sized(THRESHOLD - 1), _sized(THRESHOLD)
    async with rig(tmp_path, inline_threshold=THRESHOLD) as r:
        inline = success(await r.run(plan(chain("b"), [filt("b", F.Bytes(under))], input=None)))
        assert inline.output == b"x" * under
        referenced = success(await r.run(plan(chain("b"), [filt("b", F.Bytes(at))], input=None)))
        assert isinstance(referenced.output, CachedRef) and referenced.output.size is not None
        stored = r.store.find_cached(referenced.output.cache_key)
        assert v2.decode_value_frame(stored.read_bytes(), "client") == b"x" * at

        states = {}
        for n in (under, at):
            msg = plan(chain("s"), [filt("s", F.BytesState(n), trainable=True)], input=[1], mode=fit_mode())
            states[n] = success(await r.run(msg)).states["s"]
        assert states[under] == b"s" * under
        assert isinstance(states[at], CachedRef)
        assert v2.decode_value_frame(r.store.find_cached(states[at].cache_key).read_bytes(), "client") == b"s" * at


async def test_inputs_labels_external_outputs_and_states_resolve_the_same_inline_or_by_reference(
    tmp_path: Path,
) -> None:
    value = {"rows": list(range(300)), "tag": "ü"}
    async with rig(tmp_path, inline_threshold=THRESHOLD) as r:
        key = r.store.put_bytes(v2.encode_value_frame(value), ".soma")
        ref = CachedRef(cache_key=key)

        def fit_plan(x: Any, y: Any) -> Any:
            return plan(chain("f"), [filt("f", F.FitDescribe(), trainable=True)], input=x, mode=fit_mode(y=y))

        def forward_plan(x: Any, external: Any, state: Any) -> Any:
            return plan(
                chain("f"),
                [filt("f", F.FitDescribe(), trainable=True, state=state)],
                edges=[("outside", "f")],
                external={"outside": external},
                input=x,
            )

        assert success(await r.run(fit_plan(value, value))).states == success(await r.run(fit_plan(ref, ref))).states
        inline = success(await r.run(forward_plan(None, value, value))).output
        assert inline == success(await r.run(forward_plan(None, ref, ref))).output
        assert repr(value) in inline


async def test_v1_inputs_and_outputs_use_local_references(tmp_path: Path) -> None:
    def text(n: int) -> str:
        return "x" * n

    under, at = _sized(THRESHOLD - 1, text, v1.encoded_size), _sized(THRESHOLD, text, v1.encoded_size)
    async with rig(tmp_path, inline_threshold=THRESHOLD) as r:
        inline = success(await r.run(plan(chain("t"), [filt("t", F.Text(under))], dialect="v1", input=None)))
        assert inline.output == "x" * under
        referenced = success(await r.run(plan(chain("t"), [filt("t", F.Text(at))], dialect="v1", input=None)))
        assert isinstance(referenced.output, LocalRef)
        path = Path(referenced.output.path)
        assert path.parent == r.store.store_dir
        assert v1.decode_value(json.loads(path.read_text())) == "x" * at

        uploaded = r.store.put_bytes(json.dumps(v1.encode_value([1.0, 2.0])).encode(), ".json")
        by_path = LocalRef(path=str(r.store.path_for(uploaded)))
        msg = plan(chain("d"), [filt("d", F.Describe())], dialect="v1", input=by_path)
        assert success(await r.run(msg)).output == repr([1.0, 2.0])


async def test_non_finite_floats_round_trip_exactly_over_v2(tmp_path: Path) -> None:
    values = [math.nan, math.inf, -math.inf, -0.0]
    array = np.array(values, dtype=np.float64)
    async with rig(tmp_path) as r:
        result = success(await r.run(plan(chain("e"), [filt("e", F.Echo())], input={"list": values, "array": array})))
    out = result.output
    assert math.isnan(out["list"][0]) and out["list"][1:3] == [math.inf, -math.inf]
    assert math.copysign(1.0, out["list"][3]) == -1.0
    np.testing.assert_array_equal(out["array"], array)
    assert np.signbit(out["array"][3])


async def test_data_store_arrays_resolve_by_key_and_misses_name_every_place_searched(tmp_path: Path) -> None:
    data_store = tmp_path / "data"
    data_store.mkdir()
    key = "ab" * 32
    np.save(data_store / f"{key}.npy", np.arange(4, dtype=np.int32).reshape(2, 2))
    async with rig(tmp_path, data_store=data_store) as r:
        shape = success(await r.run(plan(chain("s"), [filt("s", F.Shape())], input=CachedRef(cache_key=key))))
        assert shape.output == {"type": "ndarray", "shape": [2, 2], "dtype": "int32", "sum": 6.0}
        missing = failure(await r.run(plan(chain("s"), [filt("s", F.Shape())], input=CachedRef(cache_key="cd" * 32))))
    assert missing.error.code == "unresolved_reference"
    assert str(r.store.store_dir) in missing.error.message and str(data_store.resolve()) in missing.error.message


async def test_fits_on_inline_and_referenced_rows_give_equal_states(tmp_path: Path) -> None:
    """Checklist item 48: a large referenced fit is a fit, never a forward-only stream."""
    data_store = tmp_path / "data"
    data_store.mkdir()
    rng = np.random.default_rng(0)
    async with rig(tmp_path, inline_threshold=THRESHOLD, data_store=data_store) as r:
        for n in (500, 5_000, 20_000):
            x = rng.normal(size=(n, 3))
            y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(scale=0.01, size=n)
            stored_x = CachedRef(cache_key=r.store.put_bytes(v2.encode_value_frame(x), ".soma"))
            stored_y = CachedRef(cache_key=r.store.put_bytes(v2.encode_value_frame(y), ".soma"))
            np.save(data_store / f"{n:064x}.npy", x)
            np.save(data_store / f"y{n}.npy", y)
            by_key = CachedRef(cache_key=f"{n:064x}")
            by_path = LocalRef(path=str(data_store / f"y{n}.npy"))
            states = []
            for x_in, y_in in ((x, y), (stored_x, stored_y), (by_key, by_path)):
                ls = filt("ls", F.LeastSquares(), trainable=True)
                msg = plan(chain("ls"), [ls], input=x_in, mode=fit_mode(y_in))
                result = success(await r.run(msg))
                states.append(result.states["ls"])
                assert isinstance(result.output, CachedRef) == (n * 8 >= THRESHOLD)  # the predictions
            for state in states:
                assert state["fitted"] is True and state["rows"] == n
                np.testing.assert_array_equal(state["coef"], states[0]["coef"])
            np.testing.assert_allclose(states[0]["coef"], [1.0, -2.0, 0.5], atol=0.01)


_SMALL_VALUES: list[Any] = [
    None,
    True,
    2**70,  # beyond msgpack's ints: pickled
    -(2**63),
    float("nan"),
    "ünïcode ✓" * 20,
    b"\x00\xff" * 100,
    np.arange(30, dtype=np.int16),
    np.float32(1.5),
    Opaque(data=b"p" * 300),
    [1, [2.5, (3, "x")], {"k": [None, b"v"]}],
    {"mean": 2.0, "rows": [[1.0] * 10] * 10},
]


@pytest.mark.parametrize("threshold", [64, 512, 4096, 10 << 20])
def test_values_that_encode_quickly_travel_inline_in_v2_so_they_need_no_measuring(threshold: int) -> None:
    # A plan's small results skip ``outbound``: that is right only if the quick check implies it.
    for value in _SMALL_VALUES:
        if not encodes_quickly([value], threshold):
            continue
        size, _ = v2.measure_value_frame(value)  # encodable in v2, and inline
        assert size < threshold, value
    assert encodes_quickly(_SMALL_VALUES, 10 << 20)
