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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from care.augment import Augmenter, AugParams, build_augmenter
from care.augment.eval import eval_transform
from care.config import Config
from care.data import DataInfo, LabeledImages, data_info, load_split
from care.errors import CareError
from care.evaluate.parameter_probe import parameter_probe
from care.hardware import autocast_for, evaluation_precision, requested_precision
from care.metrics import composition_error, equivariance_report, form_distortion, group_fit
from care.plots import plot_equivariance
from care.runs import RunDir, atomic_write_json, json_ready, load_trained_encoder

LAYERS = ("projection", "backbone")
GROUP_FIT_KEYS = ("group_fit_residual", "group_deviation", "group_deviation_relative")


@dataclass
class TrainedEncoder:
    """A run's trained encoder at the chosen layer, with the run's config and data settings."""

    run: RunDir
    cfg: Config
    info: DataInfo
    module: nn.Module
    layer: str
    precision: str = "32"  # the autocast the module runs under (care.hardware.autocast_for)

    @torch.no_grad()
    def __call__(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """Embeddings of normalised images, rows = samples (float64 on CPU)."""
        with autocast_for(self.precision, x.device):
            out = [
                self.module(x[i : i + batch_size]).double() for i in range(0, len(x), batch_size)
            ]
        return torch.cat(out).cpu()

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
    mean = torch.tensor(augmenter.mean).view(1, -1, 1, 1)
    std = torch.tensor(augmenter.std).view(1, -1, 1, 1)
    return augmenter.apply((x_a * std + mean).clamp(0, 1), b)


def measure(
    encoders: list[TrainedEncoder],
    images: Tensor,
    *,
    trials: int = 20,
    compositions: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-trial metrics, composition errors and parameter probes for each encoder."""
    info, cfg = encoders[0].info, encoders[0].cfg
    augmenter = build_augmenter(cfg, info)
    n = images.shape[0]
    clean = eval_transform(images, info.image_size, info.mean, info.std, info.eval_crop_fraction)
    base = [enc(clean) for enc in encoders]
    gen = torch.Generator().manual_seed(seed)
    results: list[dict[str, Any]] = [{"trials": [], "composition": []} for _ in encoders]

    def one(g: torch.Generator) -> AugParams:
        return augmenter.sample(n, g, group_size=n, pairs="per_batch")

    for t in range(trials):
        params = one(gen)
        augmented = augmenter.apply(images, params)
        for enc, f, res in zip(encoders, base, results, strict=True):
            f_a = enc(augmented)
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
    for _ in range(compositions):
        a, b = one(gen), one(gen)
        x_a = augmenter.apply(images, a)
        x_b = augmenter.apply(images, b)
        x_ba = augment_again(augmenter, x_a, b)
        for enc, f, res in zip(encoders, base, results, strict=True):
            res["composition"].append(composition_error(f, enc(x_a), enc(x_b), enc(x_ba)))
    per_image = augmenter.sample(n, gen)
    shifted = augmenter.apply(images, per_image)
    targets = per_image.features().double()
    for enc, f, res in zip(encoders, base, results, strict=True):
        probe = parameter_probe(f, enc(shifted), targets, list(AugParams.FEATURE_NAMES), seed=seed)
        res["probe"] = {"names": probe.names, "r2_linear": probe.r2_linear, "r2_mlp": probe.r2_mlp}
    for res in results:
        res["summary"] = summarise(res)
    return {"n": n, "trials": trials, "results": results}


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
) -> dict[str, Any]:
    """Measure one run (or compare two) and write equivariance.json and plots into RUN_DIR.

    ``precision`` is the autocast the encoders embed under; by default the runs' own
    (:func:`care.hardware.evaluation_precision`), or 32 when two runs differ in it.
    """
    if trials < 1 or samples < 2:
        raise CareError("trials must be at least 1 and samples at least 2")
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
        encoders.append(other)
    precisions = {evaluation_precision(e.cfg.precision, "cpu", requested) for e in encoders}
    chosen = precisions.pop() if len(precisions) == 1 else "32"
    for e in encoders:  # both models of a comparison embed alike
        e.precision = chosen
    count = min(samples, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(count)])
    measured = measure(encoders, images, trials=trials, compositions=compositions, seed=seed)
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
    atomic_write_json(out / "equivariance.json", json_ready(payload))
    payload["plots"] = plot_equivariance(payload, out)
    return payload
