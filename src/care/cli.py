"""The `care` command: `care pretrain | probe | equivariance | ablate`.

- ``care pretrain [--config FILE] key=value ...``: pretrain simclr, care, equi_unif, moco, ...
- ``care probe RUN_DIR ... [key=value ...]``: linear probe and kNN → probe.json
- ``care equivariance RUN_DIR [--against RUN_DIR2] [key=value ...]``: Wahba error, γ_f, ...
- ``care ablate [--config FILE] [--only infonce,equi_unif,care] key=value ...``: the loss
  ablation of the paper's Figure 2 → ablation.json, ablation.md, ablation.png

User errors (bad config, missing or corrupt data, NaN loss, unsafe checkpoint) print one line,
``error: ...``, and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from care.errors import CareError, RunInterrupted


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predefined tensorboard.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # resume writes there
    os.environ.setdefault("POSSIBLE_USER_WARNINGS", "off")


def _pretrain(args: argparse.Namespace) -> int:
    from care.config import load_config, to_yaml
    from care.distributed import is_global_zero
    from care.hardware import resolve
    from care.methods import method_class
    from care.train import pretrain

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        method_class(cfg)  # the config must be one the method can train
        print(to_yaml(resolve(cfg)), end="")  # auto settings as this machine resolves them
        return 0

    run = pretrain(cfg)
    if is_global_zero():
        print(f"run written to {run.root}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from care.config import parse_overrides
    from care.evaluate.probe import print_results, probe_run

    args.overrides = [a for a in args.items if "=" in a]
    args.runs = [a for a in args.items if "=" not in a]
    if not args.runs:
        raise CareError("no run directory given: care probe RUN_DIR [RUN_DIR ...] [key=value ...]")
    overrides = {str(k): v for k, v in parse_overrides(args.overrides).items()}
    results = [probe_run(run_dir, overrides) for run_dir in args.runs]
    print_results(results)
    for r in results:
        print(f"wrote {r['run']}/probe.json")
    return 0


def _equivariance(args: argparse.Namespace) -> int:
    from care.evaluate.equivariance import equivariance_command

    options: dict[str, object] = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise CareError(f"bad argument '{item}': write settings as key=value, e.g. trials=20")
        if key in ("trials", "samples", "compositions", "seed", "batch_size"):
            if not value.isdigit():
                raise CareError(f"bad value for '{key}': {value!r}; give a whole number")
            options[key] = int(value)
        elif key in ("split", "layer", "precision"):
            options[key] = value
        else:
            raise CareError(
                f"unknown setting '{key}': use trials, samples, split, layer, compositions, seed, "
                "precision or batch_size"
            )
    payload = equivariance_command(args.run, args.against, **options)  # type: ignore[arg-type]
    _print_equivariance(payload)
    return 0


def _print_equivariance(payload: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Equivariance over {payload['trials']} trials ({payload['layer']} layer)")
    results = payload["results"]
    # Runs under another form (hyperboloid, symplectic) also report the best linear fit Λ.
    group_fit = any("group_fit_residual_mean" in r["summary"] for r in results)  # type: ignore[attr-defined]
    columns = ["run", "W_SO/√n mean", "worst", "W ÷ inv. dist.", "γ_f", "composition", "form Δ"]
    if group_fit:
        columns += ["linear fit/√n", "‖ΛᵀJΛ−J‖/‖J‖"]
    for column in columns:
        table.add_column(column)
    for run, res in zip(payload["runs"], results, strict=True):  # type: ignore[call-overload]
        s = res["summary"]
        row = [
            run,
            f"{s['wahba_so_mean']:.4f}",
            f"{s['wahba_so_worst']:.4f}",
            f"{s['wahba_so_ratio_mean']:.3f}",
            f"{s['gamma_mean']:.4f}",
            f"{s.get('composition_error_mean', float('nan')):.4f}",
            f"{s.get('form_distortion_mean', float('nan')):.4f}",
        ]
        if group_fit:
            row += [
                f"{s.get('group_fit_residual_mean', float('nan')):.4f}",
                f"{s.get('group_deviation_relative_mean', float('nan')):.4f}",
            ]
        table.add_row(*row)
    Console().print(table)
    if "lower_in_trials" in payload:
        print(
            f"first run lower W_f in {payload['lower_in_trials']}/{payload['trials']} trials, "
            f"lower W_f ÷ invariance distance in {payload['ratio_lower_in_trials']}"
        )
    skipped = results[0]["probe"].get("not_applicable", [])  # type: ignore[index]
    if skipped:
        print(f"parameter probe: n/a for {', '.join(skipped)} (they do not vary on this data)")
    print(f"wrote {payload['json']}")
    for plot in payload.get("plots", []):  # type: ignore[attr-defined]
        print(f"wrote {plot}")


def _ablate(args: argparse.Namespace) -> int:
    from care.ablate import ablate_command

    ablate_command(args.config, args.overrides, args.only, equi_unif_weight=args.equi_unif_weight)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="care", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser(
        "pretrain", help="pretrain simclr, care, equi_unif, moco or care_moco"
    )
    pretrain.add_argument("--config", help="YAML preset, e.g. configs/fashion-mnist.yaml")
    pretrain.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    pretrain.add_argument("overrides", nargs="*", metavar="key=value")
    pretrain.set_defaults(handler=_pretrain)

    probe = commands.add_parser("probe", help="linear probe and kNN of pretrained runs")
    probe.add_argument(
        "items",
        nargs="+",
        metavar="RUN_DIR | key=value",
        help="run directories, then settings such as probe_epochs=100",
    )
    probe.set_defaults(handler=_probe)

    equi = commands.add_parser(
        "equivariance", help="Wahba error, γ_f, composition, parameter probes"
    )
    equi.add_argument("run", metavar="RUN_DIR")
    equi.add_argument("--against", metavar="RUN_DIR2", help="a baseline run to compare with")
    equi.add_argument(
        "settings",
        nargs="*",
        metavar="key=value",
        help="trials=20 samples=2000 split=test layer=projection|backbone "
        "precision=32|bf16-mixed (default: the run's, where this machine runs it natively) "
        "batch_size=256 (images read, augmented and embedded at a time)",
    )
    equi.set_defaults(handler=_equivariance)

    ablate = commands.add_parser(
        "ablate",
        help="loss ablation (paper, Figure 2): InfoNCE vs L_equi + L_unif vs CARE",
        description="Pretrain and probe InfoNCE (method=simclr), L_equi + L_unif "
        "(method=equi_unif) and CARE (method=care) with one shared config; each variant goes "
        "to OUT/<variant>, and OUT/ablation.{json,md,png} compare them. Rerunning resumes: "
        "finished variants are not retrained and fresh probes are reused.",
    )
    ablate.add_argument("--config", help="YAML preset, e.g. configs/fashion-mnist.yaml")
    ablate.add_argument(
        "--only",
        metavar="VARIANTS",
        help="comma-separated subset of infonce,equi_unif,care (default: all three)",
    )
    ablate.add_argument(
        "--equi-unif-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="weight of L_equi in the equi_unif variant (default 1: the paper's L_equi + L_unif); "
        "care uses weight=λ from the config",
    )
    ablate.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="settings shared by all variants, as for pretrain (not method); "
        "out=DIR names the ablation folder (default runs/ablation)",
    )
    ablate.set_defaults(handler=_ablate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # settings after an option, e.g. `care equivariance RUN --against RUN2 trials=5`
        positional = {"equivariance": "settings", "ablate": "overrides"}.get(args.command)
        if positional is None or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, positional, getattr(args, positional) + extra)
    _quiet_lightning()
    from care.augment import tune_malloc

    tune_malloc()  # serve CPU tensors from the heap and keep it: fewer page faults per step
    try:
        return int(args.handler(args))
    except RunInterrupted as exc:  # the checkpoint is written: say how to continue
        from care.distributed import is_global_zero

        if is_global_zero():  # every rank stops; one says so
            print(exc, file=sys.stderr)
        return exc.exit_status
    except CareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
