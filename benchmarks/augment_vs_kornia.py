"""Time care's batched Augmenter against a kornia AugmentationSequential with the same recipe.

Both start from a uint8 batch and end with a normalised float32 batch:
RandomResizedCrop -> horizontal flip -> ColorJitter (p=0.8) -> RandomGrayscale (p=0.2, RGB
only) -> Gaussian blur (p=0.5, SimCLR's 10% kernel) -> normalise. Each timing is the median of
``--runs`` batches after warm-up, on the CPU. Not a test: run it by hand,

    python benchmarks/augment_vs_kornia.py [--batch 256] [--runs 10] [--threads N] [--tune-malloc]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from care.augment import Augmenter, AugmentRecipe, tune_malloc


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kornia_pipeline(recipe: AugmentRecipe, channels: int, size: int, kernel: int) -> Callable:
    import kornia.augmentation as K

    mean = torch.full((channels,), 0.5)
    std = torch.full((channels,), 0.25)
    stages = [
        K.RandomResizedCrop((size, size), scale=recipe.crop_scale, ratio=recipe.crop_ratio),
        K.RandomHorizontalFlip(p=recipe.flip_p),
        K.ColorJitter(
            recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue, p=recipe.jitter_p
        ),
    ]
    if channels == 3:
        stages.append(K.RandomGrayscale(p=recipe.grayscale_p))
    stages.append(K.RandomGaussianBlur((kernel, kernel), recipe.blur_sigma, p=recipe.blur_p))
    stages.append(K.Normalize(mean, std))
    seq = K.AugmentationSequential(*stages)

    def run(images: Tensor) -> Tensor:
        return seq(images.float().div_(255))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--tune-malloc", action="store_true", help="keep freed memory (care.augment.tune_malloc)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = tune_malloc() if args.tune_malloc else False

    header = f"{'images':<12}{'pipeline':<10}{'ms/batch':>10}{'images/s':>12}{'speed-up':>10}"
    malloc = "tuned malloc" if tuned else "default malloc"
    print(
        f"batch {args.batch}, CPU, {torch.get_num_threads()} threads, {malloc}, "
        f"median of {args.runs}"
    )
    print(header)
    print("-" * len(header))
    for channels, size in ((1, 28), (3, 32)):
        recipe = AugmentRecipe.for_channels(channels)
        care_aug = Augmenter(recipe, size, [0.5] * channels, [0.25] * channels)
        images = torch.randint(0, 256, (args.batch, channels, size, size), dtype=torch.uint8)
        gen = torch.Generator().manual_seed(0)
        k_run = kornia_pipeline(recipe, channels, size, care_aug.blur_kernel)
        t_care = median_ms(lambda: care_aug(images, gen), args.runs)  # noqa: B023
        t_k = median_ms(lambda: k_run(images), args.runs)  # noqa: B023
        name = f"{size}x{size}x{channels}"
        for label, ms in (("care", t_care), ("kornia", t_k)):
            rate = args.batch / ms * 1e3
            print(f"{name:<12}{label:<10}{ms:>10.2f}{rate:>12.0f}{t_k / ms:>9.1f}x")


if __name__ == "__main__":
    main()
