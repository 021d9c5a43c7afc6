"""Training messages on a session with a torch filter: envelopes, gradients, strict state loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _execute_filters as F
import numpy as np
import pytest
from _execute_support import RecordingConnection, filt, fit_mode, plan, rig, success

from soma.wire import v2
from soma.wire.messages import (
    Ack,
    ApplyGradients,
    Error,
    GetGradients,
    GetState,
    GradientsResult,
    SetState,
    StateResult,
)

torch = pytest.importorskip("torch")

X = np.array([[1.0, 2.0], [0.0, 1.0], [2.0, 0.5], [1.5, 1.5]], dtype=np.float32)
Y = np.array([[1.0], [0.0], [2.0], [1.0]], dtype=np.float32)
COMPOSITE = {"type": "Composite", "node_ids": ["t"]}


def _client(message: Any) -> Any:
    """A worker message as the client decodes it (tensors materialised)."""
    return v2.decode(v2.encode_frame(message), "client")


async def test_gradient_steps_in_a_session_match_a_hand_computed_update(tmp_path: Path) -> None:
    conn = RecordingConnection()
    regressor = filt("t", F.TorchRegressor(), trainable=True, differentiable=True)
    async with rig(tmp_path) as r:
        opening = plan(COMPOSITE, [regressor], input=X, mode=fit_mode(y=Y), outputs=["t"], session={"keep": True})
        opened = success(await r.run(opening, conn))
        sid = opening.plan.plan_id
        envelope = opened.states["t"]
        assert envelope["__soma_node_state__"] == 1 and envelope["fit"] == {"fitted": 1}
        assert set(envelope["weights"]) == {"weight", "bias"}

        step = plan(COMPOSITE, [regressor], input=X, mode=fit_mode(y=Y), session_id=sid, composite_phase="grad")
        stepped = success(await r.run(step, conn))
        training = conn.events("Training")
        assert stepped.metrics["loss"] == pytest.approx(training[-1]["loss"])
        assert training[-1]["node_ids"] == ["t"] and training[-1]["composite_phase"] == "grad"

        before = _client(await r.executor.get_state(GetState(plan_id=sid, node_ids=["t"]), conn)).states["t"]["weights"]
        grads = await r.executor.get_gradients(GetGradients(plan_id=sid, node_ids=["t"]), conn)
        assert isinstance(grads, GradientsResult) and grads.missing == []
        g = {name: tensor.numpy() for name, tensor in _client(grads).gradients["t"].items()}
        weight, bias = before["weight"].numpy(), before["bias"].numpy()
        residual = X @ weight.T + bias - Y
        np.testing.assert_allclose(g["weight"], 2 * residual.T @ X / len(X), rtol=1e-5)
        np.testing.assert_allclose(g["bias"], 2 * residual.sum(axis=0) / len(X), rtol=1e-5)

        applied = await r.executor.apply_gradients(ApplyGradients(plan_id=sid, gradients={"t": g}, lr=0.1), conn)
        assert isinstance(applied, Ack)
        after = _client(await r.executor.get_state(GetState(plan_id=sid, node_ids=["t"]), conn)).states["t"]["weights"]
        np.testing.assert_allclose(after["weight"].numpy(), weight - 0.1 * g["weight"], rtol=1e-6)
        np.testing.assert_allclose(after["bias"].numpy(), bias - 0.1 * g["bias"], rtol=1e-6)
        cleared = await r.executor.get_gradients(GetGradients(plan_id=sid, node_ids=["t"]), conn)
        assert isinstance(cleared, GradientsResult) and cleared.missing == ["t"]  # zeroed after the step


async def test_v1_composites_uncached_owner_states_and_strict_state_loading(tmp_path: Path) -> None:
    key = "9" * 64
    conn = RecordingConnection()
    async with rig(tmp_path) as r:  # one child for all three checks: torch is slow to import
        # v1 composites run as one COMPOSITE_FIT (phase all) / COMPOSITE_FORWARD command (§6.3, §6.4).
        expected = F.TorchRegressor().module(torch.as_tensor(X)).detach().numpy()
        for mode in (fit_mode(y=Y.tolist()), "Forward"):
            regressor = filt("t", F.TorchRegressor(), trainable=True)
            v1_plan = plan(COMPOSITE, [regressor], dialect="v1", input=X.tolist(), mode=mode)
            result = success(await r.run(v1_plan))
            output = np.asarray(result.output.buffer).view(np.float32).reshape(4, 1)  # a TorchData in the worker
            np.testing.assert_allclose(output, expected, rtol=1e-6)
            assert ("t" in result.states) == (mode != "Forward")
        for keep in (False, True):
            msg = plan(
                {"type": "Execute", "node_id": "t"},
                [filt("t", F.TorchRegressor(), trainable=True, fit_key=key)],
                input=X,
                mode=fit_mode(y=Y),
                session={"keep": keep},
            )
            success(await r.run(msg, conn))
        assert conn.events("NodeCacheHit") == [] and r.executor.cache.get(key) is None
        sid = msg.plan.plan_id
        state = await r.executor.get_state(GetState(plan_id=sid, node_ids=["t"]), conn)
        assert isinstance(state, StateResult)
        wrong = {"__soma_node_state__": 1, "fit": {"fitted": 1}, "weights": {"not_a_parameter": np.zeros(2)}}
        reply = await r.executor.set_state(SetState(plan_id=sid, states={"t": wrong}), conn)
        assert isinstance(reply, Error) and reply.code == "state_mismatch"
        assert reply.details == {"node_id": "t", "set": []} and "not_a_parameter" in reply.message
        assert isinstance(await r.executor.set_state(SetState(plan_id=sid, states={"t": state.states["t"]}), conn), Ack)
