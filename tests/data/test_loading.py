"""From a config to its splits, their DataInfo, and the epoch sampler."""

from __future__ import annotations

from pathlib import Path

import torch

from care.config import load_config
from care.data import EpochSampler, TensorImages, data_info, load_split


def test_epoch_sampler_is_a_seeded_permutation_sharded_by_rank() -> None:
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    assert order == list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != order
    shards = [list(EpochSampler(10, 3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 3 for s in shards)
    assert len({i for shard in shards for i in shard}) == 9


def _images(n: int, channels: int, size: int) -> TensorImages:
    return TensorImages(
        torch.zeros(n, channels, size, size, dtype=torch.uint8),
        torch.zeros(n, dtype=torch.int64),
        name="x",
        num_classes=4,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


def test_data_info_uses_the_native_size_and_crops_only_image_folders() -> None:
    native = data_info(load_config(None, ["dataset=stl10"]), _images(2, 3, 96))
    assert (native.image_size, native.eval_crop_fraction, native.channels) == (96, 1.0, 3)
    assert native.num_classes == 4 and native.mean == (0.5, 0.5, 0.5)
    folder = data_info(load_config(None, ["dataset=imagefolder"]), _images(2, 3, 256))
    assert folder.image_size == 224 and folder.eval_crop_fraction == 224 / 256
    small = data_info(
        load_config(None, ["dataset=imagefolder", "image_size=64"]), _images(2, 3, 32)
    )
    assert small.image_size == 64 and small.eval_crop_fraction == 1.0  # never more than all
    resized = data_info(load_config(None, ["dataset=cifar10", "image_size=24"]), _images(2, 3, 32))
    assert resized.image_size == 24 and resized.eval_crop_fraction == 1.0


def test_load_split_reads_the_configured_dataset(fake_fmnist: Path) -> None:
    cfg = load_config(None, [f"data_root={fake_fmnist}"])
    assert (len(load_split(cfg, "pretrain")), len(load_split(cfg, "test"))) == (128, 64)
    info = data_info(cfg, load_split(cfg, "train"))
    assert (info.channels, info.image_size, info.num_classes) == (1, 28, 10)
