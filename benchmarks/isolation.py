"""Round trips through a filter-daemon child (the worker's restricted parent); print one JSON line.

Every figure is a full round trip (parent -> child -> parent) of FORWARD on an already
loaded identity filter. Throughputs divide the payload size by the round-trip time, so
each byte crosses the channel twice within it. ``gib_float32_peak_extra_GiB`` is the
parent's peak RSS during the 1 GiB round trip above its RSS just before it (the input
already allocated), sampled every millisecond: the received copy accounts for 1 GiB.

Goals (isolation.md §10 item 26 and the performance brief): small_forward_us <= 30,
list_1p4M_s <= 0.15, array_100MB_GBps >= 2, gib_float32_MBps >= 500 with
gib_float32_peak_extra_GiB < 2.5.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import cloudpickle
import numpy as np

from soma.isolation.limits import read_rss
from soma.isolation.process import Child, ChildSpec

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Identity:
    _kind = "stateless"

    def fit(self, x: Any, y: Any = None) -> None:
        return None

    def forward(self, x: Any, state: Any) -> Any:
        return x


def timings(repeats: int, fn: Callable[[], Any]) -> list[float]:
    """Wall times of ``repeats`` calls, in seconds."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


class PeakRss:
    """Samples this process's RSS every millisecond while active; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, read_rss_self())
            time.sleep(0.001)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, read_rss_self())


def read_rss_self() -> int:
    import os

    return read_rss(os.getpid()) or 0


def main() -> None:
    child = Child.spawn(ChildSpec(), restricted=True)
    try:
        entry = {
            "id": "id",
            "pickle": cloudpickle.dumps(Identity()),
            "trainable": False,
            "differentiable": False,
        }
        child.call("LOAD", timeout=60, filters=[entry], runtime=None, seed=None)

        def forward(data: Any) -> Any:
            return child.call("FORWARD", timeout=600, node_id="id", data=data)["result"]

        small = [1.0, 2.0, 3.0]
        timings(500, lambda: forward(small))
        small_us = statistics.median(timings(5000, lambda: forward(small))) * 1e6

        floats = np.random.default_rng(0).standard_normal(1_400_000).tolist()
        assert forward(floats) == floats
        list_s = statistics.median(timings(5, lambda: forward(floats)))

        array = np.random.default_rng(1).standard_normal(100_000_000 // 8)
        assert np.array_equal(forward(array), array)
        array_s = statistics.median(timings(5, lambda: forward(array)))

        big = np.ones(1 << 28, dtype=np.float32)
        baseline = read_rss_self()
        start = time.perf_counter()
        with PeakRss() as peak:
            back = forward(big)
        gib_s = time.perf_counter() - start
        assert back.shape == big.shape and back.dtype == big.dtype
        del back
    finally:
        child.shutdown()

    result = {
        "small_forward_us": round(small_us, 1),
        "list_1p4M_s": round(list_s, 4),
        "array_100MB_s": round(array_s, 4),
        "array_100MB_GBps": round(array.nbytes / array_s / 1e9, 2),
        "gib_float32_MBps": round(big.nbytes / gib_s / 1e6, 1),
        "gib_float32_peak_extra_GiB": round((peak.peak - baseline) / 2**30, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
