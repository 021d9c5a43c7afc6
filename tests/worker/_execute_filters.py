"""Filters for the plan-executor tests; pickled by value so any child can load them."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any


class Scaler:
    """Trainable: learns the mean of a list; forward subtracts it."""

    def fit(self, x: Any, y: Any = None) -> dict[str, float]:
        return {"mean": sum(x) / len(x)}

    def forward(self, x: Any, state: Any) -> Any:
        return [v - state["mean"] for v in x]


class Doubler:
    """Stateless: doubles every number of a list."""

    def forward(self, x: Any, state: Any) -> Any:
        assert state is None
        return [2 * v for v in x]


class AddOne:
    """Stateless: adds one to every number of a list."""

    def forward(self, x: Any, state: Any) -> Any:
        return [v + 1 for v in x]


class FitRecorder:
    """Trainable: its state is exactly what fit received (x and y)."""

    def fit(self, x: Any, y: Any = None) -> dict[str, Any]:
        return {"x": x, "y": y}

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Echo:
    """Stateless identity."""

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Keys:
    """Stateless: the keys of a fan-in dict, in order, and its values."""

    def forward(self, x: Any, state: Any) -> Any:
        return {"keys": list(x), "values": list(x.values())}


class Tagged:
    """Stateless: returns its tag, so a plan can tell which class ran."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def forward(self, x: Any, state: Any) -> Any:
        return {"tag": self.tag, "state": state}


class TaggedTrainable(Tagged):
    """Trainable variant of ``Tagged``: its state names the class that fitted it."""

    def fit(self, x: Any, y: Any = None) -> dict[str, str]:
        return {"fitted_by": self.tag}


class Sleeper:
    """Stateless: sleeps, then returns its input."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def forward(self, x: Any, state: Any) -> Any:
        time.sleep(self.seconds)
        return x


class Spinner:
    """Trainable whose fit never ends."""

    def fit(self, x: Any, y: Any = None) -> Any:
        while True:
            pass

    def forward(self, x: Any, state: Any) -> Any:
        return x


class Failing:
    """Stateless: forward raises ValueError with a message full of quoting hazards."""

    message = "bad \"value\" \\ 'here'\nnext line ü"

    def forward(self, x: Any, state: Any) -> Any:
        raise ValueError(self.message)


class PartialCounter:
    """Trainable with partial_fit: counts batches and rows; forward returns the state."""

    def fit(self, x: Any, y: Any = None) -> dict[str, int]:
        return {"batches": -1, "rows": len(x)}

    def partial_fit(self, x: Any, y: Any, state: Any) -> dict[str, int]:
        state = state or {"batches": 0, "rows": 0}
        return {"batches": state["batches"] + 1, "rows": state["rows"] + len(x)}

    def forward(self, x: Any, state: Any) -> Any:
        return state


class Pid:
    """Stateless: the child's process id."""

    def forward(self, x: Any, state: Any) -> int:
        return os.getpid()


class Environment:
    """Stateless: selected environment variables and the CPU affinity of the child."""

    def forward(self, x: Any, state: Any) -> dict[str, Any]:
        return {
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        }


class NanCheck:
    """Stateless: which entries of a flat list are NaN."""

    def forward(self, x: Any, state: Any) -> list[bool]:
        return [isinstance(v, float) and math.isnan(v) for v in x]


class MakeNan:
    """Stateless: a list holding NaN."""

    def forward(self, x: Any, state: Any) -> list[float]:
        return [1.0, float("nan")]


class Crash:
    """Stateless: the child kills itself."""

    def forward(self, x: Any, state: Any) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)


