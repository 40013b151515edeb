"""What the Augmenter and the samplers refuse, in one line: a non-int group_size, images without
pixels, a non-finite mean or std, float images outside [0, 1]; and the empty batch they take."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from care.augment import Augmenter, AugmentRecipe, PixelRangeGuard, check_groups, sample_params
from care.augment import eval as augment_eval
from care.errors import CareError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(channels: int = 3, size: int = 16) -> Augmenter:
    return Augmenter(
        AugmentRecipe.for_channels(channels), size, [0.5] * channels, [0.25] * channels
    )


def uint8_images(n: int, c: int = 3, h: int = 20, seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=gen(seed))


# ------------------------------------------------------------------------------------ group_size

BAD_GROUP_SIZES = [True, False, 16.0, 2.0, "4", None]


@pytest.mark.parametrize("group_size", BAD_GROUP_SIZES)
def test_group_size_that_is_not_an_int_is_one_line(group_size: object) -> None:
    aug = make()
    images = uint8_images(16)
    calls = {
        "check_groups": lambda: check_groups(16, group_size),  # type: ignore[arg-type]
        "sample_params": lambda: sample_params(16, AugmentRecipe(), gen(), group_size),  # type: ignore[arg-type]
        "sample": lambda: aug.sample(16, gen(), group_size),  # type: ignore[arg-type]
        "sample_per_batch": lambda: aug.sample(16, gen(), group_size, pairs="per_batch"),  # type: ignore[arg-type]
        "call": lambda: aug(images, gen(), group_size),  # type: ignore[arg-type]
    }
    for name, call in calls.items():
        with pytest.raises(CareError, match=r"group_size=.* must be an int, not") as info:
            call()
        assert "\n" not in str(info.value), name


def test_int_group_sizes_still_work() -> None:
    p = make().sample(16, gen(), 4)
    assert len(p) == 16 and torch.equal(p.crop[:4], p.crop[:1].expand(4, 4))


# ------------------------------------------------------------------------------------ image shape


@pytest.mark.parametrize("shape", [(2, 3, 0, 0), (2, 3, 0, 16), (2, 3, 16, 0), (0, 3, 0, 0)])
def test_images_without_pixels_are_one_line_naming_the_shape(shape: tuple[int, ...]) -> None:
    aug = make()
    images = torch.zeros(shape, dtype=torch.uint8)
    with pytest.raises(CareError, match=rf"images of shape \({', '.join(map(str, shape))}\)") as e:
        aug(images, gen())
    assert "\n" not in str(e.value) and "no pixels" in str(e.value)
    with pytest.raises(CareError, match="no pixels"):
        aug.apply(images.float(), aug.sample(shape[0], gen()))


@pytest.mark.parametrize("pairs", ["per_group", "per_batch"])
@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_an_empty_batch_gives_an_empty_batch_of_views(
    pairs: str, group_size: int, dtype: torch.dtype
) -> None:
    aug = make(3, size=12)
    out, params = aug(torch.zeros(0, 3, 20, 20, dtype=dtype), gen(), group_size, pairs)
    assert out.shape == (0, 3, 12, 12) and out.dtype == torch.float32
    assert len(params) == 0


def test_an_empty_batch_does_not_use_up_the_accelerator_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked = _record_checks(monkeypatch)
    aug = make()
    aug.apply(torch.empty(0, 3, 20, 20, device="meta"), aug.sample(0, gen()))
    assert checked == []
    aug.apply(torch.empty(2, 3, 20, 20, device="meta"), aug.sample(2, gen()))
    assert checked == [(2, 3, 20, 20)]


# ------------------------------------------------------------------------------------ mean and std


@pytest.mark.parametrize(
    ("mean", "std"),
    [
        ((0.5,), (float("nan"),)),
        ((0.5,), (float("inf"),)),
        ((float("nan"),), (0.25,)),
        ((float("-inf"),), (0.25,)),
        ((0.5, 0.5, float("nan")), (0.25, 0.25, 0.25)),
    ],
)
def test_non_finite_mean_or_std_is_refused_at_construction(
    mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    with pytest.raises(CareError, match="must be finite numbers") as info:
        Augmenter(AugmentRecipe.for_channels(len(mean)), 16, mean, std)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("std", [0.0, -0.25])
def test_non_positive_std_is_still_refused(std: float) -> None:
    with pytest.raises(CareError, match="must be positive"):
        Augmenter(AugmentRecipe.for_channels(1), 16, (0.5,), (std,))


# ------------------------------------------------------------------------------------ pixel range


def _record_checks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Replace the value check that PixelRangeGuard runs with a recorder of the batch shapes it
    is asked to check (meta tensors have no values to check)."""
    checked: list[tuple[int, ...]] = []

    def record(images: Tensor, what: str = "images") -> None:
        checked.append(tuple(images.shape))

    monkeypatch.setattr(augment_eval, "check_pixel_range", record)
    return checked


@pytest.mark.parametrize(
    ("what", "images"),
    [
        ("0..255 as float", uint8_images(4).float()),
        ("normalised", (uint8_images(4).float() / 255 - 0.5) / 0.25),
    ],
)
def test_float_images_outside_unit_range_are_refused_on_the_cpu(what: str, images: Tensor) -> None:
    aug = make()
    with pytest.raises(CareError, match="augment: images are float with values in") as info:
        aug(images, gen())
    assert "\n" not in str(info.value) and "float in [0, 1]" in str(info.value), what


def test_uint8_and_unit_range_float_images_pass_and_every_cpu_float_batch_is_checked() -> None:
    aug = make()
    images = uint8_images(4)
    params = aug.sample(4, gen())
    out = aug.apply(images, params)
    torch.testing.assert_close(aug.apply(images.float() / 255, params), out, atol=1e-5, rtol=0)
    torch.testing.assert_close(aug.apply(images.double() / 255, params), out, atol=1e-5, rtol=0)
    # a bad batch after good ones is still refused on the CPU
    with pytest.raises(CareError, match="values in"):
        aug.apply(images.float(), params)


def test_uint8_batches_are_never_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = _record_checks(monkeypatch)
    aug = make()
    for device in ("cpu", "meta"):
        aug(uint8_images(4).to(device), gen())
    assert checked == []


def test_on_an_accelerator_only_the_first_float_batch_of_each_augmenter_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A non-CPU device (meta here) reads the values once per Augmenter, not once per step."""
    checked = _record_checks(monkeypatch)
    first, second = make(), make()
    for n in (2, 4, 6):
        first.apply(torch.empty(n, 3, 20, 20, device="meta"), first.sample(n, gen()))
    assert checked == [(2, 3, 20, 20)]
    second.apply(torch.empty(8, 3, 20, 20, device="meta"), second.sample(8, gen()))
    assert checked == [(2, 3, 20, 20), (8, 3, 20, 20)]
    # the CPU, with nothing to wait for, is checked every time
    for _ in range(2):
        first.apply(torch.rand(2, 3, 20, 20), first.sample(2, gen()))
    assert checked[2:] == [(2, 3, 20, 20), (2, 3, 20, 20)]


def test_pixel_range_guard_is_the_one_augment_exports() -> None:
    assert isinstance(make()._pixel_guard, PixelRangeGuard)


def test_an_empty_record_packs_and_moves_to_another_device() -> None:
    """What an empty batch on an accelerator needs: the record of no images crosses devices."""
    empty = sample_params(0, AugmentRecipe(), gen())
    assert empty.pack().shape == (0, 16)
    moved = empty.to("meta")
    assert len(moved) == 0 and moved.device.type == "meta"
    assert moved.jitter_order.shape == (0, 4) and moved.crop.shape == (0, 4)
