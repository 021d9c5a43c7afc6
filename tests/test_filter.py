"""Filter: parameters, metadata, search defaults and spaces, duck typing, node ids, pickling."""

from __future__ import annotations

import abc
import dataclasses
import json
import pickle
import subprocess
import sys
import textwrap
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
import pytest

from soma import Filter, SomaConfigError, search
from soma.filter import (
    FilterMeta,
    NodeMeta,
    check_filter,
    default_node_id,
    params_of,
    read_meta,
)


class Doubler(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return 2 * x


class Adder(Filter):
    unit = "class attributes are not parameters"
    amount: int

    def forward(self, x: Any, state: Any) -> Any:
        return x + self.amount


class Tuned(Filter):
    lr = search(1e-3, 1e-1, scale="log", default=1e-2)
    depth = search.int(1, 8)

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"mean": sum(x) / len(x)}

    def forward(self, x: Any, state: Any) -> Any:
        return [v - state["mean"] for v in x]


# Parameters and construction


def test_keywords_become_parameters_and_internals_and_class_attributes_do_not() -> None:
    adder = Adder(amount=5)
    adder._cache = "internal"  # type: ignore[attr-defined]
    assert adder.get_params() == {"amount": 5}
    assert adder.forward(1, None) == 6


def test_parameters_keep_keyword_order_are_read_live_and_returned_as_a_copy() -> None:
    adder = Adder(b=1, a=2)
    adder.set_params(c=3)
    params = adder.get_params()
    assert list(params) == ["b", "a", "c"]
    params["a"] = 99
    assert adder.get_params()["a"] == 2


def test_set_params_sets_and_returns_the_filter() -> None:
    adder = Adder(amount=1)
    assert adder.set_params(amount=7, scale=2) is adder
    assert adder.get_params() == {"amount": 7, "scale": 2}


def test_set_params_with_an_internal_name_raises_and_changes_nothing() -> None:
    adder = Adder(amount=1)
    with pytest.raises(SomaConfigError, match="'_secret' is not a parameter"):
        adder.set_params(amount=2, _secret=1)
    assert adder.get_params() == {"amount": 1}
    assert "_secret" not in vars(adder)


def test_repr_lists_the_parameters() -> None:
    assert repr(Doubler()) == "Doubler()"
    assert repr(Adder(amount=5)) == "Adder(amount=5)"
    assert repr(Adder(name="x", k=[1])) == "Adder(name='x', k=[1])"


def test_default_fit_and_forward_are_empty_state_and_identity() -> None:
    x = object()
    assert Filter().fit(x) == {}
    assert Filter().forward(x, None) is x


def test_init_is_cooperative_with_other_bases() -> None:
    class Base:
        def __init__(self) -> None:
            super().__init__()
            self.from_base = True
            self._ready = True

    class Both(Filter, Base):
        pass

    both = Both(amount=3)
    assert both.get_params() == {"from_base": True, "amount": 3}
    assert both._ready


def test_a_filter_can_also_derive_from_an_abc() -> None:
    assert FilterMeta is type

    class Interface(abc.ABC):
        @abc.abstractmethod
        def describe(self) -> str: ...

    class Described(Filter, Interface):
        def describe(self) -> str:
            return "ok"

    class Incomplete(Filter, Interface):
        pass

    assert Described(a=1).describe() == "ok"
    with pytest.raises(TypeError):
        Incomplete()  # type: ignore[abstract]


# Metadata


def test_unknown_kind_raises_when_the_class_is_created() -> None:
    expected = "^invalid _kind 'bogus': use 'stateless' or 'trainable'$"
    with pytest.raises(SomaConfigError, match=expected) as info:

        class Bogus(Filter):
            _kind = "bogus"

    assert isinstance(info.value, ValueError)


def test_unknown_stream_mode_raises_when_the_class_is_created() -> None:
    expected = "^invalid _stream_mode 'sideways': use 'fixed', 'evolving' or 'barrier'$"
    with pytest.raises(SomaConfigError, match=expected):

        class Sideways(Filter):
            _stream_mode = "sideways"


