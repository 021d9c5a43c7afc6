"""Search descriptors: tunable parameters declared as class attributes of a filter.

    class Model(Filter):
        lr = search(1e-3, 1e-1, scale="log", default=1e-2)
        depth = search.int(2, 8)
        act = search.categorical(["relu", "tanh"])

Each descriptor describes one dimension of the filter's search space (its
``to_dict()``), and behaves as a parameter on instances: ``Filter.__init__`` stores
the default in the instance ``__dict__``, so it is part of ``get_params()``. The
search space never affects execution; ``Graph.search_space()`` and ``Study`` read it.

Importing this module binds ``soma.search`` to the module; ``soma/__init__.py`` then
rebinds it to the function :func:`search`. Pickles refer to ``soma.search.search``
and ``soma.search.SearchDescriptor``, so both names stay here. Stdlib only.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

from soma.errors import SomaConfigError

__all__ = ["SearchDescriptor", "search"]

_TYPES = ("int", "float", "categorical")
_SCALES = ("linear", "log", "reverse_log")
_LOG_SCALES = ("log", "reverse_log")


class SearchDescriptor:
    """One dimension of a filter's search space, used as a class attribute.

    Class access returns the descriptor; an instance read returns the instance's
    value (``obj.__dict__[name]``) or, when absent, the default; assignment writes
    the instance ``__dict__``. Arguments are validated here, so a bad declaration
    raises ``SomaConfigError`` while the class body runs.
    """

    def __init__(
        self,
        low: Any = None,
        high: Any = None,
        scale: str = "linear",
        choices: Any = None,
        default: Any = None,
        *,
        type: str | None = None,
        step: Any = None,
    ) -> None:
        kind = _resolve_type(low, high, choices, type)
        if scale not in _SCALES:
            raise SomaConfigError(
                f"search(): scale must be 'linear', 'log' or 'reverse_log', got {scale!r}"
            )
        self.name: str | None = None
        self.kind = kind
        self.scale = scale
        self.low: int | float | None = None
        self.high: int | float | None = None
        self.step = 1
        self.choices: list[Any] | None = None
        if kind == "categorical":
            if low is not None:
                raise SomaConfigError("search(): a categorical dimension takes choices, not low/high")
            if step is not None:
                raise SomaConfigError("search(): step applies only to int dimensions")
            self.choices = _check_choices([True, False] if choices is None else choices)
            self.default = _check_choice_default(default, self.choices)
        else:
            if choices is not None:
                raise SomaConfigError("search(): choices apply only to categorical dimensions")
            if low is None:
                raise SomaConfigError(f"search(): type={kind!r} needs low and high")
            self.low, self.high = _check_bounds(kind, low, high, scale)
            if kind == "int":
                self.step = _check_step(step)
            elif step is not None:
                raise SomaConfigError("search(): step applies only to int dimensions")
            self.default = _check_numeric_default(kind, default, self.low, self.high)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        values = getattr(obj, "__dict__", {})
        if self.name is not None and self.name in values:
            return values[self.name]
        return self.default

    def __set__(self, obj: object, value: Any) -> None:
        if self.name is None:
            raise AttributeError("this search descriptor has no name; declare it in a class body")
        obj.__dict__[self.name] = value

    def to_dict(self) -> dict[str, Any]:
        """Return this dimension as a plain dict (the format ``Study`` and ``Graph.search_space`` use).

        float: ``{"type", "name", "low", "high", "scale"}``; int: the same plus ``"step"``
        when it is not 1; categorical: ``{"type", "name", "choices"}``. Every kind gets
        ``"default"`` when one was given.
        """
        dim: dict[str, Any] = {"type": self.kind, "name": self.name}
        if self.kind == "categorical":
            dim["choices"] = list(self.choices or ())
        else:
            dim.update(low=self.low, high=self.high, scale=self.scale)
            if self.kind == "int" and self.step != 1:
                dim["step"] = self.step
        if self.default is not None:
            dim["default"] = self.default
        return dim

    def __repr__(self) -> str:
        return f"SearchDescriptor({self.to_dict()!r})"


def _search_int(
    low: int, high: int, *, log: bool = False, step: int = 1, default: int | None = None
) -> SearchDescriptor:
    """An int dimension over ``[low, high]``, on a log scale when ``log``."""
    return SearchDescriptor(
        low, high, "log" if log else "linear", default=default, type="int", step=step
    )


def _search_float(
    low: float, high: float, *, log: bool = False, default: float | None = None
) -> SearchDescriptor:
    """A float dimension over ``[low, high]``, on a log scale when ``log``."""
    return SearchDescriptor(low, high, "log" if log else "linear", default=default, type="float")


def _search_categorical(choices: Any, *, default: Any = None) -> SearchDescriptor:
    """A categorical dimension over ``choices`` (None, bool, int, float or str values)."""
    return SearchDescriptor(choices=choices, default=default, type="categorical")


def _search_bool(*, default: bool | None = None) -> SearchDescriptor:
    """The categorical dimension ``[True, False]``."""
    return SearchDescriptor(choices=[True, False], default=default, type="categorical")


if TYPE_CHECKING:
    import builtins
    from typing import Protocol

    class _Search(Protocol):
        """What type checkers see as ``search``: the function together with its typed helpers."""

        def __call__(
            self,
            low: Any = None,
            high: Any = None,
            scale: str = "linear",
            choices: Any = None,
            default: Any = None,
            *,
            type: str | None = None,
            step: Any = None,
        ) -> SearchDescriptor: ...

        # Inside this class body ``int``, ``float`` and ``bool`` name the helpers, hence builtins.*.
        def int(
            self,
            low: builtins.int,
            high: builtins.int,
            *,
            log: builtins.bool = False,
            step: builtins.int = 1,
            default: builtins.int | None = None,
        ) -> SearchDescriptor: ...

        def float(
            self,
            low: builtins.float,
            high: builtins.float,
            *,
            log: builtins.bool = False,
            default: builtins.float | None = None,
        ) -> SearchDescriptor: ...

        def categorical(self, choices: Any, *, default: Any = None) -> SearchDescriptor: ...

        def bool(self, *, default: builtins.bool | None = None) -> SearchDescriptor: ...

    search: _Search
else:
    # A plain module-level function, so pickles find it as ``soma.search.search``.
    def search(
        low: Any = None,
        high: Any = None,
        scale: str = "linear",
        choices: Any = None,
        default: Any = None,
        *,
        type: str | None = None,
        step: Any = None,
    ) -> SearchDescriptor:
        """Declare a tunable parameter: ``lr = search(1e-3, 1e-1, scale="log", default=1e-2)``.

        Without ``type``: ``choices`` makes a categorical dimension; int ``low`` and
        ``high`` an int one; other bounds a float one; no arguments the categorical
        ``[True, False]``. Returns a ``SearchDescriptor``; raises ``SomaConfigError``
        for an inconsistent declaration. Typed helpers: ``search.int(low, high, *,
        log=False, step=1, default=None)``, ``search.float(low, high, *, log=False,
        default=None)``, ``search.categorical(choices, *, default=None)``,
        ``search.bool(*, default=None)``.
        """
        return SearchDescriptor(low, high, scale, choices, default, type=type, step=step)

    search.int = _search_int
    search.float = _search_float
    search.categorical = _search_categorical
    search.bool = _search_bool


def _resolve_type(low: Any, high: Any, choices: Any, forced: str | None) -> str:
    if forced is not None and forced not in _TYPES:
        raise SomaConfigError(
            f"search(): type must be 'int', 'float' or 'categorical', got {forced!r}"
        )
    if (low is None) != (high is None):
        given = "low" if high is None else "high"
        raise SomaConfigError(f"search(): give both low and high, got only {given}")
    if forced is not None:
        return forced
    if choices is not None or low is None:
        return "categorical"
    if _is_int(low) and _is_int(high):
        return "int"
    return "float"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_bounds(kind: str, low: Any, high: Any, scale: str) -> tuple[int | float, int | float]:
    if kind == "int":
        if not (_is_int(low) and _is_int(high)):
            raise SomaConfigError(
                f"search(): an int dimension needs int low and high, got {low!r} and {high!r}"
            )
        lo: int | float = int(low)
        hi: int | float = int(high)
    else:
        if not (isinstance(low, numbers.Real) and isinstance(high, numbers.Real)):
            raise SomaConfigError(
                f"search(): low and high must be numbers, got {low!r} and {high!r}"
            )
        lo, hi = float(low), float(high)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise SomaConfigError(f"search(): low and high must be finite, got {lo!r} and {hi!r}")
    if lo > hi:
        raise SomaConfigError(f"search(): low ({lo!r}) is greater than high ({hi!r})")
    if scale in _LOG_SCALES and lo <= 0:
        raise SomaConfigError(f"search(): a {scale} scale needs low > 0, got low={lo!r}")
    return lo, hi


def _check_step(step: Any) -> int:
    if step is None:
        return 1
    if not _is_int(step) or step < 1:
        raise SomaConfigError(f"search(): step of an int dimension must be an int >= 1, got {step!r}")
    return int(step)


def _check_numeric_default(kind: str, default: Any, low: int | float, high: int | float) -> Any:
    if default is None:
        return None
    if kind == "int":
        if not _is_int(default):
            raise SomaConfigError(
                f"search(): the default of an int dimension must be an int, got {default!r}"
            )
        value: int | float = int(default)
    else:
        if isinstance(default, bool) or not isinstance(default, numbers.Real):
            raise SomaConfigError(
                f"search(): the default of a float dimension must be a number, got {default!r}"
            )
        value = float(default)
    if not low <= value <= high:
        raise SomaConfigError(f"search(): default {value!r} is outside [{low!r}, {high!r}]")
    return value


def _check_choices(choices: Any) -> list[Any]:
    if not isinstance(choices, (list, tuple)):
        raise SomaConfigError(f"search(): choices must be a list or tuple, got {choices!r}")
    if not choices:
        raise SomaConfigError("search(): choices must not be empty")
    for choice in choices:
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise SomaConfigError(
                f"search(): choice {choice!r} is not None, a bool, an int, a float or a str"
            )
    return list(choices)


def _check_choice_default(default: Any, choices: list[Any]) -> Any:
    if default is None:
        return None
    # True == 1 in Python, but a bool default must not match an int choice (or vice versa).
    if not any(
        isinstance(choice, bool) == isinstance(default, bool) and choice == default
        for choice in choices
    ):
        raise SomaConfigError(f"search(): default {default!r} is not one of the choices {choices!r}")
    return default
