"""User-facing errors: one clear line that names the input and the fix."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class CareError(ValueError):
    """An error caused by user input (config, data, files).

    The CLI prints ``error: <message>`` on one line and exits with status 2, without a traceback.
    The message names the offending input and says how to fix it.
    """


#: errno → what to do about a failed write.
_WRITE_FIXES: dict[int, str] = {
    errno.ENOSPC: "free space or choose another out=DIR",
    errno.EDQUOT: "free space (the disk quota is used up) or choose another out=DIR",
    errno.EACCES: "fix the folder's permissions or choose another out=DIR",
    errno.EPERM: "fix the folder's permissions or choose another out=DIR",
    errno.EROFS: "the file system is read-only: choose another out=DIR",
    errno.EFBIG: "the file size limit is too small for it: raise it (ulimit -f) or unset it",
}


def os_error_cause(exc: OSError) -> str:
    """``No space left on device (errno 28)``: the cause of an OSError, on one line."""
    if exc.errno is None:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{exc.strerror or os.strerror(exc.errno)} (errno {exc.errno})"


def cannot_write(path: str | Path, exc: OSError) -> CareError:
    """The one-line error for a file that could not be written: path, cause and fix."""
    fix = _WRITE_FIXES.get(exc.errno or 0, "check the disk, or choose another out=DIR")
    return CareError(f"cannot write {path}: {os_error_cause(exc)}: {fix}")


class RunInterrupted(CareError):
    """A run that stopped on a signal after writing its checkpoint.

    The CLI prints the message (``stopped at step S (epoch E/N): resume with resume=true``)
    without the ``error:`` prefix and exits with status 128 + the signal's number. ``epoch``
    counts from 1, as the progress line does (``epoch 2/2``): the epoch the run was in.
    """

    def __init__(self, step: int, epoch: int, signum: int, epochs: int | None = None) -> None:
        of = f"/{epochs}" if epochs else ""
        super().__init__(f"stopped at step {step} (epoch {epoch}{of}): resume with resume=true")
        self.step, self.epoch, self.epochs, self.signum = step, epoch, epochs, signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum
