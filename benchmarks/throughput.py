"""Step time and images/s of each method, broken down into augmentation, forward, loss, backward.

A benchmark script, not a test. It builds each method exactly as `care pretrain` does (same config
keys, ``precision``/``memory_format=auto`` resolved for the device, cuDNN and TF32 switches set),
feeds it real batches of uint8 images, and times the phases of a training step with the wall clock
(median over the timed steps, after warm-up). It also times the backbone alone (forward + backward
+ optimiser step on as many images as the method embeds), so each method's overhead is a ratio
within one run.

    python benchmarks/throughput.py                       # CPU preset, every method
    python benchmarks/throughput.py precision=bf16-mixed steps=10
    python benchmarks/throughput.py --json out.json backbone=resnet18 widths=[64,128,256,512]
    python benchmarks/throughput.py --synthetic 3x32 widths=[64,128,256,512]   # ResNet-18, 32 px RGB
    python benchmarks/throughput.py --synthetic 3x32 backbone=resnet50 widths=[64,128,256,512] \
        precision=bf16-mixed memory_format=channels_last --variants simclr,care-separate,care-shared
    python benchmarks/throughput.py --no-tune-malloc      # glibc's default malloc, for comparison
    python benchmarks/throughput.py --variants simclr,care-separate \
        --compare "precision=32 memory_format=contiguous" --compare "precision=auto memory_format=auto"

``--compare SETTINGS`` (repeatable) times every variant under each group of settings, all in the
same round-robin, and ends with each setting's speed-up over the first one: ratios measured
within one run, as on a busy 2-core machine only such ratios mean anything.

How the phases are timed. Every phase border reads the clock after a device synchronisation, and
the encoders' forward hooks do the same, so each phase is honest but the step as a whole loses the
overlap of host and device work that a real step has. Each round therefore also runs one whole
step per method with no clock inside it ("unsynced step", one synchronisation at each end): that is
the figure to quote for images/s on a GPU; on the CPU the two agree up to noise.

Where the method splits its backward (``method.early_backward``: one backward per pair of views,
called from inside ``compute_losses`` so each pair's activations are freed early), the split
backward calls run inside the loss phase. They are timed where they happen (bracketed by the same
synchronised clock) and counted as backward: "loss" is the loss phase less the encoders' forward
and less those backward calls, "backward" is the final ``loss.backward()`` and the optimiser step
plus the split backward calls. ``--no-early-backward`` times the one-backward step instead.

The page-fault column counts the minor page faults of a method's step (median): memory the
allocator returned to the OS and faulted in again, which `care.augment.tune_malloc` avoids.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from rich.progress import track

from care.augment import tune_malloc
from care.config import Config, load_config
from care.data import DataInfo, data_info, load_split
from care.hardware import (
    autocast_for,
    configure_backends,
    device_type,
    resolve,
    torch_memory_format,
)
from care.methods import ContrastiveMethod, Views, build_method

VARIANTS: dict[str, list[str]] = {
    "simclr": ["method=simclr"],
    "care (separate views)": ["method=care", "views=separate"],
    "care (shared views)": ["method=care", "views=shared"],
    "moco": ["method=moco", "queue_size=4096", "temperature=0.2"],
    "care_moco (separate views)": ["method=care_moco", "views=separate", "queue_size=4096"],
}
PHASES = ("augment", "forward", "loss", "backward")


def slug(variant: str) -> str:
    """The short name of a variant for ``--variants``: ``care (separate views)`` → ``care-separate``."""
    return variant.replace(" views)", "").replace(" (", "-")


def select_variants(text: str | None) -> dict[str, list[str]]:
    """The variants named in a comma-separated list of slugs (all of them for None)."""
    if not text:
        return dict(VARIANTS)
    by_slug = {slug(name): name for name in VARIANTS}
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in by_slug]
    if unknown or not chosen:
        raise SystemExit(
            f"error: --variants {text!r}: choose from {','.join(by_slug)} (comma-separated)"
        )
    return {by_slug[s]: VARIANTS[by_slug[s]] for s in chosen}


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def parse_shape(text: str) -> tuple[int, int]:
    """``"3x32"`` → (channels, size) of synthetic square images."""
    channels, _, size = text.partition("x")
    if not channels.isdigit() or not size.isdigit():
        raise SystemExit(f"error: --synthetic {text!r}: write CHANNELSxSIZE, e.g. 3x32")
    return int(channels), int(size)


def view_count(method: ContrastiveMethod) -> int:
    """Views a step embeds with gradient: 2, or 4 with group-shared views of their own."""
    return 4 if method.uses_groups and not method.shares_views else 2


def synthetic_info(channels: int, size: int) -> DataInfo:
    """What the method needs to know of random images of ``channels`` × ``size`` px."""
    return DataInfo(channels, size, (0.5,) * channels, (0.25,) * channels, num_classes=10)


class Bench:
    """One configured method, its optimiser and a fixed batch of uint8 images.

    ``synthetic=(channels, size)`` uses random uint8 images instead of the configured dataset
    (e.g. 3×32 for a CIFAR-sized benchmark on a machine without CIFAR). ``early_backward``: split
    the backward as the method's ``early_backward`` allows.
    """

    def __init__(
        self,
        overrides: list[str],
        device: torch.device,
        synthetic: tuple[int, int] | None,
        early_backward: bool = True,
    ) -> None:
        cfg = self.cfg = resolve(load_config(None, overrides))  # as `care pretrain` does
        if synthetic is None:
            dataset = load_split(cfg, "pretrain")
            info = data_info(cfg, dataset)
            batch = torch.stack([dataset[i][0] for i in range(cfg.batch_size)])
        else:
            channels, size = synthetic
            info = synthetic_info(channels, size)
            gen = torch.Generator().manual_seed(0)
            shape = (cfg.batch_size, channels, size, size)
            batch = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        self.device, self.batch = device, batch.to(device)
        configure_backends(cfg)  # the method holds its weights in cfg's memory format already
        self.method = build_method(cfg, info).to(device).train()
        self.optimizer = torch.optim.Adam(self.method.parameters(), lr=cfg.lr)
        self.views = view_count(self.method)
        self.early_backward: Callable[..., AbstractContextManager[object]] | None = (
            self.method.early_backward if early_backward else None
        )
        # The forward phase is the time spent inside the encoders (queries and MoCo's keys);
        # the split backward calls made inside compute_losses are timed apart.
        self.forward_time = self.split_backward_time = 0.0
        self._entered = 0.0
        self.phased = True  # False: a whole step, with no clock (and no sync) inside
        for name in ("encoder", "key_encoder"):
            if hasattr(self.method, name):
                module = getattr(self.method, name)
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leave)
        # The backbone alone sees as many images as the method embeds with gradient, in the
        # same passes of 2 views each.
        self.images = torch.randn(
            2 * cfg.batch_size, info.channels, info.image_size, info.image_size, device=device
        ).contiguous(memory_format=torch_memory_format(cfg.memory_format))
        keys = (*PHASES, "backbone_only", "faults", "unsynced_step")
        self.times: dict[str, list[float]] = {k: [] for k in keys}

    def _enter(self, module: torch.nn.Module, args: object) -> None:
        if self.phased:
            self._entered = _clock(self.device)

    def _leave(self, module: torch.nn.Module, args: object, output: object) -> None:
        if self.phased:
            self.forward_time += _clock(self.device) - self._entered

    def _split_backward(self, part: torch.Tensor) -> None:
        """One of the backward calls ``early_backward`` makes inside ``compute_losses``."""
        if not self.phased:
            part.backward()
            return
        t0 = _clock(self.device)
        part.backward()
        self.split_backward_time += _clock(self.device) - t0

    def _losses(self, views: Views) -> torch.Tensor:
        with autocast_for(self.cfg.precision, self.device):
            if self.early_backward is None:
                return self.method.compute_losses(views)["loss"]
            with self.early_backward(self._split_backward):
                return self.method.compute_losses(views)["loss"]

    def step(self, seed: int, record: bool) -> None:
        """One training step exactly as ``training_step`` makes it, timed per phase."""
        method, device = self.method, self.device
        self.phased = True
        self.optimizer.zero_grad(set_to_none=True)  # before any split backward accumulates
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = _clock(device)
        views = method.make_views(self.batch, torch.Generator().manual_seed(seed))
        t1 = _clock(device)
        self.forward_time = self.split_backward_time = 0.0
        loss = self._losses(views)
        t2 = _clock(device)
        loss.backward()
        self.optimizer.step()
        t3 = _clock(device)
        forward, split = self.forward_time, self.split_backward_time
        phases = (t1 - t0, forward, t2 - t1 - forward - split, t3 - t2 + split)
        if record:
            for key, value in zip(PHASES, phases, strict=True):
                self.times[key].append(value)
            self.times["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    def whole_step(self, seed: int, record: bool) -> None:
        """The same step with no clock inside it: one synchronisation at each end."""
        self.phased = False
        self.optimizer.zero_grad(set_to_none=True)
        t0 = _clock(self.device)
        views = self.method.make_views(self.batch, torch.Generator().manual_seed(seed))
        self._losses(views).backward()
        self.optimizer.step()
        t1 = _clock(self.device)
        self.phased = True
        if record:
            self.times["unsynced_step"].append(t1 - t0)

    def backbone_step(self, record: bool) -> None:
        """Forward + backward + optimiser step of the backbone alone on the same images."""
        self.phased = False  # the backbone is inside the encoder: keep its hooks quiet
        t0 = _clock(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.views // 2):
            with autocast_for(self.cfg.precision, self.device):
                out = self.method.encoder.backbone(self.images).float().sum()
            out.backward()
        self.optimizer.step()
        self.phased = True
        if record:
            self.times["backbone_only"].append(_clock(self.device) - t0)

    def summary(self) -> dict[str, float]:
        """Median seconds of each phase, and derived figures."""
        result = {k: statistics.median(v) for k, v in self.times.items()}
        result["step"] = sum(result[k] for k in PHASES)
        result["images_per_s"] = self.cfg.batch_size / result["step"]
        result["unsynced_images_per_s"] = self.cfg.batch_size / result["unsynced_step"]
        result["views"] = self.views
        result["early_backward"] = self.early_backward is not None
        return result


def benchmark(
    overrides: list[str],
    steps: int,
    warmup: int,
    device: torch.device,
    synthetic: tuple[int, int] | None = None,
    variants: dict[str, list[str]] | None = None,
    early_backward: bool = True,
) -> dict[str, dict[str, float]]:
    """Median step phases of every variant. The variants, their whole steps and their
    backbone-alone steps run round-robin, so slow drifts of the machine affect every ratio
    alike."""
    benches = {
        name: Bench([*overrides, *v], device, synthetic, early_backward)
        for name, v in (variants or VARIANTS).items()
    }
    for round_ in track(range(warmup + steps), description="timing rounds"):
        record = round_ >= warmup
        for bench in benches.values():
            bench.step(round_, record)
            bench.whole_step(round_, record)
            bench.backbone_step(record)
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
        "--variants",
        metavar="LIST",
        help=f"comma-separated subset of {','.join(map(slug, VARIANTS))} (default: all)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        metavar="SETTINGS",
        help="time every variant under each of these space-separated key=value groups too, e.g. "
        '--compare "precision=32" --compare "precision=bf16-mixed" (the first is the baseline)',
    )
    parser.add_argument(
        "--no-early-backward",
        action="store_true",
        help="one backward per step even where the method can split it (early_backward)",
    )
    parser.add_argument(
        "--no-tune-malloc",
        action="store_true",
        help="keep glibc's default malloc instead of care.augment.tune_malloc, as `care` sets it",
    )
    args = parser.parse_intermixed_args()  # options may come between the overrides
    variants = select_variants(args.variants)
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
    device = torch.device(device_type(load_config(None, overrides).accelerator))
    tuned = False if args.no_tune_malloc else tune_malloc()  # as the `care` command does
    torch.manual_seed(0)
    shape = parse_shape(args.synthetic) if args.synthetic else None
    settings = args.compare or [""]
    runs = {
        _label(name, setting, settings): [*v, *setting.split()]
        for setting in settings
        for name, v in variants.items()
    }
    results = benchmark(overrides, steps, warmup, device, shape, runs, not args.no_early_backward)
    device_name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    configs = {}
    for setting in settings:
        cfg = configs[setting] = resolve(load_config(None, [*overrides, *setting.split()]))
        rows = {name: results[_label(name, setting, settings)] for name in variants}
        split = sorted({bool(r["early_backward"]) for r in rows.values()})
        print(
            f"device: {device_name}; backbone {cfg.backbone} widths {cfg.widths}; "
            f"batch {cfg.batch_size}; images {args.synthetic or cfg.dataset}; "
            f"precision {cfg.precision}; memory format {cfg.memory_format}; "
            f"early backward {'/'.join(map(str, split))}; median of {steps} steps after "
            f"{warmup} warm-up; tuned malloc {tuned}"
            + (f"; settings: {setting}" if setting else "")
        )
        print_table(rows)
    if len(settings) > 1:
        print_speedups(results, variants, settings)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "device": device_name,
                    "torch": torch.__version__,
                    "overrides": overrides,
                    "settings": settings,
                    "config": _config_summary(configs[settings[0]], args.synthetic),
                    "configs": {s: _config_summary(c, args.synthetic) for s, c in configs.items()},
                    "steps": steps,
                    "warmup": warmup,
                    "tuned_malloc": tuned,
                    "results": results,
                },
                handle,
                indent=2,
            )


def _label(name: str, setting: str, settings: list[str]) -> str:
    """A variant's key in the results: its name, with the setting when several are compared."""
    return name if len(settings) == 1 else f"{name} [{setting}]"


