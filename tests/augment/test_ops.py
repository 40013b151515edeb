"""Batched kernels against naive per-image references written from the textbook formulas."""

from __future__ import annotations

import colorsys
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from care.augment import ops
from care.errors import CareError
from tests.augment import reference
from tests.augment.reference import ref_gray


def rand_images(b: int, c: int, h: int, w: int | None = None, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w or h, generator=g)


def jitter_only(x: Tensor, op: int, factor: Tensor) -> Tensor:
    """``ops.color_jitter`` with only op ``op`` (0=brightness, 1=contrast, 2=saturation) active."""
    n = x.shape[0]
    factors = [torch.ones(n), torch.ones(n), torch.ones(n)]
    factors[op] = factor
    return ops.color_jitter(x, *factors, torch.zeros(n), torch.arange(4).repeat(n, 1))


@pytest.mark.parametrize("c", [1, 3])
def test_brightness(c: int) -> None:
    x = rand_images(5, c, 6)
    f = torch.tensor([0.0, 0.6, 1.0, 1.4, 2.5])
    torch.testing.assert_close(jitter_only(x, 0, f), reference.adjust_brightness(x, f))


@pytest.mark.parametrize("c", [1, 3])
def test_contrast(c: int) -> None:
    x = rand_images(5, c, 6, seed=1)
    f = torch.tensor([0.0, 0.6, 1.0, 1.4, 2.5])
    torch.testing.assert_close(jitter_only(x, 1, f), reference.adjust_contrast(x, f))


def test_saturation() -> None:
    x = rand_images(5, 3, 6, seed=2)
    f = torch.tensor([0.0, 0.6, 1.0, 1.4, 2.5])
    torch.testing.assert_close(jitter_only(x, 2, f), reference.adjust_saturation(x, f))
    # Saturation of a gray image is the image itself.
    g = rand_images(2, 1, 4)
    assert torch.equal(jitter_only(g, 2, torch.tensor([0.5, 1.5])), g)


def ref_hue(img: Tensor, shift: float) -> Tensor:
    out = torch.empty_like(img, dtype=torch.float64)
    _, h, w = img.shape
    for i, j in itertools.product(range(h), range(w)):
        r, g, b = (float(v) for v in img[:, i, j])
        hh, s, v = colorsys.rgb_to_hsv(r, g, b)
        out[:, i, j] = torch.tensor(colorsys.hsv_to_rgb((hh + shift) % 1.0, s, v))
    return out.float()


def test_hue_matches_colorsys() -> None:
    x = rand_images(6, 3, 5, seed=3)
    # Edge cases: gray pixels, ties for the max channel, pure primaries, black and white.
    x[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5])
    x[0, :, 0, 1] = torch.tensor([0.8, 0.8, 0.1])
    x[0, :, 0, 2] = torch.tensor([0.2, 0.9, 0.9])
    x[0, :, 0, 3] = torch.tensor([0.7, 0.1, 0.7])
    x[0, :, 1, 0] = torch.tensor([1.0, 0.0, 0.0])
    x[0, :, 1, 1] = torch.tensor([0.0, 0.0, 1.0])
    x[0, :, 1, 2] = torch.tensor([0.0, 0.0, 0.0])
    x[0, :, 1, 3] = torch.tensor([1.0, 1.0, 1.0])
    shifts = torch.tensor([0.1, -0.1, 0.5, -0.5, 0.0, 0.33])
    expected = torch.stack([ref_hue(x[i], float(shifts[i])) for i in range(6)])
    torch.testing.assert_close(ops.adjust_hue(x, shifts), expected, atol=2e-6, rtol=0)
    # Zero shift is the identity (up to float rounding of the HSV round trip).
    torch.testing.assert_close(ops.adjust_hue(x, torch.zeros(6)), x, atol=1e-6, rtol=0)
    g = rand_images(2, 1, 3)
    assert torch.equal(ops.adjust_hue(g, torch.tensor([0.2, -0.3])), g)


@pytest.mark.parametrize("c", [1, 3])
def test_grayscale(c: int) -> None:
    # (Masked grayscale rows: tests/augment/test_pipeline.py, test_grayscale_rows_match_reference.)
    x = rand_images(4, c, 5, seed=4)
    assert torch.equal(ops.grayscale(x), torch.stack([ref_gray(x[i]) for i in range(4)]))


