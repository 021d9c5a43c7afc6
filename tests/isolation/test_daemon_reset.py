"""The reset LOAD frees the last tenant's garbage, cycles and finalizers included (isolation.md §2.2)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from _harness import DaemonProcess, pickled

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Cyclic:
    """A filter in a reference cycle whose finalizer leaves a file behind: only a collection frees it."""

    _kind = "stateless"

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.me = self

    def forward(self, x: Any, state: Any) -> Any:
        return x

    def __del__(self) -> None:
        with open(self.marker, "w") as out:
            out.write("finalized")


@pytest.fixture
def child() -> Iterator[DaemonProcess]:
    process = DaemonProcess()
    yield process
    process.close()


def load(child: DaemonProcess, filters: list[dict[str, Any]]) -> None:
    child.ok("LOAD", filters=filters, runtime=None, seed=None)


def tenant(child: DaemonProcess, marker: Path) -> None:
    load(child, [{"id": "c", "pickle": pickled(Cyclic(str(marker))), "trainable": False}])
    assert child.ok("FORWARD", node_id="c", data=3)["result"] == 3


def test_each_reset_finalizes_the_tenants_cyclic_garbage_before_replying(
    child: DaemonProcess, tmp_path: Path
) -> None:
    for n in range(3):  # later tenants too: what earlier resets kept must not hide their garbage
        marker = tmp_path / f"tenant-{n}"
        tenant(child, marker)
        assert not marker.exists()
        load(child, [])
        assert marker.read_text() == "finalized"
        assert child.error("FORWARD", node_id="c", data=1)["code"] == "unknown_node"


def test_garbage_of_a_catalog_replaced_by_a_plan_load_is_freed_by_the_reset(
    child: DaemonProcess, tmp_path: Path
) -> None:
    marker = tmp_path / "first"
    tenant(child, marker)
    tenant(child, tmp_path / "second")
    assert child.ok("FORWARD", node_id="c", data=4)["result"] == 4
    load(child, [])
    assert marker.read_text() == "finalized"
    assert (tmp_path / "second").read_text() == "finalized"