def test_kind_is_case_insensitive_and_fixed_state_is_an_alias_of_fixed() -> None:
    class Loud(Filter):
        _kind = "Stateless"
        _stream_mode = "fixed_state"

    meta = read_meta(Loud())
    assert (meta.kind, meta.stream_mode) == ("stateless", "fixed")


def test_metadata_defaults() -> None:
    class Duck:
        def forward(self, x: Any, state: Any) -> Any:
            return x

    expected = NodeMeta(
        kind="trainable",
        differentiable=False,
        cacheable=True,
        stream_mode="fixed",
        target=None,
        requirements=(),
        resources=None,
        version=None,
    )
    assert read_meta(Duck()) == expected
    assert read_meta(Filter()) == expected


def test_instance_metadata_overrides_the_class_and_is_not_a_parameter() -> None:
    class Switchable(Filter):
        def __init__(self, stateless: bool) -> None:
            super().__init__()
            if stateless:
                self._kind = "stateless"

    assert read_meta(Switchable(stateless=True)).kind == "stateless"
    assert read_meta(Switchable(stateless=False)).kind == "trainable"
    assert Switchable(stateless=True).get_params() == {}


def test_a_kind_property_is_resolved_on_the_instance() -> None:
    class Dynamic(Filter):
        @property
        def _kind(self) -> str:  # type: ignore[override]
            return "stateless"

    assert read_meta(Dynamic()).kind == "stateless"


def test_declared_metadata_is_read_as_declared() -> None:
    class Declared(Filter):
        _differentiable = True
        _cacheable = False
        _stream_mode = "evolving"
        _target = "tag:gpu"
        _requirements = ["numpy>=1.24", "scipy"]
        _resources = {"cpus": 2, "gpus": 1, "memory": "8G"}
        _version = 3

    assert read_meta(Declared()) == NodeMeta(
        kind="trainable",
        differentiable=True,
        cacheable=False,
        stream_mode="evolving",
        target="tag:gpu",
        requirements=("numpy>=1.24", "scipy"),
        resources={"cpus": 2, "gpus": 1, "memory": "8G"},
        version=3,
    )


def test_node_metadata_is_frozen_and_later_changes_to_the_filter_do_not_reach_it() -> None:
    resources = {"cpus": 1}
    duck = Filter()
    duck._resources = resources
    meta = read_meta(duck)
    resources["cpus"] = 64
    duck._kind = "stateless"
    assert meta.resources == {"cpus": 1}
    assert meta.kind == "trainable"
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.kind = "stateless"  # type: ignore[misc]


@pytest.mark.parametrize("memory", [1048576, "8G", "8g", "8GB", "8GiB", "1.5G", "512M", "1T", "1048576"])
def test_memory_accepts_bytes_or_a_size_string_and_keeps_it_as_given(memory: int | str) -> None:
    duck = Filter()
    duck._resources = {"memory": memory}
    assert read_meta(duck).resources == {"memory": memory}


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("_kind", 3, "invalid _kind '3': use 'stateless' or 'trainable'"),
        ("_stream_mode", None, "invalid _stream_mode 'None'"),
        ("_differentiable", 1, "invalid _differentiable 1: use True or False"),
        ("_cacheable", "no", "invalid _cacheable 'no': use True or False"),
        ("_target", 5, "invalid _target 5"),
        ("_requirements", "numpy", "invalid _requirements 'numpy'"),
        ("_requirements", ["numpy", 3], "invalid _requirements entry 3"),
        ("_requirements", 7, "invalid _requirements 7"),
        ("_resources", ["cpus", 2], "invalid _resources ['cpus', 2]"),
        ("_resources", {"cpu": 2}, "invalid _resources key 'cpu'"),
        ("_resources", {"cpus": 0}, "invalid _resources cpus 0"),
        ("_resources", {"cpus": True}, "invalid _resources cpus True"),
        ("_resources", {"cpus": 1.5}, "invalid _resources cpus 1.5"),
        ("_resources", {"gpus": -1}, "invalid _resources gpus -1"),
        ("_resources", {"memory": "lots"}, "invalid _resources memory 'lots'"),
        ("_resources", {"memory": 0}, "invalid _resources memory 0"),
        ("_resources", {"memory": "0G"}, "invalid _resources memory '0G'"),
    ],
)
def test_invalid_metadata_raises_a_config_error_naming_the_attribute(
    attribute: str, value: Any, message: str
) -> None:
    duck = Filter()
    setattr(duck, attribute, value)
    with pytest.raises(SomaConfigError) as info:
        read_meta(duck)
    assert message in str(info.value)


