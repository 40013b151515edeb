"""The run configuration: one flat schema, YAML presets and ``key=value`` overrides.

The defaults are the CPU preset (``configs/fashion-mnist.yaml``): a ResNet-18 with widths
16-32-64-128 on Fashion-MNIST at 28 px, which pretrains on a laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from care.errors import CareError
from care.geometry import FORMS

#: The values each choice key accepts. Where a registry defines them (datasets, methods,
#: backbones, stems, embeddings, pair modes, optimisers), tests/test_config.py proves that they
#: match it; the config sits below those modules, so it cannot import them.
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("fashion-mnist", "mnist", "cifar10", "cifar100", "stl10", "imagefolder"),
    "method": ("simclr", "care", "equi_unif", "moco", "care_moco"),
    "views": ("separate", "shared"),
    "pairs": ("per_group", "per_batch"),
    "backbone": ("resnet18", "resnet34", "resnet50"),
    "stem": ("cifar", "imagenet"),
    "optimizer": ("adam", "sgd", "lars"),
    "probe_optimizer": ("adam", "sgd"),
    "embedding": ("sphere", "hyperboloid"),
    "equi_form": ("auto", *FORMS),
    "strategy": ("auto", "ddp"),
    "scheduler": ("cosine", "constant"),
    "precision": ("auto", "32", "bf16-mixed", "16-mixed"),
    "memory_format": ("auto", "channels_last", "contiguous"),
    "accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
}


#: The values ``loggers`` lists (care.train.loggers builds them; tests/test_config.py checks).
LOGGER_NAMES = ("csv", "tensorboard", "wandb")

#: Field metadata of a setting that does not change what is learned (where the run lives, how
#: it is monitored, logged or evaluated). A run trained with other values of these keys is the
#: same run: ``resume=true`` and ``care ablate`` accept it (:func:`training_differences`).
UNTRAINED: dict[str, Any] = {"trains": False}
#: Field metadata of an evaluation setting: it does not change what is learned, and
#: ``care probe`` may override it for a finished run (:data:`EVALUATION_KEYS`).
EVALUATION: dict[str, Any] = {"trains": False, "evaluation": True}


@dataclass
class Config:
    """Every setting of a pretraining run. Names match the CLI's ``key=value`` overrides.

    A field's metadata marks the settings that do not change what is learned
    (:data:`UNTRAINED`, :data:`EVALUATION`); every comparison of a saved config uses it.
    """

    # data
    dataset: str = "fashion-mnist"
    # None: $CARE_DATA/<dataset>, ./data/<dataset>, /usr/share/datasets/<dataset>
    data_root: str | None = field(default=None, metadata=EVALUATION)
    class_list: str | None = None  # imagefolder: file with one class per line, or imagenet100
    train_samples: int | None = None  # use only the first N pretraining images
    image_size: int | None = None  # crop output size; None: the dataset's native size
    load_size: int | None = None  # imagefolder: decode size before cropping (default 256)
    crop_min_scale: float = 0.08  # RandomResizedCrop scale lower bound
    num_workers: int = field(default=0, metadata=EVALUATION)  # loader workers; `care probe` too
    # method
    method: str = "care"
    views: str = "separate"  # separate: 2 InfoNCE + 2 group-shared views; shared: 2 in all
    pairs: str = "per_group"  # per_group (Algorithm 1) or per_batch (the official code)
    group_size: int = 16  # m: images that share one augmentation pair
    weight: float = 0.01  # λ, the weight of L_equi
    temperature: float = 0.5
    moco_momentum: float = 0.99  # m of the key encoder's EMA (MoCo only)
    queue_size: int = 65536  # negatives kept in the MoCo queue
    # geometry
    embedding: str = "sphere"  # sphere: unit sphere; hyperboloid: Lorentz model of hyperbolic space
    curvature: float = 1.0  # hyperboloid: c in -x0^2 + |x|^2 = -1/c
    equi_form: str = "auto"  # L_equi's form; auto: euclidean (sphere), minkowski (hyperboloid)
    # model
    backbone: str = "resnet18"
    stem: str = "cifar"
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    head_hidden: int = 512
    head_out: int = 128
    # optimisation
    epochs: int = 5
    batch_size: int = 256  # per device
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-6
    momentum: float = 0.9  # SGD and LARS
    # no weight decay (nor LARS trust ratio) on BN and biases; None: true for lars, else false
    exclude_bias_and_norm: bool | None = None
    lars_trust_coefficient: float = 0.001  # LARS's eta (You et al., 2017; SimCLR uses 0.001)
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    precision: str = "auto"  # auto: bf16-mixed with native bf16, 16-mixed on older GPUs, else 32
    # auto: channels_last where it measures faster (docs/benchmarks.md), else contiguous
    memory_format: str = field(default="auto", metadata=UNTRAINED)
    cudnn_benchmark: bool = field(default=True, metadata=UNTRAINED)  # CUDA: autotune conv kernels
    allow_tf32: bool = True  # CUDA: TF32 tensor cores for float32 matmuls and convolutions
    # recompute each backbone stage in the backward pass instead of keeping its activations
    activation_checkpointing: bool = field(default=False, metadata=UNTRAINED)
    accelerator: str = field(default="auto", metadata=EVALUATION)
    devices: int = 1  # per node; batch_size is per device
    num_nodes: int = 1
    strategy: str = "auto"  # ddp for several devices or nodes
    sync_batchnorm: bool = False
    seed: int = 0
    # online monitor and evaluation
    knn_every: int = field(default=1, metadata=UNTRAINED)  # epochs between kNN checks; 0: off
    # optimizer steps between kNN checks, counted across epochs (0: every knn_every epochs)
    knn_every_steps: int = field(default=0, metadata=UNTRAINED)
    knn_k: int = field(default=200, metadata=EVALUATION)
    knn_temperature: float = field(default=0.1, metadata=EVALUATION)
    # training images in the online kNN bank (None: all)
    knn_bank_samples: int | None = field(default=10000, metadata=UNTRAINED)
    probe_epochs: int = field(default=30, metadata=EVALUATION)
    probe_seeds: int = field(default=3, metadata=EVALUATION)
    probe_optimizer: str = field(default="adam", metadata=EVALUATION)
    probe_lr: float = field(default=1e-3, metadata=EVALUATION)
    # epochs where the probe's lr drops 10x
    probe_milestones: list[int] = field(default_factory=list, metadata=EVALUATION)
    probe_weight_decay: float = field(default=1e-6, metadata=EVALUATION)
    probe_batch_size: int = field(default=256, metadata=EVALUATION)
    # run directory
    out: str = field(default="runs/care", metadata=UNTRAINED)
    resume: bool = field(default=False, metadata=UNTRAINED)
    log_every: int = field(default=20, metadata=UNTRAINED)  # steps between logged metrics
    # where metrics go: csv (metrics.csv, always), tensorboard, wandb (an optional extra)
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"], metadata=UNTRAINED)
    # also write checkpoints/last.ckpt every N training steps (0: at epoch ends only)
    checkpoint_every_steps: int = field(default=0, metadata=UNTRAINED)

    @property
    def form(self) -> str:
        """The bilinear form of L_equi: ``equi_form``, or the embedding's own form for ``auto``."""
        if self.equi_form != "auto":
            return self.equi_form
        return "minkowski" if self.embedding == "hyperboloid" else "euclidean"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


