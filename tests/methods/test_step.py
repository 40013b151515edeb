"""The training step as it runs: a backward per independent pair of views (same gradients, half
the activations), no host synchronisation outside logging steps, and the non-finite check."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import care.augment.eval
from care.augment import Augmenter, AugmentRecipe
from care.config import load_config
from care.data import DataInfo
from care.errors import CareError
from care.losses import equivariance_loss, info_nce_terms, moco_terms
from care.methods import CARE, ContrastiveMethod, ViewPair, Views, build_method
from care.train import pretraining
from tests.conftest import tiny

INFO = DataInfo(channels=1, image_size=16, mean=(0.5,), std=(0.25,), num_classes=10)
N, M = 8, 4
SEPARATE = [
    ("method=care", "views=separate"),
    ("method=care_moco", "views=separate", "queue_size=16"),
]
SHARED = [
    ("method=simclr",),
    ("method=care", "views=shared"),
    ("method=equi_unif",),
    ("method=moco", "queue_size=16"),
    ("method=care_moco", "views=shared", "queue_size=16"),
]


def _method(*overrides: str) -> ContrastiveMethod:
    cfg = load_config(
        None,
        [
            *("widths=[4,4,8,8]", "head_hidden=16", "head_out=8", "weight=0.5"),
            *(f"batch_size={N}", f"group_size={M}", "precision=32", "accelerator=cpu"),
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return build_method(cfg, INFO).double()


def _views(method: ContrastiveMethod) -> Views:
    gen = torch.Generator().manual_seed(3)
    pairs = [ViewPair(*torch.randn(2, N, 1, 16, 16, generator=gen, dtype=torch.float64))]
    pairs.append(ViewPair(*torch.randn(2, N, 1, 16, 16, generator=gen, dtype=torch.float64)))
    if not method.uses_groups:
        return Views(pairs[0])
    return Views(pairs[0], pairs[0] if method.shares_views else pairs[1])


class SavedActivations:
    """Bytes of the tensors autograd keeps for the backward pass: alive now, and the peak."""

    def __init__(self) -> None:
        self.alive = 0
        self.peak = 0

    @contextmanager
    def watching(self) -> Iterator[None]:
        meter = self

        class Held:
            def __init__(self, tensor: torch.Tensor) -> None:
                self.tensor, self.size = tensor, tensor.numel() * tensor.element_size()
                meter.alive += self.size
                meter.peak = max(meter.peak, meter.alive)

            def __del__(self) -> None:
                meter.alive -= self.size

        with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor):
            yield


def _step(
    method: ContrastiveMethod, views: Views, early: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, SavedActivations]:
    """One step's gradients and losses, with a backward per pair (``early``) or one backward;
    the number of backward calls and the saved activations."""
    calls = 0

    def backward(part: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        part.backward()

    meter = SavedActivations()
    method.zero_grad(set_to_none=True)
    with meter.watching():
        if early:
            with method.early_backward(backward):
                losses = method.compute_losses(views)
        else:
            losses = method.compute_losses(views)
        backward(losses["loss"])
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return grads, {k: v.detach() for k, v in losses.items()}, calls, meter


@pytest.mark.parametrize("overrides", SEPARATE + SHARED)
def test_a_backward_per_pair_gives_the_gradients_of_one_backward(
    overrides: tuple[str, ...],
) -> None:
    method = _method(*overrides)
    twin = copy.deepcopy(method)  # MoCo's step moves its key encoder and queue: start alike
    views = _views(method)
    single, single_losses, single_calls, _ = _step(method, views, early=False)
    split, split_losses, split_calls, _ = _step(twin, views, early=True)
    assert single_calls == 1
    assert split_calls == (2 if overrides in SEPARATE else 1)
    assert set(split) == set(single) and len(single) > 10
    for name, grad in single.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-12, atol=1e-15, msg=name)
    for key, value in single_losses.items():
        torch.testing.assert_close(split_losses[key], value, rtol=1e-12, atol=0)
    assert any(g.abs().sum() > 0 for g in single.values())


@pytest.mark.parametrize("overrides", SEPARATE)
def test_a_backward_per_pair_keeps_two_views_of_activations_not_four(
    overrides: tuple[str, ...],
) -> None:
    method = _method(*overrides)
    views = _views(method)
    _, _, _, single = _step(copy.deepcopy(method), views, early=False)
    _, _, _, split = _step(method, views, early=True)
    assert single.alive == 0 and split.alive == 0  # everything freed after the step
    # Four views' graphs at once against two: about half (plus the losses' small tensors).
    assert 0.4 < split.peak / single.peak < 0.6, (split.peak, single.peak)


def test_simclr_keeps_as_much_as_care_with_a_backward_per_pair() -> None:
    simclr, care = _method("method=simclr"), _method(*SEPARATE[0])
    _, _, _, simclr_meter = _step(simclr, _views(simclr), early=True)
    _, _, _, care_meter = _step(care, _views(care), early=True)
    assert care_meter.peak / simclr_meter.peak < 1.05


# ------------------------------------------------------------------------ host syncs

#: Tensor methods that copy a value to the host (on CUDA: a blocking device-to-host sync).
SYNCING = ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__")


class HostSync(AssertionError):
    pass


_suspended = 0  # > 0 inside allow_host_syncs()


@contextmanager
def no_host_syncs() -> Iterator[None]:
    """Within the block, the :data:`SYNCING` Tensor methods and ``torch.nonzero`` raise."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}
    saved_nonzero = torch.nonzero

    def refuse(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def method(*args: Any, **kwargs: Any) -> Any:
            if _suspended:
                return original(*args, **kwargs)
            raise HostSync(f"Tensor.{name} was called: a host sync")

        return method

    try:
        for name in SYNCING:
            setattr(torch.Tensor, name, refuse(name, saved[name]))
        torch.nonzero = refuse("nonzero", saved_nonzero)  # type: ignore[assignment]
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.Tensor, name, value)
        torch.nonzero = saved_nonzero  # type: ignore[assignment]