# Duck typing and parameters of any object


def test_check_filter_accepts_filters_and_duck_typed_objects() -> None:
    class Trainable:
        def fit(self, x: Any, y: Any = None) -> Any:
            return None

        def forward(self, x: Any, state: Any) -> Any:
            return x

    class Stateless:
        _kind = "STATELESS"

        def forward(self, x: Any, state: Any) -> Any:
            return x

    for obj in (Doubler(), Filter(), Trainable(), Stateless()):
        check_filter(obj)


@pytest.mark.parametrize("case", ["no forward", "forward not callable", "trainable without fit", "int"])
def test_check_filter_rejects_objects_without_the_filter_methods(case: str) -> None:
    class NoForward:
        def fit(self, x: Any, y: Any = None) -> Any:
            return None

    class ForwardNotCallable:
        forward = 3
        _kind = "stateless"

    class NoFit:
        def forward(self, x: Any, state: Any) -> Any:
            return x

    obj = {
        "no forward": NoForward(),
        "forward not callable": ForwardNotCallable(),
        "trainable without fit": NoFit(),
        "int": 3,
    }[case]
    expected = f"node() expects a filter with a forward(x, state) method, got {type(obj).__name__}"
    with pytest.raises(TypeError) as info:
        check_filter(obj)
    assert str(info.value) == expected


def test_check_filter_rejects_a_filter_class_and_says_to_instantiate_it() -> None:
    with pytest.raises(TypeError, match=r"got the class Doubler; create one first, e\.g\. Doubler\(\)"):
        check_filter(Doubler)


def test_params_of_reads_public_instance_attributes_of_any_object() -> None:
    class Duck:
        scale = 10

        def __init__(self) -> None:
            self.alpha = 1
            self._hidden = 2

    class Slotted:
        __slots__ = ("alpha",)

        def __init__(self) -> None:
            self.alpha = 1

    assert params_of(Duck()) == {"alpha": 1}
    assert params_of(Slotted()) == {}
    assert params_of(3) == {}


@pytest.mark.parametrize(
    ("class_name", "node_id"),
    [
        ("Doubler", "doubler"),
        ("StandardScaler", "standard_scaler"),
        ("CamelCaseHTTPFilter", "camel_case_h_t_t_p_filter"),
        ("MLP", "m_l_p"),
        ("A", "a"),
        ("lowerStart", "lower_start"),
    ],
)
def test_default_node_id_inserts_underscores_before_upper_case_letters(
    class_name: str, node_id: str
) -> None:
    assert default_node_id(class_name) == node_id


# Search defaults and spaces


def test_search_defaults_land_in_the_parameters() -> None:
    assert Tuned().get_params() == {"lr": 1e-2, "depth": None}
    assert Tuned(lr=0.05).get_params() == {"lr": 0.05, "depth": None}
    assert Tuned().get_params() != Tuned(lr=0.05).get_params()
    assert Tuned(depth=4).depth == 4


def test_search_defaults_do_not_overwrite_values_set_by_a_cooperative_base() -> None:
    class Preset:
        def __init__(self) -> None:
            super().__init__()
            self.lr = 0.07

    class Both(Tuned, Preset):
        pass

    assert Both().lr == 0.07


def test_filter_has_an_empty_search_space_and_subclasses_list_their_dimensions() -> None:
    assert Filter._soma_search_space == []
    assert Filter.search_space() == []
    assert Tuned._soma_search_space == [
        {"type": "float", "name": "lr", "low": 1e-3, "high": 1e-1, "scale": "log", "default": 1e-2},
        {"type": "int", "name": "depth", "low": 1, "high": 8, "scale": "linear"},
    ]


