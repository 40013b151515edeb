"""Figures (matplotlib, Agg backend): the paper's Figure-2 ablation bars, Figure-3 scatter and
per-kind error plots."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from care.runs import atomic_write_bytes


def figure_png(fig: Figure) -> bytes:
    """A figure as PNG bytes (the figure is closed): a command writes them with the other files
    of its result (:func:`care.runs.atomic_write_files`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def save_figure(fig: Figure, path: Path) -> str:
    """Write a figure as PNG atomically and close it."""
    atomic_write_bytes(path, figure_png(fig))
    return str(path)


def equivariance_figures(
    payload: dict[str, Any], out: Path, stem: str = "equivariance"
) -> dict[Path, bytes]:
    """Figure 3 (compare mode): baseline W_f against this run's W_f per trial, coloured by the
    augmentation's dominant kind, with the diagonal; and W_f ÷ invariance distance per kind.
    Returns the PNGs by the path each belongs at (``OUT/STEM_scatter.png``, ``_by_kind.png``)."""
    results = payload["results"]
    labels = [
        f"{m} ({Path(r).name})" for m, r in zip(payload["methods"], payload["runs"], strict=True)
    ]
    kinds = sorted({t["kind"] for t in results[0]["trials"]})
    colours = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(kinds)}
    written: dict[Path, bytes] = {}
    if len(results) == 2:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, key, title in (
            (axes[0], "wahba_so", "W_f / √n"),
            (axes[1], "wahba_so_ratio", "W_f ÷ invariance distance"),
        ):
            mine = [t[key] for t in results[0]["trials"]]
            base = [t[key] for t in results[1]["trials"]]
            for kind in kinds:
                idx = [i for i, t in enumerate(results[0]["trials"]) if t["kind"] == kind]
                ax.scatter(
                    [base[i] for i in idx],
                    [mine[i] for i in idx],
                    color=colours[kind],
                    label=kind,
                    s=28,
                )
            lo, hi = min(mine + base), max(mine + base)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_xlabel(f"{labels[1]}")
            ax.set_ylabel(f"{labels[0]}")
            ax.set_title(f"{title} per trial", fontsize=10)
        axes[0].legend(fontsize=8)
        fig.suptitle(
            f"Wahba's problem, one augmentation per trial; below the diagonal: "
            f"{labels[0]} is lower",
            fontsize=10,
        )
        written[out / f"{stem}_scatter.png"] = figure_png(fig)
    fig, ax = plt.subplots(figsize=(1.6 * len(kinds) + 3, 4))
    width = 0.8 / len(results)
    for j, (res, label) in enumerate(zip(results, labels, strict=True)):
        for i, kind in enumerate(kinds):
            values = [t["wahba_so_ratio"] for t in res["trials"] if t["kind"] == kind]
            ax.scatter(
                [i + j * width] * len(values),
                values,
                s=18,
                color=f"C{j}",
                label=label if i == 0 else None,
            )
    ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(kinds))], kinds)
    ax.set_ylabel("W_f ÷ invariance distance")
    ax.set_title("Share of the displacement that no rotation explains, per augmentation kind")
    ax.legend(fontsize=8)
    written[out / f"{stem}_by_kind.png"] = figure_png(fig)
    return written


