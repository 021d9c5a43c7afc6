"""Plan compilation, placement, diagnostics and the text formats (api.md §5.1, §5.7, §7)."""

from __future__ import annotations

import json

import pytest

from soma.errors import SomaConfigError, WorkerUnavailableError
from soma.runtime.plan import (
    Branch,
    Cached,
    Composite,
    Empty,
    Execute,
    GraphShape,
    Loop,
    NodeSpec,
    Parallel,
    Remote,
    Sequence,
    WorkerEntry,
    cached_count,
    check_mode,
    compile_plan,
    diagnostics,
    normalize_target,
    parallel_branches,
    resolve_placement,
)
from soma.runtime.render import graph_graphviz, graph_mermaid, graph_text, plan_mermaid, plan_text


def shape(
    nodes: list[str],
    edges: list[tuple[str, str]] = (),  # type: ignore[assignment]
    *,
    differentiable: set[str] = frozenset(),  # type: ignore[assignment]
    targets: dict[str, str] | None = None,
    names: dict[str, str] | None = None,
) -> GraphShape:
    targets = targets or {}
    names = names or {}
    return GraphShape(
        tuple(
            NodeSpec(
                n,
                names.get(n, n.upper()),
                trainable=True,
                differentiable=n in differentiable,
                target=targets.get(n, "any"),
            )
            for n in nodes
        ),
        tuple(edges),
    )


FORK = shape(["a", "b", "b_2", "m"], [("a", "b"), ("a", "b_2"), ("b", "m"), ("b_2", "m")])


def test_fork_merge_plan_text_is_exact() -> None:
    plan = compile_plan(FORK)
    assert plan_text(plan) == (
        "Sequence:\n  Execute(a)\n  Parallel:\n    Execute(b)\n    Execute(b_2)\n  Execute(m)\n"
    )
    assert parallel_branches(plan) == 2
    assert cached_count(plan) == 0


def test_plan_dict_is_json_serialisable_with_the_spec_keys() -> None:
    as_dict = compile_plan(FORK).to_dict()
    assert json.loads(json.dumps(as_dict)) == {
        "type": "Sequence",
        "steps": [
            {"type": "Execute", "node_id": "a"},
            {
                "type": "Parallel",
                "branches": [
                    {"type": "Execute", "node_id": "b"},
                    {"type": "Execute", "node_id": "b_2"},
                ],
            },
            {"type": "Execute", "node_id": "m"},
        ],
    }


def test_empty_graph_compiles_to_empty_and_single_node_unwraps() -> None:
    assert compile_plan(GraphShape(())) == Empty()
    assert plan_text(Empty()) == "Empty\n"
    assert compile_plan(shape(["a"])) == Execute("a")


def test_canonical_order_sorts_by_depth_then_insertion() -> None:
    # a >> (b >> c | d) >> m
    g = shape(
        ["a", "b", "c", "d", "m"], [("a", "b"), ("b", "c"), ("a", "d"), ("c", "m"), ("d", "m")]
    )
    assert g.order == ("a", "b", "d", "c", "m")
    assert g.depths == {"a": 0, "b": 1, "d": 1, "c": 2, "m": 3}


def test_depth_is_computed_when_edges_point_back_in_insertion_order() -> None:
    g = shape(["late", "early"], [("early", "late")])
    assert g.order == ("early", "late")
    assert compile_plan(g) == Sequence((Execute("early"), Execute("late")))


def test_cached_steps_render_with_sixteen_hex_and_count() -> None:
    key = "0123456789abcdef" * 4
    plan = compile_plan(FORK, cached={"a": key, "m": key})
    text = plan_text(plan)
    assert "  Cached(a, 0123456789abcdef)\n" in text
    assert cached_count(plan) == 2
    assert plan.to_dict()["steps"][0] == {"type": "Cached", "node_id": "a", "key": key}
    assert "    a[/a cached/]" in plan_mermaid(plan, FORK).splitlines()


