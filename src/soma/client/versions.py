"""What this client runs: the versions sent in ``Hello.client`` and in a plan's ``runtime``.

A worker compares them with its own to warn about, or refuse, a mismatched environment
(a plan pickled under another numpy or cloudpickle may not load there).
"""

from __future__ import annotations

import functools
import platform
import sys
from typing import Any

__all__ = ["runtime_versions"]


def runtime_versions() -> dict[str, Any]:
    """What this client runs (``Hello.client`` and a plan's ``runtime``): torch only if already imported."""
    torch = sys.modules.get("torch")
    return {**_fixed_versions(), "torch": getattr(torch, "__version__", None) if torch is not None else None}


@functools.cache
def _fixed_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import cloudpickle
    import numpy

    try:
        soma_version = version("soma-runtime")
    except PackageNotFoundError:  # pragma: no cover - only in an uninstalled source tree
        soma_version = "0+unknown"
    return {
        "python": platform.python_version(),
        "cloudpickle": cloudpickle.__version__,
        "soma": soma_version,
        "numpy": numpy.__version__,
    }
