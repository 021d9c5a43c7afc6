"""Row slicing, the ``partial_fit`` batch loop, stream concatenation and output summaries.

Local and remote execution must give identical results, so the child daemon imports
this module too: it uses the standard library only, and recognises numpy, torch and
pandas values by ``type(value).__module__`` without importing them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from soma.errors import RowMismatchError

__all__ = [
    "BatchCallback",
    "concat_chunks",
    "has_partial_fit",
    "is_row_sliceable",
    "n_rows",
    "output_summary",
    "partial_fit_loop",
    "slice_rows",
    "split_chunks",
]

BatchCallback = Callable[[int, int, int, int], None]
"""``on_batch(batch, n_batches, rows, total_rows)``, called after each batch (1-based)."""


def _top_module(value: object) -> str:
    return type(value).__module__.partition(".")[0]


def _is_ndarray(value: object) -> bool:
    return _top_module(value) == "numpy" and type(value).__name__ == "ndarray"


def _is_tensor(value: object) -> bool:
    return _top_module(value) == "torch" and type(value).__name__ in {"Tensor", "Parameter"}


def _is_pandas(value: object) -> bool:
    return _top_module(value) == "pandas" and hasattr(value, "iloc")


def is_row_sliceable(value: object) -> bool:
    """Whether ``value`` has rows that can be sliced: list, tuple, ndarray (not 0-d), tensor, pandas."""
    if isinstance(value, (list, tuple)):
        return True
    if _is_ndarray(value) or _is_tensor(value):
        return getattr(value, "ndim", 0) >= 1
    return _is_pandas(value)


def n_rows(value: Any) -> int:
    """Number of rows (first-axis length) of a row-sliceable value."""
    return len(value)


def slice_rows(value: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of ``value``, keeping its type (array views, tensor and list slices)."""
    if _is_pandas(value):
        return value.iloc[start:stop]
    return value[start:stop]


def has_partial_fit(filter_obj: object) -> bool:
    """Whether a filter defines a callable ``partial_fit``."""
    return callable(getattr(filter_obj, "partial_fit", None))


def partial_fit_loop(
    filter_obj: Any,
    x: Any,
    y: Any,
    batch_size: int,
    on_batch: BatchCallback | None = None,
) -> Any:
    """Thread a state through ``partial_fit`` over consecutive row slices and return it.

    ``state`` starts as ``None``; slice ``i`` covers rows ``[i*b, min((i+1)*b, n))``,
    in order, without shuffling; ``y`` is sliced with the same rows, or ``None``.
    Raises ``RowMismatchError`` before any call when y has another row count.
    Exceptions from ``partial_fit`` propagate unchanged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = n_rows(x)
    if y is not None:
        y_total = n_rows(y) if is_row_sliceable(y) else None
        if y_total != total:
            raise RowMismatchError(total, y_total if y_total is not None else 1)
    n_batches = max(1, -(-total // batch_size))
    state = None
    for i in range(n_batches):
        start, stop = i * batch_size, min((i + 1) * batch_size, total)
        x_b = slice_rows(x, start, stop)
        y_b = slice_rows(y, start, stop) if y is not None else None
        state = filter_obj.partial_fit(x_b, y_b, state)
        if on_batch is not None:
            on_batch(i + 1, n_batches, stop - start, total)
    return state


def split_chunks(value: Any, chunk_size: int) -> list[Any]:
    """Split ``value`` along its first axis into chunks of ``chunk_size`` rows.

    Values that are not row-sliceable form a single chunk; an empty sequence gives one
    empty chunk, so a stream always has at least one chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not is_row_sliceable(value):
        return [value]
    total = n_rows(value)
    if total == 0:
        return [value]
    return [slice_rows(value, start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]


def concat_chunks(items: list[Any]) -> Any:
    """Join per-chunk outputs: the api.md §5.6 rule.

    All ndarrays -> ``numpy.concatenate``; all tensors -> ``torch.cat``; all lists or
    tuples -> one list; all pandas -> ``pandas.concat``; a single item -> itself;
    otherwise the list of items.
    """
    if len(items) == 1:
        return items[0]
    if not items:
        return []
    if all(_is_ndarray(v) for v in items):
        return sys.modules["numpy"].concatenate(items)
    if all(_is_tensor(v) for v in items):
        return sys.modules["torch"].cat(items, dim=0)
    if all(isinstance(v, (list, tuple)) for v in items):
        return [row for v in items for row in v]
    if all(_is_pandas(v) for v in items):
        import pandas

        return pandas.concat(items)
    return list(items)


def output_summary(value: Any) -> str:
    """A short description of a value for ``NodeCompleted.output_summary``.

    ``ndarray(shape=(2, 3), dtype=float64)``, ``Tensor(shape=(2, 3), dtype=torch.float32,
    device=cpu)``, ``list(len=3)``, ``tuple(len=2)``, ``dict(len=2)``, ``None``, a
    scalar's ``repr`` cut to 60 characters, otherwise ``<TypeName>``.
    """
    if value is None:
        return "None"
    if _is_ndarray(value):
        return f"ndarray(shape={tuple(value.shape)}, dtype={value.dtype})"
    if _is_tensor(value):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device})"
    if isinstance(value, (list, tuple, dict)):
        return f"{type(value).__name__}(len={len(value)})"
    if isinstance(value, (bool, int, float, complex, str, bytes)) or (
        _top_module(value) == "numpy" and hasattr(value, "dtype")
    ):
        return repr(value)[:60]
    return f"<{type(value).__name__}>"
