"""A stand-alone wire-v1 client, written the way a Soma 0.2.43 client talks to a worker.

Run as ``python _v1_client.py <http base url> <token>``. It opens a plain aiohttp WebSocket
(no subprotocol, token in the query string), sends JSON text frames only, with filters pickled
by cloudpickle and base64-encoded: a ``Fit`` plan, then a ``Forward`` plan carrying the state
the fit returned. It prints one JSON line: the pickle references it used and both results.

Its filters subclass ``soma.filter.Filter`` and use a ``soma.search`` descriptor; their class
is defined here in ``__main__``, so cloudpickle ships it by value while ``Filter``, the
metaclass ``FilterMeta`` and ``SearchDescriptor`` go by reference, as in a 0.2.43 pickle.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import sys
from typing import Any

import aiohttp
import cloudpickle

from soma.filter import Filter, FilterMeta
from soma.search import search


class Centre(Filter, metaclass=FilterMeta):
    """Trainable: learns the mean, then centres on it and adds a searchable offset."""

    offset = search(0.0, 10.0, default=1.0)

    def fit(self, x: Any, y: Any = None) -> dict[str, float]:
        return {"mean": sum(x) / len(x)}

    def forward(self, x: Any, state: Any) -> list[float]:
        return [v - state["mean"] + self.offset for v in x]


class Doubler(Filter):
    """Stateless: doubles every number."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> list[float]:
        assert state is None
        return [2 * v for v in x]


class _Pickler(cloudpickle.Pickler):
    """Names the 0.2.43 metaclass by its import path, as a pickle of a 0.2.43 ``Filter`` class does."""

    def reducer_override(self, obj: Any) -> Any:
        if obj is FilterMeta:
            return getattr, (importlib.import_module("soma.filter"), "FilterMeta")
        return super().reducer_override(obj)


def _pickled(obj: Any) -> str:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=5).dump(obj)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _tensor(values: list[float]) -> dict[str, Any]:
    return {"type": "Tensor", "data": {"values": values, "shape": [len(values)]}}


def _plan(plan_id: str, values: list[float], mode: Any, state: Any) -> dict[str, Any]:
    return {
        "type": "AssignPlan",
        "plan": {
            "plan_id": plan_id,
            "plan": {"Sequence": [{"Execute": {"node_id": "centre"}}, {"Execute": {"node_id": "d"}}]},
            "input": {"source": "Inline", "value": _tensor(values)},
            "filters": [
                {"node_id": "centre", "pickled_filter": _pickled(Centre()), "state": state,
                 "requirements": [], "trainable": True},
                {"node_id": "d", "pickled_filter": _pickled(Doubler()), "state": None,
                 "requirements": [], "trainable": False},
            ],
            "mode": mode,
            "metadata": {},
        },
    }


async def _exchange(ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> dict[str, Any]:
    """Send one plan and wait for its ``PlanResult``, skipping any other frame (0.2.43 behaviour)."""
    await ws.send_str(json.dumps(message))
    while True:
        frame = await ws.receive(timeout=60)
        if frame.type is not aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"unexpected frame {frame!r}")
        reply = json.loads(frame.data)
        if reply.get("type") == "PlanResult" and reply.get("plan_id") == message["plan"]["plan_id"]:
            return reply["result"]


async def main(base_url: str, token: str) -> None:
    pickle_text = base64.b64decode(_pickled(Centre()))
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{base_url.replace('http', 'ws', 1)}/ws?token={token}") as ws:
            fit = await _exchange(ws, _plan("remote_plan_fit", [1.0, 2.0, 3.0], {"Fit": {"y": None}}, None))
            state = fit.get("states", {}).get("centre")
            forward = await _exchange(ws, _plan("remote_plan_fwd", [4.0, 5.0], "Forward", state))
    references = {name: name.encode() in pickle_text for name in ("soma.filter", "FilterMeta", "soma.search")}
    print(json.dumps({"references": references, "fit": fit, "forward": forward}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