def _config_summary(cfg: Config, synthetic: str | None) -> dict[str, object]:
    return {
        "backbone": cfg.backbone,
        "widths": list(cfg.widths),
        "batch_size": cfg.batch_size,
        "precision": cfg.precision,
        "memory_format": cfg.memory_format,
        "images": synthetic or cfg.dataset,
    }


def print_table(results: dict[str, dict[str, float]]) -> None:
    """One markdown row per variant: phases, ratios to simclr and to the backbone alone."""
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
        "unsynced step s",
        "unsynced img/s",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    base = results["simclr"]["step"] if "simclr" in results else None
    for name, r in results.items():
        share = {k: r[k] / r["step"] for k in ("augment", "forward", "loss", "backward")}
        vs_simclr = f"{r['step'] / base:.2f}×" if base else "–"
        print(
            f"| {name} | {int(r['views'])} | {r['step']:.3f} | {r['images_per_s']:.0f} | "
            f"{_percent(share['augment'])} | {_percent(share['forward'])} | {_percent(share['loss'])} | "
            f"{_percent(share['backward'])} | {_percent(share['augment'] + share['loss'])} | "
            f"{vs_simclr} | {r['backbone_only']:.3f} | "
            f"{r['step'] / r['backbone_only']:.2f}× | {r['faults']:.0f} | "
            f"{r['unsynced_step']:.4f} | {r['unsynced_images_per_s']:.0f} |"
        )


def print_speedups(
    results: dict[str, dict[str, float]], variants: dict[str, list[str]], settings: list[str]
) -> None:
    """Each setting's whole-step (unsynced) speed-up over the first setting, per variant."""
    print(f"\nspeed-up of a whole step over [{settings[0]}] (its time ÷ this setting's):")
    print("| method | " + " | ".join(f"[{s}]" for s in settings) + " |")
    print("|" + "---|" * (len(settings) + 1))
    for name in variants:
        base = results[_label(name, settings[0], settings)]["unsynced_step"]
        cells = [
            f"{base / results[_label(name, s, settings)]['unsynced_step']:.2f}×" for s in settings
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
