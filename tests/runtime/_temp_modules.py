"""Throw-away user modules for fingerprint and identity tests: names and the fixture's type."""

from __future__ import annotations

import types
import uuid
from collections.abc import Callable

MakeModule = Callable[[str, str], types.ModuleType]
"""``make_module(name, source)``: write ``<name>.py`` on sys.path and import (or reload) it."""


def unique(prefix: str) -> str:
    """A module name no other test uses, so imports never hit a stale module."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"
