"""Duck-typed numpy/torch recognition, torch imported lazily, and tensor <-> ``TorchData``.

Separate from the value walks and the training step because both need it and neither
may import torch or numpy at import time: the daemon must start where neither is
installed. Types are recognised by module name first, so asking "is this a tensor?"
never imports torch; ``import_torch`` is called only where a tensor must be made.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

from soma.isolation.child_errors import CommandError
from soma.isolation.markers import TorchData

__all__ = ["import_torch", "is_ndarray", "is_plain_tensor", "is_tensor", "tensor_from_marker", "tensor_to_marker"]


def import_torch() -> Any:
    """The torch module; ``CommandError("missing_dependency")`` when the child cannot import it."""
    try:
        import torch
    except ImportError as exc:
        raise CommandError(
            "missing_dependency",
            f"a tensor arrived but torch is not importable in the child ({sys.executable}): {exc}; "
            "install torch in the filter's environment",
        ) from exc
    return torch


def is_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch."""
    return type(value).__module__.partition(".")[0] == "torch" and isinstance(
        value, sys.modules["torch"].Tensor
    )


def is_ndarray(value: object) -> bool:
    """Whether ``value`` is exactly a numpy ndarray, without importing numpy."""
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


def tensor_from_marker(marker: TorchData) -> Any:
    """The tensor a ``TorchData`` describes; ``CommandError("bad_request")`` for a bad dtype or size."""
    torch = import_torch()
    dtype = getattr(torch, str(marker.dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise CommandError("bad_request", f"TorchData names an unknown torch dtype {marker.dtype!r}")
    shape = tuple(int(n) for n in marker.shape)
    numel = 1
    for n in shape:
        numel *= n
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    view = memoryview(marker.buffer)
    expected = numel * dtype.itemsize
    if view.nbytes != expected:
        raise CommandError(
            "bad_request", f"TorchData of shape {shape} and dtype {marker.dtype} needs {expected} bytes, got {view.nbytes}"
        )
    # torch.frombuffer shares the memory and warns on read-only buffers: copy those once.
    buffer = bytearray(view) if view.readonly else marker.buffer
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def tensor_to_marker(tensor: Any) -> TorchData:
    """A tensor's bytes, dtype name and shape (detached, on the CPU, contiguous)."""
    torch = sys.modules["torch"]
    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy()
    return TorchData(pickle.PickleBuffer(raw), str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


def is_plain_tensor(value: object) -> bool:
    """A dense, unquantised tensor: the kind ``TorchData`` can carry."""
    return bool(
        is_tensor(value)
        and value.layout == sys.modules["torch"].strided  # type: ignore[attr-defined]
        and not value.is_quantized  # type: ignore[attr-defined]
    )
