"""A 1 GiB array through a child and back, and the parent's extra memory (isolation.md §10 item 26).

The 500 MB/s target depends on the host; ``benchmarks/isolation.py`` measures it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import numpy as np
import pytest

from soma.isolation.limits import read_rss
from soma.isolation.process import Child
from soma.isolation.spec import ChildSpec

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Identity:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x


class PeakRss:
    """Samples this process's RSS every millisecond while running; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, read_rss(os.getpid()) or 0)
            time.sleep(0.001)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, read_rss(os.getpid()) or 0)


@pytest.fixture
def child() -> Iterator[Child]:
    """A child as the worker holds it: restricted unpickling, an identity filter loaded."""
    spawned = Child.spawn(ChildSpec(), restricted=True)
    try:
        entry = {"id": "id", "pickle": cloudpickle.dumps(Identity()), "trainable": False, "differentiable": False}
        spawned.call("LOAD", timeout=60, filters=[entry], runtime=None, seed=None)
        yield spawned
    finally:
        spawned.shutdown()


def test_a_gib_float32_array_round_trips_with_bounded_parent_memory(child: Child) -> None:
    big = np.ones(1 << 28, dtype=np.float32)  # 1 GiB
    big[::4096] = np.arange(big[::4096].size, dtype=np.float32)
    child.call("FORWARD", timeout=60, node_id="id", data=np.ones(1 << 20, dtype=np.float32))  # warm
    baseline = read_rss(os.getpid()) or 0
    with PeakRss() as peak:
        back = child.call("FORWARD", timeout=120, node_id="id", data=big)["result"]
    assert back.dtype == np.float32 and back.shape == big.shape
    assert np.array_equal(back[::4096], big[::4096]) and back[-1] == big[-1]
    assert peak.peak - baseline < 2.5 * 2**30, f"{(peak.peak - baseline) / 2**30:.2f} GiB extra"
