"""The conformance contract: every case gives the same outputs and states in every execution mode.

A *case* is a topology plus data. ``observe`` runs it through a ``Graph`` (fit, forward
twice, run) in one mode: ``"local"`` (in process), ``"remote"`` (every node on the
worker) or ``"split"`` (every other node in canonical order pinned to ``target="local"``,
so local and remote blocks alternate and exchange external outputs). ``reference``
computes the same observation by calling the filters directly in canonical order, the
semantics of api.md §5. ``assert_same`` compares with equal types, dict key order and
``array_equal(..., equal_nan=True)``. Test files subclass :class:`ConformanceContract`
and set ``mode``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _conformance_filters as cf
import numpy as np
import pytest

from soma import Chain, Graph
from soma.chain import walk
from soma.context import seeded
from soma.filter import read_meta
from soma.runtime.batching import has_partial_fit, is_row_sliceable, partial_fit_loop

__all__ = ["CASES", "ConformanceContract", "assert_same", "observe", "reference"]


@dataclass(frozen=True)
class Case:
    name: str
    topology: Callable[[], Any]
    x: Callable[[], Any]
    y: Callable[[], Any] = lambda: None
    batch_size: int | None = None
    seed: int | None = None
    needs: str | None = None  # an optional module the case imports


def _rows() -> np.ndarray:
    return np.arange(24, dtype=float).reshape(8, 3) / 7.0


CASES = [
    Case("chain_stateless_list", lambda: cf.Double() >> cf.AddOne(), lambda: [1.5, -2.0, 0.25]),
    Case("chain_trainable_ndarray", lambda: cf.Center() >> cf.Scale(factor=2.0), _rows),
    Case("fork_join_fan_in_dict", lambda: cf.AddOne() >> (cf.Double() | cf.Center()) >> cf.Join(), _rows),
    Case(
        "diamond_trainable_join",
        lambda: cf.Center() >> (cf.Scale() | cf.AddOne()) >> cf.SumJoin(),
        _rows,
        lambda: np.arange(8.0),
    ),
    Case("several_sinks", lambda: cf.Center() >> [cf.Scale(), cf.Double(), cf.AddOne()], _rows),
    Case("unconnected_roots", lambda: [cf.Center(), cf.Double() >> cf.AddOne()], _rows),
    Case("dicts_and_nested_containers", lambda: cf.ToDict() >> cf.FromDict(), lambda: [3, 1, 2]),
    Case("tuples_out", lambda: cf.Tupled() >> cf.NoneState(), lambda: [1, 2, 3]),
    Case("none_state_and_none_input", lambda: Chain([cf.NoneState()]), lambda: None),
    Case("dtypes_and_numpy_scalars", lambda: cf.Dtypes(), lambda: [0, 1, 2, 3]),
    Case(
        "nan_inf_and_negative_zero",
        lambda: cf.Center() >> cf.Specials(),
        lambda: np.array([[1.0, np.nan], [3.0, 2.0], [0.5, -0.0]]),
    ),
    Case("batch_size_partial_fit_ndarray", lambda: cf.Center() >> cf.RunningMean(), _rows, lambda: np.ones(8), 3),
    Case(
        "batch_size_list_and_plain_fit",
        lambda: cf.RunningMean() >> cf.Scale(),
        lambda: [1.0, 2.0, 4.0, 8.0, 16.0],
        batch_size=2,
    ),
    Case(
        "labels_least_squares",
        lambda: cf.AddOne() >> cf.LeastSquares(),
        _rows,
        lambda: _rows() @ np.array([1.0, -2.0, 0.5]),
    ),
    Case("composite_differentiable_run", lambda: cf.Center() >> cf.Smooth() >> cf.Smooth() >> cf.AddOne(), _rows),
    Case("seeded_draws", lambda: cf.SeedDraws() >> cf.NoneState(), lambda: [1, 2], seed=1234),
    Case("user_objects_as_state_and_output", lambda: cf.Summarise() >> cf.NoneState(), lambda: np.arange(4.0)),
    Case("big_ints_bytes_sets_strings", lambda: cf.Misc() >> cf.NoneState(), lambda: "text"),
    Case("identical_siblings", lambda: cf.AddOne() >> (cf.Center() | cf.Center()) >> cf.Join(), _rows),
    Case("uncacheable_node", lambda: cf.Uncached() >> cf.Double(), lambda: [1.0, 2.0, 3.0]),
    Case(
        "deep_chain",
        lambda: cf.Double() >> cf.AddOne() >> cf.Double() >> cf.Center() >> cf.AddOne() >> cf.Scale(),
        _rows,
    ),
    Case("pandas_dataframe", lambda: cf.Frame() >> cf.NoneState(), lambda: [1, 2, 3], needs="pandas"),
    Case(
        "torch_module_and_tensors",
        lambda: cf.Center() >> cf.TorchLinear() >> cf.TorchOps(),
        _rows,
        lambda: _rows() @ np.array([0.5, -1.0, 2.0]),
        needs="torch",
    ),
]


@dataclass
class Observation:
    states: dict[str, Any]
    weights: dict[str, Any]
    forward: Any
    forward_again: Any
    run: dict[str, Any]


def build(case: Case, *, split: bool = False) -> Graph:
    """The case's graph; with ``split``, every other node in canonical order runs locally."""
    graph = Graph(seed=case.seed)
    walk(case.topology(), [], graph.node, graph.connect)
    if not split:
        return graph
    ids = graph.nodes()
    local = set(canonical_order(graph)[1::2])
    twin = Graph(seed=case.seed)

    def add(filter_obj: Any) -> str:
        # Ids follow creation order, so the k-th node of the twin has the k-th id.
        node_id: str = twin.node(filter_obj, target="local" if ids[len(twin)] in local else None)
        return node_id

    walk(case.topology(), [], add, twin.connect)
    return twin


