"""One command per folder: RunLock refuses a live holder, takes over a stale lock, and lets exactly
one of several racers in; `care ablate` and benchmarks/quality.py refuse a folder in use."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import care.runs
from care.errors import CareError
from care.runs import (
    BREAK_STALE_S,
    LOCK_NAME,
    STALE_AFTER_S,
    RunLock,
    process_start_time,
    rank_zero_lock,
)
from tests.conftest import fails_with_one_line, tiny

NO_SUCH_PID = 2**22 + 7  # above Linux's largest pid_max

HOLD = """
import sys, time
from care.runs import RunLock
lock = RunLock(sys.argv[1], "care pretrain")
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _wait_for_line(process: subprocess.Popen[str], expected: str, timeout: float = 120) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.strip() == expected:
            return
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"the holder did not print {expected!r} (exit {process.poll()})")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[str]]:
    """A live process that is not this one (a plain sleep: it imports nothing)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], text=True)
    yield process
    process.kill()
    process.wait()


def fake_lock(folder: Path, pid: int, **changes: object) -> Path:
    """A lock file in ``folder`` as a holder with ``pid`` on this host would have written it."""
    record = {
        "pid": pid,
        "hostname": socket.gethostname(),
        "command": "care pretrain",
        "started": "2026-12-02T10:00:00+00:00",
        "process_start": process_start_time(pid),
        "token": "someone-else",
        **changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps(record))
    return path


def _refusal(folder: Path, command: str = "care pretrain") -> str:
    with pytest.raises(CareError) as caught:
        RunLock(folder, command).acquire()
    message = str(caught.value)
    assert "\n" not in message
    return message


def _mine(folder: Path) -> dict[str, object]:
    record = json.loads((folder / LOCK_NAME).read_text())
    assert isinstance(record, dict)
    return record


def test_a_live_holder_in_another_process_blocks_until_killed(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        _wait_for_line(holder, "locked")
        message = _refusal(folder)
        host = socket.gethostname()
        assert message.startswith(
            f"{folder} is in use by care pretrain (pid {holder.pid} on host {host}, since "
        ), message
        assert message.endswith("): wait for it, stop it, or choose another out=DIR"), message
        holder.send_signal(signal.SIGKILL)  # kill -9: the lock file stays, stale
        holder.wait()
        assert (folder / LOCK_NAME).is_file()
        with RunLock(folder, "care pretrain"):
            record = _mine(folder)
            assert record["pid"] == os.getpid() and record["command"] == "care pretrain"
            assert record["process_start"] == process_start_time(os.getpid())
            assert record["hostname"] == host and "T" in str(record["started"])
        assert not (folder / LOCK_NAME).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_reused_pid_is_stale(tmp_path: Path, sleeper: subprocess.Popen[str]) -> None:
    start = process_start_time(sleeper.pid)
    assert start is not None
    fake_lock(tmp_path, sleeper.pid)
    assert f"(pid {sleeper.pid} on host" in _refusal(tmp_path)  # the real holder: alive
    fake_lock(tmp_path, sleeper.pid, process_start=start + 1)  # the pid now names another process
    with RunLock(tmp_path, "care pretrain"):
        assert _mine(tmp_path)["pid"] == os.getpid()


def test_a_dead_pid_is_stale(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: its pid names no process (until reused)
    fake_lock(tmp_path, process.pid, process_start=12345)
    with RunLock(tmp_path, "care pretrain"):
        assert _mine(tmp_path)["pid"] == os.getpid()


def test_another_hosts_lock_blocks_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    path = fake_lock(tmp_path, 1, hostname="node-17.elsewhere", command="care ablate")
    message = _refusal(tmp_path)
    assert (
        "in use by care ablate (pid 1 on host node-17.elsewhere, since 2026-12-02 10:00:00, "
        in (message)
    )
    old = time.time() - STALE_AFTER_S - 5
    os.utime(path, (old, old))  # no heartbeat for longer than STALE_AFTER_S: the node is gone
    with RunLock(tmp_path, "care pretrain"):
        assert _mine(tmp_path)["pid"] == os.getpid()


def test_the_holder_refreshes_the_mtime_and_stops_on_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(care.runs, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path, "care pretrain")
    with lock:
        path = tmp_path / LOCK_NAME
        old = time.time() - 1000
        os.utime(path, (old, old))
        deadline = time.monotonic() + 10
        while path.stat().st_mtime < old + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.time() - path.stat().st_mtime < 10
        thread = lock._heartbeat
        assert thread is not None and thread.is_alive() and thread.daemon
    assert not thread.is_alive()
    assert not path.exists()


def test_an_unreadable_lock_is_stale_only_once_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sleeper: subprocess.Popen[str]
) -> None:
    path = tmp_path / LOCK_NAME
    path.write_text("")  # killed between create and write
    old = time.time() - 60
    os.utime(path, (old, old))
    with RunLock(tmp_path, "care pretrain"):
        assert _mine(tmp_path)["pid"] == os.getpid()

    # A young empty file may be written right now: wait for it, then judge what it says.
    monkeypatch.setattr(care.runs, "WRITING_GRACE_S", 30.0)
    path.write_text('{"pid": ')

    def finish_writing() -> None:
        time.sleep(0.3)
        fake_lock(tmp_path, sleeper.pid)

    writer = threading.Thread(target=finish_writing)
    writer.start()
    started = time.monotonic()
    message = _refusal(tmp_path)
    writer.join()
    assert f"(pid {sleeper.pid} on host" in message
    assert time.monotonic() - started >= 0.25

    monkeypatch.setattr(care.runs, "WRITING_GRACE_S", 0.3)
    path.write_text("{garbage")  # never finished: stale after the grace period
    with RunLock(tmp_path, "care pretrain"):
        assert _mine(tmp_path)["pid"] == os.getpid()


def test_release_leaves_no_file_and_only_removes_its_own_lock(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), RunLock(tmp_path, "care pretrain"):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    made = tmp_path / "new" / "run"
    with RunLock(made, "care pretrain"):
        assert (made / LOCK_NAME).is_file()
    assert not made.exists() and (tmp_path / "new").is_dir()  # it made the empty folder: gone
    with RunLock(made, "care pretrain"):
        (made / "config.yaml").write_text("x")
    assert sorted(p.name for p in made.iterdir()) == ["config.yaml"]

    lock = RunLock(tmp_path, "care pretrain")
    lock.acquire()
    taken = fake_lock(tmp_path, 1, hostname="elsewhere")  # taken over (judged stale) meanwhile
    before = taken.read_bytes()
    lock.release()
    assert taken.read_bytes() == before  # not ours: left alone


def test_locks_of_different_folders_nest_but_one_folder_is_locked_once(tmp_path: Path) -> None:
    with RunLock(tmp_path, "care ablate"):
        with RunLock(tmp_path / "care", "care pretrain"):
            assert (tmp_path / "care" / LOCK_NAME).is_file()
        assert f"in use by care ablate (pid {os.getpid()} on host" in _refusal(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _race_threads(folder: Path, racers: int) -> tuple[list[RunLock], list[str]]:
    """``racers`` threads try to lock ``folder`` at once: the locks won and the refusals."""
    barrier = threading.Barrier(racers)
    won: list[RunLock] = []
    lost: list[str] = []

    def race() -> None:
        lock = RunLock(folder, "care pretrain")
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except CareError as exc:
            lost.append(str(exc))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, lost


def test_racing_threads_give_one_winner(tmp_path: Path) -> None:
    for round_ in range(20):
        folder = tmp_path / str(round_)
        if round_ % 2:
            fake_lock(folder, NO_SUCH_PID)  # a stale lock to take over
        won, lost = _race_threads(folder, 6)
        assert len(won) == 1 and len(lost) == 5, (won, lost)
        assert all(f"in use by care pretrain (pid {os.getpid()} " in m for m in lost), lost
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # no breaker left
        won[0].release()
        assert not folder.exists() or list(folder.iterdir()) == []


def test_a_late_breaker_never_removes_a_lock_taken_over_meanwhile(tmp_path: Path) -> None:
    fake_lock(tmp_path, NO_SUCH_PID)
    late = RunLock(tmp_path, "care pretrain")
    judged = late._read()  # it saw the stale lock ...
    assert judged is not None and late._judge(judged) == "stale"
    with RunLock(tmp_path, "care ablate"):  # ... another process took it over ...
        late._break(judged)  # ... and then it breaks what it judged stale
        assert _mine(tmp_path)["command"] == "care ablate"
        assert f"in use by care ablate (pid {os.getpid()} " in _refusal(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_breaker_file_left_by_a_killed_breaker_is_removed_once_old(tmp_path: Path) -> None:
    fake_lock(tmp_path, NO_SUCH_PID)
    breaker = tmp_path / f"{LOCK_NAME}.break"
    breaker.touch()
    old = time.time() - BREAK_STALE_S - 1
    os.utime(breaker, (old, old))
    with RunLock(tmp_path, "care pretrain"):
        assert _mine(tmp_path)["pid"] == os.getpid()
        assert not breaker.exists()


def _racer(folder: Path, go: Any, done: Any, results: Any) -> None:
    """One racing process (forked): lock ``folder`` when ``go`` is set, hold it until ``done``."""
    go.wait()
    try:
        with RunLock(folder, "care pretrain"):
            results.put((os.getpid(), "won"))
            done.wait(60)
    except CareError as exc:
        results.put((os.getpid(), str(exc)))


def test_racing_processes_over_a_stale_lock_give_one_winner(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")  # fast: the racers need not import torch again
    for round_ in range(5):
        folder = tmp_path / str(round_)
        fake_lock(folder, NO_SUCH_PID)
        go, done, results = context.Event(), context.Event(), context.Queue()
        racers = [
            context.Process(target=_racer, args=(folder, go, done, results)) for _ in range(4)
        ]
        for racer in racers:
            racer.start()
        try:
            go.set()
            outcomes = dict(results.get(timeout=60) for _ in racers)
            done.set()
            for racer in racers:
                racer.join(60)
                assert racer.exitcode == 0
        finally:
            for racer in racers:
                racer.kill()
                racer.join()
        winners = [pid for pid, outcome in outcomes.items() if outcome == "won"]
        assert len(winners) == 1, outcomes
        losers = [outcome for outcome in outcomes.values() if outcome != "won"]
        assert all(
            m.startswith(f"{folder} is in use by care pretrain (pid {winners[0]} on host")
            for m in losers
        ), losers
        assert not (folder / LOCK_NAME).exists()


def test_care_ablate_refuses_an_out_in_use(
    fake_fmnist: Path,
    tmp_path: Path,
    sleeper: subprocess.Popen[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "abl"
    path = fake_lock(out, sleeper.pid, command="care ablate")
    before = path.read_bytes()
    argv = ["ablate", "--config", "configs/fashion-mnist.yaml"]
    argv += tiny(fake_fmnist, out, "probe_epochs=1", "knn_every=0")
    fails_with_one_line(capsys, argv, f"{out} is in use by care ablate (pid {sleeper.pid} on host ")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing trained
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "env, locks",
    [
        ({}, True),
        ({"LOCAL_RANK": "1"}, False),
        ({"RANK": "2"}, False),
        ({"SLURM_PROCID": "3"}, False),
    ],
)
def test_only_the_launchers_rank_zero_takes_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], locks: bool
) -> None:
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with rank_zero_lock(tmp_path, "care pretrain") as lock:
        assert (lock is not None) is locks
        assert (tmp_path / LOCK_NAME).exists() is locks
    assert list(tmp_path.iterdir()) == []
