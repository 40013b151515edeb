"""Where a pretraining's metrics go besides ``metrics.csv``: TensorBoard and Weights & Biases.

``loggers`` lists them: ``csv`` (``metrics.csv``, always written by
:class:`care.train.callbacks.MetricsCSV`), ``tensorboard`` (``RUN/tensorboard``) and ``wandb``
(an optional extra: ``pip install -e ".[wandb]"``). A W&B run keeps one id for the whole run
directory (``RUN/wandb-id``), so a resumed run continues the same W&B run; W&B's own settings
(``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_MODE=offline`` without an account) apply.
"""

from __future__ import annotations

import importlib.util
import os
import uuid

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from care.config import LOGGER_NAMES, Config
from care.errors import CareError
from care.runs import RunDir, atomic_write_text

LOGGERS = LOGGER_NAMES
"""The values ``loggers`` accepts."""


def build_loggers(cfg: Config, run: RunDir) -> list[Logger]:
    """The Lightning loggers that ``cfg.loggers`` names (``csv`` needs none: metrics.csv)."""
    loggers: list[Logger] = []
    if "tensorboard" in cfg.loggers:
        loggers.append(TensorBoardLogger(str(run.root), name="tensorboard", version=""))
    if "wandb" in cfg.loggers:
        if importlib.util.find_spec("wandb") is None:
            raise CareError(
                "loggers includes wandb, which is not installed: pip install -e '.[wandb]' "
                "(or pip install wandb), or drop wandb from loggers"
            )
        loggers.append(
            WandbLogger(
                name=run.root.name,
                project=os.environ.get("WANDB_PROJECT", "care"),
                save_dir=str(run.root),
                id=wandb_run_id(run),
                resume="allow",
                config=cfg.to_dict(),
            )
        )
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Close the W&B run of a finished fit, so that everything logged is written (offline) or
    sent before :func:`care.train.pretrain` returns, as it is when the process exits."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def wandb_run_id(run: RunDir) -> str:
    """The W&B run id of this run directory: made once, kept in ``RUN/wandb-id``."""
    path = run.root / "wandb-id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id + "\n")
    return run_id
