"""Filters of the conformance suite: deterministic, input-preserving, covering the value kinds.

None of them mutates its input or assigns attributes in ``fit``. Shipped to workers by
value (this is a user module), so the worker's children never import this file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from soma import Filter, current_seed


class Double(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        if isinstance(x, list):
            return [2 * v for v in x]
        return x * 2


class AddOne(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        if isinstance(x, list):
            return [v + 1 for v in x]
        return x + 1


class Center(Filter):
    """Trainable: subtracts the (NaN-ignoring) column mean learned in ``fit``."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"mean": np.nanmean(np.asarray(x, dtype=float), axis=0)}

    def forward(self, x: Any, state: Any) -> Any:
        return np.asarray(x, dtype=float) - state["mean"]


class Scale(Filter):
    """Trainable: divides by a learned standard deviation (a float in the state)."""

    factor = 1.0

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__(factor=factor)

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"std": float(np.nanstd(np.asarray(x, dtype=float))) or 1.0, "n": len(x)}

    def forward(self, x: Any, state: Any) -> Any:
        return np.asarray(x, dtype=float) / state["std"] * self.factor


class Join(Filter):
    """Stateless fan-in: records the keys it received, in order, with each input's type."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return {"keys": list(x), "types": [type(v).__name__ for v in x.values()], "values": x}


class SumJoin(Filter):
    """Trainable fan-in: learns a weight per predecessor from y."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return {k: float(np.sum(v)) / (1.0 + float(np.sum(y))) for k, v in x.items()}

    def forward(self, x: Any, state: Any) -> Any:
        return sum(state[k] * np.asarray(v, dtype=float) for k, v in x.items())


class ToDict(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return {"head": list(x[:2]), "pair": (len(x), "n"), "nested": {"a": [1, (2, 3)], 7: None}}


class FromDict(Filter):
    def fit(self, x: Any, y: Any = None) -> Any:
        return {"count": len(x["head"]), "key_types": [type(k).__name__ for k in x["nested"]]}

    def forward(self, x: Any, state: Any) -> Any:
        return (x["pair"], state["count"], x["nested"][7], tuple(x["head"]))


class Tupled(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return (np.asarray(x), len(x), "label", (None, True))


class NoneState(Filter):
    """Trainable whose fit returns ``None``; forward must then get ``None``."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return None

    def forward(self, x: Any, state: Any) -> Any:
        return {"state_is_none": state is None, "x": x}


class Dtypes(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        base = np.asarray(x)
        return {
            "i32": base.astype(np.int32),
            "f32": base.astype(np.float32),
            "bool": base > 1,
            "zero_d": np.array(3.5),
            "empty": np.empty((0, 3)),
            "scalar": np.float32(1.5),
            "i64": np.int64(-7),
            "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        }


class Specials(Filter):
    """Trainable producing NaN, infinities and -0.0 in both state and output."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"nan": float("nan"), "inf": [float("inf"), float("-inf")], "neg_zero": -0.0}

    def forward(self, x: Any, state: Any) -> Any:
        out = np.asarray(x, dtype=float).copy()
        out[0] = np.nan
        return {"array": out, "floats": [state["nan"], *state["inf"], state["neg_zero"]]}


class RunningMean(Filter):
    """Trainable with ``partial_fit``: the state is threaded through batches."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"sum": float(np.sum(x)), "rows": len(x), "batches": 1}

    def partial_fit(self, x: Any, y: Any, state: Any) -> Any:
        state = state or {"sum": 0.0, "rows": 0, "batches": 0}
        extra = 0.0 if y is None else float(np.sum(y))
        return {
            "sum": state["sum"] + float(np.sum(x)) + extra,
            "rows": state["rows"] + len(x),
            "batches": state["batches"] + 1,
        }

    def forward(self, x: Any, state: Any) -> Any:
        return np.asarray(x, dtype=float) - state["sum"] / state["rows"]


class LeastSquares(Filter):
    def fit(self, x: Any, y: Any = None) -> Any:
        weights, *_ = np.linalg.lstsq(np.asarray(x, dtype=float), np.asarray(y, dtype=float), rcond=None)
        return weights

    def forward(self, x: Any, state: Any) -> Any:
        return np.asarray(x, dtype=float) @ state


class Smooth(Filter):
    """Differentiable (numpy): consecutive ones are grouped into a ``Composite``."""

    _differentiable = True

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"w": float(np.mean(x)) / 10.0}

    def forward(self, x: Any, state: Any) -> Any:
        return np.asarray(x, dtype=float) * (1.0 - state["w"])


class SeedDraws(Filter):
    """Draws from a generator seeded by ``current_seed()``, in fit and forward."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"seed": current_seed(), "draws": np.random.default_rng(current_seed()).random(3)}

    def forward(self, x: Any, state: Any) -> Any:
        return {"seed": current_seed(), "noise": np.random.default_rng(current_seed()).random(2), "state": state}


@dataclasses.dataclass
class Summary:
    """A user object crossing the wire as an opaque value."""

    total: float
    labels: tuple[str, ...]


class Summarise(Filter):
    def fit(self, x: Any, y: Any = None) -> Any:
        return Summary(float(np.sum(x)), ("fit",))

    def forward(self, x: Any, state: Any) -> Any:
        return Summary(state.total + 1.0, (*state.labels, "forward"))


class Misc(Filter):
    """Stateless: big ints, bytes, strings, None and a set pass through."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return {
            "big": 2**80,
            "neg_big": -(2**70),
            "bytes": b"\x00\xff",
            "text": 'é\n"',
            "none": None,
            "set": {1, 2},
            "x": x,
        }


class Uncached(Filter):
    _cacheable = False

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"len": len(x)}

    def forward(self, x: Any, state: Any) -> Any:
        return [v * state["len"] for v in x]


class Frame(Filter):
    """Stateless pandas filter (a DataFrame crosses as an opaque object)."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        import pandas as pd

        return pd.DataFrame({"a": list(x), "b": [str(v) for v in x]})


class TorchLinear(Filter):
    """A torch regressor: its module is the parameter owner, trained in place by ``fit``."""

    steps = 15

    def __init__(self, steps: int = 15) -> None:
        import torch

        super().__init__(steps=steps)
        generator = torch.Generator().manual_seed(0)
        self._module = torch.nn.Linear(3, 1).double()
        with torch.no_grad():
            for parameter in self._module.parameters():
                parameter.copy_(torch.rand(parameter.shape, generator=generator, dtype=torch.float64))

    def soma_module(self) -> Any:
        return self._module

    def fit(self, x: Any, y: Any = None) -> Any:
        import torch

        inputs = torch.as_tensor(x, dtype=torch.float64)
        target = torch.as_tensor(y, dtype=torch.float64).reshape(-1, 1)
        optimizer = torch.optim.SGD(self._module.parameters(), lr=0.05)
        losses = []
        for _ in range(self.steps):
            optimizer.zero_grad()
            loss = torch.mean((self._module(inputs) - target) ** 2)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses.append(float(loss.detach()))
        return {"steps": self.steps, "final_loss": losses[-1]}

    def forward(self, x: Any, state: Any) -> Any:
        import torch

        with torch.no_grad():
            return self._module(torch.as_tensor(x, dtype=torch.float64))


class TorchOps(Filter):
    """Stateless torch: tensors of several dtypes in and out."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        import torch

        tensor = torch.as_tensor(x)
        return {"f32": tensor.float() * 2, "i64": tensor.long(), "nan": torch.tensor([float("nan"), 1.0])}
