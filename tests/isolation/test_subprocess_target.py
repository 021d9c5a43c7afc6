"""The ``"subprocess"`` target: graphs run in a pooled child and give in-process results."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

from soma import Filter, Graph
from soma.errors import ChildError, ChildTimeoutError, FilterError, SomaConfigError
from soma.isolation import pool as pool_module
from soma.isolation.pool import default_pool
from soma.isolation.spec import ChildSpec

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(autouse=True)
def fresh_default_pool() -> Iterator[None]:
    """Each test gets its own default pool, closed at its end (no child outlives a test)."""
    yield
    if pool_module._default_pool is not None:
        pool_module._default_pool.close()


class Centre(Filter):
    """Trainable: subtracts the mean seen in fit, then scales."""

    def __init__(self, k: float = 2.0) -> None:
        self.k = k

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"mean": np.mean(x, axis=0)}

    def forward(self, x: Any, state: Any) -> Any:
        return (np.asarray(x) - state["mean"]) * self.k


class Square(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return np.asarray(x) ** 2


class Join(Filter):
    """Fan-in: receives ``{pred_id: output}``."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return {key: float(np.sum(value)) for key, value in x.items()}


class Bounds:
    """A user-class state: it must cross to the child and back by value."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bounds) and (self.low, self.high) == (
            other.low,
            other.high,
        )


class Clip(Filter):
    def fit(self, x: Any, y: Any = None) -> Bounds:
        return Bounds(float(np.min(x)), float(np.percentile(x, 50)))

    def forward(self, x: Any, state: Bounds) -> Any:
        return np.clip(x, state.low, state.high)


class RunningSum(Filter):
    """partial_fit accumulates; update evolves the state on streams."""

    _stream_mode = "evolving"

    def fit(self, x: Any, y: Any = None) -> float:
        return float(np.sum(x))

    def partial_fit(self, x: Any, y: Any, state: Any) -> float:
        return (
            (state or 0.0) + float(np.sum(x)) + (0.0 if y is None else float(np.sum(y)))
        )

    def forward(self, x: Any, state: Any) -> Any:
        return np.asarray(x) + state

    def update(self, x: Any, state: float) -> float:
        return state + float(np.sum(x))


class WhereAmI(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return os.getpid()


class Failing(Filter):
    _kind = "stateless"

    def __init__(self, how: str) -> None:
        self.how = how

    def forward(self, x: Any, state: Any) -> Any:
        if self.how == "raise":
            raise ValueError("bad 'input'\nsecond line")
        if self.how == "exit":
            os._exit(1)
        if self.how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.how == "spin":
            while True:
                pass
        return x


def both(topology: Any, **kwargs: Any) -> tuple[Graph, Graph]:
    local = Graph.somatize(topology, cache=False, **kwargs)
    isolated = Graph.somatize(topology, cache=False, isolation="subprocess", **kwargs)
    return local, isolated


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    else:
        assert type(a) is type(b) and a == b


@pytest.mark.parametrize(
    "topology",
    [
        Centre() >> Square(),
        Centre(k=3.0) >> (Square() | Clip()) >> Join(),
        [Clip(), Centre() >> Square()],
    ],
    ids=["chain", "diamond", "two-roots"],
)
def test_isolated_graphs_match_in_process_results(topology: Any) -> None:
    x = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    local, isolated = both(topology, seed=7)
    for graph in (local, isolated):
        graph.fit(x)
    assert_same(local.forward(x), isolated.forward(x))
    assert_same(local.run(x), isolated.run(x))
    for node_id in local.nodes():
        assert_same(local.get_state(node_id), isolated.get_state(node_id))
    assert default_pool().stats().spawned == 1, "one child served every run"


def test_batched_fit_and_evolving_stream_match_in_process() -> None:
    x = np.arange(10.0)
    y = np.ones(10)
    local, isolated = both(RunningSum() >> Square())
    progress: dict[str, list[tuple[int, int]]] = {"local": [], "isolated": []}
    local.on_event(
        lambda e: progress["local"].append((e["batch"], e["rows"])),
        event_types=["BatchProgress"],
    )
    isolated.on_event(
        lambda e: progress["isolated"].append((e["batch"], e["rows"])),
        event_types=["BatchProgress"],
    )
    for graph in (local, isolated):
        graph.fit(x, y, batch_size=4)
    assert progress["local"] == progress["isolated"] == [(1, 4), (2, 4), (3, 2)]
    assert local.get_state("running_sum") == isolated.get_state("running_sum") == 55.0
    assert_same(local.forward(x), isolated.forward(x))
    assert_same(
        local.forward(x, stream=True, chunk_size=3),
        isolated.forward(x, stream=True, chunk_size=3),
    )
    assert isolated.get_state("running_sum") == 55.0, (
        "the stream never modifies stored states"
    )


def test_subprocess_target_on_one_node_only() -> None:
    graph = Graph(cache=False)
    first = graph.node(WhereAmI())
    second = graph.node(WhereAmI(), target="subprocess")
    started: list[tuple[str, str]] = []
    graph.on_event(
        lambda e: started.append((e["node_id"], e["target"])),
        event_types=["NodeStarted"],
    )
    out = graph.run(None)
    assert out[first] == os.getpid()
    assert out[second] != os.getpid()
    assert started == [(first, "local"), (second, "subprocess")]


def test_user_exception_raises_filter_error_with_the_remote_traceback() -> None:
    graph = Graph.somatize(
        Square() >> Failing("raise"), cache=False, isolation="subprocess"
    )
    with pytest.raises(FilterError) as info:
        graph.run(np.ones(2))
    error = info.value
    assert str(error) == "Python forward() error: ValueError: bad 'input'\nsecond line"
    assert isinstance(error.original, ValueError) and error.__cause__ is error.original
    assert error.node_id == "failing" and error.phase == "run"
    assert error.remote_traceback is not None and "in forward" in error.remote_traceback


@pytest.mark.parametrize(
    ("how", "detail"),
    [("exit", "exited with code 1"), ("sigkill", "killed by SIGKILL")],
)
def test_a_dying_child_raises_child_error_and_this_process_survives(
    how: str, detail: str
) -> None:
    graph = Graph.somatize(
        Square() >> Failing(how), cache=False, isolation="subprocess"
    )
    with pytest.raises(ChildError) as info:
        graph.run(np.ones(2))
    error = info.value
    assert not isinstance(error, ChildTimeoutError)
    assert (
        error.code == "child_crashed"
        and error.where == "subprocess"
        and error.node_id == "failing"
    )
    assert detail in str(error)
    healthy = Graph.somatize(Square(), cache=False, isolation="subprocess")
    np.testing.assert_array_equal(healthy.run(np.full(2, 3.0))["square"], [9.0, 9.0])


def test_timeout_raises_child_timeout_error_promptly() -> None:
    graph = Graph.somatize(Failing("spin"), cache=False, isolation="subprocess")
    default_pool().prewarm(ChildSpec(), 1)
    start = time.monotonic()
    with pytest.raises(ChildTimeoutError) as info:
        graph.run(1, timeout=1)
    assert time.monotonic() - start < 3
    assert isinstance(info.value, TimeoutError) and info.value.code == "timeout"
    assert "ran past its 1 s limit" in str(info.value)


def test_unknown_isolation_is_refused() -> None:
    with pytest.raises(SomaConfigError):
        Graph(isolation="docker")


def test_weights_trained_in_the_child_come_back_to_the_filter() -> None:
    torch = pytest.importorskip("torch")

    class Linear(Filter):
        def __init__(self) -> None:
            torch.manual_seed(0)
            self.module = torch.nn.Linear(2, 1)

        def fit(self, x: Any, y: Any = None) -> Any:
            optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
            for _ in range(5):
                optimizer.zero_grad()
                loss = ((self.module(x) - y) ** 2).mean()
                loss.backward()
                optimizer.step()
            return {"steps": 5}

        def forward(self, x: Any, state: Any) -> Any:
            with torch.no_grad():
                return self.module(x)

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]])
    y = torch.tensor([[1.0], [2.0], [0.0]])
    local = Graph.somatize(Linear(), cache=False)
    isolated = Graph.somatize(Linear(), cache=False, isolation="subprocess")
    local.fit(x, y)
    isolated.fit(x, y)
    assert isolated.get_state("linear") == {"steps": 5}
    local_weights = local.get_filter("linear").module.state_dict()
    isolated_weights = isolated.get_filter("linear").module.state_dict()
    for name, value in local_weights.items():
        assert torch.equal(value, isolated_weights[name]), name
    assert torch.equal(local.forward(x), isolated.forward(x))


def test_readme_isolation_example_runs_as_written() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Isolating filters", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    done = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "child_crashed", "timeout"]
