"""Every Python block of README.md runs as written, in a fresh interpreter.

Blocks that read a finished run find one where the README's commands put it (`runs/demo-care`,
what `make demo` trains): a tiny run on tiny data, in the folder the blocks run from.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from care.cli import main
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def first_line(code: str) -> str:
    return next(line for line in code.splitlines() if line.strip() and not line.startswith("#"))


@pytest.fixture(scope="module")
def workdir(fake_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding `runs/demo-care`, a tiny finished run (as after `make demo`)."""
    folder = tmp_path_factory.mktemp("readme")
    run = folder / "runs" / "demo-care"
    assert main(["pretrain", *tiny(fake_fmnist, run, "method=care", "knn_every=0")]) == 0
    return folder


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("code", BLOCKS, ids=[first_line(b)[:40] for b in BLOCKS])
def test_a_readme_python_block_runs_as_written(code: str, workdir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
