"""Filter pickles reuse the pickle of a by-value class only while a fresh one could not differ.

The filters here live in a module that no other interpreter can import, as a notebook's do, so
cloudpickle sends their classes by value. Each step changes something a method depends on and
checks that a fresh interpreter, loading what :func:`pickle_filter` made, computes what the
filter computes here.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import cloudpickle
import pytest

from soma.runtime import filter_pickles
from soma.runtime.filter_pickles import pickle_filter

_SOURCE = """
from soma import Filter

SCALE = 2
TABLE = {"offset": 1}
NUMBERS = [1, 2]

def helper(x):
    return x + 100

class Scale(Filter):
    def __init__(self, factor=1):
        self.factor = factor

    def forward(self, x, state):
        return x * SCALE * self.factor + TABLE["offset"]

class UsesHelper(Filter):
    def forward(self, x, state, extra=[0]):
        return helper(x) + sum(extra) + sum(NUMBERS)

class Child(Scale):
    label = ("child", 1)
    settings = {"shift": 0}

    def forward(self, x, state):
        return super().forward(x, state) + self.settings["shift"]

def closing_over(value):
    class Closed(Filter):
        def forward(self, x, state):
            return x + value
    return Closed
"""


@pytest.fixture
def scratch() -> Iterator[types.ModuleType]:
    """A module of filters that only this interpreter has (cloudpickle sends it by value)."""
    module = types.ModuleType("soma_scratch_filters")
    exec(compile(_SOURCE, "<scratch>", "exec"), module.__dict__)
    yield module


def _forward_elsewhere(pickles: list[bytes]) -> list[Any]:
    """``forward(3, None)`` of each pickled filter, loaded in order by one fresh interpreter."""
    code = textwrap.dedent(
        """
        import pickle, sys
        blobs = pickle.loads(sys.stdin.buffer.read())
        print(repr([pickle.loads(blob).forward(3, None) for blob in blobs]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(pickles), capture_output=True, timeout=60, check=True
    )
    return list(eval(done.stdout))


def _class_pickles(monkeypatch: pytest.MonkeyPatch) -> list[type]:
    """The classes pickled on their own from now on (what the memo did not reuse)."""
    pickled: list[type] = []
    dumps = cloudpickle.dumps

    def counting(obj: Any, *args: Any, **kwargs: Any) -> bytes:
        if isinstance(obj, type):
            pickled.append(obj)
        return dumps(obj, *args, **kwargs)

    monkeypatch.setattr(filter_pickles.cloudpickle, "dumps", counting)
    return pickled


def test_an_unchanged_class_is_pickled_once(scratch: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    pickled = _class_pickles(monkeypatch)
    first, second = pickle_filter(scratch.Scale(2)), pickle_filter(scratch.Scale(5))
    assert pickled == [scratch.Scale]
    assert _forward_elsewhere([first, second]) == [13, 31]


def test_a_changed_attribute_of_the_instance_is_always_sent(scratch: types.ModuleType) -> None:
    filter_obj = scratch.Scale(1)
    before = pickle_filter(filter_obj)
    filter_obj.factor = 10
    assert _forward_elsewhere([before, pickle_filter(filter_obj)]) == [7, 61]


Change = Callable[[types.ModuleType], None]


def _rebind_global(m: types.ModuleType) -> None:
    m.SCALE = 7


def _mutate_global_dict(m: types.ModuleType) -> None:
    m.TABLE["offset"] = 50


def _replace_method(m: types.ModuleType) -> None:
    m.Scale.forward = lambda self, x, state: -x


def _add_class_attribute(m: types.ModuleType) -> None:
    m.Scale.forward = lambda self, x, state: x + getattr(type(self), "bonus", 0)
    pickle_filter(m.Scale())  # kept with no ``bonus``
    m.Scale.bonus = 1000


@pytest.mark.parametrize(
    "change",
    [_rebind_global, _mutate_global_dict, _replace_method, _add_class_attribute],
    ids=["rebound-global", "global-dict-mutated", "method-replaced", "class-attribute-added"],
)
def test_a_change_to_the_class_or_its_globals_is_sent(scratch: types.ModuleType, change: Change) -> None:
    filter_obj = scratch.Scale(1)
    blobs = [pickle_filter(filter_obj)]
    expected = [filter_obj.forward(3, None)]
    change(scratch)
    blobs.append(pickle_filter(filter_obj))
    expected.append(filter_obj.forward(3, None))
    assert expected[0] != expected[1]
    assert _forward_elsewhere(blobs) == expected


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m, "helper", lambda x: x + 200),
        lambda m: m.UsesHelper.forward.__defaults__[0].append(5),
        lambda m: m.NUMBERS.append(40),
    ],
    ids=["helper-redefined", "mutable-default-mutated", "global-list-grown"],
)
def test_a_change_reached_through_a_method_is_sent(scratch: types.ModuleType, change: Change) -> None:
    filter_obj = scratch.UsesHelper()
    blobs, expected = [pickle_filter(filter_obj)], [filter_obj.forward(3, None)]
    change(scratch)
    blobs.append(pickle_filter(filter_obj))
    expected.append(filter_obj.forward(3, None))
    assert expected[0] != expected[1]
    assert _forward_elsewhere(blobs) == expected


def test_a_subclass_using_super_and_class_data_is_sent_as_it_is_now(scratch: types.ModuleType) -> None:
    filter_obj = scratch.Child(1)
    blobs, expected = [pickle_filter(filter_obj)], [filter_obj.forward(3, None)]
    scratch.Child.settings["shift"] = 1000
    scratch.SCALE = 3
    blobs.append(pickle_filter(filter_obj))
    expected.append(filter_obj.forward(3, None))
    assert expected == [7, 1010]
    assert _forward_elsewhere(blobs) == expected


def test_closures_are_compared_by_their_contents(scratch: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    pickled = _class_pickles(monkeypatch)
    one, two = scratch.closing_over(1), scratch.closing_over(2)
    blobs = [pickle_filter(one()), pickle_filter(one()), pickle_filter(two())]
    assert pickled == [one, two]
    assert _forward_elsewhere(blobs) == [4, 4, 5]


def test_a_class_that_reads_a_mutable_object_is_pickled_afresh_each_time(
    scratch: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Box:
        value = 1

    scratch.box = Box()
    exec(
        "class ReadsBox(Filter):\n    def forward(self, x, state):\n        return x + box.value\n",
        scratch.__dict__,
    )
    pickled = _class_pickles(monkeypatch)
    filter_obj = scratch.ReadsBox()
    blobs = [pickle_filter(filter_obj)]
    scratch.box.value = 5
    blobs.append(pickle_filter(filter_obj))
    assert scratch.ReadsBox not in pickled  # pickled with the filter each time, never kept
    assert _forward_elsewhere(blobs) == [4, 8]


def test_a_module_imported_since_makes_the_class_pickled_again(
    scratch: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    pickled = _class_pickles(monkeypatch)
    pickle_filter(scratch.Scale())
    monkeypatch.setitem(sys.modules, "soma_scratch_new_module", types.ModuleType("soma_scratch_new_module"))
    pickle_filter(scratch.Scale())
    assert pickled == [scratch.Scale, scratch.Scale]


def test_an_object_pickled_by_reference_is_what_cloudpickle_makes() -> None:
    value = {"fraction": Fraction(1, 3), "function": textwrap.dedent}
    assert pickle_filter(value) == cloudpickle.dumps(value, protocol=5)
