"""Which replies the connection encodes on its event loop rather than on a thread (worker.md §6.11)."""

from __future__ import annotations

import numpy as np

from soma.isolation.markers import Opaque
from soma.wire.messages import PlanResult, PlanSuccess, StateResult
from soma.worker.connection import _is_small


def _result(output: object, states: dict[str, object] | None = None) -> PlanResult:
    return PlanResult(worker_id="w", plan_id="p", result=PlanSuccess(output=output, states=states or {}))


def test_a_few_floats_and_a_small_state_are_small() -> None:
    assert _is_small(_result([0.5, 1.0, 1.5], {"centre": {"mean": 2.0}}))
    assert _is_small(StateResult(worker_id="w", plan_id="p", states={"n": Opaque(b"x" * 100, [b"y" * 1000])}))
    assert _is_small(_result(np.zeros(100)))


def test_many_items_are_large() -> None:
    assert not _is_small(_result([0.0] * 10_000))
    assert not _is_small(_result({str(i): i for i in range(1_000)}))


def test_big_buffers_are_large() -> None:
    assert not _is_small(_result(np.zeros(1 << 20)))
    assert not _is_small(_result(Opaque(b"", [bytes(1 << 20)])))
    assert not _is_small(_result("x" * (1 << 20)))


def test_unknown_objects_and_object_arrays_are_large() -> None:
    assert not _is_small(_result(np.array([object()], dtype=object)))
    assert not _is_small(_result(object()))
