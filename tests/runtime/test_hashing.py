"""Content hashing, code fingerprints, filter identity and cache keys (api §6.1, §6.2)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from soma.errors import SomaConfigError
from soma.runtime.fingerprint import code_fingerprint
from soma.runtime.hashing import Unhashable, content, filter_identity
from soma.runtime.keys import cache_key, fanin_key, fit_key, out_key
from _temp_modules import MakeModule, unique



def standin_filter_base() -> type:
    """A class at the path ``soma.filter.Filter``: nested filters are recognised by that path."""
    base = type("Filter", (), {"_version": None, "_requirements": ()})
    base.__module__ = "soma.filter"
    return base


# --- builtins -----------------------------------------------------------------------------


def test_content_is_a_fixed_size_digest() -> None:
    assert len(content(None)) == 32
    assert len(content(list(range(1000)))) == 32


def test_numbers_of_different_types_differ() -> None:
    assert len({content(1), content(1.0), content(True), content(1 + 0j), content("1")}) == 5
    assert content(0) != content(False)
    assert content(None) != content(0)


def test_special_floats_are_distinct() -> None:
    values = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0]
    assert len({content(v) for v in values}) == 5


def test_list_and_tuple_differ() -> None:
    assert content([1, 2]) != content((1, 2))
    assert content([1.0, 2.0]) != content((1.0, 2.0))
    assert content([]) != content(())
    assert content([[1]]) != content([(1,)])


def test_nesting_boundaries_are_unambiguous() -> None:
    assert content(["ab", "c"]) != content(["a", "bc"])
    assert content([[1, 2], [3]]) != content([[1], [2, 3]])
    assert content({"a": "bc"}) != content({"ab": "c"})
    assert content(b"ab") != content("ab")
    assert content(b"ab") != content(bytearray(b"ab"))


def test_dict_and_set_order_does_not_matter() -> None:
    assert content({"a": 1, "b": 2}) == content({"b": 2, "a": 1})
    assert content({3, 1, 2}) == content({2, 3, 1})
    assert content({1, 2}) != content(frozenset({1, 2}))
    assert content({"a": 1}) != content({"a": 2})


def test_large_and_negative_ints() -> None:
    big = 10**5000  # beyond the int-to-str digit limit
    assert content(big) != content(big + 1)
    assert content(-1) != content(1)
    assert content([2**70, 1]) != content([2**70, 2])
    assert content([1, 2, 3]) != content([1, 2, 4])


def test_mixed_and_homogeneous_lists_stay_distinct() -> None:
    assert content([1.0, 2.0]) != content([1.0, 2])
    assert content([1, 2]) != content([1, 2.0])
    assert content([1.0, 2.0]) == content([float(1), 2.0])


def test_long_float_lists_hash_by_value() -> None:
    values = [float(i) / 7 for i in range(10_000)]
    changed = list(values)
    changed[5_000] += 1e-12
    assert content(values) == content(list(values))
    assert content(values) != content(changed)


def test_memoryview_hashes_its_contents() -> None:
    data = bytearray(range(16))
    assert content(memoryview(data)) == content(memoryview(bytes(data)))
    assert content(memoryview(data)[::2]) == content(memoryview(bytes(data[::2])))
    assert content(memoryview(data)) != content(memoryview(data).cast("H"))


def test_reference_cycle_is_unhashable() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(Unhashable, match="cycle"):
        content(loop)
    table: dict[str, Any] = {}
    table["self"] = [table]
    with pytest.raises(Unhashable, match="cycle"):
        content(table)


def test_shared_references_are_not_cycles() -> None:
    shared = [1, "x"]
    assert content([shared, shared]) == content([[1, "x"], [1, "x"]])


def test_too_deep_nesting_is_unhashable() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep, "x"]
    with pytest.raises(Unhashable, match="deep"):
        content(deep)


# --- hypothesis: determinism and type distinctness ------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text()
    | st.binary()
    | st.complex_numbers()
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text() | st.integers(), inner)
        | st.frozensets(st.integers() | st.text())
    ),
    max_leaves=30,
)


@given(values)
def test_content_is_deterministic(value: Any) -> None:
    assert content(value) == content(value)
    assert content(value) == content(copy.deepcopy(value))


@given(st.dictionaries(st.text(), st.integers(), min_size=2))
def test_dict_insertion_order_is_ignored(table: dict[str, int]) -> None:
    assert content(table) == content(dict(reversed(list(table.items()))))


@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_an_int_differs_from_the_equal_float_and_bool(number: int) -> None:
    assert content(number) != content(float(number))
    if number in (0, 1):
        assert content(number) != content(bool(number))


@given(st.lists(scalars, max_size=5))
def test_a_list_differs_from_the_equal_tuple(items: list[Any]) -> None:
    assert content(items) != content(tuple(items))


# --- numpy ----------------------------------------------------------------------------------


def test_array_special_values_give_distinct_digests() -> None:
    arrays = [np.array([np.nan]), np.array([np.inf]), np.array([-np.inf]), np.array([0.0])]
    arrays.append(np.array([-0.0]))
    assert len({content(a) for a in arrays}) == 5


def test_equal_arrays_with_different_dtypes_differ() -> None:
    base = np.arange(6)
    assert content(base.astype(np.int64)) != content(base.astype(np.int32))
    assert content(base.astype(np.float64)) != content(base.astype(np.int64))
    assert content(base.astype("<f8")) != content(base.astype(">f8"))


def test_array_shape_matters_and_layout_does_not() -> None:
    base = np.arange(12, dtype=np.float64)
    assert content(base.reshape(3, 4)) != content(base.reshape(4, 3))
    grid = np.arange(24.0).reshape(4, 6)
    strided = grid[:, ::2]
    assert not strided.flags.c_contiguous
    assert content(strided) == content(np.ascontiguousarray(strided))
    assert content(np.asfortranarray(grid)) == content(grid)


def test_arrays_hash_by_value() -> None:
    first = np.random.default_rng(0).standard_normal(1000)
    second = first.copy()
    assert content(first) == content(second)
    second[500] += 1e-9
    assert content(first) != content(second)


def test_array_differs_from_the_equal_list() -> None:
    assert content(np.array([1.0, 2.0])) != content([1.0, 2.0])


def test_object_arrays_hash_their_elements() -> None:
    first = np.array([{"a": 1}, "x", None], dtype=object)
    assert content(first) == content(np.array([{"a": 1}, "x", None], dtype=object))
    assert content(first) != content(np.array([{"a": 2}, "x", None], dtype=object))


def test_datetime_and_structured_arrays_hash() -> None:
    dates = np.array(["2024-01-01", "2024-01-02"], dtype="datetime64[ns]")
    assert content(dates) != content(dates + np.timedelta64(1, "ns"))
    pairs = np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")])
    renamed = np.array([(1, 2.0)], dtype=[("x", "i4"), ("b", "f8")])
    assert content(pairs) != content(renamed)


def test_numpy_scalars_keep_their_dtype() -> None:
    assert content(np.float64(1.0)) != content(1.0)
    assert content(np.float64(1.0)) != content(np.float32(1.0))
    assert content(np.float64(1.0)) == content(np.float64(1.0))
    assert content(np.int64(3)) != content(np.int64(4))


# --- torch ----------------------------------------------------------------------------------


def test_tensors_hash_by_dtype_shape_grad_and_value() -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.arange(6, dtype=torch.float32)
    assert content(tensor) == content(tensor.clone())
    assert content(tensor) != content(tensor.to(torch.float64))
    assert content(tensor) != content(tensor.reshape(2, 3))
    assert content(tensor) != content(tensor.clone().requires_grad_(True))
    assert content(tensor) != content(tensor.numpy())
    changed = tensor.clone()
    changed[3] = 100.0
    assert content(tensor) != content(changed)


def test_bfloat16_and_non_contiguous_tensors_hash() -> None:
    torch = pytest.importorskip("torch")
    half = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    assert content(half) != content(torch.tensor([1.0, 2.0, 4.0], dtype=torch.bfloat16))
    grid = torch.arange(12.0).reshape(3, 4)
    assert content(grid.t()) == content(grid.t().contiguous())
    assert content(torch.tensor([True, False])) != content(torch.tensor([False, True]))


# --- pandas ---------------------------------------------------------------------------------


def test_dataframes_hash_labels_dtypes_and_values() -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": [1, 2, 3], "b": [0.5, 1.5, 2.5]})
    assert content(frame) == content(frame.copy())
    assert content(frame) != content(frame.rename(columns={"a": "z"}))
    assert content(frame) != content(frame.set_axis([10, 11, 12]))
    assert content(frame) != content(frame.astype({"a": "int32"}))
    changed = frame.copy()
    changed.loc[1, "b"] = 9.0
    assert content(frame) != content(changed)


def test_series_and_index_hash() -> None:
    pd = pytest.importorskip("pandas")
    series = pd.Series([1.0, 2.0], name="x")
    assert content(series) == content(series.copy())
    assert content(series) != content(series.rename("y"))
    assert content(series) != content(series.to_frame())
    assert content(pd.Index([1, 2])) != content(pd.Index([1, 3]))


def test_frames_with_unhashable_cells_still_hash() -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": [[1], [2]]})
    assert content(frame) == content(frame.copy())
    assert content(frame) != content(pd.DataFrame({"a": [[1], [3]]}))


# --- functions, objects, hooks --------------------------------------------------------------


def make_adder(amount: int) -> Callable[[int], int]:
    return lambda x: x + amount


def test_functions_hash_code_defaults_and_closures() -> None:
    def scale(x: float, factor: float = 2.0) -> float:
        return x * factor

    def scale_again(x: float, factor: float = 2.0) -> float:
        return x * factor

    assert content(make_adder(1)) == content(make_adder(1))
    assert content(make_adder(1)) != content(make_adder(2))
    assert content(scale) != content(scale_again)  # different qualnames
    first = lambda x: x + 1  # noqa: E731
    second = lambda x: x + 2  # noqa: E731
    assert content(first) != content(second)
    with_default = lambda x, k=1: x + k  # noqa: E731
    other_default = lambda x, k=2: x + k  # noqa: E731
    assert content(with_default) != content(other_default)


class _Point:
    def __init__(self, x: object, y: object) -> None:
        self.x = x
        self.y = y


class _Hooked:
    def __init__(self, token: object) -> None:
        self.token = token

    def __soma_hash__(self) -> object:
        return self.token


def test_plain_objects_hash_through_pickle() -> None:
    assert content(_Point(1, 2)) == content(_Point(1, 2))
    assert content(_Point(1, 2)) != content(_Point(1, 3))


def test_objects_holding_lambdas_fall_back_to_cloudpickle() -> None:
    holder = _Point(lambda v: v, 2)
    assert content(holder) == content(holder)


def test_unpicklable_objects_are_unhashable() -> None:
    with pytest.raises(Unhashable, match="_Point"):
        content(_Point(threading.Lock(), 1))


def test_soma_hash_hook_is_used() -> None:
    assert content(_Hooked(b"abc")) == content(_Hooked("abc"))
    assert content(_Hooked(b"abc")) != content(_Hooked(b"abd"))
    # The hook replaces pickling, so unpicklable state does not matter.
    locked = _Hooked(b"k")
    locked.lock = threading.Lock()  # type: ignore[attr-defined]
    assert content(locked) == content(_Hooked(b"k"))
    with pytest.raises(Unhashable, match="must return bytes or str"):
        content(_Hooked(42))


def test_a_failing_soma_hash_hook_makes_the_value_unhashable() -> None:
    class Broken:
        def __soma_hash__(self) -> bytes:
            raise ValueError("no digest today")

    with pytest.raises(Unhashable, match="ValueError: no digest today") as info:
        content({"param": Broken()})
    assert isinstance(info.value.__cause__, ValueError)


def test_classes_hash_by_name() -> None:
    assert content(_Point) == content(_Point)
    assert content(_Point) != content(_Hooked)


def test_nested_filters_hash_identity_and_params(make_module: MakeModule) -> None:
    filter_base = standin_filter_base()
    name = unique("nested_filters")
    module = make_module(name, "class Scale:\n    def forward(self, x, state):\n        return x\n")
    scale_cls = type("Scale", (module.Scale, filter_base), {"__module__": name})
    other_cls = type("Other", (module.Scale, filter_base), {"__module__": name})

    def make(cls: type, **params: Any) -> Any:
        obj = cls()
        obj.__dict__.update(params)
        return obj

    assert content({"inner": make(scale_cls, k=1)}) == content({"inner": make(scale_cls, k=1)})
    assert content(make(scale_cls, k=1)) != content(make(scale_cls, k=2))
    assert content(make(scale_cls, k=1)) != content(make(other_cls, k=1))
    versioned = make(scale_cls, k=1, _version=2)
    assert content(versioned) != content(make(scale_cls, k=1))
    assert content(make(scale_cls, k=1, _cache=[1])) == content(make(scale_cls, k=1))


# --- process independence -------------------------------------------------------------------

_PROBE_MODULE = """
import numpy as np

