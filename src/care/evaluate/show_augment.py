"""`care show-augment`: real pretraining images under the configured augmentation, as a grid.

One row per group of ``group_size`` images (the first ``per_group`` of each shown): the images,
then the views one training step makes of them (:meth:`care.methods.ContrastiveMethod.make_views`,
drawn in the same order from the generator of the run's first step): the group-shared pair
``a_g``, ``a'_g`` of L_equi, where every image of a group shows the same augmentation, and
InfoNCE's pair, where every image has its own. Beside each row, the group's parameters (crop box,
flip, jitter factors and order, grayscale, blur σ: :class:`care.augment.AugParams`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torch.nn import functional

from care.augment import Augmenter, AugParams
from care.config import Config, load_config
from care.data import LabeledImages, data_info, load_split
from care.errors import CareError
from care.methods import build_method
from care.methods.base import step_seed
from care.runs import atomic_write_bytes

#: Pixels between the images of a panel, between panels, between rows, around the grid.
CELL_GAP, PANEL_GAP, ROW_GAP, MARGIN = 2, 12, 12, 10
#: Pixels above the grid (title and panel names) and to its right (each group's parameters).
HEADER, NOTES_WIDTH = 64, 540
DPI = 100
#: The options of ``care show-augment`` besides the config's keys, and their limits.
MAX_GROUPS, DEFAULT_GROUPS, DEFAULT_PER_GROUP = 16, 4, 4
PICKS = ("first", "random")
JITTER_OPS = ("b", "c", "s", "h")  # jitter_order's ids: brightness, contrast, saturation, hue


@dataclass(frozen=True)
class Panel:
    """One column of the grid: ``pixels`` ``(groups, per_group, 3, T, T)`` in [0, 1]."""

    title: str
    pixels: Tensor
    shared: bool  # the images of a group share one augmentation here


@dataclass(frozen=True)
class AugmentGrid:
    """What the figure shows: panels side by side, one row per group, and each group's notes."""

    panels: tuple[Panel, ...]
    notes: tuple[tuple[str, ...], ...]  # per group, the lines written beside its row
    title: str

    @property
    def groups(self) -> int:
        return int(self.panels[0].pixels.shape[0])

    @property
    def per_group(self) -> int:
        return int(self.panels[0].pixels.shape[1])

    @property
    def thumb(self) -> int:
        return int(self.panels[0].pixels.shape[-1])


def thumb_size(image_size: int) -> int:
    """Displayed side of an image: small images enlarged by a whole factor to at least 72
    pixels (sharp pixels), large ones shrunk to at most 128."""
    if image_size < 72:
        return image_size * math.ceil(72 / image_size)
    return min(image_size, 128)


