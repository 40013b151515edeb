"""How many training steps a kill at a random moment loses, with and without mid-epoch checkpoints.

A benchmark script, not a test. Each trial starts a real `care pretrain` (the CPU preset on the
real Fashion-MNIST, scaled down by the settings below), draws a step uniformly at random, waits
until the progress lines (one per step here: ``CARE_PROGRESS_S=0``) show it done, and stops the
run: with SIGKILL (nothing is saved at the kill: the run falls back to its last checkpoint) or with
SIGTERM (care finishes the step and checkpoints). The steps kept are those of
``checkpoints/last.ckpt``; lost = steps done at the kill - steps kept. It prints one row per setting, and writes the
trials as JSON.

    python benchmarks/preemption.py                         # 5 trials per setting
    python benchmarks/preemption.py --trials 3 --every 0,10 --out preemption.json
    python benchmarks/preemption.py --trials 1 --every 0 widths=[4,4,8,8]   # key=value: the runs'
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RUN = ["train_samples=2560", "epochs=3", "knn_every=0", "log_every=1", "batch_size=64"]
STEPS_PER_EPOCH = 2560 // 64
PROGRESS = re.compile(r"epoch (\d+)/\d+ step (\d+)/(\d+)")


def trial(
    out: Path, every: int, signum: signal.Signals, rng: random.Random, extra: list[str]
) -> dict[str, int]:
    """One run stopped at a random moment: the steps it had done and the steps it kept."""
    command = [
        sys.executable,
        "-m",
        "care",
        "pretrain",
        *RUN,
        f"checkpoint_every_steps={every}",
        f"out={out}",
        *extra,
    ]
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "CARE_PROGRESS_S": "0"},  # a progress line after every step
        )
        target = rng.randint(1, 3 * STEPS_PER_EPOCH - 1)
        done = 0
        while process.poll() is None and done < target:
            time.sleep(0.02)
            done = steps_done(log.read_text())
        os.killpg(process.pid, signum)
        process.wait()
    checkpoint = out / "checkpoints" / "last.ckpt"
    kept = 0
    if checkpoint.is_file():
        kept = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])
    return {"done": done, "kept": kept, "lost": max(0, done - kept)}


def steps_done(text: str) -> int:
    """Steps finished, from the last progress line (epoch, counted from 1, and step within it)."""
    found = PROGRESS.findall(text)
    if not found:
        return 0
    epoch, step, _ = found[-1]
    return (int(epoch) - 1) * STEPS_PER_EPOCH + int(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--every", default="0,10", help="checkpoint_every_steps values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("preemption.json"))
    parser.add_argument("settings", nargs="*", metavar="key=value", help="more run settings")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    settings = [(int(e), signal.SIGKILL) for e in args.every.split(",")]
    settings.append((int(args.every.split(",")[0]), signal.SIGTERM))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for every, signum in settings:
            for t in range(args.trials):
                out = Path(scratch) / f"e{every}-{signum.name}-{t}"
                row = trial(out, every, signum, rng, args.settings)
                results.append({"every": every, "signal": signum.name, **row})
                print(f"checkpoint_every_steps={every} {signum.name}: {row}", flush=True)
    print(
        f"\n{STEPS_PER_EPOCH} steps per epoch; lost = steps done at the kill - steps in last.ckpt"
    )
    print(f"{'setting':<42} {'lost (each trial)':<24} mean  max")
    for every, signum in settings:
        lost = [r["lost"] for r in results if (r["every"], r["signal"]) == (every, signum.name)]
        name = f"checkpoint_every_steps={every}, {signum.name}"
        print(f"{name:<42} {lost!s:<24} {statistics.fmean(lost):4.1f}  {max(lost)}")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