class Thing:
    def __init__(self, n):
        self.n = n

def scale(x, k=3):
    return x * k

VALUES = [
    {"beta", "alpha", "gamma", "delta"},
    frozenset({"x", "y", "z"}),
    {"k2": [1, 2.5, None], "k1": ("a", b"b")},
    np.arange(10, dtype=np.float32).reshape(2, 5),
    [0.1 * i for i in range(100)],
    float("nan"),
    Thing(4),
    scale,
    Thing,
]
"""


def test_content_is_identical_across_processes(make_module: MakeModule, tmp_path: Path) -> None:
    name = unique("probe")
    module = make_module(name, _PROBE_MODULE)
    local = [content(v).hex() for v in module.VALUES]
    script = (
        "import json, sys; from soma.runtime.hashing import content; "
        f"import {name} as m; print(json.dumps([content(v).hex() for v in m.VALUES]))"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == local


# --- cache keys -----------------------------------------------------------------------------


def test_cache_key_follows_the_length_prefixed_layout() -> None:
    expected = hashlib.sha256(b"soma-cache-v1")
    for part in (b"state", b"\x00\x01", "é".encode()):
        expected.update(len(part).to_bytes(8, "little") + part)
    assert cache_key("state", b"\x00\x01", "é") == expected.hexdigest()


def test_cache_key_parts_do_not_run_together() -> None:
    assert cache_key("ab", "c") != cache_key("a", "bc")
    assert cache_key("a", "") != cache_key("a")
    assert cache_key("abc") == cache_key(b"abc")


def test_cache_key_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="bytes or str"):
        cache_key("a", 3)  # type: ignore[arg-type]


def _fit(**overrides: Any) -> str:
    parts: dict[str, Any] = {
        "identity": b"id",
        "params": content({}),
        "in_key": content([1.0]),
        "y": content(None),
        "seed": None,
        "batch_size": None,
    }
    parts.update(overrides)
    return fit_key(**parts)


def test_seeds_none_zero_and_one_give_three_keys() -> None:
    assert len({_fit(seed=None), _fit(seed=0), _fit(seed=1)}) == 3
    outs = {out_key(b"id", content({}), "stateless", "in", seed) for seed in (None, 0, 1)}
    assert len(outs) == 3


def test_fit_key_covers_every_part() -> None:
    base = _fit()
    assert len(base) == 64
    assert base == _fit()
    assert _fit(y=content([1])) != base
    assert _fit(batch_size=8) != base
    assert _fit(batch_size=8) != _fit(batch_size=9)
    assert _fit(params=content({"k": 1})) != base
    assert _fit(in_key="0" * 64) != base
    assert _fit(identity=b"other") != base


def test_state_and_output_keys_never_collide() -> None:
    params = content({})
    assert fit_key(b"id", params, "in", content(None), None, None) != out_key(
        b"id", params, "stateless", "in", None
    )
    assert out_key(b"id", params, "s1", "in", None) != out_key(b"id", params, "s2", "in", None)


def test_fanin_key_depends_on_ids_refs_and_order() -> None:
    pairs: list[tuple[str, bytes | str]] = [("a", "ref-a"), ("b", b"ref-b")]
    assert fanin_key(pairs) == fanin_key(list(pairs))
    assert fanin_key(pairs) != fanin_key(list(reversed(pairs)))
    assert fanin_key(pairs) != fanin_key([("x", "ref-a"), ("b", b"ref-b")])
    assert fanin_key(pairs) != fanin_key([("a", "ref-a"), ("b", b"ref-c")])


@pytest.mark.parametrize("seed", [1.5, "1", True])
def test_bad_seed_is_rejected(seed: Any) -> None:
    with pytest.raises(SomaConfigError, match="seed"):
        _fit(seed=seed)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_bad_batch_size_is_rejected(batch_size: Any) -> None:
    with pytest.raises(SomaConfigError, match="batch_size"):
        _fit(batch_size=batch_size)


# --- code fingerprints and filter identity --------------------------------------------------

_SCALER = """
class Base:
    def fit(self, x, y=None):
        return {"mean": sum(x) / len(x)}


