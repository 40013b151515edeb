"""The benchmark scripts run end to end on tiny settings and report well-formed figures.

These check that the scripts work from a clean clone; the figures they print on tiny random data
mean nothing and no timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from scipy import stats

from care.hardware import resolve_memory_format
from tests.conftest import tiny
from tests.test_run_lock import fake_lock

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["widths=[4,4,8,8]", "head_hidden=16", "head_out=8", "group_size=8", "precision=32"]


def _script(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_throughput_times_every_method_and_the_backbone_alone(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    args = ["--synthetic", "3x16", "--json", str(out), "batch_size=16", "steps=2", "warmup=1"]
    printed = _script("throughput.py", *args, *TINY_MODEL)
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert set(results) == {
        "simclr",
        "care (separate views)",
        "care (shared views)",
        "moco",
        "care_moco (separate views)",
    }
    for r in results.values():
        phases = r["augment"] + r["forward"] + r["loss"] + r["backward"]
        assert abs(r["step"] - phases) < 1e-9 and r["step"] > 0
        assert r["images_per_s"] == 16 / r["step"] and r["backbone_only"] > 0
        assert r["unsynced_images_per_s"] == 16 / r["unsynced_step"] > 0
        assert r["faults"] >= 0
        assert isinstance(r["early_backward"], bool)
    assert results["care (separate views)"]["views"] == 4
    assert results["care (shared views)"]["views"] == 2
    assert printed.count("\n| ") == 6  # header and five methods
    assert payload["config"]["precision"] == "32"  # TINY_MODEL's; memory_format=auto resolved:
    assert payload["config"]["memory_format"] == resolve_memory_format("auto", "cpu")
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert payload["tuned_malloc"] is glibc  # as the `care` command sets it


def test_throughput_compares_settings_in_one_run(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    args = ["--synthetic", "1x16", "--json", str(out), "batch_size=16", "steps=1", "warmup=1"]
    args += ["--variants", "simclr,care-separate", *TINY_MODEL]
    args += ["--compare", "precision=32 memory_format=contiguous"]
    args += ["--compare", "precision=32 memory_format=channels_last"]
    printed = _script("throughput.py", *args)
    payload = json.loads(out.read_text())
    labels = [
        f"{name} [precision=32 memory_format={fmt}]"
        for fmt in ("contiguous", "channels_last")
        for name in ("simclr", "care (separate views)")
    ]
    assert sorted(payload["results"]) == sorted(labels)
    formats = [c["memory_format"] for c in payload["configs"].values()]
    assert formats == ["contiguous", "channels_last"]
    assert "speed-up of a whole step over [precision=32 memory_format=contiguous]" in printed
    assert printed.count("| 1.00× |") >= 2  # the baseline column, one per variant


def test_bf16_effect_compares_loss_terms_and_gradients(tmp_path: Path, fake_fmnist: Path) -> None:
    out = tmp_path / "bf16.json"
    _script(
        "bf16_effect.py", "--json", str(out), f"data_root={fake_fmnist}", "batch_size=16",
        "batches=2", *TINY_MODEL,
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    for name, r in results.items():
        assert 0.0 < r["grad_rel_change"] < 2.0, name  # bf16 differs, but not arbitrarily
        assert -1.0 <= r["grad_cosine"] <= 1.0 and r["rel_change_loss"] >= 0.0
    assert "rel_change_equi" in results["care (shared views)"]
    assert "rel_change_equi" not in results["simclr"]


def test_quality_trains_probes_measures_and_reports(tmp_path: Path, fake_fmnist: Path) -> None:
    """2 seeds of simclr and care-shared, with a kNN check every 2 of the 4 steps."""
    budget = tiny(fake_fmnist, tmp_path / "unused", "probe_epochs=1", "knn_every=0")
    budget = [b for b in budget if not b.startswith("out=")] + ["knn_every_steps=2"]
    out = tmp_path / "quality"
    _script(
        "quality.py", "--stage", "main", "--seeds", "2", "--variants", "simclr,care-shared",
        "--weight", "0.1", "--out", str(out), *budget,
    )  # fmt: skip
    (folder,) = out.iterdir()
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "care-shared-lam0.1-s0",
        "care-shared-lam0.1-s1",
        "simclr-s0",
        "simclr-s1",
    ]
    report = json.loads((folder / "quality.json").read_text())
    assert [(r["variant"], r["seed"]) for r in report["rows"]] == [
        ("simclr", 0),
        ("simclr", 1),
        ("care-shared", 0),
        ("care-shared", 1),
    ]
    rows = {r["variant"]: r for r in report["rows"] if r["seed"] == 0}
    care = rows["care-shared"]
    assert care["weight"] == 0.1 and rows["simclr"]["weight"] is None
    assert care["trials"] == 20 and 0 <= care["lower_ratio_trials"] <= 20
    for r in rows.values():
        assert 0.0 <= r["linear"] <= 100.0 and 0.0 <= r["knn"] <= 100.0
        assert r["wahba"] > 0.0 and r["wahba_ratio"] > 0.0
        assert r["wall_time_s"] >= r["train_time_s"] > 0.0
    by_seed = {(r["variant"], r["seed"]): r for r in report["rows"]}
    paired = report["table"]["care-shared λ=0.1"]["paired"]
    for metric in ("linear", "knn", "wahba_ratio", "wahba", "gamma"):
        expected = [
            by_seed["care-shared", s][metric] - by_seed["simclr", s][metric] for s in (0, 1)
        ]
        assert paired[metric]["differences"] == pytest.approx(expected)
        assert paired[metric]["low"] <= paired[metric]["mean"] <= paired[metric]["high"]
    table = (folder / "quality.md").read_text()
    assert "| simclr | 2 |" in table and "| care-shared λ=0.1 | 2 |" in table
    assert "### Paired against simclr" in table and "| care-shared λ=0.1 | 2 | " in table
    assert (folder / "quality.png").stat().st_size > 5000
    assert (folder / "knn_vs_time.png").stat().st_size > 5000


def test_quality_paired_interval_is_the_paired_t_interval() -> None:
    quality = _benchmark_module("quality")
    # exact case: differences 1, 2, 3 have mean 2 and standard deviation 1; t(0.975, 2 df)
    interval = quality.paired_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (interval["low"], interval["mean"], interval["high"]) == pytest.approx(
        (2 - half, 2.0, 2 + half)
    )
    # against scipy's paired t-test on the two samples
    rng = np.random.default_rng(0)
    simclr, care = rng.normal(80, 1, 5), rng.normal(80.5, 1, 5)
    reference = stats.ttest_rel(care, simclr).confidence_interval(0.95)
    interval = quality.paired_interval(list(care - simclr))
    assert (interval["low"], interval["high"]) == pytest.approx(
        (reference.low, reference.high), rel=1e-12
    )
    assert "low" not in quality.paired_interval([0.4])


def test_quality_verdict_names_a_method_only_when_the_interval_excludes_zero() -> None:
    verdict = _benchmark_module("quality").verdict
    above = {"mean": 1.0, "low": 0.2, "high": 1.8}
    below = {"mean": -1.0, "low": -1.8, "high": -0.2}
    across = {"mean": 0.5, "low": -0.1, "high": 1.1}
    assert verdict(above, True) == "CARE is better"  # probe accuracy went up
    assert verdict(below, True) == "SimCLR is better"
    assert verdict(below, False) == "CARE is better"  # W_f ÷ invariance distance went down
    assert verdict(above, False) == "SimCLR is better"
    assert verdict(across, True) == verdict(across, False) == "no difference detected"
    assert verdict({"mean": 0.4, "n": 1}, True) == "one seed: no interval"


def test_quality_budget_folder_names_stay_short_and_distinct() -> None:
    budget_tag = _benchmark_module("quality").budget_tag
    assert budget_tag(["train_samples=20000", "epochs=3"]) == "train_samples20000-epochs3"
    long = [f"data_root=/tmp/{'x' * 200}", "epochs=1"]
    other = [f"data_root=/tmp/{'x' * 200}", "epochs=2"]
    assert len(budget_tag(long)) <= 120 and budget_tag(long) != budget_tag(other)


def test_quality_full_stage_runs_every_method_on_the_same_seeds() -> None:
    quality = _benchmark_module("quality")
    runs = quality.full_stage_runs(3)
    assert [r.name for r in runs[:5]] == [
        "simclr-s0",
        "care-separate-lam0.01-s0",
        "care-separate-lam0.1-s0",
        "care-separate-lam0.3-s0",
        "care-shared-lam0.03-s0",
    ]
    assert [r.seed for r in runs] == [0] * 5 + [1] * 5 + [2] * 5
    assert runs[6].overrides == ["method=care", "views=separate", "weight=0.01"]
    assert runs[9].overrides == ["method=care", "views=shared", "weight=0.03"]
    assert runs[0].overrides == ["method=simclr"]


def test_quality_refuses_a_budget_folder_in_use(tmp_path: Path) -> None:
    out = tmp_path / "quality"
    folder = out / "epochs1"  # the budget folder of `epochs=1` (quality.budget_tag)
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--stage", "report"]
    command += ["--out", str(out), "epochs=1"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        fake_lock(folder, holder.pid, command="benchmarks/quality.py")
        refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    error = refused.stderr.strip()
    assert "\n" not in error and "Traceback" not in error, error
    assert error.startswith(
        f"error: {folder} is in use by benchmarks/quality.py (pid {holder.pid} on host "
    ), error
    assert error.endswith("wait for it, stop it, or choose another --out"), error
    # the holder is gone (killed): its lock is stale, and the script runs
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"no finished runs in {folder} yet" in done.stdout
    assert list(folder.iterdir()) == []


def _benchmark_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_throughput_selects_variants_by_short_name() -> None:
    throughput = _benchmark_module("throughput")
    chosen = throughput.select_variants("simclr,care-separate,care-shared")
    assert list(chosen) == ["simclr", "care (separate views)", "care (shared views)"]
    assert list(throughput.select_variants(None)) == list(throughput.VARIANTS)
    try:
        throughput.select_variants("simclr,byol")
    except SystemExit as exc:
        assert "care-separate" in str(exc)
    else:
        raise AssertionError("an unknown variant must be refused")


def test_sync_counter_counts_every_sync_warning_whatever_the_filters() -> None:
    counter = _benchmark_module("gpu_step").SyncCounter(cuda=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as pytest's filterwarnings sets for UserWarning
        counter.start()
        for _ in range(3):  # the same line thrice: none deduplicated
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
        result = counter.stop()
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
    assert result["syncs"] == 3 and result["other_warnings"] == 1
    ((where, count),) = result["where"].items()
    assert where.startswith("tests/test_benchmarks.py:") and count == 3
    assert not counter.active and counter.stop()["syncs"] == 0


def test_report_marks_a_failed_part_with_its_last_error_line(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    out.mkdir()
    (work / "parts.tsv").write_text(
        "setup\t0\t1000\t45\n"
        "throughput_resnet18\t1\t2000\t75\n"
        "throughput_resnet50\t124\t100000\t100\n"
        "gpu_step\tskipped\t0\t3\n"
    )
    (work / "logs" / "throughput_resnet18.log").write_text(
        "timing rounds\nTraceback (most recent call last):\n  File x\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n\n"
    )
    gpu_step = _benchmark_module("gpu_step")
    assert gpu_step.main(["report", "--out", str(out), "--work", str(work)]) == 1
    table = (out / "gpu_check.md").read_text()
    assert table.count("\n| ") >= 8 and "| part | item | result |" in table
    assert (
        "| 2 throughput | resnet18 | FAILED (exit 1): torch.OutOfMemoryError: CUDA out of memory."
        in table
    )
    assert "| 2 throughput | resnet50 | FAILED: timed out after 100 s |" in table
    assert "| 3 syncs | gpu_step.py | SKIPPED: no time left in the budget |" in table
    assert "| 5 pretrain | care pretrain | FAILED: did not run |" in table
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts["setup"]["ok"] and not parts["throughput_resnet18"]["ok"]


def test_gpu_check_smoke_runs_every_part_on_the_cpu(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "OUT": str(out), "GPU_CHECK_WORK": str(work)}
    env["PYTHON"] = sys.executable
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    table = (out / "gpu_check.md").read_text()
    assert done.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # printed last
    assert "FAILED" not in table and "SKIPPED" not in table, table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    labels = {tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows}
    for backbone in ("resnet18", "resnet50"):
        for variant in ("simclr", "care (separate views)", "care (shared views)"):
            assert ("2 throughput", f"{backbone} {variant}") in labels
            assert ("3 syncs", f"{backbone} {variant}") in labels
            assert ("4 peak memory", f"{backbone} {variant}") in labels
    assert {"1 tests", "5 pretrain", "5 probe"} <= {part for part, _ in labels}
    report = json.loads((out / "gpu_check.json").read_text())
    assert set(report["parts"]) == {
        "setup", "tests", "throughput_resnet18", "throughput_resnet50", "gpu_step", "data",
        "pretrain", "probe",
    }  # fmt: skip
    assert all(p["ok"] for p in report["parts"].values())
    assert report["tests"]["failed"] == 0
    pretrain = json.loads((out / "pretrain.json").read_text())
    assert pretrain["summary"]["epochs"] == 2 and pretrain["summary"]["train_images"] == 160
    assert 0.0 <= pretrain["probe"]["linear"]["mean"] <= 100.0
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back


def test_step_probe_counts_the_syncs_of_the_measured_steps_only() -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    class Warns(L.LightningModule):
        """Warns like the sync debug mode once in every training step, twice in step 2."""

        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            for _ in range(2 if self.global_step == 2 else 1):
                warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
            return self.layer(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = _benchmark_module("gpu_step").step_probe(first=1, count=2, cuda=False, log_every=100)
    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", logger=False, callbacks=[probe], log_every_n_steps=100,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Warns(), DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=2))
    assert [(s["step"], s["syncs"], s["logging_step"]) for s in probe.steps] == [
        (1, 1, False),
        (2, 2, False),
    ]
    assert all(s["step_s"] > 0 and "peak_bytes" not in s for s in probe.steps)
    assert not probe.counter.active


def test_preemption_counts_the_steps_a_kill_loses(tmp_path: Path) -> None:
    out = tmp_path / "preemption.json"
    args = ["--trials", "1", "--every", "0,5", "--out", str(out), "widths=[4,4,8,8]"]
    printed = _script("preemption.py", *args, "head_hidden=16", "head_out=8", "precision=32")
    trials = json.loads(out.read_text())
    assert [(t["every"], t["signal"]) for t in trials] == [
        (0, "SIGKILL"),
        (5, "SIGKILL"),
        (0, "SIGTERM"),
    ]
    for t in trials:
        assert t["lost"] == max(0, t["done"] - t["kept"]) and t["done"] >= 1
    assert trials[1]["lost"] <= 5  # with a checkpoint every 5 steps, at most 5 are lost
    assert trials[2]["lost"] == 0 and trials[2]["kept"] >= trials[2]["done"]  # SIGTERM saves
    assert "checkpoint_every_steps=5, SIGKILL" in printed and f"wrote {out}" in printed
