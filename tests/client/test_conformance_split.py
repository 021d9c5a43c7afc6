"""Conformance suite (worker spec §9 item 20, api.md §11 item 54): mode `split`."""

from __future__ import annotations

from _conformance import ConformanceContract


class TestConformanceSplit(ConformanceContract):
    mode = "split"
