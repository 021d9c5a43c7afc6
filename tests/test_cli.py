"""The ``soma`` console script (``soma --version``, ``soma demo``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import soma
from soma.cli import format_event, main


def test_demo_runs_a_real_pipeline_and_shows_cache_hits() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "soma.cli", "demo"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "graph LR" in out and "    scaler --> ridge" in out
    assert "NodeStarted    ridge [Trainable, local]" in out
    refit = out.split("fit again with the same data")[1]
    assert refit.count("NodeCacheHit") == 7  # three states and four outputs
    assert "0 executed, 4 from cache" in refit


def test_version_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "soma.cli", "--version"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == f"soma {soma.__version__}"
    assert main([]) == 2
    assert "usage: soma" in capsys.readouterr().out


def test_event_lines() -> None:
    line = format_event(
        {"event_type": "NodeFailed", "node_id": "a", "error": "Python fit() error: ValueError: x"}
    )
    assert line == "NodeFailed     a: Python fit() error: ValueError: x"
    assert format_event({"event_type": "TrainingStep", "node_id": None}) == "TrainingStep"
