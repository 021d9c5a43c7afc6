"""Fixtures shared by the daemon tests: one real daemon child per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _harness import DaemonProcess


@pytest.fixture(scope="module")
def shared() -> Iterator[DaemonProcess]:
    child = DaemonProcess()
    yield child
    child.close()


@pytest.fixture
def daemon(shared: DaemonProcess) -> DaemonProcess:
    if shared.process.poll() is not None:
        pytest.fail(f"the shared daemon died: {shared.stderr_text()}")
    return shared
