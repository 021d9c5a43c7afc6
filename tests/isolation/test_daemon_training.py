"""Tensors, composite passes, gradients and weights envelopes on real daemons (CPU torch)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any

import cloudpickle
import numpy as np
import pytest
from _harness import DaemonProcess, client_value
from _harness import spec as load_entry

from soma.isolation.training import ENVELOPE_KEY
from soma.isolation.markers import TorchData

torch = pytest.importorskip("torch")

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Linear:
    """A trainable linear regression: the filter's ``module`` owns the parameters."""

    _differentiable = True

    def __init__(self, weight: list[list[float]], bias: list[float], *, lr: float | None = None) -> None:
        self.module = torch.nn.Linear(len(weight[0]), len(weight))
        with torch.no_grad():
            self.module.weight.copy_(torch.tensor(weight))
            self.module.bias.copy_(torch.tensor(bias))
        if lr is not None:
            self.optimizer = torch.optim.SGD(self.module.parameters(), lr=lr)

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"fit_rows": int(x.shape[0])}

    def forward(self, x: Any, state: Any) -> Any:
        return self.module(x)


class RaisingLoss(Linear):
    def loss_fn(self, out: Any, y: Any) -> Any:
        raise ArithmeticError("loss exploded")


class WithAux(Linear):
    def forward(self, x: Any, state: Any) -> Any:
        return (self.module(x), "aux")


class Identity:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Double:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return x * 2


