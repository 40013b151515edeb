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
    python benchmarks/throughput.py --no-tune-malloc      # glibc's default malloc, for comparison

The last column counts the minor page faults of a method's step (median): memory the allocator
returned to the OS and faulted in again, which `care.augment.tune_malloc` avoids.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from contextlib import AbstractContextManager, nullcontext

import torch
from rich.progress import track

from care.augment import tune_malloc
from care.config import load_config
from care.data import DataInfo, data_info, load_split
from care.methods import ContrastiveMethod, build_method

VARIANTS: dict[str, list[str]] = {
    "simclr": ["method=simclr"],
    "care (separate views)": ["method=care", "views=separate"],
    "care (shared views)": ["method=care", "views=shared"],
    "moco": ["method=moco", "queue_size=4096", "temperature=0.2"],
    "care_moco (separate views)": ["method=care_moco", "views=separate", "queue_size=4096"],
}
PHASES = ("augment", "forward", "loss", "backward")


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


def view_count(method: ContrastiveMethod) -> int:
    """Views a step embeds with gradient: 2, or 4 with group-shared views of their own."""
    return 4 if method.uses_groups and not method.shares_views else 2


class Bench:
    """One configured method, its optimiser and a fixed batch of uint8 images.

    ``synthetic=(channels, size)`` uses random uint8 images instead of the configured dataset
    (e.g. 3×32 for a CIFAR-sized benchmark on a machine without CIFAR).
    """

    def __init__(
        self, overrides: list[str], device: torch.device, synthetic: tuple[int, int] | None
    ) -> None:
        cfg = self.cfg = load_config(None, overrides)
        if synthetic is None:
            dataset = load_split(cfg, "pretrain")
            info = data_info(cfg, dataset)
            batch = torch.stack([dataset[i][0] for i in range(cfg.batch_size)])
        else:
            channels, size = synthetic
            info = DataInfo(channels, size, (0.5,) * channels, (0.25,) * channels, num_classes=10)
            gen = torch.Generator().manual_seed(0)
            shape = (cfg.batch_size, channels, size, size)
            batch = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        self.device, self.batch = device, batch.to(device)
        self.method = build_method(cfg, info).to(device).train()
        self.optimizer = torch.optim.Adam(self.method.parameters(), lr=cfg.lr)
        self.views = view_count(self.method)
        # The forward phase is the time spent inside the encoders (queries and MoCo's keys).
        self.forward_time = 0.0
        self._entered = 0.0
        for name in ("encoder", "key_encoder"):
            if hasattr(self.method, name):
                module = getattr(self.method, name)
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leave)
        # The backbone alone sees as many images as the method embeds with gradient, in the
        # same passes of 2 views each.
        self.images = torch.randn(
            2 * cfg.batch_size, info.channels, info.image_size, info.image_size, device=device
        )
        self.times: dict[str, list[float]] = {k: [] for k in (*PHASES, "backbone_only", "faults")}

    def _enter(self, module: torch.nn.Module, args: object) -> None:
        self._entered = _clock(self.device)

    def _leave(self, module: torch.nn.Module, args: object, output: object) -> None:
        self.forward_time += _clock(self.device) - self._entered

    def step(self, seed: int, record: bool) -> None:
        """One training step exactly as ``training_step`` makes it, timed per phase."""
        method, cfg, device = self.method, self.cfg, self.device
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = _clock(device)
        views = method.make_views(self.batch, torch.Generator().manual_seed(seed))
        t1 = _clock(device)
        self.forward_time = 0.0
        with _autocast(cfg.precision, device):
            loss = method.compute_losses(views)["loss"]
        t2 = _clock(device)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        t3 = _clock(device)
        forward = self.forward_time
        phases = (t1 - t0, forward, t2 - t1 - forward, t3 - t2)
        if record:
            for key, value in zip(PHASES, phases, strict=True):
                self.times[key].append(value)
            self.times["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    def backbone_step(self, record: bool) -> None:
        """Forward + backward + optimiser step of the backbone alone on the same images."""
        t0 = _clock(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.views // 2):
            with _autocast(self.cfg.precision, self.device):
                out = self.method.encoder.backbone(self.images).float().sum()
            out.backward()
        self.optimizer.step()
        if record:
            self.times["backbone_only"].append(_clock(self.device) - t0)

    def summary(self) -> dict[str, float]:
        """Median seconds of each phase, and derived figures."""
        result = {k: statistics.median(v) for k, v in self.times.items()}
        result["step"] = sum(result[k] for k in PHASES)
        result["images_per_s"] = self.cfg.batch_size / result["step"]
        result["views"] = self.views
        return result


def benchmark(
    overrides: list[str],
    steps: int,
    warmup: int,
    device: torch.device,
    synthetic: tuple[int, int] | None = None,
) -> dict[str, dict[str, float]]:
    """Median step phases of every variant. The variants and their backbone-alone steps run
    round-robin, so slow drifts of the machine affect every ratio alike."""
    benches = {name: Bench([*overrides, *v], device, synthetic) for name, v in VARIANTS.items()}
    for round_ in track(range(warmup + steps), description="timing rounds"):
        for bench in benches.values():
            bench.step(round_, record=round_ >= warmup)
            bench.backbone_step(record=round_ >= warmup)
    return {name: bench.summary() for name, bench in benches.items()}


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
    parser.add_argument(
        "--no-tune-malloc",
        action="store_true",
        help="keep glibc's default malloc instead of care.augment.tune_malloc, as `care` sets it",
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
    tuned = False if args.no_tune_malloc else tune_malloc()  # as the `care` command does
    torch.manual_seed(0)
    shape = parse_shape(args.synthetic) if args.synthetic else None
    results = benchmark(overrides, steps, warmup, device, shape)
    cfg = load_config(None, overrides)
    device_name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {device_name}; backbone {cfg.backbone} widths {cfg.widths}; batch {cfg.batch_size}; "
        f"images {args.synthetic or cfg.dataset}; precision {cfg.precision}; "
        f"median of {steps} steps after {warmup} warm-up; tuned malloc {tuned}"
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
        "page faults",
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
            f"{r['step'] / r['backbone_only']:.2f}× | {r['faults']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "device": device_name,
                    "overrides": overrides,
                    "tuned_malloc": tuned,
                    "results": results,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
