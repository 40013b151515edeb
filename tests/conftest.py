"""Shared fixtures: a tiny Fashion-MNIST in the real IDX format, and tiny run settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from care.cli import main
from tests.data.writers import write_mnist


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128 training and 64 test images of random noise, as .gz IDX files."""
    root = tmp_path_factory.mktemp("fashion-mnist")
    write_mnist(root, n_train=128, n_test=64, gz=True)
    return root


def tiny(root: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a run that takes a second or two on the CPU."""
    return [
        f"data_root={root}",
        f"out={out}",
        "widths=[4,4,8,8]",
        "head_hidden=16",
        "head_out=8",
        "batch_size=32",
        "group_size=8",
        "epochs=1",
        "knn_bank_samples=64",
        "knn_k=10",
        "precision=32",
        "accelerator=cpu",
        "log_every=1",
        "probe_epochs=2",
        "probe_seeds=2",
        *extra,
    ]


def fails_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str) -> None:
    """``care ARGV`` exits with status 2 and one line ``error: ...`` holding ``fragment``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, err
    assert "Traceback" not in err
    assert fragment in err, err
