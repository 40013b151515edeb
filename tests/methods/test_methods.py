"""What each method's step feeds to which loss, the views it draws, and what all methods share:
the registry, the config checks, the step seed, the lr schedule and old checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from care.config import Config, load_config
from care.data import DataInfo
from care.errors import CareError
from care.losses import equivariance_loss, info_nce_terms
from care.methods import (
    METHODS,
    ContrastiveMethod,
    ViewPair,
    Views,
    WarmupCosine,
    build_method,
    method_class,
    step_seed,
)

INFO = DataInfo(channels=1, image_size=16, mean=(0.5,), std=(0.25,), num_classes=10)
N, M = 8, 4  # images per batch, images per group


def _method(*overrides: str) -> ContrastiveMethod:
    cfg = load_config(
        None,
        [
            "widths=[4,4,8,8]",
            "head_hidden=16",
            "head_out=8",
            f"batch_size={N}",
            f"group_size={M}",
            "temperature=0.5",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return build_method(cfg, INFO).double()


def _pair(seed: int) -> ViewPair:
    gen = torch.Generator().manual_seed(seed)
    return ViewPair(*torch.randn(2, N, 1, 16, 16, generator=gen, dtype=torch.float64))


def _embed(method: ContrastiveMethod, pair: ViewPair) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the encoder on both views at once (BatchNorm over the pair)."""
    with torch.no_grad():
        z1, z2 = method.encoder(torch.cat(pair)).split(N)
    return z1, z2


# ----------------------------------------------------------------------------- view routing


def test_care_gives_infonce_the_contrastive_pair_and_l_equi_the_group_shared_pair() -> None:
    method = _method("method=care", "views=separate", "weight=0.3")
    contrastive, grouped = _pair(1), _pair(2)
    losses = method.compute_losses(Views(contrastive, grouped))
    z1, z2 = _embed(method, contrastive)
    e1, e2 = _embed(method, grouped)
    terms = info_nce_terms(z1, z2, 0.5)
    equi = equivariance_loss(e1, e2, M)
    assert losses["inv"].item() == pytest.approx(terms.inv.item(), rel=1e-12)
    assert losses["unif"].item() == pytest.approx(terms.unif.item(), rel=1e-12)
    assert losses["equi"].item() == pytest.approx(equi.item(), rel=1e-12)
    # the other routing would give other numbers, so the test can tell them apart
    assert equi.item() != pytest.approx(equivariance_loss(z1, z2, M).item(), rel=1e-3)
    assert losses["loss"].item() == pytest.approx((terms.total + 0.3 * equi).item(), rel=1e-12)


def test_care_with_shared_views_computes_both_terms_on_one_pair() -> None:
    method = _method("method=care", "views=shared", "weight=0.3")
    pair = _pair(3)
    losses = method.compute_losses(Views(pair, pair))
    z1, z2 = _embed(method, pair)
    assert losses["equi"].item() == pytest.approx(equivariance_loss(z1, z2, M).item(), rel=1e-12)
    assert losses["inv"].item() == pytest.approx(info_nce_terms(z1, z2, 0.5).inv.item(), rel=1e-12)


def test_equi_unif_is_unif_plus_weighted_l_equi_on_the_group_shared_pair() -> None:
    method = _method("method=equi_unif", "weight=0.7")
    unused, grouped = _pair(4), _pair(5)
    losses = method.compute_losses(Views(unused, grouped))
    e1, e2 = _embed(method, grouped)
    unif = info_nce_terms(e1, e2, 0.5).unif
    equi = equivariance_loss(e1, e2, M)
    assert set(losses) == {"loss", "unif", "equi"}
    assert losses["unif"].item() == pytest.approx(unif.item(), rel=1e-12)
    assert losses["equi"].item() == pytest.approx(equi.item(), rel=1e-12)
    assert losses["loss"].item() == pytest.approx((unif + 0.7 * equi).item(), rel=1e-12)


def test_simclr_is_infonce_of_the_contrastive_pair() -> None:
    method = _method("method=simclr")
    pair = _pair(6)
    losses = method.compute_losses(Views(pair))
    terms = info_nce_terms(*_embed(method, pair), 0.5)
    assert losses["loss"].item() == pytest.approx(terms.total.item(), rel=1e-12)


def test_a_method_with_l_equi_needs_the_group_shared_pair() -> None:
    with pytest.raises(ValueError, match="group-shared"):
        _method("method=care").compute_losses(Views(_pair(7)))


# ------------------------------------------------------------------------------ the views


def _draws(method: ContrastiveMethod, images: torch.Tensor, seed: int, grouped: int, own: int):
    """The reference: ``grouped`` group-shared records, then ``own`` per-image records, drawn
    in that order from one generator, applied to ``images``."""
    gen = torch.Generator().manual_seed(seed)
    cfg, aug = method.cfg, method.augmenter
    records = [
        aug.sample(N, gen, group_size=cfg.group_size, pairs=cfg.pairs) for _ in range(grouped)
    ]
    records += [aug.sample(N, gen) for _ in range(own)]
    return [aug.apply(images, r) for r in records]


def _images() -> torch.Tensor:
    """One image repeated: views of it differ only by their augmentation."""
    image = torch.randint(0, 256, (1, 1, 20, 20), generator=torch.Generator().manual_seed(8))
    return image.to(torch.uint8).expand(N, -1, -1, -1).contiguous()