class Scaler(Base):
    _version = None

    def forward(self, x, state):
        return [v - state["mean"] for v in x]
"""

_SCALER_REFORMATTED = """
# A comment that changes nothing.
class Base:

    def fit(self, x, y=None):   # trailing comment
        return {"mean": sum(x) / len(x)}



class Scaler(Base):
    _version = None
    # another comment

    def forward(self, x, state):

        return [v - state["mean"]
                for v in x]
"""


def test_fingerprint_ignores_comments_and_blank_lines(make_module: MakeModule) -> None:
    first = make_module(unique("fp_a"), _SCALER)
    second = make_module(unique("fp_b"), _SCALER_REFORMATTED)
    assert code_fingerprint(first.Scaler) != code_fingerprint(first.Base)
    # Same code under another module name: the per-class parts name the module.
    assert code_fingerprint(first.Scaler) != code_fingerprint(second.Scaler)
    name = unique("fp_same")
    before = code_fingerprint(make_module(name, _SCALER).Scaler)
    after = code_fingerprint(make_module(name, _SCALER_REFORMATTED).Scaler)
    assert before == after


def test_fingerprint_changes_with_any_class_body_in_the_mro(make_module: MakeModule) -> None:
    name = unique("fp_body")
    original = code_fingerprint(make_module(name, _SCALER).Scaler)
    forward_changed = _SCALER.replace("v - state", "v + state")
    assert code_fingerprint(make_module(name, forward_changed).Scaler) != original
    base_changed = _SCALER.replace("sum(x) / len(x)", "sum(x) / 2")
    assert code_fingerprint(make_module(name, base_changed).Scaler) != original
    assert code_fingerprint(make_module(name, _SCALER).Scaler) == original


def test_fingerprint_is_memoised_per_class(make_module: MakeModule) -> None:
    name = unique("fp_memo")
    module = make_module(name, _SCALER)
    scaler = module.Scaler
    before = code_fingerprint(scaler)
    make_module(name, _SCALER.replace("v - state", "v * state"))
    assert code_fingerprint(scaler) == before


def test_library_classes_contribute_nothing() -> None:
    assert code_fingerprint(object) == code_fingerprint(dict)
    assert code_fingerprint(threading.Thread) == code_fingerprint(object)


def test_fingerprint_without_source_uses_code_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module whose file does not contain the class: inspect cannot find its source.
    empty = tmp_path / "generated.py"
    empty.write_text("")
    name = unique("generated")

    def fingerprint_of(body: str) -> str:
        module = types.ModuleType(name)
        module.__file__ = str(empty)
        monkeypatch.setitem(sys.modules, name, module)
        exec(compile(body, "<generated>", "exec"), module.__dict__)
        return code_fingerprint(module.Generated)

    code = "class Generated:\n    def forward(self, x, state):\n        return x * 2\n"
    commented = code.replace("\n    def", "\n    # note\n\n    def")
    changed = code.replace("x * 2", "x * 3")
    assert commented != code
    assert fingerprint_of(code) == fingerprint_of(commented)
    assert fingerprint_of(code) != fingerprint_of(changed)
    assert fingerprint_of(code) != code_fingerprint(object)


def test_identity_covers_class_code_version_and_requirements(make_module: MakeModule) -> None:
    name = unique("identity")
    scaler = make_module(name, _SCALER).Scaler()
    identity = filter_identity(scaler, None, ())
    assert filter_identity(scaler, None, ()) == identity
    assert filter_identity(scaler, 2, ()) != identity
    assert filter_identity(scaler, "2", ()) != filter_identity(scaler, 2, ())
    with_reqs = filter_identity(scaler, None, ("numpy>=1", "scipy"))
    assert with_reqs != identity
    assert filter_identity(scaler, None, ("scipy", "numpy>=1")) == with_reqs
    base = make_module(name, _SCALER).Base()
    assert filter_identity(base, None, ()) != identity


def test_identity_survives_reformatting_but_not_code_changes(make_module: MakeModule) -> None:
    name = unique("identity_reload")
    original = filter_identity(make_module(name, _SCALER).Scaler(), None, ())
    reformatted = filter_identity(make_module(name, _SCALER_REFORMATTED).Scaler(), None, ())
    assert reformatted == original
    changed = make_module(name, _SCALER.replace("v - state", "v + state")).Scaler()
    assert filter_identity(changed, None, ()) != original
    bumped = make_module(name, _SCALER.replace("_version = None", "_version = 2")).Scaler()
    assert filter_identity(bumped, bumped._version, ()) != original
