"""`care ablate` on tiny runs: three variants, ablation.{json,md,png}, resume, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from care.cli import main
from care.plots import ablation_bars
from tests.conftest import fails_with_one_line, tiny

VARIANTS = {"infonce": "simclr", "equi_unif": "equi_unif", "care": "care"}


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [*tiny(root, out, "probe_epochs=1", "probe_seeds=2", "knn_every=0"), *extra]


@pytest.fixture(scope="module")
def ablation(fake_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ablation") / "abl"
    assert main(["ablate", "--config", "configs/fashion-mnist.yaml", *_args(fake_fmnist, out)]) == 0
    return out


def test_three_variants_trained_probed_and_compared(ablation: Path) -> None:
    for name in VARIANTS:
        run = ablation / name
        for file in ("summary.json", "backbone.safetensors", "probe.json", "metrics.csv"):
            assert (run / file).is_file(), f"{run}/{file}"
    payload = json.loads((ablation / "ablation.json").read_text())
    assert list(payload["variants"]) == list(VARIANTS)
    assert payload["dataset"] == "fashion-mnist" and payload["epochs"] == 1
    assert "method" not in payload["config"] and "out" not in payload["config"]
    for name, method in VARIANTS.items():
        r = payload["variants"][name]
        expected_diff = {"method": method, **({"weight": 1.0} if name == "equi_unif" else {})}
        assert r["method"] == method and r["config_diff"] == expected_diff
        assert 0.0 <= r["knn"] <= 100.0
        assert 0.0 <= r["linear"]["mean"] <= 100.0 and r["linear"]["std"] >= 0.0
        assert len(r["linear"]["per_seed"]) == 2
        assert all(0.0 <= a <= 100.0 for a in r["linear"]["per_seed"])
        assert r["training"]["epochs"] == 1 and r["training"]["steps"] == 4
        assert "loss" in r["final_losses"] and "unif" in r["final_losses"]
    assert "equi" in payload["variants"]["care"]["final_losses"]
    assert "inv" not in payload["variants"]["equi_unif"]["final_losses"]
    table = (ablation / "ablation.md").read_text()
    assert table.count("\n| ") == 4  # header and three rows
    assert not list(ablation.rglob(".care.lock*"))  # every lock was released
    assert (ablation / "ablation.png").stat().st_size > 5000
    assert not list(ablation.rglob("*.tmp"))


def test_rerun_is_a_no_op(
    ablation: Path, fake_fmnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    watched = [ablation / n / f for n in VARIANTS for f in ("summary.json", "probe.json")]
    before = [p.stat().st_mtime_ns for p in watched]
    capsys.readouterr()
    assert main(["ablate", *_args(fake_fmnist, ablation), "--only", "care,infonce"]) == 0
    printed = capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert "[1/2] care (method=care): finished earlier" in printed
    assert "the probe is up to date" in printed and "training" not in printed
    assert "equi_unif: finished and probed earlier" in printed  # kept in the table
    assert f"wrote {ablation / 'ablation.json'}" in printed
    payload = json.loads((ablation / "ablation.json").read_text())
    assert list(payload["variants"]) == list(VARIANTS)


def test_unfinished_variant_resumes_and_stale_probe_is_redone(
    ablation: Path, fake_fmnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ablation / "infonce"
    (run / "summary.json").unlink()  # killed after the last checkpoint, before the summary
    capsys.readouterr()
    assert main(["ablate", *_args(fake_fmnist, ablation), "--only", "infonce"]) == 0
    printed = capsys.readouterr().out
    assert "[1/1] infonce (method=simclr): resuming from its last checkpoint" in printed
    assert "[1/1] infonce: probing" in printed  # new weights → probe.json is stale
    assert (run / "summary.json").is_file()


def test_changed_training_settings_are_refused(
    ablation: Path, fake_fmnist: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fails_with_one_line(
        capsys,
        ["ablate", *_args(fake_fmnist, ablation), "--only", "care", "lr=0.01"],
        "was trained with lr=0.001",
    )


def test_method_override_and_bad_only_are_refused(
    fake_fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "abl"
    fails_with_one_line(
        capsys, ["ablate", *_args(fake_fmnist, out), "method=care"], "sets method itself"
    )
    fails_with_one_line(
        capsys,
        ["ablate", "--only", "care,moco", *_args(fake_fmnist, out)],
        "unknown ablation variant 'moco'",
    )
    fails_with_one_line(capsys, ["ablate", "--only", ",", *_args(fake_fmnist, out)], "--only")
    fails_with_one_line(
        capsys,
        ["ablate", *_args(fake_fmnist, out), "batch_size=36"],
        "variant equi_unif (method=equi_unif): batch_size=36 does not split",
    )
    assert not out.exists()


def test_ablation_bars_writes_png(tmp_path: Path) -> None:
    results = [
        {"label": "InfoNCE", "mean": 85.1, "std": 0.3, "per_seed": [84.8, 85.1, 85.4], "knn": 82.0},
        {
            "label": r"$\mathcal{L}_{\mathrm{unif}} + \lambda\mathcal{L}_{\mathrm{equi}}$",
            "mean": 61.0,
            "std": 1.2,
            "per_seed": [60.0, 61.0, 62.0],
            "knn": None,
        },
        {"label": "CARE", "mean": 85.6, "std": 0.0, "per_seed": [85.6], "knn": 82.4},
    ]
    png = ablation_bars(results, "Loss ablation: test, 1 epochs, λ = 0.01")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ValueError, match="at least one"):
        ablation_bars([], "none")
