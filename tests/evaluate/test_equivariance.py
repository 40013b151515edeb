"""`care equivariance` on tiny runs: JSON, plots, compare mode, one-line errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from care.augment import Augmenter, AugmentRecipe, AugParams, build_augmenter
from care.augment.eval import eval_transform
from care.cli import main
from care.config import Config
from care.data import DataInfo
from care.evaluate.equivariance import (
    GROUP_FIT_KEYS,
    TrainedEncoder,
    augment_again,
    inapplicable_parameters,
    measure,
)
from care.metrics import composition_error
from care.runs import RunDir
from tests.augment.reference import identity_params
from tests.conftest import tiny


@pytest.fixture(scope="module")
def two_runs(fake_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    for method in ("care", "simclr"):
        assert (
            main(["pretrain", *tiny(fake_fmnist, root / method, f"method={method}", "knn_every=0")])
            == 0
        )
    return root / "care", root / "simclr"


def test_compare_writes_json_and_plots(
    two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    care, simclr = two_runs
    assert (
        main(
            [
                "equivariance",
                str(care),
                "--against",
                str(simclr),
                "trials=3",
                "samples=48",
                "compositions=2",
            ]
        )
        == 0
    )
    payload = json.loads((care / "equivariance-vs-simclr.json").read_text())
    assert payload["trials"] == 3 and len(payload["results"]) == 2
    for res in payload["results"]:
        assert len(res["trials"]) == 3 and len(res["composition"]) == 2
        for trial in res["trials"]:
            assert trial["wahba_o"] <= trial["wahba_so"] + 1e-9
            assert 0.0 <= trial["wahba_so_ratio"] <= 1.0 + 1e-9
        assert len(res["probe"]["r2_linear"]) == len(res["probe"]["names"])
        # grayscale data: the colour parameters have no R² (n/a), the others have one
        probe = res["probe"]
        assert {"saturation", "hue", "grayscale"} <= set(probe["not_applicable"])
        for name, r2 in zip(probe["names"], probe["r2_linear"], strict=True):
            assert (r2 is None) == (name in probe["not_applicable"]), name
        assert probe["r2_linear"][probe["names"].index("crop_scale")] is not None
    assert 0 <= payload["lower_in_trials"] <= 3
    assert (care / "equivariance-vs-simclr_scatter.png").stat().st_size > 1000
    assert (care / "equivariance-vs-simclr_by_kind.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "W_SO" in printed and "n/a for saturation, hue, grayscale" in printed
    assert f"wrote {care / 'equivariance-vs-simclr.json'}" in printed


def test_backbone_layer_and_bad_settings(
    two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    care, _ = two_runs
    assert (
        main(
            [
                "equivariance",
                str(care),
                "trials=2",
                "samples=40",
                "layer=backbone",
                "compositions=1",
            ]
        )
        == 0
    )
    assert json.loads((care / "equivariance-backbone.json").read_text())["layer"] == "backbone"
    capsys.readouterr()
    assert main(["equivariance", str(care), "layer=middle"]) == 2
    assert "layer" in capsys.readouterr().err
    assert main(["equivariance", str(care), "trials=x"]) == 2
    assert "trials" in capsys.readouterr().err


def test_each_layer_and_baseline_has_its_own_files(
    two_runs: tuple[Path, Path],
    fake_fmnist: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Measuring another layer, or against another baseline, never overwrites; a baseline of
    another embedding size is refused in one line."""
    care, simclr = two_runs
    settings = ["trials=1", "samples=40", "compositions=1"]
    assert main(["equivariance", str(care), *settings]) == 0
    alone = (care / "equivariance.json").read_bytes()
    assert main(["equivariance", str(care), "--against", str(simclr), *settings]) == 0
    assert main(["equivariance", str(care), "layer=backbone", *settings]) == 0
    assert (care / "equivariance.json").read_bytes() == alone
    for stem in ("equivariance", "equivariance-vs-simclr", "equivariance-backbone"):
        assert (care / f"{stem}.json").is_file() and (care / f"{stem}_by_kind.png").is_file()
    wide = tmp_path / "wide"
    assert main(["pretrain", *tiny(fake_fmnist, wide, "head_out=12", "knn_every=0")]) == 0
    capsys.readouterr()
    assert main(["equivariance", str(care), "--against", str(wide), *settings]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "embeds in 12 dimensions at the projection layer" in err and "in 8" in err


def test_parameters_that_do_not_vary_are_not_applicable() -> None:
    names = AugParams.FEATURE_NAMES
    targets = torch.rand(30, len(names), dtype=torch.float64)
    targets[:, names.index("blur_sigma")] = 0.0  # never blurred: one value
    assert inapplicable_parameters(targets, channels=3) == ["blur_sigma"]
    assert inapplicable_parameters(targets, channels=1) == [
        "saturation",
        "hue",
        "grayscale",
        "blur_sigma",
    ]


# ------------------------------------------------------------- other geometries (paper, Sec. 3.2)


def _finite_losses(run: Path) -> list[float]:
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    keys = [k for k in rows[0] if k.startswith("train/") and k != "train/lr"]
    values = [float(r[k]) for r in rows for k in keys if r[k] not in ("", None)]
    assert values and all(math.isfinite(v) for v in values)
    return values


@pytest.mark.parametrize(
    ("extra", "embedding", "form"),
    [
        (("embedding=hyperboloid", "curvature=2.0"), "hyperboloid", "minkowski"),
        (("equi_form=symplectic",), "sphere", "symplectic"),
    ],
)
def test_other_geometries_train_and_report_the_group_fit(
    fake_fmnist: Path,
    tmp_path: Path,
    extra: tuple[str, ...],
    embedding: str,
    form: str,
) -> None:
    run = tmp_path / "run"
    settings = tiny(fake_fmnist, run, "method=care", "knn_every=0", "weight=1.0", *extra)
    assert main(["pretrain", *settings]) == 0
    _finite_losses(run)
    assert main(["equivariance", str(run), "trials=2", "samples=40", "compositions=1"]) == 0
    payload = json.loads((run / "equivariance.json").read_text())
    assert payload["embeddings"] == [embedding] and payload["forms"] == [form]
    res = payload["results"][0]
    for trial in res["trials"]:
        assert trial["d"] == (9 if embedding == "hyperboloid" else 8)  # head_out=8 (+ x0)
        assert trial["group_fit_residual"] == pytest.approx(trial["linear_residual"], rel=1e-9)
        assert trial["group_deviation"] >= 0.0
        assert trial["group_deviation_relative"] == pytest.approx(
            trial["group_deviation"] / math.sqrt(trial["d"]), rel=1e-9
        )
        assert 0.0 < trial["form_distortion"] < 10.0  # an untrained map changes the form
        assert all(math.isfinite(v) for v in trial.values() if isinstance(v, float))
    for key in GROUP_FIT_KEYS:
        assert math.isfinite(res["summary"][f"{key}_mean"])


def test_sphere_runs_record_their_geometry_and_keep_their_fields(
    two_runs: tuple[Path, Path],
) -> None:
    # a sphere run with the euclidean form keeps its outputs: Wahba only, no group-fit fields
    care, _ = two_runs
    assert main(["equivariance", str(care), "trials=1", "samples=40", "compositions=0"]) == 0
    sphere = json.loads((care / "equivariance.json").read_text())
    assert sphere["embeddings"] == ["sphere"] and sphere["forms"] == ["euclidean"]
    assert not any(k.startswith("group") for k in sphere["results"][0]["trials"][0])
    assert not any(k.startswith("group") for k in sphere["results"][0]["summary"])
    # the form's distortion (what L_equi trains to 0) is reported for every geometry
    assert sphere["results"][0]["trials"][0]["form_distortion"] > 0.0
    assert "form_distortion_mean" in sphere["results"][0]["summary"]


# ------------------------------------------------------------- composition (Corollary 1)


def _flips(n: int, flip: bool) -> AugParams:
    return dataclasses.replace(identity_params(n), flip=torch.full((n,), flip))


def test_augment_again_applies_b_after_a() -> None:
    augmenter = Augmenter(AugmentRecipe.for_channels(3), 12, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    images = torch.randint(0, 256, (4, 3, 12, 12), generator=torch.Generator().manual_seed(0))
    images = images.to(torch.uint8)
    x = augmenter.apply(images, identity_params(4))
    flipped = augmenter.apply(images, _flips(4, True))
    assert torch.allclose(augment_again(augmenter, x, identity_params(4)), x, atol=1e-5)
    assert torch.allclose(augment_again(augmenter, x, _flips(4, True)), flipped, atol=1e-5)
    twice = augment_again(augmenter, flipped, _flips(4, True))
    assert torch.allclose(twice, x, atol=1e-5)  # flip ∘ flip = identity
    assert not torch.allclose(flipped, x, atol=1e-2)


def test_measure_reports_the_composition_error_of_b_after_a() -> None:
    gen = torch.Generator().manual_seed(1)
    info = DataInfo(channels=1, image_size=8, mean=(0.5,), std=(0.25,), num_classes=10)
    cfg = Config()
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    encoder = TrainedEncoder(RunDir("unused"), cfg, info, module, "projection")
    images = torch.randint(0, 256, (40, 1, 8, 8), generator=gen).to(torch.uint8)
    result = measure([encoder], images, trials=2, compositions=3, seed=4)
    # The same draws, in the order measure makes them: 2 trials, then (a, b) per composition.
    augmenter = build_augmenter(cfg, info)
    draws = torch.Generator().manual_seed(4)
    for _ in range(2):
        augmenter.sample(40, draws, group_size=40, pairs="per_batch")
    f = encoder(eval_transform(images, 8, (0.5,), (0.25,)))
    for measured in result["results"][0]["composition"]:
        a, b = (augmenter.sample(40, draws, group_size=40, pairs="per_batch") for _ in range(2))
        x_a = augmenter.apply(images, a)
        x_ba = augmenter.apply((x_a * 0.25 + 0.5).clamp(0, 1), b)
        expected = composition_error(
            f, encoder(x_a), encoder(augmenter.apply(images, b)), encoder(x_ba)
        )
        assert measured == pytest.approx(expected, rel=1e-9)
        assert measured["composition_error"] > 0.0


# ------------------------------------------------------------- batches (memory that scales)


@pytest.mark.parametrize("pairs", ["per_batch", "per_image"])
def test_a_record_applied_batch_by_batch_equals_it_applied_at_once(pairs: str) -> None:
    # every op (crop, flip, jitter with hue, grayscale, blur) acts on each image alone
    recipe = AugmentRecipe.for_channels(3, crop_scale=(0.2, 1.0), blur_p=0.9, grayscale_p=0.5)
    augmenter = Augmenter(recipe, 12, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (23, 3, 16, 16), generator=gen).to(torch.uint8)
    for _ in range(4):  # several records: some blur, jitter or turn gray
        if pairs == "per_batch":
            params = augmenter.sample(23, gen, group_size=23, pairs="per_batch")
        else:
            params = augmenter.sample(23, gen)
        whole = augmenter.apply(images, params)
        rows = [slice(s, min(s + 5, 23)) for s in range(0, 23, 5)]
        batched = torch.cat([augmenter.apply(images[r], params.rows(r)) for r in rows])
        torch.testing.assert_close(batched, whole, rtol=1e-6, atol=1e-6)
        again = torch.cat([augment_again(augmenter, whole[r], params.rows(r)) for r in rows])
        torch.testing.assert_close(again, augment_again(augmenter, whole, params))


class _Recorder(torch.nn.Module):
    """Flatten + Linear that records the largest batch it embedded."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 5)
        self.largest = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.largest = max(self.largest, x.shape[0])
        return self.linear(x.flatten(1))


def test_measure_in_batches_equals_measure_at_once() -> None:
    gen = torch.Generator().manual_seed(2)
    info = DataInfo(channels=1, image_size=8, mean=(0.5,), std=(0.25,), num_classes=10)
    torch.manual_seed(0)
    module = _Recorder()
    encoder = TrainedEncoder(RunDir("unused"), Config(), info, module, "projection")
    images = torch.randint(0, 256, (45, 1, 8, 8), generator=gen).to(torch.uint8)
    settings = {"trials": 3, "compositions": 2, "seed": 3}
    whole = measure([encoder], images, batch_size=64, **settings)
    assert module.largest == 45
    module.largest = 0
    batched = measure([encoder], images, batch_size=8, **settings)  # 8 does not divide 45
    assert module.largest == 8  # no pass embeds (or augments) more than a batch
    assert batched["n"] == whole["n"] == 45
    _assert_same_numbers(batched["results"], whole["results"], rel=1e-9)


def _assert_same_numbers(got: object, expected: object, rel: float) -> None:
    """Equal structure and strings; floats equal to ``rel``."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys()
        for key in expected:
            _assert_same_numbers(got[key], expected[key], rel)
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            _assert_same_numbers(a, b, rel)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=rel, abs=rel), (got, expected)
    else:
        assert got == expected


def test_care_equivariance_batch_size_does_not_change_the_numbers(
    two_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    care, _ = two_runs
    settings = ["trials=2", "samples=50", "compositions=2"]
    assert main(["equivariance", str(care), *settings, "batch_size=64"]) == 0
    whole = json.loads((care / "equivariance.json").read_text())
    assert main(["equivariance", str(care), *settings, "batch_size=16"]) == 0  # 16 ∤ 50
    batched = json.loads((care / "equivariance.json").read_text())
    assert batched["n"] == 50
    _assert_same_numbers(batched, whole, rel=1e-5)
    capsys.readouterr()
    assert main(["equivariance", str(care), "batch_size=0"]) == 2
    assert "batch_size" in capsys.readouterr().err