def _rows_equal_within_groups(x: torch.Tensor) -> bool:
    groups = x.reshape(N // M, M, -1)
    return bool((groups == groups[:, :1]).all())


@pytest.mark.parametrize("pairs", ["per_group", "per_batch"])
def test_care_draws_the_group_shared_pair_then_infonces_own_pair(pairs: str) -> None:
    method = _method("method=care", "views=separate", f"pairs={pairs}")
    images = _images()
    views = method.make_views(images, torch.Generator().manual_seed(9))
    g1, g2, c1, c2 = _draws(method, images, 9, grouped=2, own=2)
    assert views.group_shared.first.equal(g1) and views.group_shared.second.equal(g2)
    assert views.contrastive.first.equal(c1) and views.contrastive.second.equal(c2)
    assert not views.shared
    for view in views.group_shared:
        assert _rows_equal_within_groups(view)  # a group shares its augmentation
        groups_differ = not torch.equal(view[:M], view[M:])
        assert groups_differ == (pairs == "per_group")
    assert not _rows_equal_within_groups(views.contrastive.first)  # per image


def test_shared_views_and_equi_unif_use_the_group_shared_pair_for_infonce() -> None:
    images = _images()
    for method in (
        _method("method=care", "views=shared"),
        _method("method=equi_unif", "views=separate"),  # views does not apply to it
    ):
        views = method.make_views(images, torch.Generator().manual_seed(10))
        g1, g2 = _draws(method, images, 10, grouped=2, own=0)
        assert views.shared and views.contrastive is views.grouped
        assert views.group_shared.first.equal(g1) and views.group_shared.second.equal(g2)


@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_methods_without_l_equi_draw_two_per_image_views(name: str) -> None:
    method = _method(f"method={name}", "queue_size=16")
    images = _images()
    views = method.make_views(images, torch.Generator().manual_seed(11))
    c1, c2 = _draws(method, images, 11, grouped=0, own=2)
    assert views.grouped is None
    assert views.contrastive.first.equal(c1) and views.contrastive.second.equal(c2)


# ------------------------------------------------------------------- registry and config


def test_the_registry_names_every_class_and_only_l_equi_methods_use_groups() -> None:
    assert {name: cls.name for name, cls in METHODS.items()} == {n: n for n in METHODS}
    grouped = {name for name, cls in METHODS.items() if cls.uses_groups}
    assert grouped == {"care", "equi_unif", "care_moco"}


@pytest.mark.parametrize("name", ["care", "equi_unif", "care_moco"])
def test_methods_with_l_equi_need_whole_groups_of_at_least_two(name: str) -> None:
    with pytest.raises(CareError, match="batch_size=250 does not split into groups"):
        method_class(load_config(None, [f"method={name}", "batch_size=250", "group_size=16"]))
    with pytest.raises(CareError, match="'group_size'"):
        method_class(load_config(None, [f"method={name}", "group_size=1"]))
    with pytest.raises(CareError, match="batch_size=30"):
        build_method(load_config(None, [f"method={name}", "batch_size=30", "group_size=8"]), INFO)


@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_methods_without_l_equi_take_any_batch_size(name: str) -> None:
    assert method_class(load_config(None, [f"method={name}", "batch_size=250"])) is METHODS[name]


def test_unknown_method_is_one_line() -> None:
    cfg = Config(method="byol")  # bypasses the config's own check
    with pytest.raises(CareError, match="unknown method 'byol'"):
        method_class(cfg)


# ------------------------------------------------------------------- seeds and schedules


def test_step_seed_differs_for_every_seed_step_and_rank() -> None:
    seeds = {
        step_seed(seed, step, rank) for seed in range(4) for step in range(500) for rank in range(8)
    }
    assert len(seeds) == 4 * 500 * 8
    assert all(0 <= s < 2**63 - 1 for s in seeds)
    assert step_seed(3, 17, 1) == step_seed(3, 17, 1)  # a resumed run draws the same views


def test_step_generator_follows_the_global_step() -> None:
    method = _method("method=simclr")
    first = torch.rand(4, generator=method.step_generator())
    again = torch.rand(4, generator=method.step_generator())
    expected = torch.rand(4, generator=torch.Generator().manual_seed(step_seed(0, 0, 0)))
    assert torch.equal(first, again) and torch.equal(first, expected)


def test_warmup_cosine_rises_linearly_then_follows_half_a_cosine() -> None:
    schedule = WarmupCosine(total=10, warmup=4, cosine=True)
    assert [schedule(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for step in range(4, 14):
        progress = min(1.0, (step - 4) / 6)
        assert schedule(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))
    assert schedule(4) == 1.0 and schedule(7) == pytest.approx(0.5) and schedule(10) == 0.0
    flat = WarmupCosine(total=10, warmup=2, cosine=False)
    assert [flat(s) for s in range(5)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    assert WarmupCosine(total=5, warmup=0, cosine=True)(0) == 1.0


def test_care_0_1_checkpoints_load_into_the_encoder() -> None:
    method = _method("method=moco", "queue_size=16")
    state = method.state_dict()
    old_names = {
        k.replace("key_encoder.", "key_").replace("encoder.", ""): v for k, v in state.items()
    }
    assert "key_backbone.stem.0.weight" in old_names and "head.net.0.weight" in old_names
    checkpoint = {"state_dict": old_names}
    method.on_load_checkpoint(checkpoint)
    assert checkpoint["state_dict"].keys() == state.keys()
    fresh = _method("method=moco", "queue_size=16", "seed=1")
    fresh.load_state_dict(checkpoint["state_dict"])
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
