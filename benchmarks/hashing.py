"""Time ``content()`` on an 80 MB float64 array and a 1.4M-float list; print one JSON line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from soma.runtime.hashing import content


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    """The fastest of ``repeats`` timed calls, in seconds."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
    return min(timings)


def main() -> None:
    rng = np.random.default_rng(0)
    array = rng.standard_normal(10_000_000)
    floats = rng.standard_normal(1_400_000).tolist()
    result = {
        "array_80MB_hash_s": round(best_of(5, lambda: content(array)), 4),
        "list_1p4M_hash_s": round(best_of(5, lambda: content(floats)), 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
