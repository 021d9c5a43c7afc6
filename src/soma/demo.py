"""The filters and data of ``soma demo``: a scaler feeding two regressors whose predictions are averaged.

``Scaler() >> (Ridge(alpha=1.0) | NearestNeighbours(k=3)) >> Average()``: a trainable
head, a fork into two different trainable models and a stateless fan-in join, on a
small synthetic regression problem. Only numpy is needed: worker children import this
module by name to unpickle the filters, so the graph machinery is imported lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from soma.filter import Filter

__all__ = ["Average", "NearestNeighbours", "Ridge", "Scaler", "build_graph", "make_data"]


class Scaler(Filter):
    """Standardises each column with the mean and deviation learnt in ``fit``."""

    def fit(self, x: Any, y: Any = None) -> dict[str, Any]:
        std = x.std(axis=0)
        return {"mean": x.mean(axis=0), "std": np.where(std > 0, std, 1.0)}

    def forward(self, x: Any, state: dict[str, Any]) -> Any:
        return (x - state["mean"]) / state["std"]


class Ridge(Filter):
    """Linear regression with an L2 penalty, solved in closed form."""

    alpha: float

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha=alpha)

    def fit(self, x: Any, y: Any = None) -> dict[str, Any]:
        design = np.hstack([x, np.ones((len(x), 1))])
        penalty = self.alpha * np.eye(design.shape[1])
        penalty[-1, -1] = 0.0  # the intercept is not penalised
        weights = np.linalg.solve(design.T @ design + penalty, design.T @ y)
        return {"weights": weights}

    def forward(self, x: Any, state: dict[str, Any]) -> Any:
        return np.hstack([x, np.ones((len(x), 1))]) @ state["weights"]


class NearestNeighbours(Filter):
    """Predicts the mean target of the ``k`` closest training rows."""

    k: int

    def __init__(self, k: int = 3) -> None:
        super().__init__(k=k)

    def fit(self, x: Any, y: Any = None) -> dict[str, Any]:
        return {"x": x, "y": y}

    def forward(self, x: Any, state: dict[str, Any]) -> Any:
        distances = ((x[:, None, :] - state["x"][None, :, :]) ** 2).sum(axis=2)
        nearest = np.argsort(distances, axis=1)[:, : self.k]
        return state["y"][nearest].mean(axis=1)


class Average(Filter):
    """Stateless join: the element-wise mean of its predecessors' predictions."""

    _kind = "stateless"

    def forward(self, x: dict[str, Any], state: Any) -> Any:
        return np.mean(list(x.values()), axis=0)


def make_data(rows: int = 40, seed: int = 0) -> tuple[Any, Any]:
    """A noisy linear regression problem with three features on different scales."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3)) * np.array([1.0, 10.0, 100.0])
    y = x @ np.array([2.0, -0.3, 0.05]) + rng.normal(scale=0.5, size=rows)
    return x, y


def build_graph(**graph_kwargs: Any) -> Any:
    """The demo pipeline as a ``soma.Graph``."""
    from soma.graph import Graph

    return Graph.somatize(Scaler() >> (Ridge(alpha=1.0) | NearestNeighbours(k=3)) >> Average(), **graph_kwargs)