class Hog:
    """Stateless: holds a large allocation for a while."""

    def __init__(self, megabytes: int) -> None:
        self.megabytes = megabytes

    def forward(self, x: Any, state: Any) -> Any:
        block = bytearray(self.megabytes << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(5)
        return len(block)


class Printer:
    """Stateless: prints lines to stdout and stderr."""

    def forward(self, x: Any, state: Any) -> Any:
        print("hello from forward", flush=True)
        print("warning line", file=sys.stderr, flush=True)
        time.sleep(0.3)
        return x


class Counter:
    """Trainable: its state counts fits; forward adds the count to x."""

    def fit(self, x: Any, y: Any = None) -> dict[str, int]:
        return {"count": 1}

    def forward(self, x: Any, state: Any) -> Any:
        return x + state["count"]


class Bytes:
    """Stateless: ``n`` bytes (sizes an output precisely)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def forward(self, x: Any, state: Any) -> bytes:
        return b"x" * self.n


class Shape:
    """Stateless: the type name, shape and dtype of an array input (or the value for others)."""

    def forward(self, x: Any, state: Any) -> Any:
        if hasattr(x, "shape"):
            return {"type": type(x).__name__, "shape": list(x.shape), "dtype": str(x.dtype), "sum": float(x.sum())}
        return {"type": type(x).__name__, "len": len(x) if hasattr(x, "__len__") else None}


class StatefulAdd:
    """Trainable: state {"add": k}; forward adds it (sessions set and read it)."""

    def fit(self, x: Any, y: Any = None) -> dict[str, int]:
        return {"add": 1}

    def forward(self, x: Any, state: Any) -> Any:
        return x + state["add"]


class TorchLinear:
    """Trainable torch filter with a parameter owner (``module``)."""

    def __init__(self) -> None:
        import torch

        torch.manual_seed(0)
        self.module = torch.nn.Linear(2, 1)

    def fit(self, x: Any, y: Any = None) -> dict[str, int]:
        return {"fitted": 1}

    def forward(self, x: Any, state: Any) -> Any:
        import torch

        with torch.no_grad():
            return self.module(torch.as_tensor(x, dtype=torch.float32)).numpy()


class Seed:
    """Stateless: the seed the filter sees through ``soma.current_seed()``."""

    def forward(self, x: Any, state: Any) -> Any:
        from soma.context import current_seed

        return current_seed()


class FailingTrainable:
    """Trainable whose fit and forward both raise: a cache hit must spare both."""

    def fit(self, x: Any, y: Any = None) -> Any:
        raise RuntimeError("fit must not run")

    def forward(self, x: Any, state: Any) -> Any:
        raise RuntimeError("forward must not run")


class TorchRegressor:
    """Differentiable torch filter: ``module`` (a 2 -> 1 linear layer) is its parameter owner."""

    def __init__(self) -> None:
        import torch

        torch.manual_seed(0)
        self.module = torch.nn.Linear(2, 1)

    def fit(self, x: Any, y: Any = None) -> dict[str, int]:
        return {"fitted": 1}

    def forward(self, x: Any, state: Any) -> Any:
        import torch

        return self.module(torch.as_tensor(x, dtype=torch.float32))


class BytesState:
    """Trainable: its state is ``n`` bytes (sizes a returned state precisely)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def fit(self, x: Any, y: Any = None) -> bytes:
        return b"s" * self.n

    def forward(self, x: Any, state: Any) -> Any:
        return len(state) if isinstance(state, bytes) else x


class Describe:
    """Stateless: a description of a fan-in dict or value, for comparing inline and referenced inputs."""

    def forward(self, x: Any, state: Any) -> Any:
        return repr(x)


class FitDescribe:
    """Trainable: fit records repr of x and y; forward reports repr of the state and x."""

    def fit(self, x: Any, y: Any = None) -> str:
        return repr((x, y))

    def forward(self, x: Any, state: Any) -> Any:
        return repr((state, x))


class Text:
    """Stateless: a string of ``n`` characters."""

    def __init__(self, n: int) -> None:
        self.n = n

    def forward(self, x: Any, state: Any) -> str:
        return "x" * self.n


class Holder:
    """A user object in a state: what v1 cannot express but must carry back unchanged."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ObjectState:
    """Trainable: its state holds a ``Holder``; forward reads it back."""

    def fit(self, x: Any, y: Any = None) -> dict[str, Any]:
        return {"holder": Holder(sum(x))}

    def forward(self, x: Any, state: Any) -> Any:
        return [v + state["holder"].value for v in x]


class LeastSquares:
    """Trainable: least-squares coefficients of y on the rows of x, and how many rows fit saw."""

    def fit(self, x: Any, y: Any = None) -> dict[str, Any]:
        import numpy

        coef, *_ = numpy.linalg.lstsq(x, y, rcond=None)
        return {"coef": coef, "rows": len(x), "fitted": True}

    def forward(self, x: Any, state: Any) -> Any:
        return x @ state["coef"]
