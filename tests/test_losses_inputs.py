"""What the losses refuse (empty and too-small batches, non-float embeddings, a non-int
group_size), in one line and from shapes and dtypes alone, and the small batches they accept."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.nn import functional

from care.errors import CareError
from care.losses import equivariance_loss, info_nce, info_nce_terms, moco_terms

Loss = Callable[[Tensor, Tensor], Tensor]


def _sphere(n: int, d: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)


QUEUE = _sphere(5, 4, 99)

#: Every loss, as a function of the two views (MoCo's query and key).
LOSSES: dict[str, Loss] = {
    "info_nce": lambda a, b: info_nce(a, b, 0.5),
    "info_nce_lorentz": lambda a, b: info_nce_terms(a, b, 0.5, similarity="lorentz").total,
    "info_nce_candidates": lambda a, b: (
        info_nce_terms(
            a, b, 0.5, candidates1=_sphere(4, a.shape[1], 1), candidates2=_sphere(4, a.shape[1], 2)
        ).total
    ),
    "equivariance_loss": lambda a, b: equivariance_loss(a, b, 2),
    "moco_terms": lambda a, b: moco_terms(a, b, QUEUE[:, : a.shape[1]], 0.5).total,
}


def _one_line_care_error(loss: Loss, a: Tensor, b: Tensor, match: str) -> str:
    with pytest.raises(CareError, match=match) as info:
        loss(a, b)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", LOSSES)
def test_empty_batch_is_refused_instead_of_a_nan_loss(name: str) -> None:
    empty = torch.zeros(0, 4, dtype=torch.float64)
    message = _one_line_care_error(LOSSES[name], empty, empty, r"empty \(shape \(0, 4\)\)")
    assert "pass at least" in message


@pytest.mark.parametrize("name", LOSSES)
def test_embeddings_without_coordinates_are_refused(name: str) -> None:
    flat = torch.zeros(4, 0, dtype=torch.float64)
    _one_line_care_error(LOSSES[name], flat, flat, r"shape \(4, 0\) have no coordinates")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("name", LOSSES)
def test_non_float_embeddings_are_refused_naming_the_dtype(name: str, dtype: torch.dtype) -> None:
    z = (_sphere(4, 4, 3) * 10).to(dtype)
    message = _one_line_care_error(LOSSES[name], z, z, re.escape(f"has dtype {dtype}"))
    assert "pass float embeddings" in message


def test_non_float_second_view_candidates_and_queue_are_refused() -> None:
    z, ints = _sphere(4, 4, 4), torch.ones(4, 4, dtype=torch.int64)
    with pytest.raises(CareError, match=r"z2 has dtype torch\.int64"):
        info_nce(z, ints, 0.5)
    with pytest.raises(CareError, match=r"candidates1 has dtype torch\.int64"):
        info_nce_terms(z, z, 0.5, candidates1=ints, candidates2=z)
    with pytest.raises(CareError, match=r"key has dtype torch\.int64"):
        moco_terms(z, ints, QUEUE, 0.5)
    with pytest.raises(CareError, match=r"queue has dtype torch\.int64"):
        moco_terms(z, z, ints, 0.5)


def test_a_batch_of_one_is_refused_where_infonce_has_no_negatives() -> None:
    z = _sphere(1, 4, 5)
    with pytest.raises(CareError, match="a batch of 1 row has no negatives") as info:
        info_nce(z, z, 0.5)
    assert "\n" not in str(info.value) and "batch_size >= 2" in str(info.value)
    with pytest.raises(CareError, match="no negatives"):
        info_nce_terms(z, _sphere(1, 4, 6), 0.5, similarity="lorentz")
    # candidates of one row (a single rank's batch of one) leave none either
    with pytest.raises(CareError, match="candidates of 1 row leave no negatives"):
        info_nce_terms(z, z, 0.5, candidates1=z, candidates2=z)
    # L_equi: a group needs two rows
    with pytest.raises(CareError, match="group_size"):
        equivariance_loss(z, z, 1)


def test_a_local_batch_of_one_is_fine_when_the_candidates_hold_more() -> None:
    """Under DDP with one sample per rank, the other ranks' rows are the negatives: the local
    anchors' loss is their share of the loss over all candidates."""
    z1, z2 = _sphere(4, 5, 7), _sphere(4, 5, 8)
    for offset in range(4):
        local = info_nce_terms(
            z1[offset : offset + 1],
            z2[offset : offset + 1],
            0.3,
            candidates1=z1,
            candidates2=z2,
            offset=offset,
        )
        z = torch.cat([z1, z2])
        logits = z @ z.T / 0.3
        logits.fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(4, 8), torch.arange(4)])
        per_anchor = functional.cross_entropy(logits, target, reduction="none")
        expected = per_anchor[[offset, offset + 4]].mean()
        assert local.total.item() == pytest.approx(expected.item(), rel=1e-12)
    # the smallest that works: two candidate rows, one of them local
    two = info_nce_terms(z1[:1], z2[:1], 0.3, candidates1=z1[:2], candidates2=z2[:2])
    assert math.isfinite(two.total.item()) and two.total.item() > 0


