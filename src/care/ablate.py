"""`care ablate`: the loss ablation of the paper's Figure 2 at one training budget.

Three losses are pretrained from one base config, each into ``<out>/<variant>``, and probed:

- ``infonce``   (``method=simclr``):    L_InfoNCE = L_inv + L_unif
- ``equi_unif`` (``method=equi_unif``): L_equi + L_unif (L_equi weight 1, ``--equi-unif-weight``), no invariance term
- ``care``      (``method=care``):      L_inv + L_unif + λ·L_equi

Every other setting (data, model, epochs, batch, λ, seed, probe) is shared. The command is
resumable: a variant whose ``summary.json`` exists is not retrained, one with a checkpoint but no
summary resumes from it, and a ``probe.json`` newer than the weights (with the same probe settings)
is reused. It writes ``ablation.json``, ``ablation.md`` and ``ablation.png`` into ``<out>``, and
holds ``<out>``'s lock (:class:`care.runs.RunLock`) throughout: a second ablation into the same
folder is refused while the first one lives.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from care.config import (
    EVALUATION_KEYS,
    Config,
    load_config,
    parse_overrides,
    training_differences,
    validate,
    with_overrides,
)
from care.distributed import is_global_zero
from care.errors import CareError
from care.evaluate.probe import probe_file_name, probe_run
from care.hardware import resolve
from care.methods import method_class
from care.plots import ablation_bars
from care.runs import RunDir, atomic_write_files, rank_zero_lock
from care.train import pretrain

#: Variant name → (method, loss as plain text, loss as matplotlib mathtext).
VARIANTS: dict[str, tuple[str, str, str]] = {
    "infonce": ("simclr", "InfoNCE (L_inv + L_unif)", "InfoNCE"),
    "equi_unif": (
        "equi_unif",
        "L_equi + L_unif",
        r"$\mathcal{L}_{\mathrm{equi}} + \mathcal{L}_{\mathrm{unif}}$",
    ),
    "care": ("care", "CARE (L_inv + L_unif + λ·L_equi)", "CARE"),
}

#: Where the ablation goes when neither the overrides nor the config file name an ``out``.
DEFAULT_OUT = "runs/ablation"


def parse_variants(variants: str | Sequence[str] | None) -> list[str]:
    """``"care,infonce"`` or ``["care", "infonce"]`` → known variant names, in the given order."""
    if variants is None:
        return list(VARIANTS)
    items = variants.split(",") if isinstance(variants, str) else list(variants)
    names = [v.strip() for v in items if v.strip()]
    if not names:
        raise CareError(f"--only names no variant: choose from {','.join(VARIANTS)}")
    for name in names:
        if name not in VARIANTS:
            raise CareError(
                f"unknown ablation variant '{name}' in --only: choose from {','.join(VARIANTS)}"
            )
    return list(dict.fromkeys(names))


def base_config(config_path: str | Path | None, overrides: list[str]) -> Config:
    """The shared config: ``--config`` and overrides, with ``out`` naming the ablation folder."""
    keys = set(map(str, parse_overrides(overrides).keys()))
    if "method" in keys:
        raise CareError(
            "`care ablate` sets method itself (infonce=simclr, equi_unif, care): drop the method "
            "override and pick variants with --only"
        )
    # simclr needs no groups, so a base that only infonce will use is not refused for them;
    # every variant's own config is validated before anything trains.
    cfg = resolve(load_config(config_path, [*overrides, "method=simclr"]))  # as runs save it
    if "out" not in keys and cfg.out == Config.out:
        cfg.out = DEFAULT_OUT
    cfg.resume = False
    return cfg


#: Weight of L_equi in the equi_unif variant: the paper's Figure 2 trains L_equi + L_unif.
EQUI_UNIF_WEIGHT = 1.0


def variant_config(base: Config, name: str, equi_unif_weight: float = EQUI_UNIF_WEIGHT) -> Config:
    cfg = dataclasses.replace(
        base,
        method=VARIANTS[name][0],
        weight=equi_unif_weight if name == "equi_unif" else base.weight,
        out=str(Path(base.out) / name),
        widths=list(base.widths),
        probe_milestones=list(base.probe_milestones),
    )
    try:
        validate(cfg)
        method_class(cfg)
    except CareError as exc:
        raise CareError(f"variant {name} (method={cfg.method}): {exc}") from None
    return cfg


def _check_finished(run: RunDir, name: str, cfg: Config) -> None:
    """A finished run is reused only if it was trained with this ablation's settings."""
    saved_cfg = run.read_config()
    changed = training_differences(saved_cfg, cfg)
    if changed:
        saved = getattr(saved_cfg, changed[0])
        raise CareError(
            f"{run.root} was trained with {changed[0]}={saved!r}, not "
            f"{getattr(cfg, changed[0])!r}: choose another out=DIR for this ablation, or delete "
            f"{run.root} to retrain {name}"
        )


