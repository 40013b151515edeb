"""Figures (matplotlib, Agg backend): the paper's Figure-3 scatter and per-kind error plots."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from care.runs import atomic_write_bytes


def save_figure(fig: Figure, path: Path) -> str:
    """Write a figure as PNG atomically and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return str(path)


def plot_equivariance(payload: dict[str, Any], out: Path) -> list[str]:
    """Figure 3 (compare mode): baseline W_f against this run's W_f per trial, coloured by the
    augmentation's dominant kind, with the diagonal; and W_f ÷ invariance distance per kind."""
    results = payload["results"]
    labels = [
        f"{m} ({Path(r).name})" for m, r in zip(payload["methods"], payload["runs"], strict=True)
    ]
    kinds = sorted({t["kind"] for t in results[0]["trials"]})
    colours = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(kinds)}
    written = []
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
        written.append(save_figure(fig, out / "equivariance_scatter.png"))
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
    written.append(save_figure(fig, out / "equivariance_by_kind.png"))
    return written
