"""``Pool.take_idle``: the idle child of a key at once, never a spawn; ``acquire``/``release`` around it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

from soma.errors import SomaError
from soma.isolation.failures import ChildFailure
from soma.isolation.pool import Pool
from soma.isolation.spec import ChildSpec

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Identity:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = Pool(max_idle=4)
    yield p
    p.close()


def test_without_an_idle_child_take_idle_returns_none_and_spawns_nothing(pool: Pool) -> None:
    assert pool.take_idle(ChildSpec()) is None
    stats = pool.stats()
    assert (stats.idle, stats.busy, stats.spawned) == (0, 0, 0)


def test_take_idle_hands_out_the_parked_child_reset_and_release_parks_it_again(pool: Pool) -> None:
    spec = ChildSpec()
    first = pool.acquire(spec)
    entry = {"id": "n", "pickle": cloudpickle.dumps(Identity()), "trainable": False, "differentiable": False}
    first.call("LOAD", timeout=30, filters=[entry], runtime=None, seed=None)
    pool.release(first)
    assert pool.take_idle(ChildSpec(env_key="other")) is None

    child = pool.take_idle(spec)
    assert child is first
    assert (pool.stats().idle, pool.stats().busy) == (0, 1)
    with pytest.raises(ChildFailure) as info:  # the last tenant's filters went with the reset
        child.call("FORWARD", timeout=30, node_id="n", data=1)
    assert info.value.code == "unknown_node"
    pool.release(child)
    stats = pool.stats()
    assert (stats.idle, stats.busy, stats.spawned) == (1, 0, 1)


def test_a_dead_idle_child_is_not_taken_but_replaced_by_acquire(pool: Pool) -> None:
    spec = ChildSpec()
    with pool.checkout(spec) as child:
        dead = child
    dead.kill("cancelled")
    assert pool.take_idle(spec) is None
    with pool.checkout(spec) as child:
        assert child is not dead and child.alive
    assert pool.stats().kills.get("dead_idle") == 1


def test_take_idle_on_a_closed_pool_raises(pool: Pool) -> None:
    pool.close()
    with pytest.raises(SomaError, match="closed"):
        pool.take_idle(ChildSpec())
