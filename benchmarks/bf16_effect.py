"""How much bf16-mixed autocast changes each method's loss and gradients, step by step.

A benchmark script, not a test. For every method it takes the same weights, the same batch and
the same augmentation records, and computes the loss and the gradient of every parameter twice:
in float32 and under bf16 autocast (as `precision=bf16-mixed` trains). It prints, per method, the
relative change of each loss term and of the whole gradient, and the cosine between the two
gradients, as the median over a few batches. Accuracy after bf16 training is a separate question,
answered by `benchmarks/quality.py --stage precision`.

    python benchmarks/bf16_effect.py                      # CPU preset, batch 256, 3 batches
    python benchmarks/bf16_effect.py batches=5 batch_size=128
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from rich.progress import track

from care.config import load_config
from care.data import data_info, load_split
from care.methods import ContrastiveMethod, Views, build_method

VARIANTS: dict[str, list[str]] = {
    "simclr": ["method=simclr"],
    "care (separate views)": ["method=care", "views=separate"],
    "care (shared views)": ["method=care", "views=shared"],
}


def loss_and_grad(
    method: ContrastiveMethod, views: Views, bf16: bool
) -> tuple[dict[str, float], torch.Tensor]:
    """Loss terms and the flattened gradient of one step, in float32 or under bf16 autocast."""
    method.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        losses = method.compute_losses(views)
    losses["loss"].backward()
    grads = [p.grad.flatten() for p in method.parameters() if p.grad is not None]
    return {k: float(v.detach()) for k, v in losses.items()}, torch.cat(grads).double()


def compare(overrides: list[str], batches: int) -> dict[str, float]:
    """Median over ``batches`` of the fp32-vs-bf16 differences of one configured method."""
    cfg = load_config(None, overrides)
    dataset = load_split(cfg, "pretrain")
    method = build_method(cfg, data_info(cfg, dataset)).train()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    figures: dict[str, list[float]] = {}
    for b in range(batches):
        n = cfg.batch_size
        images = torch.stack([dataset[b * n + i][0] for i in range(n)])
        views = method.make_views(images, torch.Generator().manual_seed(b))  # in float32
        method.load_state_dict(state)  # BatchNorm running stats: both passes start alike
        loss32, grad32 = loss_and_grad(method, views, bf16=False)
        method.load_state_dict(state)
        loss16, grad16 = loss_and_grad(method, views, bf16=True)
        for key in loss32:
            rel = abs(loss16[key] - loss32[key]) / max(abs(loss32[key]), 1e-12)
            figures.setdefault(f"rel_change_{key}", []).append(rel)
        figures.setdefault("grad_rel_change", []).append(
            float((grad16 - grad32).norm() / grad32.norm())
        )
        figures.setdefault("grad_cosine", []).append(
            float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0))
        )
    return {k: statistics.median(v) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config key=value, plus batches=N")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    batches, overrides = 3, []
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key == "batches":
            batches = int(value)
        else:
            overrides.append(item)
    torch.manual_seed(0)
    results = {
        name: compare([*overrides, *variant], batches)
        for name, variant in track(VARIANTS.items(), description="methods")
    }
    print(f"median over {batches} batches; {' '.join(overrides) or 'CPU preset'}")
    print("| method | Δ loss | Δ L_inv | Δ L_unif | Δ L_equi | ‖Δ grad‖ ÷ ‖grad‖ | cos(grad) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [
            f"{100 * r[k]:.3f}%" if k in r else "–"
            for k in ("rel_change_loss", "rel_change_inv", "rel_change_unif", "rel_change_equi")
        ]
        print(
            f"| {name} | {' | '.join(cells)} | {100 * r['grad_rel_change']:.2f}% | "
            f"{r['grad_cosine']:.5f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"overrides": overrides, "batches": batches, "results": results}, handle)


if __name__ == "__main__":
    main()
