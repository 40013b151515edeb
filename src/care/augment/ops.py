"""Batched image kernels with per-sample parameters.

Every function takes float images in ``[0, 1]`` of shape ``(B, C, H, W)`` on any device, and
per-sample parameters as ``(B,)`` tensors on the same device. No Python loop runs over images;
the semantics follow torchvision's functional transforms (noted per function where they differ).

Nothing here synchronises the host with the device: no ``.item()``, ``nonzero()`` or Python
``if`` on tensor values. Every kernel runs on the whole batch, and per-image choices are masks
or identity parameters (a factor of 1, a zero hue shift or sigma); only static facts (shapes,
the caller's ``use_*`` flags) skip work. Constant tensors are cached per device
(:func:`device_constant`), so they are copied to a device once, not on every call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from care.errors import CareError

__all__ = [
    "GRAY_WEIGHTS",
    "adjust_hue",
    "color_jitter",
    "device_constant",
    "gaussian_blur",
    "gaussian_kernels",
    "grayscale",
    "normalize",
    "resized_crop",
]

#: ITU-R 601-2 luma weights (as PIL's ``convert("L")``; torchvision's tensor path uses 0.2989).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

#: Kernel taps below this are set to 0: subnormal floats slow CPU arithmetic several times, and
#: a tap this small changes no pixel of a normal float image.
_TINY_TAP = 1e-30


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``torch.tensor(values)`` on ``device``, cached: read-only, never modify it in place.

    ``torch.tensor(..., device=cuda)`` copies from pageable memory and synchronises the stream;
    the cache does that once per device instead of on every batch.
    """
    with torch.inference_mode(False):  # usable outside inference mode too
        return torch.tensor(values, device=device, dtype=dtype)


