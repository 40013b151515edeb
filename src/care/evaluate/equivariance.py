"""`care equivariance RUN_DIR [--against RUN_DIR2]`: how orthogonally augmentations act (paper, Sec. 4).

Each trial samples ONE augmentation a (a single record shared by every image) and applies it to
the evaluation images x. With F = f(x) and F_a = f(a(x)) (rows = samples) it reports Wahba's
error over SO(d) and O(d) per √n, the least-squares residual, the invariance distance and W_f
divided by it, and γ_f. In compare mode both models see the same augmentation in each trial.
It also measures composition consistency (Corollary 1) and augmentation-parameter probes.

A run embeds with its own geometry (``embedding``: sphere or hyperboloid; paper, Sec. 3.2). When
its L_equi form is not euclidean (a hyperboloid run, or ``equi_form=symplectic``), each trial
also reports Wahba's analogue for the form's group (:func:`care.metrics.group_fit`): the
least-squares residual and the fitted map's distance ``||ΛᵀJΛ - J||_F`` from the group. The
Wahba fields are then computed in the ambient coordinates, as a Euclidean reference.

The encoders run on :func:`care.hardware.evaluation_device`. Images are read, augmented and
embedded ``batch_size`` at a time (each trial's one record applied batch by batch), so memory grows
with ``batch_size`` and with the ``n × d`` embedding matrices (float64, on the CPU), not with ``n``
images at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from care.augment import Augmenter, AugParams, build_augmenter
from care.augment.eval import eval_transform
from care.config import Config
from care.data import DataInfo, LabeledImages, data_info, load_split
from care.errors import CareError
from care.evaluate.parameter_probe import parameter_probe
from care.hardware import (
    autocast_for,
    evaluation_device,
    evaluation_precision,
    requested_precision,
    resolve_memory_format,
    torch_memory_format,
)
from care.metrics import composition_error, equivariance_report, form_distortion, group_fit
from care.plots import equivariance_figures
from care.progress import CommandProgress
from care.runs import RunDir, atomic_write_files, json_ready, load_trained_encoder

LAYERS = ("projection", "backbone")
GROUP_FIT_KEYS = ("group_fit_residual", "group_deviation", "group_deviation_relative")
_CPU = torch.device("cpu")


@dataclass
class TrainedEncoder:
    """A run's trained encoder at the chosen layer, with the run's config and data settings."""

    run: RunDir
    cfg: Config
    info: DataInfo
    module: nn.Module
    layer: str
    precision: str = "32"  # the autocast the module runs under (care.hardware.autocast_for)
    device: torch.device = _CPU  # where the module runs (see place)
    memory_format: torch.memory_format = torch.contiguous_format  # of the module and its inputs

    def place(self, device: torch.device, memory_format: torch.memory_format) -> None:
        """Move the module to ``device`` in ``memory_format``; inputs follow it there."""
        self.module.to(device)
        self.module.to(memory_format=memory_format)  # type: ignore[call-overload]
        self.device, self.memory_format = device, memory_format

    @torch.no_grad()
    def __call__(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """Embeddings of normalised images (on any device), rows = samples (float64 on CPU)."""
        out = []
        with autocast_for(self.precision, self.device):
            for i in range(0, len(x), batch_size):
                chunk = x[i : i + batch_size].to(self.device, non_blocking=True)
                chunk = chunk.contiguous(memory_format=self.memory_format)
                out.append(self.module(chunk).double())
        return torch.cat(out).cpu()

    @torch.no_grad()
    def dimension(self) -> int:
        """The size of this layer's embeddings (one forward pass of a blank image)."""
        size = self.info.image_size
        blank = torch.zeros(1, self.info.channels, size, size, device=self.device)
        was_training = self.module.training
        self.module.eval()
        try:
            return int(self.module(blank).shape[-1])
        finally:
            self.module.train(was_training)

    @property
    def embedding(self) -> str:
        """Where the measured features live: the run's ``embedding``, or ``none`` (backbone)."""
        return self.cfg.embedding if self.layer == "projection" else "none"

    @property
    def form(self) -> str:
        """The bilinear form whose group is measured: the run's L_equi form on the projection
        layer, euclidean on the backbone features."""
        return self.cfg.form if self.layer == "projection" else "euclidean"


