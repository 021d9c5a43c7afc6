"""The README's Example section runs as written and prints the plan it shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_matches_its_plan_text() -> None:
    section = README.read_text().split("## Example", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    done = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    shown = [
        line[2:]
        for line in code.group(1).splitlines()
        if line.startswith("#   ") or line == "# Sequence:"
    ]
    assert "\n".join(shown) in done.stdout
