"""Conformance suite (worker spec §9 item 20, api.md §11 item 54): mode `local`."""

from __future__ import annotations

from _conformance import ConformanceContract


class TestConformanceLocal(ConformanceContract):
    mode = "local"