def load_trained(
    run_dir: str | Path, layer: str = "projection", split: str = "test"
) -> tuple[TrainedEncoder, LabeledImages]:
    """The run's encoder (projection on its sphere or hyperboloid, or backbone features) and
    the ``split`` of its data."""
    if layer not in LAYERS:
        raise CareError(f"bad value for 'layer': {layer!r}; choose one of {list(LAYERS)}")
    run = RunDir(run_dir)
    cfg = run.read_config()
    dataset = load_split(cfg, split)
    info = data_info(cfg, dataset)
    module = load_trained_encoder(run, cfg, info.channels, layer)
    return TrainedEncoder(run, cfg, info, module, layer), dataset


def dominant_kind(p: AugParams) -> str:
    """A label for one augmentation record: its most visible component (for plot colours)."""
    if bool(p.grayscale[0]):
        return "grayscale"
    if float(p.blur_sigma[0]) > 1.0:
        return "blur"
    crop = p.crop[0]
    if float(crop[2] * crop[3]) < 0.4:
        return "crop"
    if bool(p.jitter[0]):
        return "colour jitter"
    return "mild crop/flip"


def augment_again(augmenter: Augmenter, x_a: Tensor, b: AugParams) -> Tensor:
    """``b(a(x))`` from the views ``x_a = a(x)`` (``augmenter``'s normalised output), for
    "apply a, then b" (paper, Corollary 1): back to pixels in [0, 1], then augmented by ``b``."""
    mean = torch.tensor(augmenter.mean, device=x_a.device).view(1, -1, 1, 1)
    std = torch.tensor(augmenter.std, device=x_a.device).view(1, -1, 1, 1)
    return augmenter.apply((x_a * std + mean).clamp(0, 1), b)


