"""Model creation, offline starting weights, BatchNorm folding for labeling."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from noisystudent.errors import ConfigError
from noisystudent.models.build import create_model, load_weights
from noisystudent.models.inference import fuse_batchnorm, prepare, relative_diff


def _trained_like(model):
    """Give BN layers non-trivial statistics so that folding them is a real test."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("source", ["timm_file", "checkpoint"])
def test_local_pretrained_weights_reinit_classifier(tmp_path, source):
    """ImageNet-style weights (1000 classes) from a local file: backbone loaded, 10-class head fresh."""
    donor = timm.create_model("test_efficientnet", num_classes=1000)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    if source == "timm_file":
        model = create_model("test_efficientnet", 10, pretrained=True, pretrained_file=str(path))
    else:
        model = create_model("test_efficientnet", 10, checkpoint=str(path))
    own, ref = model.state_dict(), donor.state_dict()
    assert torch.equal(own["conv_stem.weight"], ref["conv_stem.weight"])
    backbone = [k for k in ref if not k.startswith("classifier.")]
    assert len(backbone) > 20 and all(torch.equal(own[k], ref[k]) for k in backbone)
    assert own["classifier.weight"].shape == (10, ref["classifier.weight"].shape[1])


def test_checkpoint_formats_and_errors(tmp_path):
    donor = timm.create_model("test_resnet", num_classes=10)
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict_ema": {f"module.{k}": v for k, v in donor.state_dict().items()}}, wrapped)
    model = timm.create_model("test_resnet", num_classes=10)
    report = load_weights(model, wrapped)
    assert report["reinitialised"] == [] and report["missing"] == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), donor.state_dict().values()))
    with pytest.raises(ConfigError, match="has no tensor that fits"):
        load_weights(timm.create_model("test_vit", num_classes=10), wrapped)
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("test_resnet", 10, checkpoint=str(tmp_path / "none.pth"))
    with pytest.raises(ConfigError, match="init.file"):
        create_model("test_resnet", 10, pretrained_file=str(tmp_path / "none.pth"))


def test_unreachable_hub_says_use_a_local_file(monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError, match="init.file"):
        create_model("test_resnet", 10, pretrained=True)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_batchnorm_folding_matches_to_1e5(name):
    model = _trained_like(timm.create_model(name, num_classes=10))
    x = torch.randn(4, 3, 48, 48)
    fused, n = fuse_batchnorm(model)
    assert n > 0
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert n_bn < sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert relative_diff(model, fused, x) < 1e-5
    ready, applied = prepare(model, x, fuse_bn=True, channels_last=True)
    assert applied["fuse_bn"] == n and applied["channels_last"]
    with torch.inference_mode():
        assert torch.allclose(ready(x), model(x), atol=1e-4, rtol=1e-4)


def test_labeling_model_has_no_noise():
    """Dropout and stochastic depth are active in training and off in the labeling model."""
    model = create_model("test_efficientnet", 10, drop_rate=0.5, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # noise on
    ready, _ = prepare(model, x)
    with torch.inference_mode():
        assert torch.equal(ready(x), ready(x))  # noise off
    assert not ready.training