def _probe_is_fresh(run: RunDir, cfg: Config) -> dict[str, Any] | None:
    """The probe file's content if it is newer than the weights and used these probe settings
    (the file :func:`care.evaluate.probe.probe_run` writes for them: probe.json for the run's
    own settings)."""
    try:
        saved = run.read_config()
        settings = with_overrides(saved, {k: getattr(cfg, k) for k in EVALUATION_KEYS})
        path = run.root / probe_file_name(saved, settings)
    except CareError:
        return None
    if not path.is_file() or not run.backbone.is_file():
        return None
    if path.stat().st_mtime_ns < run.backbone.stat().st_mtime_ns:
        return None
    try:
        probe = json.loads(path.read_text())
        linear, knn = probe["linear"], probe["knn"]
        same = (
            linear["epochs"] == cfg.probe_epochs
            and len(linear["per_seed"]) == cfg.probe_seeds
            and linear["lr"] == cfg.probe_lr
            and linear["weight_decay"] == cfg.probe_weight_decay
            and linear.get("optimizer", "adam") == cfg.probe_optimizer
            and list(linear.get("milestones", [])) == list(cfg.probe_milestones)
            and linear.get("batch_size", cfg.probe_batch_size) == cfg.probe_batch_size
            and knn["k"] == cfg.knn_k
            and knn["temperature"] == cfg.knn_temperature
        )
    except (ValueError, KeyError, TypeError):
        return None
    return probe if same else None


def final_losses(metrics: Path) -> dict[str, float]:
    """The last logged value of each ``train/*`` loss term in metrics.csv (lr left out)."""
    if not metrics.is_file():
        return {}
    last: dict[str, float] = {}
    with metrics.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key and key.startswith("train/") and key != "train/lr" and value:
                    try:
                        last[key.removeprefix("train/")] = float(value)
                    except ValueError:
                        continue
    return last


def _summary(run: RunDir) -> dict[str, Any]:
    try:
        loaded = json.loads(run.summary.read_text())
    except ValueError:
        raise CareError(f"{run.summary} is corrupt: delete it to finish {run.root} again") from None
    return loaded if isinstance(loaded, dict) else {}


def _result(
    name: str, run: RunDir, shared: dict[str, Any], probe: dict[str, Any]
) -> dict[str, Any]:
    method, loss, _ = VARIANTS[name]
    saved = run.read_config().to_dict()
    summary = _summary(run)
    linear = probe["linear"]
    return {
        "method": method,
        "loss": loss,
        "run": str(run.root),
        "knn": probe["knn"]["accuracy"],
        "linear": {
            "mean": linear["mean"],
            "std": linear["std"],
            "per_seed": linear["per_seed"],
        },
        "final_losses": final_losses(run.metrics),
        "training": {
            key: summary.get(key)
            for key in (
                "epochs",
                "steps",
                "global_batch",
                "wall_time_s",
                "final_knn_acc_percent",
                "knn_bank_size",
            )
        },
        "config_diff": {
            k: saved[k] for k in saved if k not in ("out", "resume") and saved[k] != shared.get(k)
        },
    }


def _say(message: str) -> None:
    if is_global_zero():
        print(message, flush=True)


def _train_and_probe(name: str, cfg: Config, tag: str) -> tuple[RunDir, dict[str, Any] | None]:
    """Train (or resume, or skip) one variant, then probe it unless probe.json is fresh."""
    run = RunDir(cfg.out)
    if run.summary.is_file():
        _check_finished(run, name, cfg)
        _say(f"{tag} {name} (method={cfg.method}): finished earlier in {run.root}")
    else:
        resume = run.last_checkpoint.is_file()
        what = "resuming from its last checkpoint" if resume else "training"
        _say(f"{tag} {name} (method={cfg.method}): {what} → {run.root}")
        pretrain(dataclasses.replace(cfg, resume=resume))
    if not is_global_zero():
        return run, None
    probe = _probe_is_fresh(run, cfg)
    if probe is None:
        _say(f"{tag} {name}: probing (linear ×{cfg.probe_seeds} seeds, kNN)")
        probe = probe_run(str(run.root), {k: getattr(cfg, k) for k in EVALUATION_KEYS})
    else:
        _say(f"{tag} {name}: the probe is up to date")
    return run, probe


def _earlier_result(
    base: Config, name: str, shared: dict[str, Any], equi_unif_weight: float
) -> dict[str, Any] | None:
    """A variant not chosen this time, if it finished and was probed with these settings."""
    run = RunDir(Path(base.out) / name)
    if not run.summary.is_file():
        return None
    try:
        cfg = variant_config(base, name, equi_unif_weight)
        if training_differences(run.read_config(), cfg):
            return None
        probe = _probe_is_fresh(run, cfg)
        return None if probe is None else _result(name, run, shared, probe)
    except CareError:
        return None


def _seconds(wall: float | None) -> str:
    if wall is None:
        return "–"
    return f"{wall:.1f} s" if wall < 10 else f"{wall:.0f} s"