def to_display(x: Tensor, mean: Sequence[float], std: Sequence[float], thumb: int) -> Tensor:
    """Normalised views ``(B, C, S, S)`` → RGB pixels ``(B, 3, T, T)`` in [0, 1] (un-normalised,
    gray as three equal channels; nearest-neighbour when enlarged, so pixels stay sharp)."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x.float() * s + m).clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != thumb or x.shape[-2] != thumb:
        if x.shape[-1] < thumb and thumb % x.shape[-1] == 0 and x.shape[-2] == x.shape[-1]:
            x = functional.interpolate(x, size=(thumb, thumb), mode="nearest")
        else:
            x = functional.interpolate(
                x, size=(thumb, thumb), mode="bilinear", antialias=True, align_corners=False
            ).clamp(0.0, 1.0)
    return x.contiguous()


def draw_step(
    images: Tensor,
    augmenter: Augmenter,
    generator: torch.Generator,
    *,
    grouped: bool,
    shared: bool,
    group_size: int,
    pairs: str,
) -> dict[str, tuple[Tensor, AugParams]]:
    """The views of one training step and their parameters, by name, drawn from ``generator``
    in the order of :meth:`~care.methods.ContrastiveMethod.make_views`: the group-shared pair
    (``a_g``, ``a'_g``) first for a method with L_equi, then InfoNCE's (``t``, ``t'``) unless
    InfoNCE uses the group-shared pair (``shared``)."""
    n = images.shape[0]
    names: list[tuple[str, int, str]] = []
    if grouped:
        names += [("a_g", group_size, pairs), ("a'_g", group_size, pairs)]
    if not (grouped and shared):
        names += [("t", 1, "per_group"), ("t'", 1, "per_group")]
    drawn = {}
    for name, size, mode in names:
        params = augmenter.sample(n, generator, group_size=size, pairs=mode)
        drawn[name] = (augmenter.apply(images, params), params)
    return drawn


def describe(params: AugParams, row: int, channels: int) -> tuple[str, str]:
    """One parameter record as two short lines: the crop box and flip; jitter, gray, blur."""
    top, left, h, w = (float(v) for v in params.crop[row])
    geometry = f"crop top {top:.2f} left {left:.2f} h {h:.2f} w {w:.2f}"
    geometry += ", flip" if bool(params.flip[row]) else ", no flip"
    looks = []
    if bool(params.jitter[row]):
        used = (0, 1) if channels == 1 else (0, 1, 2, 3)  # 1 channel: no saturation, no hue
        factors = {
            0: f"b {float(params.brightness[row]):.2f}",
            1: f"c {float(params.contrast[row]):.2f}",
            2: f"s {float(params.saturation[row]):.2f}",
            3: f"h {float(params.hue[row]):+.3f}",
        }
        order = [int(k) for k in params.jitter_order[row] if int(k) in used]
        looks.append(
            "jitter "
            + " ".join(factors[k] for k in used)
            + f" (order {','.join(JITTER_OPS[k] for k in order)})"
        )
    else:
        looks.append("no jitter")
    if channels == 3:
        looks.append("gray" if bool(params.grayscale[row]) else "colour")
    sigma = float(params.blur_sigma[row])
    looks.append(f"blur σ {sigma:.2f}" if sigma > 0 else "no blur")
    return geometry, ", ".join(looks)


def augment_grid(
    images: Tensor,
    augmenter: Augmenter,
    generator: torch.Generator,
    *,
    grouped: bool,
    shared: bool,
    group_size: int,
    pairs: str = "per_group",
    per_group: int | None = None,
    title: str = "",
) -> AugmentGrid:
    """Lay out one step's views of ``images`` (uint8 ``(groups × group_size, C, H, W)``): one
    row per group, its first ``per_group`` images in each panel, each group's parameters.

    ``grouped``: the method has L_equi's group-shared views; ``shared``: InfoNCE uses them
    (``views=shared``); ``pairs``: ``per_group`` or ``per_batch``, as in training.
    """
    n, channels = images.shape[0], images.shape[1]
    if n == 0 or n % group_size:
        raise CareError(f"show-augment: {n} images do not make whole groups of {group_size}")
    groups, shown = n // group_size, min(per_group or group_size, group_size)
    thumb = thumb_size(augmenter.output_size)
    drawn = draw_step(
        images,
        augmenter,
        generator,
        grouped=grouped,
        shared=shared,
        group_size=group_size,
        pairs=pairs,
    )

    def rows(pixels: Tensor) -> Tensor:  # (n, 3, T, T) → (groups, shown, 3, T, T)
        return pixels.view(groups, group_size, *pixels.shape[1:])[:, :shown].contiguous()

    raw = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    originals = to_display(raw, [0.0] * channels, [1.0] * channels, thumb)
    panels = [Panel("images", rows(originals), shared=False)]
    also = " (InfoNCE's too)" if shared else ""
    titles = {
        "a_g": f"a_g: shared by the group{also}",
        "a'_g": f"a'_g: shared by the group{also}",
        "t": "InfoNCE t: one per image",
        "t'": "InfoNCE t': one per image",
    }
    for name, (views, _) in drawn.items():
        pixels = to_display(views, augmenter.mean, augmenter.std, thumb)
        panels.append(Panel(titles[name], rows(pixels), shared=name in ("a_g", "a'_g")))
    notes = []
    for g in range(groups):
        first = g * group_size
        lines = [f"group {g + 1} (images {first + 1}-{first + group_size} of the batch)"]
        for name in ("a_g", "a'_g"):
            if name in drawn:
                geometry, looks = describe(drawn[name][1], first, channels)
                lines += [f"{name + ':':6}{geometry}", f"{'':6}{looks}"]
        if not grouped:
            lines.append("no group-shared views: every image has its own augmentation")
        notes.append(tuple(lines))
    return AugmentGrid(tuple(panels), tuple(notes), title)


def panel_width(grid: AugmentGrid) -> int:
    return grid.per_group * grid.thumb + (grid.per_group - 1) * CELL_GAP


def cell_origin(grid: AugmentGrid, row: int, panel: int, column: int) -> tuple[int, int]:
    """``(y, x)`` of an image's top-left pixel in :func:`compose`'s tensor."""
    x = panel * (panel_width(grid) + PANEL_GAP) + column * (grid.thumb + CELL_GAP)
    return row * (grid.thumb + ROW_GAP), x


def compose(grid: AugmentGrid) -> Tensor:
    """The grid's images as one RGB picture ``(3, H, W)`` in [0, 1] on white."""
    panels = len(grid.panels)
    height = grid.groups * grid.thumb + (grid.groups - 1) * ROW_GAP
    width = panels * panel_width(grid) + (panels - 1) * PANEL_GAP
    canvas = torch.ones(3, height, width)
    t = grid.thumb
    for p, panel in enumerate(grid.panels):
        for row in range(grid.groups):
            for col in range(grid.per_group):
                y, x = cell_origin(grid, row, p, col)
                canvas[:, y : y + t, x : x + t] = panel.pixels[row, col]
    return canvas


def canvas_size(grid: AugmentGrid) -> tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`render_png` writes."""
    _, height, width = compose(grid).shape
    return MARGIN + width + MARGIN + NOTES_WIDTH, HEADER + height + MARGIN


def render_png(grid: AugmentGrid) -> bytes:
    """The grid as a PNG of exactly :func:`canvas_size` pixels: title, panel names, the images
    at one screen pixel per pixel, each group's parameters beside its row."""
    pixels = compose(grid)
    _, gh, gw = pixels.shape
    width, height = canvas_size(grid)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((MARGIN / width, MARGIN / height, gw / width, gh / height))
    ax.imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    fig.text(MARGIN / width, 1 - 6 / height, grid.title, fontsize=9, va="top", wrap=True)
    for p, panel in enumerate(grid.panels):
        _, x = cell_origin(grid, 0, p, 0)
        y = 1 - (HEADER - 4) / height
        fig.text((MARGIN + x) / width, y, panel.title, fontsize=8, va="bottom")
    notes_x = (2 * MARGIN + gw) / width
    for row, lines in enumerate(grid.notes):
        y, _ = cell_origin(grid, row, 0, 0)
        fig.text(
            notes_x,
            1 - (HEADER + y) / height,
            "\n".join(lines),
            fontsize=7,
            family="monospace",
            va="top",
            linespacing=1.25,
        )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def pick_images(dataset: LabeledImages, n: int, pick: str, seed: int) -> tuple[Tensor, list[int]]:
    """``n`` images of ``dataset``: its first, or a pick seeded by ``seed``; and their indices."""
    if n > len(dataset):
        raise CareError(
            f"show-augment needs {n} images (groups × group_size) and the pretraining split has "
            f"{len(dataset)}: lower groups or group_size"
        )
    if pick == "first":
        indices = list(range(n))
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        indices = [int(i) for i in order[:n]]
    images = [dataset[i][0] for i in indices]
    if len({tuple(im.shape) for im in images}) > 1:
        raise CareError(f"dataset {dataset.name!r}: its images differ in size; set load_size")
    return torch.stack(images), indices


def show_augment(
    cfg: Config,
    out: Path,
    *,
    groups: int = DEFAULT_GROUPS,
    per_group: int = DEFAULT_PER_GROUP,
    pick: str = "first",
) -> AugmentGrid:
    """Write ``out``: ``groups`` groups of the pretraining split under ``cfg``'s recipe, as
    the first training step draws them (seeded by ``seed``)."""
    dataset = load_split(cfg, "pretrain")
    if cfg.train_samples is not None:
        dataset = dataset.subset(cfg.train_samples)
    method = build_method(cfg, data_info(cfg, dataset))  # checks the config as training does
    grouped = method.uses_groups
    images, indices = pick_images(dataset, groups * cfg.group_size, pick, cfg.seed)
    which = "the first" if pick == "first" else f"a pick (seed {cfg.seed}) of"
    views = f", views={cfg.views}, pairs={cfg.pairs}" if grouped else " (no L_equi: no groups)"
    title = (
        f"{cfg.dataset}: {which} {len(indices)} pretraining images under method={cfg.method}"
        f"{views}, group_size={cfg.group_size}, crop_min_scale={cfg.crop_min_scale}; "
        f"the augmentations of the first training step (seed={cfg.seed}); "
        f"{min(per_group, cfg.group_size)} of each group's {cfg.group_size} shown"
    )
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, 0, 0))
    grid = augment_grid(
        images,
        method.augmenter,
        generator,
        grouped=grouped,
        shared=method.shares_views,
        group_size=cfg.group_size,
        pairs=cfg.pairs,
        per_group=per_group,
        title=title,
    )
    atomic_write_bytes(out, render_png(grid))
    return grid