def ref_blur(img: Tensor, sigma: float, k: int) -> Tensor:
    """Direct 2-D convolution with the normalised 2-D Gaussian and reflect padding."""
    if sigma == 0:
        return img
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    kern = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    kern = (kern / kern.sum()).float()
    c = img.shape[0]
    padded = F.pad(img[None], (k // 2,) * 4, mode="reflect")
    return F.conv2d(padded, kern.expand(c, 1, k, k).contiguous(), groups=c)[0]


@pytest.mark.parametrize(("c", "k"), [(1, 3), (3, 5), (3, 7)])
def test_gaussian_blur(c: int, k: int) -> None:
    x = rand_images(4, c, 9, 8, seed=5)
    sigma = torch.tensor([0.0, 0.1, 0.8, 2.0])
    out = ops.gaussian_blur(x, sigma, k)
    for i in range(4):
        torch.testing.assert_close(out[i], ref_blur(x[i], float(sigma[i]), k))
    assert torch.equal(out[0], x[0])  # sigma 0 is exactly the identity


def test_gaussian_blur_rejects_bad_kernels() -> None:
    x = rand_images(1, 1, 4)
    with pytest.raises(CareError, match="odd"):
        ops.gaussian_blur(x, torch.ones(1), 4)
    with pytest.raises(CareError, match="too large"):
        ops.gaussian_blur(x, torch.ones(1), 9)


def test_fused_flip_of_full_box_is_hflip() -> None:
    x = rand_images(3, 3, 5)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, 4)
    mask = torch.tensor([True, False, True])
    out = ops.resized_crop(x, full, 5, flip=mask)
    torch.testing.assert_close(out, reference.hflip(x, mask), atol=1e-6, rtol=0)


def test_resized_crop_full_image_is_identity_or_plain_resize() -> None:
    x = rand_images(3, 3, 12, seed=6)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(3, 4)
    torch.testing.assert_close(ops.resized_crop(x, full, 12), x, atol=1e-6, rtol=0)
    for size in (5, 8, 20, 31):
        ref = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(ops.resized_crop(x, full, size), ref, atol=1e-5, rtol=0)


def test_resized_crop_integer_box_is_slicing() -> None:
    x = rand_images(2, 3, 16, seed=7)
    # top=4 px, left=2 px, 8x8 px box on a 16x16 image, resized to 8: exact slicing.
    box = torch.tensor([[4 / 16, 2 / 16, 8 / 16, 8 / 16], [0.0, 8 / 16, 8 / 16, 8 / 16]])
    out = ops.resized_crop(x, box, 8)
    torch.testing.assert_close(out[0], x[0, :, 4:12, 2:10], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], x[1, :, 0:8, 8:16], atol=1e-6, rtol=0)


def test_resized_crop_matches_affine_grid_and_fused_flip() -> None:
    x = rand_images(4, 3, 10, 14, seed=8)
    box = torch.tensor(
        [[0.1, 0.2, 0.5, 0.7], [0.0, 0.0, 1.0, 1.0], [0.33, 0.05, 0.6, 0.4], [0.5, 0.5, 0.5, 0.5]]
    )
    top, left, h, w = box.unbind(1)
    theta = torch.zeros(4, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * left + w - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * top + h - 1
    grid = F.affine_grid(theta, [4, 3, 7, 7], align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = ops.resized_crop(x, box, 7)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    flip = torch.tensor([True, False, False, True])
    torch.testing.assert_close(
        ops.resized_crop(x, box, 7, flip=flip), reference.hflip(out, flip), atol=1e-6, rtol=0
    )


def ref_jitter(img: Tensor, factors: tuple[float, float, float, float], order: list[int]) -> Tensor:
    one = torch.ones(1)
    for op in order:
        if op == 0:
            img = reference.adjust_brightness(img[None], one * factors[0])[0]
        elif op == 1:
            img = reference.adjust_contrast(img[None], one * factors[1])[0]
        elif op == 2:
            img = reference.adjust_saturation(img[None], one * factors[2])[0]
        elif factors[3] != 0:
            img = ops.adjust_hue(img[None], one * factors[3])[0]
    return img


@pytest.mark.parametrize("c", [1, 3])
def test_color_jitter_matches_per_image_order(c: int) -> None:
    n = 30
    g = torch.Generator().manual_seed(9)
    x = rand_images(n, c, 6, seed=9)
    b, con, s = (torch.rand(n, generator=g) * 1.2 + 0.4 for _ in range(3))
    hue = torch.rand(n, generator=g) - 0.5
    order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
    # A few identity rows.
    b[:3], con[:3], s[:3], hue[:3] = 1.0, 1.0, 1.0, 0.0
    out = ops.color_jitter(x, b, con, s, hue, order)
    for i in range(n):
        factors = (float(b[i]), float(con[i]), float(s[i]), float(hue[i]))
        expected = ref_jitter(x[i], factors, order[i].tolist())
        torch.testing.assert_close(out[i], expected, atol=2e-6, rtol=0)
    assert torch.equal(out[:3], x[:3])
    assert not torch.equal(out, x)
