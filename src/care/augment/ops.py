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
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "gaussian_blur",
    "gaussian_kernels",
    "grayscale",
    "hflip",
    "resized_crop",
    "to_grayscale",
]

#: ITU-R 601-2 luma weights (as PIL's ``convert("L")``; torchvision's tensor path uses 0.2989).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _col(v: Tensor) -> Tensor:
    """A ``(B,)`` parameter as ``(B, 1, 1, 1)`` for broadcasting over images."""
    return v.view(-1, 1, 1, 1)


def _rows(mask: Tensor) -> Tensor:
    """Indices of the true entries of a ``(B,)`` bool mask."""
    return mask.nonzero().squeeze(1)


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
    equals :func:`hflip` after the crop at no extra cost. No antialiasing when downscaling.
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


def hflip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirror the rows where ``mask`` is true, left to right."""
    return torch.where(_col(mask), images.flip(-1), images)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """``clamp(x * f, 0, 1)`` per image."""
    return (x * _col(factor)).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with the mean of its luma: ``clamp(f x + (1 - f) mean, 0, 1)``."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _col(factor)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its luma: ``clamp(f x + (1 - f) gray, 0, 1)``; 1 channel: no-op."""
    if x.shape[1] == 1:
        return x
    f = _col(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` turns (in ``[-0.5, 0.5]``) in HSV space; 1 channel: no-op.

    RGB -> HSV as torchvision's ``_rgb2hsv``; HSV -> RGB by the closed form
    ``c_n = V - V S clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 H) mod 6`` for
    ``n = 5, 3, 1`` (R, G, B), which equals the sector table of ``_hsv2rgb`` with fewer passes.
    """
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise CareError(f"adjust_hue needs 1 or 3 channels, got {x.shape[1]}")
    # Written with arithmetic masks and floor instead of where/remainder, which are several
    # times slower on the CPU.
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)  # = V * S
    # Hue in sixths of a turn, in [-1, 5): the max channel picks the sector (red wins ties,
    # then green, as in torchvision). Where chroma is 0 all channels are equal, the numerator
    # is 0 and so is the hue.
    is_r = torch.eq(maxc, r).to(x.dtype)
    is_g = torch.eq(maxc, g).to(x.dtype).mul_(1 - is_r)
    is_b = (1 - is_r).sub_(is_g)
    num = (g - b).mul_(is_r)
    num.addcmul_((b - r).add_(chroma, alpha=2), is_g)
    num.addcmul_((r - g).add_(chroma, alpha=4), is_b)
    h6 = num.div_(chroma.clamp_min(1e-30)).add_(shift.view(-1, 1, 1), alpha=6.0)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = h6.unsqueeze(1) + n
    k.addcmul_(torch.floor(k * (1 / 6)), torch.full_like(n, -6.0))  # k mod 6
    t = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), t, value=-1.0)


def to_grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """Replace the rows where ``mask`` is true by their luma, replicated to all channels."""
    if x.shape[1] == 1:
        return x
    return torch.where(_col(mask), grayscale(x).expand_as(x), x)


def _blend_slot(x: Tensor, a: Tensor, sat: Tensor, con: Tensor) -> Tensor:
    """``clamp(a x + sat * gray(x) + con * mean(gray(x)), 0, 1)`` per image, in one pass.

    Brightness is ``(f, 0, 0)``, saturation ``(f, 1 - f, 0)``, contrast ``(f, 0, 1 - f)`` and the
    identity ``(1, 0, 0)`` (returned bit-exact). For RGB the per-image 3x3 colour matrix
    ``a I + sat 1 w^T`` is applied with one ``baddbmm``.
    """
    bsz, ch, h, w = x.shape
    use_mean = bool((con != 0).any())
    if ch == 1:
        if use_mean:
            bias = (con * x.mean(dim=(1, 2, 3)))[:, None, None, None]
            return torch.addcmul(bias, x, _col(a)).clamp_(0, 1)
        return (x * _col(a)).clamp_(0, 1)
    weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    eye = torch.eye(3, device=x.device, dtype=x.dtype)
    matrix = a[:, None, None] * eye + sat[:, None, None] * weights.expand(3, 3)
    flat = x.reshape(bsz, 3, h * w)
    if use_mean:
        gray_mean = flat.mean(dim=2) @ weights  # mean of the luma, per image
        bias = (con * gray_mean)[:, None, None].expand(bsz, 3, h * w)
        y = torch.baddbmm(bias, matrix, flat)
    else:
        y = torch.bmm(matrix, flat)
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
    Saturation and hue are no-ops on 1-channel images.
    """
    rgb = x.shape[1] == 3
    one = torch.ones_like(brightness)
    zero = torch.zeros_like(brightness)
    owned = False
    for slot in range(4):
        op = order[:, slot]
        is_sat = (op == 2) & rgb
        a = torch.where(op == 0, brightness, torch.where(op == 1, contrast, one))
        a = torch.where(is_sat, saturation, a)
        sat = torch.where(is_sat, 1 - saturation, zero)
        con = torch.where(op == 1, 1 - contrast, zero)
        if bool(((a != 1) | (con != 0)).any()):
            x = _blend_slot(x, a, sat, con)
            owned = True
        if rgb:
            rows = _rows((op == 3) & (hue != 0))
            if rows.numel() > 0:
                if not owned:
                    x, owned = x.clone(), True
                shifted = adjust_hue(x.index_select(0, rows), hue.index_select(0, rows))
                x.index_copy_(0, rows, shifted)
    return x


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

    One grouped ``conv2d`` per axis, with the batch folded into the channel dimension so each
    image gets its own kernel. ``kernel_size`` must be odd and smaller than twice the image side.
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
        return x
    k = gaussian_kernels(sigma.to(device=x.device, dtype=x.dtype), kernel_size)
    k = k.repeat_interleave(ch, dim=0)  # (B*C, K)
    y = F.pad(x.reshape(1, bsz * ch, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(bsz * ch, 1, kernel_size, 1), groups=bsz * ch)
    y = F.conv2d(y, k.view(bsz * ch, 1, 1, kernel_size), groups=bsz * ch)
    return y.view(bsz, ch, h, w)
