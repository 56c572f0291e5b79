"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_an_example_per_runtime() -> None:
    for runtime in ("shells.asyncio", "shells.gevent", "shells.threaded"):
        assert any(runtime in code for code in EXAMPLES), runtime


@pytest.mark.parametrize("code", EXAMPLES, ids=lambda code: code.split("import")[2].split()[0])
def test_example_runs(code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"joined as 10\.99\.0\.\d+/24", done.stdout), done.stdout + done.stderr
