"""care.progress: what a long command shows, by the clock, on a terminal and in a pipe."""

from __future__ import annotations

import io

import pytest

from care.errors import CareError
from care.progress import CommandProgress, clock_text, progress_interval


class FakeClock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def test_a_pipe_gets_a_plain_line_every_interval_with_rate_and_eta() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = CommandProgress(
        "equivariance run", 1000, stream=stream, tty=False, every_s=30.0, clock=clock
    )
    for trial in range(10):  # 100 images every 10 s: 10 images/s
        clock.now += 10
        progress.advance(100, f"trial {trial + 1}/10")
    progress.close()
    lines = stream.getvalue().splitlines()
    # the first line after 30 s, then one every 30 s: at 30, 60 and 90 s
    assert lines == [
        "equivariance run: trial 3/10 (30%, 10 images/s, ETA 1:10)",
        "equivariance run: trial 6/10 (60%, 10 images/s, ETA 0:40)",
        "equivariance run: trial 9/10 (90%, 10 images/s, ETA 0:10)",
    ]


def test_a_terminal_line_is_rewritten_and_ended_once() -> None:
    clock, stream = FakeClock(), io.StringIO()
    with CommandProgress(
        "probe r: linear probe", 4, unit="epochs", stream=stream, tty=True, every_s=2.0, clock=clock
    ) as progress:
        for epoch in range(4):
            clock.now += 1.5
            progress.advance(1, f"epoch {epoch + 1}/4 done")
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\x1b[K\n")  # shown at once, then after 2 s
    assert "epoch 3/4 done (75%, 0.67 epochs/s, ETA 0:02)" in text


def test_nothing_is_shown_before_any_work_and_a_short_pipe_command_stays_quiet() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = CommandProgress("embed", 50, stream=stream, tty=False, clock=clock)
    clock.now += 5
    progress.advance(50)
    progress.close()
    assert stream.getvalue() == ""  # done in 5 s: under the 30 s of a pipe's first line
    assert progress.rate() == 10 and progress.eta_s() == 0


def test_the_interval_comes_from_care_progress_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARE_PROGRESS_S", "0")
    stream = io.StringIO()
    progress = CommandProgress("x", 2, stream=stream, tty=False, clock=FakeClock())
    progress.advance(1)
    progress.advance(1)
    assert len(stream.getvalue().splitlines()) == 2
    monkeypatch.setenv("CARE_PROGRESS_S", "soon")
    with pytest.raises(CareError, match="CARE_PROGRESS_S='soon'"):
        progress_interval()
    assert [clock_text(s) for s in (7, 123, 3723.4)] == ["0:07", "2:03", "1:02:03"]
