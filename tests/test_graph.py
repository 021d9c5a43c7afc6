"""Graph construction, building, inspection, rendering and worker registry (api.md §3, §4, §7)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _graph_filters import AddOne, Identity, MeanCenter, Scale, Sum

from soma import (
    Cache,
    CacheError,
    CycleError,
    Filter,
    NodeNotFoundError,
    NotFittedError,
    SomaConfigError,
    SomaError,
    SomaWarning,
    WorkerUnavailableError,
    search,
)
from soma.graph import Graph


class A(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x


class B(Filter):
    w: float

    def __init__(self, w: float = 1.0) -> None:
        super().__init__(w=w)

    def fit(self, x: Any, y: Any = None) -> dict[str, float]:
        return {"w": self.w}

    def forward(self, x: Any, state: Any) -> Any:
        return x * state["w"]


class M(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return sum(x.values())


class Doubler(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x * 2


class CamelCaseHTTPFilter(Doubler):
    pass


class Differentiable(Filter):
    _kind = "stateless"
    _differentiable = True

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Tuned(Filter):
    lr = search(1e-3, 1e-1, scale="log", default=1e-2)
    layers = search(1, 4)

    def fit(self, x: Any, y: Any = None) -> dict[str, Any]:
        return {"lr": self.lr}

    def forward(self, x: Any, state: Any) -> Any:
        return x


# -- constructor ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cache": "yes"},
        {"cache_max_bytes": -1},
        {"cache_max_bytes": 1.5},
        {"seed": "1"},
        {"seed": True},
        {"max_parallel": 0},
        {"max_parallel": 2.0},
        {"isolation": "docker"},
        {"cache_dir": 3},
    ],
)
def test_bad_constructor_values_raise_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SomaConfigError):
        Graph(**kwargs)


def test_constructor_properties_and_cache_choices(tmp_path: Path) -> None:
    g = Graph(seed=3, max_parallel=2, isolation="subprocess", cache_dir=tmp_path / "c")
    assert g.seed == 3 and g.max_parallel == 2 and g.isolation == "subprocess" and not g.fitted
    assert g.cache is not None and g.cache.directory == tmp_path / "c"
    assert (tmp_path / "c").is_dir()
    g.seed = None
    assert g.seed is None
    with pytest.raises(SomaConfigError):
        g.seed = 1.5  # type: ignore[assignment]
    assert Graph(cache=False).cache is None
    shared = Cache()
    assert Graph(cache=shared, cache_dir=tmp_path / "ignored").cache is shared
    assert not (tmp_path / "ignored").exists()
    with pytest.raises(AttributeError):
        g.fitted = True  # type: ignore[misc]


def test_cache_dir_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOMA_CACHE_DIR", str(tmp_path / "env"))
    assert Graph().cache.directory == tmp_path / "env"  # type: ignore[union-attr]
    monkeypatch.setenv("SOMA_CACHE_DIR", "")
    assert Graph().cache.directory is None  # type: ignore[union-attr]


def test_unusable_cache_dir_raises_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError):
        Graph(cache_dir=blocker / "sub")


def test_graph_is_subclassable_and_accepts_attributes() -> None:
    class MyGraph(Graph):
        pass

    g = MyGraph.somatize(A() >> Doubler())
    assert type(g) is MyGraph
    g.note = "mine"  # type: ignore[attr-defined]
    assert g.note == "mine"  # type: ignore[attr-defined]


# -- building -----------------------------------------------------------------------------


def test_auto_ids_and_explicit_ids() -> None:
    g = Graph()
    assert [g.node(Doubler()) for _ in range(3)] == ["doubler", "doubler_2", "doubler_3"]
    assert g.node(CamelCaseHTTPFilter()) == "camel_case_h_t_t_p_filter"
    assert g.node("my_scaler", B()) == "my_scaler"
    assert g.node("my_scaler", B()) == "my_scaler_2"
    assert g.nodes() == [
        "doubler",
        "doubler_2",
        "doubler_3",
        "camel_case_h_t_t_p_filter",
        "my_scaler",
        "my_scaler_2",
    ]


@pytest.mark.parametrize("args", [(), ("a", Doubler(), 3)])
def test_node_argument_count(args: tuple[Any, ...]) -> None:
    g = Graph()
    with pytest.raises(
        ValueError, match=f"node\\(\\) takes 1 or 2 positional arguments, got {len(args)}"
    ):
        g.node(*args)
    assert len(g) == 0


@pytest.mark.parametrize("bad", ["", "a.b", "__x", "has space", "é!"])
def test_invalid_explicit_ids(bad: str) -> None:
    g = Graph()
    with pytest.raises(SomaConfigError, match=f"invalid node id '{bad}'"):
        g.node(bad, Doubler())
    assert len(g) == 0


def test_non_str_id_non_filter_and_bad_target_change_nothing() -> None:
    g = Graph()
    with pytest.raises(TypeError):
        g.node(3, Doubler())
    with pytest.raises(
        TypeError, match="node\\(\\) expects a filter with a forward\\(x, state\\) method, got int"
    ):
        g.node(5)
    with pytest.raises(SomaConfigError, match="invalid target"):
        g.node(Doubler(), target="tag:")
    assert len(g) == 0


def test_bad_input_leaves_a_fitted_graph_fitted_with_its_states() -> None:
    g = Graph.somatize(MeanCenter() >> Scale(2.0))
    g.fit(np.arange(4.0))
    state, before = g.get_state("mean_center"), g.forward(np.arange(4.0))

    class BogusKind:
        _kind = "bogus"

        def fit(self, x: Any, y: Any = None) -> Any:
            return {}

        def forward(self, x: Any, state: Any) -> Any:
            return x

    refusals = [
        (NodeNotFoundError, lambda: g.edge("mean_center", "nowhere")),
        (CycleError, lambda: g.edge("scale", "mean_center")),
        (SomaConfigError, lambda: g.node(BogusKind())),
        (SomaConfigError, lambda: g.node("bad id", Scale(1.0))),
        (TypeError, lambda: g.node(object())),
        (SomaConfigError, lambda: g.node()),
    ]
    for error, call in refusals:
        with pytest.raises(error):
            call()
    assert g.fitted and g.nodes() == ["mean_center", "scale"] and g.edges() == [("mean_center", "scale")]
    assert g.get_state("mean_center") is state
    np.testing.assert_array_equal(g.forward(np.arange(4.0)), before)


def test_duck_typed_filter_is_accepted() -> None:
    class Duck:
        _kind = "stateless"

        def forward(self, x: Any, state: Any) -> Any:
            return x + 10

    g = Graph()
    assert g.node(Duck()) == "duck"
    g.fit(1)
    assert g.forward(1) == 11


def test_somatize_fork_join_nodes_and_edges() -> None:
    g = Graph.somatize(A() >> (B(1.0) | B(2.0)) >> M())
    assert g.nodes() == ["a", "b", "b_2", "m"]
    assert g.edges() == [("a", "b"), ("a", "b_2"), ("b", "m"), ("b_2", "m")]


def test_somatize_two_roots_and_fork_into_fork() -> None:
    g = Graph.somatize(A() >> B() | Doubler())
    roots = [n for n in g.nodes() if not any(dst == n for _, dst in g.edges())]
    assert roots == ["a", "doubler"]
    g2 = Graph.somatize((A() | Doubler()) >> (B() | M()))
    assert g2.edges() == [("a", "b"), ("doubler", "b"), ("a", "m"), ("doubler", "m")]


def test_same_filter_object_twice_becomes_two_nodes() -> None:
    f = Doubler()
    g = Graph.somatize(f >> f)
    assert g.nodes() == ["doubler", "doubler_2"] and g.get_filter("doubler_2") is f


def test_edge_to_unknown_node() -> None:
    g = Graph()
    g.node("a", A())
    with pytest.raises(NodeNotFoundError, match="node `x` not found in graph") as info:
        g.edge("x", "y")
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, LookupError)
    with pytest.raises(NodeNotFoundError, match="`y`"):
        g.edge("a", "y")
    with pytest.raises(NodeNotFoundError):
        g.edge("a", ["not", "an", "id"])  # type: ignore[arg-type]
    assert ["a"] not in g and g.edges() == []


def test_cycles_are_refused_and_leave_the_graph_unchanged() -> None:
    g = Graph.somatize(A() >> B() >> M())
    for src, dst in [("m", "a"), ("b", "a"), ("b", "b")]:
        with pytest.raises(CycleError, match="^cycle detected in graph$"):
            g.edge(src, dst)
    assert g.edges() == [("a", "b"), ("b", "m")]


def test_duplicate_edge_is_a_no_op() -> None:
    g = Graph.somatize(A() >> B())
    g.fit(1)
    g.connect("a", "b")
    assert g.edges() == [("a", "b")] and g.fitted


@pytest.mark.parametrize(
    "graph",
    [Graph.somatize(A() >> Doubler()), Graph.somatize(B()), Graph()],
    ids=["stateless", "trainable", "empty"],
)
def test_forward_before_fit_raises(graph: Graph) -> None:
    with pytest.raises(RuntimeError, match="graph must be fitted before forward"):
        graph.forward(1)
    with pytest.raises(NotFittedError):
        graph.forward(1, stream=True)


def test_adding_node_or_edge_after_fit_unfits() -> None:
    g = Graph.somatize(A() >> B())
    g.fit(1)
    assert g.fitted
    nid = g.node(Doubler())
    assert not g.fitted
    g.fit(1)
    g.edge("b", nid)
    assert not g.fitted


# -- inspection and rendering -------------------------------------------------------------


def test_renderings_and_repr() -> None:
    g = Graph.somatize(A() >> (B(1.0) | B(2.0)) >> M())
    assert g.to_mermaid().startswith("graph LR\n    a[a]")
    graphviz = g.to_graphviz()
    assert (
        graphviz.startswith("digraph G {")
        and "rankdir=LR;" in graphviz
        and graphviz.endswith("}\n")
    )
    assert g.to_text().startswith("Graph (4 nodes, 4 edges)")
    assert "└── m (M) ← b, b_2" in g.to_text()
    assert str(g) == g.to_text()
    single = Graph()
    single.node(A())
    assert repr(single) == "Graph(1 nodes, 0 edges, fitted=false)"
    single.fit(1)
    assert repr(single) == "Graph(1 nodes, 0 edges, fitted=true)"
    assert len(g) == 4 and "b_2" in g and "zz" not in g


def test_compile_result_keys_and_exact_plan_text() -> None:
    g = Graph.somatize(A() >> (B(1.0) | B(2.0)) >> M())
    result = g.compile()
    assert set(result) == {
        "total_nodes",
        "cached_nodes",
        "parallel_branches",
        "diagnostics",
        "plan_text",
        "plan_mermaid",
        "plan",
    }
    assert (
        result["plan_text"]
        == "Sequence:\n  Execute(a)\n  Parallel:\n    Execute(b)\n    Execute(b_2)\n  Execute(m)\n"
    )
    assert result["plan_mermaid"].startswith("graph TD")
    assert (result["total_nodes"], result["cached_nodes"], result["parallel_branches"]) == (4, 0, 2)
    assert result["diagnostics"] == []
    with pytest.raises(
        SomaConfigError,
        match=r"Unknown mode: fast\. Use 'inference', 'differentiable', or 'no_cache'\.",
    ):
        g.compile("fast")


def test_compile_composites_and_gradient_warning() -> None:
    g = Graph.somatize(Differentiable() >> Differentiable())
    assert g.compile()["plan_text"] == "Composite[differentiable \u2192 differentiable_2]\n"
    g2 = Graph.somatize(Differentiable() >> B() >> Differentiable())
    (diag,) = g2.compile("differentiable")["diagnostics"]
    assert diag["node_id"] == "b" and diag["level"] == "warning"
    assert diag["message"].startswith("gradient flow interrupted at `b` (Trainable).")


def test_compile_reports_unhashable_parameters() -> None:
    g = Graph()
    g.node(B(w=threading.Lock()))  # type: ignore[arg-type]
    assert g.compile()["diagnostics"] == [
        {
            "node_id": "b",
            "level": "warning",
            "message": "parameters of `b` cannot be hashed; node will not be cached",
        }
    ]


def test_targets_without_workers_are_info_diagnostics() -> None:
    g = Graph()
    g.node(A(), target="gpu")
    g.node(Doubler(), target="local")
    assert g.compile()["diagnostics"] == [
        {
            "node_id": "a",
            "level": "info",
            "message": "target 'tag:gpu' ignored: no workers configured",
        }
    ]
    g.fit(1)
    assert g.forward(1) == {"a": 1, "doubler": 2}


def test_workers_put_the_whole_graph_in_one_remote_block() -> None:
    g = Graph.somatize(A() >> (B(1.0) | B(2.0)) >> M())
    g.add_worker("http://127.0.0.1:9", tags="cpu, big")
    text = g.compile()["plan_text"]
    assert text.startswith("Remote(a, target=ws://127.0.0.1:9):\n  Sequence:\n")
    assert g.compile()["diagnostics"] == []


def test_unmatched_tag_raises_before_user_code() -> None:
    f = Scale()
    g = Graph()
    g.node(f, target="tag:gpu")
    g.add_worker("127.0.0.1:9", tags=["cpu"])
    with pytest.raises(WorkerUnavailableError, match="no worker matches target 'tag:gpu'"):
        g.fit(np.ones(2))
    with pytest.raises(WorkerUnavailableError):
        g.compile()
    assert f._calls == []


def test_nodes_edges_filters_and_states() -> None:
    f = B(3.0)
    g = Graph.somatize(A() >> f)
    assert g.get_filter("b") is f
    assert g.get_state("b") is None
    g.fit(1)
    assert g.get_state("b") == {"w": 3.0} and g.get_state("a") is None
    for method in (g.get_filter, g.get_state, g.filter_requirements):
        with pytest.raises(NodeNotFoundError):
            method("nope")


def test_filter_sources() -> None:
    g = Graph.somatize(A() >> B())
    assert "class B(Filter):" in g.filter_source("b")  # type: ignore[operator]
    assert g.filter_source("nope") is None
    assert list(g.filter_sources_dict()) == ["a", "b"]


def test_filter_requirements_are_sorted_and_unique() -> None:
    class Needs(A):
        _requirements = ("scipy>=1.0", "numpy", "scipy>=1.0")

    g = Graph.somatize(Needs())
    assert g.filter_requirements("needs") == ["numpy", "scipy>=1.0"]


def test_search_space_names_dimensions_per_node() -> None:
    g = Graph.somatize(A() >> Tuned() >> Tuned())
    space = g.search_space()
    assert [d["name"] for d in space] == [
        "tuned.lr",
        "tuned.layers",
        "tuned_2.lr",
        "tuned_2.layers",
    ]
    assert (
        space[0]["node_id"] == "tuned" and space[0]["param"] == "lr" and space[0]["scale"] == "log"
    )
    space[0]["low"] = 99
    assert Tuned.search_space()[0]["low"] == 1e-3


def test_with_params_validates_and_copies() -> None:
    g = Graph.somatize(A() >> Tuned() >> B(1.0), seed=5, max_parallel=2)
    g.add_worker("127.0.0.1:9")
    twin = g.with_params({"tuned.lr": 0.05, "b.w": 4.0})
    assert twin.get_filter("tuned").lr == 0.05 and g.get_filter("tuned").lr == 1e-2
    assert twin.get_filter("b").w == 4.0 and g.get_filter("b").w == 1.0
    assert twin.get_filter("a") is g.get_filter("a")
    assert twin.edges() == g.edges() and twin.seed == 5 and twin.max_parallel == 2
    assert twin.cache is g.cache and twin.workers() == g.workers() and not twin.fitted
    for bad in ({"nope.lr": 1}, {"tuned.depth": 1}, {"tuned": 1}, {"b._kind": "x"}):
        with pytest.raises(SomaConfigError):
            g.with_params(bad)


# -- workers and data store ---------------------------------------------------------------


def test_add_worker_normalises_addresses_and_tags() -> None:
    g = Graph()
    g.add_worker("http://h1:80", tags="gpu, ,big")
    g.add_worker("https://h2:443")
    g.add_worker("h3:9000", tags=["cpu"])
    g.add_worker("wss://h4:1", token="t")
    g.add_worker("h3:9000", tags=["other"])
    assert g.workers() == [
        {"address": "ws://h1:80", "tags": ["gpu", "big"], "source": "direct"},
        {"address": "wss://h2:443", "tags": [], "source": "direct"},
        {"address": "ws://h3:9000", "tags": ["other"], "source": "direct"},
        {"address": "wss://h4:1", "tags": [], "source": "direct"},
    ]


@pytest.mark.parametrize("address", ["ftp://h:1", "h", "h:99999", "", "ws://", "http://h:1/path/x"])
def test_invalid_worker_addresses(address: str) -> None:
    g = Graph()
    with pytest.raises(SomaConfigError, match="invalid worker address"):
        g.add_worker(address)
    assert g.workers() == []


def test_unreachable_coordinator_returns_direct_workers_with_a_warning(free_port: int) -> None:
    g = Graph()
    g.add_worker("127.0.0.1:1")
    g.add_worker("127.0.0.1:2")
    g.set_coordinator(f"http://127.0.0.1:{free_port}/")
    with pytest.warns(SomaWarning, match=f"http://127.0.0.1:{free_port}"):
        listed = g.workers()
    assert [w["source"] for w in listed] == ["direct", "direct"]
    with pytest.raises(SomaConfigError):
        g.set_coordinator("ws://127.0.0.1:1")


def test_data_store_validation() -> None:
    g = Graph()
    with pytest.raises(ValueError, match="unknown store type"):
        g.set_data_store("redis")
    with pytest.raises(ValueError, match="requires 'path'"):
        g.set_data_store("local")
    with pytest.raises(SomaConfigError, match="store type 's3' is not supported by this build"):
        g.set_data_store("s3", bucket="b")
    assert g.data_store is None
    g.set_data_store("local", path="/tmp/store")
    assert g.data_store == {"type": "local", "path": "/tmp/store", "cache_dir": None}


# -- one run at a time -------------------------------------------------------------------


def test_reentrant_fit_from_user_code_is_refused() -> None:
    holder: dict[str, Graph] = {}

    class Reenter(Filter):
        _kind = "stateless"

        def forward(self, x: Any, state: Any) -> Any:
            holder["g"].run(0)
            return x

    g = Graph.somatize(Reenter())
    holder["g"] = g
    with pytest.raises(SomaError) as info:
        g.fit(1)
    assert "graph is already running (re-entrant call)" in str(info.value)


def test_runs_from_two_threads_are_serialised() -> None:
    inside = threading.Event()
    release = threading.Event()
    active: list[int] = []
    peak: list[int] = []

    class Gate(Filter):
        _kind = "stateless"
        _cacheable = False

        def forward(self, x: Any, state: Any) -> Any:
            active.append(1)
            peak.append(len(active))
            inside.set()
            release.wait(5)
            active.pop()
            return x

    g = Graph.somatize(Gate())
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(g.run(1)))
    first.start()
    inside.wait(5)
    second = threading.Thread(target=lambda: results.append(g.run(2)))
    second.start()
    release.set()
    first.join(5)
    second.join(5)
    assert max(peak) == 1 and len(results) == 2


def test_fan_in_sum_of_parallel_branches() -> None:
    g = Graph.somatize(Identity() >> (AddOne() | MeanCenter()) >> Sum(), max_parallel=2)
    g.fit(np.arange(3.0))
    np.testing.assert_array_equal(g.forward(np.arange(3.0)), [0.0, 2.0, 4.0])
