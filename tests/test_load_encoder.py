"""A finished run's encoder outside care's training code: ``care.load_encoder``, the metadata in
its safetensors files, ``encoder.pt2`` for plain PyTorch, and the README's section that shows
both (run as written)."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import care
from care.augment.eval import eval_transform
from care.cli import main
from care.data import data_info, load_split
from care.errors import CareError
from care.evaluate.features import extract_features
from care.models import ENCODER_FORMAT, Preprocess, TrainedEncoder
from care.runs import RunDir, export_encoder, load_encoder, load_trained_encoder, read_weights
from tests.conftest import tiny

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use a trained encoder"


@pytest.fixture(scope="module")
def run_dir(fake_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished run on 1-channel data, at ``runs/demo-care`` under a folder of its own
    (the README's path)."""
    out = tmp_path_factory.mktemp("readme") / "runs" / "demo-care"
    assert main(["pretrain", *tiny(fake_fmnist, out, "knn_every=0")]) == 0
    return out


def _test_images(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = RunDir(run).read_config()
    data = load_split(cfg, "test")
    images = torch.stack([data[i][0] for i in range(len(data))])
    return images, torch.tensor([data[i][1] for i in range(len(data))])


def _one_line(exc: pytest.ExceptionInfo[CareError], fragment: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    assert fragment in message, message


def test_the_weights_carry_what_rebuilds_the_model(run_dir: Path, fake_fmnist: Path) -> None:
    for name, layer in (("backbone", "backbone"), ("head", "projection")):
        with safe_open(str(run_dir / f"{name}.safetensors"), framework="pt") as handle:
            metadata = handle.metadata()
        assert metadata["format"] == ENCODER_FORMAT
        assert metadata["care_version"] == care.__version__
        assert metadata["layer"] == layer
        assert metadata["backbone"] == "resnet18" and metadata["stem"] == "cifar"
        assert json.loads(metadata["widths"]) == [4, 4, 8, 8]
        assert json.loads(metadata["in_channels"]) == 1
        assert (json.loads(metadata["head_hidden"]), json.loads(metadata["head_out"])) == (16, 8)
        assert (metadata["embedding"], json.loads(metadata["curvature"])) == ("sphere", 1.0)
        assert metadata["dataset"] == "fashion-mnist"
        assert json.loads(metadata["input_size"]) == json.loads(metadata["image_size"]) == 28
        assert json.loads(metadata["mean"]) == [0.286] and json.loads(metadata["std"]) == [0.353]
        assert json.loads(metadata["eval_crop_fraction"]) == 1.0
    # config.yaml names the folder the data was read from, not null
    assert RunDir(run_dir).read_config().data_root == str(fake_fmnist.absolute())


def test_load_encoder_gives_the_features_care_probe_uses(run_dir: Path) -> None:
    run = RunDir(run_dir)
    cfg = run.read_config()
    test = load_split(cfg, "test")
    info = data_info(cfg, test)
    backbone = load_trained_encoder(run, cfg, info.channels, "backbone")
    probe_features, probe_labels = extract_features(backbone, test, info)

    encoder = care.load_encoder(run_dir)
    assert isinstance(encoder, TrainedEncoder) and not encoder.training
    images, labels = _test_images(run_dir)
    with torch.no_grad():
        features = encoder(images)
        from_floats = encoder(images.float() / 255)  # float in [0, 1] is the same image
    assert features.shape == (64, 8) and encoder.dim == 8
    assert torch.equal(labels, probe_labels)
    torch.testing.assert_close(features, probe_features)
    torch.testing.assert_close(from_floats, features)


def test_the_projection_layer_lies_on_the_runs_sphere(run_dir: Path) -> None:
    run = RunDir(run_dir)
    cfg = run.read_config()
    whole = load_trained_encoder(run, cfg, 1, "projection")
    encoder = load_encoder(run_dir, layer="projection")
    images, _ = _test_images(run_dir)
    with torch.no_grad():
        z = encoder(images)
        expected = whole(eval_transform(images, 28, (0.286,), (0.353,)))
    assert z.shape == (64, 8) and encoder.dim == 8
    torch.testing.assert_close(z.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(z, expected)


@pytest.mark.parametrize(
    ("stored", "size", "crop", "dtype"),
    [(28, 28, 1.0, torch.uint8), (32, 24, 1.0, torch.uint8), (40, 16, 0.8, torch.float32)],
)
def test_preprocess_computes_the_eval_transform(
    stored: int, size: int, crop: float, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, stored, stored), generator=gen, dtype=torch.uint8)
    if dtype != torch.uint8:
        images = images.to(dtype) / 255
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    expected = eval_transform(images, size, mean, std, crop)
    assert torch.equal(Preprocess(size, mean, std, crop)(images), expected)


def _strip_metadata(run: Path, into: Path) -> Path:
    """A copy of ``run`` whose weights carry no metadata and no encoder.pt2, as runs written
    before they did."""
    shutil.copytree(run, into)
    (into / "encoder.pt2").unlink()
    for name in ("backbone", "head"):
        path = str(into / f"{name}.safetensors")
        save_file(load_file(path), path)
    return into


def test_a_run_without_metadata_is_rebuilt_from_its_config(run_dir: Path, tmp_path: Path) -> None:
    old = _strip_metadata(run_dir, tmp_path / "old")
    assert read_weights(old / "backbone.safetensors")[1] == {}
    images, _ = _test_images(run_dir)
    for layer in ("backbone", "projection"):
        new_encoder, old_encoder = load_encoder(run_dir, layer), load_encoder(old, layer)
        assert old_encoder.spec == new_encoder.spec
        with torch.no_grad():
            assert torch.equal(old_encoder(images), new_encoder(images))
    written = export_encoder(old)
    assert written == old / "encoder.pt2"
    exported = torch.export.load(str(written)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(images.float() / 255), load_encoder(old)(images))


def test_bad_run_directories_and_layers_are_one_line(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CareError) as exc:
        load_encoder(run_dir, layer="head")
    _one_line(exc, "unknown layer 'head': choose backbone")
    with pytest.raises(CareError) as exc:
        load_encoder(tmp_path / "nowhere")
    _one_line(exc, "run directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CareError) as exc:
        load_encoder(tmp_path / "empty")
    _one_line(exc, "holds no backbone.safetensors")
    broken = shutil.copytree(run_dir, tmp_path / "broken")
    (broken / "backbone.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CareError) as exc:
        load_encoder(broken)
    _one_line(exc, "is corrupt")
    newer = shutil.copytree(run_dir, tmp_path / "newer")
    tensors, metadata = read_weights(newer / "backbone.safetensors")
    metadata["format"] = "care-encoder/9"
    save_file(tensors, str(newer / "backbone.safetensors"), metadata=metadata)
    with pytest.raises(CareError) as exc:
        load_encoder(newer)
    _one_line(exc, "unreadable care metadata")
    (newer / "head.safetensors").unlink()
    shutil.copy(run_dir / "backbone.safetensors", newer / "backbone.safetensors")
    with pytest.raises(CareError) as exc:
        load_encoder(newer, layer="projection")
    _one_line(exc, "head.safetensors not found")


def test_encoder_pt2_holds_no_pickled_objects(run_dir: Path) -> None:
    with zipfile.ZipFile(run_dir / "encoder.pt2") as archive:
        names = archive.namelist()
        configs = [
            n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))
        ]
        assert len(configs) == 2
        for name in configs:
            entries = json.loads(archive.read(name))["config"].values()
            assert entries and not any(entry["use_pickle"] for entry in entries), name
        # torch.export.load reads the example inputs with weights_only=True first: they pass
        (samples,) = [n for n in names if "/sample_inputs/" in n]
        torch.load(io.BytesIO(archive.read(samples)), weights_only=True)
        (extra,) = [n for n in names if n.endswith("extra/care.json")]
        assert json.loads(archive.read(extra))["in_channels"] == "1"
        (graph,) = [n for n in names if n.endswith("models/model.json")]
        assert "stack_trace" not in archive.read(graph).decode()  # no paths of this machine


def test_a_failed_export_is_a_warning(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run = RunDir(shutil.copytree(run_dir, tmp_path / "run"))
    run.encoder_export.unlink()

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported op\nmore detail")

    monkeypatch.setattr(torch.export, "export", fail)
    assert run.write_encoder_export() is None
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: ") and "\n" not in err and "unsupported op" in err
    assert not run.encoder_export.exists()


def test_import_care_stays_light_and_loads_the_encoder_on_use() -> None:
    code = (
        "import sys, care; assert 'torch' not in sys.modules; "
        "from care import load_encoder; import care.runs; "
        "assert load_encoder is care.runs.load_encoder is care.load_encoder"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the README's section on trained encoders."""
    text = README.read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.index("\n## ", start + len(SECTION) + 2)
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.S)


def test_the_readme_section_runs_as_written(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = _readme_blocks()
    assert [language for language, _ in blocks] == ["python", "python", "bash"]
    (_, with_care), (_, plain), (_, shell) = blocks
    assert "import care" in with_care and "care" not in plain.replace("runs/demo-care", "")
    encoder = load_encoder(run_dir)
    home = run_dir.parents[1]  # the README's paths are relative: runs/demo-care
    monkeypatch.chdir(home)

    namespace: dict[str, object] = {}
    exec(compile(with_care, "README (care)", "exec"), namespace)
    images = namespace["images"]
    assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8
    expected = encoder(images).detach()
    torch.testing.assert_close(namespace["embeddings"], expected, rtol=0, atol=0)

    # plain PyTorch: a fresh interpreter without site's .pth files, so the editable care
    # install is not on its path; the venv's site-packages alone give torch and numpy
    script = "\n".join(
        [
            "import importlib.util, sys",
            f"sys.path.append({sysconfig.get_paths()['purelib']!r})",
            "assert importlib.util.find_spec('care') is None, 'care is importable'",
            plain,
            "import numpy as np",
            f"np.save({str(tmp_path / 'images.npy')!r}, images.numpy())",
            f"np.save({str(tmp_path / 'plain.npy')!r}, embeddings.detach().numpy())",
        ]
    )
    subprocess.run(
        [sys.executable, "-S", "-c", script], check=True, cwd=home, env={"PATH": "/usr/bin:/bin"}
    )
    plain_images = torch.from_numpy(np.load(tmp_path / "images.npy"))
    plain_embeddings = torch.from_numpy(np.load(tmp_path / "plain.npy"))
    assert plain_embeddings.shape == (16, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain_embeddings, encoder(plain_images))

    test_images, labels = _test_images(run_dir)
    with torch.no_grad():
        expected = encoder(test_images)
    for line in shell.strip().splitlines():
        argv = shlex.split(line.split("#")[0])
        assert argv[0] == "care"
        assert main(argv[1:]) == 0, line
    written = load_file(str(run_dir / "test.safetensors"))
    torch.testing.assert_close(written["embeddings"], expected)
    assert torch.equal(written["labels"], labels)
    assert (run_dir / "test.neighbours.png").is_file()
    train = np.load(run_dir / "train.npy")
    assert train.shape == (128, 8) and np.load(run_dir / "train.labels.npy").shape == (128,)
