"""MoCo-v2 and CARE_MoCo: the key queue, the momentum update, the loss and end-to-end runs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from care.cli import main
from care.config import load_config
from care.data import DataInfo
from care.errors import CareError
from care.losses import equivariance_loss, moco_terms
from care.methods import (
    CAREMoCo,
    KeyQueue,
    MoCo,
    ViewPair,
    Views,
    build_method,
    momentum_update,
)
from care.models import to_sphere
from tests.conftest import tiny

INFO = DataInfo(channels=1, image_size=28, mean=(0.5,), std=(0.25,), num_classes=10)


def test_queue_starts_with_unit_keys_and_is_fifo() -> None:
    queue = KeyQueue(6, 3, torch.Generator().manual_seed(0))
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(6))
    first = torch.arange(12.0).reshape(4, 3)
    queue.push(first)
    assert int(queue.pointer) == 4
    assert torch.equal(queue.keys[:4], first)
    # The two initial keys not yet overwritten are the oldest, then the pushed ones in order.
    assert torch.equal(queue.oldest_first()[2:], first)


def test_queue_wraps_around_and_overwrites_the_oldest() -> None:
    queue = KeyQueue(5, 2)
    a, b = torch.full((3, 2), 1.0), torch.full((4, 2), 2.0)
    queue.push(a)
    queue.push(b)  # rows 3, 4, then 0, 1: the first two keys of `a` are gone
    assert int(queue.pointer) == 2
    assert torch.equal(queue.keys[[3, 4, 0, 1]], b)
    assert torch.equal(queue.keys[2], a[2])
    assert torch.equal(queue.oldest_first(), torch.cat([a[2:], b]))


def test_queue_keeps_only_the_newest_when_a_batch_exceeds_it() -> None:
    queue = KeyQueue(3, 1)
    queue.push(torch.arange(7.0).reshape(7, 1))
    assert torch.equal(queue.oldest_first().flatten(), torch.tensor([4.0, 5.0, 6.0]))


def test_queue_takes_no_gradient() -> None:
    queue = KeyQueue(4, 2)
    key = torch.randn(2, 2, requires_grad=True)
    queue.push(key * 2)
    assert not queue.keys.requires_grad


def test_momentum_update_formula() -> None:
    torch.manual_seed(0)
    query, key = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in key.parameters()]
    momentum_update(key, query, 0.9)
    for k, k0, q in zip(key.parameters(), before, query.parameters(), strict=True):
        assert torch.allclose(k, 0.9 * k0 + 0.1 * q)
    momentum_update(key, query, 0.0)  # m = 0 copies the query encoder
    for k, q in zip(key.parameters(), query.parameters(), strict=True):
        assert torch.equal(k, q)


def test_moco_terms_match_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k = (to_sphere(torch.randn(5, 4, generator=gen, dtype=torch.float64)) for _ in range(2))
    queue = to_sphere(torch.randn(7, 4, generator=gen, dtype=torch.float64))
    tau = 0.2
    expected = 0.0
    for i in range(5):
        positive = math.exp(float(q[i] @ k[i]) / tau)
        negatives = sum(math.exp(float(q[i] @ n) / tau) for n in queue)
        expected += -math.log(positive / (positive + negatives))
    terms = moco_terms(q, k, queue, tau)
    assert terms.total.item() == pytest.approx(expected / 5, rel=1e-12)
    assert terms.inv.item() == pytest.approx(-float((q * k).sum(1).mean()) / tau, rel=1e-12)


def _method(*overrides: str) -> MoCo:
    cfg = load_config(
        None,
        [
            "widths=[4,4,8,8]",
            "head_hidden=16",
            "head_out=8",
            "batch_size=8",
            "group_size=4",
            "queue_size=16",
            *overrides,
        ],
    )
    method = build_method(cfg, INFO)
    assert isinstance(method, MoCo)
    return method


def _views(*pairs: torch.Tensor) -> Views:
    """Views from stacked pairs (16 rows: view 1, then view 2): InfoNCE's, then group-shared."""
    split = [ViewPair(p[:8], p[8:]) for p in pairs]
    return Views(split[0], split[1] if len(split) > 1 else None)


