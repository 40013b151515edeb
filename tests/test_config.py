from __future__ import annotations

from pathlib import Path

import pytest

from care.config import Config, load_config, to_yaml
from care.errors import CareError

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
        (["batch_size=250", "group_size=16"], "batch_size=250 does not split into groups"),
        (["lr=-1"], "'lr'"),
        (["widths=[1,2]"], "widths"),
        (["group_size=1"], "group_size"),
    ],
)
def test_bad_settings_fail_with_one_line(overrides: list[str], fragment: str) -> None:
    with pytest.raises(CareError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_simclr_does_not_need_divisible_groups() -> None:
    assert load_config(None, ["method=simclr", "batch_size=250"]).batch_size == 250


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
