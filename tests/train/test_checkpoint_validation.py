"""A checkpoint is checked before a run resumes from it: that it is a training state at all, that
its weights are finite, and that its weights fit the model of the config. Each refusal is one
line naming the checkpoint and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from care.cli import main
from care.config import load_config
from care.data import DataInfo
from care.errors import CareError
from care.methods import ContrastiveMethod, build_method
from care.runs import AtomicCheckpointIO, RunDir, safe_torch_load
from tests.conftest import tiny

INFO = DataInfo(channels=1, image_size=16, mean=(0.5,), std=(0.25,), num_classes=10)


@pytest.fixture(scope="module")
def finished(fake_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("checkpoints") / "run"
    assert main(["pretrain", *tiny(fake_fmnist, out, "knn_every=0")]) == 0
    return out


def _one_line(caught: pytest.ExceptionInfo[CareError], *fragments: str) -> None:
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def _good_checkpoint() -> dict[str, Any]:
    return {
        "pytorch-lightning_version": "2.6.0",
        "epoch": 0,
        "global_step": 4,
        "state_dict": {"encoder.w": torch.ones(3)},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}}}],
        "lr_schedulers": [{"last_epoch": 4}],
        "loops": {"fit_loop": {}},
    }


NOT_TRAINING_STATES: dict[str, tuple[object, str]] = {
    "foo": ({"foo": 1}, "it has no 'pytorch-lightning_version'"),
    "bare state dict": ({"encoder.w": torch.ones(3)}, "it has no"),
    "list": ([1, 2], "it holds a list"),
    "no state_dict": (
        {k: v for k, v in _good_checkpoint().items() if k != "state_dict"},
        "it has no 'state_dict'",
    ),
    "epoch text": ({**_good_checkpoint(), "epoch": "one"}, "its 'epoch' is a str"),
    "weights not tensors": (
        {**_good_checkpoint(), "state_dict": {"encoder.w": [1.0]}},
        "its 'state_dict' holds 'encoder.w', which is not a named tensor",
    ),
    "optimizer not a dict": (
        {**_good_checkpoint(), "optimizer_states": [3]},
        "its 'optimizer_states' holds something other than state dicts",
    ),
}


@pytest.mark.parametrize("case", NOT_TRAINING_STATES.values(), ids=list(NOT_TRAINING_STATES))
def test_a_file_that_is_not_a_training_state_is_refused(
    tmp_path: Path, case: tuple[object, str]
) -> None:
    content, fragment = case
    path = tmp_path / "last.ckpt"
    torch.save(content, path)
    with pytest.raises(CareError) as caught:
        AtomicCheckpointIO().load_checkpoint(path)
    _one_line(caught, f"checkpoint {path} is not a training checkpoint", fragment, "delete it")


def test_a_good_training_state_loads(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save(_good_checkpoint(), path)
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 4


@pytest.mark.parametrize(
    ("where", "named"),
    [("weights", "tensor 'encoder.w'"), ("optimiser", "optimizer_states.0.state.0")],
)
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_weights_are_refused_when_loading(
    tmp_path: Path, where: str, named: str, value: float
) -> None:
    checkpoint = _good_checkpoint()
    if where == "weights":
        checkpoint["state_dict"]["encoder.w"][1] = value
    else:
        checkpoint["optimizer_states"][0]["state"][0]["momentum_buffer"][0] = value
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CareError) as caught:
        AtomicCheckpointIO().load_checkpoint(path)
    _one_line(caught, f"checkpoint {path} holds non-finite weights", named, "delete it")


# -------------------------------------------------- the state dict against this config's model


def _method(out: Path) -> ContrastiveMethod:
    cfg = load_config(
        None,
        [
            f"out={out}",
            "widths=[4,4,8,8]",
            "head_hidden=16",
            "head_out=8",
            "batch_size=8",
            "group_size=4",
        ],
    )
    return build_method(cfg, INFO)


def _rename(state: dict[str, torch.Tensor]) -> None:
    state["encoder.backbone.stem.0.weightx"] = state.pop("encoder.backbone.stem.0.weight")


def _reshape(state: dict[str, torch.Tensor]) -> None:
    state["encoder.head.net.3.bias"] = torch.zeros(16)


def _retype(state: dict[str, torch.Tensor]) -> None:
    state["encoder.head.net.3.bias"] = state["encoder.head.net.3.bias"].to(torch.int64)


def _drop(state: dict[str, torch.Tensor]) -> None:
    del state["encoder.head.net.1.running_mean"]


def _add(state: dict[str, torch.Tensor]) -> None:
    state["encoder.extra"] = torch.zeros(1)


STATE_MISMATCHES = {
    "missing": (_drop, "it lacks tensor 'encoder.head.net.1.running_mean'"),
    "renamed": (_rename, "it lacks tensor 'encoder.backbone.stem.0.weight'"),
    "unexpected": (_add, "it holds tensor 'encoder.extra'"),
    "shape": (_reshape, "'encoder.head.net.3.bias' has shape [16], where the model needs [8]"),
    "dtype": (_retype, "'encoder.head.net.3.bias' is stored as int64"),
}


@pytest.mark.parametrize("case", STATE_MISMATCHES.values(), ids=list(STATE_MISMATCHES))
def test_a_state_dict_that_does_not_fit_the_model_is_refused(
    tmp_path: Path, case: tuple[Any, str]
) -> None:
    change, fragment = case
    method = _method(tmp_path / "run")
    state = dict(method.state_dict())
    change(state)
    with pytest.raises(CareError) as caught:
        method.on_load_checkpoint({"state_dict": state, "epoch": 0})
    last = RunDir(tmp_path / "run").last_checkpoint
    _one_line(
        caught,
        f"checkpoint {last} does not match the model of this config",
        fragment,
        "resume with the settings it was trained with, or delete it to start afresh",
    )


def test_a_checkpoint_without_weights_is_refused_by_the_method(tmp_path: Path) -> None:
    method = _method(tmp_path / "run")
    with pytest.raises(CareError) as caught:
        method.on_load_checkpoint({"epoch": 0})
    _one_line(caught, f"checkpoint {RunDir(tmp_path / 'run').last_checkpoint} holds no model")


# ----------------------------------------------------------------- resume=true, end to end


def _poison(checkpoint: dict[str, Any]) -> None:
    weight = checkpoint["state_dict"]["encoder.backbone.stem.0.weight"]
    weight.view(-1)[0] = float("nan")


def _misshape(checkpoint: dict[str, Any]) -> None:
    checkpoint["state_dict"]["encoder.backbone.stem.0.weight"] = torch.zeros(4, 1, 5, 5)


def _unexpected(checkpoint: dict[str, Any]) -> None:
    checkpoint["state_dict"]["encoder.backbone.extra"] = torch.zeros(2)


def _only_weights(checkpoint: dict[str, Any]) -> None:
    state = checkpoint.pop("state_dict")
    checkpoint.clear()
    checkpoint.update(state)  # a bare state dict saved as last.ckpt


RESUMES = {
    "foo": (lambda checkpoint: [checkpoint.clear(), checkpoint.update(foo=1)], "it has no"),
    "bare state dict": (_only_weights, "is not a training checkpoint"),
    "nan": (_poison, "holds non-finite weights (NaN or inf) in tensor 'encoder.backbone.stem"),
    "shape": (_misshape, "'encoder.backbone.stem.0.weight' has shape [4, 1, 5, 5]"),
    "unexpected": (_unexpected, "it holds tensor 'encoder.backbone.extra'"),
}


@pytest.mark.parametrize("case", RESUMES.values(), ids=list(RESUMES))
def test_resuming_from_a_bad_checkpoint_is_one_line(
    finished: Path,
    fake_fmnist: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: tuple[Any, str],
) -> None:
    change, fragment = case
    out = shutil.copytree(finished, tmp_path / "run")
    last = RunDir(out).last_checkpoint
    checkpoint = safe_torch_load(last)
    change(checkpoint)
    torch.save(checkpoint, last)
    argv = ["pretrain", *tiny(fake_fmnist, out, "knn_every=0", "epochs=2", "resume=true")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint {last} "), err
    assert "\n" not in err and "Traceback" not in err and fragment in err, err
