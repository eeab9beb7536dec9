"""Config composition as the CLI does it, and the CLI's help and config errors."""

from __future__ import annotations

import pytest
from conftest import cli, make_cfg

from noisystudent.config import config_hash, learning_rate
from noisystudent.stages import STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes(stage):
    cfg = make_cfg(f"stage={stage}", "run_dir=/tmp/x")
    assert cfg.stage.name == stage
    assert cfg.data.labeled == "/tmp/x/data/digits/labeled-{000000..000000}.tar"
    assert cfg.data.num_classes == 10
    assert cfg.model.name == "test_efficientnet"


def test_presets_carry_the_design_table():
    table = [("efficientnet_b0", 224, 0.2), ("efficientnet_b3", 300, 0.3), ("efficientnet_b7", 600, 0.5)]
    for name, size, drop in table:
        cfg = make_cfg(f"model={name}")
        assert (cfg.model.name, cfg.model.img_size, cfg.model.drop_rate, cfg.model.drop_path_rate) == (
            name, size, drop, 0.2)
    l2 = make_cfg("model=efficientnet_l2").model
    assert (l2.img_size, l2.test_img_size, l2.drop_rate) == (475, 800, 0.5)
    opt = make_cfg("optim=rmsproptf").optim
    assert (opt.name, opt.lr_per_256, opt.alpha, opt.momentum, opt.eps, opt.weight_decay) == (
        "rmsproptf", 0.016, 0.9, 0.9, 1e-3, 1e-5)
    sched = make_cfg("sched=step").sched
    assert (sched.decay_epochs, sched.decay_rate, sched.warmup_epochs) == (2.4, 0.97, 5)


def test_lr_scales_with_global_batch():
    opt = make_cfg("optim=rmsproptf").optim
    assert learning_rate(opt, 256) == pytest.approx(0.016)
    assert learning_rate(opt, 2048) == pytest.approx(0.128)
    assert learning_rate(make_cfg("optim.lr=0.5").optim, 4096) == 0.5


def test_config_hash_ignores_runtime_keys_only():
    a = make_cfg("run_dir=/a", "num_workers=0")
    b = make_cfg("run_dir=/b", "num_workers=4", "force=true")
    c = make_cfg("run_dir=/a", "train.epochs=7")
    assert config_hash(a) != config_hash(c)
    # run_dir is left out, but it also feeds data paths, so compare configs with the same data root
    a2 = make_cfg("run_dir=/a", "num_workers=3", "force=true", "resume=never")
    assert config_hash(a) == config_hash(a2)
    assert config_hash(b) != config_hash(c)


def test_help_lists_stages_and_groups():
    out = cli("--help", check=True).stdout
    for stage in STAGES:
        assert f"  {stage} " in out
    for group in ("data: digits, shards", "optim: adamw, rmsproptf, sgd", "sched: cosine, step"):
        assert group in out
    assert "efficientnet_b7" in out


def test_unknown_config_key_is_one_clear_line(tmp_path):
    proc = cli("stage=teacher", f"run_dir={tmp_path}", "train.epochz=3")
    assert proc.returncode != 0
    assert "train.epochz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_stage_is_rejected(tmp_path):
    proc = cli("stage=distill", f"run_dir={tmp_path}")
    assert proc.returncode != 0
    assert "stage" in proc.stderr and "distill" in proc.stderr
    assert "Traceback" not in proc.stderr
