"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from _temp_modules import MakeModule


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeModule]:
    """Write ``<name>.py`` into a temp dir on sys.path and import it (reload if imported)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    imported: list[str] = []
    bumps = iter(range(1, 1000))

    def make(name: str, source: str) -> types.ModuleType:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        # A rewrite within one clock tick must still look changed to linecache.
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + next(bumps) * 10**9))
        importlib.invalidate_caches()
        if name in sys.modules:
            return importlib.reload(sys.modules[name])
        imported.append(name)
        return importlib.import_module(name)

    yield make
    for name in imported:
        sys.modules.pop(name, None)
