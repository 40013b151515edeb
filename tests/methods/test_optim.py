"""The pretraining optimiser: LARS against a naive formula and hand-computed steps, the parameter
groups, build_optimizer for each optimiser, and LARS checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import io
from typing import Any

import pytest
import torch
from torch import nn

from care.config import Config
from care.methods.optim import LARS, build_optimizer, excludes_bias_and_norm, parameter_groups

CPU = torch.device("cpu")


def _model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Conv (with bias) → BN → ReLU → Linear (with bias), and a frozen layer at the end."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=True),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.Linear(5, 4),
    ).to(dtype)
    model[5].requires_grad_(False)  # like MoCo's key encoder: must stay out of the optimiser
    return model


def _backward(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    like = next(model.parameters())
    x = torch.randn(6, 2, 6, 6, generator=gen, dtype=like.dtype).to(like.device)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def _cfg(**overrides: Any) -> Config:
    return dataclasses.replace(Config(), **overrides)


# ------------------------------------------------------------------- LARS: the naive formula
def _naive_lars_step(
    groups: list[dict[str, Any]], buffers: dict[int, torch.Tensor], lr: float, momentum: float
) -> None:
    """The per-tensor formula in plain torch, one tensor at a time."""
    with torch.no_grad():
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.clone()
                if not group["exclude"]:
                    g = g + group["weight_decay"] * p
                    p_norm, g_norm = p.norm(), g.norm()
                    if p_norm > 0 and g_norm > 0:
                        g = g * (group["eta"] * p_norm / g_norm)
                v = buffers.get(id(p), torch.zeros_like(p))
                v = momentum * v + g
                buffers[id(p)] = v
                p -= lr * v


def _zero_some_grads(model: nn.Sequential, step: int) -> None:
    model[0].weight.grad.zero_()  # zero gradient, decayed: g = wd·p alone
    if step == 1:
        model[4].bias.grad.zero_()  # zero gradient, excluded: only the momentum moves it


@pytest.mark.parametrize("steps", [1, 2])
def test_lars_matches_naive_formula(steps: int) -> None:
    model, ref = _model(), _model()
    wd, eta, momentum = 0.05, 0.02, 0.9
    opt = LARS(
        parameter_groups(model, wd, exclude_bias_and_norm=True),
        lr=0.5,
        momentum=momentum,
        weight_decay=wd,
        trust_coefficient=eta,
    )
    assert [g.get("lars_exclude", False) for g in opt.param_groups] == [False, True]
    ref_groups = [
        {
            "params": [p for p in ref.parameters() if p.requires_grad and p.ndim > 1],
            "weight_decay": wd,
            "eta": eta,
            "exclude": False,
        },
        {
            "params": [p for p in ref.parameters() if p.requires_grad and p.ndim <= 1],
            "weight_decay": 0.0,
            "eta": eta,
            "exclude": True,
        },
    ]
    buffers: dict[int, torch.Tensor] = {}
    before = [p.clone() for p in model.parameters()]
    for step, lr in zip(range(steps), (0.5, 0.2), strict=False):
        for group in opt.param_groups:
            group["lr"] = lr  # a schedule: lr multiplies the whole buffer
        for m in (model, ref):
            _backward(m, seed=step)
            _zero_some_grads(m, step)
        opt.step()
        _naive_lars_step(ref_groups, buffers, lr, momentum)
    for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), before, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
        if not p.requires_grad:
            assert torch.equal(p, p0), name
        elif name != "0.bias":  # a bias before BN: its gradient is rounding error only
            assert not torch.equal(p, p0), name  # every other trainable tensor moved
    assert all(p.requires_grad for p in opt.state)
    assert all(set(s) == {"momentum_buffer"} for s in opt.state.values())


def test_lars_does_not_modify_gradients() -> None:
    model = _model()
    opt = LARS(parameter_groups(model, 0.1, True), lr=0.1, weight_decay=0.1)
    _backward(model, seed=0)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    opt.step()
    assert all(
        torch.equal(p.grad, g)
        for p, g in zip([p for p in model.parameters() if p.grad is not None], grads, strict=True)
    )


def test_lars_skips_parameters_without_gradient() -> None:
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    opt = LARS([a, b], lr=0.1)
    a.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(b, torch.ones(2, 2))
    assert b not in opt.state and a in opt.state


# ------------------------------------------------------------------- LARS: exact by hand
def test_lars_exact_steps() -> None:
    """Dyadic values whose norms are exact: ‖(3, 4)‖ = 5, ‖(6, 8)‖ = 10."""
    decayed = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # with wd 1: g = (3, 4) + (3, 4) = (6, 8)
    plain = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # no decay, g = (6, 8)
    zero = nn.Parameter(torch.zeros(1, 2))  # ‖p‖ = 0: trust ratio 1
    excluded = nn.Parameter(torch.tensor([3.0, 4.0]))  # no decay, no ratio
    opt = LARS(
        [
            {"params": [decayed], "weight_decay": 1.0},
            {"params": [plain, zero]},
            {"params": [excluded], "weight_decay": 1.0, "lars_exclude": True},
        ],
        lr=0.5,
        momentum=0.5,
        trust_coefficient=0.5,
    )

    def grads() -> None:
        decayed.grad = torch.tensor([[3.0, 4.0]])
        plain.grad = torch.tensor([[6.0, 8.0]])
        zero.grad = torch.tensor([[1.0, 2.0]])
        excluded.grad = torch.tensor([6.0, 8.0])

    # step 1: ratio 0.5·5/10 = 0.25 → v = (1.5, 2) → p = (3, 4) − 0.5·(1.5, 2) = (2.25, 3)
    grads()
    opt.step()
    assert torch.equal(plain, torch.tensor([[2.25, 3.0]]))
    assert torch.equal(zero, torch.tensor([[-0.5, -1.0]]))  # v = (1, 2)
    assert torch.equal(excluded, torch.tensor([0.0, 0.0]))  # v = (6, 8)
    # weight decay: g = (3, 4) + 1·(3, 4): the ratio uses ‖g‖ after decay, so same as plain
    assert torch.equal(decayed, torch.tensor([[2.25, 3.0]]))
    # step 2, plain: ratio 0.5·3.75/10 = 0.1875 → g = (1.125, 1.5)
    # v = 0.5·(1.5, 2) + (1.125, 1.5) = (1.875, 2.5) → p = (2.25, 3) − 0.5·v = (1.3125, 1.75)
    grads()
    opt.step()
    assert torch.equal(plain, torch.tensor([[1.3125, 1.75]]))
    assert torch.equal(opt.state[plain]["momentum_buffer"], torch.tensor([[1.875, 2.5]]))
    # zero: ‖p‖ = ‖(−0.5, −1)‖ > 0 now; ‖(1, 2)‖ = ‖p‖·2, ratio 0.5·0.5 = 0.25
    # v = 0.5·(1, 2) + 0.25·(1, 2) = (0.75, 1.5) → p = (−0.5, −1) − 0.5·v = (−0.875, −1.75)
    assert torch.equal(zero, torch.tensor([[-0.875, -1.75]]))
    # excluded: v = 0.5·(6, 8) + (6, 8) = (9, 12) → p = (0, 0) − (4.5, 6)
    assert torch.equal(excluded, torch.tensor([-4.5, -6.0]))


def test_lars_zero_gradient_and_zero_weight_keep_ratio_one() -> None:
    """‖g‖ = 0 (no decay): the ratio is 1, not NaN; the momentum alone moves p."""
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = LARS([p], lr=0.5, momentum=0.5, trust_coefficient=0.5)
    p.grad = torch.tensor([[6.0, 8.0]])
    opt.step()  # v = (1.5, 2), p = (2.25, 3)
    p.grad = torch.zeros(1, 2)
    opt.step()  # v = (0.75, 1), p = (1.875, 2.5)
    assert torch.equal(p, torch.tensor([[1.875, 2.5]]))
    q = nn.Parameter(torch.zeros(1, 2))
    opt = LARS([q], lr=0.5)
    q.grad = torch.zeros(1, 2)
    opt.step()
    assert torch.equal(q, torch.zeros(1, 2))


def test_lars_rejects_bad_values() -> None:
    p = [nn.Parameter(torch.ones(1))]
    for kwargs in ({"lr": -1.0}, {"momentum": -0.1}, {"weight_decay": -1.0}):
        with pytest.raises(ValueError):
            LARS(p, **{"lr": 0.1, **kwargs})
    with pytest.raises(ValueError):
        LARS(p, lr=0.1, trust_coefficient=0.0)


# ------------------------------------------------------------------------- parameter_groups
@pytest.mark.parametrize("exclude", [False, True])
def test_parameter_groups(exclude: bool) -> None:
    model = _model()
    groups = parameter_groups(model, 0.1, exclude)
    frozen = {id(p) for p in model[5].parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = [id(p) for g in groups for p in g["params"]]
    assert not frozen & set(ids)
    assert sorted(ids) == sorted(id(p) for p in trainable)
    if not exclude:
        assert groups == [{"params": trainable, "weight_decay": 0.1}]
        return
    decayed, excluded = groups
    assert [id(p) for p in decayed["params"]] == [id(model[0].weight), id(model[4].weight)]
    norm_and_bias = [model[0].bias, model[1].weight, model[1].bias, model[4].bias]
    assert [id(p) for p in excluded["params"]] == [id(p) for p in norm_and_bias]
    assert decayed["weight_decay"] == 0.1 and not decayed.get("lars_exclude", False)
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True


def test_parameter_groups_has_no_empty_group() -> None:
    assert [len(g["params"]) for g in parameter_groups(nn.Linear(3, 2, bias=False), 0.1, True)] == [
        1
    ]
    only_norm = parameter_groups(nn.BatchNorm1d(3), 0.1, True)
    assert len(only_norm) == 1 and only_norm[0]["lars_exclude"] is True
    assert parameter_groups(nn.Linear(3, 2).requires_grad_(False), 0.1, False) == []
    assert parameter_groups(nn.Linear(3, 2).requires_grad_(False), 0.1, True) == []


# -------------------------------------------------------------------------- build_optimizer
@pytest.mark.parametrize(
    ("optimizer", "flag", "expected"),
    [
        ("adam", None, False),
        ("sgd", None, False),
        ("lars", None, True),
        ("adam", True, True),
        ("sgd", True, True),
        ("lars", False, False),
    ],
)
def test_exclude_bias_and_norm_default(optimizer: str, flag: bool | None, expected: bool) -> None:
    cfg = _cfg(optimizer=optimizer, exclude_bias_and_norm=flag)
    assert excludes_bias_and_norm(cfg) is expected
    opt = build_optimizer(_model(), cfg, CPU)
    assert len(opt.param_groups) == (2 if expected else 1)
    if expected:
        assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("optimizer", "cls"), [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD), ("lars", LARS)]
)
def test_build_optimizer_kinds(optimizer: str, cls: type[torch.optim.Optimizer]) -> None:
    cfg = _cfg(optimizer=optimizer, lr=0.3, weight_decay=1e-4, momentum=0.8)
    opt = build_optimizer(_model(), cfg, CPU)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.3 and group["weight_decay"] == 1e-4
    if optimizer != "adam":
        assert group["momentum"] == 0.8
    if optimizer == "lars":
        assert group["trust_coefficient"] == cfg.lars_trust_coefficient
    else:
        assert not group.get("fused")  # the CPU keeps torch's defaults


def test_build_optimizer_lars_trust_coefficient() -> None:
    opt = build_optimizer(_model(), _cfg(optimizer="lars", lars_trust_coefficient=0.02), CPU)
    assert all(g["trust_coefficient"] == 0.02 for g in opt.param_groups)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_build_optimizer_matches_plain_torch(optimizer: str) -> None:
    """Without exclusion, Adam and SGD step bit for bit as before (float32, 3 steps)."""
    cfg = _cfg(optimizer=optimizer, lr=0.01, weight_decay=1e-3, momentum=0.9)
    model, ref = _model(dtype=torch.float32), _model(dtype=torch.float32)
    opt = build_optimizer(model, cfg, CPU)
    params = [p for p in ref.parameters() if p.requires_grad]
    plain: torch.optim.Optimizer
    if optimizer == "adam":
        plain = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        plain = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    assert opt.state_dict()["param_groups"] == plain.state_dict()["param_groups"]
    for step in range(3):
        for m, o in ((model, opt), (ref, plain)):
            _backward(m, seed=step)
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


def test_build_optimizer_unknown_name() -> None:
    from care.errors import CareError

    with pytest.raises(CareError, match="unknown optimizer"):
        build_optimizer(_model(), _cfg(optimizer="adamw"), CPU)


# ---------------------------------------------------------------------- LARS checkpoints
def _train(model: nn.Module, opt: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        _backward(model, seed)
        opt.step()


def _lars(model: nn.Module) -> torch.optim.Optimizer:
    cfg = _cfg(optimizer="lars", lr=0.4, weight_decay=1e-3, lars_trust_coefficient=0.01)
    return build_optimizer(model, cfg, CPU)


def test_lars_state_dict_round_trip() -> None:
    model = _model(dtype=torch.float32)
    opt = _lars(model)
    _train(model, opt, range(4))  # uninterrupted

    first = _model(dtype=torch.float32)
    first_opt = _lars(first)
    _train(first, first_opt, range(2))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = _model(seed=1, dtype=torch.float32)  # other weights: all must come from the file
    resumed.load_state_dict(saved["model"])
    resumed_opt = _lars(resumed)
    resumed_opt.load_state_dict(saved["optimizer"])
    assert len(resumed_opt.state) == len(first_opt.state) > 0
    _train(resumed, resumed_opt, range(2, 4))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(opt.state, resumed_opt.state, strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], resumed_opt.state[q]["momentum_buffer"])


def test_lars_copy_and_groups_without_flag() -> None:
    model = _model()
    opt = _lars(model)
    assert [g["lars_exclude"] for g in copy.deepcopy(opt).param_groups] == [False, True]
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["lars_exclude"]  # a state dict from before the flag: no exclusion
    opt.load_state_dict(state)
    _backward(model, seed=0)
    opt.step()
    assert len(opt.state) == len([p for p in model.parameters() if p.requires_grad])


# ------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_cuda_uses_fused_kernels(optimizer: str) -> None:
    model = _model(dtype=torch.float32).cuda()
    opt = build_optimizer(model, _cfg(optimizer=optimizer), torch.device("cuda"))
    assert opt.param_groups[0]["fused"] is True
    before = [p.clone() for p in model.parameters()]
    _backward(model, seed=0)
    opt.step()
    assert not torch.equal(model[4].weight, before[4 + 2])  # conv w, b, bn w, b, linear w


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_lars_matches_cpu() -> None:
    cpu, gpu = _model(dtype=torch.float32), _model(dtype=torch.float32).cuda()
    cpu_opt, gpu_opt = _lars(cpu), _lars(gpu)
    for seed in range(3):
        _backward(cpu, seed)
        for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
            q.grad = None if p.grad is None else p.grad.cuda()
        cpu_opt.step()
        gpu_opt.step()
    for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-6)
