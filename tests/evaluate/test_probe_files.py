"""`care probe` keeps every result (a quick re-probe never overwrites the real one), says which
file it wrote, shows its progress, and refuses data of fewer than two classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from care.cli import main
from care.config import load_config, with_overrides
from care.evaluate.probe import probe_file_name
from tests.conftest import fails_with_one_line, tiny
from tests.data.writers import write_png


@pytest.fixture(scope="module")
def trained(fake_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe-files") / "run"
    assert main(["pretrain", *tiny(fake_fmnist, out, "knn_every=0")]) == 0
    return out


def test_the_runs_own_settings_write_probe_json_and_others_a_file_named_by_them(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    assert main(["probe", str(run)]) == 0  # the run's own probe settings (2 epochs, 2 seeds)
    assert capsys.readouterr().out.strip().endswith(f"wrote {run / 'probe.json'}")
    real = json.loads((run / "probe.json").read_text())
    assert len(real["linear"]["per_seed"]) == 2 and real["linear"]["epochs"] == 2

    assert main(["probe", str(run), "probe_epochs=1", "probe_seeds=1"]) == 0
    quick = run / "probe-epochs=1-seeds=1.json"
    assert capsys.readouterr().out.strip().endswith(f"wrote {quick}")
    assert json.loads(quick.read_text())["linear"]["epochs"] == 1
    assert json.loads((run / "probe.json").read_text()) == real  # the real one is kept

    # settings that change nothing learned by the probe (where it runs) keep probe.json
    assert main(["probe", str(run), "num_workers=0", "accelerator=cpu"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {run / 'probe.json'}")


def test_file_names_list_exactly_the_settings_that_differ(fake_fmnist: Path) -> None:
    saved = load_config(None, tiny(fake_fmnist, Path("r")))
    assert probe_file_name(saved, saved) == "probe.json"
    same_root = with_overrides(saved, {"data_root": str(fake_fmnist.absolute())})
    assert probe_file_name(saved, same_root) == "probe.json"
    other = with_overrides(
        saved, {"probe_milestones": [30, 40], "knn_k": 5, "probe_optimizer": "sgd"}
    )
    assert probe_file_name(saved, other) == "probe-knn_k=5-optimizer=sgd-milestones=30_40.json"
    assert probe_file_name(saved, saved, "32", "bf16-mixed") == "probe-precision=32.json"
    assert probe_file_name(saved, saved, "32", "32") == "probe.json"


def test_the_probe_shows_progress_in_a_pipe(
    trained: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a file or a pipe a plain line at every refresh (CARE_PROGRESS_S=0 here, 30 s by
    default): the features' images/s and the probe's epochs, each with an ETA."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    monkeypatch.setenv("CARE_PROGRESS_S", "0")
    assert main(["probe", str(run)]) == 0
    err = capsys.readouterr().err.splitlines()
    features = [line for line in err if line.startswith("probe run: train features")]
    assert features and "images/s" in features[-1] and "ETA" in features[-1]
    assert features[-1].startswith("probe run: train features (100%")
    epochs = [line for line in err if line.startswith("probe run: linear probe (2 seeds)")]
    assert any("epoch 2/2 done (100%" in line and "epochs/s" in line for line in epochs), epochs
    assert "\r" not in "".join(err)


def test_a_dataset_of_one_class_is_not_probed(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "one-class"
    for split in ("train", "val"):
        for i in range(4):
            write_png(folder / split / "only" / f"{i}.png", np.full((8, 8), 40 * i, np.uint8))
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(
        config.replace("dataset: fashion-mnist", "dataset: imagefolder")
    )
    fails_with_one_line(
        capsys, ["probe", str(run), f"data_root={folder}"], "needs labelled images of at least 2"
    )
