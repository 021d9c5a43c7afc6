"""The README's worker example runs as written, against a real embedded worker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _first_python_block(section_title: str) -> str:
    section = README.split(f"## {section_title}", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, section_title
    return code.group(1)


def test_readme_worker_example_gives_the_local_result_and_a_remote_plan() -> None:
    # The worker example reuses the filters and data of the Example section.
    program = _first_python_block("Example") + "\nlocal = g.forward(x)[:3]\n" + _first_python_block(
        "Running on workers"
    ).replace("print(g.forward(x)[:3])", "print(bool(np.allclose(g.forward(x)[:3], local)))")
    done = subprocess.run(
        [sys.executable, "-c", program], check=False, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    assert "True" in done.stdout.splitlines()
    assert re.search(r"^Remote\(scale, target=ws://127\.0\.0\.1:\d+\):$", done.stdout, re.MULTILINE), done.stdout
