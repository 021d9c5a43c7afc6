"""Search descriptors: type inference, dimension dicts, validation, descriptor protocol, pickle paths."""

from __future__ import annotations

import copy
import importlib
import math
import pickle
import sys
from typing import Any

import pytest

import soma
from soma import Filter, SomaConfigError, search
from soma.search import SearchDescriptor


def test_search_infers_int_float_categorical_and_bool() -> None:
    assert search(1, 10).to_dict() == {
        "type": "int", "name": None, "low": 1, "high": 10, "scale": "linear"
    }
    assert search(1e-3, 1e-1, scale="log").to_dict() == {
        "type": "float", "name": None, "low": 1e-3, "high": 1e-1, "scale": "log"
    }
    assert search(choices=["a", "b"]).to_dict() == {
        "type": "categorical", "name": None, "choices": ["a", "b"]
    }
    assert search().to_dict() == {"type": "categorical", "name": None, "choices": [True, False]}


def test_mixed_int_and_float_bounds_give_a_float_dimension_with_float_bounds() -> None:
    dim = search(1, 10.0).to_dict()
    assert dim["type"] == "float"
    assert isinstance(dim["low"], float) and dim["low"] == 1.0


def test_type_keyword_forces_the_dimension_type() -> None:
    dim = search(1, 10, type="float").to_dict()
    assert dim["type"] == "float" and isinstance(dim["low"], float)
    assert search(type="categorical").to_dict()["choices"] == [True, False]
    assert search(1, 4, type="int", step=3).to_dict()["step"] == 3


def test_dimension_dict_has_step_only_when_not_one_and_default_only_when_given() -> None:
    assert "step" not in search(1, 10, step=1).to_dict()
    assert search(0, 100, step=5).to_dict()["step"] == 5
    assert "default" not in search(1, 10).to_dict()
    assert search(1, 10, default=3).to_dict()["default"] == 3
    assert search(0.0, 1.0, default=0.5).to_dict()["default"] == 0.5
    assert search(choices=["x", "y"], default="y").to_dict()["default"] == "y"


def test_typed_helpers_build_the_matching_dimensions() -> None:
    assert search.int(1, 64, log=True, step=1, default=8).to_dict() == {
        "type": "int", "name": None, "low": 1, "high": 64, "scale": "log", "default": 8
    }
    assert search.float(0, 1, default=0.25).to_dict() == {
        "type": "float", "name": None, "low": 0.0, "high": 1.0, "scale": "linear", "default": 0.25
    }
    assert search.float(1e-4, 1.0, log=True).to_dict()["scale"] == "log"
    assert search.categorical(("relu", "tanh"), default="tanh").to_dict() == {
        "type": "categorical", "name": None, "choices": ["relu", "tanh"], "default": "tanh"
    }
    assert search.bool(default=False).to_dict() == {
        "type": "categorical", "name": None, "choices": [True, False], "default": False
    }


