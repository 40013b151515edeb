"""The online kNN monitor and the resume check on two CPU processes, for tests/test_distributed.py.

Run as ``python -m tests.train.ddp_eval OUT``: Lightning's own launcher starts the second
process. Each rank writes ``OUT/rank{r}.pt`` with

- ``knn``: the accuracy the monitor logged, from each rank's shard of the bank and test images;
- ``embedded``: how many bank and test images this rank embedded itself;
- ``reference`` (rank 0): the single-process accuracy of the same weights on all the images;
- ``refusals``: the one-line errors of :class:`SameCheckpointOnEveryRank` when rank 1 cannot
  read rank 0's checkpoint, and when it reads another file than rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from care.augment.eval import eval_transform
from care.config import load_config
from care.data import DataInfo, make_loader
from care.errors import CareError
from care.methods import build_method
from care.metrics import weighted_knn_accuracy
from care.train.callbacks import KNNMonitor
from care.train.checkpoints import SameCheckpointOnEveryRank
from tests.train.helpers import bare_trainer, noise_images

INFO = DataInfo(channels=1, image_size=16, mean=(0.5,), std=(0.25,), num_classes=10)
BANK, TEST = 37, 23  # neither splits evenly over 2 ranks × batches of 8


class CountingMonitor(KNNMonitor):
    def __init__(self) -> None:
        super().__init__(INFO.num_classes, k=5, temperature=0.1)
        self.embedded: list[int] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.embedded = [sum(len(o["labels"]) for o in self.outputs[i]) for i in (0, 1)]
        super().on_validation_epoch_end(trainer, pl_module)


def refusal(trainer: L.Trainer, check: SameCheckpointOnEveryRank) -> str:
    try:
        check.setup(trainer, trainer.lightning_module, "fit")
    except CareError as exc:
        return str(exc)
    return ""


class ResumeChecks(L.Callback):
    """Runs the resume check in the live process group, with files that differ by rank."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.refusals: list[str] = []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank
        ckpt = self.out / f"visible{rank}.ckpt"
        ckpt.write_bytes(b"same" if rank == 0 else b"different")
        missing = ckpt if rank == 0 else self.out / "not-there.ckpt"
        shared = self.out / "visible0.ckpt"
        self.refusals = [
            refusal(trainer, SameCheckpointOnEveryRank(missing, self.out)),
            refusal(trainer, SameCheckpointOnEveryRank(ckpt, self.out)),
            refusal(trainer, SameCheckpointOnEveryRank(shared, self.out)),  # all read one file
        ]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        None,
        ["method=simclr", "widths=[4,4,8,8]", "head_hidden=16", "head_out=8", "batch_size=8"],
    )
    bank, test = noise_images(BANK, INFO, seed=1), noise_images(TEST, INFO, seed=2)
    torch.manual_seed(0)
    method = build_method(cfg, INFO)
    monitor, checks = CountingMonitor(), ResumeChecks(out)
    trainer = bare_trainer(
        devices=2, strategy="ddp", limit_val_batches=1.0, callbacks=[monitor, checks]
    )
    rank, world = trainer.global_rank, trainer.world_size
    loaders = [make_loader(split, cfg, rank=rank, world_size=world) for split in (bank, test)]
    trainer.validate(method, loaders, verbose=False)
    result: dict[str, Any] = {
        "knn": trainer.callback_metrics["val/knn_acc"].clone(),
        "embedded": torch.tensor(monitor.embedded),
        "refusals": checks.refusals,
    }
    if rank == 0:
        backbone = method.encoder.backbone.eval()
        with torch.no_grad():
            features = [
                backbone(eval_transform(s.images, INFO.image_size, INFO.mean, INFO.std, 1.0))
                for s in (bank, test)
            ]
        result["reference"] = torch.tensor(  # val/knn_acc is in percent
            100.0
            * weighted_knn_accuracy(
                features[0], bank.labels, features[1], test.labels, INFO.num_classes, 5, 0.1
            )
        )
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
