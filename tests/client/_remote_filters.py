"""Filters of the remote-execution tests (shipped to workers by value)."""

from __future__ import annotations

import os
import time
from typing import Any

from soma import Filter, current_seed


class Source(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return [v * 10 for v in x]


class Offset(Filter):
    """Trainable: learns an offset; its state is plain data."""

    amount = 0.0

    def __init__(self, amount: float = 0.0) -> None:
        super().__init__(amount=amount)

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"offset": self.amount + sum(x) / len(x)}

    def forward(self, x: Any, state: Any) -> Any:
        return [v - state["offset"] for v in x]


class Plus(Filter):
    """Stateless: adds ``amount`` to an array."""

    _kind = "stateless"
    amount: float

    def __init__(self, amount: float = 0.0) -> None:
        super().__init__(amount=amount)

    def forward(self, x: Any, state: Any) -> Any:
        return x + self.amount


class Keys(Filter):
    """Stateless fan-in that reports what it received."""

    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        return {"keys": list(x), "x": x}


class Shift(Filter):
    """Trainable: adds 100 to its input; the next node's fit must see that."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"seen": list(x)}

    def forward(self, x: Any, state: Any) -> Any:
        return [v + 100 for v in x]


class SeenInFit(Filter):
    """Trainable whose state is exactly the input its fit received."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return list(x)

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Seed(Filter):
    def fit(self, x: Any, y: Any = None) -> Any:
        return {"seed": current_seed()}

    def forward(self, x: Any, state: Any) -> Any:
        return {"fit": state["seed"], "forward": current_seed()}


class Where(Filter):
    """Trainable reporting the process it runs in."""

    def fit(self, x: Any, y: Any = None) -> Any:
        return {"pid": os.getpid()}

    def forward(self, x: Any, state: Any) -> Any:
        return {"fit_pid": state["pid"], "forward_pid": os.getpid(), "x": x}


class Fails(Filter):
    def fit(self, x: Any, y: Any = None) -> Any:
        raise ValueError(f"cannot fit {x!r}")


class Sleeps(Filter):
    _kind = "stateless"
    seconds: float

    def __init__(self, seconds: float = 30.0) -> None:
        super().__init__(seconds=seconds)

    def forward(self, x: Any, state: Any) -> Any:
        time.sleep(self.seconds)
        return x


class Crashes(Filter):
    _kind = "stateless"

    def forward(self, x: Any, state: Any) -> Any:
        os._exit(3)


class Mean(Filter):
    def fit(self, x: Any, y: Any = None) -> Any:
        return {"mean": float(x.mean())}

    def forward(self, x: Any, state: Any) -> Any:
        return x - state["mean"]