def canonical_order(graph: Graph) -> list[str]:
    """Nodes sorted by (depth, insertion index), api.md §5.1."""
    depth: dict[str, int] = {}
    for nid in graph.nodes():  # insertion order is topological for graphs built by walk()
        preds = [s for s, t in graph.edges() if t == nid]
        depth[nid] = 1 + max(depth[p] for p in preds) if preds else 0
    nodes = graph.nodes()
    return sorted(nodes, key=lambda nid: (depth[nid], nodes.index(nid)))


def _weights(graph: Graph) -> dict[str, Any]:
    found = {}
    for nid in graph.nodes():
        module = getattr(graph.get_filter(nid), "_module", None)
        if module is not None:
            found[nid] = {k: v.clone() for k, v in module.state_dict().items()}
    return found


def observe(case: Case, mode: str, worker: Any = None, token: str | None = None) -> Observation:
    """Run the case through a Graph in ``mode`` (``local``, ``remote`` or ``split``)."""
    graph = build(case, split=mode == "split")
    if mode != "local":
        graph.add_worker(worker.address, token=token)
    places: dict[str, set[str]] = {}
    graph.on_event(lambda e: places.setdefault(e["node_id"], set()).add(e["target"]), event_types=["NodeStarted"])
    graph.fit(case.x(), case.y(), batch_size=case.batch_size)
    states = {nid: graph.get_state(nid) for nid in graph.nodes()}
    first = graph.forward(case.x())
    again = graph.forward(case.x())
    ran = graph.run(case.x())
    local = set(canonical_order(graph)[1::2]) if mode == "split" else set(graph.nodes()) if mode == "local" else set()
    # Where each node ran in fit and run (forward may serve cached nodes locally).
    for nid in graph.nodes():
        assert places[nid] >= {"local" if nid in local else worker.address}, f"{nid} ran at {places[nid]}"
        assert len(places[nid] - {"local"}) <= (0 if nid in local else 1), f"{nid} ran at {places[nid]}"
    return Observation(states, _weights(graph), first, again, ran)