class _ImageTensor(Dataset[tuple[Tensor, int]]):
    """``(n, C, H, W)`` images already in memory, as a dataset (no labels: -1)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], -1


_Views = Callable[[Tensor, slice], Sequence[Tensor]]
"""Views of one batch of images (on the device), given which rows of the ``n`` it holds."""


def _embed_views(
    encoders: list[TrainedEncoder],
    loader: DataLoader,
    views: _Views,
    progress: CommandProgress | None = None,
) -> list[list[Tensor]]:
    """``out[e][k]``: encoder ``e``'s ``(n, d)`` float64 CPU embeddings of view ``k`` of every
    image. Images are read, viewed and embedded one batch at a time; ``progress`` counts the
    images embedded (each view by each encoder)."""
    device = encoders[0].device
    parts: list[list[list[Tensor]]] = [[] for _ in encoders]  # [encoder][batch][view]
    start = 0
    for images, _ in loader:
        rows = slice(start, start + len(images))
        start = rows.stop
        batch = views(images.to(device, non_blocking=True), rows)
        for enc, part in zip(encoders, parts, strict=True):
            part.append([enc(view) for view in batch])
        if progress is not None:
            progress.advance(len(images) * len(batch) * len(encoders))
    return [[torch.cat(view) for view in zip(*part, strict=True)] for part in parts]


def measure(
    encoders: list[TrainedEncoder],
    images: Dataset[tuple[Tensor, int]] | Tensor,
    *,
    trials: int = 20,
    compositions: int = 5,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: CommandProgress | None = None,
) -> dict[str, Any]:
    """Per-trial metrics, composition errors and parameter probes for each encoder.

    ``images`` is a dataset of ``(uint8 image, label)`` (or an ``(n, C, H, W)`` tensor), read
    ``batch_size`` at a time by ``num_workers`` DataLoader workers and embedded on the encoders'
    device (all must share one). Each trial's single record is sampled for all ``n`` images and
    applied batch by batch, which gives what applying it to all at once gives: every augmentation
    op acts on each image alone. ``progress`` (made here if not given) counts the images
    embedded, view by view and encoder by encoder, and names the stage (``trial 3/20``).
    """
    if batch_size < 1:
        raise CareError(f"bad value for 'batch_size': {batch_size}; it must be at least 1")
    info, cfg = encoders[0].info, encoders[0].cfg
    augmenter = build_augmenter(cfg, info)
    dataset = _ImageTensor(images) if isinstance(images, Tensor) else images
    n = len(dataset)  # type: ignore[arg-type]
    pin = encoders[0].device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # one set of workers for every pass
        pin_memory=pin,
    )

    passes = 1 + trials + 3 * compositions + 1  # clean, trials, compositions, parameter probe
    own = progress is None
    shown = progress or CommandProgress("equivariance", n * passes * len(encoders))

    def embed(views: _Views, stage: str) -> list[list[Tensor]]:
        shown.stage(stage)
        return _embed_views(encoders, loader, views, shown)

    def clean(x: Tensor, rows: slice) -> tuple[Tensor]:
        return (eval_transform(x, info.image_size, info.mean, info.std, info.eval_crop_fraction),)

    def augmented(params: AugParams) -> _Views:
        return lambda x, rows: (augmenter.apply(x, params.rows(rows)),)

    def composed(a: AugParams, b: AugParams) -> _Views:
        def views(x: Tensor, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
            x_a, b_rows = augmenter.apply(x, a.rows(rows)), b.rows(rows)
            return x_a, augmenter.apply(x, b_rows), augment_again(augmenter, x_a, b_rows)

        return views

    base = [views[0] for views in embed(clean, "clean images")]
    gen = torch.Generator().manual_seed(seed)
    results: list[dict[str, Any]] = [{"trials": [], "composition": []} for _ in encoders]

    def one(g: torch.Generator) -> AugParams:
        return augmenter.sample(n, g, group_size=n, pairs="per_batch")

    for t in range(trials):
        params = one(gen)
        embedded = embed(augmented(params), f"trial {t + 1}/{trials}")
        for enc, f, (f_a,), res in zip(encoders, base, embedded, results, strict=True):
            report = equivariance_report(f, f_a).as_dict()
            report["form_distortion"] = form_distortion(f, f_a, enc.form)  # L_equi's target
            if enc.form != "euclidean":
                fit = group_fit(f, f_a, enc.form)
                report["group_fit_residual"] = fit.residual
                report["group_deviation"] = fit.deviation
                report["group_deviation_relative"] = fit.relative_deviation
            res["trials"].append(
                {
                    "trial": t,
                    "kind": dominant_kind(params),
                    **report,
                    "params": json_ready({k: v[0] for k, v in params.as_dict().items()}),
                }
            )
    for c in range(compositions):
        a, b = one(gen), one(gen)
        embedded = embed(composed(a, b), f"composition {c + 1}/{compositions}")
        for f, (f_a, f_b, f_ba), res in zip(base, embedded, results, strict=True):
            res["composition"].append(composition_error(f, f_a, f_b, f_ba))
    per_image = augmenter.sample(n, gen)
    targets = per_image.features().double()
    embedded = embed(augmented(per_image), "parameter probe")
    shown.stage("parameter probe: fitting")
    for f, (f_a,), res in zip(base, embedded, results, strict=True):
        probe = parameter_probe(f, f_a, targets, list(AugParams.FEATURE_NAMES), seed=seed)
        res["probe"] = {"names": probe.names, "r2_linear": probe.r2_linear, "r2_mlp": probe.r2_mlp}
        skipped = inapplicable_parameters(targets, info.channels)
        for key in ("r2_linear", "r2_mlp"):  # no R² for what the data cannot show: n/a
            res["probe"][key] = [
                None if name in skipped else r2
                for name, r2 in zip(probe.names, res["probe"][key], strict=True)
            ]
        res["probe"]["not_applicable"] = skipped
    for res in results:
        res["summary"] = summarise(res)
    if own:
        shown.close()
    return {"n": n, "trials": trials, "results": results}


#: Parameters of colour, which a 1-channel image does not show.
COLOUR_PARAMETERS = ("saturation", "hue", "grayscale")


def inapplicable_parameters(targets: Tensor, channels: int) -> list[str]:
    """The augmentation parameters a probe cannot be asked about on this data: the colour ones
    on 1-channel images, and any that takes one value over all the images (nothing to predict).
    Their R² is reported as n/a (``null``), not as 0."""
    names = AugParams.FEATURE_NAMES
    constant = (targets.max(dim=0).values == targets.min(dim=0).values).tolist()
    return [
        name
        for name, fixed in zip(names, constant, strict=True)
        if fixed or (channels == 1 and name in COLOUR_PARAMETERS)
    ]


def output_stem(layer: str, against: str | None) -> str:
    """The name of an evaluation's files in RUN_DIR: ``equivariance`` for the projection layer
    alone, with ``-backbone`` for the other layer and ``-vs-<baseline folder>`` in compare mode,
    so that measuring another layer or against another baseline never overwrites."""
    stem = "equivariance" if layer == "projection" else f"equivariance-{layer}"
    if against is not None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(against).resolve().name) or "baseline"
        stem += f"-vs-{name}"
    return stem


def summarise(res: dict[str, Any]) -> dict[str, float]:
    """Means and worst cases over trials (with the group fit's where measured), and the mean
    composition error."""
    trials = res["trials"]
    out: dict[str, float] = {}
    for key in (
        "wahba_so",
        "wahba_o",
        "linear_residual",
        "invariance_distance",
        "wahba_so_ratio",
        "gamma",
        "form_distortion",
        *GROUP_FIT_KEYS,
    ):
        if key not in trials[0]:
            continue
        values = [t[key] for t in trials]
        out[f"{key}_mean"] = sum(values) / len(values)
        out[f"{key}_worst"] = max(values)
    comp = res["composition"]
    if comp:
        out["composition_error_mean"] = sum(c["composition_error"] for c in comp) / len(comp)
    return out


def equivariance_command(
    run_dir: str,
    against: str | None = None,
    *,
    trials: int = 20,
    split: str = "test",
    samples: int = 2000,
    layer: str = "projection",
    compositions: int = 5,
    seed: int = 0,
    precision: str | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Measure one run (or compare two) and write the JSON and plots into RUN_DIR, named by
    :func:`output_stem` (``equivariance.json`` for the projection layer alone).

    The encoders run on RUN_DIR's :func:`care.hardware.evaluation_device`, ``batch_size``
    images at a time. ``precision`` is the autocast they embed under; by default the runs' own
    (:func:`care.hardware.evaluation_precision`), or 32 when two runs differ in it.
    """
    if trials < 1 or samples < 2:
        raise CareError("trials must be at least 1 and samples at least 2")
    if batch_size < 1:
        raise CareError(f"bad value for 'batch_size': {batch_size}; it must be at least 1")
    requested = requested_precision(precision)
    encoder, dataset = load_trained(run_dir, layer, split)
    encoders = [encoder]
    if against is not None:
        other, _ = load_trained(against, layer, split)
        if (other.cfg.dataset, other.info.image_size) != (
            encoder.cfg.dataset,
            encoder.info.image_size,
        ):
            raise CareError(
                f"{against} was trained on other data than {run_dir}: compare runs of "
                "one dataset and image size"
            )
        size, other_size = encoder.dimension(), other.dimension()
        if size != other_size:
            raise CareError(
                f"{against} embeds in {other_size} dimensions at the {layer} layer and {run_dir} "
                f"in {size}: Wahba's problem compares maps of one space; compare runs of one "
                "embedding size (head_out for layer=projection, widths for layer=backbone)"
            )
        encoders.append(other)
    device = evaluation_device(encoder.cfg)
    memory_format = torch_memory_format(resolve_memory_format("auto", device.type))
    precisions = {evaluation_precision(e.cfg.precision, device.type, requested) for e in encoders}
    chosen = precisions.pop() if len(precisions) == 1 else "32"
    for e in encoders:  # both models of a comparison embed alike, on one device
        e.precision = chosen
        e.place(device, memory_format)
    count = min(samples, len(dataset))
    images = dataset if count == len(dataset) else dataset.subset(count)
    passes = 1 + trials + 3 * compositions + 1
    label = f"equivariance {encoder.run.root.name}" + (
        f" vs {Path(against).name}" if against is not None else ""
    )
    with CommandProgress(label, len(images) * passes * len(encoders)) as progress:
        measured = measure(
            encoders,
            images,
            trials=trials,
            compositions=compositions,
            seed=seed,
            batch_size=batch_size,
            num_workers=encoder.cfg.num_workers,
            progress=progress,
        )
    payload = {
        "runs": [str(e.run.root) for e in encoders],
        "methods": [e.cfg.method for e in encoders],
        "embeddings": [e.embedding for e in encoders],
        "forms": [e.form for e in encoders],
        "layer": layer,
        "split": split,
        "precision": encoder.precision,
        **measured,
    }
    if against is not None:
        mine = [t["wahba_so"] for t in measured["results"][0]["trials"]]
        theirs = [t["wahba_so"] for t in measured["results"][1]["trials"]]
        payload["lower_in_trials"] = sum(a < b for a, b in zip(mine, theirs, strict=True))
        ratio_mine = [t["wahba_so_ratio"] for t in measured["results"][0]["trials"]]
        ratio_theirs = [t["wahba_so_ratio"] for t in measured["results"][1]["trials"]]
        payload["ratio_lower_in_trials"] = sum(
            a < b for a, b in zip(ratio_mine, ratio_theirs, strict=True)
        )
    out = encoder.run.root
    stem = output_stem(layer, against)
    payload["json"] = str(out / f"{stem}.json")
    document = (json.dumps(json_ready(payload), indent=2) + "\n").encode()
    figures = equivariance_figures(payload, out, stem)
    # one result: the JSON and its plots are replaced together, never a new JSON beside old plots
    atomic_write_files({out / f"{stem}.json": document, **figures})
    payload["plots"] = [str(path) for path in figures]
    return payload
