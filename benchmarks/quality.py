"""Is CARE better than SimCLR at an equal budget? Accuracy and equivariance over seeds, and a λ sweep.

A benchmark script, not a test. Every run is a real `care pretrain` (Fashion-MNIST CPU preset unless
overridden), followed by `care probe` and `care equivariance RUN --against <simclr of the same seed>`
(20 shared augmentation trials). Runs are resumable: a finished run, probe or equivariance file is
reused, so the script can be stopped and started again.

    python benchmarks/quality.py --stage full                      # all 60,000 images, 3 seeds
    python benchmarks/quality.py --stage main --seeds 3            # 5 methods × 3 seeds, λ 0.01
    python benchmarks/quality.py --stage main --weight 0.1 --variants simclr,care-shared
    python benchmarks/quality.py --stage sweep --lambdas 0.1,1.0 --sweep-views separate
    python benchmarks/quality.py --stage long --weight 0.1 train_samples=20000 epochs=6
    python benchmarks/quality.py --stage precision train_samples=5000 epochs=1  # fp32 vs bf16
    python benchmarks/quality.py --stage report                    # tables and plots only

Settings after the options (`train_samples=20000 epochs=3`, the default budget) apply to every run,
and name its folder, --out/<budget>. After every stage the report covers every finished run in that
folder, whichever stage made it: quality.md has one row per method and λ (mean ± std over its
pretraining seeds), quality.json the per-run figures, quality.png the probe and W_f ÷ invariance
bars, lambda_sweep.png the care runs of seed 0 against λ, knn_vs_time.png the online kNN accuracy
against training seconds and epochs. Where methods share seeds with simclr, quality.md also has
each one's paired difference to simclr with a 95% t-interval. The script holds the budget folder's lock
(`.care.lock`, see care.runs.RunLock) while it runs: a second quality.py on the same folder is
refused while the first one lives.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

from care.errors import CareError
from care.runs import RunLock

#: Method variants of the main comparison: name → config overrides.
VARIANTS: dict[str, list[str]] = {
    "simclr": ["method=simclr"],
    "care-separate": ["method=care", "views=separate"],
    "care-shared": ["method=care", "views=shared"],
    "moco": ["method=moco", "queue_size=4096", "temperature=0.2"],
    "care_moco": ["method=care_moco", "views=separate", "queue_size=4096", "temperature=0.2"],
}
LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_BUDGET = ["train_samples=20000", "epochs=3"]
#: The full stage: all 60,000 Fashion-MNIST images, as many epochs as fit the whole comparison
#: (15 runs) in about 100 minutes of a 2-core CPU, and a kNN check 3 times an epoch (234 steps).
FULL_BUDGET = ["train_samples=60000", "epochs=2", "knn_every_steps=78", "knn_bank_samples=5000"]
#: λ of the full stage's separate-view runs: the paper's, and the two a short sweep liked.
FULL_SEPARATE_LAMBDAS = (0.01, 0.1, 0.3)
#: λ of its shared-view runs: the best probe of the shared-view sweep (README, 20k images × 3).
FULL_SHARED_LAMBDA = 0.03


@dataclass
class Run:
    """One pretraining: where it goes and how it is configured."""

    name: str
    variant: str
    seed: int
    overrides: list[str]
    weight: float | None = None
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return next(o.split("=", 1)[1] for o in self.overrides if o.startswith("method="))


def run_name(variant: str, weight: float | None, seed: int) -> str:
    """Folder of one run; λ is part of the name only for methods that have an L_equi."""
    method = VARIANTS[variant][0].split("=", 1)[1]
    return (
        f"{variant}-s{seed}" if method in ("simclr", "moco") else f"{variant}-lam{weight}-s{seed}"
    )


def _care(*args: str) -> None:
    command = [sys.executable, "-m", "care", *args]
    print("$ care " + " ".join(args), flush=True)
    done = subprocess.run(command)
    if done.returncode != 0:
        raise SystemExit(f"error: `care {' '.join(args)}` failed (exit {done.returncode})")


def execute(run: Run, root: Path, baseline: Path | None, budget: list[str]) -> Path:
    """Pretrain, probe and measure one run, skipping whatever already exists."""
    out = root / run.name
    if not (out / "summary.json").is_file():
        _care(
            "pretrain",
            "--config",
            "configs/fashion-mnist.yaml",
            *budget,
            *run.overrides,
            f"seed={run.seed}",
            f"out={out}",
            "resume=true",
        )
    if not (out / "probe.json").is_file():
        _care("probe", str(out))
    if equivariance_json(out) is None:
        against = ["--against", str(baseline)] if baseline is not None and baseline != out else []
        _care("equivariance", str(out), *against, "trials=20")
    return out


def equivariance_json(out: Path) -> Path | None:
    """The run's `care equivariance` result (equivariance.json, or equivariance-vs-<baseline>.json
    when it was measured against the simclr run of its seed); None before it is measured."""
    found = sorted(out.glob("equivariance*.json"))
    return found[-1] if found else None


def collect(run: Run, out: Path) -> dict[str, Any]:
    """The figures of one finished run."""
    summary = json.loads((out / "summary.json").read_text())
    probe = json.loads((out / "probe.json").read_text())
    measured = equivariance_json(out)
    assert measured is not None, f"{out} has no equivariance result"
    equi = json.loads(measured.read_text())
    mine = equi["results"][0]["summary"]
    row: dict[str, Any] = {
        "run": str(out),
        "variant": run.variant,
        "seed": run.seed,
        "weight": run.weight,
        "linear": probe["linear"]["mean"],
        "linear_std_over_probe_seeds": probe["linear"]["std"],
        "knn": probe["knn"]["accuracy"],
        "wahba": mine["wahba_so_mean"],
        "wahba_ratio": mine["wahba_so_ratio_mean"],
        "gamma": mine["gamma_mean"],
        "composition": mine.get("composition_error_mean"),
        "step_time_s": summary.get("step_time_s"),
        "wall_time_s": summary.get("wall_time_s"),  # the whole `care pretrain` fit, kNN included
        "train_time_s": training_seconds(out),  # kNN checks excluded
        **run.tags,
    }
    if len(equi["results"]) > 1:  # paired with the simclr run of the same seed
        row["lower_wahba_trials"] = equi["lower_in_trials"]
        row["lower_ratio_trials"] = equi["ratio_lower_in_trials"]
        row["trials"] = equi["trials"]
    return row


METRICS = (
    "linear",
    "knn",
    "wahba",
    "wahba_ratio",
    "gamma",
    "composition",
    "step_time_s",
    "wall_time_s",
    "train_time_s",
)
#: Paired against simclr on the same seeds: metric → (name, True where higher is better).
PAIRED = {
    "linear": ("linear probe (points)", True),
    "knn": ("kNN (points)", True),
    "wahba_ratio": ("W_f ÷ inv. dist.", False),
    "wahba": ("W_f/√n", False),
    "gamma": ("γ_f", False),
}


def knn_curve(out: Path) -> list[dict[str, float]]:
    """The online kNN checks of a run from its metrics.csv: training seconds (``time_s``, kNN
    excluded; absent in runs older than the column), epochs and accuracy in %."""
    summary = json.loads((out / "summary.json").read_text())
    steps_per_epoch = summary["steps"] / max(1, summary["epochs"])
    with (out / "metrics.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/knn_acc")]
    return [
        {
            "time_s": float(r["time_s"]) if r.get("time_s") else math.nan,
            "epochs": int(r["step"]) / steps_per_epoch,
            "knn": float(r["val/knn_acc"]),
        }
        for r in rows
    ]


def training_seconds(out: Path) -> float | None:
    """The last ``time_s`` of a run's metrics.csv: its seconds of training, kNN checks excluded."""
    with (out / "metrics.csv").open(newline="") as handle:
        seconds = [float(r["time_s"]) for r in csv.DictReader(handle) if r.get("time_s")]
    return max(seconds) if seconds else None


