"""Progress a person reads while a long command runs: the same rules for every command.

On a terminal one line is rewritten about every 2 seconds; in a file or a pipe a plain line is
printed every 30 seconds (``CARE_PROGRESS_S=N`` sets the interval, 0: at every update), so a log
shows that the command is alive and how far it is. :class:`CommandProgress` is what
``care probe``, ``care equivariance`` and ``care embed`` show (on stderr: their stdout keeps the
result lines alone); ``care pretrain`` shows its own (:class:`care.train.callbacks.Progress`)
by the same clock and rules.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from care.errors import CareError

__all__ = ["CommandProgress", "clock_text", "progress_interval"]


def clock_text(seconds: float) -> str:
    """``1:02:03``, ``2:03`` or ``0:07``: a duration as a person reads it."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_interval() -> float | None:
    """Seconds between progress refreshes from ``CARE_PROGRESS_S`` (0: every update), or None
    for the default (2 s on a terminal, 30 s in a file or a pipe)."""
    value = os.environ.get("CARE_PROGRESS_S", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise CareError(
            f"CARE_PROGRESS_S={value!r} is not a number of seconds: give e.g. 2 (0: every step) "
            "or unset it"
        )
    return seconds


class CommandProgress:
    """The progress of one command over ``total`` units of work (images to embed, epochs).

    ``advance(n)`` counts ``n`` units done; ``stage`` names what is being done (``trial 3/20``).
    Each refresh shows the description, the stage, the share done, the rate in ``unit`` per
    second and the ETA of the whole command (the units left at the pace so far). Used as a
    context manager, it ends with the terminal line closed (nothing is left half-written).
    """

    def __init__(
        self,
        description: str,
        total: float,
        *,
        unit: str = "images",
        stream: TextIO | None = None,
        tty: bool | None = None,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description, self.total, self.unit = description, float(total), unit
        self.stream = sys.stderr if stream is None else stream
        self.tty = _isatty(self.stream) if tty is None else tty
        interval = progress_interval() if every_s is None else every_s
        self.every_s = (2.0 if self.tty else 30.0) if interval is None else interval
        self.clock = clock
        self.done = 0.0
        self.stage_text = ""
        self.started = clock()
        self._shown = -math.inf if self.tty else self.started  # a pipe's first line after 30 s
        self._open = False

    def __enter__(self) -> CommandProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def stage(self, text: str) -> None:
        """Name the current stage (shown on the next refresh)."""
        self.stage_text = text
        self._maybe_show()

    def advance(self, units: float = 1.0, stage: str | None = None) -> None:
        """Count ``units`` of work done (and name the stage now reached)."""
        self.done += units
        if stage is not None:
            self.stage_text = stage
        self._maybe_show()

    def rate(self) -> float | None:
        """Units per second so far (None before any time has passed)."""
        elapsed = self.clock() - self.started
        return self.done / elapsed if self.done > 0 and elapsed > 0 else None

    def eta_s(self) -> float | None:
        """Seconds left at the pace so far."""
        rate = self.rate()
        return None if rate is None else max(0.0, self.total - self.done) / rate

    def text(self) -> str:
        """The line shown: description, stage, share done, rate and ETA."""
        share = 100.0 * self.done / self.total if self.total > 0 else 100.0
        parts = [f"{share:.0f}%"]
        rate = self.rate()
        if rate is not None:
            parts.append(
                f"{rate:,.0f} {self.unit}/s" if rate >= 10 else f"{rate:.2f} {self.unit}/s"
            )
        eta = self.eta_s()
        if eta is not None:
            parts.append(f"ETA {clock_text(eta)}")
        head = f"{self.description}: {self.stage_text}" if self.stage_text else self.description
        return f"{head} ({', '.join(parts)})"

    def close(self) -> None:
        """End the terminal line, if one is open."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def _maybe_show(self) -> None:
        now = self.clock()
        if now - self._shown < self.every_s:
            return
        self._shown = now
        text = self.text()
        if self.tty:
            width = max(20, shutil.get_terminal_size().columns - 1)
            self.stream.write("\r" + text[:width] + "\x1b[K")
            self._open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