def ablation_markdown(payload: dict[str, Any]) -> str:
    """The results as a markdown table, with the shared settings above it."""
    lines = [
        f"# Loss ablation: {payload['dataset']}, {payload['epochs']} epochs, λ = {payload['weight']} (care), "
        f"{payload['equi_unif_weight']} (equi_unif)",
        "",
        f"Shared settings: backbone {payload['backbone']} widths {payload['config']['widths']}, "
        f"batch {payload['config']['batch_size']}, group_size {payload['config']['group_size']}, "
        f"seed {payload['config']['seed']}; linear probe {payload['config']['probe_epochs']} "
        f"epochs × {payload['config']['probe_seeds']} seeds. Accuracies in %.",
        "",
        "| variant | loss | method | linear probe | kNN | final loss terms | train time |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for name, r in payload["variants"].items():
        terms = ", ".join(f"{k} {v:.4g}" for k, v in r["final_losses"].items()) or "–"
        wall = r["training"].get("wall_time_s")
        lines.append(
            f"| {name} | {r['loss']} | {r['method']} | "
            f"{r['linear']['mean']:.2f} ± {r['linear']['std']:.2f} | {r['knn']:.2f} | {terms} | "
            f"{_seconds(wall)} |"
        )
    return "\n".join(lines) + "\n"


def print_ablation(payload: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Loss ablation on {payload['dataset']} (accuracy %)")
    for column in ("variant", "loss", "linear probe", "kNN"):
        table.add_column(column, justify="right" if column in ("linear probe", "kNN") else "left")
    for name, r in payload["variants"].items():
        linear = r["linear"]
        table.add_row(
            name,
            r["loss"],
            f"{linear['mean']:.2f} ± {linear['std']:.2f} ({len(linear['per_seed'])} seeds)",
            f"{r['knn']:.2f}",
        )
    console.print(table)


def ablate_command(
    config_path: str | Path | None,
    overrides: list[str],
    variants: str | Sequence[str] | None = None,
    console: Console | None = None,
    equi_unif_weight: float = EQUI_UNIF_WEIGHT,
) -> dict[str, Any]:
    """Train, probe and compare the chosen loss variants; writes ablation.{json,md,png}."""
    console = console or Console()
    names = parse_variants(variants)
    base = base_config(config_path, overrides)
    configs = {
        name: variant_config(base, name, equi_unif_weight) for name in names
    }  # refuse before training
    out = Path(base.out)
    with rank_zero_lock(out, "care ablate"):  # each variant's pretraining locks out/<variant>
        return _ablate(base, names, configs, console, equi_unif_weight)


def _ablate(
    base: Config,
    names: list[str],
    configs: dict[str, Config],
    console: Console,
    equi_unif_weight: float,
) -> dict[str, Any]:
    out = Path(base.out)
    shared = {k: v for k, v in base.to_dict().items() if k not in ("method", "out", "resume")}

    results: dict[str, Any] = {}
    for i, name in enumerate(names, 1):
        run, probe = _train_and_probe(name, configs[name], f"[{i}/{len(names)}]")
        if probe is not None:
            results[name] = _result(name, run, shared, probe)
    if not is_global_zero():
        return {}
    for name in VARIANTS:  # variants left out by --only but finished earlier in this folder
        if (
            name not in results
            and (earlier := _earlier_result(base, name, shared, equi_unif_weight)) is not None
        ):
            _say(f"[-] {name}: finished and probed earlier in {out / name}; included")
            results[name] = earlier
    ordered = {name: results[name] for name in VARIANTS if name in results}

    payload: dict[str, Any] = {
        "figure": "CARE paper, Figure 2: ablating the loss terms",
        "dataset": base.dataset,
        "backbone": base.backbone,
        "epochs": base.epochs,
        "weight": base.weight,
        "equi_unif_weight": equi_unif_weight,
        "config": shared,
        "variants": ordered,
    }
    paths = [out / "ablation.json", out / "ablation.md", out / "ablation.png"]
    figure = ablation_bars(
        [
            {
                "label": VARIANTS[name][2],
                "mean": r["linear"]["mean"],
                "std": r["linear"]["std"],
                "per_seed": r["linear"]["per_seed"],
                "knn": r["knn"],
            }
            for name, r in ordered.items()
        ],
        f"Loss ablation: {base.dataset}, {base.backbone} {base.widths}, "
        f"{base.epochs} epochs, λ = {base.weight} (CARE), L_equi weight {equi_unif_weight} "
        "(L_equi + L_unif)",
    )
    atomic_write_files(  # one result: the three files are replaced together
        {
            paths[0]: (json.dumps(payload, indent=2) + "\n").encode(),
            paths[1]: ablation_markdown(payload).encode(),
            paths[2]: figure,
        }
    )
    print_ablation(payload, console)
    for path in paths:
        _say(f"wrote {path}")
    payload["paths"] = [str(p) for p in paths]
    return payload