def paired_interval(differences: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of paired differences (method − simclr, one per seed) and its two-sided Student-t
    interval; no interval from one seed."""
    n = len(differences)
    result = {"n": float(n), "mean": statistics.fmean(differences)}
    if n > 1:
        quantile = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
        half = quantile * statistics.stdev(differences) / n**0.5
        result |= {"low": result["mean"] - half, "high": result["mean"] + half}
    return result


def paired_differences(
    members: list[dict[str, Any]], baseline: dict[int, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per metric of PAIRED: the differences member − simclr over the seeds both have, and
    their :func:`paired_interval`."""
    paired: dict[str, dict[str, Any]] = {}
    for metric in PAIRED:
        differences = [
            m[metric] - baseline[m["seed"]][metric]
            for m in members
            if m["seed"] in baseline
            and m.get(metric) is not None
            and baseline[m["seed"]].get(metric) is not None
        ]
        if differences:
            paired[metric] = {**paired_interval(differences), "differences": differences}
    return paired


def verdict(interval: dict[str, float], higher_is_better: bool) -> str:
    """ "CARE is better" only where the interval excludes 0 on CARE's side."""
    if "low" not in interval:
        return "one seed: no interval"
    if interval["low"] > 0 or interval["high"] < 0:
        care_side = (interval["low"] > 0) == higher_is_better
        return "CARE is better" if care_side else "SimCLR is better"
    return "no difference detected"


def paired_markdown(table: dict[str, dict[str, Any]]) -> str:
    """Each method's paired difference to simclr over the same seeds, with 95% t-intervals."""
    names = [n for n, e in table.items() if "paired" in e]
    if not names:
        return ""
    heads = " | ".join(f"Δ {PAIRED[m][0]}" for m in PAIRED)
    lines = [
        "### Paired against simclr (same pretraining seeds)",
        "",
        f"| method − simclr | seeds | {heads} | probe verdict | W_f ÷ inv. verdict |",
        "|---|---|" + "---|" * (len(PAIRED) + 2),
    ]
    for name in names:
        paired = table[name]["paired"]
        cells = []
        for metric in PAIRED:
            interval = paired.get(metric)
            if interval is None:
                cells.append("–")
            elif "low" in interval:
                digits = 2 if metric in ("linear", "knn") else 3
                cells.append(
                    f"{interval['mean']:+.{digits}f} "
                    f"[{interval['low']:+.{digits}f}, {interval['high']:+.{digits}f}]"
                )
            else:
                cells.append(f"{interval['mean']:+.3f}")
        probe = paired.get("linear")
        ratio = paired.get("wahba_ratio")
        lines.append(
            f"| {name} | {int(paired['linear']['n'])} | {' | '.join(cells)} | "
            f"{verdict(probe, True) if probe else '–'} | "
            f"{verdict(ratio, False) if ratio else '–'} |"
        )
    lines += [
        "",
        "Mean of the per-seed differences [95% Student-t interval over seeds]. A verdict names a "
        "method only where its interval excludes 0; lower W_f ÷ invariance distance is better.",
    ]
    return "\n".join(lines) + "\n"


def aggregate(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over seeds, per value of ``key``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row[key]), []).append(row)
    table: dict[str, dict[str, Any]] = {}
    for name, members in groups.items():
        entry: dict[str, Any] = {"seeds": len(members)}
        for metric in METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None]
            if values:
                entry[metric] = statistics.fmean(values)
                entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for paired in ("lower_wahba_trials", "lower_ratio_trials", "trials"):
            if all(paired in m for m in members):
                entry[paired] = sum(m[paired] for m in members)
        table[name] = entry
    return table


