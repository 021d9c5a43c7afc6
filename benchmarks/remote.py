"""Time remote execution against a ``soma-worker`` process on loopback; print one JSON line.

The worker runs with a token and ``--max-concurrent 2``. Figures (seconds unless ``_ms``):

- ``worker_startup_s``: from starting the ``soma-worker`` process to its first ``/health`` ``ok``.
- ``remote_small_ms``: fit then forward of a 3-float list through one trainable filter, a fresh
  ``Graph`` each time (the connection is shared), median of 20. The fit goes to the worker, which
  answers it from its cache (the same plan each time, under the keys the client sends) without a
  child; the forward of the same list is then a hit in the graph's own cache, as in a local graph.
- ``remote_forward_ms``: forward of a 3-float list the graph's cache does not hold, through a
  fitted graph: one request, which the worker answers from its cache, median of 20.
- ``remote_small_uncached_ms``: fit then forward with ``Graph(cache=False)``: no keys are sent,
  so both plans load the filter into a pooled child and run it there.
- ``remote_list_1p4M_s``: forward of a 1.4M-float list through a fitted filter, median of 3.
- ``remote_array_100MB_s``: forward of a 100 MB float64 array through a fitted filter, median of 3.
  The same value each time, through a freshly fitted graph (its own cache empty), so each forward
  goes to the worker: after the first, the worker answers from its cache and the client finds its
  upload still on the worker.
- ``remote_list_1p4M_fresh_s``, ``remote_array_100MB_fresh_s``: forwards through one graph with one
  element changed before each, so nothing is reused: upload, child and store every time.
- ``remote_concurrent_s``: 4 concurrent forwards of a filter sleeping 0.5 s (two slots: >= 1.0 s).
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np

from soma import Filter, Graph
from soma.client.sync_client import close_all

TOKEN = "benchmark-token-0123456789abcdef"


class Centre(Filter):
    """Trainable: subtracts the mean learnt in ``fit``; keeps lists as lists."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"mean": float(np.mean(x))}

    def forward(self, x: Any, state: Any) -> Any:
        if isinstance(x, list):
            mean = state["mean"]
            return [v - mean for v in x]
        return x - state["mean"]


class Sleep(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        time.sleep(0.5)
        return x


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_worker(port: int, directory: str) -> tuple[subprocess.Popen[bytes], float]:
    """Start ``soma-worker`` with its store and work dirs in ``directory``; return it with the seconds
    until ``/health`` answered ``ok``."""
    command = [sys.executable, "-c", "import sys; from soma.worker.cli import main; sys.exit(main())"]
    dirs = ["--temp-dir", f"{directory}/temp", "--work-dir", f"{directory}/work"]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--token", TOKEN, "--max-concurrent", "2", "--log-level", "warning", *dirs],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.read() == b"ok":
                    return proc, time.perf_counter() - start
        except OSError:
            if proc.poll() is not None or time.perf_counter() - start > 60:
                proc.kill()
                raise SystemExit("soma-worker did not start") from None
            time.sleep(0.005)


def graph_on(address: str, *filters: Any, cache: bool = True) -> Graph:
    graph = Graph.somatize(filters[0] if len(filters) == 1 else list(filters), cache=cache)
    graph.add_worker(address, token=TOKEN)
    return graph


def median_of(repeats: int, fn: Callable[[], Any]) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def fresh_forwards(graph: Graph, value: Any, repeats: int = 3) -> float:
    """Median time of ``graph.forward(value)`` with ``value[0]`` changed (outside the timing) before each."""
    timings = []
    for i in range(repeats):
        value[0] = i + 0.5
        start = time.perf_counter()
        graph.forward(value)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def small(address: str, cache: bool = True) -> None:
    graph = graph_on(address, Centre(), cache=cache)
    graph.fit([1.0, 2.0, 3.0])
    graph.forward([1.0, 2.0, 3.0])


def repeated_forwards(address: str, value: Any, repeats: int = 3, forwarded: Any = None) -> float:
    """Median time of ``forward(forwarded)`` (default ``value``), each through a graph freshly fitted
    on ``value[:10]`` outside the timing: its own cache is empty, so the forward goes to the worker."""
    forwarded = value if forwarded is None else forwarded
    timings = []
    for _ in range(repeats):
        graph = graph_on(address, Centre())
        graph.fit(value[:10])
        start = time.perf_counter()
        graph.forward(forwarded)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def concurrent(address: str) -> float:
    graphs = [graph_on(address, Sleep()) for _ in range(4)]
    for graph in graphs:
        graph.fit(0)
    threads = [threading.Thread(target=graph.forward, args=(i,)) for i, graph in enumerate(graphs)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="soma-benchmark-") as directory:
        measure(directory)


def measure(directory: str) -> None:
    port = free_port()
    proc, startup = start_worker(port, directory)
    address = f"ws://127.0.0.1:{port}"
    try:
        small(address)  # connection, children and code paths warm
        result: dict[str, float] = {"worker_startup_s": round(startup, 3)}
        result["remote_small_ms"] = round(median_of(20, lambda: small(address)) * 1000, 2)
        result["remote_forward_ms"] = round(repeated_forwards(address, [1.0, 2.0, 3.0], 20, [4.0, 5.0, 6.0]) * 1000, 2)
        result["remote_small_uncached_ms"] = round(median_of(20, lambda: small(address, cache=False)) * 1000, 2)

        floats = np.random.default_rng(0).standard_normal(1_400_000).tolist()
        result["remote_list_1p4M_s"] = round(repeated_forwards(address, floats), 3)
        graph = graph_on(address, Centre())
        graph.fit(floats[:10])
        result["remote_list_1p4M_fresh_s"] = round(fresh_forwards(graph, floats), 3)

        array = np.random.default_rng(1).standard_normal(100 * 2**20 // 8)
        result["remote_array_100MB_s"] = round(repeated_forwards(address, array), 3)
        graph = graph_on(address, Centre())
        graph.fit(array[:10])
        result["remote_array_100MB_fresh_s"] = round(fresh_forwards(graph, array), 3)

        result["remote_concurrent_s"] = round(concurrent(address), 3)
        print(json.dumps(result))
    finally:
        close_all()
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
