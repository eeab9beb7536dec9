"""stage=finetune: the test-resolution fine-tune (FixRes) of a round's student, alone and inside iterate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
from accelerate import Accelerator
from conftest import FAST, run
from safetensors.torch import load_file
from torch import nn

from noisystudent.errors import ConfigError
from noisystudent.files import read_json
from noisystudent.models.build import freeze_stages, model_stages
from noisystudent.training.batchnorm import reestimate_batchnorm

# the demo model trains at 32 px; tested (and fine-tuned) at 40
SHORT = [*FAST, "max_steps=8", "pseudolabel.threshold=0.05"]
AT_40 = [*SHORT, "model.test_img_size=40"]


def _names(model):
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def test_freeze_counts_stages_by_timms_group_matcher():
    eff = timm.create_model("test_efficientnet", num_classes=10)
    stem, stages = model_stages(eff)
    assert stem[0] == "conv_stem.weight" and len(stages) == 5
    assert freeze_stages(eff, "auto")["stages"] == 2
    frozen = _names(eff)
    assert set(frozen) == set(stem + stages[0] + stages[1])
    assert all(n.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1.")) for n in frozen)
    assert not any(n.startswith(("blocks.2.", "classifier", "conv_head")) for n in frozen)

    res = timm.create_model("test_resnet", num_classes=10)
    assert freeze_stages(res, 3) == {"stages": 3, "of": 4, "frozen_params": pytest.approx(
        sum(p.numel() for n, p in res.named_parameters() if not p.requires_grad)), "trained_params": pytest.approx(
        sum(p.numel() for p in res.parameters() if p.requires_grad))}
    assert any(n.startswith("layer3.") for n in _names(res)) and not any(n.startswith("layer4.") for n in _names(res))
    assert not any(n.startswith("fc") for n in _names(res))

    none = timm.create_model("test_resnet", num_classes=10)
    assert freeze_stages(none, 0)["frozen_params"] == 0 and not _names(none)
    with pytest.raises(ConfigError, match=r"finetune.freeze=5.*up to 4"):
        freeze_stages(timm.create_model("test_resnet", num_classes=10), 5)


def test_batchnorm_is_reestimated_over_the_batches_and_nothing_else_moves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    images = [torch.randn(8, 3, 10, 10) * 3 + 1 for _ in range(5)]
    batches = iter([{"images": torch.empty(0, 3, 10, 10)}] + [{"images": x} for x in images])  # an empty batch too
    done = reestimate_batchnorm(Accelerator(cpu=True), model, batches, n_batches=4)
    assert done == {"layers": 2, "images": 32, "batches_per_process": 4}
    with torch.no_grad():
        first = torch.cat([model[0](x) for x in images[:4]])  # the batches it was given, not the fifth
    # equal batches: the cumulative average of batch means is the mean over all of them
    torch.testing.assert_close(model[1].running_mean, first.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    batch_vars = torch.stack([model[0](x).detach().var(dim=(0, 2, 3)) for x in images[:4]])
    torch.testing.assert_close(model[1].running_var, batch_vars.mean(0), rtol=1e-5, atol=1e-5)
    assert not model.training
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, digits_root):
    """iterate, 1 round, tested at 40 px: teacher, pseudolabel, student, finetune (iterate.finetune=final)."""
    d = tmp_path_factory.mktemp("tuned") / "run"
    run("stage=iterate", "iterate.rounds=1", f"run_dir={d}", f"data.root={digits_root}", *AT_40)
    return d


def test_finetune_trains_at_the_test_resolution_with_shallow_stages_frozen(tuned_run):
    s = read_json(tuned_run / "round_1/finetune/summary.json")
    info = read_json(tuned_run / "round_1/finetune/model.json")
    assert info["role"] == "finetune" and info["img_size"] == 32 and info["test_img_size"] == 40
    assert s["img_size"] == 40 and s["trained_at"] == 32 and s["steps"] == 8
    assert s["frozen"] == {"stages": 2, "of": 5, "frozen_params": s["frozen"]["frozen_params"],
                           "trained_params": s["frozen"]["trained_params"]}
    assert s["eval"]["images"] == 539
    assert s["batchnorm_reestimated"]["images"] == 112  # 100 labeled images at most: 7 batches of 16
    student = load_file(str(tuned_run / "round_1/student/model.safetensors"))
    tuned = load_file(str(tuned_run / "round_1/finetune/model.safetensors"))
    frozen = [k for k in tuned if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    trained = [k for k in tuned if k.startswith(("blocks.3.", "classifier.")) and "running" not in k]
    params = [k for k in frozen if "running" not in k and "num_batches" not in k]
    assert params and all(torch.equal(tuned[k], student[k]) for k in params)
    # the frozen stages' BatchNorm statistics are the ones measured at 40 px, not the student's
    assert not torch.equal(tuned["bn1.running_mean"], student["bn1.running_mean"])
    assert any(not torch.equal(tuned[k], student[k]) for k in trained)
    report = read_json(tuned_run / "report.json")
    assert [(r["round"], r["role"], r["eval_img_size"]) for r in report["rounds"]] == [
        (0, "teacher", 40), (1, "student", 40), (1, "finetune", 40)]
    assert "| 1 | finetune | test_efficientnet | 101,766 | 40 px |" in (tuned_run / "report.md").read_text()


def test_the_same_finetune_alone_inside_iterate_and_without_bn_pass(tuned_run, digits_root, tmp_path):
    weights = (tuned_run / "round_1/finetune/model.safetensors").read_bytes()
    alone = tmp_path / "alone"
    shutil.copytree(tuned_run, alone, ignore=shutil.ignore_patterns("finetune", "report.*", "accuracy.png"))
    run("stage=finetune", "round=1", f"run_dir={alone}", f"data.root={digits_root}", *AT_40)
    assert (alone / "round_1/finetune/model.safetensors").read_bytes() == weights
    # finetune.bn_images=0: the same training, only the BatchNorm statistics differ
    run("stage=finetune", "round=1", "force=true", "finetune.bn_images=0", f"run_dir={alone}",
        f"data.root={digits_root}", *AT_40)
    kept, reestimated = load_file(str(alone / "round_1/finetune/model.safetensors")), load_file(
        str(tuned_run / "round_1/finetune/model.safetensors"))
    stats = [k for k in kept if "running_" in k or "num_batches_tracked" in k]
    assert all(torch.equal(kept[k], reestimated[k]) for k in kept if k not in stats)
    assert all(not torch.equal(kept[k], reestimated[k]) for k in stats)


def test_export_and_predict_take_the_fine_tuned_model(tuned_run, digits_root, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(tuned_run, d)
    s = run("stage=export", f"run_dir={d}", f"data.root={digits_root}", "export.onnx=false", *AT_40)
    assert (s["round"], s["role"]) == (1, "finetune")
    assert read_json(d / "export/config.json")["pretrained_cfg"]["input_size"] == [3, 40, 40]
    card = (d / "export/README.md").read_text()
    assert "trained at 32 px, then fine-tuned at 40 px" in card and "drop_path_rate" in card
    assert run("stage=export", f"run_dir={d}", f"data.root={digits_root}", "export.onnx=false", "export.round=1",
               "force=true", *AT_40)["role"] == "finetune"


def test_a_model_tested_at_its_train_resolution_is_not_fine_tuned(tmp_path, digits_root, capsys):
    """The demo preset trains and tests at 32 px: stage=finetune refuses and says why; iterate leaves the step
    out and its report says so."""
    r = run("stage=iterate", "iterate.rounds=1", f"run_dir={tmp_path}", f"data.root={digits_root}", *SHORT)
    assert not (tmp_path / "round_1/finetune").exists()
    note = read_json(tmp_path / "report.json")["notes"]
    assert len(note) == 1 and "round 1 is not fine-tuned" in note[0] and "32 px" in note[0]
    assert r["notes"] == note and note[0] in (tmp_path / "report.md").read_text()
    with pytest.raises(ConfigError, match=r"test_img_size = img_size.*finetune.img_size"):
        run("stage=finetune", "round=1", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST)
    with pytest.raises(ConfigError, match="iterate.finetune='last'"):
        run("stage=iterate", "iterate.finetune=last", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST)
    with pytest.raises(ConfigError, match="K >= 1"):
        run("stage=finetune", "round=0", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST)
    # finetune.img_size picks a test resolution after training
    s = run("stage=finetune", "round=1", "finetune.img_size=36", "max_steps=2", f"run_dir={tmp_path}",
            f"data.root={digits_root}", *FAST)
    assert s["img_size"] == 36 and s["model"]["test_img_size"] == 36


@pytest.mark.slow
def test_sigterm_in_the_finetune_then_rerun_resumes(tuned_run, digits_root, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(tuned_run, d, ignore=shutil.ignore_patterns("finetune"))
    args = ["stage=finetune", "round=1", f"run_dir={d}", f"data.root={digits_root}", *AT_40, "max_steps=null",
            "train.batch_size=4", "finetune.epochs=20", "train.ckpt_every_steps=5", "num_workers=1"]
    proc = subprocess.Popen([sys.executable, "-m", "noisystudent", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = d / "round_1/finetune/checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
    assert not (d / "round_1/finetune/_SUCCESS").exists()
    run(*args, f"max_steps={stopped + 2}")
    s = json.loads((d / "round_1/finetune/summary.json").read_text())
    assert s["resumed_from_step"] == stopped and s["steps"] == stopped + 2
