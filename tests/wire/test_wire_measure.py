"""``v2.measure_value_frame``: the §4.5 size and the value frame from one packing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from soma.wire import v2


@pytest.mark.parametrize(
    "value",
    [
        None,
        [1.0, 2.0, 3.0],
        {"a": np.arange(5), "b": ("x", 2**70)},
        [np.zeros((3, 3)), np.ones(2, dtype=np.int32)],
        b"raw" * 100,
    ],
)
def test_measure_matches_the_separate_size_and_frame(value: Any) -> None:
    size, parts = v2.measure_value_frame(value)
    assert size == v2.encoded_size(value)
    assert b"".join(parts) == v2.encode_value_frame(value)
    decoded = v2.decode_value_frame(b"".join(parts), "client")
    assert repr(decoded) == repr(value)


@pytest.mark.parametrize("with_array", [False, True])
def test_a_long_packed_value_is_a_part_of_its_own_not_a_copy_in_the_head(with_array: bool) -> None:
    floats = [float(i) / 7 for i in range(100_000)]
    value: Any = {"floats": floats, "array": np.arange(10.0)} if with_array else floats
    size, parts = v2.measure_value_frame(value)
    long_parts = [p for p in parts if isinstance(p, bytes) and len(p) > 800_000]
    assert len(long_parts) == 1 and len(parts[0]) < 256  # the head chunk holds no float
    assert b"".join(parts) == v2.encode_value_frame(value)
    back = v2.decode_value_frame(b"".join(parts), "client")
    assert (back["floats"] if with_array else back) == floats
    assert size == v2.encoded_size(value)
