"""The walk of one validated plan on a loaded child (worker spec §6.2–§6.5, §6.7).

    units in plan order (Sequence in order, Parallel members in order, Remote inlined):
      Composite, fit (v1; v2 phase grad/all) or forward (v1) ─▶ one COMPOSITE_FIT / COMPOSITE_FORWARD
      otherwise, per node:
        fit, trainable:  cache (fit key) ─hit─▶ Opaque state ; miss ─▶ BATCHED_FIT or FIT
        output:          cache (out key, or the Cached step's key) ─hit─▶ Opaque ; miss ─▶ FORWARD
      NodeStarted / NodeCacheHit / NodeCompleted / NodeFailed (and Training) events meanwhile

Outputs the plan returns come back as values, the others stay in the child as ``Handle``s.
The walk knows nothing of slots, cancellation or time limits: ``call`` (one child command for a
node, raising ``Failed``) and ``emit`` (one event to the client) carry them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from soma.isolation.markers import Handle, Opaque, TorchData
from soma.isolation.training import is_envelope
from soma.runtime import events as ev
from soma.wire.messages import SerializedFilter
from soma.worker.blobcache import BlobCache, BlobHit
from soma.worker.failures import Failed
from soma.worker.validate import PlanSpec

__all__ = ["PlanWalk", "event", "served_by_cache"]


def _holds_markers(value: Any) -> bool:
    """Whether a neutral value holds ``Opaque`` or ``TorchData`` markers at any depth."""
    if isinstance(value, Opaque | TorchData):
        return True
    if isinstance(value, dict):
        return any(_holds_markers(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_markers(item) for item in value)
    return False


def served_by_cache(spec: PlanSpec, cache: BlobCache) -> bool:
    """Whether the memory cache holds every state and output the plan would compute (so it needs no child).

    Mirrors ``PlanWalk._compute``: a trainable node in fit needs its state entry, every node its
    output entry; composite units always run.
    """
    if not spec.cached:
        return False
    for unit in spec.units:
        if unit.composite and spec.one_command_composites:
            return False
        for node_id in unit.node_ids:
            fit_key, out_key = _cache_keys(spec, spec.filters[node_id], unit.cached_key)
            if spec.fit and spec.filters[node_id].trainable and (fit_key is None or not cache.holds(fit_key)):
                return False
            if out_key is None or not cache.holds(out_key):
                return False
    return True


def _cache_keys(spec: PlanSpec, f: SerializedFilter, cached_key: str | None) -> tuple[str | None, str | None]:
    """The state and output keys a node is cached under (none when the plan or filter is not cached)."""
    if not (spec.cached and f.cacheable):
        return None, None
    out_key = None if f.differentiable else (cached_key or f.out_key)
    return f.fit_key, out_key


def event(event_type: str, run_id: str, phase: str, **fields: Any) -> dict[str, Any]:
    """An event that ``soma.runtime.events`` has no constructor for (``Log``, ``Training``)."""
    return {"event_type": event_type, "ts": time.time(), "run_id": run_id, "phase": phase, **fields}


class PlanWalk:
    """Runs a plan's units on its child and collects ``values`` (by node), ``states`` and ``metrics``.

    ``x`` and ``y`` feed the plan, ``external`` holds outputs of nodes outside it; ``target`` names
    the worker in events. ``call(cmd, node_id, **fields)`` runs one child command, ``emit(event)``
    sends one event, ``blocking`` runs cache disk I/O off the loop and ``count_cache(hit)`` counts.
    """

    def __init__(
        self,
        spec: PlanSpec,
        *,
        run_id: str,
        target: str,
        x: Any,
        y: Any,
        external: Mapping[str, Any],
        call: Callable[..., Awaitable[dict[str, Any]]],
        emit: Callable[[dict[str, Any]], Awaitable[None]],
        cache: BlobCache,
        count_cache: Callable[[bool], None],
        blocking: Callable[..., Awaitable[Any]],
    ) -> None:
        self.spec = spec
        self.run_id = run_id
        self._target = target
        self._x = x
        self._y = y
        self._external = external
        self._call = call
        self._emit = emit
        self._cache = cache
        self._count_cache = count_cache
        self._blocking = blocking
        self._want_value = set(spec.outputs)
        self._summaries: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self.states: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}

    async def run(self) -> None:
        """Walk every unit in order; a failure raises ``Failed`` after its ``NodeFailed`` event."""
        for unit in self.spec.units:
            if unit.composite and self.spec.one_command_composites:
                await self._composite(unit.node_ids)
            else:
                for node_id in unit.node_ids:
                    await self._node(node_id, unit.cached_key)

    def _input_of(self, node_id: str) -> Any:
        preds = self.spec.preds[node_id]
        if not preds:
            return self._x
        if len(preds) == 1:
            return self._value_of(preds[0])
        return {pred: self._value_of(pred) for pred in preds}

    def _value_of(self, node_id: str) -> Any:
        return self.values[node_id] if node_id in self.values else self._external[node_id]

    async def _lookup(self, node_id: str, key: str, what: str) -> BlobHit | None:
        cache = self._cache
        hit = cache.get(key) if cache.disk is None else await self._blocking(cache.get, key)
        self._count_cache(hit is not None)
        if hit is not None:
            await self._emit(
                ev.node_cache_hit(self.run_id, self.spec.phase, node_id, key, hit.tier, what, hit.load_time_ms)
            )
        return hit

    async def _remember(self, key: str, blob: bytes, what: str, node_id: str, summary: str | None) -> None:
        cache = self._cache
        if cache.disk is None:
            cache.put(key, blob, kind=what, node_id=node_id, summary=summary)
        else:
            await self._blocking(cache.put, key, blob, kind=what, node_id=node_id, summary=summary)

    async def _node(self, node_id: str, cached_key: str | None) -> None:
        f = self.spec.filters[node_id]
        await self._emit(
            ev.node_started(
                self.run_id, self.spec.phase, node_id, "Trainable" if f.trainable else "Stateless", self._target
            )
        )
        started = time.perf_counter()
        try:
            no_user_code = await self._compute(node_id, f, cached_key)
        except Failed as failed:
            await self._node_failed(node_id, failed, started)
            raise
        await self._emit(
            ev.node_completed(
                self.run_id,
                self.spec.phase,
                node_id,
                time.perf_counter() - started,
                no_user_code,
                self._summaries.get(node_id, "None"),
            )
        )

    async def _compute(self, node_id: str, f: SerializedFilter, cached_key: str | None) -> bool:
        """Produce the node's output (and state, in fit); return whether no user method ran."""
        x = self._input_of(node_id)
        fit_key, out_key = _cache_keys(self.spec, f, cached_key)
        give_back = "value" if node_id in self._want_value else "handle"
        state_field: dict[str, Any] = {}
        no_user_code = True
        if self.spec.fit and f.trainable:
            hit = await self._lookup(node_id, fit_key, "state") if fit_key else None
            if hit is not None:
                state = Opaque(hit.blob, [])
                self.states[node_id] = state
                state_field["state"] = state
            elif self.spec.batch_size is not None:
                reply = await self._call(
                    "BATCHED_FIT",
                    node_id,
                    node_ids=[node_id],
                    data=x,
                    y=self._y,
                    batch_size=self.spec.batch_size,
                    blob=out_key is not None,
                    **{"return": give_back},
                )
                self.states[node_id] = reply.get("states", {}).get(node_id)
                await self._keep_output(node_id, reply, out_key)
                return False
            else:
                # v1 has no marker encoding: a state holding objects or tensors goes as the child's pickle.
                want_blob = fit_key is not None or self.spec.dialect == "v1"
                reply = await self._call("FIT", node_id, node_id=node_id, data=x, y=self._y, blob=want_blob)
                fitted = reply.get("result")
                if self.spec.dialect == "v1" and _holds_markers(fitted):
                    self.states[node_id] = Opaque(reply["blob"], [])
                else:
                    self.states[node_id] = fitted
                no_user_code = False
                # Parameter owners train their weights in place: their fit states are never cached.
                if fit_key is not None and reply.get("blob") is not None and not is_envelope(fitted):
                    await self._remember(fit_key, reply["blob"], "state", node_id, None)
        if out_key is not None:
            hit = await self._lookup(node_id, out_key, "output")
            if hit is not None:
                self.values[node_id] = Opaque(hit.blob, [])
                self._summaries[node_id] = hit.summary or "<cached>"
                return no_user_code
        # An output that is cached is answered as its cache blob, as a later hit will be: the value
        # crosses from the child once, and the client gets the same bytes both times.
        as_blob = out_key is not None and give_back == "value"
        reply = await self._call(
            "FORWARD",
            node_id,
            node_id=node_id,
            data=x,
            blob=out_key is not None,
            **{"return": "handle" if as_blob else give_back},
            **state_field,
        )
        await self._keep_output(node_id, reply, out_key, as_blob=as_blob)
        return False

    async def _keep_output(
        self, node_id: str, reply: Mapping[str, Any], out_key: str | None, *, as_blob: bool = False
    ) -> None:
        if as_blob and isinstance(reply.get("blob"), bytes):
            self.values[node_id] = Opaque(reply["blob"], [])
        else:
            self.values[node_id] = Handle(reply["handle"]) if "handle" in reply else reply.get("result")
        summary = reply.get("summary")
        self._summaries[node_id] = summary if isinstance(summary, str) else "None"
        if out_key is not None and reply.get("blob") is not None:
            await self._remember(out_key, reply["blob"], "output", node_id, self._summaries[node_id])

    async def _composite(self, node_ids: tuple[str, ...]) -> None:
        """One COMPOSITE_FIT (fit: v1 phase ``all``, v2 ``grad``/``all``) or COMPOSITE_FORWARD (v1 forward)."""
        spec = self.spec
        last = node_ids[-1]
        for node_id in node_ids:
            kind = "Trainable" if spec.filters[node_id].trainable else "Stateless"
            await self._emit(ev.node_started(self.run_id, spec.phase, node_id, kind, self._target))
        started = time.perf_counter()
        fields = {
            "node_ids": list(node_ids),
            "data": self._input_of(node_ids[0]),
            "return": "value" if last in self._want_value else "handle",
        }
        try:
            if spec.fit:
                reply = await self._call("COMPOSITE_FIT", node_ids[0], y=self._y, phase=spec.composite_phase, **fields)
            else:
                reply = await self._call("COMPOSITE_FORWARD", node_ids[0], **fields)
        except Failed as failed:
            await self._node_failed(failed.info.node_id or node_ids[0], failed, started)
            raise
        await self._keep_output(last, reply, None)
        if spec.fit:
            self.states.update(reply.get("states") or {})
            loss = reply.get("loss")
            self.metrics["loss"] = loss
            await self._emit(
                event(
                    "Training",
                    self.run_id,
                    spec.phase,
                    node_ids=list(node_ids),
                    composite_phase=spec.composite_phase,
                    loss=loss,
                )
            )
        duration = time.perf_counter() - started
        for node_id in node_ids:
            summary = self._summaries[last] if node_id == last else "<inside composite>"
            await self._emit(ev.node_completed(self.run_id, spec.phase, node_id, duration, False, summary))

    async def _node_failed(self, node_id: str, failed: Failed, started: float) -> None:
        info = failed.info
        text = info.message
        if info.code == "user_error" and self.spec.dialect == "v2":
            text = f"Python {info.method or 'user code'}() error: {info.python_type}: {info.message}"
        await self._emit(
            ev.node_failed(
                self.run_id,
                self.spec.phase,
                node_id,
                text,
                info.python_type or info.code,
                time.perf_counter() - started,
            )
        )
