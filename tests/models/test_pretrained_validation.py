"""``EncoderSpec.from_metadata`` checks every value it reads, and ``Preprocess`` refuses float
images outside [0, 1] without breaking ``torch.export``."""

from __future__ import annotations

import json

import pytest
import torch

from care.errors import CareError
from care.models import EncoderSpec, Preprocess, TrainedEncoder

SPEC = EncoderSpec(
    backbone="resnet18",
    stem="cifar",
    widths=(4, 4, 8, 8),
    in_channels=1,
    head_hidden=16,
    head_out=8,
    embedding="sphere",
    curvature=1.0,
    dataset="fashion-mnist",
    input_size=28,
    image_size=28,
    mean=(0.286,),
    std=(0.353,),
)


def test_good_metadata_gives_the_spec_back() -> None:
    assert EncoderSpec.from_metadata(SPEC.to_metadata("backbone")) == SPEC


#: (key, bad JSON or text): each is refused with a ValueError naming the key.
BAD_VALUES = [
    ("widths", "[Infinity, 4, 8, 8]"),
    ("widths", "[NaN, 4, 8, 8]"),
    ("widths", "[1000000, 1000000, 1000000, 1000000]"),
    ("widths", "[4, 4, 8]"),
    ("widths", "[4.5, 4, 8, 8]"),
    ("widths", "[true, 4, 8, 8]"),
    ("widths", '"4,4,8,8"'),
    ("widths", "[0, 4, 8, 8]"),
    ("in_channels", "2"),
    ("in_channels", "1.0"),
    ("head_hidden", "0"),
    ("head_out", "-8"),
    ("head_out", "100000000"),
    ("input_size", "-28"),
    ("image_size", "-1"),
    ("image_size", "1e9"),
    ("image_size", "null"),
    ("mean", "[]"),
    ("mean", "[0.1, 0.2, 0.3]"),
    ("mean", "[NaN]"),
    ("mean", '["a"]'),
    ("std", "[0.0]"),
    ("std", "[-0.353]"),
    ("std", "[Infinity]"),
    ("curvature", "0"),
    ("curvature", "-1"),
    ("curvature", "Infinity"),
    ("eval_crop_fraction", "0"),
    ("eval_crop_fraction", "1.5"),
    ("eval_crop_fraction", "NaN"),
    ("eval_crop_fraction", "0.001"),  # keeps no pixel of 28
    ("backbone", "resnet9000"),
    ("stem", "tiny"),
    ("embedding", "torus"),
    ("widths", "[4, 4, 8, 8"),  # not JSON
    ("head_out", "9" * 5000),  # too many digits for json
]


@pytest.mark.parametrize(("key", "raw"), BAD_VALUES, ids=[f"{k}={v[:20]}" for k, v in BAD_VALUES])
def test_every_metadata_value_is_checked(key: str, raw: str) -> None:
    metadata = SPEC.to_metadata("backbone")
    metadata[key] = raw
    with pytest.raises(ValueError, match=f"'{key}'") as caught:
        EncoderSpec.from_metadata(metadata)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300, message


def test_a_missing_value_is_named() -> None:
    metadata = SPEC.to_metadata("backbone")
    del metadata["std"]
    with pytest.raises(ValueError, match="no 'std'"):
        EncoderSpec.from_metadata(metadata)


def test_three_channel_metadata_needs_three_means_and_stds() -> None:
    metadata = SPEC.to_metadata("backbone")
    metadata["in_channels"] = "3"
    with pytest.raises(ValueError, match="'mean'"):
        EncoderSpec.from_metadata(metadata)
    metadata["mean"] = metadata["std"] = json.dumps([0.5, 0.5, 0.5])
    assert EncoderSpec.from_metadata(metadata).in_channels == 3


def _one_line(caught: pytest.ExceptionInfo[CareError], fragment: str) -> None:
    message = str(caught.value)
    assert "\n" not in message and fragment in message, message


def test_preprocess_refuses_float_images_in_0_to_255() -> None:
    preprocess = Preprocess(28, (0.5,), (0.25,))
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    expected = preprocess(images)
    torch.testing.assert_close(preprocess(images.float() / 255), expected)
    for _ in range(2):  # every float batch on the CPU, not only the first
        with pytest.raises(CareError) as caught:
            preprocess(images.float())
        _one_line(caught, "pass uint8 in 0..255 or float in [0, 1]")
    with pytest.raises(CareError) as caught:
        preprocess((images.float() / 255 - 0.5) / 0.25)  # normalised already
    _one_line(caught, "pass uint8 in 0..255 or float in [0, 1]")


def test_the_trained_encoder_refuses_float_images_in_0_to_255() -> None:
    encoder = TrainedEncoder(SPEC).eval()
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        encoder(images)
        with pytest.raises(CareError) as caught:
            encoder(images.float())
    _one_line(caught, "pass uint8 in 0..255 or float in [0, 1]")


@pytest.mark.parametrize("strict", [False, True])
def test_the_encoder_still_exports(strict: bool) -> None:
    encoder = TrainedEncoder(SPEC).eval()
    example = torch.rand(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(encoder, (example,), dynamic_shapes=({0: batch},), strict=strict)
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), encoder(images))