KEYS = tuple(f.name for f in dataclasses.fields(Config))
#: Settings that change what a run learns: a saved run is the same run only if these agree.
TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("trains", True))
#: Evaluation settings, which ``care probe`` may override for a finished run.
EVALUATION_KEYS = tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("evaluation"))


def training_differences(
    saved: Config, current: Config, allowed: tuple[str, ...] = ()
) -> list[str]:
    """The :data:`TRAINING_KEYS` (less ``allowed``) whose values differ between two configs."""
    old, new = saved.to_dict(), current.to_dict()
    return [k for k in TRAINING_KEYS if k not in allowed and old[k] != new[k]]


def _one_line(exc: OmegaConfBaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


#: Settings that hold a path: their values are taken literally, never parsed as YAML, so that
#: ``out=runs/exp #2`` is that folder (YAML would read ``#2`` as a comment) and ``: `` or ``${x}``
#: in a path are characters, not syntax. ``null``, ``~`` or nothing mean "unset".
PATH_KEYS = ("out", "data_root", "class_list")


def literal(value: Any) -> Any:
    """A string as OmegaConf must be given it to keep it as it is: ``${`` escaped, so that it is
    never read as an interpolation. Other values pass unchanged."""
    return value.replace("${", "\\${") if isinstance(value, str) else value


def _path_value(text: str) -> str | None:
    return None if text in ("", "null", "~") else text


def parse_overrides(overrides: list[str]) -> DictConfig:
    """Turn ``["key=value", ...]`` into a config. Values are parsed as YAML (``1e-3``, ``[1,2]``),
    except those of :data:`PATH_KEYS`, which are taken literally."""
    parsed, paths = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CareError(f"bad argument '{item}': write settings as key=value, e.g. epochs=10")
        if key not in KEYS:
            raise CareError(
                f"unknown config key '{key}': run `care pretrain --print-config` to list the keys"
            )
        if key in PATH_KEYS:
            paths[key] = literal(_path_value(value))
        else:
            parsed.append(item)
    try:
        config = OmegaConf.from_dotlist(parsed)
    except OmegaConfBaseException as exc:
        raise CareError(f"bad override in {overrides}: {_one_line(exc)}") from None
    for key, value in paths.items():
        config[key] = value
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides; validated."""
    layers: list[Any] = [OmegaConf.structured(Config)]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CareError(f"config file {path} not found: pass an existing YAML file to --config")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come in several types
            raise CareError(
                f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}"
            ) from None
        if not isinstance(loaded, DictConfig):
            raise CareError(f"config file {path} must hold a mapping of key: value")
        unknown = sorted(set(map(str, loaded.keys())) - set(KEYS))
        if unknown:
            raise CareError(
                f"unknown config key '{unknown[0]}' in {path}: run `care pretrain --print-config` "
                "to list the keys"
            )
        layers.append(loaded)
    layers.append(parse_overrides(overrides or []))
    return _merged(layers)


def _merged(layers: list[Any]) -> Config:
    """The layers merged over the schema, type-checked and validated."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise CareError(f"bad value for '{key}': {_one_line(exc)}") from None
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """``cfg`` with ``overrides`` (plain values or OmegaConf nodes from the CLI), type-checked
    against the schema (``probe_milestones=[30,40,50]`` becomes a list of ints) and validated.
    Path values stay literal (:data:`PATH_KEYS`)."""
    base = {k: literal(v) if k in PATH_KEYS else v for k, v in cfg.to_dict().items()}
    changes = {k: literal(v) if k in PATH_KEYS else v for k, v in overrides.items()}
    return _merged(
        [OmegaConf.structured(Config), OmegaConf.create(base), OmegaConf.create(changes)]
    )


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved in a run directory (unknown keys are an error)."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise CareError(
            f"saved config has unknown key '{unknown[0]}': it was written by another "
            "version of care"
        )
    cfg = Config(**values)
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CareError(message)


