"""Step time and images/s of each method, broken down into augmentation, forward, loss, backward.

A benchmark script, not a test. It builds each method exactly as `care pretrain` does (same config
keys), feeds it real batches of uint8 images, and times the phases of a training step with the
wall clock (median over the timed steps, after warm-up). It also times the backbone alone
(forward + backward + optimiser step on as many images as the method embeds), so each method's
overhead is a ratio within one run.

    python benchmarks/throughput.py                       # CPU preset, simclr and care (both views)
    python benchmarks/throughput.py precision=bf16-mixed steps=10
    python benchmarks/throughput.py --json out.json backbone=resnet18 widths=[64,128,256,512]
    python benchmarks/throughput.py --synthetic 3x32 widths=[64,128,256,512]   # ResNet-18, 32 px RGB
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import AbstractContextManager, nullcontext

import torch

from care.augment import tune_malloc
from care.config import load_config
from care.methods import DataInfo, build_method
from care.train import data_info, load_split

VARIANTS: dict[str, list[str]] = {
    "simclr": ["method=simclr"],
    "care (separate views)": ["method=care", "views=separate"],
    "care (shared views)": ["method=care", "views=shared"],
}


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def parse_shape(text: str) -> tuple[int, int]:
    """``"3x32"`` → (channels, size) of synthetic square images."""
    channels, _, size = text.partition("x")
    if not channels.isdigit() or not size.isdigit():
        raise SystemExit(f"error: --synthetic {text!r}: write CHANNELSxSIZE, e.g. 3x32")
    return int(channels), int(size)


def time_method(
    overrides: list[str],
    steps: int,
    warmup: int,
    device: torch.device,
    synthetic: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Median seconds per phase of one training step of the configured method.

    ``synthetic=(channels, size)`` uses random uint8 images instead of the configured dataset
    (e.g. 3×32 for a CIFAR-sized benchmark on a machine without CIFAR).
    """
    cfg = load_config(None, overrides)
    if synthetic is None:
        dataset = load_split(cfg, "pretrain")
        info = data_info(cfg, dataset)
        batches = torch.stack([dataset[i][0] for i in range(cfg.batch_size)]).to(device)
    else:
        channels, size = synthetic
        info = DataInfo(channels, size, (0.5,) * channels, (0.25,) * channels, num_classes=10)
        gen = torch.Generator().manual_seed(0)
        shape = (cfg.batch_size, channels, size, size)
        batches = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)
    method = build_method(cfg, info).to(device).train()
    optimizer = torch.optim.Adam(method.parameters(), lr=cfg.lr)
    phases: dict[str, list[float]] = {k: [] for k in ("augment", "forward", "loss", "backward")}
    views_per_step = 0
    for step in range(warmup + steps):
        gen = torch.Generator().manual_seed(step)
        t0 = _clock(device)
        params = method.sample_views(cfg.batch_size, gen)
        views = method.augment_views(batches, params)
        t1 = _clock(device)
        with _autocast(cfg.precision, device):
            embeddings = method.forward_views(views, cfg.batch_size)
            t2 = _clock(device)
            loss = method.compute_loss(embeddings)["loss"]
        t3 = _clock(device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t4 = _clock(device)
        views_per_step = len(params)
        if step >= warmup:
            for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                phases[key].append(value)
    result = {k: statistics.median(v) for k, v in phases.items()}
    result["step"] = sum(result.values())
    result["images_per_s"] = cfg.batch_size / result["step"]
    result["views"] = views_per_step

    # The backbone alone on the same images, in the same passes (2 views each) and precision.
    backbone = method.backbone
    images = torch.randn(
        2 * cfg.batch_size,
        info.channels,
        info.image_size,
        info.image_size,
        device=device,
    )
    times = []
    for step in range(warmup + steps):
        t0 = _clock(device)
        optimizer.zero_grad(set_to_none=True)
        for _ in range(views_per_step // 2):  # as many passes of 2 views as the method makes
            with _autocast(cfg.precision, device):
                out = backbone(images).float().sum()
            out.backward()
        optimizer.step()
        if step >= warmup:
            times.append(_clock(device) - t0)
    result["backbone_only"] = statistics.median(times)
    return result


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config key=value, plus steps=N warmup=N")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--synthetic",
        metavar="CxS",
        help="random uint8 images of C channels and S px instead of the dataset, e.g. 3x32",
    )
    args = parser.parse_args()
    steps, warmup = 5, 2
    overrides = []
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key == "steps":
            steps = int(value)
        elif key == "warmup":
            warmup = int(value)
        else:
            overrides.append(item)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tune_malloc()  # as the `care` command does
    torch.manual_seed(0)
    results: dict[str, dict[str, float]] = {}
    for name, variant in VARIANTS.items():
        shape = parse_shape(args.synthetic) if args.synthetic else None
        results[name] = time_method([*overrides, *variant], steps, warmup, device, shape)
    cfg = load_config(None, overrides)
    device_name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {device_name}; backbone {cfg.backbone} widths {cfg.widths}; batch {cfg.batch_size}; "
        f"images {args.synthetic or cfg.dataset}; precision {cfg.precision}; "
        f"median of {steps} steps after {warmup} warm-up"
    )
    header = (
        "method",
        "views",
        "step s",
        "img/s",
        "augment",
        "forward",
        "loss",
        "backward",
        "aug+loss",
        "vs simclr",
        "backbone-only s",
        "vs backbone",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    base = results["simclr"]["step"]
    for name, r in results.items():
        share = {k: r[k] / r["step"] for k in ("augment", "forward", "loss", "backward")}
        print(
            f"| {name} | {int(r['views'])} | {r['step']:.3f} | {r['images_per_s']:.0f} | "
            f"{_percent(share['augment'])} | {_percent(share['forward'])} | {_percent(share['loss'])} | "
            f"{_percent(share['backward'])} | {_percent(share['augment'] + share['loss'])} | "
            f"{r['step'] / base:.2f}× | {r['backbone_only']:.3f} | "
            f"{r['step'] / r['backbone_only']:.2f}× |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"device": device_name, "overrides": overrides, "results": results},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
