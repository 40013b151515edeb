"""`care equivariance` says how far it is while it runs, and writes its JSON and plots as one
result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from care.cli import main
from tests.conftest import tiny


def test_progress_names_the_trials_with_rate_and_eta_in_a_pipe(
    fake_fmnist: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", *tiny(fake_fmnist, run, "knn_every=0")]) == 0
    monkeypatch.setenv("CARE_PROGRESS_S", "0")  # a line at every update (default: every 30 s)
    capsys.readouterr()
    assert main(["equivariance", str(run), "trials=3", "samples=32", "compositions=1"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("equivariance run")]
    stages = list(dict.fromkeys(line.split(": ", 1)[1].split(" (")[0] for line in lines))
    assert stages[0] == "clean images"
    assert [s for s in stages if s.startswith("trial")] == ["trial 1/3", "trial 2/3", "trial 3/3"]
    assert "composition 1/1" in stages and "parameter probe" in stages
    assert all("images/s" in line and "ETA" in line for line in lines[1:])  # after some work
    assert lines[-1].endswith("ETA 0:00)") and "(100%" in lines[-1]
    written = json.loads((run / "equivariance.json").read_text())
    assert written["trials"] == 3 and "plots" not in written
    assert f"wrote {run / 'equivariance.json'}" in captured.out
    assert (run / "equivariance_by_kind.png").read_bytes()[:4] == b"\x89PNG"
