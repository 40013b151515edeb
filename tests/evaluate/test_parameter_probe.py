"""Tests for care.evaluate.parameter_probe: ridge and MLP probes of augmentation parameters."""

from __future__ import annotations

import math

import pytest
import torch

from care.evaluate.parameter_probe import ParameterProbe, parameter_probe


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_parameter_probe() -> None:
    n, d = 1500, 6
    g = _gen(91)
    Z = torch.randn(n, d, generator=g)
    delta = torch.randn(n, d, generator=g)
    Z_a = Z + delta
    w = torch.randn(d, generator=g)
    s = delta @ w / math.sqrt(d)
    targets = torch.stack(
        [
            s + 0.01 * torch.randn(n, generator=g),  # linear in Z_a - Z
            torch.randn(n, generator=g),  # independent
            s**2 + 0.01 * torch.randn(n, generator=g),  # nonlinear
            torch.full((n,), 3.0),  # constant
        ],
        dim=1,
    )
    names = ["lin", "rand", "sq", "const"]
    res = parameter_probe(Z, Z_a, targets, names, seed=0, mlp_hidden=64, mlp_steps=300)
    assert isinstance(res, ParameterProbe)
    assert res.names == names
    assert res.r2_linear[0] > 0.95
    assert res.r2_mlp[0] > 0.9
    assert abs(res.r2_linear[1]) < 0.1
    assert abs(res.r2_mlp[1]) < 0.1  # early stopping: no reward for memorised noise
    assert res.r2_mlp[2] > 0.8
    assert res.r2_linear[3] == 0.0
    assert res.r2_mlp[3] == 0.0
    assert all(math.isfinite(v) for v in res.r2_linear + res.r2_mlp)
    # deterministic in the seed, and works under inference_mode
    small = {"mlp_steps": 20, "seed": 3}
    first = parameter_probe(Z, Z_a, targets, names, **small)
    with torch.inference_mode():
        again = parameter_probe(Z, Z_a, targets, names, **small)
    assert again == first
    with pytest.raises(ValueError, match="names"):
        parameter_probe(Z, Z_a, targets, names[:2])


def test_parameter_probe_r2_finite_when_finite_inputs_overflow() -> None:
    # A column nearly constant on the train rows but huge on a held-out row standardises past
    # float32's range: the MLP predicts NaN, and that R² is reported as 0.0, not NaN.
    n, seed = 50, 0
    g = _gen(1)
    Z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    Z[:, 0] = 1.0 + 1e-11 * torch.randn(n, generator=g, dtype=torch.float64)
    held_out = torch.randperm(n, generator=_gen(seed))[round(0.8 * n) :]  # the documented split
    Z[held_out[0], 0] = 1e30
    targets = torch.randn(n, generator=g, dtype=torch.float64)
    res = parameter_probe(Z, Z.clone(), targets, ["t"], seed=seed, mlp_steps=5)
    assert res.r2_mlp == [0.0]
    assert math.isfinite(res.r2_linear[0])


def test_parameter_probe_bad_inputs_raise() -> None:
    Z = torch.randn(20, 3, generator=_gen(2))
    targets = torch.randn(20, 2, generator=_gen(3))
    with pytest.raises(ValueError, match="rows"):
        parameter_probe(Z, Z, targets[:10], ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        parameter_probe(Z, Z, torch.full_like(targets, float("inf")), ["a", "b"])
    with pytest.raises(ValueError, match="same"):
        parameter_probe(Z, Z[:, :2], targets, ["a", "b"])
    with pytest.raises(ValueError, match="train_fraction"):
        parameter_probe(Z, Z, targets, ["a", "b"], train_fraction=1.0)
    with pytest.raises(ValueError, match="held-out"):
        parameter_probe(Z[:2], Z[:2], targets[:2], ["a", "b"])