class Specials:
    """No parameters; fit returns special floats."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"specials": [math.nan, math.inf, -math.inf, -0.0]}

    def forward(self, x: Any, state: Any) -> Any:
        return x


class TypeReport:
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return [type(x).__name__, str(x.dtype), list(x.shape), bool(x.requires_grad)]


W = [[0.5, -1.0]]
B = [0.25]
X = np.array([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0], [-2.0, 0.5]], dtype=np.float32)
Y = np.array([1.0, -0.5, 2.0, 0.0], dtype=np.float32)


def spec(node_id: str, obj: Any, *, trainable: bool | None = None) -> dict[str, Any]:
    return load_entry(node_id, obj, trainable=trainable, differentiable=True)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    first, second = DaemonProcess(), DaemonProcess()
    yield first, second
    first.close()
    second.close()


@pytest.fixture
def daemon(pair: tuple[DaemonProcess, DaemonProcess]) -> DaemonProcess:
    for child in pair:
        if child.process.poll() is not None:
            pytest.fail(f"a shared daemon died: {child.stderr_text()}")
    return pair[0]


def load(daemon: DaemonProcess, *specs: dict[str, Any]) -> None:
    daemon.ok("LOAD", filters=list(specs), runtime=None, seed=None)


def hand_gradients(weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """MSE gradients of a linear model, by hand, in float64."""
    x, y = X.astype(np.float64), Y.astype(np.float64)
    residual = x @ weight.T[:, 0] + bias[0] - y
    n = len(y)
    grad_w = (2.0 / n) * residual @ x
    grad_b = (2.0 / n) * residual.sum()
    return grad_w.reshape(1, -1), np.array([grad_b]), float(np.mean(residual**2))


def weights_of(state: Any) -> dict[str, np.ndarray]:
    assert state[ENVELOPE_KEY] == 1
    return {name: client_value(t).numpy().astype(np.float64) for name, t in state["weights"].items()}


def test_tensors_keep_shape_and_dtype_both_ways(daemon: DaemonProcess) -> None:
    load(daemon, spec("id", Identity()))
    for tensor in (
        torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4),
        torch.tensor(7, dtype=torch.int16),
        torch.empty((0, 3), dtype=torch.float64),
        torch.tensor([[True, False]]),
    ):
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        marker = TorchData(raw, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        reply = daemon.ok("FORWARD", node_id="id", data=marker)
        result = client_value(reply["result"])
        assert isinstance(reply["result"], TorchData)
        assert result.dtype == tensor.dtype and result.shape == tensor.shape
        assert torch.equal(result, tensor)
        assert reply["summary"] == f"Tensor(shape={tuple(tensor.shape)}, dtype={tensor.dtype}, device=cpu)"


def test_composite_forward_converts_inputs_and_returns_a_detached_tensor(daemon: DaemonProcess) -> None:
    load(daemon, spec("d", Double()), spec("t", TypeReport()))
    ints = np.arange(6, dtype=np.int64).reshape(3, 2)
    assert daemon.ok("COMPOSITE_FORWARD", node_ids=["t"], data=ints)["result"] == ["Tensor", "torch.float32", [3, 2], False]
    assert daemon.ok("COMPOSITE_FORWARD", node_ids=["t"], data=[[1, 2], [3, 4]])["result"][1:3] == ["torch.float32", [2, 2]]
    floats64 = np.ones((2, 2), dtype=np.float64)
    assert daemon.ok("COMPOSITE_FORWARD", node_ids=["d", "t"], data=floats64)["result"][1] == "torch.float64"
    load(daemon, spec("lin", Linear(W, B)), spec("d", Double()))
    reply = daemon.ok("COMPOSITE_FORWARD", node_ids=["lin", "d"], data=X, grad=True)
    result = client_value(reply["result"])
    expected = (X @ np.array(W, dtype=np.float32).T + np.array(B, dtype=np.float32)) * 2
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6)
    assert not result.requires_grad


def test_one_sgd_step_matches_hand_computed_mse_gradients(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", Linear(W, B, lr=0.1)))
    reply = daemon.ok("COMPOSITE_FIT", node_ids=["lin"], data=X, y=Y, phase="all")
    grad_w, grad_b, loss = hand_gradients(np.array(W), np.array(B))
    assert reply["loss"] == pytest.approx(loss, abs=1e-6)
    weights = weights_of(reply["states"]["lin"])
    np.testing.assert_allclose(weights["weight"], np.array(W) - 0.1 * grad_w, atol=1e-6, rtol=0)
    np.testing.assert_allclose(weights["bias"], np.array(B) - 0.1 * grad_b, atol=1e-6, rtol=0)
    assert reply["states"]["lin"]["fit"] == {"fit_rows": 4}
    assert "optimizer" in reply["states"]["lin"]
    assert daemon.error("GET_GRADIENTS", node_id="lin")["code"] == "no_gradient"  # zeroed after the step


def test_phase_grad_leaves_gradients_and_weights(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", Linear(W, B, lr=0.1)))
    before = weights_of(daemon.ok("GET_STATE", node_id="lin")["state"])
    reply = daemon.ok("COMPOSITE_FIT", node_ids=["lin"], data=X, y=Y, phase="grad")
    grad_w, grad_b, loss = hand_gradients(np.array(W), np.array(B))
    assert reply["loss"] == pytest.approx(loss, abs=1e-6)
    gradients = daemon.ok("GET_GRADIENTS", node_id="lin")
    assert gradients["missing"] == []
    np.testing.assert_allclose(client_value(gradients["gradients"]["weight"]).numpy(), grad_w, atol=1e-6)
    np.testing.assert_allclose(client_value(gradients["gradients"]["bias"]).numpy(), grad_b, atol=1e-6)
    after = weights_of(daemon.ok("GET_STATE", node_id="lin")["state"])
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_phase_grad_twice_does_not_accumulate(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", Linear(W, B)))
    daemon.ok("COMPOSITE_FIT", node_ids=["lin"], data=X, y=Y, phase="grad")
    once = client_value(daemon.ok("GET_GRADIENTS", node_id="lin")["gradients"]["weight"]).clone()
    daemon.ok("COMPOSITE_FIT", node_ids=["lin"], data=X, y=Y, phase="grad")
    twice = client_value(daemon.ok("GET_GRADIENTS", node_id="lin")["gradients"]["weight"])
    assert torch.equal(once, twice)


def test_phase_fit_calls_fit_and_no_backward(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", Linear(W, B, lr=0.1)))
    reply = daemon.ok("COMPOSITE_FIT", node_ids=["lin"], data=X, y=Y, phase="fit")
    assert reply["loss"] is None
    assert reply["states"]["lin"]["fit"] == {"fit_rows": 4}
    assert daemon.error("GET_GRADIENTS", node_id="lin")["code"] == "no_gradient"
    np.testing.assert_array_equal(weights_of(reply["states"]["lin"])["weight"], np.array(W))


def test_raising_loss_fn_is_a_user_error_naming_loss_fn(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", RaisingLoss(W, B)))
    error = daemon.error("COMPOSITE_FIT", node_ids=["lin"], data=X, y=Y)
    assert (error["code"], error["method"], error["type"]) == ("user_error", "loss_fn", "ArithmeticError")
    assert error["message"] == "loss exploded" and error["node_id"] == "lin"


def test_unreachable_parameters_with_a_target_give_no_gradient(daemon: DaemonProcess) -> None:
    load(daemon, spec("d", Double()))
    error = daemon.error("COMPOSITE_FIT", node_ids=["d"], data=X, y=X * 2)
    assert error["code"] == "no_gradient"


def test_tuple_output_uses_its_first_item_for_the_default_loss(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", WithAux(W, B)))
    reply = daemon.ok("COMPOSITE_FIT", node_ids=["lin"], data=X, y=Y, phase="grad")
    assert reply["loss"] == pytest.approx(hand_gradients(np.array(W), np.array(B))[2], abs=1e-6)
    prediction, aux = reply["result"]
    assert aux == "aux" and client_value(prediction).shape == (4, 1)


def test_incompatible_target_shape_is_an_error_naming_both_shapes(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", Linear(W, B)))
    error = daemon.error("COMPOSITE_FIT", node_ids=["lin"], data=X, y=np.ones((4, 3), dtype=np.float32))
    assert error["type"] == "ValueError" and "(4, 1)" in error["message"] and "(4, 3)" in error["message"]


def test_nan_inf_and_negative_zero_survive_composite_fit(daemon: DaemonProcess) -> None:
    load(daemon, spec("s", Specials()))
    data = np.array([[math.nan, -0.0], [math.inf, -math.inf]])
    reply = daemon.ok("COMPOSITE_FIT", node_ids=["s"], data=data, phase="all")
    assert reply["loss"] is None
    assert client_value(reply["result"]).numpy().tobytes() == data.tobytes()
    specials = reply["states"]["s"]["specials"]
    assert math.isnan(specials[0]) and specials[1:3] == [math.inf, -math.inf]
    assert math.copysign(1, specials[3]) == -1


def test_get_gradients_needs_parameters_and_a_backward_pass(daemon: DaemonProcess) -> None:
    load(daemon, spec("d", Double()), spec("lin", Linear(W, B)))
    assert daemon.error("GET_GRADIENTS", node_id="d")["code"] == "no_parameters"
    error = daemon.error("GET_GRADIENTS", node_id="lin")
    assert error["code"] == "no_gradient" and "phase grad" in error["message"]


@pytest.mark.parametrize(
    ("gradients", "fragment"),
    [
        ({"weight": np.ones((1, 2), dtype=np.float32), "nonexistent": np.ones(1)}, "nonexistent"),
        ({"weight": np.ones((2, 2), dtype=np.float32)}, "(2, 2)"),
        ({}, "no gradient given"),
    ],
)
def test_apply_gradients_refuses_mismatches(daemon: DaemonProcess, gradients: dict[str, Any], fragment: str) -> None:
    load(daemon, spec("lin", Linear(W, B)))
    error = daemon.error("APPLY_GRADIENTS", node_id="lin", gradients=gradients, lr=0.1)
    assert error["code"] == "gradient_mismatch" and fragment in error["message"]
    assert "weight" in error["message"] and "(1, 2)" in error["message"]
    np.testing.assert_array_equal(weights_of(daemon.ok("GET_STATE", node_id="lin")["state"])["weight"], np.array(W))


def test_apply_gradients_with_lr_steps_plain_sgd_and_clears_grads(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", Linear(W, B)))
    g_w = np.array([[0.5, -2.0]], dtype=np.float32)
    g_b = np.array([1.5], dtype=np.float32)
    daemon.ok("APPLY_GRADIENTS", node_id="lin", gradients={"weight": g_w, "bias": g_b}, lr=0.1)
    weights = weights_of(daemon.ok("GET_STATE", node_id="lin")["state"])
    np.testing.assert_allclose(weights["weight"], np.array(W) - 0.1 * g_w, atol=1e-7, rtol=0)
    np.testing.assert_allclose(weights["bias"], np.array(B) - 0.1 * g_b, atol=1e-7, rtol=0)
    error = daemon.error("GET_GRADIENTS", node_id="lin")
    assert error["code"] == "no_gradient"


def test_apply_gradients_without_optimizer_or_lr_is_no_optimizer(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", Linear(W, B)))
    error = daemon.error("APPLY_GRADIENTS", node_id="lin", gradients={"bias": np.ones(1, dtype=np.float32)})
    assert error["code"] == "no_optimizer"


def test_apply_gradients_uses_the_filter_optimizer(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", Linear(W, B, lr=1.0)))
    daemon.ok("APPLY_GRADIENTS", node_id="lin", gradients={"bias": np.ones(1, dtype=np.float32)}, lr=0.001)
    weights = weights_of(daemon.ok("GET_STATE", node_id="lin")["state"])
    np.testing.assert_allclose(weights["bias"], np.array(B) - 1.0, atol=1e-7)
    np.testing.assert_array_equal(weights["weight"], np.array(W))


def test_envelope_moves_trained_weights_to_a_fresh_child(pair: tuple[DaemonProcess, DaemonProcess]) -> None:
    trainer, fresh = pair
    load(trainer, spec("lin", Linear(W, B, lr=0.1)))
    trainer.ok("COMPOSITE_FIT", node_ids=["lin"], data=X, y=Y, phase="all")
    state = trainer.ok("GET_STATE", node_id="lin")["state"]
    assert state[ENVELOPE_KEY] == 1 and state["fit"] == {"fit_rows": 4}
    load(fresh, spec("lin", Linear([[9.0, 9.0]], [9.0], lr=0.1)))
    fresh.ok("SET_STATE", node_id="lin", state=state)
    trained = client_value(trainer.ok("FORWARD", node_id="lin", data=torch_input())["result"])
    restored = client_value(fresh.ok("FORWARD", node_id="lin", data=torch_input())["result"])
    assert trained.numpy().tobytes() == restored.numpy().tobytes()
    assert fresh.ok("GET_STATE", node_id="lin")["state"]["fit"] == {"fit_rows": 4}


def torch_input() -> TorchData:
    tensor = torch.from_numpy(X)
    return TorchData(tensor.numpy().tobytes(), "float32", tuple(tensor.shape))


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_set_state_with_wrong_weights_is_state_mismatch(daemon: DaemonProcess, change: str) -> None:
    load(daemon, spec("lin", Linear(W, B)))
    state = daemon.ok("GET_STATE", node_id="lin")["state"]
    weights = dict(state["weights"])
    if change == "missing":
        del weights["bias"]
    elif change == "unexpected":
        weights["extra"] = weights["bias"]
    else:
        weights["weight"] = TorchData(np.zeros(3, dtype=np.float32).tobytes(), "float32", (1, 3))
    error = daemon.error("SET_STATE", node_id="lin", state={**state, "weights": weights})
    assert error["code"] == "state_mismatch"
    assert {"missing": "bias", "unexpected": "extra", "shape": "(1, 3)"}[change] in error["message"]
    np.testing.assert_array_equal(weights_of(daemon.ok("GET_STATE", node_id="lin")["state"])["weight"], np.array(W))


def test_forward_with_an_envelope_state_loads_its_weights(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", Linear(W, B, lr=0.5)))
    initial = daemon.ok("GET_STATE", node_id="lin")["state"]
    daemon.ok("COMPOSITE_FIT", node_ids=["lin"], data=X, y=Y, phase="all")
    out = client_value(daemon.ok("FORWARD", node_id="lin", data=torch_input(), state=initial)["result"])
    expected = X @ np.array(W, dtype=np.float32).T + np.array(B, dtype=np.float32)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)


def test_fit_on_a_parameter_owner_returns_an_envelope_and_handles_snapshot_it(daemon: DaemonProcess) -> None:
    load(daemon, spec("lin", Linear(W, B, lr=0.1)))
    state = daemon.ok("FIT", node_id="lin", data=torch_input())["result"]
    assert state[ENVELOPE_KEY] == 1 and state["fit"] == {"fit_rows": 4}
    kept = daemon.ok("FIT", node_id="lin", data=torch_input(), **{"return": "handle"})["handle"]
    daemon.ok("COMPOSITE_FIT", node_ids=["lin"], data=X, y=Y, phase="all")
    daemon.ok("SET_STATE", node_id="lin", state=_handle(kept))
    np.testing.assert_array_equal(weights_of(daemon.ok("GET_STATE", node_id="lin")["state"])["weight"], np.array(W))


def _handle(name: str) -> Any:
    from soma.isolation.markers import Handle

    return Handle(name)
