"""`care show-augment`: the grid of one training step's views of real images, as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from care.augment import Augmenter, AugmentRecipe
from care.cli import main
from care.config import load_config
from care.data import DataInfo
from care.evaluate.show_augment import (
    AugmentGrid,
    augment_grid,
    cell_origin,
    compose,
    draw_step,
)
from care.methods import build_method
from tests.conftest import fails_with_one_line, tiny
from tests.data.writers import cifar_batch, py2_pickle, rng_images


def write_tinted_cifar10(root: Path, per_batch: int = 8) -> Path:
    """A CIFAR-10 folder of tinted noise: every image has its own colour cast."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        images = rng_images(seed, (per_batch, 3, 32, 32)) // 2
        tint = np.random.default_rng(seed).integers(0, 128, size=(per_batch, 3, 1, 1))
        tinted = (images + tint).astype(np.uint8)
        labels = [(seed + i) % 10 for i in range(per_batch)]
        (folder / name).write_bytes(py2_pickle(cifar_batch(tinted, labels)))
    return root


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


@pytest.mark.parametrize("channels", [1, 3])
def test_the_command_writes_a_png_of_the_expected_size(
    capsys: pytest.CaptureFixture[str], fake_fmnist: Path, tmp_path: Path, channels: int
) -> None:
    if channels == 1:
        data, thumb = [f"data_root={fake_fmnist}"], 84  # 28 px × 3
    else:
        data = ["dataset=cifar10", f"data_root={write_tinted_cifar10(tmp_path / 'c10')}"]
        thumb = 96  # 32 px × 3
    out = tmp_path / "grid.png"
    argv = ["show-augment", *data, "group_size=8", "groups=2", "per_group=3", f"out={out}"]
    assert main(argv) == 0
    # 5 panels (images, a_g, a'_g, InfoNCE t, t') of 3 images with 2 px between them and 12 px
    # between panels; 2 rows 12 px apart; 10 px margins, 64 px above, 540 px of notes.
    panel = 3 * thumb + 2 * 2
    grid_w, grid_h = 5 * panel + 4 * 12, 2 * thumb + 12
    assert png_size(out) == (10 + grid_w + 10 + 540, 64 + grid_h + 10)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith(f"wrote {out}: 2 groups, 3 images of each shown")
    assert lines[-1].startswith("next: care pretrain ") and "out=RUN_DIR" in lines[-1]
    assert "groups=" not in lines[-1] and "group_size=8" in lines[-1]
    with Image.open(out) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    colour = np.abs(rgb[..., 0] - rgb[..., 1]).max()
    assert (colour > 30) == (channels == 3)  # the tint shows; Fashion-MNIST stays gray


def _one_image_repeated(channels: int, n: int) -> torch.Tensor:
    image = torch.randint(0, 256, (1, channels, 16, 16), generator=torch.Generator().manual_seed(3))
    return image.to(torch.uint8).expand(n, -1, -1, -1).contiguous()


def _augmenter(channels: int) -> Augmenter:
    recipe = AugmentRecipe.for_channels(channels)
    return Augmenter(recipe, 16, [0.5] * channels, [0.25] * channels)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("pairs", ["per_group", "per_batch"])
def test_group_shared_views_are_identical_within_a_group_and_infonce_views_differ(
    channels: int, pairs: str
) -> None:
    """The same image 3 groups × 4 times: a group-shared view shows it identically across its
    group; InfoNCE's views differ from image to image."""
    grid = augment_grid(
        _one_image_repeated(channels, 12),
        _augmenter(channels),
        torch.Generator().manual_seed(0),
        grouped=True,
        shared=False,
        group_size=4,
        pairs=pairs,
    )
    assert [p.title.split(":")[0] for p in grid.panels] == [
        "images",
        "a_g",
        "a'_g",
        "InfoNCE t",
        "InfoNCE t'",
    ]
    assert [p.shared for p in grid.panels] == [False, True, True, False, False]
    for panel in grid.panels[1:]:
        pixels = panel.pixels  # (groups, per_group, 3, T, T)
        assert pixels.shape == (3, 4, 3, 80, 80)  # 16 px × 5
        for g in range(3):
            same = [torch.equal(pixels[g, i], pixels[g, 0]) for i in range(1, 4)]
            assert all(same) if panel.shared else not any(same), (panel.title, g)
        if panel.shared:  # groups draw their own pair, or one for the batch
            assert torch.equal(pixels[1, 0], pixels[0, 0]) == (pairs == "per_batch")
    assert len(grid.notes) == 3 and grid.notes[0][1].startswith("a_g:")
    _compose_places_every_image(grid)