def test_consecutive_differentiable_nodes_form_a_composite() -> None:
    g = shape(
        ["p", "a", "b", "c"], [("p", "a"), ("a", "b"), ("b", "c")], differentiable={"a", "b", "c"}
    )
    plan = compile_plan(g)
    assert plan == Sequence((Execute("p"), Composite(("a", "b", "c"))))
    assert plan_text(plan) == "Sequence:\n  Execute(p)\n  Composite[a \u2192 b \u2192 c]\n"
    mermaid = plan_mermaid(plan, g).splitlines()
    assert mermaid[:6] == [
        "graph TD",
        "    p[p]",
        "    subgraph composite_0",
        "    a[a]",
        "    b[b]",
        "    c[c]",
    ]
    assert mermaid[6] == "    end"


def test_a_single_differentiable_node_stays_execute() -> None:
    g = shape(["a", "b"], [("a", "b")], differentiable={"b"})
    assert compile_plan(g) == Sequence((Execute("a"), Execute("b")))


def test_cached_differentiable_run_is_broken_by_cached_step() -> None:
    g = shape(["a", "b", "c"], [("a", "b"), ("b", "c")], differentiable={"a", "b", "c"})
    plan = compile_plan(g, cached={"b": "f" * 64})
    assert plan == Sequence((Execute("a"), Cached("b", "f" * 64), Execute("c")))


def test_whole_graph_on_one_worker_is_one_remote_block() -> None:
    placement = resolve_placement(FORK, [WorkerEntry("ws://w1:1")])
    plan = compile_plan(FORK, placement=placement)
    assert plan_text(plan) == (
        "Remote(a, target=ws://w1:1):\n"
        "  Sequence:\n"
        "    Execute(a)\n"
        "    Parallel:\n"
        "      Execute(b)\n"
        "      Execute(b_2)\n"
        "    Execute(m)\n"
    )
    assert parallel_branches(plan) == 2
    assert '    b["b @ ws://w1:1"]' in plan_mermaid(plan, FORK).splitlines()


def test_local_node_splits_remote_blocks() -> None:
    g = shape(["a", "b", "c"], [("a", "b"), ("b", "c")], targets={"b": "local"})
    plan = compile_plan(g, placement=resolve_placement(g, [WorkerEntry("ws://w:1")]))
    assert plan == Sequence(
        (Remote("a", "ws://w:1", Execute("a")), Execute("b"), Remote("c", "ws://w:1", Execute("c")))
    )


def test_parallel_with_mixed_targets_keeps_individual_remote_members() -> None:
    g = shape(["a", "b"], targets={"a": "tag:gpu"})
    workers = [WorkerEntry("ws://cpu:1", ("cpu",)), WorkerEntry("ws://gpu:1", ("gpu",))]
    plan = compile_plan(g, placement=resolve_placement(g, workers))
    assert plan == Parallel(
        (Remote("a", "ws://gpu:1", Execute("a")), Remote("b", "ws://cpu:1", Execute("b")))
    )


def test_remote_block_bodies_get_composites() -> None:
    g = shape(["a", "b"], [("a", "b")], differentiable={"a", "b"})
    plan = compile_plan(g, placement=resolve_placement(g, [WorkerEntry("ws://w:1")]))
    assert plan == Remote("a", "ws://w:1", Composite(("a", "b")))


def test_placement_without_workers_is_local_and_unmatched_tag_raises() -> None:
    g = shape(["a"], targets={"a": "tag:gpu"})
    assert resolve_placement(g, []) == {}
    with pytest.raises(WorkerUnavailableError, match="no worker matches target 'tag:gpu'"):
        resolve_placement(g, [WorkerEntry("ws://cpu:1", ("cpu",))])


def test_placement_by_worker_id_and_coordinator_fallback() -> None:
    g = shape(["a", "b"], targets={"a": "worker:w2", "b": "tag:tpu"})
    workers = [WorkerEntry("ws://one:1", (), "w1"), WorkerEntry("ws://two:1", (), "w2")]
    assert resolve_placement(g, workers, coordinator=True) == {"a": "ws://two:1", "b": "tag:tpu"}
    with pytest.raises(WorkerUnavailableError):
        resolve_placement(g, workers)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (None, "any"),
        ("local", "local"),
        ("subprocess", "subprocess"),
        ("any", "any"),
        ("gpu", "tag:gpu"),
        ("tag:gpu", "tag:gpu"),
        ("worker:w-1", "worker:w-1"),
    ],
)
def test_targets_normalise(raw: str | None, normalised: str) -> None:
    assert normalize_target(raw) == normalised


