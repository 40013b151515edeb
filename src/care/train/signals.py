"""Stopping a run cleanly on SIGTERM, SIGINT and SIGUSR1 (preemption, Ctrl-C, SLURM's warning).

A handler only records the first signal; the training loop reads the record after each step
(:class:`care.train.checkpoints.LastCheckpoint`), writes ``last.ckpt`` and raises
:class:`care.errors.RunInterrupted`. Nothing is done inside the handler but setting a flag and one
``os.write``, so a signal can arrive at any moment, a second one during the save included.

Under SLURM (``SLURM_JOB_ID`` set), SIGUSR1 is taken as the scheduler's warning before the time
limit (``#SBATCH --signal=USR1@90``): after the checkpoint is written, rank 0 asks SLURM to
requeue the job (``scontrol requeue``), and the requeued job continues with ``resume=true``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

#: The signals that stop a run after the current step.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """Records the first of :data:`STOP_SIGNALS` between :meth:`install` and :meth:`restore`."""

    def __init__(self, before_message: Callable[[], None] | None = None) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        # called before the handler's message (it ends an open progress line on a terminal)
        self.before_message = before_message

    def install(self) -> None:
        """Take over the stop signals (main thread only; elsewhere signals cannot be caught)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Give the stop signals back to the handlers they had before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            message = f"{name} received: stopping after this step and writing a checkpoint\n"
        else:
            message = f"{name} received: already stopping, the checkpoint is being written\n"
        if self.before_message is not None:
            self.before_message()
        os.write(2, message.encode())  # async-signal-safe, unlike print

    def requeue_if_slurm(self) -> None:
        """Under SLURM, after a SIGUSR1, ask SLURM to requeue this job (call on rank 0 after the
        checkpoint is written); a failure is reported, not raised."""
        job = slurm_job_id()
        if self.received != signal.SIGUSR1 or job is None:
            return
        try:
            done = subprocess.run(
                ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            os.write(2, f"could not requeue SLURM job {job}: {exc}\n".encode())
            return
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no message"]
            os.write(2, f"could not requeue SLURM job {job}: {why[0]}\n".encode())
        else:
            os.write(2, f"requeued SLURM job {job}\n".encode())


def slurm_job_id() -> str | None:
    """This job's id for ``scontrol`` (``ARRAYJOB_TASK`` for array jobs), or None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None
