"""Values sent with a Remote block: inline below the worker's threshold, uploaded at or above it (§4.5)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _fake_worker import FakeWorker
from _remote_filters import Keys

from soma import Graph
from soma.client.remote import measured
from soma.client.sync_client import close_all
from soma.wire import v2


@pytest.fixture
def fake() -> Iterator[FakeWorker]:
    worker = FakeWorker(inline_threshold=1024).start()
    yield worker
    close_all()
    worker.stop()


@pytest.mark.parametrize(
    "value",
    [
        None,
        3,
        "é" * 40,
        [1.5] * 5000,
        {"a": list(range(300)), 2: (1, "x")},
        np.arange(10.0),
        {"x": np.zeros(3), "y": [1]},
    ],
)
def test_measured_size_is_the_encoded_size_and_the_frame_decodes(value: Any) -> None:
    size, parts = measured(value)
    assert size == v2.encoded_size(value)
    back = v2.decode_value_frame(b"".join(parts), "client")
    assert repr(back) == repr(value)


@pytest.mark.parametrize(("length", "uploaded"), [(1020, False), (1021, True)])
def test_one_byte_under_the_threshold_is_inline_and_at_it_uploaded(
    fake: FakeWorker, length: int, uploaded: bool
) -> None:
    x = b"\x01" * length  # bin 16: a 3-byte header, so 1021 bytes encode to exactly 1024
    assert v2.encoded_size(x) == length + 3
    graph = Graph()
    graph.add_worker(fake.address)
    graph.node("a", Keys())
    assert graph.run(x) == {"a": x}  # the scripted worker answers with the plan's input
    assert bool(fake.store) is uploaded
    plan = fake.seen[-1].plan
    assert (type(plan.input).__name__ == "CachedRef") is uploaded
