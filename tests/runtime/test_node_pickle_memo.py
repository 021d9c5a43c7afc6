"""The pickle a worker receives follows the filter's current state (api.md §5.7)."""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from soma import Filter
from soma.runtime.nodes import NodeRecord


class Scale(Filter):
    _kind = "stateless"

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor

    def forward(self, x: Any, state: Any) -> Any:
        return x * self.factor


class Counting:
    """``cloudpickle.dumps`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, obj: Any) -> bytes:
        self.calls += 1
        data: bytes = cloudpickle.dumps(obj)
        return data


def test_unchanged_filter_is_pickled_once() -> None:
    record = NodeRecord("scale", Scale(), trainable=False)
    dumps = Counting()
    first = record.pickled(dumps)
    assert record.pickled(dumps) == first
    assert dumps.calls == 1


def test_changed_parameter_is_pickled_again_with_its_new_value() -> None:
    record = NodeRecord("scale", Scale(), trainable=False)
    dumps = Counting()
    record.pickled(dumps)
    record.filter.factor = 3.0
    assert pickle.loads(record.pickled(dumps)).factor == 3.0
    record.filter.factor = 3  # same value, another type: not the same pickle
    assert type(pickle.loads(record.pickled(dumps)).factor) is int
    assert dumps.calls == 3


def test_private_attribute_change_is_pickled_again() -> None:
    record = NodeRecord("scale", Scale(), trainable=False)
    dumps = Counting()
    record.pickled(dumps)
    record.filter._seen = 1
    assert pickle.loads(record.pickled(dumps))._seen == 1


def test_mutable_state_is_pickled_at_every_dispatch() -> None:
    record = NodeRecord("scale", Scale(), trainable=False)
    record.filter.factor = [1.0]
    dumps = Counting()
    record.pickled(dumps)
    record.filter.factor.append(2.0)
    assert pickle.loads(record.pickled(dumps)).factor == [1.0, 2.0]
    assert dumps.calls == 2