def reference(case: Case) -> Observation:
    """The observation computed by calling the filters directly (api.md §5.2–5.5, §5.8)."""
    graph = build(case)
    order = canonical_order(graph)
    preds = {nid: [s for s, t in graph.edges() if t == nid] for nid in order}
    sinks = [nid for nid in order if not any(s == nid for s, _ in graph.edges())]
    filters = {nid: graph.get_filter(nid) for nid in order}
    trainable = {nid: read_meta(filters[nid]).kind == "trainable" for nid in order}
    x, y = case.x(), case.y()

    def walk_nodes(fit: bool, states: dict[str, Any]) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        for nid in order:
            p = preds[nid]
            value = x if not p else outputs[p[0]] if len(p) == 1 else {q: outputs[q] for q in p}
            filt = filters[nid]
            state = None
            if trainable[nid]:
                if fit:
                    if case.batch_size and has_partial_fit(filt) and is_row_sliceable(value):
                        state = partial_fit_loop(filt, value, y, case.batch_size, lambda *a: None)
                    else:
                        state = filt.fit(value, y)
                    states[nid] = state
                else:
                    state = states.get(nid)
            outputs[nid] = filt.forward(value, state)
        return outputs

    with seeded(case.seed):
        states: dict[str, Any] = {}
        walk_nodes(True, states)
        forward = walk_nodes(False, states)
        result = forward[sinks[0]] if len(sinks) == 1 else {s: forward[s] for s in sinks}
        again = walk_nodes(False, states)
        result_again = again[sinks[0]] if len(sinks) == 1 else {s: again[s] for s in sinks}
        ran = walk_nodes(False, states)
    all_states = {nid: states.get(nid) for nid in graph.nodes()}
    return Observation(all_states, _weights(graph), result, result_again, {nid: ran[nid] for nid in order})


def assert_same(got: Any, want: Any, path: str = "value") -> None:
    """Equal values of the same types (NaN equal to NaN, -0.0 distinct from 0.0, dict order kept)."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, (
            f"{path}: {got.dtype}{got.shape} != {want.dtype}{want.shape}"
        )
        assert np.array_equal(got, want, equal_nan=want.dtype.kind in "fc"), f"{path}: {got} != {want}"
        assert np.array_equal(np.signbit(got), np.signbit(want)) if want.dtype.kind == "f" else True, (
            f"{path}: signs differ"
        )
    elif isinstance(want, float):
        assert (math.isnan(got) and math.isnan(want)) or (
            got == want and math.copysign(1, got) == math.copysign(1, want)
        ), f"{path}: {got!r} != {want!r}"
    elif type(want).__module__.startswith("torch"):
        import torch

        assert got.dtype == want.dtype and got.shape == want.shape, (
            f"{path}: {got.dtype}{got.shape} != {want.dtype}{want.shape}"
        )
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), (
            f"{path}: {got} != {want}"
        )
    elif type(want).__module__.startswith("pandas"):
        assert got.equals(want), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


class ConformanceContract:
    """Subclass with ``mode = "local" | "remote" | "split"``; remote modes use the ``worker`` fixture."""

    mode: str

    @pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
    def test_case_matches_the_reference(self, case: Case, request: pytest.FixtureRequest) -> None:
        if case.needs:
            pytest.importorskip(case.needs)
        worker = token = None
        if self.mode != "local":
            worker = request.getfixturevalue("worker")
            token = request.getfixturevalue("worker_token")
        got = observe(case, self.mode, worker, token)
        want = reference(case)
        assert_same(got.states, want.states, "states")
        assert_same(got.weights, want.weights, "weights")
        assert_same(got.forward, want.forward, "forward")
        assert_same(got.forward_again, want.forward_again, "forward (cached)")
        assert_same(got.run, want.run, "run")
