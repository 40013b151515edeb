"""Shape of a run's test embeddings: norms and the spread of singular values.

A measurement script, not a test. For each run it embeds the first N test images (un-augmented,
projection layer, the run's own geometry) and prints the mean norm of the spatial coordinates
(all of them on the sphere; all but x₀ on the hyperboloid, where the soft clip bounds them by 1)
and the singular values of the (N, d) embedding matrix: the largest, the smallest, and their ratio
(the condition number that the least-squares group fit of `care equivariance` works against).

    python benchmarks/embedding_stats.py runs/exp6/care-hyperboloid runs/exp2/care-separate
"""

from __future__ import annotations

import argparse

import torch

from care.augment.eval import eval_transform
from care.evaluate.equivariance import load_trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    print("| run | embedding | d | mean spatial norm | largest sv | smallest sv | ratio |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        encoder, dataset = load_trained(run, "projection", "test")
        count = min(args.samples, len(dataset))
        images = torch.stack([dataset[i][0] for i in range(count)])
        info = encoder.info
        x = eval_transform(images, info.image_size, info.mean, info.std, info.eval_crop_fraction)
        with torch.no_grad():
            F = encoder(x)
        spatial = F[:, 1:] if encoder.embedding == "hyperboloid" else F
        sv = torch.linalg.svdvals(F)
        print(
            f"| {run} | {encoder.embedding} | {F.shape[1]} | {spatial.norm(dim=1).mean():.3f} | "
            f"{sv[0]:.2f} | {sv[-1]:.4f} | {sv[0] / sv[-1]:.0f} |"
        )


if __name__ == "__main__":
    main()
