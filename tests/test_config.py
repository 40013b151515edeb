from __future__ import annotations

from pathlib import Path

import pytest

from care.augment import PAIRS_MODES
from care.config import (
    CHOICES,
    EVALUATION_KEYS,
    KEYS,
    TRAINING_KEYS,
    Config,
    load_config,
    to_yaml,
    training_differences,
    with_overrides,
)
from care.data import DATASETS
from care.errors import CareError
from care.evaluate.probe import PROBE_OPTIMIZERS
from care.geometry import FORMS
from care.methods import METHODS, OPTIMIZERS, SCHEDULERS
from care.models import ARCHITECTURES, EMBEDDINGS, STEMS
from care.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_cpu_preset() -> None:
    assert load_config(ROOT / "configs" / "fashion-mnist.yaml") == Config()


def test_overrides_are_typed() -> None:
    cfg = load_config(
        None,
        [
            "lr=1e-3",
            "epochs=3",
            "widths=[8,8,16,16]",
            "resume=true",
            "train_samples=512",
            "data_root=/tmp/x",
        ],
    )
    assert cfg.lr == pytest.approx(1e-3)
    assert cfg.epochs == 3 and cfg.widths == [8, 8, 16, 16] and cfg.resume is True
    assert cfg.train_samples == 512 and cfg.data_root == "/tmp/x"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["bogus=1"], "unknown config key 'bogus'"),
        (["epochs"], "key=value"),
        (["epochs=abc"], "epochs"),
        (["method=byol"], "'method'"),
        (["lr=-1"], "'lr'"),
        (["widths=[1,2]"], "widths"),
        (["group_size=0"], "group_size"),
    ],
)
def test_bad_settings_fail_with_one_line(overrides: list[str], fragment: str) -> None:
    with pytest.raises(CareError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(CareError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(CareError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochz: 3\n")
    with pytest.raises(CareError, match="epochz"):
        load_config(unknown)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["method=simclr", "epochs=7"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_choices_match_the_registries() -> None:
    registries = {
        "dataset": DATASETS,
        "method": METHODS,
        "pairs": PAIRS_MODES,
        "backbone": ARCHITECTURES,
        "stem": STEMS,
        "embedding": EMBEDDINGS,
        "equi_form": ("auto", *FORMS),
        "optimizer": OPTIMIZERS,
        "scheduler": SCHEDULERS,
        "probe_optimizer": PROBE_OPTIMIZERS,
    }
    for key, registry in registries.items():
        assert set(CHOICES[key]) == set(registry), key


def test_settings_that_do_not_change_what_is_learned_are_marked_once() -> None:
    untrained = set(KEYS) - set(TRAINING_KEYS)
    assert set(EVALUATION_KEYS) < untrained
    assert untrained - set(EVALUATION_KEYS) == {
        "out",
        "resume",
        "knn_every",
        "knn_every_steps",
        "knn_bank_samples",
        "log_every",
        "memory_format",
        "cudnn_benchmark",
        "activation_checkpointing",
        "checkpoint_every_steps",
        "loggers",
    }
    assert {"data_root", "accelerator", "knn_k", "probe_epochs", "probe_lr", "num_workers"} <= set(
        EVALUATION_KEYS
    )
    assert {"method", "lr", "epochs", "seed", "weight", "precision", "devices"} <= set(
        TRAINING_KEYS
    )


def test_training_differences_ignore_untrained_keys_and_the_allowed_ones() -> None:
    saved = load_config(None, ["out=a", "lr=0.1"])
    moved = load_config(None, ["out=b", "lr=0.1", "probe_epochs=3", "num_workers=2"])
    assert training_differences(saved, moved) == []
    longer = load_config(None, ["out=a", "lr=0.2", "epochs=9"])
    assert training_differences(saved, longer) == ["epochs", "lr"]
    assert training_differences(saved, longer, allowed=("epochs",)) == ["lr"]


def test_with_overrides_types_and_validates() -> None:
    cfg = with_overrides(Config(), {"probe_milestones": [3, 4], "probe_lr": 30})
    assert cfg.probe_milestones == [3, 4] and cfg.probe_lr == 30.0
    with pytest.raises(CareError, match="'probe_lr'"):
        with_overrides(Config(), {"probe_lr": -1.0})
    with pytest.raises(CareError, match="probe_epochs"):
        with_overrides(Config(), {"probe_epochs": "many"})


@pytest.mark.parametrize(
    "path", ["runs/exp #2", "runs/a: b", "runs/${x}", "runs/${oc.env:HOME}/y", "runs/[1,2]"]
)
def test_path_values_are_taken_literally(path: str, tmp_path: Path) -> None:
    """`out=runs/exp #2` is that folder: YAML would read `#2` as a comment, `: ` as a mapping
    and `${x}` as an interpolation. The value survives with_overrides and the saved YAML."""
    cfg = load_config(None, [f"out={path}", f"data_root={path}/data", f"class_list={path}.txt"])
    assert (cfg.out, cfg.data_root, cfg.class_list) == (path, f"{path}/data", f"{path}.txt")
    again = with_overrides(cfg, {"lr": 0.5, "data_root": f"{path}/other"})
    assert (again.out, again.data_root) == (path, f"{path}/other")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(again))
    read = RunDir(run).read_config()
    assert (read.out, read.data_root) == (path, f"{path}/other")
    assert with_overrides(read, {}).out == path


def test_empty_or_null_paths_are_unset() -> None:
    cfg = load_config(None, ["data_root=", "class_list=null", "out=runs/x"])
    assert cfg.data_root is None and cfg.class_list is None


def test_ddp_spawn_is_refused_in_one_line_that_points_to_ddp() -> None:
    with pytest.raises(CareError, match=r"strategy=ddp_spawn is not supported.*strategy=ddp") as e:
        load_config(None, ["strategy=ddp_spawn"])
    assert "\n" not in str(e.value)
    assert "ddp_spawn" not in CHOICES["strategy"]