def validate(cfg: Config) -> None:
    """Check choices and ranges; every failure is one line naming the key and the fix."""
    _require(
        cfg.strategy != "ddp_spawn",
        "strategy=ddp_spawn is not supported (its processes would not get their own data shard "
        "and progress): use strategy=ddp, which starts one process per device by running the "
        "command again, or launch with torchrun (docs/distributed.md)",
    )
    for key, choices in CHOICES.items():
        value = getattr(cfg, key)
        _require(
            value in choices, f"bad value for '{key}': {value!r}; choose one of {list(choices)}"
        )
    positive = (
        "epochs",
        "batch_size",
        "group_size",
        "head_hidden",
        "head_out",
        "devices",
        "num_nodes",
        "queue_size",
        "knn_k",
        "probe_epochs",
        "probe_seeds",
        "probe_batch_size",
        "log_every",
    )
    for key in positive:
        value = getattr(cfg, key)
        _require(value >= 1, f"bad value for '{key}': {value}; it must be at least 1")
    for key in (
        "lr",
        "temperature",
        "knn_temperature",
        "probe_lr",
        "curvature",
        "lars_trust_coefficient",
    ):
        value = getattr(cfg, key)
        _require(value > 0, f"bad value for '{key}': {value}; it must be positive")
    for key in (
        "weight",
        "weight_decay",
        "momentum",
        "warmup_epochs",
        "probe_weight_decay",
        "knn_every",
        "knn_every_steps",
        "num_workers",
        "checkpoint_every_steps",
    ):
        value = getattr(cfg, key)
        _require(value >= 0, f"bad value for '{key}': {value}; it must not be negative")
    _require(
        0 <= cfg.moco_momentum < 1,
        f"bad value for 'moco_momentum': {cfg.moco_momentum}; it must lie in [0, 1)",
    )
    _require(
        all(m >= 1 for m in cfg.probe_milestones),
        f"bad value for 'probe_milestones': {cfg.probe_milestones}; give epochs of at least 1",
    )
    if cfg.equi_form == "symplectic":
        _require(
            cfg.embedding == "sphere",
            "equi_form=symplectic needs embedding=sphere (the hyperboloid's form is minkowski): "
            "set embedding=sphere or equi_form=auto",
        )
        _require(
            cfg.head_out % 2 == 0,
            f"equi_form=symplectic needs an even embedding size, got head_out={cfg.head_out}: "
            "choose an even head_out",
        )
    _require(
        0 < cfg.crop_min_scale <= 1,
        f"bad value for 'crop_min_scale': {cfg.crop_min_scale}; it must lie in (0, 1]",
    )
    _require(
        len(cfg.widths) == 4 and all(w >= 1 for w in cfg.widths),
        f"bad value for 'widths': {cfg.widths}; give 4 stage widths, e.g. [16,32,64,128]",
    )
    for key in ("train_samples", "image_size", "load_size", "knn_bank_samples"):
        value = getattr(cfg, key)
        _require(
            value is None or value >= 1,
            f"bad value for '{key}': {value}; it must be at least 1 (or null for the default)",
        )
    _require(cfg.batch_size >= 2, "bad value for 'batch_size': InfoNCE needs at least 2 images")
    unknown = [name for name in cfg.loggers if name not in LOGGER_NAMES]
    _require(
        not unknown,
        f"bad value for 'loggers': {unknown}; choose from {list(LOGGER_NAMES)}, "
        "e.g. loggers=[csv,tensorboard,wandb]",
    )


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what ``--print-config`` prints and a run directory keeps)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
