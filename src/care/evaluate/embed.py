"""`care embed RUN_DIR out=FILE`: embeddings and labels of a dataset split, optionally with a grid
of nearest neighbours.

The encoder is :func:`care.runs.load_encoder`'s: the run's evaluation transform, then the
backbone (``layer=backbone``, the features a linear probe uses) or the projection onto the run's
sphere or hyperboloid (``layer=projection``). Images are embedded ``batch_size`` at a time on the
run's :func:`care.hardware.evaluation_device`, at the precision ``care probe`` uses. The output
format follows ``out``'s extension: ``.safetensors`` (tensors ``embeddings`` and ``labels``,
metadata naming the run, layer, dataset and split), ``.npz`` (arrays ``embeddings`` and
``labels``) or ``.npy`` (the embeddings; the labels go to ``FILE.labels.npy`` beside it).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from torch import Tensor

from care.config import Config, with_overrides
from care.data import LabeledImages, load_split, resolve_data_root
from care.data.registry import SPLITS
from care.errors import CareError
from care.evaluate.features import extract_features
from care.hardware import (
    evaluation_device,
    evaluation_precision,
    requested_precision,
    resolve_memory_format,
    torch_memory_format,
)
from care.models import ENCODER_LAYERS, TrainedEncoder, care_version
from care.plots import neighbours_figure
from care.runs import RunDir, atomic_write_files, load_encoder

FORMATS = (".safetensors", ".npz", ".npy")
"""The output formats, by ``out``'s extension."""
QUERIES = 8
"""Query images in the nearest-neighbour grid."""
MAX_NEIGHBOURS = 32
"""The most neighbours per query the grid shows."""

#: Class names of the built-in datasets with fixed classes (image folders name theirs).
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    "stl10": (
        "airplane",
        "bird",
        "car",
        "cat",
        "deer",
        "dog",
        "horse",
        "monkey",
        "ship",
        "truck",
    ),
}


@dataclass(frozen=True)
class EmbedResult:
    """What `care embed` wrote: files, sizes, and how long embedding took."""

    run: str
    layer: str
    dataset: str
    split: str
    count: int
    dim: int
    files: tuple[str, ...]
    seconds: float
    neighbours_png: str | None = None

    @property
    def images_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("nan")


def output_kind(out: str | Path) -> str:
    """``out``'s format (:data:`FORMATS`); another extension is a one-line error."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise CareError(
            f"out={out} has an unknown extension: end it in .safetensors (embeddings and labels "
            "in one file), .npz or .npy (labels in FILE.labels.npy beside it)"
        )
    return suffix


def labels_path(out: str | Path) -> Path:
    """Where a ``.npy`` output's labels go: ``emb.npy`` → ``emb.labels.npy``."""
    return Path(out).with_suffix(".labels.npy")


def neighbours_path(out: str | Path) -> Path:
    """Where the nearest-neighbour grid goes: ``emb.safetensors`` → ``emb.neighbours.png``."""
    return Path(out).with_suffix(".neighbours.png")


def class_names(dataset: LabeledImages) -> tuple[str, ...] | None:
    """The dataset's class names (image folders: their folder names), None where unknown."""
    folders = getattr(dataset, "classes", None)
    if isinstance(folders, list | tuple) and len(folders) == dataset.num_classes:
        return tuple(str(c) for c in folders)
    names = CLASS_NAMES.get(dataset.name)
    return names if names is not None and len(names) == dataset.num_classes else None


def printable(name: str) -> str:
    """A class name as text can show it: a folder name that is not UTF-8 (decoded with
    surrogate escapes) gets its undecodable bytes as U+FFFD instead of failing a plot."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def label_text(label: int, names: tuple[str, ...] | None) -> str:
    """A label as shown: its class name where known, ``unlabeled`` for -1, else the number."""
    if label < 0:
        return "unlabeled"
    return printable(names[label]) if names is not None and label < len(names) else str(label)


def pick_queries(labels: Tensor, count: int = QUERIES) -> list[int]:
    """``count`` query indices: the first image of each distinct label in order of appearance,
    then, with fewer labels than ``count``, the next images not yet chosen."""
    count = min(count, int(labels.numel()))
    chosen: list[int] = []
    seen: set[int] = set()
    for i, label in enumerate(labels.tolist()):
        if label not in seen:
            seen.add(label)
            chosen.append(i)
            if len(chosen) == count:
                return chosen
    taken = set(chosen)
    chosen += [i for i in range(int(labels.numel())) if i not in taken][: count - len(chosen)]
    return chosen


def nearest_neighbours(embeddings: Tensor, queries: list[int], k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest neighbours of each query row by cosine similarity, itself excluded:
    (indices ``(Q, k)``, similarities ``(Q, k)``), most similar first."""
    if not 1 <= k < embeddings.shape[0]:
        raise CareError(
            f"neighbours={k} needs between 1 and {embeddings.shape[0] - 1} other images "
            f"({embeddings.shape[0]} embedded): lower neighbours"
        )
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    index = torch.tensor(queries, dtype=torch.long)
    similarity = unit[index] @ unit.T  # (Q, N)
    similarity[torch.arange(len(queries)), index] = -float("inf")  # not itself
    values, found = similarity.topk(k, dim=1)
    return found, values.float()