@contextmanager
def allow_host_syncs() -> Iterator[None]:
    """Lift :func:`no_host_syncs` for a block."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def test_the_guard_catches_what_it_names() -> None:
    x = torch.ones(3)
    with no_host_syncs():
        for call in (x.sum().item, x.tolist, x.nonzero, lambda: bool(x[0]), lambda: float(x[0])):
            with pytest.raises(HostSync):
                call()
    assert x.sum().item() == 3.0  # restored


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 64)])
def test_augmentation_makes_no_host_sync(
    channels: int, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ops sync nothing. The float batch's pixel-range check reads values; on a GPU it runs
    on an augmenter's first float batch only (care.augment.eval.PixelRangeGuard), so it is
    allowed here, and the uint8 batches of training are never checked."""
    checked = care.augment.eval.check_pixel_range

    def check_once_allowed(images: torch.Tensor, what: str = "images") -> None:
        with allow_host_syncs():
            checked(images, what)

    monkeypatch.setattr(care.augment.eval, "check_pixel_range", check_once_allowed)
    augmenter = Augmenter(
        AugmentRecipe.for_channels(channels), size, (0.5,) * channels, (0.25,) * channels
    )
    images = torch.randint(0, 256, (16, channels, size, size), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    records = [augmenter.sample(16, gen), augmenter.sample(16, gen, group_size=4)]
    assert augmenter.blur_kernel == (7 if size == 64 else 3)  # the 2-D and the separable blur
    with no_host_syncs():
        views = [augmenter.apply(images, r) for r in records]
        views.append(augmenter.apply(images.float() / 255, records[0]))
    assert all(torch.isfinite(v).all() for v in views)


def test_the_losses_make_no_host_sync() -> None:
    gen = torch.Generator().manual_seed(0)
    z1, z2, queue = (
        torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1) for n in (8, 8, 32)
    )
    z1.requires_grad_(True)
    with no_host_syncs():
        terms = info_nce_terms(z1, z2, 0.5, candidates1=z1, candidates2=z2)
        lorentz = info_nce_terms(z1, z2, 0.5, similarity="lorentz")
        equi = sum(equivariance_loss(z1, z2, 4, form=f) for f in ("euclidean", "symplectic"))
        moco = moco_terms(z1, z2, queue, 0.2)
        total = terms.total + lorentz.total + equi + moco.total
        total.backward()
    assert torch.isfinite(total.detach()) and z1.grad is not None


