"""The benchmark scripts run end to end on tiny settings and report well-formed figures.

These check that the scripts work from a clean clone; the figures they print on tiny random data
mean nothing and no timing is asserted.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["widths=[4,4,8,8]", "head_hidden=16", "head_out=8", "group_size=8", "precision=32"]


def _script(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_throughput_times_every_method_and_the_backbone_alone(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    args = ["--synthetic", "3x16", "--json", str(out), "batch_size=16", "steps=2", "warmup=1"]
    printed = _script("throughput.py", *args, *TINY_MODEL)
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert set(results) == {
        "simclr",
        "care (separate views)",
        "care (shared views)",
        "moco",
        "care_moco (separate views)",
    }
    for r in results.values():
        phases = r["augment"] + r["forward"] + r["loss"] + r["backward"]
        assert abs(r["step"] - phases) < 1e-9 and r["step"] > 0
        assert r["images_per_s"] == 16 / r["step"] and r["backbone_only"] > 0
        assert r["faults"] >= 0
    assert results["care (separate views)"]["views"] == 4
    assert results["care (shared views)"]["views"] == 2
    assert printed.count("\n| ") == 6  # header and five methods
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert payload["tuned_malloc"] is glibc  # as the `care` command sets it


def test_bf16_effect_compares_loss_terms_and_gradients(tmp_path: Path, fake_fmnist: Path) -> None:
    out = tmp_path / "bf16.json"
    _script(
        "bf16_effect.py", "--json", str(out), f"data_root={fake_fmnist}", "batch_size=16",
        "batches=2", *TINY_MODEL,
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    for name, r in results.items():
        assert 0.0 < r["grad_rel_change"] < 2.0, name  # bf16 differs, but not arbitrarily
        assert -1.0 <= r["grad_cosine"] <= 1.0 and r["rel_change_loss"] >= 0.0
    assert "rel_change_equi" in results["care (shared views)"]
    assert "rel_change_equi" not in results["simclr"]


def test_quality_trains_probes_measures_and_reports(tmp_path: Path, fake_fmnist: Path) -> None:
    budget = tiny(fake_fmnist, tmp_path / "unused", "probe_epochs=1", "knn_every=0")
    budget = [b for b in budget if not b.startswith("out=")]
    out = tmp_path / "quality"
    _script(
        "quality.py", "--stage", "main", "--seeds", "1", "--variants", "simclr,care-shared",
        "--weight", "0.1", "--out", str(out), *budget,
    )  # fmt: skip
    (folder,) = out.iterdir()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "care-shared-lam0.1-s0",
        "simclr-s0",
    ]
    report = json.loads((folder / "quality.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"simclr", "care-shared"}
    care = rows["care-shared"]
    assert care["weight"] == 0.1 and rows["simclr"]["weight"] is None
    assert care["trials"] == 20 and 0 <= care["lower_ratio_trials"] <= 20
    for r in rows.values():
        assert 0.0 <= r["linear"] <= 100.0 and 0.0 <= r["knn"] <= 100.0
        assert r["wahba"] > 0.0 and r["wahba_ratio"] > 0.0
    table = (folder / "quality.md").read_text()
    assert "| simclr | 1 |" in table and "| care-shared λ=0.1 | 1 |" in table
    assert (folder / "quality.png").stat().st_size > 5000