def test_keys_carry_no_gradient_and_the_queue_takes_the_second_views_keys() -> None:
    method = _method("method=moco")
    torch.manual_seed(0)
    stack = torch.randn(16, 1, 28, 28)
    losses = method.compute_losses(_views(stack))
    losses["loss"].backward()
    assert all(p.grad is None for p in method.key_encoder.parameters())
    assert all(p.grad is not None for p in method.encoder.parameters())
    expected_keys = method.key_encoder(stack)[8:]  # BN over both views, as in training
    assert torch.allclose(method.queue.keys[:8], expected_keys, atol=1e-6)
    assert int(method.queue.pointer) == 8


def test_the_key_encoder_takes_its_momentum_step_before_computing_the_keys() -> None:
    method = _method("method=moco", "moco_momentum=0.5")
    with torch.no_grad():  # a query encoder that an optimiser step moved away from the keys'
        for p in method.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    expected = copy.deepcopy(method.key_encoder)
    momentum_update(expected, method.encoder, 0.5)
    stale = copy.deepcopy(method.key_encoder)
    torch.manual_seed(1)
    stack = torch.randn(16, 1, 28, 28)
    method.compute_losses(_views(stack))
    pushed = method.queue.keys[:8]
    with torch.no_grad():
        assert torch.allclose(pushed, expected(stack)[8:], atol=1e-6)
        assert not torch.allclose(pushed, stale(stack)[8:], atol=1e-3)
    for k, e in zip(method.key_encoder.parameters(), expected.parameters(), strict=True):
        assert torch.equal(k, e)


def test_care_moco_adds_the_equivariance_term_of_the_group_shared_queries() -> None:
    method = _method("method=care_moco", "weight=0.5")
    assert isinstance(method, CAREMoCo)
    torch.manual_seed(2)
    contrastive, grouped = torch.randn(16, 1, 28, 28), torch.randn(16, 1, 28, 28)
    losses = method.compute_losses(_views(contrastive, grouped))
    assert set(losses) == {"loss", "inv", "unif", "equi"}
    with torch.no_grad():
        e1, e2 = method.encoder(grouped).split(8)  # the query encoder, not the keys
    assert losses["equi"].item() == pytest.approx(equivariance_loss(e1, e2, 4).item(), rel=1e-5)
    with torch.no_grad():
        z1, z2 = method.encoder(contrastive).split(8)
    assert losses["equi"].item() != pytest.approx(equivariance_loss(z1, z2, 4).item(), rel=1e-3)
    expected = losses["inv"] + losses["unif"] + 0.5 * losses["equi"]
    assert torch.allclose(losses["loss"], expected)


def test_moco_refuses_the_hyperboloid() -> None:
    with pytest.raises(CareError, match="embedding=sphere"):
        _method("method=moco", "embedding=hyperboloid")


@pytest.mark.parametrize("method", ["moco", "care_moco"])
def test_moco_trains_end_to_end_and_resumes_its_queue(
    method: str, fake_fmnist: Path, tmp_path: Path
) -> None:
    out = tmp_path / method
    args = tiny(fake_fmnist, out, f"method={method}", "queue_size=64", "temperature=0.2")
    assert main(["pretrain", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(state["queue.pointer"]) == (4 * 32) % 64
    keys = {k.removeprefix("key_encoder.") for k in state if k.startswith("key_encoder.")}
    assert keys == {k.removeprefix("encoder.") for k in state if k.startswith("encoder.")}
    # A second epoch continues from the saved queue and key encoder.
    assert main(["pretrain", *args, "epochs=2", "resume=true"]) == 0
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(state["queue.pointer"]) == (8 * 32) % 64
