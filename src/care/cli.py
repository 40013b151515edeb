"""The `care` command: `care pretrain | probe | equivariance | ablate | embed | show-augment`.

- ``care pretrain [--config FILE] key=value ...``: pretrain simclr, care, equi_unif, moco, ...
- ``care probe RUN_DIR ... [key=value ...]``: linear probe and kNN → probe.json
- ``care equivariance RUN_DIR [--against RUN_DIR2] [key=value ...]``: Wahba error, γ_f, ...
- ``care ablate [--config FILE] [--only infonce,equi_unif,care] key=value ...``: the loss
  ablation of the paper's Figure 2 → ablation.json, ablation.md, ablation.png
- ``care embed RUN_DIR out=FILE [key=value ...]``: embeddings and labels of a split, and with
  ``neighbours=K`` a nearest-neighbour grid
- ``care show-augment [--config FILE] key=value ... out=FILE.png``: real images under the
  configured augmentation, one row per group, before a pretraining is spent on the recipe

User errors (bad config, missing or corrupt data, NaN loss, unsafe checkpoint) print one line,
``error: ...``, and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from care.errors import CareError, RunInterrupted

if TYPE_CHECKING:
    from care.runs import RunDir


#: Lightning's notices that say nothing to a care user (care prints its own progress and end).
LIGHTNING_NOTICES = (
    "💡 Tip:",  # the litlogger advertisement
    "GPU available: False",  # hardware lines of a CPU-only run
    "TPU available: False",
    "HPU available: False",
    "was configured so 100% of the batches",  # limit_val_batches=1.0
    "`weights_only` was not set",  # care loads checkpoints weights-only itself
    "to estimate number of stepping batches",
    "`Trainer.fit` stopped:",  # care says what the run wrote instead
)
#: The loggers Lightning's notices come from (rank_zero_info and the checkpoint connector).
LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
    "lightning.pytorch",
    "lightning.fabric",
)


class _DropNotices(logging.Filter):
    """Drops the log records of :data:`LIGHTNING_NOTICES`; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in LIGHTNING_NOTICES)


def _quiet_lightning() -> None:
    """Silence Lightning's notices and warnings that do not concern a care user, here alone.

    Filters, not log levels: Lightning sets its loggers' level when it is imported, and a real
    warning still shows. Filters on the named loggers hold whenever Lightning is imported.
    """
    notices = _DropNotices()
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(notices)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predefined tensorboard.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # resume writes there
    warnings.filterwarnings("ignore", message=".*The `srun` command is available.*")
    os.environ.setdefault("POSSIBLE_USER_WARNINGS", "off")


def _pretrain(args: argparse.Namespace) -> int:
    from care.config import load_config, to_yaml
    from care.distributed import is_global_zero
    from care.hardware import resolve
    from care.methods import method_class
    from care.runs import RunDir
    from care.train import pretrain
    from care.train.pretraining import FinishedRun

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        method_class(cfg)  # the config must be one the method can train
        print(to_yaml(resolve(cfg)), end="")  # auto settings as this machine resolves them
        return 0

    try:
        run = pretrain(cfg)
    except RunInterrupted:
        if is_global_zero():  # main() then prints where it stopped
            _say_how_to_continue(RunDir(cfg.out), args.argv)
        raise
    if is_global_zero():
        _say_what_was_written(run, finished_before=isinstance(run, FinishedRun))
    return 0


def _say_what_was_written(run: RunDir, *, finished_before: bool = False) -> None:
    """A finished pretraining: the files of its run directory, how it went, what to run next.
    ``finished_before``: the run had finished earlier and nothing was trained or written now."""
    from care.methods import method_class
    from care.progress import clock_text

    summary = json.loads(run.summary.read_text())
    if finished_before:
        epochs = summary["epochs"]
        print(
            f"{run.root} already finished its {epochs} epochs: nothing trained, no file changed "
            f"(to train longer, resume with epochs={epochs + 1} or more)"
        )
    else:
        files = (run.backbone, run.head, run.last_checkpoint, run.best_checkpoint, run.metrics)
        names = [str(p.relative_to(run.root)) for p in (*files, run.summary) if p.is_file()]
        print(f"run written to {run.root}: {', '.join(names)}")
    took = f"{summary['epochs']} epochs, {summary['steps']} steps in "
    took += clock_text(summary["wall_time_s"])
    if summary.get("images_per_s"):
        took += f" ({summary['images_per_s']:,.0f} images/s)"
    knn = summary.get("final_knn_acc_percent")
    if knn is not None:
        took += (
            f"; online kNN {knn:.2f}% (bank {summary['knn_bank_size']:,} training images, "
            f"{summary['knn_test_size']:,} test images)"
        )
    print(took)
    root = shlex.quote(str(run.root))
    cfg = run.read_config()
    if method_class(cfg).uses_groups:
        equivariance = f"care equivariance {root} --against SIMCLR_RUN"
        why = "against a method=simclr run of the same config"
    else:
        equivariance, why = f"care equivariance {root}", "how equivariant the embeddings are"
    steps = [
        (f"care probe {root}", "linear probe and kNN on the whole train split"),
        (equivariance, why),
        (
            f"care embed {root} out={shlex.quote(str(run.root / 'embeddings.safetensors'))}",
            "the test split's embeddings and labels",
        ),
    ]
    width = max(len(command) for command, _ in steps)
    print("next:")
    for command, what in steps:
        print(f"  {command:<{width}}  # {what}")


