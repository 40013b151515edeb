"""Recipes, parameter records and sampling (group sharing, reproducibility, distributions)."""

from __future__ import annotations

import math

import pytest
import torch

from care.augment import AugmentRecipe, AugParams, sample_params
from care.errors import CareError
from tests.augment.reference import identity_params


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_params_equal(a: AugParams, b: AugParams) -> None:
    for (name, x), y in zip(a.as_dict().items(), b.as_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_recipe_defaults_are_simclr() -> None:
    r = AugmentRecipe()
    assert r.crop_scale == (0.08, 1.0)
    assert r.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert (r.flip_p, r.jitter_p, r.grayscale_p, r.blur_p) == (0.5, 0.8, 0.2, 0.5)
    assert (r.brightness, r.contrast, r.saturation, r.hue) == (0.4, 0.4, 0.4, 0.1)
    assert r.blur_sigma == (0.1, 2.0)


def test_recipe_for_channels() -> None:
    gray = AugmentRecipe.for_channels(1)
    assert (gray.saturation, gray.hue, gray.grayscale_p) == (0.0, 0.0, 0.0)
    assert gray.brightness == 0.4
    assert AugmentRecipe.for_channels(3) == AugmentRecipe()
    assert AugmentRecipe.for_channels(1, blur_p=0.0, crop_scale=[0.2, 1.0]).crop_scale == (0.2, 1.0)
    with pytest.raises(CareError, match="channels"):
        AugmentRecipe.for_channels(2)
    with pytest.raises(CareError, match="unknown"):
        AugmentRecipe.for_channels(3, blurr_p=0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flip_p": 1.5},
        {"crop_scale": (0.5, 0.2)},
        {"crop_ratio": (0.0, 1.0)},
        {"hue": 0.7},
        {"brightness": -0.1},
        {"blur_sigma": (0.0, 1.0)},
    ],
)
def test_recipe_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(CareError):
        AugmentRecipe(**kwargs)  # type: ignore[arg-type]


def test_same_seed_same_params_different_seed_differs() -> None:
    r = AugmentRecipe()
    a = sample_params(64, r, gen(1), group_size=4)
    assert_params_equal(a, sample_params(64, r, gen(1), group_size=4))
    c = sample_params(64, r, gen(2), group_size=4)
    assert not torch.equal(a.crop, c.crop)


