"""The memory estimate of `care pretrain` against the peak RSS of real runs (CPU).

Each case runs `care pretrain` in a fresh process for two steps (the online kNN monitor off) and
reads its peak resident set size from the kernel (``ru_maxrss`` of the child), next to the
estimate of :func:`care.train.memory.estimate_step_memory` for the same config. An image folder
of tinted Fashion-MNIST images (the Debian package ``dataset-fashion-mnist``) is written at
each side first.

    python benchmarks/step_memory.py                      # the default cases
    python benchmarks/step_memory.py --sides 64 128 --batch 64 --methods care simclr

The estimate should lie above the measured peak (a refusal must never be needed to avoid the
kernel's OOM killer) and not far above it (a run that fits must not be refused).
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from care.config import load_config
from care.data import data_info, load_split
from care.hardware import resolve
from care.train.memory import GIB, estimate_step_memory

FASHION = Path("/usr/share/datasets/fashion-mnist")
TINTS = np.array([[1, 0.5, 0.2], [0.2, 1, 0.5], [0.5, 0.2, 1], [1, 1, 0.3], [0.3, 1, 1]])


def write_folder(root: Path, count: int, side: int) -> None:
    """``count`` training and ``count // 4`` validation JPEGs of ``side`` px in 5 classes."""
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as handle:
        raw = handle.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    for split, n, offset in (("train", count, 0), ("val", max(5, count // 4), count)):
        for i in range(offset, offset + n):
            label = i % len(TINTS)
            rgb = (images[i][..., None] * TINTS[label]).astype(np.uint8)
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR).save(
                folder / f"{i}.jpg", quality=90
            )


#: Runs ``care`` in a child and prints the child's peak RSS (KiB), so that each case is measured
#: alone (``RUSAGE_CHILDREN`` of this process would keep the largest earlier peak).
_WRAPPER = (
    "import resource, subprocess, sys; "
    "done = subprocess.run([sys.executable, '-m', 'care.cli', *sys.argv[1:]], "
    "stdout=subprocess.DEVNULL); "
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss(args: list[str]) -> tuple[int, int]:
    """(exit status, peak RSS in bytes) of ``care ARGS`` in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "CARE_PROGRESS_S": "3600"},
        check=True,
    )
    status, kib = done.stdout.split()
    if status != "0":
        print("  " + (done.stderr.strip().splitlines() or ["?"])[-1])
    return int(status), int(kib) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 96, 128])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["care", "simclr"])
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value settings")
    args = parser.parse_args()
    print(
        f"CPU: {'avx512_bf16' if 'avx512_bf16' in Path('/proc/cpuinfo').read_text() else 'no avx512_bf16'}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[tuple[str, list[str]]] = []
        for method in args.methods:
            cases.append(
                (
                    f"fashion-mnist 28 px {method}",
                    [
                        "--config",
                        "configs/fashion-mnist.yaml",
                        f"method={method}",
                        f"train_samples={2 * args.batch}",
                    ],
                )
            )
        for side in args.sides:
            root = Path(tmp) / f"folder{side}"
            write_folder(root, 2 * args.batch, side)
            for method in args.methods:
                cases.append(
                    (
                        f"imagefolder {side} px {method}",
                        [
                            "dataset=imagefolder",
                            f"data_root={root}",
                            f"image_size={side}",
                            f"load_size={side}",
                            f"method={method}",
                        ],
                    )
                )
        for label, settings in cases:
            out = Path(tmp) / "run"
            settings = [
                *settings,
                f"batch_size={args.batch}",
                "epochs=1",
                "knn_every=0",
                "loggers=[csv]",
                *args.extra,
            ]
            if "--config" in settings:
                path = settings[settings.index("--config") + 1]
                overrides = [s for s in settings if "=" in s]
            else:
                path, overrides = None, settings
            cfg = resolve(load_config(path, overrides))
            images = load_split(cfg, "pretrain")
            estimate = estimate_step_memory(cfg, data_info(cfg, images), images.image_shape[-1])
            status, peak = peak_rss(["pretrain", *settings, f"out={out}"])
            subprocess.run(["rm", "-rf", str(out)], check=True)
            rows.append((label, cfg.precision, estimate.total, peak, status))
            print(
                f"{label}: estimate {estimate.total / GIB:.2f} GiB, peak RSS {peak / GIB:.2f} GiB"
            )
    print(
        f"\n| run (batch {args.batch}) | precision | estimate GiB | peak RSS GiB | estimate ÷ peak |"
    )
    print("|---|---|---|---|---|")
    for label, precision, estimate_bytes, peak, status in rows:
        ratio = estimate_bytes / peak if peak else float("nan")
        failed = "" if status == 0 else f" (exit {status})"
        print(
            f"| {label}{failed} | {precision} | {estimate_bytes / GIB:.2f} | {peak / GIB:.2f} | "
            f"{ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