def embed_images(
    encoder: TrainedEncoder,
    dataset: LabeledImages,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "32",
    memory_format: torch.memory_format = torch.contiguous_format,
    num_workers: int = 0,
    description: str = "embedding",
) -> tuple[Tensor, Tensor]:
    """``encoder`` applied to every image of ``dataset`` (:func:`extract_features` with the
    encoder's own preprocessing, in float32, and its network under autocast): (float32
    embeddings, labels) on the CPU."""
    encoder.eval().to(device)  # the preprocessing's mean and std too
    embeddings, labels = extract_features(
        encoder.net,
        dataset,
        encoder.preprocess,
        batch_size=batch_size,
        device=device,
        precision=precision,
        memory_format=memory_format,
        num_workers=num_workers,
        description=description,
    )
    return embeddings, labels.long()


def data_config(cfg: Config, dataset: str | None, data_root: str | None) -> Config:
    """The run's config pointed at the data to embed: the run's own by default; another dataset
    is read from ``data_root`` (or found as ``care pretrain`` finds it), without the run's
    image-folder settings."""
    if dataset is None or dataset == cfg.dataset:
        root = cfg.data_root if data_root is None else data_root
        return with_overrides(cfg, {"data_root": root})
    changes = {"dataset": dataset, "data_root": data_root, "class_list": None, "load_size": None}
    return with_overrides(cfg, changes)


def embed_command(
    run_dir: str,
    out: str,
    *,
    dataset: str | None = None,
    data_root: str | None = None,
    split: str = "test",
    layer: str = "backbone",
    batch_size: int = 256,
    neighbours: int = 0,
    precision: str | None = None,
) -> EmbedResult:
    """Embed ``split`` of ``dataset`` (default: the run's) with the run's ``layer`` and write
    ``out`` (:data:`FORMATS`); with ``neighbours=K`` also the PNG grid of 8 queries and their K
    nearest neighbours (:func:`neighbours_path`). Every file is written atomically."""
    kind = output_kind(out)
    if layer not in ENCODER_LAYERS:
        raise CareError(
            f"unknown layer {layer!r}: choose backbone (the features a linear probe uses) or "
            "projection (the head's output on the run's sphere or hyperboloid)"
        )
    if split not in SPLITS:
        raise CareError(f"unknown split {split!r}: choose one of {list(SPLITS)}")
    if batch_size < 1:
        raise CareError(f"bad value for 'batch_size': {batch_size}; it must be at least 1")
    if not 0 <= neighbours <= MAX_NEIGHBOURS:
        raise CareError(
            f"bad value for 'neighbours': {neighbours}; show between 1 and {MAX_NEIGHBOURS} "
            "neighbours per query (0: no grid)"
        )
    requested = requested_precision(precision)
    encoder = load_encoder(run_dir, layer)
    run = RunDir(run_dir)
    cfg = data_config(run.read_config(), dataset, data_root)
    images = load_split(cfg, split)
    channels = encoder.spec.in_channels
    if images.channels != channels:
        raise CareError(
            f"dataset {cfg.dataset!r} has {images.channels}-channel images but {run_dir} was "
            f"trained on {channels}-channel images: embed a dataset with {channels} channel"
            f"{'s' if channels != 1 else ''}"
        )
    if neighbours >= len(images):
        raise CareError(
            f"neighbours={neighbours} needs more than {len(images)} images ({cfg.dataset} "
            f"{split}): lower neighbours"
        )
    device = evaluation_device(cfg)
    chosen = evaluation_precision(cfg.precision, device.type, requested)
    memory_format = torch_memory_format(resolve_memory_format("auto", device.type))
    started = time.perf_counter()
    embeddings, labels = embed_images(
        encoder,
        images,
        batch_size=batch_size,
        device=device,
        precision=chosen,
        memory_format=memory_format,
        num_workers=cfg.num_workers,
        description=f"{cfg.dataset} {split} ({layer})",
    )
    seconds = time.perf_counter() - started
    names = class_names(images)
    metadata = {
        "run": str(run.root.absolute()),
        "layer": layer,
        "dataset": cfg.dataset,
        "data_root": str(resolve_data_root(cfg.dataset, cfg.data_root).absolute()),
        "split": split,
        "precision": chosen,
        "care_version": care_version(),
    }
    if names is not None:
        metadata["classes"] = json.dumps(list(names))
    contents = embedding_files(Path(out), kind, embeddings, labels, metadata)
    png = None
    if neighbours > 0:
        png = str(neighbours_path(out))
        contents[Path(png)] = neighbours_png(
            images, embeddings, labels, neighbours, names, metadata
        )
    # one result: embeddings, labels and grid are replaced together (a failure leaves the old
    # set or none of it, never new embeddings beside old labels)
    atomic_write_files(contents)
    files = [path for path in contents if path.suffix != ".png"]
    return EmbedResult(
        run=str(run.root),
        layer=layer,
        dataset=cfg.dataset,
        split=split,
        count=int(embeddings.shape[0]),
        dim=int(embeddings.shape[1]),
        files=tuple(str(f) for f in files),
        seconds=seconds,
        neighbours_png=png,
    )


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def embedding_files(
    out: Path, kind: str, embeddings: Tensor, labels: Tensor, metadata: dict[str, str]
) -> dict[Path, bytes]:
    """The files that hold embeddings and labels as ``kind`` (:data:`FORMATS`), by path: one
    file, or for ``.npy`` the embeddings and ``FILE.labels.npy``."""
    if kind == ".safetensors":
        tensors = {"embeddings": embeddings.contiguous(), "labels": labels.contiguous()}
        return {out: save(tensors, metadata=metadata)}
    if kind == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, embeddings=embeddings.numpy(), labels=labels.numpy())
        return {out: buffer.getvalue()}
    return {out: _npy(embeddings.numpy()), labels_path(out): _npy(labels.numpy())}