@pytest.mark.parametrize("m", [1, 4, 16])
def test_groups_share_one_record(m: int) -> None:
    n = 64
    p = sample_params(n, AugmentRecipe(), gen(3), group_size=m)
    assert len(p) == n
    for name, value in p.as_dict().items():
        grouped = value.view(n // m, m, *value.shape[1:])
        assert torch.equal(grouped, grouped[:, :1].expand_as(grouped)), name
    # Independent records per group: crops (continuous) all differ.
    crops = p.crop[::m]
    assert torch.unique(crops, dim=0).shape[0] == n // m


def test_indivisible_batch_is_a_care_error() -> None:
    msg = (
        "batch of 10 images does not split into groups of 4: "
        "choose batch_size divisible by group_size"
    )
    with pytest.raises(CareError) as info:
        sample_params(10, AugmentRecipe(), gen(), group_size=4)
    assert str(info.value) == msg
    with pytest.raises(CareError):
        sample_params(8, AugmentRecipe(), gen(), group_size=0)


def test_crop_statistics() -> None:
    r = AugmentRecipe()
    p = sample_params(4000, r, gen(4))
    top, left, h, w = p.crop.double().unbind(1)
    area = h * w
    assert area.min() >= r.crop_scale[0] - 1e-6 and area.max() <= r.crop_scale[1] + 1e-6
    ratio = w / h
    assert ratio.min() >= r.crop_ratio[0] - 1e-5 and ratio.max() <= r.crop_ratio[1] + 1e-5
    assert top.min() >= 0 and left.min() >= 0
    assert (top + h).max() <= 1 + 1e-6 and (left + w).max() <= 1 + 1e-6
    # Roughly torchvision's distribution: mean area a bit below the uniform mean (rejections).
    assert 0.45 < area.mean() < 0.56
    # Positions spread over the free range.
    free = (1 - h).clamp_min(1e-6)
    assert 0.45 < (top / free).mean() < 0.55


def test_crop_fallback_is_centred_and_ratio_clamped() -> None:
    # Every candidate is too wide (ratio >= 2 with full area), so torchvision's fallback applies.
    r = AugmentRecipe(crop_scale=(1.0, 1.0), crop_ratio=(2.0, 3.0))
    p = sample_params(8, r, gen())
    expected = torch.tensor([0.25, 0.0, 0.5, 1.0]).expand(8, 4)
    torch.testing.assert_close(p.crop, expected)
    r = AugmentRecipe(crop_scale=(1.0, 1.0), crop_ratio=(0.25, 0.5))
    p = sample_params(8, r, gen())
    torch.testing.assert_close(p.crop, torch.tensor([0.0, 0.25, 1.0, 0.5]).expand(8, 4))


def test_jitter_grayscale_blur_statistics() -> None:
    r = AugmentRecipe()
    n = 4000
    p = sample_params(n, r, gen(5))
    j = p.jitter
    assert 0.75 < j.float().mean() < 0.85
    for name, s in (("brightness", 0.4), ("contrast", 0.4), ("saturation", 0.4)):
        f = getattr(p, name)
        assert torch.all(f[~j] == 1.0), name
        assert f[j].min() >= 1 - s and f[j].max() <= 1 + s, name
    assert torch.all(p.hue[~j] == 0) and p.hue.abs().max() <= 0.1
    assert torch.equal(p.jitter_order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    # All 24 orders occur.
    assert torch.unique(p.jitter_order, dim=0).shape[0] == 24
    assert 0.17 < p.grayscale.float().mean() < 0.23
    blurred = p.blur_sigma > 0
    assert 0.45 < blurred.float().mean() < 0.55
    assert p.blur_sigma[blurred].min() >= 0.1 and p.blur_sigma.max() <= 2.0
    assert 0.45 < p.flip.float().mean() < 0.55


def test_one_channel_recipe_never_samples_colour() -> None:
    p = sample_params(2000, AugmentRecipe.for_channels(1), gen(6))
    assert torch.all(p.saturation == 1) and torch.all(p.hue == 0)
    assert not p.grayscale.any()
    assert p.jitter.any() and (p.brightness != 1).any() and (p.contrast != 1).any()


def test_dtypes_and_shapes() -> None:
    p = sample_params(12, AugmentRecipe(), gen(), group_size=3)
    assert p.crop.shape == (12, 4) and p.crop.dtype == torch.float32
    assert p.jitter_order.shape == (12, 4) and p.jitter_order.dtype == torch.long
    for name in ("flip", "jitter", "grayscale"):
        assert getattr(p, name).dtype == torch.bool
    for name in ("brightness", "contrast", "saturation", "hue", "blur_sigma"):
        assert getattr(p, name).shape == (12,) and getattr(p, name).dtype == torch.float32
    assert p.device == torch.device("cpu")


def test_record_helpers() -> None:
    p = sample_params(8, AugmentRecipe(), gen(7), group_size=2)
    assert len(p) == 8
    assert_params_equal(AugParams(**p.as_dict()), p)
    assert_params_equal(p.to("cpu"), p)
    assert set(p.as_dict()) == {
        "crop",
        "flip",
        "jitter",
        "brightness",
        "contrast",
        "saturation",
        "hue",
        "jitter_order",
        "grayscale",
        "blur_sigma",
    }
    with pytest.raises(CareError, match="batch size"):
        AugParams(**{**p.as_dict(), "flip": p.flip[:3]})
    with pytest.raises(CareError, match="shape"):
        AugParams(**{**p.as_dict(), "crop": p.crop[:, :3]})
    with pytest.raises(CareError, match="shape"):
        AugParams(**{**p.as_dict(), "jitter_order": p.jitter_order[:, :3]})


def test_features() -> None:
    p = identity_params(2)
    p.crop[1] = torch.tensor([0.1, 0.2, 0.5, 0.25])
    p.flip[1] = True
    p.brightness[1] = 1.2
    p.hue[1] = -0.05
    p.grayscale[1] = True
    p.blur_sigma[1] = 1.5
    f = p.features()
    assert f.shape == (2, len(AugParams.FEATURE_NAMES)) == (2, 11)
    assert f.dtype == torch.float32
    assert AugParams.FEATURE_NAMES[:4] == (
        "crop_scale",
        "crop_aspect",
        "crop_center_y",
        "crop_center_x",
    )
    torch.testing.assert_close(f[0], torch.tensor([1, 1, 0.5, 0.5, 0, 1, 1, 1, 0, 0, 0.0]))
    expected = [0.125, 0.5, 0.35, 0.325, 1, 1.2, 1, 1, -0.05, 1, 1.5]
    torch.testing.assert_close(f[1], torch.tensor(expected))
    assert not math.isnan(sample_params(64, AugmentRecipe(), gen()).features().sum().item())


@pytest.mark.parametrize("channels", [1, 3])
def test_pack_and_unpack_give_back_the_record(channels: int) -> None:
    """The one tensor a record travels to the device as (AugParams.to) holds every field exactly:
    bools, the op order and the float factors, in their dtypes."""
    recipe = AugmentRecipe.for_channels(channels)
    params = sample_params(12, recipe, gen(4), group_size=4)
    packed = params.pack()
    assert packed.shape == (12, 16) and packed.dtype == torch.float32
    back = AugParams.unpack(packed)
    assert_params_equal(back, params)
    assert {k: v.dtype for k, v in back.as_dict().items()} == {
        k: v.dtype for k, v in params.as_dict().items()
    }
    assert params.to("cpu") is params  # already there: no copy
    with pytest.raises(CareError, match=r"expected shape \(B, 16\)"):
        AugParams.unpack(packed[:, :15])
