"""The pretraining optimiser: Adam, SGD or LARS over parameter groups built from the config.

:class:`LARS` is SGD with momentum and layer-wise adaptive rate scaling (You, Gitman and
Ginsburg, *Large Batch Training of Convolutional Networks*, 2017) as SimCLR trains with it:
biases and normalisation weights get neither weight decay nor the trust ratio
(:func:`parameter_groups`). :func:`build_optimizer` picks the optimiser that ``cfg.optimizer``
names, with fused kernels on CUDA, and torch's defaults elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.optim.optimizer import ParamsT

from care.config import Config
from care.errors import CareError

#: The pretraining optimisers ``cfg.optimizer`` names.
OPTIMIZERS = ("adam", "sgd", "lars")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a per-tensor trust ratio (LARS), as in SimCLR.

    For each parameter tensor ``p`` with gradient ``g``, in its group's settings:

    1. weight decay, unless the group sets ``lars_exclude``: ``g ← g + weight_decay · p``;
    2. the trust ratio, unless the group sets ``lars_exclude``:
       ``g ← g · (trust_coefficient · ‖p‖ / ‖g‖)``, where ``‖g‖`` is the L2 norm of the
       gradient *after* weight decay (as SimCLR), and the ratio is 1 where ``‖p‖`` or ``‖g‖``
       is 0;
    3. momentum: ``v ← momentum · v + g`` (``v`` starts at 0, so the first step has ``v = g``);
    4. the update: ``p ← p − lr · v``.

    ``lr`` multiplies the buffer at each step, as ``torch.optim.SGD`` does, rather than entering
    it as in SimCLR's TensorFlow code (``v ← m · v + lr · g``, ``p ← p − v``). The two agree
    while lr is constant; under a schedule ours applies the current lr to the whole buffer.

    Parameters without a gradient are skipped. The step runs with ``torch._foreach_*`` ops per
    device and dtype, and reads no tensor value on the host (no synchronisation with CUDA).
    The momentum buffers live in ``self.state[p]["momentum_buffer"]``, so :meth:`state_dict`
    holds only tensors and numbers and loads with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        lars_exclude: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"invalid learning rate: {lr}")
        if momentum < 0:
            raise ValueError(f"invalid momentum: {momentum}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"invalid trust_coefficient: {trust_coefficient}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars_exclude": lars_exclude,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("lars_exclude", False)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One LARS step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                params, grads = buckets.setdefault((p.device, p.dtype), ([], []))
                params.append(p)
                grads.append(p.grad)
            exclude = bool(group.get("lars_exclude", False))
            for params, grads in buckets.values():
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                    bufs.append(state["momentum_buffer"])
                _lars_update(
                    params,
                    grads,
                    bufs,
                    lr=group["lr"],
                    momentum=group["momentum"],
                    weight_decay=0.0 if exclude else group["weight_decay"],
                    trust_coefficient=None if exclude else group["trust_coefficient"],
                )
        return loss


def _lars_update(
    params: list[Tensor],
    grads: list[Tensor] | tuple[Tensor, ...],
    bufs: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float | None,
) -> None:
    """The LARS update of tensors on one device with one dtype; ``None``: no trust ratio.

    The gradients are not modified: the decayed and scaled gradients are new tensors.
    """
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if trust_coefficient is not None:
        p_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = torch.where(
            (p_norm > 0) & (g_norm > 0),
            trust_coefficient * p_norm / g_norm,
            torch.ones_like(p_norm),
        )
        grads = torch._foreach_mul(grads, ratio.unbind(0))
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    torch._foreach_add_(params, bufs, alpha=-lr)


def parameter_groups(
    module: nn.Module, weight_decay: float, exclude_bias_and_norm: bool
) -> list[dict[str, Any]]:
    """The trainable parameters of ``module`` in optimiser groups, in ``named_parameters`` order.

    Parameters with ``requires_grad=False`` (MoCo's key encoder) are left out. With
    ``exclude_bias_and_norm``, every parameter with at most one dimension (biases, and the
    weights of BatchNorm and other norms) goes to a second group with ``weight_decay`` 0 and
    ``lars_exclude`` True (no LARS trust ratio either); the rest keep ``weight_decay``. Without
    it there is one group, ``{"params": [...], "weight_decay": weight_decay}``. No group is empty.
    """
    params = [p for _, p in module.named_parameters() if p.requires_grad]
    if not exclude_bias_and_norm:
        return [{"params": params, "weight_decay": weight_decay}] if params else []
    decayed = [p for p in params if p.ndim > 1]
    excluded = [p for p in params if p.ndim <= 1]
    groups: list[dict[str, Any]] = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": weight_decay})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def excludes_bias_and_norm(cfg: Config) -> bool:
    """``cfg.exclude_bias_and_norm``, where None means true for LARS and false otherwise."""
    if cfg.exclude_bias_and_norm is not None:
        return cfg.exclude_bias_and_norm
    return cfg.optimizer == "lars"


def build_optimizer(module: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` names over the trainable parameters of ``module``.

    ``device`` is where the parameters live. On CUDA, Adam and SGD use torch's fused kernels
    (LARS always runs on ``torch._foreach_*`` ops). Elsewhere Adam and SGD keep torch's defaults,
    so with ``exclude_bias_and_norm`` false they step exactly as ``torch.optim.Adam(params,
    lr=, weight_decay=)`` and ``torch.optim.SGD(params, lr=, momentum=, weight_decay=)``.
    """
    groups = parameter_groups(module, cfg.weight_decay, excludes_bias_and_norm(cfg))
    fused: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused
        )
    if cfg.optimizer == "lars":
        return LARS(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coefficient=cfg.lars_trust_coefficient,
        )
    raise CareError(f"unknown optimizer '{cfg.optimizer}': choose one of {list(OPTIMIZERS)}")
