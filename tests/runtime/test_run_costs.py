"""What a run costs beyond user code: large inputs are hashed once and never copied (api §6.2, §6.4)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from soma import Filter
from soma.graph import Graph
from soma.runtime import hashing


class Identity(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Centre(Filter):
    def fit(self, x: Any, y: Any = None) -> float:
        return float(np.mean(x))

    def forward(self, x: Any, state: float) -> Any:
        return x


@pytest.fixture
def large_digests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the buffers digested from now on that are at least 1 MB."""
    sizes: list[int] = []
    digest = hashing._buffer_digest

    def counting(buffer: Any) -> bytes:
        size = memoryview(buffer).nbytes
        if size >= 1 << 20:
            sizes.append(size)
        return digest(buffer)

    monkeypatch.setattr(hashing, "_buffer_digest", counting)
    return sizes


def test_a_chain_hashes_its_array_input_once_per_run(large_digests: list[int]) -> None:
    g = Graph.somatize(Identity() >> Centre() >> Identity() >> Identity())
    x = np.random.default_rng(0).random(500_000)
    g.fit(x)
    assert large_digests == [x.nbytes]
    for _ in range(2):
        assert g.forward(x) is x  # served from the cache: the same object, no copy
    assert large_digests == [x.nbytes] * 3


def test_a_fork_and_join_hash_the_input_once(large_digests: list[int]) -> None:
    g = Graph.somatize(Identity() >> (Identity() | Centre()) >> Identity())
    x = np.random.default_rng(1).random(500_000)
    g.fit(x)
    g.forward(x)
    assert large_digests == [x.nbytes] * 2


def test_memory_hits_return_the_stored_object() -> None:
    g = Graph.somatize(Identity())
    x = np.arange(10.0)
    g.fit(x)
    events: list[dict[str, Any]] = []
    g.on_event(events.append, event_types=["NodeCacheHit"])
    assert g.forward(x) is x
    assert [(e["tier"], e["load_time"]) for e in events] == [("memory", 0)]
