"""Image folders without `image_size`/`load_size` take them from their images, say so, keep them in
config.yaml, and a resumed run keeps the sizes it was trained at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from care.cli import main
from care.config import Config, load_config
from care.data.loading import folder_image_sizes
from care.train.pretraining import with_image_sizes
from tests.conftest import tiny
from tests.data.writers import write_png


def write_folder(root: Path, height: int, width: int, per_class: int = 8) -> Path:
    """Two classes of random RGB PNGs of ``height`` × ``width`` in train/ and val/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for label in ("a", "b"):
            for i in range(count):
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                write_png(root / split / label / f"{i}.png", pixels)
    return root


def folder_config(root: Path, *overrides: str) -> Config:
    return load_config(None, ["dataset=imagefolder", f"data_root={root}", *overrides])


@pytest.mark.parametrize(
    ("height", "width", "load_size", "image_size"),
    [
        (20, 30, 20, 20),  # small images train at their own size, not blown up to 224
        (300, 260, 256, 224),  # ImageNet-sized images get ImageNet's 256/224
        (240, 400, 240, 224),  # the shorter side, capped at 224 for the crops only
    ],
)
def test_sizes_come_from_the_shorter_side_of_the_images(
    tmp_path: Path, height: int, width: int, load_size: int, image_size: int
) -> None:
    root = write_folder(tmp_path / "folder", height, width, per_class=2)
    sizes = folder_image_sizes(folder_config(root))
    assert (sizes.load_size, sizes.image_size) == (load_size, image_size)
    assert sizes.typical_side == min(height, width)
    assert f"load_size={load_size}" in sizes.describe()


def test_sizes_the_config_gives_are_kept(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "folder", 20, 20, per_class=2)
    sizes = folder_image_sizes(folder_config(root, "image_size=12"))
    assert (sizes.load_size, sizes.image_size) == (20, 12)
    sizes = folder_image_sizes(folder_config(root, "load_size=16"))
    assert (sizes.load_size, sizes.image_size, sizes.typical_side) == (16, 16, None)


def test_a_run_says_the_sizes_it_chose_and_keeps_them_when_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_folder(tmp_path / "folder", 12, 14)
    run = tmp_path / "run"
    settings = tiny(root, run, "dataset=imagefolder", "batch_size=8", "knn_every=0")
    settings += ["checkpoint_every_steps=1"]
    assert main(["pretrain", *settings]) == 0
    printed = capsys.readouterr().out
    assert "images about 12 px on their shorter side" in printed
    assert "load_size=12" in printed and "image_size=12" in printed
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["load_size"], saved["image_size"]) == (12, 12)

    # the folder's images change size: the run being resumed keeps what it was trained at
    write_folder(root, 20, 20)
    cfg = load_config(None, [*settings, "epochs=2", "resume=true"])
    resumed, line = with_image_sizes(cfg)
    assert (resumed.load_size, resumed.image_size, line) == (12, 12, "")
    fresh, line = with_image_sizes(load_config(None, [*settings, f"out={tmp_path / 'new'}"]))
    assert (fresh.load_size, fresh.image_size) == (20, 20) and "20 px" in line
