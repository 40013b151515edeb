"""Batched image kernels with per-sample parameters.

Every function takes float images in ``[0, 1]`` of shape ``(B, C, H, W)`` on any device, and
per-sample parameters as ``(B,)`` tensors on the same device. No Python loop runs over images;
the semantics follow torchvision's functional transforms (noted per function where they differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from care.errors import CareError

__all__ = [
    "GRAY_WEIGHTS",
    "adjust_hue",
    "color_jitter",
    "gaussian_blur",
    "gaussian_kernels",
    "grayscale",
    "resized_crop",
]

#: ITU-R 601-2 luma weights (as PIL's ``convert("L")``; torchvision's tensor path uses 0.2989).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


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
    is_r = torch.eq(maxc, r).to(x.dtype)
    is_g = torch.eq(maxc, g).to(x.dtype).mul_(1 - is_r)
    is_b = (1 - is_r).sub_(is_g)
    # Hue in sixths of a turn, in [-1, 5). Where chroma is 0 all channels are equal, the
    # numerator is 0 and so is the hue (and the output is the input).
    h6 = (g - b).mul_(is_r)
    h6.addcmul_((b - r).add_(chroma, alpha=2), is_g)
    h6.addcmul_((r - g).add_(chroma, alpha=4), is_b)
    h6 = h6.div_(chroma.clamp_min(1e-30)).add_(shift.view(-1, 1, 1), alpha=6.0)
    h6 = h6.sub_(torch.floor(h6 * (1 / 6)).mul_(6.0))  # mod 6, in [0, 6)
    # Trapezoids clamp(slope_c |6H - offset_c| + bias_c, 0, 1) for the three channels at once.
    consts = torch.tensor(
        [[3.0, 2.0, 4.0], [1.0, -1.0, -1.0], [-1.0, 2.0, 2.0]], device=x.device, dtype=x.dtype
    )
    offset, slope, bias = consts.view(3, 1, 3, 1, 1).unbind(0)
    t = (h6.unsqueeze(1) - offset).abs_().mul_(slope).add_(bias).clamp_(0, 1)
    return t.mul_(chroma.unsqueeze(1)).add_(minc.unsqueeze(1))


def _blend(x: Tensor, a: Tensor, sat: Tensor, con: Tensor, use_mean: bool) -> Tensor:
    """``clamp(a x + sat gray(x) + con mean(gray(x)), 0, 1)`` per image, as a new tensor.

    Brightness is ``(f, 0, 0)``, saturation ``(f, 1 - f, 0)``, contrast ``(f, 0, 1 - f)`` and the
    identity ``(1, 0, 0)`` (bit-exact). For RGB the per-image colour matrix ``a I + sat 1 w^T``
    is one ``bmm``; ``use_mean`` is false when no image needs the ``con`` term.
    """
    bsz, ch, h, w = x.shape
    if ch == 1:
        y = x * _col(a)
        if use_mean:
            y.add_(_col(con * x.mean(dim=(1, 2, 3))))
        return y.clamp_(0, 1)
    weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    eye = torch.eye(3, device=x.device, dtype=x.dtype)
    matrix = a[:, None, None] * eye + sat[:, None, None] * weights.expand(3, 3)
    flat = x.reshape(bsz, 3, h * w)
    y = torch.bmm(matrix, flat)
    if use_mean:
        gray_mean = flat.mean(dim=2) @ weights  # the mean of the luma, per image
        y.add_((con * gray_mean)[:, None, None])
    return y.clamp_(0, 1).view(bsz, 3, h, w)


def color_jitter(
    x: Tensor,
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
    order: Tensor,
) -> Tensor:
    """torchvision ``ColorJitter`` with per-image factors and per-image op order.

    ``order[b, k]`` is the op (0=brightness, 1=contrast, 2=saturation, 3=hue) that image ``b``
    gets in slot ``k``; identity factors (1, 1, 1, 0) leave an image untouched. Per slot,
    brightness, contrast and saturation are one fused blend over the batch (each image gets the
    one its order puts there, the others the identity), and hue runs only on the rows that have
    it in that slot, so the whole jitter costs about four batch passes plus one hue pass.
    Saturation and hue are no-ops on 1-channel images. Returns a new tensor.
    """
    rgb = x.shape[1] == 3
    one = torch.ones_like(brightness)
    sat_f = saturation if rgb else one
    # Blend coefficients for every (image, slot) at once.
    a = torch.stack([brightness, contrast, sat_f, one], dim=1).gather(1, order)
    con = torch.where(order == 1, 1 - a, torch.zeros_like(a))
    sat = torch.where(order == 2, 1 - a, torch.zeros_like(a))
    hue_at = (
        (order == 3) & (hue != 0)[:, None] if rgb else torch.zeros_like(order, dtype=torch.bool)
    )
    # One host sync for all the per-slot decisions.
    flags = torch.stack([((a != 1) | (con != 0)).any(0), (con != 0).any(0), hue_at.any(0)])
    blend_on, mean_on, hue_on = flags.tolist()
    owned = False
    for slot in range(4):
        if blend_on[slot]:
            x = _blend(x, a[:, slot], sat[:, slot], con[:, slot], mean_on[slot])
            owned = True
        if hue_on[slot]:
            if not owned:
                x, owned = x.clone(), True
            rows = hue_at[:, slot].nonzero().squeeze(1)
            x.index_copy_(0, rows, adjust_hue(x.index_select(0, rows), hue.index_select(0, rows)))
    return x if owned else x.clone()


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """``(B, kernel_size)`` normalised 1-D Gaussian kernels (torchvision's); sigma <= 0: delta."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    positive = sigma > 0
    safe = torch.where(positive, sigma, torch.ones_like(sigma))
    pdf = torch.exp(-0.5 * (t[None, :] / safe[:, None]) ** 2)
    kernel = pdf / pdf.sum(dim=1, keepdim=True)
    delta = (t == 0).to(sigma.dtype).expand_as(kernel)
    return torch.where(positive[:, None], kernel, delta)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` (0 = identity) and reflect padding.

    Small kernels (up to 5 taps, SimCLR's size for 28-50 px images) are summed from shifted
    slices, using the kernel's symmetry; larger ones use one grouped ``conv2d`` per axis with
    the batch folded into the channels, so each image gets its own kernel. ``kernel_size``
    must be odd and smaller than twice the image side.
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
    k = gaussian_kernels(sigma.to(device=x.device, dtype=x.dtype), kernel_size)
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    if kernel_size <= 5:
        taps = k[:, pad:, None, None, None]  # centre, then +-1, +-2 (symmetric)
        # (mul_ + add_ rather than a broadcast addcmul_, which is slower on the CPU)
        rows = y[:, :, pad : pad + h, :] * taps[:, 0]
        for j in range(1, pad + 1):
            pair = y[:, :, pad - j : pad - j + h, :] + y[:, :, pad + j : pad + j + h, :]
            rows.add_(pair.mul_(taps[:, j]))
        out = rows[:, :, :, pad : pad + w] * taps[:, 0]
        for j in range(1, pad + 1):
            pair = rows[:, :, :, pad - j : pad - j + w] + rows[:, :, :, pad + j : pad + j + w]
            out.add_(pair.mul_(taps[:, j]))
        return out
    k = k.repeat_interleave(ch, dim=0)  # (B*C, K)
    y = y.reshape(1, bsz * ch, h + 2 * pad, w + 2 * pad)
    y = F.conv2d(y, k.view(bsz * ch, 1, kernel_size, 1), groups=bsz * ch)
    y = F.conv2d(y, k.view(bsz * ch, 1, 1, kernel_size), groups=bsz * ch)
    return y.view(bsz, ch, h, w)
