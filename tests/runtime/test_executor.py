"""Execution semantics of fit / forward / run / streams and the runner seam (api.md §5, §11)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar, Self

import numpy as np
import pytest
from _graph_filters import (
    AddOne,
    Boom,
    Collect,
    Identity,
    MeanCenter,
    RowCounter,
    Scale,
    SeedProbe,
    Sum,
    calls_of,
)

from soma import CompileError, Filter, FilterError, SomaConfigError, SomaError
from soma.errors import ChildError, RowMismatchError
from soma.graph import Graph
from soma.runtime.nodes import has_parameter_owner
from soma.runtime.runners import BlockRequest, BlockResult, InProcessRunner, RunnerSpec
from soma.runtime.plan import Execute, Loop


class OrderLog(Filter):
    """Appends ``<method>:<name>`` to a shared log."""

    name: str

    def __init__(self, name: str, log: list[str], kind: str = "trainable") -> None:
        super().__init__(name=name)
        self._log = log
        self._kind = kind

    def fit(self, x: Any, y: Any = None) -> dict[str, str]:
        self._log.append(f"fit:{self.name}")
        return {"by": self.name}

    def forward(self, x: Any, state: Any) -> Any:
        self._log.append(f"forward:{self.name}")
        return x


# -- what nodes receive ----------------------------------------------------------------


def test_stateless_fit_is_never_called_and_forward_gets_none() -> None:
    class Strict(Filter):
        _kind = "stateless"

        def fit(self, x: Any, y: Any = None) -> Any:
            raise AssertionError("fit called on a stateless filter")

        def forward(self, x: Any, state: Any) -> Any:
            assert state is None
            return x

    g = Graph.somatize(Strict())
    g.fit(1, y=2)
    assert g.forward(1) == 1
    assert g.run(1) == {"strict": 1}
    assert g.get_state("strict") is None


def test_trainable_fit_gets_input_and_y_and_forward_gets_that_exact_state() -> None:
    f = Scale()
    before = dict(vars(f))
    g = Graph.somatize(f)
    x, y = np.arange(3.0), np.array([2.0, 2.0, 2.0])
    g.fit(x, y)
    (_, fit_x, fit_y), (_, _, fwd_state) = f._calls
    assert fit_x is x and fit_y is y
    assert fwd_state is g.get_state("scale")
    g.forward(x + 1)
    assert calls_of(f, "forward")[-1][2] is g.get_state("scale")
    assert vars(f) == before | {"_calls": f._calls}  # the runtime set nothing on the filter


def test_execution_follows_depth_then_insertion_order() -> None:
    log: list[str] = []

    def n(name: str) -> OrderLog:
        return OrderLog(name, log, kind="stateless")

    g = Graph.somatize(n("a") >> (n("b") >> n("c") | n("d")) >> n("m"), cache=False)
    g.run(0)
    assert log == ["forward:a", "forward:b", "forward:d", "forward:c", "forward:m"]


def test_two_trainable_chain_calls_fit_then_forward_per_node() -> None:
    log: list[str] = []
    g = Graph.somatize(OrderLog("a", log) >> OrderLog("b", log))
    g.fit(0)
    assert log == ["fit:a", "forward:a", "fit:b", "forward:b"]


def test_fan_in_receives_raw_outputs_keyed_in_edge_order() -> None:
    g = Graph(cache=False)
    g.node("z", Identity())
    g.node("a", AddOne())
    join = Collect()
    g.node("join", join)
    g.connect("z", "join")
    g.connect("a", "join")
    x = np.arange(2.0)
    g.fit(x)
    received = calls_of(join, "forward")[0][1]
    assert list(received) == ["z", "a"]
    assert received["z"] is x
    np.testing.assert_array_equal(received["a"], x + 1)


class Thing:
    pass


@pytest.mark.parametrize(
    "value",
    [np.arange(6.0).reshape(2, 3), {"b": 1, "a": 2}, 3, 2.5, "text", None, Thing(), [1, [2]]],
    ids=["ndarray", "dict", "int", "float", "str", "None", "object", "list"],
)
def test_identity_graph_returns_the_same_object(value: Any) -> None:
    g = Graph.somatize(Identity() >> Identity())
    g.fit(value)
    assert g.forward(value) is value
    assert g.run(value)["identity_2"] is value


def test_identity_graph_returns_the_same_tensor() -> None:
    torch = pytest.importorskip("torch")
    t = torch.ones(2, requires_grad=True)
    g = Graph.somatize(Identity())
    g.fit(t)
    assert g.forward(t) is t


def test_sinks_and_empty_graph_results() -> None:
    g = Graph.somatize(AddOne() >> (AddOne() | Identity()))
    g.fit(1)
    assert g.forward(1) == {"add_one_2": 3, "identity": 2}
    single = Graph.somatize(AddOne())
    single.fit(1)
    assert single.forward(1) == 2
    empty = Graph()
    empty.fit(None)
    marker = object()
    assert empty.forward(marker) is marker
    assert empty.run(marker) == {}


def test_run_needs_no_fit_returns_every_node_and_roots_get_x() -> None:
    g = Graph.somatize(Identity() >> AddOne())
    out = g.run(5)
    assert out == {"identity": 5, "add_one": 6} and list(out) == ["identity", "add_one"]
    assert Graph.somatize(Identity()).run() == {"identity": None}
    assert not g.fitted


def test_run_gives_never_fitted_trainable_nodes_a_none_state() -> None:
    f = MeanCenter()
    g = Graph.somatize(f)
    with pytest.raises(FilterError, match="forward"):
        g.run(1)  # MeanCenter.forward subtracts its state: None fails
    assert calls_of(f, "forward")[0][1:] == (1, None)
    assert not calls_of(f, "fit") and not g.fitted


def test_run_uses_stored_states_without_fitting() -> None:
    f = Scale(2.0)
    g = Graph.somatize(f)
    g.fit(np.ones(2))
    out = g.run(np.ones(2))
    np.testing.assert_array_equal(out["scale"], [2.0, 2.0])
    assert len(calls_of(f, "fit")) == 1


# -- failures --------------------------------------------------------------------------


def test_failing_fit_raises_filter_error_and_commits_nothing() -> None:
    head = Scale()
    g = Graph.somatize(head >> MeanCenter())
    g.fit(np.ones(3))
    state = g.get_state("scale")
    g.node(Boom("fit"))
    g.connect("mean_center", "boom")
    with pytest.raises(FilterError) as info:
        g.fit(np.full(3, 7.0))
    exc = info.value
    assert str(exc) == "Python fit() error: ValueError: boom"
    assert isinstance(exc.__cause__, ValueError) and exc.original is exc.__cause__
    assert exc.node_id == "boom" and exc.phase == "fit" and exc.method == "fit"
    assert exc.remote_traceback is None
    assert g.get_state("scale") is state
    assert not g.fitted


def test_failing_forward_names_method_and_phase() -> None:
    g = Graph.somatize(Boom("none"))
    g.fit(1)
    g.get_filter("boom").set_params(method="forward")
    with pytest.raises(FilterError, match=r"^Python forward\(\) error: ValueError: boom$") as info:
        g.forward(1)
    assert info.value.phase == "forward" and info.value.node_id == "boom"
    assert g.fitted


def test_successful_nodes_cache_entries_survive_a_failed_fit() -> None:
    head = Scale()
    g = Graph.somatize(head >> Boom("fit"))
    with pytest.raises(FilterError):
        g.fit(np.ones(2))
    boom = g.get_filter("boom")
    boom.set_params(method="none")
    g.fit(np.ones(2))
    assert len(calls_of(head, "fit")) == 1


def test_keyboard_interrupt_is_not_wrapped() -> None:
    class Interrupt(Filter):
        _kind = "stateless"

        def forward(self, x: Any, state: Any) -> Any:
            raise KeyboardInterrupt

    g = Graph.somatize(Interrupt())
    events: list[dict[str, Any]] = []
    g.on_event(events.append)
    with pytest.raises(KeyboardInterrupt):
        g.fit(1)
    assert [e["event_type"] for e in events][-2:] == ["NodeFailed", "RunFailed"]


# -- parallel execution ----------------------------------------------------------------


def _diamond() -> Graph:
    return Graph.somatize(AddOne() >> (Scale(2.0) | MeanCenter()) >> Sum())


def _four_way() -> Graph:
    return Graph.somatize(
        Identity() >> (AddOne() | Scale(3.0) | MeanCenter() | Identity()) >> Collect()
    )


def _two_roots() -> Graph:
    return Graph.somatize(Scale(2.0) >> AddOne() | MeanCenter())


def _fork() -> Graph:
    return Graph.somatize(Scale() >> (AddOne() | MeanCenter()))


def _fan_in() -> Graph:
    g = Graph()
    for name in ("p", "q", "r"):
        g.node(name, Scale(float(len(name))))
    g.node("sum", Sum())
    for name in ("p", "q", "r"):
        g.connect(name, "sum")
    return g


SHAPES: dict[str, Callable[[], Graph]] = {
    "fork": _fork,
    "diamond": _diamond,
    "four_way": _four_way,
    "two_roots": _two_roots,
    "fan_in": _fan_in,
}


def _outputs(build: Callable[[], Graph], max_parallel: int) -> tuple[Any, Any, Any]:
    g = build()
    g._max_parallel = max_parallel  # the same topology, only the pool size differs
    x = np.arange(1.0, 7.0)
    g.fit(x)
    return g.forward(x), g.run(x), {n: g.get_state(n) for n in g.nodes()}


def _same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, tuple):
        for u, v in zip(a, b, strict=True):
            _same(u, v)
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", SHAPES)
def test_parallel_shapes_complete_with_equal_results(name: str) -> None:
    sequential = _outputs(SHAPES[name], 1)
    parallel = _outputs(SHAPES[name], 4)
    _same(sequential, parallel)


@pytest.mark.parametrize("max_parallel", [1, 4])
def test_parallel_graphs_built_with_max_parallel_complete(max_parallel: int) -> None:
    g = Graph.somatize(
        AddOne() >> (AddOne() | AddOne() | AddOne()) >> Sum(), max_parallel=max_parallel
    )
    g.fit(1)
    assert g.forward(1) == 9
    assert g.run(1)["sum"] == 9


def test_parallel_failure_raises_earliest_member_in_canonical_order() -> None:
    gate = threading.Event()

    class Slow(Filter):
        _kind = "stateless"

        def forward(self, x: Any, state: Any) -> Any:
            gate.wait(5)
            raise ValueError("first")

    class Fast(Filter):
        _kind = "stateless"

        def forward(self, x: Any, state: Any) -> Any:
            gate.set()
            raise ValueError("second")

    g = Graph(max_parallel=2)
    g.node(Slow())
    g.node(Fast())
    with pytest.raises(FilterError, match="first") as info:
        g.fit(0)
    assert info.value.node_id == "slow"


def test_parallel_failure_starts_no_new_member() -> None:
    started: list[int] = []

    class Failing(Filter):
        _kind = "stateless"
        i: int

        def __init__(self, i: int) -> None:
            super().__init__(i=i)

        def forward(self, x: Any, state: Any) -> Any:
            started.append(self.i)
            raise ValueError(str(self.i))

    g = Graph(max_parallel=2)
    for i in range(8):
        g.node(Failing(i))
    with pytest.raises(FilterError):
        g.run(0)
    assert len(started) < 8


def test_seed_reaches_user_code_on_pool_threads() -> None:
    g = Graph(max_parallel=3, seed=11)
    for _ in range(3):
        g.node(SeedProbe())
    assert set(g.run(0).values()) == {11}
    assert Graph.somatize(SeedProbe()).run(0) == {"seed_probe": None}


def test_identical_siblings_fitted_once_also_in_parallel() -> None:
    for max_parallel in (1, 4):
        shared = Scale()
        g = Graph.somatize(AddOne() >> (shared | shared | shared), max_parallel=max_parallel)
        g.fit(np.ones(3))
        assert len(calls_of(shared, "fit")) == 1
        assert g.get_state("scale") == g.get_state("scale_3")


# -- batches and streams -----------------------------------------------------------------


def test_batched_fit_threads_state_through_partial_fit() -> None:
    counter = RowCounter()
    plain = Scale()
    g = Graph.somatize(counter >> Identity() | plain)
    g.fit(np.arange(10.0), y=np.arange(10.0), batch_size=3)
    partial = calls_of(counter, "partial_fit")
    assert len(partial) == 4
    assert [c[3] for c in partial] == [
        None,
        {"rows": 3, "batches": 1},
        {"rows": 6, "batches": 2},
        {"rows": 9, "batches": 3},
    ]
    np.testing.assert_array_equal(partial[1][2], [3.0, 4.0, 5.0])  # y sliced alike
    assert g.get_state("row_counter") == {"rows": 10, "batches": 4}
    assert len(calls_of(plain, "fit")) == 1 and not calls_of(counter, "fit")


def test_batched_fit_with_row_mismatch_raises_config_error() -> None:
    g = Graph.somatize(RowCounter())
    with pytest.raises(RowMismatchError, match="x and y have different numbers of rows: 4 vs 3"):
        g.fit([1, 2, 3, 4], y=[1, 2, 3], batch_size=2)
    assert not g.fitted


def test_a_row_mismatch_calls_no_user_code_and_leaves_a_fitted_graph_unchanged() -> None:
    counter = RowCounter()
    g = Graph.somatize(counter)
    g.fit([1, 2, 3, 4], y=[1, 2, 3, 4], batch_size=2)
    state, calls_before = g.get_state("row_counter"), len(counter._calls)
    with pytest.raises(SomaConfigError, match="x and y have different numbers of rows: 5 vs 4"):
        g.fit([1, 2, 3, 4, 5], y=[1, 2, 3, 4], batch_size=2)
    assert len(counter._calls) == calls_before
    assert g.fitted and g.get_state("row_counter") is state


def test_batch_size_is_validated() -> None:
    g = Graph.somatize(RowCounter())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(SomaConfigError):
            g.fit([1], batch_size=bad)  # type: ignore[arg-type]


def test_streamed_forward_equals_forward_for_row_wise_filters() -> None:
    g = Graph.somatize(MeanCenter() >> AddOne() >> Scale(0.5))
    x = np.arange(20.0).reshape(10, 2)
    g.fit(x)
    events: list[dict[str, Any]] = []
    g.on_event(events.append)
    streamed = g.forward(x, stream=True, chunk_size=3)
    np.testing.assert_array_equal(streamed, g.forward(x))
    progress = [e for e in events if e["event_type"] == "BatchProgress"]
    assert [
        (p["node_id"], p["batch"], p["n_batches"], p["rows"], p["total_rows"]) for p in progress
    ] == [
        (None, 1, 4, 3, 10),
        (None, 2, 4, 3, 10),
        (None, 3, 4, 3, 10),
        (None, 4, 4, 1, 10),
    ]
    stream_nodes = [
        e for e in events[: events.index(progress[-1]) + 10] if e["event_type"] == "NodeCompleted"
    ]
    assert [e["node_id"] for e in stream_nodes][:3] == ["mean_center", "add_one", "scale"]
    assert "NodeCacheHit" not in [e["event_type"] for e in events[: len(events) // 2]]


def test_streamed_list_input_becomes_one_list() -> None:
    g = Graph.somatize(Identity())
    g.fit([0])
    assert g.forward([1, 2, 3, 4, 5], stream=True, chunk_size=2) == [1, 2, 3, 4, 5]
    assert g.forward(7, stream=True) == 7


def test_stream_on_non_linear_graph_raises_before_user_code() -> None:
    left, right = AddOne(), AddOne()
    g = Graph.somatize(left | right)
    g.fit(1)
    n_calls = len(left._calls) + len(right._calls)
    with pytest.raises(SomaConfigError, match="streaming requires a linear graph"):
        g.forward(1, stream=True)
    assert len(left._calls) + len(right._calls) == n_calls


def test_stream_modes_evolving_and_barrier() -> None:
    class Running(Filter):
        _stream_mode = "evolving"

        def fit(self, x: Any, y: Any = None) -> int:
            return 0

        def forward(self, x: Any, state: int) -> list[int]:
            return [v + state for v in x]

        def update(self, x: Any, state: int) -> int:
            return state + len(x)

    class Total(Filter):
        _kind = "stateless"
        _stream_mode = "barrier"

        def forward(self, x: Any, state: Any) -> list[int]:
            return [sum(x)]

    g = Graph.somatize(Running() >> Total() >> Identity())
    g.fit([0])
    # chunks [1,2] [3,4] [5]: offsets 0, 2, 4 -> [1,2,5,6,9]; the barrier sums once.
    assert g.forward([1, 2, 3, 4, 5], stream=True, chunk_size=2) == [23]
    assert g.get_state("running") == 0


def test_chunk_size_is_validated_after_the_fitted_check() -> None:
    g = Graph.somatize(Identity())
    with pytest.raises(SomaError, match="graph must be fitted before forward"):
        g.forward([1], stream=True, chunk_size=0)
    g.fit([1])
    with pytest.raises(SomaConfigError):
        g.forward([1], stream=True, chunk_size=0)


# -- the runner seam ---------------------------------------------------------------------


def test_in_process_runner_wraps_user_errors_with_node_and_phase() -> None:
    spec = RunnerSpec(
        phase="run", node_ids=("b",), filters={"b": Boom("forward")}, seed=None, timeout=None
    )
    with InProcessRunner(spec) as runner:
        assert runner.where == "local"
        with pytest.raises(FilterError) as info:
            runner.forward("b", 1, None)
    assert info.value.node_id == "b" and info.value.phase == "run"


def test_registered_runner_kind_executes_subprocess_nodes() -> None:
    opened: list[RunnerSpec] = []

    class Tagged(InProcessRunner):
        where = "subprocess"

        def __init__(self, spec: RunnerSpec) -> None:
            super().__init__(spec)
            opened.append(spec)

    class WithTagged(Graph):
        def _runner_factories(self) -> dict[str, Any]:
            return {**super()._runner_factories(), "subprocess": Tagged}

    g = WithTagged()
    g.node(AddOne(), target="subprocess")
    g.node(AddOne())
    events: list[dict[str, Any]] = []
    g.on_event(events.append, event_types=["NodeStarted"])
    g.fit(1)
    assert [(e["node_id"], e["target"]) for e in events] == [
        ("add_one", "subprocess"),
        ("add_one_2", "local"),
    ]
    assert opened[0].node_ids == ("add_one",) and opened[0].phase == "fit"
    isolated = WithTagged(isolation="subprocess")
    isolated.node(AddOne())
    assert isolated.run(1) == {"add_one": 2}
    assert opened[-1].node_ids == ("add_one",)


def test_a_runner_kind_without_a_factory_runs_in_process() -> None:
    class LocalOnly(Graph):
        def _runner_factories(self) -> dict[str, Any]:
            return {"local": InProcessRunner}

    g = LocalOnly()
    nid = g.node(AddOne(), target="subprocess")
    events: list[dict[str, Any]] = []
    g.on_event(events.append, event_types=["NodeStarted"])
    assert g.run(1) == {nid: 2}
    assert events[0]["target"] == "local"
    assert g._nodes[nid].target == "subprocess"


def test_runner_errors_pass_through_with_node_id_filled() -> None:
    class Crashing(InProcessRunner):
        def forward(self, node_id: str, x: Any, state: Any) -> Any:
            raise ChildError("child_crashed", "exit code -9", where="subprocess")

    class G(Graph):
        def _runner_factories(self) -> dict[str, Any]:
            return {"local": Crashing}

    g = G()
    g.node(AddOne())
    with pytest.raises(ChildError) as info:
        g.run(1)
    assert info.value.node_id == "add_one"


def test_remote_step_without_remote_runner_raises_compile_error_before_user_code() -> None:
    class WithoutRemoteRunner(Graph):
        def _remote_runner_factory(self) -> Any:
            return None

    f = AddOne()
    g = WithoutRemoteRunner.somatize(f)
    g.add_worker("127.0.0.1:9")
    with pytest.raises(CompileError, match="no remote runner"):
        g.fit(1)
    assert f._calls == []


def test_loop_and_branch_steps_are_refused() -> None:
    from soma.runtime.events import EventHub
    from soma.runtime.executor import Run

    g = Graph.somatize(AddOne())
    run = Run(
        phase="run",
        shape=g._shape(),
        nodes=g._nodes,
        plan=Loop("add_one", Execute("add_one")),
        hub=EventHub(),
    )
    with pytest.raises(CompileError, match="Loop"):
        run.execute()


class LocalBlocks:
    """A stand-in remote runner that executes each block's nodes in this process."""

    requests: ClassVar[list[BlockRequest]] = []

    def __init__(self, target: str, spec: RunnerSpec) -> None:
        self.filters = spec.filters

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run_block(
        self, request: BlockRequest, emit: Callable[[dict[str, Any]], None]
    ) -> BlockResult:
        LocalBlocks.requests.append(request)
        preds: dict[str, list[str]] = {n: [] for n in request.nodes}
        for src, dst in request.edges:
            preds[dst].append(src)
        values: dict[str, Any] = dict(request.external)
        states: dict[str, Any] = {}
        for nid in request.nodes:
            ps = preds[nid]
            x = (
                request.x
                if not ps
                else values[ps[0]]
                if len(ps) == 1
                else {p: values[p] for p in ps}
            )
            f = self.filters[nid]
            state = None
            if getattr(f, "_kind", "trainable") != "stateless":
                state = f.fit(x, request.y) if request.phase == "fit" else request.states[nid]
                states[nid] = state
            values[nid] = f.forward(x, state)
        return BlockResult(
            {n: values[n] for n in request.outputs}, states if request.phase == "fit" else {}
        )


