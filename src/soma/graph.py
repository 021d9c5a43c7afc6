"""``Graph``: a DAG of filters that learns states (``fit``), applies them (``forward``) and runs them (``run``).

The Graph owns the structure (nodes, edges), the state library, the cache, event
subscriptions and the worker registry. Execution is delegated: ``soma.runtime.plan``
compiles a plan, ``soma.runtime.executor`` walks it; the Graph validates arguments,
serialises runs (one at a time, re-entrant calls refused) and commits the states of
a successful fit.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

from soma.chain import walk
from soma.context import is_running, running, seeded
from soma.datastore import check_store_type
from soma.errors import (
    CycleError,
    NodeNotFoundError,
    NotFittedError,
    SomaConfigError,
    SomaError,
    SomaWarning,
)
from soma.filter import check_filter, default_node_id, params_of, read_meta
from soma.runtime.cache import Cache
from soma.runtime.events import EventCallback, EventHub, Subscription
from soma.runtime.executor import PlanFacts, Run
from soma.runtime.hashing import Unhashable, content
from soma.runtime.keys import KeyBook
from soma.runtime.nodes import NodeRecord
from soma.runtime.plan import (
    GraphShape,
    NodeSpec,
    PlanStep,
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
from soma.runtime.runners import RemoteRunnerFactory, RunnerFactory, default_runners
from soma.runtime.usercode import capture_source, register_by_value

__all__ = ["Graph"]

DEFAULT_CACHE_MAX_BYTES = 1073741824
_NODE_ID = re.compile(r"^[\w-]+$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[\w.\-]+):(\d{1,5})$")
_WORKER_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
_HTTP_TIMEOUT_S = 5.0
_tokens = itertools.count(1)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_seed(seed: object) -> int | None:
    if seed is None or _is_int(seed):
        return seed
    raise SomaConfigError(f"seed must be None or an int, got {seed!r}")


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise SomaConfigError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def _check_count(name: str, value: object, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if _is_int(value) and value >= 1:
        return value
    accepted = "None or an int >= 1" if allow_none else "an int >= 1"
    raise SomaConfigError(f"{name} must be {accepted}, got {value!r}")


class Graph:
    """A DAG of filters with a state library, a content-addressed cache and events.

    ``Graph(*, cache=True, cache_dir=None, cache_max_bytes=1073741824, seed=None,
    max_parallel=1, isolation=None)``; bad values raise ``SomaConfigError``, an
    unusable ``cache_dir`` raises ``CacheError``.

    Example::

        g = Graph.somatize(Scaler() >> (Ridge() | Lasso()) >> Mean())
        g.fit(x, y)
        prediction = g.forward(x)
    """

    def __init__(
        self,
        *,
        cache: bool | Cache = True,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        seed: int | None = None,
        max_parallel: int = 1,
        isolation: str | None = None,
    ) -> None:
        if not (isinstance(cache, (bool, Cache))):
            raise SomaConfigError(f"cache must be True, False or a Cache, got {cache!r}")
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise SomaConfigError(f"cache_dir must be None or a path, got {cache_dir!r}")
        if not _is_int(cache_max_bytes) or cache_max_bytes < 0:
            raise SomaConfigError(f"cache_max_bytes must be an int >= 0, got {cache_max_bytes!r}")
        _check_seed(seed)
        _check_count("max_parallel", max_parallel)
        if isolation not in (None, "subprocess"):
            raise SomaConfigError(f"isolation must be None or 'subprocess', got {isolation!r}")
        if isinstance(cache, Cache):
            self._cache: Cache | None = cache
        elif cache:
            if cache_dir is None:
                cache_dir = os.environ.get("SOMA_CACHE_DIR") or None
            self._cache = Cache(cache_max_bytes, cache_dir)
        else:
            self._cache = None
        self._seed = seed
        self._max_parallel = max_parallel
        self._isolation = isolation
        self._nodes: dict[str, NodeRecord] = {}
        self._sources: dict[str, str] = {}
        self._edges: list[tuple[str, str]] = []
        self._successors: dict[str, list[str]] = {}
        self._states: dict[str, Any] = {}
        self._state_keys: dict[str, str | None] = {}
        self._fitted = False
        self._hub = EventHub()
        self._run_lock = threading.Lock()
        self._token = next(_tokens)
        self._workers: dict[str, dict[str, Any]] = {}
        self._coordinator: tuple[str, str | None] | None = None
        self._data_store: dict[str, Any] | None = None
        self._uncached_warned: set[str] = set()
        self._warn_lock = threading.Lock()
        self._shape_memo: GraphShape | None = None
        self._plan_memo: tuple[PlanStep, PlanFacts] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def fitted(self) -> bool:
        """Whether the last ``fit`` succeeded and nothing was added since."""
        return self._fitted

    @property
    def seed(self) -> int | None:
        """The seed: part of every cache key and what ``current_seed()`` returns in user code."""
        return self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        self._seed = _check_seed(value)

    @property
    def cache(self) -> Cache | None:
        """The cache (shared when one was passed in), or ``None`` for ``Graph(cache=False)``."""
        return self._cache

    @property
    def isolation(self) -> str | None:
        """``"subprocess"`` when nodes that would run in-process go to an isolated child."""
        return self._isolation

    @property
    def max_parallel(self) -> int:
        """How many members of a ``Parallel`` step may run at once."""
        return self._max_parallel

    # ------------------------------------------------------------------ building

    def node(self, *args: Any, target: str | None = None) -> str:
        """Add a filter as a node: ``node(filter)`` or ``node(node_id, filter)``; returns the node id.

        Raises ``SomaConfigError`` for a wrong argument count, an invalid id, target or
        metadata, ``TypeError`` for a non-str id or an object that is not a filter.
        """
        if len(args) not in (1, 2):
            raise SomaConfigError(f"node() takes 1 or 2 positional arguments, got {len(args)}")
        explicit: str | None = None
        if len(args) == 2:
            explicit, filter_obj = args
            if not isinstance(explicit, str):
                raise TypeError(f"node id must be a str, got {type(explicit).__name__}")
            if not _NODE_ID.match(explicit) or explicit.startswith("__"):
                raise SomaConfigError(f"invalid node id '{explicit}'")
        else:
            filter_obj = args[0]
        check_filter(filter_obj)
        meta = read_meta(filter_obj)
        if target is not None and not isinstance(target, str):
            raise SomaConfigError(f"invalid target {target!r}: expected a string")
        effective = normalize_target(target if target is not None else meta.target)
        node_id = self._free_id(explicit or default_node_id(type(filter_obj).__name__))
        self._sources[node_id] = capture_source(filter_obj)
        register_by_value(filter_obj)
        self._nodes[node_id] = NodeRecord(
            node_id,
            filter_obj,
            trainable=meta.kind == "trainable",
            differentiable=meta.differentiable,
            cacheable=meta.cacheable,
            stream_mode=meta.stream_mode,
            target=effective,
            version=meta.version,
            requirements=meta.requirements,
        )
        self._successors[node_id] = []
        self._changed()
        return node_id

    def _free_id(self, base: str) -> str:
        if base not in self._nodes:
            return base
        return next(f"{base}_{n}" for n in itertools.count(2) if f"{base}_{n}" not in self._nodes)

    def edge(self, source: str, target: str) -> None:
        """Add a data edge; raises ``NodeNotFoundError`` or ``CycleError`` (graph unchanged).

        Repeating an existing edge does nothing.
        """
        for nid in (source, target):
            if not isinstance(nid, str) or nid not in self._nodes:
                raise NodeNotFoundError(nid)
        if target in self._successors[source]:
            return
        if source == target or self._reaches(target, source):
            raise CycleError()
        self._edges.append((source, target))
        self._successors[source].append(target)
        self._changed()

    connect = edge

    def _reaches(self, start: str, goal: str) -> bool:
        seen: set[str] = set()
        stack = [start]
        while stack:
            nid = stack.pop()
            if nid == goal:
                return True
            if nid not in seen:
                seen.add(nid)
                stack.extend(self._successors[nid])
        return False

    def _changed(self) -> None:
        self._fitted = False
        self._shape_memo = None
        self._plan_memo = None

    @classmethod
    def somatize(cls, topology: Any, **graph_kwargs: Any) -> Graph:
        """Build a graph (of this class) from a topology: a Filter, Chain, Fork or list."""
        graph = cls(**graph_kwargs)
        walk(topology, [], graph.node, graph.connect)
        return graph

    # ------------------------------------------------------------------ running

    def _refuse_reentry(self) -> None:
        # Checked before taking the lock: a call from a thread already running this
        # graph (a callback, user code) must fail at once, never wait on the lock.
        if is_running(self._token):
            raise SomaError("graph is already running (re-entrant call)")

    def fit(
        self, x: Any, y: Any = None, batch_size: int | None = None, *, timeout: float | None = None
    ) -> None:
        """Learn every trainable node's state; on failure nothing is committed.

        Raises ``FilterError`` for an exception in user code (``__cause__`` is the
        original), ``SomaConfigError`` for bad arguments.
        """
        self._refuse_reentry()
        with self._run_lock, running(self._token), seeded(self._seed):
            _check_count("batch_size", batch_size, allow_none=True)
            timeout = _check_timeout(timeout)
            outcome = self._new_run(
                "fit", x=x, y=y, batch_size=batch_size, timeout=timeout
            ).execute()
            self._states = {
                nid: outcome.states[nid] for nid in self._nodes if nid in outcome.states
            }
            self._state_keys = {nid: outcome.state_keys.get(nid) for nid in self._states}
            self._fitted = True

    def forward(
        self, x: Any, stream: bool = False, chunk_size: int = 1024, *, timeout: float | None = None
    ) -> Any:
        """Apply the fitted states: one sink -> its output, several -> ``{sink: output}``, none -> ``x``.

        Raises ``NotFittedError`` before anything else when the graph was never fitted;
        with ``stream=True`` a non-linear graph raises ``SomaConfigError``.
        """
        self._refuse_reentry()
        with self._run_lock, running(self._token), seeded(self._seed):
            if not self._fitted:
                raise NotFittedError()
            _check_count("chunk_size", chunk_size)
            timeout = _check_timeout(timeout)
            if stream:
                shape = self._shape()
                if shape.nodes and not shape.is_linear:
                    raise SomaConfigError("streaming requires a linear graph")
                run = self._new_run("forward", x=x, timeout=timeout, stream=True)
                return run.stream(chunk_size).result
            return self._new_run("forward", x=x, timeout=timeout).execute().result

    def run(self, x: Any = None, *, timeout: float | None = None) -> dict[str, Any]:
        """Execute every node without learning or caching; returns ``{node_id: output}`` in canonical order."""
        self._refuse_reentry()
        with self._run_lock, running(self._token), seeded(self._seed):
            timeout = _check_timeout(timeout)
            result: dict[str, Any] = self._new_run("run", x=x, timeout=timeout).execute().result
            return result

    def _new_run(
        self,
        phase: str,
        *,
        x: Any,
        y: Any = None,
        batch_size: int | None = None,
        timeout: float | None,
        stream: bool = False,
    ) -> Run:
        shape = self._shape()
        plan, facts = self._base_plan(shape)
        cache = None if phase == "run" or stream else self._cache
        state_keys = self._state_keys if phase == "forward" else {}
        keys = KeyBook(
            shape,
            self._nodes,
            x=x,
            y=y,
            seed=self._seed,
            batch_size=batch_size,
            state_keys=state_keys,
        )
        if phase == "forward" and cache is not None and self._hub.active:
            # Only RunStarted's plan summary shows Cached steps; an unobserved run skips
            # predicting them (Execute and Cached steps run the same way).
            placement = self._placement(shape)
            cached = self._predict_cached(shape, keys, cache, placement)
            if cached:
                plan = compile_plan(shape, cached=cached, placement=placement)
                facts = PlanFacts.of(plan)
        return Run(
            phase=phase,
            shape=shape,
            nodes=self._nodes,
            plan=plan,
            facts=facts,
            hub=self._hub,
            x=x,
            y=y,
            batch_size=batch_size,
            states=self._states,
            state_keys=state_keys,
            cache=cache,
            keys=keys,
            seed=self._seed,
            max_parallel=self._max_parallel,
            timeout=timeout,
            isolation=self._isolation,
            runners=self._runner_factories(),
            remote_runner=self._remote_runner_factory(),
            warn_uncached=self._warn_uncached,
        )

    def _runner_factories(self) -> dict[str, RunnerFactory]:
        """Runner factories by kind (``"local"``, ``"subprocess"``); see ``soma.runtime.runners``."""
        return default_runners()

    def _remote_runner_factory(self) -> RemoteRunnerFactory | None:
        """The factory of runners for ``Remote`` blocks (``soma.client.remote``), ``None`` without workers."""
        if not self._workers:
            return None
        from soma.client.remote import remote_runner_factory

        return remote_runner_factory(self._nodes, self._workers, self._cache)

    def _warn_uncached(self, node_id: str, reason: str) -> None:
        with self._warn_lock:
            if node_id in self._uncached_warned:
                return
            self._uncached_warned.add(node_id)
        warnings.warn(SomaWarning(f"node `{node_id}` runs uncached: {reason}"), stacklevel=2)

    # ------------------------------------------------------------------ compiling

    def _shape(self) -> GraphShape:
        if self._shape_memo is None:
            self._shape_memo = GraphShape(
                tuple(
                    NodeSpec(
                        r.node_id,
                        r.filter_name,
                        r.trainable,
                        r.differentiable,
                        r.cacheable,
                        r.target,
                    )
                    for r in self._nodes.values()
                ),
                tuple(self._edges),
            )
        return self._shape_memo

    def _base_plan(self, shape: GraphShape) -> tuple[PlanStep, PlanFacts]:
        """The plan without ``Cached`` steps (what fit and run execute), compiled once per structure."""
        if self._plan_memo is None:
            plan = compile_plan(shape, placement=self._placement(shape))
            self._plan_memo = (plan, PlanFacts.of(plan))
        return self._plan_memo

    def _placement(self, shape: GraphShape) -> dict[str, str]:
        entries = [
            WorkerEntry(address, tuple(info["tags"]), info.get("worker_id"))
            for address, info in self._workers.items()
        ]
        if any(spec.target.startswith("worker:") for spec in shape.nodes):
            entries = [
                WorkerEntry(e.address, e.tags, e.worker_id or self._worker_id(e.address))
                for e in entries
            ]
        return resolve_placement(shape, entries, coordinator=self._coordinator is not None)

    def _worker_id(self, address: str) -> str | None:
        """Ask a direct worker for its id (``GET /info``) on first use; ``None`` if it cannot say."""
        url = re.sub(r"^ws", "http", address) + "/info"
        try:
            with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as response:
                worker_id = json.load(response).get("worker_id")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(worker_id, str):
            self._workers[address]["worker_id"] = worker_id
            return worker_id
        return None

    def _predict_cached(
        self, shape: GraphShape, keys: KeyBook, cache: Cache, placement: Mapping[str, str]
    ) -> dict[str, str]:
        """The nodes whose output ``cache`` holds for this run, with their keys: they become ``Cached`` steps.

        A remotely placed node (in ``placement``) stays in its ``Remote`` block: the run serves
        the block from this cache when it holds all of it, and an entry evicted meanwhile then
        runs on the worker, never here.
        """
        cached: dict[str, str] = {}
        for nid in shape.order:
            node = self._nodes[nid]
            if not node.cacheable or nid in placement:
                continue
            key = keys.predict(nid, {})
            if key is not None and not node.differentiable and cache.contains(key):
                cached[nid] = key
        return cached

    def compile(self, mode: str = "inference", x: Any = None) -> dict[str, Any]:
        """Compile without running: the plan, its text and Mermaid forms, counts and diagnostics.

        Raises ``SomaConfigError`` for an unknown mode and ``WorkerUnavailableError``
        for a target no registered worker matches.
        """
        check_mode(mode)
        shape = self._shape()
        placement = self._placement(shape)
        cached: dict[str, str] = {}
        if mode == "inference" and x is not None and self._fitted and self._cache is not None:
            keys = KeyBook(shape, self._nodes, x=x, seed=self._seed, state_keys=self._state_keys)
            cached = self._predict_cached(shape, keys, self._cache, placement)
        plan = compile_plan(shape, cached=cached, placement=placement)
        unhashable = [
            nid for nid in shape.order if self._cache is not None and self._params_unhashable(nid)
        ]
        return {
            "total_nodes": len(shape.nodes),
            "cached_nodes": cached_count(plan),
            "parallel_branches": parallel_branches(plan),
            "diagnostics": diagnostics(
                shape,
                unhashable_params=unhashable,
                workers_configured=bool(self._workers) or self._coordinator is not None,
            ),
            "plan_text": plan_text(plan),
            "plan_mermaid": plan_mermaid(plan, shape),
            "plan": plan.to_dict(),
        }

    def _params_unhashable(self, node_id: str) -> bool:
        node = self._nodes[node_id]
        if not node.cacheable:
            return False
        try:
            content(params_of(node.filter))
        except Unhashable:
            return True
        return False

    # ------------------------------------------------------------------ rendering and inspection

    def to_mermaid(self) -> str:
        """A left-to-right Mermaid flowchart of the graph."""
        return graph_mermaid(self._shape())

    def to_graphviz(self) -> str:
        """A Graphviz ``digraph`` of the graph."""
        return graph_graphviz(self._shape())

    def to_text(self) -> str:
        """A tree-like listing: ``Graph (N nodes, E edges)`` then one line per node."""
        return graph_text(self._shape())

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and node_id in self._nodes

    def __repr__(self) -> str:
        fitted = "true" if self._fitted else "false"
        return f"Graph({len(self._nodes)} nodes, {len(self._edges)} edges, fitted={fitted})"

    def __str__(self) -> str:
        return self.to_text()

    def nodes(self) -> list[str]:
        """Node ids in insertion order."""
        return list(self._nodes)

    def edges(self) -> list[tuple[str, str]]:
        """``(source, target)`` pairs in insertion order."""
        return list(self._edges)

    def _record(self, node_id: str) -> NodeRecord:
        try:
            return self._nodes[node_id]
        except (KeyError, TypeError):
            raise NodeNotFoundError(node_id) from None

    def get_filter(self, node_id: str) -> Any:
        """The filter object of a node; ``NodeNotFoundError`` for an unknown id."""
        return self._record(node_id).filter

    def get_state(self, node_id: str) -> Any:
        """The node's fitted state (``None`` when it has none); ``NodeNotFoundError`` for an unknown id."""
        self._record(node_id)
        return self._states.get(node_id)

    def filter_source(self, node_id: str) -> str | None:
        """The source of the module defining the node's filter (``""`` if unreadable, ``None`` if unknown id)."""
        return self._sources.get(node_id)

    def filter_sources_dict(self) -> dict[str, str]:
        """``{node_id: source}`` in insertion order."""
        return dict(self._sources)

    def filter_requirements(self, node_id: str) -> list[str]:
        """The node's declared ``_requirements``, sorted and de-duplicated."""
        return sorted(set(self._record(node_id).requirements))

    def search_space(self) -> list[dict[str, Any]]:
        """Every node's search dimensions in canonical order, named ``<node_id>.<param>``."""
        dims: list[dict[str, Any]] = []
        for nid in self._shape().order:
            for dim in getattr(type(self._nodes[nid].filter), "_soma_search_space", None) or []:
                entry = copy.deepcopy(dim)
                entry.update(name=f"{nid}.{dim['name']}", node_id=nid, param=dim["name"])
                dims.append(entry)
        return dims

    def with_params(self, params: Mapping[str, Any]) -> Graph:
        """A new unfitted graph sharing this one's structure, settings and ``Cache``, with parameters changed.

        Keys are ``"<node_id>.<param>"``. Raises ``SomaConfigError`` for an unknown node
        or a name that is neither a parameter nor a search dimension of that node.
        """
        if not isinstance(params, Mapping):
            raise SomaConfigError(
                f"with_params() expects a dict of '<node_id>.<param>' keys, got {params!r}"
            )
        changes: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            node_id, dot, name = key.partition(".") if isinstance(key, str) else ("", "", "")
            if not dot or not name:
                raise SomaConfigError(f"invalid parameter name {key!r}: use '<node_id>.<param>'")
            if node_id not in self._nodes:
                raise SomaConfigError(f"unknown node '{node_id}' in parameter '{key}'")
            filter_obj = self._nodes[node_id].filter
            dims = {d["name"] for d in getattr(type(filter_obj), "_soma_search_space", None) or []}
            if name.startswith("_") or (name not in params_of(filter_obj) and name not in dims):
                raise SomaConfigError(
                    f"'{name}' is neither a parameter nor a search dimension of node '{node_id}'"
                )
            changes.setdefault(node_id, {})[name] = value
        twin = type(self).__new__(type(self))
        Graph.__init__(
            twin,
            cache=self._cache if self._cache is not None else False,
            seed=self._seed,
            max_parallel=self._max_parallel,
            isolation=self._isolation,
        )
        for node_id, record in self._nodes.items():
            filter_obj = record.filter
            if node_id in changes:
                filter_obj = copy.copy(filter_obj)
                for name, value in changes[node_id].items():
                    setattr(filter_obj, name, value)
            twin._nodes[node_id] = record.copy_with(filter_obj)
            twin._successors[node_id] = list(self._successors[node_id])
        twin._sources = dict(self._sources)
        twin._edges = list(self._edges)
        twin._workers = copy.deepcopy(self._workers)
        twin._coordinator = self._coordinator
        twin._data_store = copy.deepcopy(self._data_store)
        return twin

    # ------------------------------------------------------------------ cache and events

    def cache_info(self) -> dict[str, Any]:
        """Entries, sizes and hit/miss counters of the memory and disk tiers (zeros without a cache)."""
        if self._cache is None:
            return {
                "memory": {"entries": 0, "bytes": 0, "max_bytes": 0, "hits": 0, "misses": 0},
                "disk": None,
            }
        return self._cache.info()

    def clear_cache(self, disk: bool = False) -> None:
        """Empty the memory tier (and the disk tier with ``disk=True``); states and ``fitted`` stay."""
        if self._cache is not None:
            self._cache.clear(disk=disk)

    def on_event(
        self, callback: EventCallback, *, event_types: Iterable[str] | None = None
    ) -> Subscription:
        """Call ``callback(event)`` for every event emitted from now on (optionally only ``event_types``)."""
        return self._hub.subscribe(callback, event_types)

    # ------------------------------------------------------------------ workers and data store

    def add_worker(
        self, address: str, token: str | None = None, tags: Iterable[str] | str | None = None
    ) -> None:
        """Register a worker (nothing is contacted); an address registered again gets the new token and tags.

        Accepts ``ws://``, ``wss://``, ``http://``/``https://`` (stored as ws/wss) and
        bare ``host:port``; raises ``SomaConfigError`` otherwise.
        """
        normalised = _worker_address(address)
        if token is not None and not isinstance(token, str):
            raise SomaConfigError("token must be a str or None")
        self._workers[normalised] = {"token": token, "tags": _tags(tags), "worker_id": None}
        self._plan_memo = None

    def set_coordinator(self, url: str, token: str | None = None) -> None:
        """Register a coordinator (an http(s) URL); it is contacted lazily."""
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise SomaConfigError(
                f"invalid coordinator URL '{url}': use http://host:port or https://host:port"
            )
        if token is not None and not isinstance(token, str):
            raise SomaConfigError("token must be a str or None")
        self._coordinator = (url.rstrip("/"), token)
        self._plan_memo = None

    def workers(self) -> list[dict[str, Any]]:
        """Direct workers (``source: "direct"``), then the coordinator's (``source: "coordinator"``).

        An unreachable coordinator gives the direct list and a ``SomaWarning``.
        """
        listed: list[dict[str, Any]] = [
            {"address": address, "tags": list(info["tags"]), "source": "direct"}
            for address, info in self._workers.items()
        ]
        if self._coordinator is None:
            return listed
        url, token = self._coordinator
        request = urllib.request.Request(f"{url}/workers")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S) as response:
                items = json.load(response)
            if isinstance(items, dict):
                items = items.get("workers")
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise ValueError("the response is not a list of workers")
        except (OSError, ValueError) as exc:
            warnings.warn(
                SomaWarning(
                    f"coordinator {url} could not be asked for workers: {exc}; listing direct workers only"
                ),
                stacklevel=2,
            )
            return listed
        return listed + [{**item, "source": "coordinator"} for item in items]

    def set_data_store(
        self,
        store_type: str,
        path: str | os.PathLike[str] | None = None,
        bucket: str | None = None,
        prefix: str | None = None,
        endpoint: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Configure the store that carries large remote inputs and outputs by reference.

        Only ``"local"`` (with ``path``) exists; local execution ignores the store.
        """
        root = check_store_type(store_type, path)
        self._data_store = {
            "type": "local",
            "path": str(root),
            "cache_dir": None if cache_dir is None else str(Path(cache_dir)),
        }

    def shutdown_worker(self, address: str, reason: str | None = None) -> None:
        """Ask a worker to drain and stop, with the token registered for it (none if unregistered).

        Returns at the worker's acknowledgement, within 2 s, without waiting for it to
        exit. Raises ``RemoteError`` when the worker cannot be reached or refuses.
        """
        from soma.client.remote import shutdown_worker

        normalised = _worker_address(address)
        shutdown_worker(normalised, self._workers.get(normalised, {}).get("token"), reason)

    def shutdown_workers(self, reason: str | None = None) -> None:
        """``shutdown_worker`` for every direct worker; failures come back as one ``SomaWarning``."""
        from soma.client.remote import shutdown_workers

        shutdown_workers(self._workers, reason)

    @property
    def data_store(self) -> dict[str, Any] | None:
        """The data store configuration set by ``set_data_store``, or ``None``."""
        return copy.deepcopy(self._data_store)


def _worker_address(address: object) -> str:
    if not isinstance(address, str):
        raise SomaConfigError(f"invalid worker address '{address}'")
    scheme, sep, rest = address.partition("://")
    if sep:
        if scheme not in _WORKER_SCHEMES:
            raise SomaConfigError(f"invalid worker address '{address}'")
        host_port = rest.rstrip("/")
        if (
            not host_port
            or "/" in host_port
            or not re.match(r"^(\[[0-9A-Fa-f:.]+\]|[\w.\-]+)(:\d{1,5})?$", host_port)
        ):
            raise SomaConfigError(f"invalid worker address '{address}'")
        return f"{_WORKER_SCHEMES[scheme]}://{host_port}"
    match = _HOST_PORT.match(address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise SomaConfigError(f"invalid worker address '{address}'")
    return f"ws://{address}"


def _tags(tags: object) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        parts: Iterable[object] = tags.split(",")
    elif isinstance(tags, (list, tuple)):
        parts = tags
    else:
        raise SomaConfigError(
            f"tags must be a list of strings or a comma-separated string, got {tags!r}"
        )
    if not all(isinstance(t, str) for t in parts):
        raise SomaConfigError(f"tags must be strings, got {tags!r}")
    return [t.strip() for t in parts if isinstance(t, str) and t.strip()]
