"""``soma demo``: the fork/join pipeline on a local worker, started and stopped by the demo."""

from __future__ import annotations

import io
import json
import re

from soma.cli import run_demo


def test_demo_runs_on_a_local_worker_and_stops_it() -> None:
    out = io.StringIO()
    assert run_demo(out) == 0
    text = out.getvalue()
    address = re.search(r"at (ws://127\.0\.0\.1:\d+):", text)
    assert address is not None
    worker = address.group(1)
    assert f"Remote(scaler, target={worker}):" in text
    assert f"RemoteDispatched scaler, ridge, nearest_neighbours, average -> {worker}" in text
    assert f"NodeStarted    ridge [Trainable, {worker}]" in text
    assert "NodeStarted    ridge [Trainable, local]" in text.split("starting a local worker")[0]
    assert "same as in process   True" in text.split("Results")[1]
    refit = text.split("fit again with the same data")[1]
    assert "0 executed, 4 from cache" in refit and refit.count("NodeCacheHit") == 7
    info = json.loads(text.split("worker /info:\n")[1].split("\nworker stopped")[0])
    assert info["type"] == "Register" and info["max_concurrent"] == 2
    assert text.endswith("worker stopped\n")