def _say_how_to_continue(run: RunDir, argv: Sequence[str]) -> None:
    """An interrupted pretraining: what it saved and the command line that continues it."""
    checkpoint = run.last_checkpoint
    if checkpoint.is_file():
        print(f"saved {checkpoint} (and {run.metrics.name})", file=sys.stderr)
    kept = [a for a in argv if not a.startswith("resume=")]
    print(f"continue with: care {shlex.join([*kept, 'resume=true'])}", file=sys.stderr)


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
        print(f"wrote {r['file']}")
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
    from rich.table import Table

    from care.evaluate.probe import report_console

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
    report_console().print(table)
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


def _embed(args: argparse.Namespace) -> int:
    from care.evaluate.embed import embed_command, result_line

    options: dict[str, object] = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            raise CareError(f"bad argument '{item}': write settings as key=value, e.g. split=train")
        if key in ("batch_size", "neighbours"):
            if not value.isdigit():
                raise CareError(f"bad value for '{key}': {value!r}; give a whole number")
            options[key] = int(value)
        elif key in ("dataset", "data_root", "split", "layer", "out", "precision"):
            options[key] = value
        else:
            raise CareError(
                f"unknown setting '{key}': use out, dataset, data_root, split, layer, batch_size, "
                "neighbours or precision"
            )
    out = options.pop("out", None)
    if not out:
        raise CareError("no output file: add out=FILE.safetensors (or out=FILE.npz, out=FILE.npy)")
    result = embed_command(args.run, str(out), **options)  # type: ignore[arg-type]
    print(result_line(result))
    return 0


def _show_augment(args: argparse.Namespace) -> int:
    from care.evaluate.show_augment import show_augment_command

    out, grid = show_augment_command(args.config, args.items)
    print(
        f"wrote {out}: {grid.groups} groups, {grid.per_group} images of each shown; in each row "
        "a_g and a'_g must apply one augmentation to every image, InfoNCE's views one per image"
    )
    options = ("out=", "groups=", "per_group=", "pick=")
    kept = [a for a in args.items if not a.startswith(options)]
    config = ["--config", args.config] if args.config else []
    command = shlex.join(["pretrain", *config, *kept, "out=RUN_DIR"])
    print(f"next: care {command}  # pretrain with this recipe")
    return 0


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
        "precision=32|bf16-mixed|16-mixed (default: the run's, where this machine runs it natively) "
        "batch_size=256 (images read, augmented and embedded at a time)",
    )
    equi.set_defaults(handler=_equivariance)

    embed = commands.add_parser(
        "embed",
        help="embeddings and labels of a dataset split, and a nearest-neighbour grid",
        description="Embed a split of the run's dataset (or of another one care reads, image "
        "folders included) with the run's encoder, evaluation transform inside, on the "
        "accelerator; write the embeddings and labels to out=FILE by its extension: "
        ".safetensors (tensors embeddings and labels, metadata naming the run, layer, dataset "
        "and split), .npz (arrays embeddings and labels) or .npy (the embeddings; the labels "
        "in FILE.labels.npy beside it). neighbours=K also writes FILE.neighbours.png: 8 query "
        "images and their K nearest neighbours by cosine similarity.",
    )
    embed.add_argument("run", metavar="RUN_DIR")
    embed.add_argument(
        "settings",
        nargs="*",
        metavar="key=value",
        help="out=FILE (required) dataset=NAME data_root=DIR (default: the run's) "
        "split=test|train|pretrain layer=backbone|projection batch_size=256 neighbours=K "
        "precision=32|bf16-mixed|16-mixed (default: the run's, where this machine runs it natively)",
    )
    embed.set_defaults(handler=_embed)

    show = commands.add_parser(
        "show-augment",
        help="real images under the configured augmentation, group by group → a PNG",
        description="A grid of pretraining images under the config's augmentation recipe, as "
        "the first training step draws it: one row per group, its group-shared views a_g and "
        "a'_g (one augmentation for the whole group) and InfoNCE's views (one per image), with "
        "each group's parameters beside it.",
    )
    show.add_argument("--config", help="YAML preset, e.g. configs/fashion-mnist.yaml")
    show.add_argument(
        "items",
        nargs="*",
        metavar="key=value",
        help="out=FILE.png (required), groups=4 (rows), per_group=4 (images shown per group), "
        "pick=first|random (seeded by seed), and any config key, e.g. dataset=cifar10 "
        "data_root=DIR group_size=16 crop_min_scale=0.2",
    )
    show.set_defaults(handler=_show_augment)

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
    if extra:  # settings after an option, e.g. `care pretrain lr=1e-3 --print-config out=x`
        positional = {
            "pretrain": "overrides",
            "probe": "items",
            "equivariance": "settings",
            "embed": "settings",
            "ablate": "overrides",
            "show-augment": "items",
        }.get(args.command)
        if positional is None or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, positional, getattr(args, positional) + extra)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to repeat it: resume=true
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