def test_the_name_comes_from_the_class_attribute() -> None:
    class Model(Filter):
        lr = search(1e-3, 1e-1, scale="log", default=1e-2)

    assert Model.lr.name == "lr"
    assert Model.lr.to_dict()["name"] == "lr"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"low": 1}, "give both low and high, got only low"),
        ({"high": 1}, "give both low and high, got only high"),
        ({"low": 5, "high": 1}, "low (5) is greater than high (1)"),
        ({"low": 0.5, "high": 0.1}, "low (0.5) is greater than high (0.1)"),
        ({"low": 1, "high": 2, "scale": "cubic"}, "scale must be 'linear', 'log' or 'reverse_log'"),
        ({"low": 0, "high": 1, "scale": "log"}, "a log scale needs low > 0"),
        ({"low": -1.0, "high": 1.0, "scale": "reverse_log"}, "a reverse_log scale needs low > 0"),
        ({"choices": []}, "choices must not be empty"),
        ({"choices": "abc"}, "choices must be a list or tuple"),
        ({"choices": [1, [2]]}, "choice [2] is not None, a bool, an int, a float or a str"),
        ({"choices": [object]}, "is not None, a bool, an int, a float or a str"),
        ({"low": 1, "high": 10, "default": 11}, "default 11 is outside [1, 10]"),
        ({"low": 0.0, "high": 1.0, "default": -0.5}, "default -0.5 is outside [0.0, 1.0]"),
        ({"choices": ["a", "b"], "default": "c"}, "default 'c' is not one of the choices"),
        ({"choices": [1, 2], "default": True}, "default True is not one of the choices"),
        ({"low": 1, "high": 10, "default": 2.5}, "default of an int dimension must be an int"),
        ({"low": 1, "high": 10, "default": True}, "default of an int dimension must be an int"),
        ({"low": 0.0, "high": 1.0, "default": "0.5"}, "default of a float dimension must be a number"),
        ({"low": 1, "high": 10, "step": 0.5}, "step of an int dimension must be an int >= 1"),
        ({"low": 1, "high": 10, "step": 0}, "step of an int dimension must be an int >= 1"),
        ({"low": 0.0, "high": 1.0, "step": 1}, "step applies only to int dimensions"),
        ({"choices": ["a"], "step": 1}, "step applies only to int dimensions"),
        ({"low": 0.5, "high": 2.0, "type": "int"}, "an int dimension needs int low and high"),
        ({"low": "a", "high": "b"}, "low and high must be numbers"),
        ({"low": 0.0, "high": math.nan}, "low and high must be finite"),
        ({"low": 1, "high": 2, "choices": [1, 2]}, "takes choices, not low/high"),
        ({"choices": [1, 2], "type": "float"}, "choices apply only to categorical dimensions"),
        ({"type": "int"}, "type='int' needs low and high"),
        ({"low": 1, "high": 2, "type": "integer"}, "type must be 'int', 'float' or 'categorical'"),
    ],
)
def test_invalid_declarations_raise_config_errors_when_the_class_is_created(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(SomaConfigError, match=r"^search\(\): ") as info:

        class Model(Filter):
            dim = search(**kwargs)

    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bool_default_matches_bool_choice_but_not_an_equal_int() -> None:
    assert search(choices=[0, True], default=True).default is True
    assert search(choices=[1.0, 2.0], default=1).default == 1


def test_descriptor_protocol_reads_instance_value_then_default_and_writes_the_instance_dict() -> None:
    class Model(Filter):
        lr = search(0.0, 1.0, default=0.5)

        def __init__(self) -> None:  # deliberately skips Filter.__init__ (no default stored)
            pass

    model = Model()
    assert isinstance(Model.lr, SearchDescriptor)
    assert "lr" not in model.__dict__
    assert model.lr == 0.5
    model.lr = 0.75
    assert model.__dict__["lr"] == 0.75
    assert model.lr == 0.75
    assert Model.lr.default == 0.5


def test_descriptor_round_trips_through_pickle_and_deepcopy() -> None:
    class Model(Filter):
        depth = search.int(2, 8, step=2, default=4)

    for clone in (pickle.loads(pickle.dumps(Model.depth)), copy.deepcopy(Model.depth)):
        assert isinstance(clone, SearchDescriptor)
        assert clone.to_dict() == Model.depth.to_dict()


def test_package_attribute_search_is_the_function_and_the_submodule_stays_importable() -> None:
    module = importlib.import_module("soma.search")
    assert callable(soma.search) and not isinstance(soma.search, type(sys))
    assert module.search is soma.search
    assert sys.modules["soma.search"] is module
    assert module.SearchDescriptor is SearchDescriptor


def test_search_function_and_descriptor_class_pickle_by_their_module_paths() -> None:
    assert pickle.loads(pickle.dumps(search)) is search
    assert b"soma.search" in pickle.dumps(search, protocol=2)
    assert pickle.loads(b"csoma.search\nSearchDescriptor\n.") is SearchDescriptor
    assert pickle.loads(b"csoma.search\nsearch\n.") is search
