"""stage=export: a timm folder timm loads by itself, ONNX that onnxruntime runs as PyTorch does, a model card;
a BatchNorm fold that changes the model is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from conftest import FAST, run

from noisystudent.errors import DataError, MissingInputError
from noisystudent.models.build import load_exported_model


@pytest.fixture
def exported(teacher_copy, digits_root):
    s = run("stage=export", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST)
    return teacher_copy, s


def test_timm_loads_the_folder_with_no_code_of_ours(exported):
    run_dir, s = exported
    out = run_dir / "export"
    ours, info = load_exported_model(run_dir / "teacher", "")
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_efficientnet" and config["num_classes"] == 10
    assert config["label_names"] == [str(c) for c in range(10)]  # classes.json beside the labeled shards
    data = timm.data.resolve_data_config({}, model=theirs)
    assert tuple(data["input_size"]) == (3, 32, 32) and data["crop_pct"] == 1.0  # the digits' eval transform
    assert s["round"] == 0 and s["batchnorm_folded"] > 0 and s["fold_rel_diff"] <= 1e-5
    card = (out / "README.md").read_text()
    assert "local-dir:" in card and f"{100 * s['top1']:.2f}%" in card


def test_onnx_runs_as_pytorch_with_any_batch_size(exported):
    import onnxruntime

    run_dir, s = exported
    ours, _ = load_exported_model(run_dir / "teacher", "")
    session = onnxruntime.InferenceSession(str(run_dir / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = torch.randn(n, 3, 32, 32)
        (logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            assert np.abs(logits - ours(x).numpy()).max() < 1e-4
    assert s["onnx_opset"] == 18 and s["onnx_max_abs_diff"] < 1e-4


def test_a_wrong_fold_is_refused(teacher_copy, digits_root, monkeypatch):
    from noisystudent.stages import export

    real = export.fuse_batchnorm

    def wrong_fold(model):  # folds, then forgets one BatchNorm's shift: what a bad pairing of conv and BN does
        fused, n = real(model)
        conv = next(m for m in fused.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None)
        conv.bias.data.zero_()
        return fused, n

    monkeypatch.setattr(export, "fuse_batchnorm", wrong_fold)
    with pytest.raises(DataError, match="refusing an ONNX model"):
        run("stage=export", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST)
    assert not (teacher_copy / "export").exists() or not list((teacher_copy / "export").iterdir())  # nothing written
    # the timm folder holds the trained weights as they are: it needs no fold
    s = run("stage=export", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, "export.onnx=false")
    assert s["batchnorm_folded"] is None and (teacher_copy / "export" / "_SUCCESS").exists()


def test_export_picks_the_round_and_says_what_is_missing(teacher_copy, digits_root, tmp_path):
    with pytest.raises(MissingInputError, match="export.round=2: no finished model"):
        run("stage=export", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, "export.round=2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingInputError, match="no finished model"):
        run("stage=export", f"run_dir={empty}", f"data.root={digits_root}", *FAST)
    s = run("stage=export", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, "export.onnx=false")
    assert s["files"] == ["model.safetensors", "config.json", "README.md"]
    assert not (teacher_copy / "export" / "model.onnx").exists()
    shutil.rmtree(teacher_copy / "export")
