"""Local execution overheads; prints one JSON line.

- ``chain20_forward_us_per_node``: forward of a chain of 20 trivial stateless filters
  on a one-element list (median of repeated calls, divided by 20); target <= 5 us.
- ``array_10M_forward_s``: a 10M float64 array through 5 identity filters; target <= 15 ms.
- ``fork_forward_s``: forward of ``A >> (B | C) >> Join``; target < 10 ms.
- ``refit_cache_speedup``: first fit of a filter sleeping 50 ms over the same fit again
  (served by the memory tier); target >= 1000.
- ``refit_new_process_speedup``: the same refit from a new process through a shared
  ``cache_dir``; target >= 100.

Run: ``python benchmarks/local.py``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from soma import Filter
from soma.graph import Graph


class Passthrough(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Join(Filter):
    _kind = "stateless"

    def forward(self, x: dict[str, Any], state: Any) -> Any:
        return list(x.values())


class Sleepy(Filter):
    """A trainable filter whose fit takes 50 ms."""

    def fit(self, x: Any, y: Any = None) -> dict[str, float]:
        time.sleep(0.05)
        return {"mean": float(np.mean(x))}

    def forward(self, x: Any, state: dict[str, float]) -> Any:
        return x


def _median_s(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def chain20_us_per_node() -> float:
    chain = Passthrough()
    for _ in range(19):
        chain = chain >> Passthrough()
    g = Graph.somatize(chain)
    x = [1.0]
    g.fit(x)
    g.forward(x)
    return _median_s(lambda: g.forward(x), 2000) / 20 * 1e6


def array_10m_s() -> float:
    chain = Passthrough()
    for _ in range(4):
        chain = chain >> Passthrough()
    g = Graph.somatize(chain)
    x = np.random.default_rng(0).random(10_000_000)
    g.fit(x)
    assert g.forward(x) is x
    return _median_s(lambda: g.forward(x), 15)


def fork_s() -> float:
    g = Graph.somatize(Passthrough() >> (Passthrough() | Passthrough()) >> Join())
    x = np.arange(1000.0)
    g.fit(x)
    return _median_s(lambda: g.forward(x), 200)


def _sleepy_fit_s(cache_dir: str | None) -> float:
    g = Graph.somatize(Sleepy(), cache_dir=cache_dir, seed=0)
    x = np.arange(1000.0)
    start = time.perf_counter()
    g.fit(x)
    return time.perf_counter() - start


def refit_speedups() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as cache_dir:
        g = Graph.somatize(Sleepy(), cache_dir=cache_dir, seed=0)
        x = np.arange(1000.0)
        first = _median_s(lambda: g.fit(x), 1)
        again = _median_s(lambda: g.fit(x), 50)
        child = subprocess.run(
            [sys.executable, __file__, "--refit-from", cache_dir],
            check=True,
            capture_output=True,
            text=True,
        )
        new_process = float(child.stdout.strip())
    return first / again, first / new_process


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--refit-from":
        print(_sleepy_fit_s(sys.argv[2]))
        return
    memory_speedup, process_speedup = refit_speedups()
    print(
        json.dumps(
            {
                "chain20_forward_us_per_node": round(chain20_us_per_node(), 2),
                "array_10M_forward_s": round(array_10m_s(), 4),
                "fork_forward_s": round(fork_s(), 6),
                "refit_cache_speedup": round(memory_speedup, 1),
                "refit_new_process_speedup": round(process_speedup, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
