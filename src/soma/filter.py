"""``Filter``, the base class of user filters, and the rules every filter follows.

A filter has parameters (its public instance attributes), ``fit(x, y=None) -> state``
and ``forward(x, state) -> output``. The runtime never stores anything on a filter:
states live in the graph. ``Graph.node`` also accepts duck-typed objects, so the
helpers here (``check_filter``, ``read_meta``, ``params_of``, ``default_node_id``)
work on any object, not only ``Filter`` subclasses.

Stdlib only: worker children import this module to unpickle user filters, which a
Soma 0.2.43 client pickles by reference to ``soma.filter.Filter`` and
``soma.filter.FilterMeta``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from soma.chain import Chain, Fork
from soma.errors import SomaConfigError
from soma.search import SearchDescriptor

__all__ = [
    "Filter",
    "FilterMeta",
    "NodeMeta",
    "check_filter",
    "default_node_id",
    "params_of",
    "read_meta",
]

FilterMeta = type
"""The metaclass name 0.2.43 pickles refer to. Plain ``type``, so ``class F(Filter, SomeABC)``
never meets a metaclass conflict."""

_STREAM_MODES = {"fixed": "fixed", "fixed_state": "fixed", "evolving": "evolving", "barrier": "barrier"}
_RESOURCE_KEYS = ("cpus", "gpus", "memory")
_MEMORY_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:[kmgtp]i?b?|b)?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class NodeMeta:
    """A filter's metadata as read (and validated) when it becomes a node; later changes do not apply."""

    kind: str
    """``"trainable"`` or ``"stateless"``."""
    differentiable: bool
    cacheable: bool
    stream_mode: str
    """``"fixed"``, ``"evolving"`` or ``"barrier"`` (the alias ``"fixed_state"`` is resolved)."""
    target: str | None
    """As declared; the graph validates and interprets it."""
    requirements: tuple[str, ...]
    resources: dict[str, Any] | None
    version: Any


