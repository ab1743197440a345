"""The README's Python snippets run as written (each in a fresh interpreter)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import psutil
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 6


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs(code: str, tmp_path: pathlib.Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    before = {p.pid for p in psutil.Process().children()}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    # This process is a subreaper (conftest), so whatever the snippet's own
    # children left to die after it exited comes back here, as it would go to
    # init: reap what died, and fail on anything still running.
    orphans = [p for p in psutil.Process().children() if p.pid not in before]
    _, alive = psutil.wait_procs(orphans, timeout=10)
    assert not alive, f"README snippet left processes running: {alive}"
    assert done.returncode == 0, f"README snippet failed:\n{code}\n--- stderr:\n{done.stderr}"