def _compose_places_every_image(grid: AugmentGrid) -> None:
    canvas, t = compose(grid), grid.thumb
    for p, panel in enumerate(grid.panels):
        for row in range(grid.groups):
            for col in range(grid.per_group):
                y, x = cell_origin(grid, row, p, col)
                assert torch.equal(canvas[:, y : y + t, x : x + t], panel.pixels[row, col])


def test_views_shared_shows_one_pair_and_per_group_caps_the_images() -> None:
    grid = augment_grid(
        _one_image_repeated(3, 8),
        _augmenter(3),
        torch.Generator().manual_seed(0),
        grouped=True,
        shared=True,
        group_size=4,
        per_group=2,
    )
    assert len(grid.panels) == 3 and grid.per_group == 2
    assert "InfoNCE" in grid.panels[1].title
    simclr = augment_grid(
        _one_image_repeated(1, 8),
        _augmenter(1),
        torch.Generator().manual_seed(0),
        grouped=False,
        shared=False,
        group_size=4,
    )
    assert len(simclr.panels) == 3 and not any(p.shared for p in simclr.panels)


@pytest.mark.parametrize(
    "extra", [("method=care",), ("method=care", "views=shared"), ("method=simclr",)]
)
def test_the_grid_draws_what_the_training_step_draws(
    tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """draw_step gives the very views of ContrastiveMethod.make_views for the same generator."""
    cfg = load_config(None, tiny(tmp_path, tmp_path / "run", *extra))
    info = DataInfo(channels=1, image_size=16, mean=(0.5,), std=(0.25,), num_classes=10)
    method = build_method(cfg, info)
    images = torch.randint(0, 256, (16, 1, 20, 20), generator=torch.Generator().manual_seed(1))
    images = images.to(torch.uint8)
    views = method.make_views(images, torch.Generator().manual_seed(7))
    drawn = draw_step(
        images,
        method.augmenter,
        torch.Generator().manual_seed(7),
        grouped=method.uses_groups,
        shared=method.shares_views,
        group_size=cfg.group_size,
        pairs=cfg.pairs,
    )
    expected = [views.contrastive.first, views.contrastive.second]
    names = ["t", "t'"]
    if views.grouped is not None:
        expected += [views.grouped.first, views.grouped.second]
        names += ["a_g", "a'_g"]
    if views.shared:
        expected, names = expected[2:], names[2:]
    assert sorted(drawn) == sorted(names)
    for name, view in zip(names, expected, strict=True):
        assert torch.equal(drawn[name][0], view), name


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ([], "pass out=FILE.png"),
        (["out=grid.jpg"], "pass out=FILE.png"),
        (["out=g.png", "groups=0"], "'groups'"),
        (["out=g.png", "pick=best"], "'pick'"),
        (["out=g.png", "colour=red"], "unknown config key 'colour'"),
        (["out=g.png", "batch_size=30"], "does not split into groups"),
        (["out=g.png", "groups"], "bad argument 'groups'"),
    ],
)
def test_bad_settings_fail_in_one_line(
    capsys: pytest.CaptureFixture[str],
    fake_fmnist: Path,
    tmp_path: Path,
    extra: list[str],
    fragment: str,
) -> None:
    argv = ["show-augment", f"data_root={fake_fmnist}", "group_size=8"]
    fails_with_one_line(
        capsys, [*argv, *[e.replace("g.png", str(tmp_path / "g.png")) for e in extra]], fragment
    )
    assert not list(tmp_path.glob("*.png"))


def test_too_few_images_for_the_groups(
    capsys: pytest.CaptureFixture[str], fake_fmnist: Path, tmp_path: Path
) -> None:
    argv = ["show-augment", f"data_root={fake_fmnist}", "train_samples=32", "group_size=16"]
    fails_with_one_line(capsys, [*argv, "groups=4", f"out={tmp_path / 'g.png'}"], "lower groups")
