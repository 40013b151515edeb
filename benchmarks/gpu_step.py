"""One training step per method on the GPU: host synchronisations and peak memory; and the
helpers of ``benchmarks/gpu_check.sh`` (environment, a CIFAR-10 folder, the final report).

A benchmark script, not a test. Its subcommands:

    python benchmarks/gpu_step.py step --json step.json --synthetic 3x32 \
        --backbones resnet18,resnet50 --variants simclr,care-separate,care-shared \
        accelerator=gpu precision=bf16-mixed memory_format=channels_last "widths=[64,128,256,512]"
    python benchmarks/gpu_step.py env --json env.json [--require-cuda]
    python benchmarks/gpu_step.py cifar DIR --train 8000 --test 2000
    python benchmarks/gpu_step.py report --out OUT --work WORK

``step`` runs each method's real ``training_step`` through a small Lightning Trainer (the
precision plugin, automatic optimisation, the method's own optimiser and schedule: what a user
gets, less care's logging callbacks). After ``--warmup`` steps, a callback measures ``--measure``
steps, none of them a logging step (``log_every_n_steps`` lies past the run): from the start of
``on_train_batch_start`` to the end of ``on_train_batch_end`` it turns on
``torch.cuda.set_sync_debug_mode("warn")`` and records every warning (``"always"``, so none is
deduplicated); each "called a synchronizing CUDA operation" is one host synchronisation, and the
Python line that caused it is kept. Around the same steps it reads the peak of
``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``). The batch is already on the
device then (Lightning moves it before that hook), so the pinned copy of the batch is not counted.

Then, without Lightning, it compares the peak memory of one step with one backward against the
split backward of ``method.early_backward`` (one backward per pair of views), with a plain SGD
optimiser.

On the CPU (``accelerator=cpu``, as ``GPU_CHECK_SMOKE=1`` runs it) the same code runs, but there is
no sync debug mode and no CUDA memory statistics: those figures are null.

``env``, ``cifar`` and ``report`` import neither torch nor care at the top, so the report is
written even when the environment is broken.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SYNC_MESSAGE = "synchronizing cuda operation"
"""What torch's sync debug mode warns, lower-cased: 'called a synchronizing CUDA operation'."""
GIB = 2**30
PHASES = ("augment", "forward", "loss", "backward")  # as benchmarks/throughput.py times them

# ------------------------------------------------------------------------ counting host syncs


