"""The README's python code blocks run, in order, as one script (issue 19, item 7)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_python_blocks_run(tmp_path):
    script = "\n\n".join(python_blocks()) + "\nprint('README OK')\n"
    (tmp_path / "readme.py").write_text(script)
    done = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=580)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("README OK")
