"""The throughput summary: images/s of the whole loop, and the share spent waiting for data."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from care.train.callbacks import Throughput

STEP_S = 0.03


class SlowData(Dataset[torch.Tensor]):
    """Batches of 4 that take ``delay`` seconds each to load."""

    def __init__(self, batches: int, delay: float) -> None:
        self.batches, self.delay = batches, delay

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.delay)
        return torch.ones(4, 2)


class SlowStep(L.LightningModule):
    """A training step that takes ``STEP_S`` seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        time.sleep(STEP_S)
        return self.layer(batch).sum()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _summary(delay: float, epochs: int = 2) -> dict[str, float]:
    throughput = Throughput(images_per_step=4, warmup=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        callbacks=[throughput],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(SlowData(8, delay), batch_size=None)
    trainer.fit(SlowStep(), loader)
    return throughput.summary()


@pytest.mark.parametrize("delay", [0.0, STEP_S, 3 * STEP_S])
def test_images_per_second_count_the_wait_for_data(delay: float) -> None:
    summary = _summary(delay)
    share = delay / (delay + STEP_S)
    assert summary["data_wait_share"] == pytest.approx(share, abs=0.15)
    # a whole step is the wait plus the step itself, so a slow loader lowers images/s
    assert summary["step_time_s"] == pytest.approx(delay + STEP_S, rel=0.4)
    assert summary["images_per_s"] == pytest.approx(4 / summary["step_time_s"])


def test_too_short_a_run_has_no_throughput() -> None:
    throughput = Throughput(images_per_step=4, warmup=3)
    assert throughput.summary() == {}
