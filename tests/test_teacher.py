"""The teacher stage: it learns, it is skipped once finished, and it resumes after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import FAST, cli, run

from noisystudent.data.labels import LabelFile
from noisystudent.files import read_json
from noisystudent.models.build import load_exported_model
from noisystudent.training.engine import CHECKPOINT, load_checkpoint


def test_teacher_learns_and_writes_its_step(teacher_run):
    out = teacher_run / "teacher"
    for name in ("_SUCCESS", "summary.json", "model.safetensors", "model.json", CHECKPOINT):
        assert (out / name).exists(), name
    s = read_json(out / "summary.json")
    # 10 classes: chance is 0.1; a few dozen steps on 100 labeled digits get far above it
    assert s["top1"] > 0.4, s["top1"]
    assert s["top5"] > s["top1"]
    assert s["eval"]["images"] == 539
    for key in ("epochs", "images_per_sec", "wall_s", "config_hash", "steps", "corrupt_skipped"):
        assert key in s
    ckpt = load_checkpoint(out / CHECKPOINT)  # weights_only=True
    assert ckpt["step"] == s["steps"]
    assert set(ckpt) >= {"model", "model_ema", "optimizer", "scheduler", "step"}


def test_finished_step_is_skipped_unless_forced(teacher_copy, digits_root):
    summary = teacher_copy / "teacher" / "summary.json"
    before = summary.read_text()
    mtime = summary.stat().st_mtime_ns
    run("stage=teacher", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST)
    assert summary.stat().st_mtime_ns == mtime and summary.read_text() == before
    run("stage=teacher", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, "max_steps=3", "force=true")
    assert read_json(summary)["steps"] == 3
    assert read_json(summary)["resumed_from_step"] is None


@pytest.mark.slow
def test_resume_after_kill_continues_at_saved_step(tmp_path, digits_root):
    """SIGKILL a real training process after its first checkpoint, rerun: it resumes there."""
    # 10 epochs: the kill comes at the first checkpoint (step 7, an epoch end), the rerun trains the rest
    args = ["stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST, "train.epochs=10",
            "train.ckpt_every_steps=10", "num_workers=0"]
    proc = subprocess.Popen([sys.executable, "-m", "noisystudent", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "teacher" / CHECKPOINT
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "teacher" / "_SUCCESS").exists()
    saved = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < saved < 10 * 7  # a checkpoint every 10 steps and at every epoch end (7 steps)
    run(*args)
    s = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    assert s["resumed_from_step"] == saved
    assert s["steps"] == 10 * 7  # 100 labeled / batch 16 -> 7 steps an epoch, all of them done


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits(tmp_path, digits_root):
    """What a scheduler's preemption / requeue sends, to the whole process group (loader workers
    included): the loop saves at the step it is in and exits 143."""
    args = ["stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST, "train.batch_size=4",
            "train.epochs=40", "train.ckpt_every_steps=100000", "num_workers=2"]
    proc = subprocess.Popen([sys.executable, "-m", "noisystudent", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpt = tmp_path / "teacher" / CHECKPOINT
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-6000:]
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
    assert torch.load(ckpt, weights_only=True)["step"] == stopped  # saved where it stopped, not at an epoch end
    run(*args, "max_steps=" + str(stopped + 3))
    s = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    assert s["resumed_from_step"] == stopped and s["steps"] == stopped + 3


def test_same_seed_same_run(tmp_path, digits_root):
    """Shuffle buffers, shard draws, augmentation and init all follow `seed`: two runs agree exactly."""
    results = []
    for name in ("a", "b", "c"):
        seed = "seed=7" if name != "c" else "seed=8"
        run("stage=teacher", f"run_dir={tmp_path / name}", f"data.root={digits_root}", *FAST, "max_steps=15",
            "num_workers=2", seed)
        s = read_json(tmp_path / name / "teacher" / "summary.json")
        results.append((s["final_loss"], s["top1"], (tmp_path / name / "teacher" / "model.safetensors").read_bytes()))
    assert results[0] == results[1]
    assert results[0][2] != results[2][2]


@pytest.mark.slow
def test_gpu_levers_run_on_cpu_and_leave_plain_weights(tmp_path, digits_root, teacher_run):
    """train.compile, precision=bf16 and channels_last=true, set explicitly on a CPU (where auto means off):
    the teacher trains under them, the summary says what ran, and the checkpoint and exported weights
    are a plain timm model's (no compile wrapper names). auto resolves to no / false on a CPU.
    pseudolabel.compile labels as the eager model does."""
    d = tmp_path / "run"
    # the command line: a process of its own (accelerate's precision is fixed once per process). The step is
    # compiled with the aot_eager backend: dynamo and AOTAutograd trace it (forward and backward) as for
    # inductor, without inductor's C++ code generation, which is torch's own part and cost 40 s here on a
    # cold cache; inductor itself is run below, by pseudolabel.compile.
    cli("stage=teacher", f"run_dir={d}", f"data.root={digits_root}", *FAST, "max_steps=3", "train.compile=aot_eager",
        "precision=bf16", "channels_last=true", check=True)
    s = read_json(d / "teacher" / "summary.json")
    assert (s["precision"], s["channels_last"], s["compile"], s["steps"]) == ("bf16", True, "aot_eager", 3)
    assert s["settings"]["precision"] == "bf16" and s["settings"]["train.compile"] == "aot_eager"
    import timm

    plain = set(timm.create_model("test_efficientnet", num_classes=10).state_dict())
    state = torch.load(d / "teacher" / CHECKPOINT, weights_only=True)
    # model_ema: timm's EMA module's state dict (its `module.` prefix is what timm's loader strips)
    assert set(state["model"]) == plain and {k.removeprefix("module.") for k in state["model_ema"]} == plain
    model, _ = load_exported_model(d / "teacher", "")  # strict load into a fresh timm model
    assert set(model.state_dict()) == plain
    default = read_json(teacher_run / "teacher" / "summary.json")  # precision=auto, channels_last=auto
    auto = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    assert (default["precision"], default["channels_last"], default["compile"]) == (auto, torch.cuda.is_available(),
                                                                                    None)
    assert default["settings"]["precision"] == auto
    # pseudolabel.compile on the same model: the labels of the eager model, within float rounding (in this
    # process: labeling runs at the default precision, so it needs no process of its own)
    labels = {}
    for compiled in ("true", "false"):
        run("stage=pseudolabel", f"run_dir={d}", f"data.root={digits_root}", *FAST, "force=true",
            f"pseudolabel.compile={compiled}", "data.unlabeled=" + str(digits_root / "unlabeled-000000.tar"))
        summary = read_json(d / "round_1" / "pseudolabel" / "summary.json")
        assert summary["inference"]["compile"] is (compiled == "true")
        labels[compiled] = LabelFile(d / "round_1/pseudolabel/labels/unlabeled-000000.labels.safetensors")
    assert labels["true"].keys() == labels["false"].keys()
    assert np.abs(labels["true"]["confidence"] - labels["false"]["confidence"]).max() < 1e-3