class Filter:
    """Base class for filters: ``Adder(amount=5)`` sets the parameter ``amount``.

    Override ``fit(x, y=None) -> state`` (trainable filters) and ``forward(x, state)``.
    Parameters are the instance attributes whose names do not start with ``_``; class
    attributes are never parameters. Metadata class attributes (``_kind``,
    ``_stream_mode``, ``_target``, ...) are described in ``NodeMeta``; an instance
    attribute overrides them. ``>>``, ``|`` and ``to`` build topologies (``soma.chain``).
    """

    _kind: str = "trainable"
    _differentiable: bool = False
    _cacheable: bool = True
    _stream_mode: str = "fixed"
    _target: str | None = None
    _requirements: Iterable[str] = ()
    _resources: dict[str, Any] | None = None
    _version: Any = None
    _soma_search_space: ClassVar[list[dict[str, Any]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, check in (("_kind", _check_kind), ("_stream_mode", _check_stream_mode)):
            value = getattr(cls, name)
            # A property (or other descriptor) is only resolved on instances, at node() time.
            if not hasattr(type(value), "__get__"):
                check(value)
        cls._soma_search_space = _collect_search_space(cls)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        # Search defaults become real parameters, so get_params() and cache keys see them.
        for dim in type(self)._soma_search_space:
            name = dim["name"]
            if name not in kwargs and name not in self.__dict__:
                self.__dict__[name] = dim.get("default")
        for name, value in kwargs.items():
            setattr(self, name, value)

    def fit(self, x: Any, y: Any = None) -> Any:
        """Learn a state from ``x`` (and labels ``y``); must not assign attributes on ``self``."""
        return {}

    def forward(self, x: Any, state: Any) -> Any:
        """Apply ``state`` (what ``fit`` returned; ``None`` for stateless filters) to ``x``."""
        return x

    def get_params(self) -> dict[str, Any]:
        """A copy of the parameters, in insertion order."""
        return params_of(self)

    def set_params(self, **params: Any) -> Self:
        """Set parameters and return ``self``; a name starting with ``_`` raises ``SomaConfigError``."""
        for name in params:
            if name.startswith("_"):
                raise SomaConfigError(
                    f"set_params(): {name!r} is not a parameter (names starting with '_' are internal)"
                )
        for name, value in params.items():
            setattr(self, name, value)
        return self

    @classmethod
    def search_space(cls) -> list[dict[str, Any]]:
        """A deep copy of this class's search dimensions (``SearchDescriptor.to_dict`` format)."""
        return copy.deepcopy(cls._soma_search_space)

    def __rshift__(self, other: Any) -> Chain:
        """``f >> g``: run g after this filter."""
        return Chain([self]).__rshift__(other)

    def __rrshift__(self, other: Any) -> Any:
        if isinstance(other, list):
            return Fork.from_list(other) >> self
        return NotImplemented

    def __or__(self, other: Any) -> Fork:
        """``f | g``: run this filter and g from the same inputs."""
        return Chain([self]).__or__(other)

    def __ror__(self, other: Any) -> Any:
        if isinstance(other, list):
            return Fork.from_list(other) | self
        return NotImplemented

    def to(self, other: Any) -> Chain:
        """Run ``other`` after this filter, keeping a chain as one nested step."""
        return Chain([self, other])

    def __repr__(self) -> str:
        params = ", ".join(f"{name}={value!r}" for name, value in self.get_params().items())
        return f"{type(self).__name__}({params})"


def check_filter(obj: Any) -> None:
    """Raise ``TypeError`` unless ``obj`` can be a node: a callable ``forward``, and a
    callable ``fit`` unless it is stateless."""
    if isinstance(obj, type):
        raise TypeError(
            f"node() expects a filter instance, got the class {obj.__name__}; "
            f"create one first, e.g. {obj.__name__}()"
        )
    kind = getattr(obj, "_kind", "trainable")
    stateless = isinstance(kind, str) and kind.lower() == "stateless"
    if not callable(getattr(obj, "forward", None)) or (
        not stateless and not callable(getattr(obj, "fit", None))
    ):
        raise TypeError(
            f"node() expects a filter with a forward(x, state) method, got {type(obj).__name__}"
        )


def read_meta(obj: Any) -> NodeMeta:
    """Read and validate a filter's metadata attributes (instance overrides class).

    Raises ``SomaConfigError`` naming the attribute for an invalid value.
    """
    return NodeMeta(
        kind=_check_kind(getattr(obj, "_kind", "trainable")),
        differentiable=_check_flag("_differentiable", getattr(obj, "_differentiable", False)),
        cacheable=_check_flag("_cacheable", getattr(obj, "_cacheable", True)),
        stream_mode=_check_stream_mode(getattr(obj, "_stream_mode", "fixed")),
        target=_check_target(getattr(obj, "_target", None)),
        requirements=_check_requirements(getattr(obj, "_requirements", ())),
        resources=_check_resources(getattr(obj, "_resources", None)),
        version=getattr(obj, "_version", None),
    )


def params_of(obj: Any) -> dict[str, Any]:
    """A copy of ``obj``'s public ``__dict__`` entries; ``{}`` when it has no ``__dict__``."""
    values = getattr(obj, "__dict__", None)
    if not isinstance(values, Mapping):
        return {}
    return {
        name: value
        for name, value in values.items()
        if isinstance(name, str) and not name.startswith("_")
    }


def default_node_id(class_name: str) -> str:
    """The automatic node id of a class: ``StandardScaler`` -> ``standard_scaler``, ``MLP`` -> ``m_l_p``."""
    return "".join(
        f"_{char}" if index and char.isupper() else char for index, char in enumerate(class_name)
    ).lower()


def _collect_search_space(cls: type) -> list[dict[str, Any]]:
    # Base classes first; a redeclared dimension keeps its inherited position (dict
    # assignment), a plain attribute of the same name pins the value and removes it.
    dims: dict[str, dict[str, Any]] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, SearchDescriptor):
                dims[name] = {**value.to_dict(), "name": name}
            elif name in dims:
                del dims[name]
    return list(dims.values())


def _check_kind(value: Any) -> str:
    if isinstance(value, str) and value.lower() in ("stateless", "trainable"):
        return value.lower()
    raise SomaConfigError(f"invalid _kind '{value}': use 'stateless' or 'trainable'")


def _check_stream_mode(value: Any) -> str:
    mode = _STREAM_MODES.get(value.lower()) if isinstance(value, str) else None
    if mode is None:
        raise SomaConfigError(
            f"invalid _stream_mode '{value}': use 'fixed', 'evolving' or 'barrier'"
        )
    return mode


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SomaConfigError(f"invalid {name} {value!r}: use True or False")
    return value


def _check_target(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise SomaConfigError(
            f"invalid _target {value!r}: use None or a string such as 'local', 'subprocess', "
            "'any', 'tag:<tag>' or 'worker:<id>'"
        )
    return value


def _check_requirements(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise SomaConfigError(
            f"invalid _requirements {value!r}: use a list of PEP 508 strings, e.g. ['numpy>=1.24']"
        )
    requirements = tuple(value)
    for requirement in requirements:
        if not isinstance(requirement, str) or not requirement.strip():
            raise SomaConfigError(
                f"invalid _requirements entry {requirement!r}: use a PEP 508 string such as 'numpy>=1.24'"
            )
    return requirements


def _check_resources(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise SomaConfigError(
            f"invalid _resources {value!r}: use None or a dict with 'cpus', 'gpus' and/or 'memory'"
        )
    for key in value:
        if key not in _RESOURCE_KEYS:
            raise SomaConfigError(
                f"invalid _resources key {key!r}: use 'cpus', 'gpus' or 'memory'"
            )
    if "cpus" in value and not _is_int_at_least(value["cpus"], 1):
        raise SomaConfigError(f"invalid _resources cpus {value['cpus']!r}: use an int >= 1")
    if "gpus" in value and not _is_int_at_least(value["gpus"], 0):
        raise SomaConfigError(f"invalid _resources gpus {value['gpus']!r}: use an int >= 0")
    if "memory" in value and not _is_memory_size(value["memory"]):
        raise SomaConfigError(
            f"invalid _resources memory {value['memory']!r}: use bytes as an int or a size such as '8G'"
        )
    return dict(value)


def _is_int_at_least(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_memory_size(value: Any) -> bool:
    if isinstance(value, str):
        match = _MEMORY_SIZE.fullmatch(value)
        return match is not None and float(match.group(1)) > 0
    return _is_int_at_least(value, 1)
