"""`care equivariance` on tiny runs: JSON, plots, compare mode, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from care.cli import main
from tests.conftest import tiny


@pytest.fixture(scope="module")
def two_runs(fake_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    for method in ("care", "simclr"):
        assert (
            main(["pretrain", *tiny(fake_fmnist, root / method, f"method={method}", "knn_every=0")])
            == 0
        )
    return root / "care", root / "simclr"


def test_compare_writes_json_and_plots(
    two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    care, simclr = two_runs
    assert (
        main(
            [
                "equivariance",
                str(care),
                "--against",
                str(simclr),
                "trials=3",
                "samples=48",
                "compositions=2",
            ]
        )
        == 0
    )
    payload = json.loads((care / "equivariance.json").read_text())
    assert payload["trials"] == 3 and len(payload["results"]) == 2
    for res in payload["results"]:
        assert len(res["trials"]) == 3 and len(res["composition"]) == 2
        for trial in res["trials"]:
            assert trial["wahba_o"] <= trial["wahba_so"] + 1e-9
            assert 0.0 <= trial["wahba_so_ratio"] <= 1.0 + 1e-9
        assert len(res["probe"]["r2_linear"]) == len(res["probe"]["names"])
    assert 0 <= payload["lower_in_trials"] <= 3
    assert (care / "equivariance_scatter.png").stat().st_size > 1000
    assert (care / "equivariance_by_kind.png").stat().st_size > 1000
    assert "W_SO" in capsys.readouterr().out


def test_backbone_layer_and_bad_settings(
    two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    care, _ = two_runs
    assert (
        main(
            [
                "equivariance",
                str(care),
                "trials=2",
                "samples=40",
                "layer=backbone",
                "compositions=1",
            ]
        )
        == 0
    )
    assert json.loads((care / "equivariance.json").read_text())["layer"] == "backbone"
    capsys.readouterr()
    assert main(["equivariance", str(care), "layer=middle"]) == 2
    assert "layer" in capsys.readouterr().err
    assert main(["equivariance", str(care), "trials=x"]) == 2
    assert "trials" in capsys.readouterr().err
