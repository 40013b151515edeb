"""ResNet-18/50 backbones with the CIFAR or ImageNet stem, any width, 1 or 3 input channels.

The CIFAR stem (3×3 stride-1 conv, no max-pool) is the one used for 32 px images in the paper;
the ImageNet stem (7×7 stride-2 conv + max-pool) for 96 px and up. ``widths`` sets the four stage
widths: (64, 128, 256, 512) is the standard ResNet, (16, 32, 64, 128) a small CPU model.

With ``activation_checkpointing`` the stem and every residual block are recomputed in the
backward pass instead of keeping their activations (:func:`torch.utils.checkpoint.checkpoint`):
a training forward then keeps only each block's input, at the cost of a second forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from care.errors import CareError


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class PointwiseConv(nn.Conv2d):
    """A 1×1 convolution (no padding) that, given a channels_last image on the CPU, computes its
    stride ``s`` as the stride-1 convolution of every ``s``-th pixel: the same numbers.

    oneDNN's strided 1×1 backward-weights kernels for NHWC images copy the strided input into a
    workspace at a wrong offset when the input has fewer channels than the kernel's block
    (8 with AVX2, 16 with AVX-512; uxlfoundation/oneDNN#6035): the copy overruns, and a training
    step hangs, crashes or silently computes wrong gradients. Subsampling first keeps oneDNN on
    its stride-1 kernels, which have no such copy.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        sh, sw = self.stride
        strided = sh > 1 or sw > 1
        if strided and x.device.type == "cpu" and _is_channels_last(x):
            x = x[:, :, ::sh, ::sw]
            return nn.functional.conv2d(x, self.weight, self.bias)
        return super().forward(x)


def _is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is laid out NHWC and not also NCHW (1 channel or 1 pixel are both)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(PointwiseConv(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


STEMS = ("cifar", "imagenet")
"""The input stems: 3×3 stride 1 without max-pool, or 7×7 stride 2 with max-pool."""

ARCHITECTURES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """A ResNet trunk that returns pooled features of size ``feature_dim``."""

    def __init__(
        self,
        arch: str = "resnet18",
        *,
        in_channels: int = 3,
        stem: str = "cifar",
        widths: Sequence[int] = (64, 128, 256, 512),
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        if arch not in ARCHITECTURES:
            raise CareError(f"unknown backbone '{arch}': choose one of {sorted(ARCHITECTURES)}")
        if len(widths) != 4 or any(int(w) < 1 for w in widths):
            raise CareError(f"widths must be 4 positive stage widths, got {list(widths)}")
        block, depths = ARCHITECTURES[arch]
        w0 = int(widths[0])
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU()
            )
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False),
                nn.BatchNorm2d(w0),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            raise CareError(f"unknown stem '{stem}': choose one of {list(STEMS)}")
        layers: list[nn.Module] = []
        in_planes = w0
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(in_planes, int(width), stride))
                in_planes = int(width) * block.expansion
        self.layers = nn.Sequential(*layers)
        self.feature_dim = in_planes
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            for segment in (self.stem, *self.layers):
                x = checkpoint(
                    segment, x, use_reentrant=False, context_fn=_recompute_contexts(segment)
                )
        else:
            x = self.layers(self.stem(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _recompute_contexts(
    segment: nn.Module,
) -> Callable[[], tuple[AbstractContextManager[None], AbstractContextManager[None]]]:
    """``checkpoint``'s ``context_fn`` for ``segment``: nothing around the forward, and
    :func:`_no_stat_updates` around its recomputation."""
    return lambda: (nullcontext(), _no_stat_updates(segment))


@contextmanager
def _no_stat_updates(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in ``module`` normalise with batch statistics (as in training) but leave
    their running statistics and batch count as they are: a recomputed forward must not count
    twice. (Momentum 0 keeps the running statistics; the forward saves the same tensors.)"""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
        for m in norms
    ]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if count is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(count)
