"""One real DDP training step on two CPU processes, for tests/test_distributed.py.

Run as ``python -m tests.train.ddp_step OUT METHOD [key=value ...]``: Lightning's own launcher
starts the second process. Each rank writes ``OUT/rank{r}.pt`` with

- ``ddp/<name>``: the gradient each parameter holds when the optimiser steps (after the method's
  backward per pair of views, with DDP's gradient sync on the last backward only);
- ``local/<name>``: this rank's gradient of its own loss, from one backward of a copy of the
  model with the same weights and views (no DDP: negatives are still gathered across ranks);
- ``mean/<name>``: ``local`` averaged over the ranks, which is what DDP must produce;
- ``synced_buckets``: the index of each gradient bucket DDP all-reduced in the step, in order
  (a DDP communication hook records them): each bucket once when DDP syncs once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from care.config import Config, load_config
from care.data import DataInfo, EpochSampler, make_loader
from care.methods import ContrastiveMethod, build_method
from tests.train.helpers import bare_trainer, noise_images

INFO = DataInfo(channels=1, image_size=16, mean=(0.5,), std=(0.25,), num_classes=10)


class CaptureGradients(Callback):
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.result: dict[str, torch.Tensor] = {}
        self.synced: list[int] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # (Lightning registers DDP communication hooks on CUDA only.)
        ddp = trainer.strategy.model
        assert isinstance(ddp, DistributedDataParallel)
        ddp.register_comm_hook(self.synced, counting_allreduce)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert isinstance(pl_module, ContrastiveMethod)
        reference = build_method(self.cfg, INFO)
        reference.load_state_dict(pl_module.state_dict())
        views = reference.make_views(batch[0], pl_module.step_generator())  # this rank's views
        loss = reference.compute_losses(views)["loss"]
        named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named])
        for (name, _), grad in zip(named, grads, strict=True):
            self.result[f"local/{name}"] = grad.clone()
            mean = grad.clone()
            dist.all_reduce(mean)
            self.result[f"mean/{name}"] = mean / dist.get_world_size()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                self.result[f"ddp/{name}"] = p.grad.clone()


def counting_allreduce(synced, bucket):  # type: ignore[no-untyped-def]
    """DDP's default all-reduce of a gradient bucket, recording the bucket's index.

    (No annotations: DDP checks them against its own types, which the postponed annotations of
    this module would turn into strings.)
    """
    synced.append(bucket.index())
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]


def main(out: Path, method: str, *extra: str) -> None:
    cfg = load_config(
        None,
        [
            f"method={method}",
            "widths=[4,4,8,8]",
            "head_hidden=16",
            "head_out=8",
            "batch_size=8",
            "group_size=4",
            "queue_size=32",
            "weight=0.5",
            "precision=32",
            "accelerator=cpu",
            "devices=2",
            "strategy=ddp",
            *extra,
        ],
    )
    images = noise_images(32, INFO)
    torch.manual_seed(0)
    capture = CaptureGradients(cfg)
    trainer = bare_trainer(
        devices=2, strategy="ddp", max_steps=1, precision="32-true", callbacks=[capture]
    )
    sampler = EpochSampler(len(images), cfg.seed, trainer.global_rank, trainer.world_size)
    trainer.fit(build_method(cfg, INFO), make_loader(images, cfg, sampler))
    out.mkdir(parents=True, exist_ok=True)
    result = {**capture.result, "synced_buckets": torch.tensor(capture.synced)}
    torch.save(result, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:])
