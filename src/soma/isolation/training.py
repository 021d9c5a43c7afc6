"""Training filters that own parameters: weights envelopes, the composite step, gradients.

Everything here follows the gradient hooks of isolation.md §4: the parameter owner
of a filter, the weights envelope that carries trained weights (and optimizer state)
to another process, the composite pass of §4.1, and reading and applying parameter
gradients. Kept out of the daemon because the local executor and the client unwrap
envelopes and run the composite step with the same code, so local and remote
training give identical results. Duck-typed: torch is imported only when a pass,
a weight load or a gradient needs it.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from soma.isolation.child_errors import CommandError, call_user
from soma.isolation.markers import TorchData
from soma.isolation.tensors import import_torch, is_ndarray, is_tensor, tensor_to_marker

__all__ = [
    "ENVELOPE_KEY",
    "PHASES",
    "CompositeNode",
    "CompositeResult",
    "apply_gradients",
    "check_phase",
    "composite_fit",
    "composite_forward",
    "is_envelope",
    "match_gradients",
    "parameter_owner",
    "read_gradients",
    "unwrap_state",
    "wrap_state",
]

ENVELOPE_KEY = "__soma_node_state__"
PHASES = ("all", "fit", "grad")


# --------------------------------------------------------------------------- weights envelope


def parameter_owner(filter_obj: Any) -> Any | None:
    """The object holding a filter's trainable parameters, or ``None`` (isolation.md §4).

    ``filter.soma_module()`` if defined, else the filter itself if it has a callable
    ``named_parameters``, else the first of ``module``, ``model``, ``net`` having one.
    Duck-typed: torch is not imported. A raising ``soma_module()`` raises ``UserCodeError``.
    """
    soma_module = getattr(filter_obj, "soma_module", None)
    if callable(soma_module):
        return call_user(None, None, soma_module)
    if callable(getattr(filter_obj, "named_parameters", None)):
        return filter_obj
    for name in ("module", "model", "net"):
        candidate = getattr(filter_obj, name, None)
        if candidate is not None and callable(getattr(candidate, "named_parameters", None)):
            return candidate
    return None


def is_envelope(state: object) -> bool:
    """Whether ``state`` is a weights envelope ``{"__soma_node_state__": 1, "fit", "weights"}``."""
    return type(state) is dict and state.get(ENVELOPE_KEY) == 1 and "weights" in state


def wrap_state(filter_obj: Any, fit_state: Any, *, snapshot: bool = False) -> Any:
    """Wrap ``fit_state`` in a weights envelope when the filter has a parameter owner.

    A fresh process cannot see weights trained in place, so the envelope carries them
    (and the optimizer state, when the filter has an ``optimizer``). ``snapshot``
    copies the tensors: needed when the envelope stays in this process (a handle)
    while training goes on; a value sent at once needs no copy.
    """
    owner = parameter_owner(filter_obj)
    if owner is None:
        return fit_state
    weights = {}
    for name, value in owner.state_dict().items():
        detached = value.detach() if is_tensor(value) else value
        weights[name] = detached.clone() if snapshot and is_tensor(detached) else detached
    envelope: dict[str, Any] = {ENVELOPE_KEY: 1, "fit": fit_state, "weights": weights}
    optimizer = getattr(filter_obj, "optimizer", None)
    if optimizer is not None and callable(getattr(optimizer, "state_dict", None)):
        optimizer_state = optimizer.state_dict()
        envelope["optimizer"] = copy.deepcopy(optimizer_state) if snapshot else optimizer_state
    return envelope


def unwrap_state(filter_obj: Any, state: Any) -> Any:
    """Return the fit part of ``state``; an envelope's weights are loaded into the filter first.

    Loading is strict: missing or unexpected names and shape mismatches raise
    ``CommandError("state_mismatch")`` listing them, before any weight changes. Weights
    equal to the loaded ones are not copied again.
    """
    if not is_envelope(state):
        return state
    owner = parameter_owner(filter_obj)
    if owner is None:
        raise CommandError(
            "state_mismatch",
            f"the state carries weights but {type(filter_obj).__name__} has no parameter owner "
            "(soma_module(), named_parameters, or a module/model/net attribute)",
        )
    _load_weights(owner, state["weights"])
    optimizer_state = state.get("optimizer")
    optimizer = getattr(filter_obj, "optimizer", None)
    if optimizer_state is not None and optimizer is not None:
        call_user("optimizer", None, optimizer.load_state_dict, optimizer_state)
    return state.get("fit")


def _load_weights(owner: Any, weights: Any) -> None:
    if not isinstance(weights, Mapping):
        raise CommandError("state_mismatch", f"envelope weights must be a dict, got {type(weights).__name__}")
    torch = import_torch()
    current = owner.state_dict()
    given = {name: torch.as_tensor(value) if is_ndarray(value) else value for name, value in weights.items()}
    missing = [name for name in current if name not in given]
    unexpected = [name for name in given if name not in current]
    mismatched = [
        f"{name}: expected {tuple(current[name].shape)}, got {tuple(value.shape)}"
        for name, value in given.items()
        if name in current and is_tensor(current[name]) and tuple(getattr(value, "shape", ())) != tuple(current[name].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if mismatched:
            parts.append(f"shape mismatch {mismatched}")
        raise CommandError("state_mismatch", "weights do not match the module: " + "; ".join(parts))
    if all(_same_tensor(current[name], value) for name, value in given.items()):
        return
    try:
        owner.load_state_dict(given, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CommandError("state_mismatch", f"weights could not be loaded: {exc}") from exc


def _same_tensor(current: Any, given: Any) -> bool:
    if not (is_tensor(current) and is_tensor(given)) or current.dtype != given.dtype:
        return False
    torch = sys.modules["torch"]
    return bool(torch.equal(current, given.to(current.device)))


# --------------------------------------------------------------------------- composite step (§4.1)


@dataclass
class CompositeNode:
    """One filter of a composite chain."""

    node_id: str
    filter: Any
    trainable: bool


@dataclass
class CompositeResult:
    """What a composite pass produced: the detached output, the fit states, the loss."""

    output: Any
    states: dict[str, Any] = field(default_factory=dict)
    loss: float | None = None


def _to_tensor_input(value: Any) -> Any:
    torch = sys.modules["torch"]
    if is_tensor(value):
        return value
    if is_ndarray(value):
        if value.dtype.kind == "f":
            return torch.from_numpy(value if value.flags.writeable else value.copy())
        if value.dtype.kind in "biu":
            return torch.as_tensor(value, dtype=torch.float32)
        return value
    if isinstance(value, list) and _is_numeric_nested(value):
        return torch.tensor(value, dtype=torch.float32)
    return value


def _is_numeric_nested(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_numeric_nested(item) for item in value)
    return type(value) in (bool, int, float)


def _detach(value: Any) -> Any:
    if is_tensor(value):
        return value.detach()
    if type(value) is tuple:
        return tuple(_detach(v) for v in value)
    if type(value) is list:
        return [_detach(v) for v in value]
    if type(value) is dict:
        return {k: _detach(v) for k, v in value.items()}
    return value


def composite_forward(nodes: Sequence[CompositeNode], x: Any, states: Mapping[str, Any], *, grad: bool = False) -> Any:
    """Chain ``forward`` through ``nodes`` with the fit states given (stateless: ``None``).

    Inputs are converted as in isolation.md §4.1; runs under ``torch.no_grad()``
    unless ``grad``. Returns the output detached. User exceptions raise ``UserCodeError``.
    """
    torch = import_torch()
    cur = _to_tensor_input(x)
    with torch.enable_grad() if grad else torch.no_grad():
        for node in nodes:
            state = states.get(node.node_id) if node.trainable else None
            cur = call_user("forward", node.node_id, node.filter.forward, cur, state)
    return _detach(cur)


def composite_fit(
    nodes: Sequence[CompositeNode],
    x: Any,
    y: Any,
    states: Mapping[str, Any],
    *,
    phase: str = "all",
) -> CompositeResult:
    """One training pass over a chain of differentiable filters (isolation.md §4.1).

    ``states`` holds the fit states used by phase ``grad`` (trainable nodes fit afresh
    in ``all`` and ``fit``). Returns the detached output, every trainable node's fit
    state and ``float(loss)`` (``None`` when nothing defines a loss or in phase
    ``fit``). Raises ``UserCodeError`` for user exceptions and
    ``CommandError("no_gradient")`` when the loss reaches no parameter.
    """
    check_phase(phase)
    torch = import_torch()
    cur = _to_tensor_input(x)
    target = _to_tensor_input(y)
    new_states: dict[str, Any] = {}
    for node in nodes:
        state = None
        if node.trainable:
            if phase == "grad":
                state = states.get(node.node_id)
            else:
                state = call_user("fit", node.node_id, node.filter.fit, _detach(cur), target)
            new_states[node.node_id] = state
        with torch.no_grad() if phase == "fit" else torch.enable_grad():
            cur = call_user("forward", node.node_id, node.filter.forward, cur, state)
    loss = None
    if phase != "fit" and nodes:
        last = nodes[-1]
        loss_fn = getattr(last.filter, "loss_fn", None)
        if callable(loss_fn):
            with torch.enable_grad():
                loss = call_user("loss_fn", last.node_id, loss_fn, cur, target)
        elif target is not None:
            pred = cur[0] if isinstance(cur, (tuple, list)) else cur
            loss = call_user(None, last.node_id, _mse_loss, pred, target)
    if loss is not None:
        _backward(nodes, loss)
        if phase == "all":
            for node in nodes:
                optimizer = getattr(node.filter, "optimizer", None)
                if optimizer is not None:
                    call_user("optimizer", node.node_id, optimizer.step)
                    call_user("optimizer", node.node_id, optimizer.zero_grad)
    return CompositeResult(_detach(cur), new_states, None if loss is None else float(loss))


def check_phase(phase: str) -> None:
    """Refuse a ``phase`` other than ``all``, ``fit`` or ``grad`` with ``CommandError("bad_request")``."""
    if phase not in PHASES:
        raise CommandError("bad_request", f"field 'phase' must be one of {list(PHASES)}, got {phase!r}")


def _mse_loss(pred: Any, target: Any) -> Any:
    torch = sys.modules["torch"]
    if not (is_tensor(pred) and is_tensor(target)):
        raise ValueError(
            f"the default MSE loss needs a tensor output and target, got {type(pred).__name__} "
            f"and {type(target).__name__}; define loss_fn(out, y) on the last filter"
        )
    if pred.shape != target.shape:
        if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1 and pred.shape[:-1] == target.shape:
            pred = pred.reshape(target.shape)
        elif target.dim() == pred.dim() + 1 and target.shape[-1] == 1 and target.shape[:-1] == pred.shape:
            target = target.reshape(pred.shape)
        else:
            raise ValueError(
                f"output shape {tuple(pred.shape)} and target shape {tuple(target.shape)} differ "
                "(only one trailing size-1 dimension is reshaped away; nothing is broadcast)"
            )
    return torch.nn.functional.mse_loss(pred, target.to(dtype=pred.dtype, device=pred.device), reduction="mean")


def _backward(nodes: Sequence[CompositeNode], loss: Any) -> None:
    if not (is_tensor(loss) and loss.requires_grad):
        raise CommandError(
            "no_gradient",
            "the loss does not depend on any parameter that requires grad: no backward pass is possible",
            node_id=nodes[-1].node_id,
        )
    for node in nodes:
        owner = parameter_owner(node.filter)
        if owner is not None:
            for parameter in owner.parameters():
                parameter.grad = None
    call_user(None, nodes[-1].node_id, loss.backward)


# --------------------------------------------------------------------------- gradients


def read_gradients(node_id: str, owner: Any) -> tuple[dict[str, TorchData], list[str]]:
    """The ``.grad`` of each parameter requiring grad, as ``TorchData``, and the names without one.

    Raises ``CommandError("no_gradient")`` when no parameter has a gradient.
    """
    gradients: dict[str, TorchData] = {}
    missing: list[str] = []
    for name, parameter in owner.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            missing.append(name)
        else:
            gradients[name] = tensor_to_marker(parameter.grad)
    if not gradients:
        raise CommandError(
            "no_gradient",
            f"node {node_id!r} has no gradient: run COMPOSITE_FIT with phase grad first",
            node_id=node_id,
        )
    return gradients, missing


def match_gradients(node_id: str, owner: Any, gradients: Mapping[str, Any]) -> dict[str, Any]:
    """``gradients`` as tensors of each parameter's dtype and device.

    Each name must be a parameter of equal shape, and at least one must be given;
    otherwise ``CommandError("gradient_mismatch")`` lists the names and shapes.
    """
    torch = import_torch()
    parameters = dict(owner.named_parameters())
    tensors: dict[str, Any] = {}
    problems: list[str] = []
    for name, gradient in gradients.items():
        parameter = parameters.get(name)
        if parameter is None:
            problems.append(f"{name!r} is not a parameter")
            continue
        tensor = gradient if is_tensor(gradient) else torch.as_tensor(gradient)
        if tuple(tensor.shape) != tuple(parameter.shape):
            problems.append(f"{name!r} has shape {tuple(tensor.shape)}, the parameter {tuple(parameter.shape)}")
            continue
        tensors[name] = tensor.to(dtype=parameter.dtype, device=parameter.device)
    if problems or not tensors:
        expected = {name: tuple(p.shape) for name, p in parameters.items()}
        detail = "; ".join(problems) if problems else "no gradient given"
        raise CommandError(
            "gradient_mismatch", f"gradients do not match node {node_id!r}: {detail}; parameters: {expected}", node_id=node_id
        )
    return tensors


def apply_gradients(node_id: str, owner: Any, optimizer: Any, tensors: Mapping[str, Any]) -> None:
    """Set every parameter's ``.grad`` from ``tensors`` (``None`` where absent), step, then zero them."""
    for name, parameter in owner.named_parameters():
        parameter.grad = tensors.get(name)
    call_user("optimizer", node_id, optimizer.step)
    call_user("optimizer", node_id, optimizer.zero_grad, True)
