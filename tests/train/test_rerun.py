"""`resume=true` on a finished run (what `make demo` passes) changes no file, says the run is
finished and what to run next, and exits 0; with more epochs it extends the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from care.cli import main
from tests.conftest import tiny


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_finished_run_is_left_as_it_is(
    fake_fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["pretrain", *tiny(fake_fmnist, out, "epochs=2"), "resume=true"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_per_s"] > 0 and summary["steps"] == 8
    before = _snapshot(out)
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{out} already finished its 2 epochs: nothing trained, no file changed" in printed
    assert "resume with epochs=3 or more" in printed and f"care probe {out}" in printed
    assert _snapshot(out) == before  # summary.json, weights, metrics: byte for byte and mtime

    assert main([*args, "epochs=3"]) == 0  # more epochs: the run goes on
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