def _col(v: Tensor) -> Tensor:
    """A ``(B,)`` parameter as ``(B, 1, 1, 1)`` for broadcasting over images."""
    return v.view(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """Luma ``(B, 1, H, W)`` of RGB images; a 1-channel image is its own luma."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise CareError(f"grayscale needs 1 or 3 channels, got {x.shape[1]}")
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]


def normalize(
    x: Tensor, mean: tuple[float, ...], inv_std: tuple[float, ...], gray: Tensor | None = None
) -> Tensor:
    """``(x - mean) * inv_std`` per channel, in place; with ``gray`` (``(B,)`` bool, RGB only)
    those images become their luma first.

    With ``gray`` it is one per-image colour matrix ``diag(inv_std) (gray ? 1 w^T : I)`` and
    offset ``-mean * inv_std`` (a ``baddbmm``), which is cheaper than a masked luma and a
    separate normalisation. Returns ``x`` normalised (a new tensor when ``gray`` is given).
    """
    if gray is None:
        m = device_constant(mean, x.device, x.dtype).view(1, -1, 1, 1)
        s = device_constant(inv_std, x.device, x.dtype).view(1, -1, 1, 1)
        return x.sub_(m).mul_(s)
    bsz, ch, h, w = x.shape
    if ch != 3:
        raise CareError(f"normalize with gray needs 3 channels, got {ch}")
    scale = device_constant(inv_std, x.device, x.dtype)
    offset = device_constant(
        tuple(-m * s for m, s in zip(mean, inv_std, strict=True)), x.device, x.dtype
    )
    weights = device_constant(GRAY_WEIGHTS, x.device, x.dtype)
    g = _col(gray).view(-1, 1, 1).to(x.dtype)
    colour = torch.eye(3, device=x.device, dtype=x.dtype) * (1 - g) + weights.expand(3, 3) * g
    matrix = scale.view(1, 3, 1) * colour
    y = torch.baddbmm(offset.view(1, 3, 1), matrix, x.reshape(bsz, 3, h * w))
    return y.view(bsz, 3, h, w)


def resized_crop(images: Tensor, crop: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crop box ``crop[b] = (top, left, height, width)`` (fractions) and resize to ``size``.

    Bilinear sampling with ``align_corners=False`` and border clamping, which is what
    ``F.interpolate(mode="bilinear", antialias=False)`` does: a full-image box is a plain resize,
    and an integer-aligned box resized to its own size is exact slicing. The sampling grid equals
    ``F.affine_grid`` for the box's axis-aligned affine map, but is built by broadcasting (the
    generic ``affine_grid`` is a batched matmul several times slower than ``grid_sample``
    on the CPU). ``flip`` (``(B,)`` bool) mirrors the grid horizontally for those rows, which
    equals mirroring the output left to right at no extra cost. No antialiasing when downscaling.
    """
    if images.dim() != 4:
        raise CareError(
            f"resized_crop expects (B, C, H, W) images, got shape {tuple(images.shape)}"
        )
    b = images.shape[0]
    crop = crop.to(device=images.device, dtype=images.dtype)
    top, left, h, w = crop.unbind(1)
    # Box in grid_sample's normalised coordinates: centre (cx, cy), half-extent (sx, sy).
    cx = 2 * left + w - 1
    cy = 2 * top + h - 1
    sx = torch.where(flip.to(images.device), -w, w) if flip is not None else w
    u = torch.arange(size, device=images.device, dtype=images.dtype).mul_(2).add_(1).div_(size)
    u = u.sub_(1)  # output pixel centres in (-1, 1)
    gx = cx[:, None] + sx[:, None] * u  # (B, S)
    gy = cy[:, None] + h[:, None] * u
    grid = torch.empty(b, size, size, 2, device=images.device, dtype=images.dtype)
    grid[..., 0] = gx[:, None, :]
    grid[..., 1] = gy[:, :, None]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` turns (in ``[-0.5, 0.5]``) in HSV space (1 channel: returned as is).

    RGB -> HSV as torchvision's ``_rgb2hsv`` (the max channel picks the sector, red wins ties,
    then green). HSV -> RGB by the closed form ``c = min + chroma * T_c(6 H)`` with the
    trapezoids ``T_r = clamp(|6H - 3| - 1)``, ``T_g = clamp(2 - |6H - 2|)``,
    ``T_b = clamp(2 - |6H - 4|)``, which equals ``_hsv2rgb``'s sector table in fewer passes.
    Masks are arithmetic and the modulo uses ``floor``: ``where``/``remainder`` (and broadcast
    ``addcmul``) are several times slower on the CPU.
    """
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise CareError(f"adjust_hue needs 1 or 3 channels, got {x.shape[1]}")
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    chroma = maxc - minc  # = V * S
    # 1 where a channel is below the max, 0 where it is the max (max - c is exactly 0 there);
    # sign() is cheaper on the CPU than comparisons converted to float.
    below_r = torch.sign(maxc - r)
    below_g = torch.sign(maxc - g)
    is_r = 1 - below_r
    is_g = (1 - below_g).mul_(below_r)
    is_b = below_r * below_g
    # Hue in sixths of a turn, in [-1, 5). Where chroma is 0 all channels are equal, the
    # numerator is 0 and so is the hue (and the output is the input).
    h6 = (g - b).mul_(is_r)
    h6.addcmul_((b - r).add_(chroma, alpha=2), is_g)
    h6.addcmul_((r - g).add_(chroma, alpha=4), is_b)
    h6 = h6.div_(chroma.clamp_min(1e-30)).add_(shift.view(-1, 1, 1), alpha=6.0)
    h6 = h6.sub_(torch.floor(h6 * (1 / 6)).mul_(6.0))  # mod 6, in [0, 6)
    # Trapezoids clamp(slope_c |6H - offset_c| + bias_c, 0, 1) for the three channels at once.
    consts = device_constant((3.0, 2.0, 4.0, 1.0, -1.0, -1.0, -1.0, 2.0, 2.0), x.device, x.dtype)
    offset, slope, bias = consts.view(3, 1, 3, 1, 1).unbind(0)
    t = (h6.unsqueeze(1) - offset).abs_().mul_(slope).add_(bias).clamp_(0, 1)
    return t.mul_(chroma.unsqueeze(1)).add_(minc.unsqueeze(1))


def _blend(x: Tensor, a: Tensor, sat: Tensor, con: Tensor, use_mean: bool) -> Tensor:
    """``clamp(a x + sat gray(x) + con mean(gray(x)), 0, 1)`` per image, as a new tensor.

    Brightness is ``(f, 0, 0)``, saturation ``(f, 1 - f, 0)``, contrast ``(f, 0, 1 - f)`` and the
    identity ``(1, 0, 0)`` (a clamp only: bit-exact on images in ``[0, 1]``). For RGB the
    per-image colour matrix ``a I + sat 1 w^T`` is one ``bmm``; ``use_mean`` is false when no
    image needs the ``con`` term.
    """
    bsz, ch, h, w = x.shape
    if ch == 1:
        y = x * _col(a)
        if use_mean:
            y.add_(_col(con * x.mean(dim=(1, 2, 3))))
        return y.clamp_(0, 1)
    weights = device_constant(GRAY_WEIGHTS, x.device, x.dtype)
    eye = torch.eye(3, device=x.device, dtype=x.dtype)
    matrix = a[:, None, None] * eye + sat[:, None, None] * weights.expand(3, 3)
    flat = x.reshape(bsz, 3, h * w)
    if use_mean:
        gray_mean = flat.mean(dim=2) @ weights  # the mean of the luma, per image
        y = torch.baddbmm((con * gray_mean)[:, None, None], matrix, flat)
    else:
        y = torch.bmm(matrix, flat)
    return y.clamp_(0, 1).view(bsz, 3, h, w)


def _blend_steps(order: Tensor, around_hue: bool) -> Tensor:
    """Which blend op (0-2, or 3 for the identity) each image does in each blend step.

    Without hue, step ``j`` holds the ``j``-th op of ``order`` other than hue: ``(B, 3)``. Around
    one shared hue step, an image whose hue sits in slot ``k`` does its ``k`` earlier blends in
    the last ``k`` of three steps before the hue and its ``3 - k`` later ones in the first steps
    of three after it, the identity in the others: ``(B, 6)``, steps 0-2 before, 3-5 after.
    """
    k = (order == 3).to(torch.uint8).argmax(dim=1, keepdim=True)  # the hue's slot
    j = torch.arange(3, device=order.device)
    if not around_hue:
        return order.gather(1, j + (j >= k))  # skip the hue's slot
    slots = torch.cat([j + k - 3, j + k + 1], dim=1)  # before: k-3..k-1, after: k+1..k+3
    valid = (slots >= 0) & (slots <= 3)
    return torch.where(valid, order.gather(1, slots.clamp(0, 3)), 3)


def color_jitter(
    x: Tensor,
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
    order: Tensor,
    *,
    use_blend: bool = True,
    use_mean: bool = True,
    use_hue: bool = True,
) -> Tensor:
    """torchvision ``ColorJitter`` with per-image factors and per-image op order.

    ``order[b, k]`` is the op (0=brightness, 1=contrast, 2=saturation, 3=hue) that image ``b``
    gets in slot ``k``; identity factors (1, 1, 1, 0) leave an image untouched. Brightness,
    contrast and saturation are fused blends over the whole batch (each image gets its own op,
    or the identity, in every blend step). Hue, the costly op, runs once on the whole batch and
    is kept where the shift is non-zero; each image's blends are scheduled around it
    (:func:`_blend_steps`), so RGB costs six blend passes and one hue pass, and without hue
    three blend passes. Saturation and hue are no-ops on 1-channel images.

    ``use_blend``, ``use_mean`` and ``use_hue`` are static promises that skip work: false means
    no image has a brightness/contrast/saturation factor other than 1, a contrast factor other
    than 1, or a hue shift other than 0. Returns a new tensor.
    """
    rgb = x.shape[1] == 3
    use_hue = use_hue and rgb
    if use_blend:
        one = torch.ones_like(brightness)
        factors = torch.stack([brightness, contrast, saturation if rgb else one, one], dim=1)
        steps = _blend_steps(order, use_hue)
        a = factors.gather(1, steps)  # blend coefficients for every (image, step)
        con = torch.where(steps == 1, 1 - a, 0)
        sat = torch.where(steps == 2, 1 - a, 0)
        before = 3 if use_hue else steps.shape[1]
        for step in range(before):
            x = _blend(x, a[:, step], sat[:, step], con[:, step], use_mean)
    if use_hue:
        x = torch.where(_col(hue != 0), adjust_hue(x, hue), x)
    if use_blend and use_hue:
        for step in range(3, 6):
            x = _blend(x, a[:, step], sat[:, step], con[:, step], use_mean)
    return x if use_blend or use_hue else x.clone()


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """``(B, kernel_size)`` normalised 1-D Gaussian kernels (torchvision's); sigma <= 0: delta.

    Taps below ``1e-30`` are set to 0 (subnormal taps make CPU convolutions several times slower).
    """
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    positive = sigma > 0
    safe = torch.where(positive, sigma, torch.ones_like(sigma))
    pdf = torch.exp(-0.5 * (t[None, :] / safe[:, None]) ** 2)
    kernel = pdf / pdf.sum(dim=1, keepdim=True)
    kernel = kernel.masked_fill(kernel < _TINY_TAP, 0.0)
    delta = (t == 0).to(sigma.dtype).expand_as(kernel)
    return torch.where(positive[:, None], kernel, delta)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Gaussian blur with a per-image ``sigma`` (0 = identity) and reflect padding.

    One grouped ``conv2d`` with the batch folded into the channels, so each image gets its own
    kernel: the 2-D kernel for up to 5 taps (SimCLR's size for 28-50 px images; one pass beats
    two), else one 1-D pass per axis. A sigma-0 image is returned exactly (on the CPU its delta
    kernel is exact; elsewhere, e.g. with TF32 convolutions on CUDA, it is masked back).
    ``kernel_size`` must be odd and smaller than twice the image side.
    """
    bsz, ch, h, w = x.shape
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise CareError(f"blur kernel_size={kernel_size} must be a positive odd integer")
    pad = kernel_size // 2
    if pad >= min(h, w):
        raise CareError(
            f"blur kernel_size={kernel_size} is too large for {h}x{w} images: "
            f"use at most {2 * min(h, w) - 1}"
        )
    if bsz == 0 or pad == 0:
        return x.clone()
    sigma = sigma.to(device=x.device, dtype=x.dtype)
    k = gaussian_kernels(sigma, kernel_size).repeat_interleave(ch, dim=0)  # (B*C, K)
    n = bsz * ch
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").view(1, n, h + 2 * pad, w + 2 * pad)
    if kernel_size <= 5:
        y = F.conv2d(y, (k[:, :, None] * k[:, None, :]).unsqueeze(1), groups=n)
    else:
        y = F.conv2d(y, k.view(n, 1, kernel_size, 1), groups=n)
        y = F.conv2d(y, k.view(n, 1, 1, kernel_size), groups=n)
    y = y.view(bsz, ch, h, w)
    if x.device.type != "cpu":
        y = torch.where(_col(sigma > 0), y, x)
    return y