def write_embeddings(
    out: Path, kind: str, embeddings: Tensor, labels: Tensor, metadata: dict[str, str]
) -> list[Path]:
    """Write embeddings and labels as ``kind`` (:data:`FORMATS`), all files replaced together
    (:func:`care.runs.atomic_write_files`): the files."""
    contents = embedding_files(out, kind, embeddings, labels, metadata)
    atomic_write_files(contents)
    return list(contents)


def neighbours_png(
    images: LabeledImages,
    embeddings: Tensor,
    labels: Tensor,
    k: int,
    names: tuple[str, ...] | None,
    metadata: dict[str, str],
) -> bytes:
    """The grid of :data:`QUERIES` queries (first images of distinct classes) and their ``k``
    nearest neighbours by cosine similarity (:func:`nearest_neighbours`), as PNG bytes."""
    queries = pick_queries(labels)
    found, similarity = nearest_neighbours(embeddings, queries, k)
    rows = [[q, *found[r].tolist()] for r, q in enumerate(queries)]
    grid = [[images[i][0] for i in row] for row in rows]
    texts = [[label_text(int(labels[i]), names) for i in row] for row in rows]
    title = (
        f"{printable(Path(metadata['run']).name)}: {metadata['layer']} embeddings of "
        f"{metadata['dataset']} {metadata['split']}, {k} nearest neighbours by cosine similarity"
    )
    return neighbours_figure(grid, texts, similarity, title)


def result_line(result: EmbedResult) -> str:
    """The one line `care embed` ends with: what was written and what to run next."""
    written = " and ".join(result.files)
    line = (
        f"wrote {result.count:,} {result.layer} embeddings ({result.count:,} × {result.dim}, "
        f"{result.dataset} {result.split}, {result.images_per_s:,.0f} images/s) and labels to "
        f"{written}"
    )
    if result.neighbours_png is not None:
        line += f", and the nearest-neighbour grid {result.neighbours_png}"
    first = result.files[0]
    if first.endswith(".safetensors"):
        load = f"safetensors.torch.load_file({first!r})['embeddings']"
    elif first.endswith(".npz"):
        load = f"numpy.load({first!r})['embeddings']"
    else:
        load = f"numpy.load({first!r})"
    more = "" if result.neighbours_png else ", or add neighbours=8 for a nearest-neighbour grid"
    return f"{line}; next: load them with {load}{more}"
