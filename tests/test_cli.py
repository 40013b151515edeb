"""The `care` command: user errors are one line on stderr, exit status 2, no partial files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from care.cli import main
from tests.conftest import fails_with_one_line, tiny
from tests.data.writers import write_mnist
from tests.test_runs import PickleExploit


def _files(root: Path) -> list[str]:
    return (
        sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        if root.exists()
        else []
    )


def test_missing_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    fails_with_one_line(capsys, ["pretrain", *tiny(tmp_path / "nowhere", out)], "data_root")
    assert not out.exists()


def test_corrupt_dataset_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "fm"
    write_mnist(root, n_train=64, n_test=32, gz=True)
    images = root / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])
    out = tmp_path / "run"
    fails_with_one_line(capsys, ["pretrain", *tiny(root, out)], "train-images-idx3-ubyte.gz")
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["batch_size=30"], "batch_size=30 does not split into groups of group_size=8"),
        (["colour=red"], "unknown config key 'colour'"),
        (["epochs=many"], "epochs"),
    ],
)
def test_bad_config(
    capsys: pytest.CaptureFixture[str],
    fake_fmnist: Path,
    tmp_path: Path,
    extra: list[str],
    fragment: str,
) -> None:
    out = tmp_path / "run"
    fails_with_one_line(capsys, ["pretrain", *tiny(fake_fmnist, out), *extra], fragment)
    assert not out.exists()


def test_nan_loss_stops_with_one_line(
    capsys: pytest.CaptureFixture[str], fake_fmnist: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    fails_with_one_line(
        capsys,
        ["pretrain", *tiny(fake_fmnist, out), "temperature=1e-40"],
        "loss became nan at step 0 (epoch 0)",
    )
    assert not [f for f in _files(out) if f.endswith(".tmp") or f.startswith("checkpoints")]
    assert not (out / "backbone.safetensors").exists()


def test_malicious_checkpoint_is_refused_on_resume(
    capsys: pytest.CaptureFixture[str], fake_fmnist: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert main(["pretrain", *tiny(fake_fmnist, out)]) == 0
    capsys.readouterr()
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": PickleExploit(marker)}, out / "checkpoints" / "last.ckpt")
    fails_with_one_line(
        capsys,
        ["pretrain", *tiny(fake_fmnist, out), "resume=true", "epochs=2"],  # extend: load it
        "refusing to load",
    )
    assert not marker.exists()


def test_print_config_and_probe(
    capsys: pytest.CaptureFixture[str], fake_fmnist: Path, tmp_path: Path
) -> None:
    assert (
        main(
            [
                "pretrain",
                "--config",
                "configs/fashion-mnist.yaml",
                "--print-config",
                "method=simclr",
            ]
        )
        == 0
    )
    assert "method: simclr" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["pretrain", *tiny(fake_fmnist, out), "method=simclr"]) == 0
    assert main(["probe", str(out), "probe_epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert "simclr" in printed and f"wrote {out / 'probe-epochs=1.json'}" in printed
    fails_with_one_line(capsys, ["probe", str(out), "lr=1"], "cannot be changed")
    fails_with_one_line(capsys, ["probe", str(tmp_path / "none")], "not a run directory")


def test_piped_probe_prints_the_whole_table(fake_fmnist: Path, tmp_path: Path) -> None:
    """Through a pipe, rich keeps every column (no cut to 80 characters) and leaves no blank
    lines where its progress bars were."""
    out = tmp_path / "a-run-directory-with-a-rather-long-name-to-widen-the-table"
    assert main(["pretrain", *tiny(fake_fmnist, out), "method=simclr"]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "care.cli", "probe", str(out), "probe_epochs=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert all(line.strip() for line in lines), done.stdout
    header = next(line for line in lines if "method" in line)
    for column in ("run", "method", "dataset", "kNN", "kNN bank", "linear probe"):
        assert f" {column} " in header, header
    assert any(str(out) in line and "128 train images" in line for line in lines)
    assert len(max(lines, key=len)) > 80


def test_settings_go_before_or_after_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "lr=1e-3", "--print-config", "out=runs/x #2"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.001" in printed and "out: 'runs/x #2'" in printed