@pytest.mark.parametrize("raw", ["", "tag:", "worker:", "a b", "x:y", 3])
def test_invalid_targets_raise(raw: object) -> None:
    with pytest.raises(SomaConfigError):
        normalize_target(raw)  # type: ignore[arg-type]


def test_gradient_diagnostic_only_between_differentiable_nodes() -> None:
    g = shape(["a", "b", "c"], [("a", "b"), ("b", "c")], differentiable={"a", "c"})
    assert diagnostics(g) == [
        {
            "node_id": "b",
            "level": "warning",
            "message": "gradient flow interrupted at `b` (Trainable). Gradients from upstream will not "
            "reach downstream filters through this node.",
        }
    ]
    assert diagnostics(shape(["a", "b"], [("a", "b")])) == []


def test_cache_and_placement_diagnostics_in_canonical_order() -> None:
    g = shape(["b", "a"], [("a", "b")], targets={"b": "tag:gpu"})
    assert diagnostics(g, unhashable_params=["b", "a"]) == [
        {
            "node_id": "a",
            "level": "warning",
            "message": "parameters of `a` cannot be hashed; node will not be cached",
        },
        {
            "node_id": "b",
            "level": "warning",
            "message": "parameters of `b` cannot be hashed; node will not be cached",
        },
        {
            "node_id": "b",
            "level": "info",
            "message": "target 'tag:gpu' ignored: no workers configured",
        },
    ]
    assert diagnostics(g, workers_configured=True) == []


def test_modes() -> None:
    assert check_mode("no_cache") == "no_cache"
    with pytest.raises(SomaConfigError) as info:
        check_mode("fast")
    assert (
        str(info.value) == "Unknown mode: fast. Use 'inference', 'differentiable', or 'no_cache'."
    )


def test_reserved_variants_serialise_and_render() -> None:
    loop = Loop("l", Execute("x"), max_iterations=3)
    branch = Branch("br", (("yes", Execute("y")), ("no", Empty())))
    plan = Sequence((loop, branch, Loop("m", Execute("z"))))
    assert plan_text(plan) == (
        "Sequence:\n"
        "  Loop(l, max=3):\n"
        "    Execute(x)\n"
        "  Branch(br):\n"
        "    [yes]:\n"
        "      Execute(y)\n"
        "    [no]:\n"
        "      Empty\n"
        "  Loop(m, max=None):\n"
        "    Execute(z)\n"
    )
    assert loop.to_dict() == {
        "type": "Loop",
        "node_id": "l",
        "body": {"type": "Execute", "node_id": "x"},
        "max_iterations": 3,
    }
    assert branch.to_dict()["arms"] == [
        ["yes", {"type": "Execute", "node_id": "y"}],
        ["no", {"type": "Empty"}],
    ]


def test_graph_renderings_are_exact() -> None:
    g = shape(
        ["a", "b", "b_2", "m"], list(FORK.edges), names={"a": "A", "b": "B", "b_2": "B", "m": "M"}
    )
    assert graph_mermaid(g) == (
        "graph LR\n    a[a]\n    b[b]\n    b_2[b_2]\n    m[m]\n"
        "    a --> b\n    a --> b_2\n    b --> m\n    b_2 --> m"
    )
    assert graph_graphviz(g) == (
        'digraph G {\n    rankdir=LR;\n    "a" [label="a" shape=box];\n    "b" [label="b" shape=box];\n'
        '    "b_2" [label="b_2" shape=box];\n    "m" [label="m" shape=box];\n    "a" -> "b";\n'
        '    "a" -> "b_2";\n    "b" -> "m";\n    "b_2" -> "m";\n}\n'
    )
    assert graph_text(g) == (
        "Graph (4 nodes, 4 edges)\n├── a (A)\n├── b (B) ← a\n├── b_2 (B) ← a\n└── m (M) ← b, b_2"
    )


def test_text_omits_class_name_equal_to_id() -> None:
    g = GraphShape((NodeSpec("Doubler", "Doubler", trainable=False),))
    assert graph_text(g) == "Graph (1 nodes, 0 edges)\n└── Doubler"
    assert graph_text(GraphShape(())) == "Graph (0 nodes, 0 edges)"
