from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from care.errors import CareError
from care.models import ProjectionHead, ResNet, to_sphere
from care.models.heads import HYPERBOLOID_CLIP_RADIUS, embed_projection, to_hyperboloid
from care.models.resnet import PointwiseConv


@pytest.mark.parametrize(
    ("arch", "stem", "channels", "size", "widths", "dim"),
    [
        ("resnet18", "cifar", 1, 28, (16, 32, 64, 128), 128),
        ("resnet18", "cifar", 3, 32, (64, 128, 256, 512), 512),
        ("resnet18", "imagenet", 3, 64, (8, 16, 32, 64), 64),
        ("resnet50", "cifar", 3, 32, (8, 16, 32, 64), 256),
    ],
)
def test_resnet_feature_shapes(
    arch: str, stem: str, channels: int, size: int, widths: tuple[int, ...], dim: int
) -> None:
    model = ResNet(arch, in_channels=channels, stem=stem, widths=widths)
    out = model(torch.randn(2, channels, size, size))
    assert model.feature_dim == dim
    assert out.shape == (2, dim)


def test_standard_resnet18_has_the_usual_parameter_count() -> None:
    # torchvision's resnet18 without the fc layer has 11,176,512 parameters (ImageNet stem)
    model = ResNet("resnet18", in_channels=3, stem="imagenet")
    assert sum(p.numel() for p in model.parameters()) == 11_176_512


def test_standard_resnet50_has_the_usual_parameter_count() -> None:
    # torchvision's resnet50 without the fc layer: 23,508,032 parameters
    model = ResNet("resnet50", in_channels=3, stem="imagenet")
    assert sum(p.numel() for p in model.parameters()) == 23_508_032


def test_cifar_stem_keeps_resolution_and_imagenet_stem_quarters_it() -> None:
    cifar = ResNet("resnet18", stem="cifar", widths=(4, 4, 4, 4))
    imagenet = ResNet("resnet18", stem="imagenet", widths=(4, 4, 4, 4))
    x = torch.randn(1, 3, 32, 32)
    assert cifar.stem(x).shape[-1] == 32
    assert imagenet.stem(x).shape[-1] == 8


def test_bad_architecture_is_a_clear_error() -> None:
    with pytest.raises(CareError, match="resnet18"):
        ResNet("vgg")
    with pytest.raises(CareError, match="stem"):
        ResNet("resnet18", stem="odd")


def test_projection_head_layers_and_sphere() -> None:
    head = ProjectionHead(64, 32, 16)
    kinds = [type(m).__name__ for m in head.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head.net[0].bias is None
    z = to_sphere(head(torch.randn(4, 64)))
    assert z.shape == (4, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-6)


@pytest.mark.parametrize("curvature", [0.5, 1.0, 4.0])
def test_to_hyperboloid_lifts_clipped_head_outputs(curvature: float) -> None:
    z = (
        torch.randn(16, 8, dtype=torch.float64)
        * torch.logspace(-6, 3, 16, dtype=torch.float64)[:, None]
    )
    x = to_hyperboloid(z, curvature)
    assert x.shape == (16, 9)
    inner = -(x[:, 0] ** 2) + (x[:, 1:] ** 2).sum(1)
    assert torch.allclose(inner, torch.full((16,), -1.0 / curvature, dtype=torch.float64))
    assert (x[:, 1:].norm(dim=1) < HYPERBOLOID_CLIP_RADIUS).all()  # soft clip: |u| < r
    assert torch.allclose(x[0, 1:], z[0], rtol=1e-9)  # the identity near the apex


def test_to_hyperboloid_lifts_half_precision_in_float32() -> None:
    x = to_hyperboloid(torch.randn(4, 8).bfloat16(), 1.0)
    assert x.dtype == torch.float32
    assert torch.allclose(-(x[:, 0] ** 2) + (x[:, 1:] ** 2).sum(1), -torch.ones(4), atol=1e-5)


def test_embed_projection_dispatches_on_the_embedding() -> None:
    z = torch.randn(4, 6)
    assert torch.equal(embed_projection(z, "sphere"), to_sphere(z))
    assert torch.equal(embed_projection(z, "hyperboloid", 2.0), to_hyperboloid(z, 2.0))
    with pytest.raises(ValueError, match="embedding"):
        embed_projection(z, "torus")


@pytest.mark.parametrize(("arch", "stem"), [("resnet18", "cifar"), ("resnet50", "imagenet")])
def test_activation_checkpointing_changes_no_number_and_keeps_less(arch: str, stem: str) -> None:
    """Outputs, gradients, BatchNorm running statistics and batch counts equal those of the
    plain forward (float64), while autograd keeps fewer bytes for the backward pass."""
    torch.manual_seed(0)
    plain = ResNet(arch, in_channels=3, stem=stem, widths=(4, 8, 8, 16)).double()
    checkpointed = ResNet(
        arch, in_channels=3, stem=stem, widths=(4, 8, 8, 16), activation_checkpointing=True
    ).double()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    saved: dict[str, int] = {}
    outputs = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        saved[name] = sum(sizes)
        (out.square().sum() + out.sum()).backward()
        outputs[name] = out.detach()
    torch.testing.assert_close(outputs["checkpointed"], outputs["plain"], rtol=1e-12, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), c in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(b, c), name  # running stats moved once, batch count is 1
    assert int(plain.stem[1].num_batches_tracked) == 1
    assert saved["checkpointed"] < 0.5 * saved["plain"]
    # In eval mode, or without gradients, nothing is recomputed: the same function either way.
    checkpointed.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(x), plain(x), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("channels", "stride", "size"), [(4, 2, 28), (3, 2, 9), (20, 3, 12), (4, 1, 8)]
)
def test_pointwise_conv_in_channels_last_equals_the_strided_convolution(
    channels: int, stride: int, size: int
) -> None:
    torch.manual_seed(0)
    conv = PointwiseConv(channels, 6, stride).double()
    reference = torch.nn.Conv2d(channels, 6, 1, stride, bias=False).double()
    reference.load_state_dict(conv.state_dict())  # the same keys as a plain Conv2d
    x = torch.randn(5, channels, size, size, dtype=torch.float64)
    x_last = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_first = x.clone().requires_grad_()
    out, expected = conv.to(memory_format=torch.channels_last)(x_last), reference(x_first)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    assert x_last.grad is not None and x_first.grad is not None
    torch.testing.assert_close(x_last.grad, x_first.grad, rtol=1e-12, atol=1e-12)
    assert conv.weight.grad is not None and reference.weight.grad is not None
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad, rtol=1e-10, atol=1e-12)


_CHANNELS_LAST_STEPS = """
import torch
from care.models import ResNet
torch.manual_seed(0)
model = ResNet("resnet18", in_channels=1, widths=(4, 4, 8, 8)).to(memory_format=torch.channels_last)
x = torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
for _ in range(15):
    model(x).sum().backward()
print("done")
"""


def test_tiny_widths_in_channels_last_train_on_an_avx2_cpu() -> None:
    """oneDNN's AVX2 strided 1x1 backward-weights kernel overruns its workspace for NHWC inputs
    of under 8 channels (uxlfoundation/oneDNN#6035): with plain Conv2d shortcuts these steps hung
    or crashed in 6 of 7 runs here. ONEDNN_MAX_CPU_ISA=AVX2 selects those kernels on any x86."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", _CHANNELS_LAST_STEPS],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]