def _cell(entry: dict[str, Any], metric: str, digits: int) -> str:
    if metric not in entry:
        return "–"
    value, std = entry[metric], entry.get(f"{metric}_std", 0.0)
    return f"{value:.{digits}f} ± {std:.{digits}f}" if entry["seeds"] > 1 else f"{value:.{digits}f}"


def _signed(entry: dict[str, Any]) -> str:
    """The probe's paired differences to simclr: mean ± standard deviation over seeds."""
    if "paired" not in entry:
        return "–"
    gains = entry["paired"]["linear"]["differences"]
    gain = statistics.fmean(gains)
    std = statistics.stdev(gains) if len(gains) > 1 else 0.0
    return f"{gain:+.2f} ± {std:.2f}" if entry["seeds"] > 1 else f"{gain:+.2f}"


def markdown(table: dict[str, dict[str, Any]], title: str, label: str) -> str:
    lines = [
        f"### {title}",
        "",
        f"| {label} | seeds | linear probe % | kNN % | W_f/√n | W_f ÷ inv. dist. | γ_f | "
        "composition | probe − simclr (same seeds) | trials with lower W_f than simclr | "
        "… lower W_f ÷ inv. | pretrain wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in table.items():
        lower = f"{e['lower_wahba_trials']}/{e['trials']}" if "trials" in e else "–"
        ratio = f"{e['lower_ratio_trials']}/{e['trials']}" if "trials" in e else "–"
        lines.append(
            f"| {name} | {e['seeds']} | {_cell(e, 'linear', 2)} | {_cell(e, 'knn', 2)} | "
            f"{_cell(e, 'wahba', 4)} | {_cell(e, 'wahba_ratio', 3)} | {_cell(e, 'gamma', 3)} | "
            f"{_cell(e, 'composition', 3)} | {_signed(e)} | {lower} | {ratio} | "
            f"{_cell(e, 'wall_time_s', 0)} |"
        )
    lines += [
        "",
        "Means ± standard deviation over pretraining seeds; the probe of each run is itself the mean "
        "of 3 probe seeds. W_f, γ_f and composition error: projection-head embeddings of 2,000 test "
        "images, 20 shared augmentations (`care equivariance RUN --against SIMCLR trials=20`); the "
        "paired columns count trials, summed over seeds. Pretrain wall s: the whole `care "
        "pretrain` fit of one run (mean over seeds), online kNN checks included.",
    ]
    return "\n".join(lines) + "\n"


def plot_main(table: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Horizontal bars per method and λ: probe accuracy and W_f ÷ invariance distance, with the
    standard deviation over pretraining seeds and the seed count in each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)[::-1]  # first row on top
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * len(names)), sharey=True)
    for ax, metric, xlabel in (
        (axes[0], "linear", "linear probe accuracy (%)"),
        (axes[1], "wahba_ratio", "W_f ÷ invariance distance (lower: more equivariant)"),
    ):
        values = [table[n].get(metric, float("nan")) for n in names]
        errors = [table[n].get(f"{metric}_std", 0.0) for n in names]
        colors = ["#4c72b0" if n.startswith(("care", "care_moco")) else "#8c8c8c" for n in names]
        ax.barh(names, values, xerr=errors, capsize=3, color=colors)
        low, high = min(values), max(values)
        pad = max(0.1 * (high - low), 0.01 * abs(high) + 1e-6)
        ax.set_xlim(low - 3 * pad, high + 2 * pad)
        ax.set_xlabel(xlabel)
        for y, n in enumerate(names):
            ax.annotate(
                f"{table[n]['seeds']}×",
                (ax.get_xlim()[0], y),
                xytext=(3, -3),
                textcoords="offset points",
                fontsize=7,
                color="white",
            )
    fig.suptitle(f"{title}\n(n× = pretraining seeds; bars: mean ± std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_knn_curves(groups: dict[str, list[dict[str, Any]]], path: Path, title: str) -> bool:
    """Online kNN accuracy against training seconds and against epochs, one line per method (the
    mean over its seeds at each check, a band from the lowest to the highest seed); False, and no
    file, when no method has two checks."""
    curves = {}
    for name, members in groups.items():
        runs = [knn_curve(Path(m["run"])) for m in members]
        length = min(len(c) for c in runs)
        if length >= 2:
            curves[name] = [[c[i] for c in runs] for i in range(length)]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, checks in curves.items():
        accuracy = [statistics.fmean(p["knn"] for p in check) for check in checks]
        low = [min(p["knn"] for p in check) for check in checks]
        high = [max(p["knn"] for p in check) for check in checks]
        style = "--" if name.startswith("simclr") else "-"
        for ax, axis in ((axes[0], "time_s"), (axes[1], "epochs")):
            x = [statistics.fmean(p[axis] for p in check) for check in checks]
            (line,) = ax.plot(
                x, accuracy, style, marker="o", ms=3, label=f"{name} ({len(checks[0])}×)"
            )
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.12)
    axes[0].set_xlabel("training seconds (kNN checks excluded; mean over seeds)")
    axes[1].set_xlabel("epochs")
    axes[0].set_ylabel("online kNN accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}\nonline kNN (n× = seeds; band: lowest to highest seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_sweep(rows: list[dict[str, Any]], path: Path, baseline: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for views in ("separate", "shared"):
        points = sorted((r["weight"], r) for r in rows if r["views"] == views)
        if not points:
            continue
        lams = [p[0] for p in points]
        axes[0].plot(lams, [p[1]["linear"] for p in points], "o-", label=f"care, {views} views")
        axes[1].plot(
            lams, [p[1]["wahba_ratio"] for p in points], "o-", label=f"care, {views} views"
        )
    if baseline is not None:
        axes[0].axhline(baseline["linear"], color="gray", ls="--", label="simclr")
        axes[1].axhline(baseline["wahba_ratio"], color="gray", ls="--", label="simclr")
    for ax, label in (
        (axes[0], "linear probe accuracy (%)"),
        (axes[1], "W_f ÷ invariance distance"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("λ (weight of L_equi)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("λ sweep (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def full_stage_runs(seeds: int) -> list[Run]:
    """The full stage, seed by seed (a stopped comparison has whole seeds): simclr, care with
    separate views at each of FULL_SEPARATE_LAMBDAS, care with shared views at FULL_SHARED_LAMBDA."""
    chosen: list[tuple[str, float | None]] = [
        ("simclr", None),
        *(("care-separate", lam) for lam in FULL_SEPARATE_LAMBDAS),
        ("care-shared", FULL_SHARED_LAMBDA),
    ]
    return [
        Run(
            run_name(variant, weight, seed),
            variant,
            seed,
            [*VARIANTS[variant], *([] if weight is None else [f"weight={weight}"])],
            weight,
        )
        for seed in range(seeds)
        for variant, weight in chosen
    ]


def budget_tag(budget: list[str]) -> str:
    """A folder name for one budget, e.g. ``train_samples20000-epochs3``."""
    tag = "-".join(item.replace("=", "") for item in budget) or "default"
    tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    if len(tag) > 120:  # a file name has at most 255 bytes: keep the start, and a digest of all
        digest = hashlib.blake2b(" ".join(budget).encode(), digest_size=6).hexdigest()
        tag = f"{tag[:100]}-{digest}"
    return tag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stage",
        choices=("main", "sweep", "long", "precision", "full", "report"),
        default="main",
        help="full: the 60,000-image comparison (its own default budget, FULL_BUDGET)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="pretraining seeds (main stage)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="main-stage variants")
    parser.add_argument("--weight", type=float, default=0.01, help="λ of the main and long stages")
    parser.add_argument("--views", default="shared", help="care views of the long stage")
    parser.add_argument(
        "--lambdas", default=",".join(map(str, LAMBDAS)), help="λ values of the sweep, in order"
    )
    parser.add_argument(
        "--sweep-views", default="shared,separate", help="care views of the sweep, in order"
    )
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("budget", nargs="*", help="key=value settings for every run")
    args = parser.parse_args()
    budget = args.budget or (FULL_BUDGET if args.stage == "full" else DEFAULT_BUDGET)
    tag = budget_tag(budget)
    root = Path(args.out) / tag
    root.mkdir(parents=True, exist_ok=True)

    main_runs = [
        Run(run_name(v, args.weight, s), v, s, [*VARIANTS[v], f"weight={args.weight}"], args.weight)
        for s in range(args.seeds)
        for v in args.variants.split(",")
    ]
    sweep_runs = [
        Run(
            f"care-{views}-lam{lam}-s0",
            f"care-{views}",
            0,
            ["method=care", f"views={views}", f"weight={lam}"],
            lam,
            {"views": views},
        )
        for views in args.sweep_views.split(",")
        for lam in (float(x) for x in args.lambdas.split(","))
    ]
    long_runs = [
        Run(run_name("simclr", None, 0), "simclr", 0, VARIANTS["simclr"]),
        Run(
            f"care-{args.views}-lam{args.weight}-s0",
            f"care-{args.views}",
            0,
            ["method=care", f"views={args.views}", f"weight={args.weight}"],
            args.weight,
        ),
    ]
    precision_runs = [
        Run(
            run_name(v, args.weight, 0) + ("" if p == "32" else f"-{p}"),
            v,
            0,
            [*VARIANTS[v], f"weight={args.weight}", f"precision={p}"],
            args.weight,
            {"precision": p},
        )
        for v in ("simclr", f"care-{args.views}")
        for p in ("32", "bf16-mixed")
    ]
    stages = {
        "full": full_stage_runs(args.seeds),
        "main": main_runs,
        "sweep": sweep_runs,
        "long": long_runs,
        "precision": precision_runs,
    }
    chosen = [] if args.stage == "report" else stages[args.stage]
    try:
        # One script per budget folder: every stage writes runs and the report into it. Each
        # `care pretrain` locks its own run folder inside it.
        with RunLock(root, "benchmarks/quality.py", hint="choose another --out"):
            for run in chosen:
                baseline = root / run_name("simclr", None, run.seed)
                if run.variant != "simclr":
                    simclr = Run(baseline.name, "simclr", run.seed, VARIANTS["simclr"])
                    execute(simclr, root, None, budget)
                execute(run, root, baseline, budget)
            write_report(root, budget)
    except CareError as exc:  # as `care` reports it: one line, status 2
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def discover(root: Path) -> list[dict[str, Any]]:
    """Rows of every finished run under ``root`` (any stage), labelled from its config.yaml."""
    import yaml

    rows = []
    for out in sorted(root.iterdir()):
        if equivariance_json(out) is None:
            continue
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        method = cfg["method"]
        variant = method if method in ("simclr", "moco") else f"{method}-{cfg['views']}"
        weight = None if method in ("simclr", "moco") else float(cfg["weight"])
        run = Run(out.name, variant, int(cfg["seed"]), [f"method={method}"], weight)
        run.tags = {"views": cfg.get("views"), "precision": str(cfg.get("precision", "32"))}
        rows.append(collect(run, out))
    return rows


def label(row: dict[str, Any], usual_precision: str) -> str:
    """``care-shared λ=0.1``, ``simclr``, and ``simclr 32`` for a run whose precision is not the
    folder's usual one."""
    text = row["variant"] + ("" if row["weight"] is None else f" λ={row['weight']:g}")
    return text + ("" if row["precision"] == usual_precision else f" {row['precision']}")


ORDER = ("simclr", "care-separate", "care-shared", "moco", "care_moco-separate", "care_moco-shared")


def write_report(root: Path, budget: list[str]) -> None:
    """quality.json, quality.md, quality.png and lambda_sweep.png from every finished run."""
    rows = discover(root)
    if not rows:
        print(f"no finished runs in {root} yet")
        return
    # the precision most runs have (config.yaml keeps what precision=auto resolved to)
    usual = statistics.mode(r["precision"] for r in rows)
    rows.sort(
        key=lambda r: (
            (r["precision"] != usual, r["precision"]),
            ORDER.index(r["variant"]),
            r["weight"] or 0.0,
            r["seed"],
        )
    )
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(label(row, usual), []).append(row)
    table = {
        name: aggregate(members, "variant")[members[0]["variant"]]
        for name, members in groups.items()
    }
    for name, members in groups.items():  # differences to simclr of the same seed
        if members[0]["variant"] == "simclr":
            continue
        baseline = {
            r["seed"]: r
            for r in rows
            if r["variant"] == "simclr" and r["precision"] == members[0]["precision"]
        }
        paired = paired_differences(members, baseline)
        if "linear" in paired:
            table[name]["paired"] = paired
    title = f"Fashion-MNIST CPU preset, {' '.join(budget)}, precision {usual}"
    sections = [markdown(table, title, "method"), paired_markdown(table)]
    plot_main(table, root / "quality.png", title)
    if plot_knn_curves(groups, root / "knn_vs_time.png", title):
        print(f"wrote {root / 'knn_vs_time.png'}")
    swept = [
        r
        for r in rows
        if r["variant"].startswith("care-") and r["seed"] == 0 and r["precision"] == usual
    ]
    simclr = [
        r for r in rows if r["variant"] == "simclr" and r["seed"] == 0 and r["precision"] == usual
    ]
    if len({r["weight"] for r in swept}) > 1:
        plot_sweep(swept, root / "lambda_sweep.png", simclr[0] if simclr else None)
    report = {"budget": budget, "root": str(root), "rows": rows, "table": table}
    (root / "quality.json").write_text(json.dumps(report, indent=2))
    (root / "quality.md").write_text("\n".join(sections))
    print("\n".join(sections))
    print(f"wrote {root}/quality.json, quality.md and plots")


if __name__ == "__main__":
    main()
