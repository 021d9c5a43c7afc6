"""What the graph caches and when user code is skipped (api.md §6, §11 items 7, 25-36, 39, 62)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _graph_filters import AddOne, Identity, MeanCenter, NoneMaker, Scale, Sum, calls_of

from soma import Cache, Filter, Graph, SomaWarning, search

TESTS_DIR = Path(__file__).parent


def fits(f: Any) -> int:
    return len(calls_of(f, "fit"))


def forwards(f: Any) -> int:
    return len(calls_of(f, "forward"))


def test_refit_with_same_inputs_is_served_from_the_cache() -> None:
    f = Scale()
    g = Graph.somatize(Identity() >> f, seed=1)
    x, y = np.arange(4.0), np.ones(4)
    g.fit(x, y)
    events: list[dict[str, Any]] = []
    g.on_event(events.append)
    g.fit(x, y)
    assert fits(f) == 1
    hits = [(e["node_id"], e["what"]) for e in events if e["event_type"] == "NodeCacheHit"]
    assert ("scale", "state") in hits and ("scale", "output") in hits
    completed = {e["node_id"]: e["cache_hit"] for e in events if e["event_type"] == "NodeCompleted"}
    assert completed == {"identity": True, "scale": True}
    assert g.fitted and g.get_state("scale") == {"m": 1.0}


def test_different_y_fits_again() -> None:
    f = Scale()
    g = Graph.somatize(f)
    g.fit(np.ones(3), np.ones(3))
    g.fit(np.ones(3), np.zeros(3))
    assert fits(f) == 2
    assert g.get_state("scale") == {"m": 0.0}


def test_seed_is_part_of_the_key() -> None:
    shared = Cache()
    f = Scale()
    for seed in (None, 0, 1, 0):
        g = Graph(cache=shared, seed=seed)
        g.node(f)
        g.fit(np.ones(2))
    assert fits(f) == 3


def test_changed_parameter_fits_again() -> None:
    f = Scale(1.0)
    g = Graph.somatize(f)
    g.fit(np.ones(2))
    f.set_params(factor=2.0)
    g.fit(np.ones(2))
    assert fits(f) == 2 and g.get_state("scale") == {"m": 2.0}


def test_search_default_is_a_parameter_and_part_of_the_key() -> None:
    class Tuned(Filter):
        lr = search(1e-3, 1e-1, scale="log", default=1e-2)

        def __init__(self, **params: Any) -> None:
            super().__init__(**params)
            self._fits = 0

        def fit(self, x: Any, y: Any = None) -> float:
            self._fits += 1
            return float(self.lr)

    assert Tuned().get_params() == {"lr": 1e-2}
    shared = Cache()
    default, other, again = Tuned(), Tuned(lr=0.05), Tuned()
    for f in (default, other, again):
        g = Graph(cache=shared)
        g.node(f)
        g.fit(1)
    assert (default._fits, other._fits, again._fits) == (1, 1, 0)


def test_version_change_invalidates() -> None:
    shared = Cache()
    f = Scale()
    Graph.somatize(f, cache=shared).fit(np.ones(2))
    f._version = 2
    Graph.somatize(f, cache=shared).fit(np.ones(2))
    Graph.somatize(f, cache=shared).fit(np.ones(2))
    assert fits(f) == 2


def _write_module(directory: Path, name: str, body: str) -> Any:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    # Different content lengths keep the stale-bytecode and linecache checks honest.
    importlib.invalidate_caches()
    if name in sys.modules:
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)


def test_class_code_changes_invalidate_but_comments_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    calls: list[str] = []
    shared = Cache()
    template = """
        from soma import Filter

        class Coded(Filter):
            {comment}
            def fit(self, x, y=None):
                self._log.append("fit")
                {body}
                return x

            def forward(self, x, state):
                return state
        """

    def fit_with(comment: str, body: str) -> None:
        module = _write_module(
            tmp_path, "coded_filters_mod", template.format(comment=comment, body=body)
        )
        f = module.Coded()
        f._log = calls  # internal attribute: not a parameter, not in the key
        g = Graph(cache=shared)
        g.node(f)
        g.fit(1)

    try:
        fit_with("", "pass")
        fit_with("# a comment that changes nothing", "pass")
        assert calls == ["fit"]
        fit_with("", "x = x + 0")
        assert calls == ["fit", "fit"]
    finally:
        sys.modules.pop("coded_filters_mod", None)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (np.array([np.nan]), np.array([np.inf])),
        (np.array([np.inf]), np.array([-np.inf])),
        (0.0, -0.0),
        ([1, 2], (1, 2)),
        (np.array([1, 2], dtype=np.int32), np.array([1, 2], dtype=np.int64)),
    ],
    ids=["nan-inf", "inf-neginf", "zero-signs", "list-tuple", "dtypes"],
)
def test_distinct_inputs_get_distinct_keys(first: Any, second: Any) -> None:
    f = Identity()
    g = Graph.somatize(f)
    g.fit(first)
    g.forward(first)
    g.forward(second)
    g.forward(first)
    assert forwards(f) == 2


@pytest.mark.parametrize("budget", [1 << 20, 0], ids=["memory-tier", "no-memory-tier"])
def test_identical_siblings_share_one_fit(budget: int) -> None:
    left, right = Scale(2.0), Scale(2.0)
    g = Graph.somatize(MeanCenter() >> (left | right), cache_max_bytes=budget)
    g.fit(np.arange(4.0))
    assert fits(left) + fits(right) == 1
    assert g.get_state("scale") == g.get_state("scale_2")


def test_forward_cache_cacheable_flag_and_differentiable_outputs() -> None:
    class Uncached(AddOne):
        _cacheable = False

    class Diff(AddOne):
        _differentiable = True

    plain, uncached, diff = AddOne(), Uncached(), Diff()
    g = Graph.somatize(plain >> uncached >> diff)
    g.fit(1)
    g.forward(1)
    g.forward(1)
    assert (forwards(plain), forwards(uncached), forwards(diff)) == (1, 3, 3)
    assert g.forward(1) == 4


def test_none_state_and_output_are_cache_hits() -> None:
    f = NoneMaker()
    g = Graph.somatize(f)
    g.fit(1)
    events: list[dict[str, Any]] = []
    g.on_event(events.append, event_types=["NodeCacheHit"])
    g.fit(1)
    assert g.forward(1) is None
    assert (fits(f), forwards(f)) == (1, 1)
    assert [e["what"] for e in events] == ["state", "output", "output"]


def test_cache_false_always_calls_filters() -> None:
    f = Scale()
    g = Graph.somatize(f, cache=False)
    for _ in range(3):
        g.fit(np.ones(2))
    g.forward(np.ones(2))
    g.forward(np.ones(2))
    assert fits(f) == 3 and forwards(f) == 5
    assert g.cache_info()["memory"]["entries"] == 0


def test_memory_tier_stays_within_budget_and_evicts_least_recently_used() -> None:
    g = Graph.somatize(Identity(), cache_max_bytes=2500)
    arrays = [np.full(100, i, dtype=np.float64) for i in range(3)]  # 800 bytes each
    g.fit(arrays[0])
    for a in arrays:
        g.forward(a)
    g.forward(arrays[0])  # refresh 0, so 1 is the least recently used
    g.forward(np.zeros(200))  # 1600 bytes: evicts
    info = g.cache_info()["memory"]
    assert info["bytes"] <= 2500 and info["max_bytes"] == 2500
    f = g.get_filter("identity")
    before = forwards(f)
    g.forward(arrays[0])
    assert forwards(f) == before
    g.forward(arrays[1])
    assert forwards(f) == before + 1
    g.forward(np.zeros(1000))  # larger than the whole budget: never kept
    assert g.cache_info()["memory"]["bytes"] <= 2500


def test_clear_cache_keeps_states(tmp_path: Path) -> None:
    f = Scale()
    g = Graph.somatize(f, cache_dir=tmp_path)
    g.fit(np.ones(2))
    g.clear_cache()
    assert g.cache_info()["memory"]["entries"] == 0 and g.cache_info()["disk"]["entries"] > 0
    assert g.fitted and g.get_state("scale") == {"m": 1.0}
    g.clear_cache(disk=True)
    assert g.cache_info()["disk"]["entries"] == 0
    g.fit(np.ones(2))
    assert fits(f) == 2


def test_new_process_hits_the_disk_cache_and_corrupt_entries_are_misses(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import numpy as np
        from soma import Graph
        from _graph_filters import Scale, calls_of
        f = Scale(3.0)
        g = Graph.somatize(f, seed=7)
        g.fit(np.arange(5.0))
        print(len(calls_of(f, "fit")))
        """
    )
    env = {**os.environ, "SOMA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(TESTS_DIR)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    f = Scale(3.0)
    g = Graph.somatize(f, seed=7, cache_dir=tmp_path)
    g.fit(np.arange(5.0))
    assert fits(f) == 0 and g.get_state("scale") == {"m": 6.0}
    assert g.cache_info()["disk"]["hits"] >= 1
    for entry in tmp_path.rglob("*.pkl"):
        entry.write_bytes(b"not a pickle")
    fresh = Scale(3.0)
    g2 = Graph.somatize(fresh, seed=7, cache_dir=tmp_path)
    g2.fit(np.arange(5.0))
    assert fits(fresh) == 1 and g2.get_state("scale") == {"m": 6.0}


def test_compile_with_x_predicts_cached_nodes() -> None:
    class Diff(AddOne):
        _differentiable = True

    class UncachedSum(Sum):
        _cacheable = False

    g = Graph.somatize(AddOne() >> (Scale() | Diff()) >> UncachedSum())
    x = np.ones(3)
    g.fit(x)
    g.forward(x)
    result = g.compile("inference", x=x)
    assert result["cached_nodes"] == 2
    assert "Cached(add_one, " in result["plan_text"] and "Cached(scale, " in result["plan_text"]
    assert g.compile("inference")["cached_nodes"] == 0
    assert g.compile("no_cache", x=x)["cached_nodes"] == 0


def test_with_params_hits_every_node_before_the_first_change() -> None:
    first, second, third = Scale(1.0), Scale(2.0), Scale(3.0)
    g = Graph.somatize(first >> second >> third)
    x = np.arange(1.0, 4.0)
    g.fit(x)
    twin = g.with_params({"scale_2.factor": 5.0})
    assert not twin.fitted and twin.cache is g.cache
    events: list[dict[str, Any]] = []
    twin.on_event(events.append, event_types=["NodeCompleted"])
    twin.fit(x)
    assert [(e["node_id"], e["cache_hit"]) for e in events] == [
        ("scale", True),
        ("scale_2", False),
        ("scale_3", False),
    ]
    assert twin.get_state("scale_2")["m"] != g.get_state("scale_2")["m"]


def test_unhashable_input_runs_uncached_with_one_warning_per_node() -> None:
    lock = threading.Lock()
    first = Identity()
    g = Graph.somatize(first >> Identity())
    with pytest.warns(SomaWarning) as record:
        g.fit(lock)
    assert [str(w.message) for w in record] == [
        "node `identity` runs uncached: its input x cannot be hashed",
        "node `identity_2` runs uncached: the output of `identity` cannot be hashed",
    ]
    assert g.forward(lock) is lock  # warnings are errors here: a second warning would fail
    assert forwards(first) == 2


def test_unhashable_parameters_warn_and_still_run() -> None:
    f = Scale(1.0)
    f.set_params(extra=threading.Lock())
    g = Graph.somatize(f)
    with pytest.warns(SomaWarning, match="parameters cannot be hashed"):
        g.fit(np.ones(2))
    g.fit(np.ones(2))
    assert fits(f) == 2 and g.fitted
