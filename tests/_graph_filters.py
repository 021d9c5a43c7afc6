"""Small filters shared by the graph, executor and event tests.

Each filter records its calls in ``self._calls`` (an internal attribute, so not a
parameter and not part of any cache key). Importable by name from a child process
(``tests/`` is on ``sys.path``), which the cross-process cache tests rely on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from soma import Filter, current_seed

__all__ = [
    "AddOne",
    "Boom",
    "Collect",
    "Identity",
    "MeanCenter",
    "NoneMaker",
    "RowCounter",
    "Scale",
    "SeedProbe",
    "Sum",
    "calls_of",
]


class _Recording(Filter):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._calls: list[tuple[Any, ...]] = []


def calls_of(filter_obj: Any, method: str) -> list[tuple[Any, ...]]:
    """The recorded calls of one method of a recording filter."""
    return [c for c in filter_obj._calls if c[0] == method]


class Identity(_Recording):
    """Stateless; returns its input object unchanged."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        self._calls.append(("forward", x, state))
        return x


class AddOne(_Recording):
    """Stateless; ``x + 1``."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        self._calls.append(("forward", x, state))
        return x + 1


class Scale(_Recording):
    """Trainable; learns ``factor * mean(y or x)`` and multiplies its input by it."""

    factor: float

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__(factor=factor)

    def fit(self, x: Any, y: Any = None) -> dict[str, float]:
        self._calls.append(("fit", x, y))
        return {"m": self.factor * float(np.mean(y if y is not None else x))}

    def forward(self, x: Any, state: dict[str, float]) -> Any:
        self._calls.append(("forward", x, state))
        return np.asarray(x) * state["m"]


class MeanCenter(_Recording):
    """Trainable and row-wise: subtracts the mean learnt in ``fit``."""

    def fit(self, x: Any, y: Any = None) -> float:
        self._calls.append(("fit", x, y))
        return float(np.mean(x))

    def forward(self, x: Any, state: float) -> Any:
        self._calls.append(("forward", x, state))
        return np.asarray(x) - state


class Sum(_Recording):
    """Stateless fan-in: the sum of the values of its input dict."""

    _kind = "stateless"

    def forward(self, x: dict[str, Any], state: Any) -> Any:
        self._calls.append(("forward", x, state))
        return sum(x.values())


class Collect(_Recording):
    """Stateless; returns its input wrapped in a tuple (keeps fan-in dicts visible)."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        self._calls.append(("forward", x, state))
        return (x,)


class Boom(_Recording):
    """Raises ``ValueError("boom")`` from the chosen method."""

    method: str

    def __init__(self, method: str = "fit") -> None:
        super().__init__(method=method)

    def fit(self, x: Any, y: Any = None) -> Any:
        self._calls.append(("fit", x, y))
        if self.method == "fit":
            raise ValueError("boom")
        return {}

    def forward(self, x: Any, state: Any) -> Any:
        self._calls.append(("forward", x, state))
        if self.method == "forward":
            raise ValueError("boom")
        return x


class NoneMaker(_Recording):
    """Trainable; its state and its output are both ``None``."""

    def fit(self, x: Any, y: Any = None) -> None:
        self._calls.append(("fit", x, y))

    def forward(self, x: Any, state: Any) -> None:
        self._calls.append(("forward", x, state))


class RowCounter(_Recording):
    """Trainable with ``partial_fit``: the state counts rows and batches seen."""

    def fit(self, x: Any, y: Any = None) -> dict[str, int]:
        self._calls.append(("fit", x, y))
        return {"rows": len(x), "batches": 1}

    def partial_fit(self, x: Any, y: Any, state: dict[str, int] | None) -> dict[str, int]:
        self._calls.append(("partial_fit", x, y, state))
        state = state or {"rows": 0, "batches": 0}
        return {"rows": state["rows"] + len(x), "batches": state["batches"] + 1}

    def forward(self, x: Any, state: dict[str, int]) -> Any:
        self._calls.append(("forward", x, state))
        return state


class SeedProbe(_Recording):
    """Stateless; returns ``current_seed()`` as seen by user code."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        self._calls.append(("forward", x, state))
        return current_seed()
