"""The Augmenter: group sharing, reproducibility, pairs modes, identity, dtypes and errors."""

from __future__ import annotations

import platform
import sys

import pytest
import torch
from torch import Tensor

from care.augment import Augmenter, AugmentRecipe, default_blur_kernel, tune_malloc
from care.errors import CareError
from tests.augment import reference
from tests.augment.reference import identity_params


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(channels: int, size: int = 16) -> Augmenter:
    mean, std = [0.5] * channels, [0.25] * channels
    return Augmenter(AugmentRecipe.for_channels(channels), size, mean, std)


def uint8_images(n: int, c: int, h: int, seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=gen(seed))


@pytest.mark.parametrize("m", [4, 16])
@pytest.mark.parametrize("c", [1, 3])
def test_identical_images_in_a_group_come_out_identical(m: int, c: int) -> None:
    groups = 4
    base = uint8_images(groups, c, 20)
    images = base.repeat_interleave(m, dim=0)
    out, params = make(c)(images, gen(1), group_size=m)
    assert out.shape == (groups * m, c, 16, 16)
    views = out.view(groups, m, c, 16, 16)
    assert torch.equal(views, views[:, :1].expand_as(views))
    # Different groups got different augmentations of their (different) images.
    assert not torch.equal(params.crop[0], params.crop[m])


@pytest.mark.parametrize("c", [1, 3])
def test_different_groups_get_different_augmentations(c: int) -> None:
    m, groups = 4, 8
    images = uint8_images(1, c, 20).expand(m * groups, -1, -1, -1)  # the same image everywhere
    out, params = make(c)(images, gen(2), group_size=m)
    firsts = out[::m]
    for i in range(groups):
        for j in range(i + 1, groups):
            assert not torch.equal(firsts[i], firsts[j])
            assert not torch.equal(params.features()[i * m], params.features()[j * m])


@pytest.mark.parametrize("c", [1, 3])
def test_same_seed_reproduces_and_other_seed_differs(c: int) -> None:
    aug = make(c)
    images = uint8_images(32, c, 20, seed=3)
    out1, p1 = aug(images, gen(5), group_size=4)
    out2, p2 = aug(images, gen(5), group_size=4)
    assert torch.equal(out1, out2)
    for name, value in p1.as_dict().items():
        assert torch.equal(value, p2.as_dict()[name]), name
    out3, p3 = aug(images, gen(6), group_size=4)
    assert not torch.equal(out1, out3)
    assert not torch.equal(p1.crop, p3.crop)


def test_per_batch_pairs_share_one_record() -> None:
    aug = make(3)
    p = aug.sample(24, gen(7), group_size=4, pairs="per_batch")
    assert len(p) == 24
    for name, value in p.as_dict().items():
        assert torch.equal(value, value[:1].expand_as(value)), name
    images = uint8_images(1, 3, 20).expand(24, -1, -1, -1)
    out = aug.apply(images, p)
    assert torch.equal(out, out[:1].expand_as(out))
    with pytest.raises(CareError, match="groups of 5"):
        aug.sample(24, gen(), group_size=5, pairs="per_batch")
    with pytest.raises(CareError, match="pairs"):
        aug.sample(24, gen(), group_size=4, pairs="per_image")


def test_indivisible_batch_is_a_care_error() -> None:
    with pytest.raises(CareError, match="does not split into groups of 4"):
        make(1)(uint8_images(10, 1, 16), gen(), group_size=4)


