"""Images/s of `care pretrain` on 1 process and on 2 DDP processes (gloo) on this machine's CPU.

A benchmark script, not a test. It runs real `care pretrain` commands (Fashion-MNIST CPU preset,
online kNN off) at the same *global* batch, and reads the median step time that the run records in
summary.json (rank 0, after warm-up). One process uses all cores as intra-op threads; two processes
split them (one thread each on a 2-core machine) and add a gradient all-reduce and the gathers of
InfoNCE's negatives every step.

    python benchmarks/ddp_cpu.py                        # simclr and care, global batch 256
    python benchmarks/ddp_cpu.py --methods care --steps 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(method: str, devices: int, global_batch: int, steps: int, extra: list[str]) -> dict:
    """One short pretraining; returns its summary.json."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        per_device = global_batch // devices
        command = [
            sys.executable,
            "-m",
            "care",
            "pretrain",
            f"method={method}",
            "accelerator=cpu",
            f"devices={devices}",
            f"strategy={'ddp' if devices > 1 else 'auto'}",
            f"batch_size={per_device}",
            f"train_samples={global_batch * steps}",
            "epochs=1",
            "knn_every=0",
            f"out={out}",
            *extra,
        ]
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)  # Lightning splits the cores between local processes
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
        return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="simclr,care", help="comma-separated methods")
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="steps per run (3 are warm-up)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="extra key=value settings for every run")
    args = parser.parse_args()
    rows = []
    for method in args.methods.split(","):
        for devices in (1, 2):
            summary = run_once(method, devices, args.global_batch, args.steps, args.overrides)
            rows.append(
                {
                    "method": method,
                    "processes": devices,
                    "global_batch": summary["global_batch"],
                    "step_time_s": summary["step_time_s"],
                    "images_per_s": summary["images_per_s"],
                }
            )
            print(
                f"{method:8s} processes={devices} global batch {summary['global_batch']}: "
                f"{summary['step_time_s']:.3f} s/step, {summary['images_per_s']:.0f} img/s",
                flush=True,
            )
    print("\n| method | processes | global batch | step s | img/s | vs 1 process |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        single = next(r for r in rows if r["method"] == row["method"] and r["processes"] == 1)
        ratio = row["images_per_s"] / single["images_per_s"]
        print(
            f"| {row['method']} | {row['processes']} | {row['global_batch']} | "
            f"{row['step_time_s']:.3f} | {row['images_per_s']:.0f} | {ratio:.2f}× |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