def _whole(key: str, value: str, low: int, high: int) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise CareError(
            f"bad value for '{key}': {value!r}; give a whole number from {low} to {high}"
        )
    return int(value)


def show_augment_command(config: str | None, items: Sequence[str]) -> tuple[Path, AugmentGrid]:
    """``care show-augment [--config FILE] [key=value ...] out=FILE.png``: the config's keys,
    and ``groups`` (rows, 4), ``per_group`` (images shown of each group, 4) and ``pick``
    (``first`` or ``random``, seeded by ``seed``)."""
    options: dict[str, str] = {}
    overrides = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CareError(f"bad argument '{item}': write settings as key=value, e.g. groups=4")
        if key in ("out", "groups", "per_group", "pick"):
            options[key] = value
        else:
            overrides.append(item)
    out = options.get("out")
    if not out or not out.lower().endswith(".png"):
        got = f"out={out}" if out else "no out="
        raise CareError(f"care show-augment writes a PNG: {got} given; pass out=FILE.png")
    groups = _whole("groups", options.get("groups", str(DEFAULT_GROUPS)), 1, MAX_GROUPS)
    per_group = _whole("per_group", options.get("per_group", str(DEFAULT_PER_GROUP)), 1, 64)
    pick = options.get("pick", "first")
    if pick not in PICKS:
        raise CareError(f"bad value for 'pick': {pick!r}; use first or random")
    cfg = load_config(config, overrides)
    grid = show_augment(cfg, Path(out), groups=groups, per_group=per_group, pick=pick)
    return Path(out), grid