@pytest.mark.parametrize("overrides", SEPARATE + SHARED)
def test_a_whole_step_makes_no_host_sync(overrides: tuple[str, ...]) -> None:
    method = _method(*overrides).float()
    images = torch.randint(0, 256, (N, 1, 16, 16), dtype=torch.uint8)
    generator = method.step_generator()
    with no_host_syncs():
        views = method.make_views(images, generator)
        with method.early_backward(lambda part: part.backward()):
            losses = method.compute_losses(views)
        losses["loss"].backward()
        method.record_nonfinite(losses["loss"])
    assert method._first_nonfinite is not None
    method.stop_if_nonfinite()  # the logging step's check: finite, so no error


def test_the_training_loop_makes_no_host_sync_between_logging_steps(
    fake_fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step but the logging ones runs with the guard on, inside Lightning's loop.

    torch's own optimiser step is let through: on the CPU, Adam reads its step count from a CPU
    tensor with ``.item()``, which is no device sync (and on CUDA care uses the fused kernels,
    which keep it on the device).
    """
    guarded: list[int] = []
    adam_step = torch.optim.Adam.step

    def step_unguarded(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        with allow_host_syncs():
            return adam_step(self, *args, **kwargs)

    class Guarded(CARE):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            logging = (self.global_step + 1) % self.cfg.log_every == 0
            if logging or batch_idx + 1 == self.trainer.num_training_batches:
                return super().training_step(batch, batch_idx)  # checks and logs: may sync
            guarded.append(self.global_step)
            with no_host_syncs():
                return super().training_step(batch, batch_idx)

    monkeypatch.setattr(torch.optim.Adam, "step", step_unguarded)
    monkeypatch.setattr(pretraining, "build_method", lambda cfg, info: Guarded(cfg, info))
    cfg = load_config(None, tiny(fake_fmnist, tmp_path / "run", "knn_every=0", "log_every=3"))
    cfg.batch_size, cfg.epochs = 16, 2
    pretraining.pretrain(cfg)
    assert len(guarded) == 9  # of 16 steps: 5 log (every 3rd), 2 end an epoch (8 and 16)


# ---------------------------------------------------------------- non-finite losses


class NaNFrom(CARE):
    """CARE whose loss becomes NaN from step ``bad`` on."""

    bad = 5

    def compute_losses(self, views: Views) -> dict[str, torch.Tensor]:
        losses = super().compute_losses(views)
        if self.global_step >= self.bad:
            losses["loss"] = losses["loss"] * float("nan")
        return losses


@pytest.mark.parametrize("log_every", [1, 4])
def test_a_non_finite_loss_stops_the_run_within_log_every_steps(
    fake_fmnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_every: int
) -> None:
    methods: list[ContrastiveMethod] = []

    def build(cfg: Any, info: DataInfo) -> ContrastiveMethod:
        methods.append(NaNFrom(cfg, info))
        return methods[-1]

    monkeypatch.setattr(pretraining, "build_method", build)
    cfg = load_config(None, tiny(fake_fmnist, tmp_path / "run", "knn_every=0"))
    cfg.batch_size, cfg.epochs, cfg.log_every = 16, 4, log_every
    with pytest.raises(CareError, match=r"loss became nan at step 5 \(epoch 0\)"):
        pretraining.pretrain(cfg)
    stopped = methods[0].global_step  # steps done when the check fired
    assert NaNFrom.bad < stopped <= NaNFrom.bad + log_every
    assert not (tmp_path / "run" / "backbone.safetensors").exists()