def ablation_bars(results: list[dict[str, Any]], title: str) -> bytes:
    """The loss ablation (paper, Figure 2): linear-probe accuracy per variant as bars with ±std
    error bars and the per-seed values as dots, kNN accuracy as a second, hatched bar.

    ``results``: one dict per variant with ``label``, ``mean``, ``std``, ``per_seed`` (linear
    probe, in %) and ``knn`` (in %, or None). The y-axis is zoomed to the values' range.
    Returns the PNG.
    """
    if not results:
        raise ValueError("ablation_bars needs at least one result")
    n = len(results)
    has_knn = any(r.get("knn") is not None for r in results)
    width = 0.38 if has_knn else 0.6
    fig, ax = plt.subplots(figsize=(1.9 * n + 2.2, 4.2))
    xs = list(range(n))
    linear_x = [x - width / 2 if has_knn else x for x in xs]
    means = [float(r["mean"]) for r in results]
    stds = [float(r.get("std") or 0.0) for r in results]
    colours = [f"C{i}" for i in range(n)]
    ax.bar(
        linear_x,
        means,
        width,
        yerr=stds,
        capsize=5,
        color=colours,
        edgecolor="black",
        linewidth=0.6,
        error_kw={"elinewidth": 1.2},
        label="linear probe (mean ± std over seeds)",
        zorder=2,
    )
    lows = [m - s for m, s in zip(means, stds, strict=True)]
    highs = [m + s for m, s in zip(means, stds, strict=True)]
    for x, r in zip(linear_x, results, strict=True):
        seeds = [float(v) for v in r.get("per_seed") or []]
        ax.scatter([x] * len(seeds), seeds, s=12, color="black", zorder=3)
        lows += seeds
        highs += seeds
    knn_x = [x + width / 2 for x in xs]
    if has_knn:
        knn = [r.get("knn") for r in results]
        for x, value, colour in zip(knn_x, knn, colours, strict=True):
            if value is None:
                continue
            ax.bar(
                x,
                float(value),
                width,
                color=colour,
                alpha=0.35,
                hatch="//",
                edgecolor="black",
                linewidth=0.6,
                zorder=2,
            )
            lows.append(float(value))
            highs.append(float(value))
    lo, hi = min(lows), max(highs)
    span = max(hi - lo, 4.0)  # at least a few points, so equal bars do not fill the frame
    bottom, top = max(0.0, lo - 0.6 * span), min(100.0, hi + 0.35 * span)
    ax.set_ylim(bottom, top)
    offset = 0.02 * (top - bottom)
    for x, m, s, r in zip(linear_x, means, stds, results, strict=True):
        peak = max([m + s, *(float(v) for v in r.get("per_seed") or [])])
        ax.text(
            x, min(peak + offset, top), f"{m:.1f}±{s:.1f}", ha="center", va="bottom", fontsize=8
        )
    if has_knn:
        for x, r in zip(knn_x, results, strict=True):
            if r.get("knn") is not None:
                value = float(r["knn"])
                ax.text(
                    x,
                    min(value + offset, top),
                    f"{value:.1f}",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.set_xticks(xs, [str(r["label"]) for r in results])
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.set_axisbelow(True)
    if has_knn:
        from matplotlib.patches import Patch

        ax.legend(
            handles=[
                Patch(
                    facecolor="0.6",
                    edgecolor="black",
                    label="linear probe (mean ± std; dots: seeds)",
                ),
                Patch(facecolor="0.85", edgecolor="black", hatch="//", label="kNN"),
            ],
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.13),
            ncol=2,
            frameon=False,
        )
    ax.set_title(title, fontsize=10)
    return figure_png(fig)


def neighbours_figure(
    grid: list[list[Any]], labels: list[list[str]], similarity: Any, title: str
) -> bytes:
    """One row per query: the query (first column, framed) and its nearest neighbours, uint8
    ``(C, H, W)`` images, each with its label and its cosine similarity to the query
    (``similarity[row][j]`` for neighbour ``j``), green where the label is the query's, red
    elsewhere. Returns the PNG."""
    rows, cols = len(grid), len(grid[0])
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.3 * cols, 1.5 * rows + 0.4), squeeze=False, layout="constrained"
    )
    for r, row in enumerate(grid):
        for c, image in enumerate(row):
            ax = axes[r][c]
            pixels = image.numpy() if hasattr(image, "numpy") else image
            if pixels.shape[0] == 1:
                ax.imshow(pixels[0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(pixels[:3].transpose(1, 2, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(f"query\n{labels[r][0]}", fontsize=7, fontweight="bold")
                for spine in ax.spines.values():
                    spine.set_linewidth(2.5)
                continue
            same = labels[r][c] == labels[r][0]
            ax.set_title(
                f"{labels[r][c]}\n{float(similarity[r][c - 1]):.3f}",
                fontsize=7,
                color="tab:green" if same else "tab:red",
            )
    fig.suptitle(title, fontsize=9)
    return figure_png(fig)
