"""Topology builders: Chain, Fork, the operator table, reprs, immutability and the walk."""

from __future__ import annotations

from typing import Any

import pytest

from soma import Chain, Filter, Fork
from soma.chain import walk
from soma.filter import default_node_id


class A(Filter):
    pass


class B(Filter):
    pass


class C(Filter):
    pass


class D(Filter):
    pass


class M(Filter):
    pass


class Doubler(Filter):
    pass


class Adder(Filter):
    pass


class Recorder:
    """Stands in for a Graph: auto ids with ``_2``, ``_3`` suffixes, edges in call order."""

    def __init__(self) -> None:
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []

    def add_node(self, obj: Any) -> str:
        base = node_id = default_node_id(type(obj).__name__)
        suffix = 2
        while node_id in self.nodes:
            node_id = f"{base}_{suffix}"
            suffix += 1
        self.nodes[node_id] = obj
        return node_id

    def connect(self, source: str, target: str) -> None:
        self.edges.append((source, target))

    def build(self, topology: Any, sources: list[str] | None = None) -> list[str]:
        return walk(topology, sources or [], self.add_node, self.connect)

    def roots(self) -> list[str]:
        targets = {target for _, target in self.edges}
        return [node_id for node_id in self.nodes if node_id not in targets]


# Construction, repr, equality, immutability


def test_chain_holds_its_steps_as_a_tuple_and_turns_list_steps_into_forks() -> None:
    a, b, c = A(), B(), C()
    chain = Chain([a, [b, c]])
    assert chain.steps[0] is a
    assert chain.steps[1] == Fork([Chain([b]), Chain([c])])
    assert isinstance(chain.steps, tuple)


def test_fork_wraps_non_chain_branches_as_one_step_chains() -> None:
    a, b = A(), B()
    inner = Chain([a, b])
    fork = Fork([inner, a])
    assert fork.branches[0] is inner
    assert fork.branches[1] == Chain([a])
    assert isinstance(fork.branches, tuple)


def test_fork_from_list_keeps_chains_splices_forks_and_wraps_the_rest() -> None:
    a, b, c, d = A(), B(), C(), D()
    chain = Chain([a, b])
    fork = Fork([c, d])
    assert Fork.from_list([chain, fork, a]).branches == (chain, Chain([c]), Chain([d]), Chain([a]))


def test_builders_reject_a_bare_step() -> None:
    with pytest.raises(TypeError, match="Chain\\(\\) expects a list of steps, got A"):
        Chain(A())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Fork\\(\\) expects a list of branches, got A"):
        Fork(A())  # type: ignore[arg-type]


def test_reprs_show_the_structure() -> None:
    class Five(Filter):
        pass

    assert repr(Doubler() >> Adder(amount=5)) == "Chain([Doubler(), Adder(amount=5)])"
    assert repr(Doubler() | Adder(amount=5) >> Five()) == (
        "Fork([Chain([Doubler()]), Chain([Adder(amount=5), Five()])])"
    )


def test_equality_is_structural_over_the_same_filter_objects() -> None:
    a, b = A(), B()
    assert Chain([a, b]) == Chain([a, b])
    assert hash(Chain([a, b])) == hash(Chain([a, b]))
    assert Chain([a, b]) != Chain([a, B()])
    assert Chain([a]) != Fork([a])
    assert Fork([a, b]) == Fork([Chain([a]), Chain([b])])


def test_topology_objects_are_immutable_and_operators_leave_operands_unchanged() -> None:
    a, b, c = A(), B(), C()
    chain = a >> b
    fork = a | b
    for obj, name in ((chain, "steps"), (fork, "branches")):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(obj, name, ())
        with pytest.raises(AttributeError, match="immutable"):
            delattr(obj, name)
    results = [chain >> c, chain | c, chain.to(c), chain.collect(c), fork >> c, fork | c, fork.collect(c)]
    assert all(result is not chain and result is not fork for result in results)
    assert chain == Chain([a, b])
    assert fork == Fork([a, b])


# The operator table (api.md section 3)


def test_filter_operators() -> None:
    f, g, h = A(), B(), C()
    chain, fork = Chain([g, h]), Fork([g, h])
    assert f >> chain == Chain([f, g, h])
    assert f >> [g, h] == Chain([f, Fork([g, h])])
    assert f >> fork == Chain([f, fork])
    assert f >> g == Chain([f, g])
    assert f | g == Fork([Chain([f]), Chain([g])])
    assert f | chain == Fork([Chain([f]), chain])
    assert f | fork == Fork([Chain([f]), Chain([g]), Chain([h])])
    assert f | [g, h] == Fork([Chain([f]), Chain([g]), Chain([h])])
    assert f.to(chain) == Chain([f, chain])
    assert f.to(chain).steps[1] is chain
    assert f.to([g, h]) == Chain([f, Fork([g, h])])
    assert f.to(g) == Chain([f, g])


