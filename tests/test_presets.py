"""The paper's presets (configs/paper/): they parse, hold the paper's values, and each trains one
step on tiny fake data in its dataset's real on-disk format (preset's backbone, stem, method,
optimiser and schedule kept; only sizes shrunk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from care.cli import main
from care.config import load_config
from care.data.folder import LISTS_DIR, read_class_list
from care.hardware import resolve
from care.train import pretrain
from tests.data.test_cifar import write_cifar10
from tests.data.test_stl10 import write_stl10
from tests.data.writers import cifar_batch, py2_pickle, rng_images, write_png

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
DATASETS = ("cifar10", "cifar100", "stl10", "imagenet100")
METHODS = ("simclr", "care", "moco", "care_moco")
PRESETS = [f"{d}-{m}" for d in DATASETS for m in METHODS]

#: The paper's number of L_equi groups per batch (small datasets) or per GPU (ImageNet100).
GROUPS = {"cifar10": 16, "cifar100": 4, "stl10": 8}
LAMBDA = {"cifar10": 0.01, "cifar100": 0.001, "stl10": 0.01}


def test_the_folder_holds_exactly_the_sixteen_presets() -> None:
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_prints_its_config(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = PAPER / f"{name}.yaml"
    assert main(["pretrain", "--config", str(path), "--print-config"]) == 0
    printed = OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out))
    assert printed == resolve(load_config(path)).to_dict()  # auto settings resolved here
    assert "auto" not in (printed["precision"], printed["memory_format"])
    text = path.read_text()
    assert text.startswith("# "), "a preset starts with a comment block naming its sources"
    assert "github.com/Sharut/CARE" in text.split("\n\n")[0]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_holds_the_paper_values(name: str) -> None:
    dataset, method = name.split("-")
    cfg = load_config(PAPER / f"{name}.yaml")
    moco = method in ("moco", "care_moco")
    assert cfg.method == method
    assert (cfg.backbone, cfg.widths, cfg.head_out) == ("resnet50", [64, 128, 256, 512], 128)
    assert cfg.views == "separate" and cfg.pairs == "per_group" and cfg.embedding == "sphere"
    assert cfg.probe_seeds == 5  # paper, Figure 4
    if dataset == "imagenet100":
        assert (cfg.dataset, cfg.class_list, cfg.stem, cfg.image_size) == (
            "imagefolder",
            "imagenet100",
            "imagenet",
            224,
        )
        assert cfg.batch_size * cfg.devices * cfg.num_nodes == 512
        assert (cfg.devices, cfg.num_nodes, cfg.strategy) == (2, 2, "ddp")
        assert (cfg.epochs, cfg.optimizer, cfg.lr, cfg.momentum) == (200, "sgd", 0.8, 0.9)
        assert (cfg.weight_decay, cfg.scheduler, cfg.head_hidden, cfg.temperature) == (
            1e-4,
            "cosine",
            2048,
            0.2,
        )
        groups_per_gpu, weight = (8, 0.01) if moco else (4, 0.005)
        assert cfg.batch_size // cfg.group_size == groups_per_gpu
        assert cfg.weight == weight
        if moco:
            assert (cfg.moco_momentum, cfg.queue_size) == (0.99, 65536)
        assert (cfg.probe_optimizer, cfg.probe_lr, cfg.probe_milestones, cfg.probe_epochs) == (
            "sgd",
            30.0,
            [30, 40, 50],
            60,
        )
        return
    assert (cfg.dataset, cfg.stem, cfg.epochs, cfg.batch_size, cfg.head_hidden) == (
        dataset,
        "cifar",
        400,
        256,
        512,
    )
    assert cfg.devices * cfg.num_nodes == 1
    assert cfg.batch_size // cfg.group_size == GROUPS[dataset]
    assert cfg.batch_size % cfg.group_size == 0
    assert cfg.weight == LAMBDA[dataset]
    assert cfg.temperature == (0.2 if moco else 0.5)
    if moco:
        assert (cfg.moco_momentum, cfg.queue_size) == (0.99, 4096)
    if dataset == "stl10":
        assert cfg.image_size == 32
        assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum) == ("sgd", 0.06, 5e-4, 0.9)
        assert (cfg.scheduler, cfg.warmup_epochs) == ("cosine", 10.0)
    else:
        assert cfg.image_size is None  # native 32 px
        assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("adam", 1e-3, 1e-6)
        assert (cfg.scheduler, cfg.warmup_epochs) == ("constant", 0.0)
    assert (cfg.probe_optimizer, cfg.probe_lr, cfg.probe_milestones) == ("adam", 1e-3, [])


# --- one training step on tiny fake data --------------------------------------------------------

BATCH = 8


def _write_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, seed in (("train", 0), ("test", 1)):
        images = rng_images(seed, (BATCH, 3, 32, 32))
        batch = cifar_batch(images, [i * 11 % 100 for i in range(BATCH)], label_key=b"fine_labels")
        (folder / name).write_bytes(py2_pickle(batch))


def _write_imagenet100(root: Path) -> None:
    """One 8x8 PNG per ImageNet100 synset in train/ (and one in val/ for the first classes)."""
    for i, synset in enumerate(read_class_list(LISTS_DIR / "imagenet100.txt")):
        write_png(root / "train" / synset / "0.png", rng_images(i, (8, 8, 3)))
        if i < 2:
            write_png(root / "val" / synset / "0.png", rng_images(1000 + i, (8, 8, 3)))


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny datasets in their real formats, one folder per preset dataset."""
    roots = {d: tmp_path_factory.mktemp(d) for d in DATASETS}
    write_cifar10(roots["cifar10"], per_batch=2)  # 10 training images
    _write_cifar100(roots["cifar100"])
    write_stl10(roots["stl10"], n_train=4, n_test=2, n_unlabeled=4)  # pretrain = 4 + 4
    _write_imagenet100(roots["imagenet100"])
    return roots


def shrink(root: Path, out: Path) -> list[str]:
    """Overrides that keep a preset's method, backbone, stem, optimiser and schedule but make
    one step of it take about a second on the CPU."""
    return [
        f"data_root={root}",
        f"out={out}",
        "widths=[4,4,4,4]",
        "head_hidden=8",
        "head_out=8",
        f"batch_size={BATCH}",
        f"train_samples={BATCH}",  # one batch: one step per epoch
        "group_size=4",
        "queue_size=16",
        "image_size=8",
        "epochs=1",
        "knn_every=0",
        "devices=1",
        "num_nodes=1",
        "strategy=auto",
        "sync_batchnorm=false",  # torch's SyncBatchNorm has no CPU kernel
        "accelerator=cpu",
        "precision=32",
        "num_workers=0",
        "log_every=1",
    ]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_one_step(name: str, fake_roots: dict[str, Path], tmp_path: Path) -> None:
    dataset = name.split("-")[0]
    extra = ["load_size=8"] if dataset == "imagenet100" else []
    path = PAPER / f"{name}.yaml"
    preset = load_config(path)
    cfg = load_config(path, [*shrink(fake_roots[dataset], tmp_path / "run"), *extra])
    for key in ("method", "backbone", "stem", "optimizer", "scheduler", "warmup_epochs", "lr"):
        assert getattr(cfg, key) == getattr(preset, key), key
    run = pretrain(cfg)
    summary = json.loads(run.summary.read_text())
    assert summary["steps"] == 1 and summary["method"] == preset.method
    assert run.backbone.is_file()
    metrics = run.metrics.read_text()
    assert "train/loss" in metrics.splitlines()[0]