def test_remote_blocks_go_through_the_remote_runner_seam() -> None:
    class Distributed(Graph):
        def _remote_runner_factory(self) -> Any:
            return LocalBlocks

    LocalBlocks.requests.clear()
    g = Distributed.somatize(Scale(2.0) >> AddOne())
    g.add_worker("ws://127.0.0.1:9")
    local = g.node(AddOne(), target="local")
    g.connect("add_one", local)
    g.fit(np.ones(2))
    (request,) = LocalBlocks.requests
    assert request.nodes == ("scale", "add_one") and request.outputs == ("add_one",)
    assert request.has_roots and request.phase == "fit"
    assert set(request.keys) == {"scale", "add_one"}
    assert g.get_state("scale") == {"m": 2.0}
    np.testing.assert_array_equal(g.forward(np.ones(2)), [4.0, 4.0])


def test_parameter_owners_are_detected() -> None:
    class Owner(Filter):
        def named_parameters(self) -> list[Any]:
            return []

    class Wrapper(Filter):
        def __init__(self) -> None:
            super().__init__()
            self._unused = None
            self.net = Owner()

    assert has_parameter_owner(Owner()) and has_parameter_owner(Wrapper())
    assert not has_parameter_owner(Scale())


def test_parameter_owner_fit_always_runs() -> None:
    class Owner(Scale):
        def named_parameters(self) -> list[Any]:
            return []

    f = Owner()
    g = Graph.somatize(f)
    g.fit(np.ones(2))
    g.fit(np.ones(2))
    assert len(calls_of(f, "fit")) == 2