def test_moco_takes_a_single_query_whose_negatives_are_the_queue() -> None:
    q, k, queue, tau = _sphere(1, 4, 9), _sphere(1, 4, 10), _sphere(6, 4, 11), 0.2
    pos = (q @ k.T).item() / tau
    negs = [(q @ n).item() / tau for n in queue]
    expected = -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(s) for s in negs)))
    assert moco_terms(q, k, queue, tau).total.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(CareError, match="the queue is empty") as info:
        moco_terms(q, k, queue[:0], tau)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("group_size", [True, False, 16.0, 2.0, "2", None])
def test_equivariance_group_size_must_be_an_int(group_size: object) -> None:
    z = _sphere(16, 4, 12)
    with pytest.raises(CareError, match=r"group_size=.* must be an int, not") as info:
        equivariance_loss(z, z, group_size)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_mismatched_inputs_stay_value_errors() -> None:
    z = _sphere(4, 4, 13)
    with pytest.raises(ValueError, match="one shape"):
        info_nce(z, z[:3], 0.5)
    with pytest.raises(ValueError, match="both candidates1 and candidates2"):
        info_nce_terms(z, z, 0.5, candidates1=z)
    with pytest.raises(ValueError, match="do not match embeddings of size 4"):
        info_nce_terms(z, z, 0.5, candidates1=_sphere(8, 3), candidates2=_sphere(8, 3))
    with pytest.raises(ValueError, match="offset=6 does not place 4 local rows inside 8"):
        info_nce_terms(z, z, 0.5, candidates1=_sphere(8, 4), candidates2=_sphere(8, 4), offset=6)
    with pytest.raises(ValueError, match="queue"):
        moco_terms(z, z, _sphere(5, 3), 0.5)


@pytest.mark.parametrize("name", LOSSES)
def test_nan_embeddings_give_a_nan_loss_unchecked(name: str) -> None:
    """NaN is not looked for (that would sync the device every step): it propagates."""
    z1, z2 = _sphere(4, 4, 14), _sphere(4, 4, 15)
    z1[1, 2] = float("nan")
    assert math.isnan(LOSSES[name](z1, z2).item())


def test_checks_never_read_values_so_the_losses_run_on_the_meta_device() -> None:
    """Meta tensors have shapes and dtypes but no values: any ``.item()``, ``bool(tensor)`` or
    value-dependent branch would raise here. Both the losses and their refusals run."""
    meta = torch.empty(8, 4, device="meta")
    queue = torch.empty(5, 4, device="meta")
    for loss in (
        info_nce(meta, meta, 0.5),
        info_nce_terms(meta[:1], meta[:1], 0.5, candidates1=meta, candidates2=meta).total,
        equivariance_loss(meta, meta, 4, form="minkowski"),
        moco_terms(meta[:1], meta[:1], queue, 0.5).total,
    ):
        assert loss.device.type == "meta" and loss.shape == ()
    with pytest.raises(CareError, match="empty"):
        info_nce(meta[:0], meta[:0], 0.5)
    with pytest.raises(CareError, match="no negatives"):
        info_nce(meta[:1], meta[:1], 0.5)
    with pytest.raises(CareError, match=r"dtype torch\.int64"):
        equivariance_loss(meta.long(), meta.long(), 4)