@pytest.mark.parametrize("c", [1, 3])
def test_identity_params_only_normalise(c: int) -> None:
    images = uint8_images(6, c, 16, seed=8)
    aug = make(c, size=16)
    out = aug.apply(images, identity_params(6))
    expected = (images.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_grayscale_rows_match_reference(c: int) -> None:
    images = uint8_images(4, c, 16, seed=18)
    params = identity_params(4)
    params.grayscale[:] = torch.tensor([True, False, True, False])
    out = make(c, size=16).apply(images, params)
    expected = (reference.to_grayscale(images.float() / 255, params.grayscale) - 0.5) / 0.25
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_output_shape_dtype_and_float_input(c: int) -> None:
    aug = make(c, size=12)
    images = uint8_images(8, c, 20, seed=9)
    params = aug.sample(8, gen(10), group_size=2)
    out = aug.apply(images, params)
    assert out.shape == (8, c, 12, 12) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # The same images as floats in [0, 1] (also float64) give the same views.
    for dtype in (torch.float32, torch.float64):
        out_f = aug.apply(images.to(dtype) / 255, params)
        assert out_f.dtype == torch.float32
        torch.testing.assert_close(out_f, out, atol=1e-5, rtol=0)
    # Normalised values stay within what [0, 1] inputs allow.
    assert out.min() >= (0 - 0.5) / 0.25 - 1e-5 and out.max() <= (1 - 0.5) / 0.25 + 1e-5
    # The input batch is not modified.
    assert torch.equal(images, uint8_images(8, c, 20, seed=9))


def test_every_op_fires_on_a_real_batch() -> None:
    aug = make(3)
    images = uint8_images(64, 3, 20, seed=11)
    out, p = aug(images, gen(12))
    assert p.flip.any() and p.jitter.any() and p.grayscale.any() and (p.blur_sigma > 0).any()
    # Grayscale rows have equal channels after un-normalising (blur keeps that).
    gray = out[p.grayscale]
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5)
    assert torch.allclose(gray[:, 1], gray[:, 2], atol=1e-5)


@pytest.mark.parametrize("c", [1, 3])
def test_batched_equals_one_image_at_a_time(c: int) -> None:
    aug = make(c)
    images = uint8_images(8, c, 20, seed=16)
    out, p = aug(images, gen(17), group_size=2)
    for i in range(8):
        single = aug.apply(images[i : i + 1], reference.rows(p, slice(i, i + 1)))
        torch.testing.assert_close(single[0], out[i], atol=1e-5, rtol=0)


def test_errors_name_the_input() -> None:
    aug = make(3)
    with pytest.raises(CareError, match="channels"):
        aug.apply(uint8_images(2, 1, 16), identity_params(2))
    with pytest.raises(CareError, match="parameter rows"):
        aug.apply(uint8_images(2, 3, 16), identity_params(3))
    with pytest.raises(CareError, match="uint8 or float"):
        aug.apply(torch.zeros(2, 3, 16, 16, dtype=torch.int32), identity_params(2))
    with pytest.raises(CareError, match="std"):
        Augmenter(AugmentRecipe(), 16, [0.5] * 3, [0.0] * 3)
    with pytest.raises(CareError, match="odd"):
        Augmenter(AugmentRecipe(), 16, [0.5] * 3, [0.2] * 3, blur_kernel=4)


def test_default_blur_kernel_is_simclr_ten_percent() -> None:
    assert [default_blur_kernel(s) for s in (28, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]
    assert make(1, size=28).blur_kernel == 3
    assert Augmenter(AugmentRecipe(), 32, [0.5] * 3, [0.2] * 3, blur_kernel=5).blur_kernel == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("c", [1, 3])
def test_cuda_matches_cpu(c: int) -> None:
    aug = make(c)
    images = uint8_images(64, c, 20, seed=14)
    p = aug.sample(64, gen(15), group_size=4)
    out_cpu = aug.apply(images, p)
    out_gpu = aug.apply(images.cuda(), p)  # params stay on the CPU and are moved
    assert out_gpu.device.type == "cuda"
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-4, rtol=0)
    out_gpu2 = aug.apply(images.cuda(), p.to("cuda"))
    torch.testing.assert_close(out_gpu2, out_gpu)


def _mmapped_bytes() -> int | None:
    """glibc's count of bytes currently in mmap'd blocks (``mallinfo2().hblkhd``), if available."""
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    return int(libc.mallinfo2().hblkhd)


def test_tune_malloc() -> None:
    # Process-wide but harmless: glibc keeps freed memory instead of returning it to the OS.
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert tune_malloc() is expected
    out, _ = make(3, size=8)(uint8_images(4, 3, 8), gen())
    assert out.shape == (4, 3, 8, 8)
    if expected and (before := _mmapped_bytes()) is not None:
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB: above glibc's largest mmap threshold
        assert _mmapped_bytes() == before, "a 64 MiB tensor was mmap'd despite tune_malloc"
        del big