def test_search_space_returns_a_deep_copy() -> None:
    space = Tuned.search_space()
    space[0]["low"] = -1
    space.append({})
    assert Tuned._soma_search_space[0]["low"] == 1e-3
    assert len(Tuned.search_space()) == 2


def test_subclasses_inherit_replace_in_place_and_pin_dimensions() -> None:
    class Child(Tuned):
        width = search(choices=[16, 32])

    class Redefined(Child):
        lr = search(0.1, 0.9)

    class Pinned(Child):
        lr = 0.3

    assert [d["name"] for d in Child._soma_search_space] == ["lr", "depth", "width"]
    assert Redefined._soma_search_space[0] == {
        "type": "float", "name": "lr", "low": 0.1, "high": 0.9, "scale": "linear"
    }
    assert [d["name"] for d in Redefined._soma_search_space] == ["lr", "depth", "width"]
    assert [d["name"] for d in Pinned._soma_search_space] == ["depth", "width"]
    pinned = Pinned()
    assert pinned.lr == 0.3
    assert "lr" not in pinned.get_params()


def test_search_space_collects_dimensions_of_mixins() -> None:
    class Regularised:
        l2 = search(0.0, 1.0, default=0.1)

    class Model(Tuned, Regularised):
        pass

    assert [d["name"] for d in Model._soma_search_space] == ["l2", "lr", "depth"]
    assert Model().get_params() == {"l2": 0.1, "lr": 1e-2, "depth": None}


# Pickling


def test_pickles_by_reference_round_trip() -> None:
    tuned = Tuned(lr=0.02, extra=[1, 2])
    for dumps in (pickle.dumps, cloudpickle.dumps):
        clone = pickle.loads(dumps(tuned))
        assert type(clone) is Tuned
        assert clone.get_params() == tuned.get_params()


def test_filter_and_filter_meta_resolve_by_their_0_2_43_pickle_paths() -> None:
    assert pickle.loads(b"csoma.filter\nFilter\n.") is Filter
    assert pickle.loads(b"csoma.filter\nFilterMeta\n.") is type


def _filter_defined_in_a_function() -> Filter:
    class Scaled(Filter):
        _kind = "stateless"
        factor = search(1, 10, default=3)
        offset = search(0.0, 1.0)

        def forward(self, x: Any, state: Any) -> Any:
            return x * self.factor + (self.offset or 0)

    return Scaled(offset=0.5, label="s")


def test_pickles_by_value_rebuild_the_class_in_a_fresh_interpreter_without_numpy() -> None:
    payload = cloudpickle.dumps(_filter_defined_in_a_function())
    script = textwrap.dedent(
        """
        import json, pickle, sys
        obj = pickle.loads(sys.stdin.buffer.read())
        from soma.filter import Filter, read_meta
        print(json.dumps({
            "is_filter": isinstance(obj, Filter),
            "params": obj.get_params(),
            "space": type(obj).search_space(),
            "output": obj.forward(2, None),
            "kind": read_meta(obj).kind,
            "repr": repr(obj),
            "numpy": "numpy" in sys.modules,
        }))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=payload, capture_output=True, timeout=60, check=True
    )
    result = json.loads(done.stdout)
    assert result == {
        "is_filter": True,
        "params": {"factor": 3, "offset": 0.5, "label": "s"},
        "space": [
            {"type": "int", "name": "factor", "low": 1, "high": 10, "scale": "linear", "default": 3},
            {"type": "float", "name": "offset", "low": 0.0, "high": 1.0, "scale": "linear"},
        ],
        "output": 6.5,
        "kind": "stateless",
        "repr": "Scaled(factor=3, offset=0.5, label='s')",
        "numpy": False,
    }


def test_the_user_facing_modules_import_only_the_standard_library() -> None:
    script = textwrap.dedent(
        """
        import sys
        before = set(sys.modules)
        import soma, soma.filter, soma.search, soma.chain
        new = {name.split(".")[0] for name in set(sys.modules) - before}
        print(sorted(new - set(sys.stdlib_module_names) - {"soma"}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