def test_chain_operators() -> None:
    a, b, d, e, m = A(), B(), D(), C(), M()
    chain, other, fork = Chain([a, b]), Chain([d, e]), Fork([d, e])
    assert chain >> other == Chain([a, b, d, e])
    assert chain >> [d, e] == Chain([a, b, Fork([d, e])])
    assert chain >> m == Chain([a, b, m])
    assert chain >> fork == Chain([a, b, fork])
    assert chain | m == Fork([chain, Chain([m])])
    assert chain | other == Fork([chain, other])
    assert chain | fork == Fork([chain, Chain([d]), Chain([e])])
    assert chain | [d, e] == Fork([chain, Chain([d]), Chain([e])])
    assert chain.to(other) == Chain([a, b, other])
    assert chain.to([d, e]) == Chain([a, b, Fork([d, e])])
    assert chain.to(m) == Chain([a, b, m])
    assert chain.collect(m) == Chain([a, b, m])


def test_fork_operators() -> None:
    a, b, d, e, m = A(), B(), D(), C(), M()
    fork, chain, other = Fork([a, b]), Chain([d, e]), Fork([d, e])
    for combine in (Fork.__rshift__, Fork.to):
        assert combine(fork, chain) == Chain([fork, d, e])
        assert combine(fork, [d, e]) == Chain([fork, Fork([d, e])])
        assert combine(fork, m) == Chain([fork, m])
        assert combine(fork, other) == Chain([fork, other])
    assert fork | m == Fork([a, b, m])
    assert fork | chain == Fork([Chain([a]), Chain([b]), chain])
    assert fork | other == Fork([a, b, d, e])
    assert fork | [d, e] == Fork([a, b, d, e])
    assert fork.collect(m) == Chain([fork, m])


def test_lists_on_the_left_become_forks() -> None:
    a, b, d, e, m = A(), B(), D(), C(), M()
    left = Fork([a, b])
    chain, fork = Chain([d, e]), Fork([d, e])
    assert [a, b] >> m == Chain([left, m])
    assert [a, b] >> chain == Chain([left, d, e])
    assert [a, b] >> fork == Chain([left, fork])
    assert [a, b] | m == Fork([a, b, m])
    assert [a, b] | chain == Fork([Chain([a]), Chain([b]), chain])
    assert [a, b] | fork == Fork([a, b, d, e])


def test_shift_binds_tighter_than_pipe() -> None:
    a, b, c = A(), B(), C()
    assert a >> b | c == Fork([Chain([a, b]), Chain([c])])
    assert a | b >> c == Fork([Chain([a]), Chain([b, c])])


def test_operators_with_unsupported_left_operands_still_fail() -> None:
    with pytest.raises(TypeError):
        (1, 2) >> A()
    with pytest.raises(TypeError):
        3 | Chain([A()])


# The walk Graph.somatize uses


def test_fan_out_then_fan_in_creates_nodes_and_edges_in_order() -> None:
    graph = Recorder()
    terminals = graph.build(A() >> (B() | B()) >> M())
    assert list(graph.nodes) == ["a", "b", "b_2", "m"]
    assert graph.edges == [("a", "b"), ("a", "b_2"), ("b", "m"), ("b_2", "m")]
    assert terminals == ["m"]


def test_a_top_level_fork_has_several_roots() -> None:
    graph = Recorder()
    terminals = graph.build(A() >> B() | C())
    assert graph.roots() == ["a", "c"]
    assert graph.edges == [("a", "b")]
    assert terminals == ["b", "c"]


def test_fork_followed_by_fork_connects_all_to_all() -> None:
    graph = Recorder()
    terminals = graph.build((A() | B()) >> (C() | D()))
    assert graph.edges == [("a", "c"), ("b", "c"), ("a", "d"), ("b", "d")]
    assert terminals == ["c", "d"]


def test_nested_branches_keep_creation_order() -> None:
    graph = Recorder()
    graph.build(A() >> (B() >> C() | D()) >> M())
    assert list(graph.nodes) == ["a", "b", "c", "d", "m"]
    assert graph.edges == [("a", "b"), ("b", "c"), ("a", "d"), ("c", "m"), ("d", "m")]


def test_the_same_filter_twice_becomes_two_nodes() -> None:
    graph = Recorder()
    doubler = Doubler()
    graph.build(doubler >> doubler >> doubler)
    assert list(graph.nodes) == ["doubler", "doubler_2", "doubler_3"]
    assert all(obj is doubler for obj in graph.nodes.values())
    assert graph.edges == [("doubler", "doubler_2"), ("doubler_2", "doubler_3")]


def test_walk_accepts_a_single_filter_a_list_and_duck_typed_steps() -> None:
    class Duck:
        def forward(self, x: Any, state: Any) -> Any:
            return x

    graph = Recorder()
    assert graph.build(A()) == ["a"]
    assert graph.build([B(), C()]) == ["b", "c"]
    assert graph.build(Chain([Duck()]), ["a"]) == ["duck"]
    assert graph.edges == [("a", "duck")]


def test_an_empty_chain_returns_its_sources_and_an_empty_fork_none() -> None:
    graph = Recorder()
    assert graph.build(Chain([]), ["x", "y"]) == ["x", "y"]
    assert graph.build(Fork([]), ["x"]) == []
    assert graph.nodes == {} and graph.edges == []


def test_a_nested_chain_step_threads_the_sources_through() -> None:
    graph = Recorder()
    graph.build(A().to(B() >> C()).to(D()))
    assert graph.edges == [("a", "b"), ("b", "c"), ("c", "d")]