def short_location(filename: str, lineno: int) -> str:
    """``<checkout>/src/care/methods/base.py:123`` → ``src/care/methods/base.py:123`` (relative to
    this checkout, whatever its folder is called); ``.../site-packages/torch/x.py:5`` →
    ``torch/x.py:5``."""
    path = Path(filename).resolve()
    if path.is_relative_to(ROOT):
        return f"{path.relative_to(ROOT).as_posix()}:{lineno}"
    parts = path.parts
    for anchor in ("care", "lightning", "torch"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return f"{'/'.join(parts[i:])}:{lineno}"
    return f"{'/'.join(parts[-2:])}:{lineno}"


class SyncCounter:
    """Counts the host synchronisations torch reports between :meth:`start` and :meth:`stop`.

    Under ``torch.cuda.set_sync_debug_mode("warn")`` every synchronising CUDA call (a
    device-to-host copy, ``.item()``, ``bool(tensor)``, ``torch.cuda.synchronize``, a pageable
    host-to-device copy) issues a ``UserWarning``. Warnings are recorded with the ``"always"``
    filter, so repeated ones at the same line are all counted, whatever filters were set before;
    other warnings are counted apart. ``cuda=False`` records warnings only (no debug mode).
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._catcher: warnings.catch_warnings | None = None
        self._records: list[warnings.WarningMessage] = []

    @property
    def active(self) -> bool:
        return self._catcher is not None

    def start(self) -> None:
        if self.active:
            return
        self._catcher = warnings.catch_warnings(record=True)
        records = self._catcher.__enter__()  # the live list the warnings are appended to
        self._records = records if records is not None else []
        warnings.simplefilter("always")
        if self.cuda:
            import torch

            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> dict[str, Any]:
        """``{"syncs": N, "where": {location: count}, "other_warnings": M}`` since :meth:`start`."""
        if self.cuda:
            import torch

            torch.cuda.set_sync_debug_mode(0)
        if self._catcher is not None:
            self._catcher.__exit__(None, None, None)
            self._catcher = None
        syncs = [w for w in self._records if SYNC_MESSAGE in str(w.message).lower()]
        where = Counter(short_location(w.filename, w.lineno) for w in syncs)
        result = {
            "syncs": len(syncs),
            "where": dict(where.most_common()),
            "other_warnings": len(self._records) - len(syncs),
        }
        self._records = []
        return result


def step_probe(first: int, count: int, cuda: bool, log_every: int) -> Any:
    """A Lightning callback that measures the steps ``first .. first + count - 1``: syncs,
    peak memory and wall time of each (a list of dicts in ``.steps``)."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class StepProbe(Callback):
        def __init__(self) -> None:
            self.counter = SyncCounter(cuda)
            self.steps: list[dict[str, Any]] = []
            self._current: dict[str, Any] | None = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
            step = trainer.global_step
            if not first <= step < first + count:
                return
            connector = getattr(trainer, "_logger_connector", None)
            logging = getattr(connector, "should_update_logs", None)
            record: dict[str, Any] = {
                "step": step,
                "logging_step": None if logging is None else bool(logging),
                "log_every_n_steps": log_every,
            }
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                record["resident_bytes"] = torch.cuda.memory_allocated()
            self._current = record
            record["t0"] = time.perf_counter()
            self.counter.start()  # last: the measurement's own syncs above are not counted

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            record = self._current
            if record is None:
                return
            record.update(self.counter.stop())  # first: the syncs below are not counted
            if cuda:
                torch.cuda.synchronize()
                record["peak_bytes"] = torch.cuda.max_memory_allocated()
            record["step_s"] = time.perf_counter() - record.pop("t0")
            self.steps.append(record)
            self._current = None

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if self.counter.active:
                self.counter.stop()
            self._current = None

    return StepProbe()


# ----------------------------------------------------------------------------- the step


def _tools() -> Any:
    """benchmarks/throughput.py, for the config and method set-up it shares."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import throughput

    return throughput


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def trainer_steps(
    overrides: list[str], synthetic: tuple[int, int], warmup: int, measure: int
) -> dict[str, Any]:
    """``warmup + measure + 1`` real training steps in a Lightning Trainer; the measured ones."""
    import lightning as L
    import torch

    from care.data import EpochSampler, TensorImages, make_loader
    from care.hardware import configure_backends, device_type, resolve
    from care.methods import build_method

    tp = _tools()
    cfg0 = tp.load_config(None, overrides)
    device = torch.device(device_type(cfg0.accelerator))
    cfg = resolve(tp.load_config(None, overrides))
    channels, size = synthetic
    info = tp.synthetic_info(channels, size)
    steps = warmup + measure + 1  # the last step may log (should_stop): it is not measured
    gen = torch.Generator().manual_seed(0)
    n = cfg.batch_size * steps
    images = TensorImages(
        torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8),
        torch.arange(n) % 10,
        name="synthetic",
        num_classes=10,
        mean=info.mean,
        std=info.std,
    )
    L.seed_everything(cfg.seed, verbose=False)
    configure_backends(cfg)
    method = build_method(cfg, info)
    cuda = device.type == "cuda"
    log_every = steps + 100  # no measured step is a logging step
    probe = step_probe(warmup, measure, cuda, log_every)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=cfg.precision,  # type: ignore[arg-type]
        logger=False,
        callbacks=[probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=log_every,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        benchmark=cfg.cudnn_benchmark if cuda else None,
    )
    sampler = EpochSampler(len(images), cfg.seed)
    trainer.fit(method, make_loader(images, cfg, sampler))
    measured = probe.steps
    result: dict[str, Any] = {
        "precision": cfg.precision,
        "memory_format": cfg.memory_format,
        "steps": measured,
        "sync_debug": cuda,
    }
    if measured:
        result["step_s"] = statistics.median(s["step_s"] for s in measured)
        result["images_per_s"] = cfg.batch_size / result["step_s"]
        if cuda:
            result["syncs_per_step"] = statistics.median(s["syncs"] for s in measured)
            result["peak_bytes"] = max(s["peak_bytes"] for s in measured)
            result["resident_bytes"] = min(s["resident_bytes"] for s in measured)
    del trainer, method, probe
    return result


def manual_peaks(overrides: list[str], synthetic: tuple[int, int], warmup: int) -> dict[str, Any]:
    """Peak memory of a step with one backward against the split backward of
    ``method.early_backward`` (plain loop, SGD), each after ``warmup`` steps of its own."""
    import torch

    from care.hardware import autocast_for, configure_backends, device_type, resolve
    from care.methods import build_method

    tp = _tools()
    device = torch.device(device_type(tp.load_config(None, overrides).accelerator))
    cfg = resolve(tp.load_config(None, overrides))
    channels, size = synthetic
    info = tp.synthetic_info(channels, size)
    configure_backends(cfg)
    method = build_method(cfg, info).to(device).train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    shape = (cfg.batch_size, channels, size, size)
    batch = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)
    modes = {"one_backward": None, "early_backward": method.early_backward}
    cuda = device.type == "cuda"
    result: dict[str, Any] = {}
    for mode, early in modes.items():
        peak = None
        for i in range(warmup + 1):
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            views = method.make_views(batch, torch.Generator().manual_seed(i))
            with autocast_for(cfg.precision, device):
                if early is None:
                    loss = method.compute_losses(views)["loss"]
                else:
                    with early(lambda part: part.backward()):
                        loss = method.compute_losses(views)["loss"]
            loss.backward()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            del views, loss
        result[f"{mode}_peak_bytes"] = peak
    del method, optimizer, batch
    return result


def step_command(args: argparse.Namespace) -> int:
    import torch

    tp = _tools()
    synthetic = tp.parse_shape(args.synthetic)
    variants = tp.select_variants(args.variants)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    results: dict[str, dict[str, Any]] = {}
    failures = 0
    payload = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "torch": torch.__version__,
        "overrides": args.overrides,
        "synthetic": args.synthetic,
        "warmup": args.warmup,
        "measure": args.measure,
        "results": results,
    }
    for backbone in backbones:
        results[backbone] = {}
        for name, variant in variants.items():
            overrides = [*args.overrides, f"backbone={backbone}", *variant]
            entry: dict[str, Any] = {}
            for part, run in (
                (
                    "trainer",
                    lambda o=overrides: trainer_steps(o, synthetic, args.warmup, args.measure),
                ),
                ("manual", lambda o=overrides: manual_peaks(o, synthetic, args.warmup)),
            ):
                started = time.perf_counter()
                try:
                    entry[part] = run()
                except Exception as exc:  # one failing method must not stop the others
                    failures += 1
                    entry[part] = {"error": _last_line(exc)}
                    print(f"{backbone} {name} {part}: FAILED {_last_line(exc)}", file=sys.stderr)
                entry[part]["seconds"] = time.perf_counter() - started
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            results[backbone][name] = entry
            trainer = entry["trainer"]
            print(
                f"{backbone} | {name} | syncs/step {trainer.get('syncs_per_step')} | "
                f"peak {_gib(trainer.get('peak_bytes'))} | step {trainer.get('step_s')}"
            )
            if args.json:  # after every method: a run stopped at its time limit keeps the rest
                Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failures else 0


# -------------------------------------------------------------------------- environment


def env_command(args: argparse.Namespace) -> int:
    """What the machine has, and whether care imports; ``--require-cuda`` fails without a GPU."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable}
    problems: list[str] = []
    try:
        import torch

        from care.hardware import cuda_has_native_bf16

        info.update(
            torch=torch.__version__,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cuda_available=torch.cuda.is_available(),
        )
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                gpu=props.name,
                gpu_memory_gib=round(props.total_memory / GIB, 1),
                capability=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count,
                bf16=cuda_has_native_bf16(),
            )
    except Exception as exc:
        problems.append(f"torch: {_last_line(exc)}")
    try:
        query = "--query-gpu=driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
        done = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if done.returncode == 0:
            info["nvidia_smi"] = done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("lightning", "omegaconf"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    if args.imports:
        import importlib

        for module in ("omegaconf", "lightning"):
            try:
                importlib.import_module(module)
            except Exception as exc:
                problems.append(f"{module}: {_last_line(exc)}")
        try:
            importlib.import_module("care.methods")
            importlib.import_module("care.cli")
        except Exception as exc:
            problems.append(f"care: {_last_line(exc)}")
    if args.require_cuda and not info.get("cuda_available"):
        problems.append("no CUDA device that torch can use")
    info["problems"] = problems
    Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


# ---------------------------------------------------------------------- a CIFAR-10 folder


def tinted_images(n: int, seed: int) -> tuple[Any, list[int]]:
    """``n`` 32 px RGB images whose class shows in their tint and stripes, and their labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    palette = np.random.default_rng(1234).integers(40, 216, size=(10, 3))
    yy, xx = np.mgrid[0:32, 0:32]
    stripes = np.stack(
        [30 * np.sin(2 * np.pi * (1 + c % 5) * (xx if c < 5 else yy) / 32) for c in range(10)]
    )
    pixels = (
        palette[labels][:, :, None, None]
        + stripes[labels][:, None]
        + rng.normal(0, 25, (n, 3, 32, 32))
    )
    return np.clip(pixels, 0, 255).astype(np.uint8), [int(y) for y in labels]


def cifar_command(args: argparse.Namespace) -> int:
    """CIFAR-10's python pickle batches (5 training batches and the test batch) in DIR."""
    sys.path.insert(0, str(ROOT))
    from tests.data.writers import cifar_batch, py2_pickle

    folder = Path(args.dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    per_batch = math.ceil(args.train / 5)
    batches = [(f"data_batch_{i + 1}", per_batch, i) for i in range(5)]
    for name, n, seed in [*batches, ("test_batch", args.test, 99)]:
        images, labels = tinted_images(n, seed)
        (folder / name).write_bytes(py2_pickle(cifar_batch(images, labels)))
    print(f"wrote {5 * per_batch} training and {args.test} test images to {folder}")
    return 0


# ------------------------------------------------------------------------------- the report


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f} GiB"


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ERROR = re.compile(r"(\w*(Error|Exception)\b|^error:|FAILED|Killed|Traceback)")


def last_error_line(log: Path) -> str:
    """The last line of ``log`` that names an error, else its last non-empty line."""
    try:
        text = _ANSI.sub("", log.read_text(errors="replace"))
    except OSError:
        return "(no log)"
    lines = [line.split("\r")[-1].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if _ERROR.search(line) and not line.startswith("Traceback"):
            return line[:300]
    return lines[-1][:300] if lines else "(empty log)"


def read_parts(work: Path) -> dict[str, dict[str, Any]]:
    """parts.tsv as gpu_check.sh writes it: name, status (exit code or skipped), ms, limit."""
    parts: dict[str, dict[str, Any]] = {}
    tsv = work / "parts.tsv"
    if not tsv.is_file():
        return parts
    for line in tsv.read_text().splitlines():
        name, status, ms, limit, *_ = [*line.split("\t"), "", "", ""]
        part: dict[str, Any] = {"status": status, "seconds": int(ms or 0) / 1000, "limit_s": limit}
        if status == "0":
            part["ok"] = True
        else:
            part["ok"] = False
            if status == "skipped":
                part["error"] = "SKIPPED: no time left in the budget"
            elif status.startswith("skipped:"):
                part["error"] = f"SKIPPED: {status.partition(':')[2]}"
            elif status in ("124", "137"):
                part["error"] = f"FAILED: timed out after {limit} s"
            else:
                error = last_error_line(work / "logs" / f"{name}.log")
                part["error"] = f"FAILED (exit {status}): {error}"
        parts[name] = part
    return parts


def junit_summary(path: Path) -> dict[str, Any] | None:
    """Counts, skip reasons and failed test ids of a pytest junit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = root.iter("testcase")
    summary: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    reasons: Counter[str] = Counter()
    seconds = 0.0
    for case in cases:
        seconds += float(case.get("time") or 0)
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            summary["failed"] += 1
            summary["failures"].append(test_id)
        elif case.find("skipped") is not None:
            summary["skipped"] += 1
            message = case.find("skipped").get("message") or ""  # type: ignore[union-attr]
            reasons[message.rpartition(": ")[2] or message] += 1
        else:
            summary["passed"] += 1
    summary["skip_reasons"] = dict(reasons)
    summary["seconds"] = seconds
    return summary


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def report_rows(
    out: Path, work: Path, parts: dict[str, dict[str, Any]], smoke_run: bool = False
) -> list[tuple[str, ...]]:
    """The rows (part, item, result) of the table."""
    env = _load(work / "env.json") or {}
    rows: list[tuple[str, ...]] = []
    smoke = "none (CPU smoke run)" if smoke_run else "none: torch sees no CUDA device"
    gpu = env.get("gpu") or smoke
    if env.get("gpu"):
        gpu += f", {env.get('gpu_memory_gib')} GiB, {env.get('multiprocessors')} SMs, sm_{str(env.get('capability', '')).replace('.', '')}"
    if env.get("nvidia_smi"):
        gpu += f" (driver, SM clock, max clock, temp, power: {env['nvidia_smi']})"
    rows.append(("machine", "GPU", gpu))
    rows.append(
        (
            "machine",
            "torch",
            f"{env.get('torch', '?')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), "
            f"lightning {env.get('lightning', '?')}, Python {env.get('python', '?')}",
        )
    )

    def failed(name: str) -> str | None:
        part = parts.get(name)
        if part is None:
            return "FAILED: did not run"
        return None if part["ok"] else str(part["error"])

    if (error := failed("setup")) is not None:
        rows.append(("0 setup", "venv, wheels, imports", error))

    # 1. tests
    tests = junit_summary(work / "tests.xml")
    files = (
        (work / "test_files.txt").read_text().split() if (work / "test_files.txt").is_file() else []
    )
    item = ", ".join(files) or "CUDA-marked tests"
    if tests is None:
        rows.append(("1 tests", item, failed("tests") or "no test report"))
    else:
        skips = ", ".join(f"{n}× {r!r}" for r, n in tests["skip_reasons"].items())
        text = f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
        text += f" ({skips})" if skips else ""
        if "tests" in parts:
            text += f", {parts['tests']['seconds']:.0f} s"
        if tests["failed"] or failed("tests"):
            text = f"FAILED: {text}: {', '.join(tests['failures'][:5])}"
            if not tests["failed"]:
                text += f" {failed('tests')}"
        rows.append(("1 tests", item, text))

    # 2. throughput
    for backbone in ("resnet18", "resnet50"):
        name = f"throughput_{backbone}"
        payload = _load(out / f"{name}.json")
        if payload is None:
            rows.append(("2 throughput", backbone, failed(name) or "FAILED: no results"))
            continue
        config = payload.get("config", {})
        setting = (
            f"batch {config.get('batch_size')}, precision {config.get('precision')}, "
            f"{config.get('memory_format')}, images {config.get('images')}"
        )
        results = payload["results"]
        base = results.get("simclr", {}).get("unsynced_step")
        for variant, r in results.items():
            shares = " ".join(
                f"{label} {_percent(r[k] / r['step'])}"
                for label, k in zip(("aug", "fwd", "loss", "bwd"), PHASES, strict=True)
            )
            vs = f", {r['unsynced_step'] / base:.2f}× simclr" if base else ""
            rows.append(
                (
                    "2 throughput",
                    f"{backbone} {variant}",
                    f"{r['unsynced_images_per_s']:,.0f} img/s, {1000 * r['unsynced_step']:.1f} ms/step"
                    f"{vs} ({setting}; phases, synced: {shares}; backbone alone "
                    f"{1000 * r['backbone_only']:.1f} ms; split backward "
                    f"{'yes' if r.get('early_backward') else 'no'})",
                )
            )

    # 3 and 4. syncs and peak memory
    step = _load(out / "gpu_step.json")
    if step is None:
        rows.append(("3 syncs", "gpu_step.py", failed("gpu_step") or "FAILED: no results"))
    else:
        for backbone, variants in step["results"].items():
            for variant, entry in variants.items():
                trainer, manual = entry.get("trainer", {}), entry.get("manual", {})
                label = f"{backbone} {variant}"
                if "error" in trainer:
                    rows.append(("3 syncs", label, f"FAILED: {trainer['error']}"))
                    rows.append(("4 peak memory", label, f"FAILED: {trainer['error']}"))
                    continue
                measured = trainer.get("steps", [])
                if not trainer.get("sync_debug"):
                    syncs = "n/a (no CUDA: no sync debug mode)"
                else:
                    counts = ", ".join(str(s["syncs"]) for s in measured)
                    where: Counter[str] = Counter()
                    for s in measured:
                        where.update(s.get("where", {}))
                    top = ", ".join(
                        f"{loc} ×{n / max(1, len(measured)):g}" for loc, n in where.most_common(4)
                    )
                    logging = {s.get("logging_step") for s in measured}
                    syncs = (
                        f"{trainer.get('syncs_per_step')} per step (steps "
                        f"{', '.join(str(s['step']) for s in measured)}: {counts}; logging step: "
                        f"{'/'.join(map(str, sorted(logging, key=str)))})"
                        + (f"; from {top}" if top else "")
                    )
                step_ms = trainer.get("step_s")
                if step_ms is not None:
                    syncs += f"; Trainer step {1000 * step_ms:.1f} ms"
                rows.append(("3 syncs", label, syncs))
                if not trainer.get("sync_debug"):
                    memory = "n/a (no CUDA memory statistics)"
                else:
                    memory = (
                        f"{_gib(trainer.get('peak_bytes'))} peak in the Trainer step "
                        f"({_gib(trainer.get('resident_bytes'))} resident before it)"
                    )
                    if "error" in manual:
                        memory += f"; plain loop FAILED: {manual['error']}"
                    else:
                        memory += (
                            f"; plain loop, one backward {_gib(manual.get('one_backward_peak_bytes'))}"
                            f", early_backward {_gib(manual.get('early_backward_peak_bytes'))}"
                        )
                rows.append(("4 peak memory", label, memory))
        if failed("gpu_step") and not any(
            "FAILED" in r[2] for r in rows if r[0] in ("3 syncs", "4 peak memory")
        ):
            rows.append(("3 syncs", "gpu_step.py", str(failed("gpu_step"))))

    # 5. pretrain and probe
    run = work / "run"
    # care probe names its file by its settings (probe.json for the run's own, probe-<...>.json
    # for the check's shorter ones): the newest of them is the check's
    probes = sorted(run.glob("probe*.json"), key=lambda path: path.stat().st_mtime)
    summary, probe = _load(run / "summary.json"), _load(probes[-1]) if probes else None
    if (error := failed("data")) is not None:
        rows.append(("5 data", "CIFAR-10 folder (gpu_step.py cifar)", error))
    merged = {"summary": summary, "probe": probe}
    (out / "pretrain.json").write_text(json.dumps(merged, indent=2) + "\n")
    if summary is None:
        rows.append(
            ("5 pretrain", "care pretrain", failed("pretrain") or "FAILED: no summary.json")
        )
    else:
        knn = summary.get("final_knn_acc_percent")
        bank = summary.get("knn_bank_size")
        knn_text = "n/a" if knn is None else f"{knn:.1f}% (bank {bank})"
        ips = summary.get("images_per_s")
        rows.append(
            (
                "5 pretrain",
                f"{summary.get('method')} ({summary.get('views')} views), "
                f"{summary.get('train_images')} images, {summary.get('epochs')} epochs",
                f"{'n/a' if ips is None else f'{ips:,.0f}'} img/s (median step "
                f"{1000 * summary.get('step_time_s', float('nan')):.1f} ms), wall "
                f"{summary.get('wall_time_s', float('nan')):.1f} s, precision {summary.get('precision')}, "
                f"online kNN {knn_text}"
                + (f"; {failed('pretrain')}" if failed("pretrain") else ""),
            )
        )
    if probe is None:
        rows.append(("5 probe", "care probe", failed("probe") or "FAILED: no probe*.json"))
    else:
        linear = probe["linear"]
        rows.append(
            (
                "5 probe",
                f"{probe['features']['train']} train / {probe['features']['test']} test features",
                f"kNN {probe['knn']['accuracy']:.1f}%, linear {linear['mean']:.1f}% "
                f"± {linear['std']:.1f} ({len(linear['per_seed'])} seeds, {linear['epochs']} epochs)",
            )
        )
    timing = ", ".join(f"{name} {p['seconds']:.0f} s" for name, p in parts.items())
    rows.append(("time", "per part", timing))
    return rows


def report_command(args: argparse.Namespace) -> int:
    out, work = Path(args.out), Path(args.work)
    parts = read_parts(work)
    try:
        rows = report_rows(out, work, parts, args.smoke)
    except Exception as exc:  # the table must come out, whatever broke
        rows = [("report", "gpu_step.py report", f"FAILED: {_last_line(exc)}")]
    title = f"# gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')}" + (
        " (CPU smoke run)" if args.smoke else ""
    )
    lines = [title, "", "| part | item | result |", "|---|---|---|"]
    for part, item, result in rows:
        cells = (c.replace("|", "/").replace("\n", " ") for c in (part, item, result))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(table)
    tests = junit_summary(work / "tests.xml")
    payload = {"env": _load(work / "env.json"), "parts": parts, "tests": tests, "rows": rows}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(table, end="")
    return 0 if all(p["ok"] for p in parts.values()) else 1


# ------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    step = commands.add_parser("step", help="syncs and peak memory of one step per method")
    step.add_argument("overrides", nargs="*", metavar="key=value")
    step.add_argument("--json", help="write the results here")
    step.add_argument("--synthetic", default="3x32", metavar="CxS", help="random images (3x32)")
    step.add_argument("--backbones", default="resnet18", help="comma-separated (resnet18)")
    step.add_argument("--variants", default="simclr,care-separate,care-shared")
    step.add_argument("--warmup", type=int, default=3, help="steps before the measured ones")
    step.add_argument("--measure", type=int, default=3, help="measured steps")
    step.set_defaults(handler=step_command)
    env = commands.add_parser("env", help="the machine, torch and whether care imports")
    env.add_argument("--json", required=True)
    env.add_argument(
        "--imports", action="store_true", help="also import omegaconf, lightning, care"
    )
    env.add_argument("--require-cuda", action="store_true")
    env.set_defaults(handler=env_command)
    cifar = commands.add_parser("cifar", help="write a CIFAR-10 folder of tinted images")
    cifar.add_argument("dir")
    cifar.add_argument("--train", type=int, default=8000)
    cifar.add_argument("--test", type=int, default=2000)
    cifar.set_defaults(handler=cifar_command)
    report = commands.add_parser("report", help="the table of gpu_check.sh")
    report.add_argument("--out", required=True)
    report.add_argument("--work", required=True)
    report.add_argument("--smoke", action="store_true")
    report.set_defaults(handler=report_command)
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides between the options of step: `step --json F key=value --measure 3 k=v`
        if args.command != "step" or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    os.environ.setdefault("POSSIBLE_USER_WARNINGS", "off")  # Lightning's hints, not ours
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
