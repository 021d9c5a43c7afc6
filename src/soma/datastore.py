"""The data-store setting shared by ``Graph.set_data_store`` and ``Worker.set_data_store``.

Stdlib only; one validation so that both refuse the same input with the same words.
"""

from __future__ import annotations

import os
from pathlib import Path

from soma.errors import SomaConfigError

__all__ = ["check_store_type"]


def check_store_type(store_type: str, path: str | os.PathLike[str] | None) -> Path:
    """Return the directory of a ``"local"`` store; raise ``SomaConfigError`` for anything else.

    ``"s3"`` is a known type this build cannot serve; other types are unknown.
    """
    if store_type == "s3":
        raise SomaConfigError("store type 's3' is not supported by this build")
    if store_type != "local":
        raise SomaConfigError(f"unknown store type: '{store_type}'. Available: local")
    if not path:
        raise SomaConfigError("local store requires 'path'")
    return Path(path)
