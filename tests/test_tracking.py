"""What a training step reports while it runs (metrics.jsonl, TensorBoard through accelerate's tracker) and
the composed config saved beside every step's summary."""

from __future__ import annotations

import importlib.util
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, run
from omegaconf import OmegaConf

from noisystudent.errors import ConfigError
from noisystudent.files import read_json
from noisystudent.training.tracking import MetricsLog, read_metrics

HAVE_TB = importlib.util.find_spec("tensorboard") is not None


def _scalars(step_dir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(step_dir / "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_metrics_at_the_log_interval_and_the_config_beside_the_summary(teacher_run):
    step_dir = teacher_run / "teacher"
    records = read_metrics(step_dir)
    # 100 labeled images / batch 16: 7 steps an epoch, 12 epochs; train.log_every_steps=20 and the last step
    assert [r["step"] for r in records] == [20, 40, 60, 80, 84]
    for r in records:
        assert set(r) == {"step", "epoch", "loss", "loss_labeled", "lr", "images_per_sec", "data_wait_fraction",
                          "grad_norm"}
        assert r["epoch"] == pytest.approx(r["step"] / 7)
        assert r["loss"] == pytest.approx(r["loss_labeled"]) and math.isfinite(r["loss"])
        assert r["lr"] > 0 and r["images_per_sec"] > 0 and 0 <= r["data_wait_fraction"] <= 1
        assert r["grad_norm"] > 0 and math.isfinite(r["grad_norm"])
    assert records[-1]["loss"] == pytest.approx(read_json(step_dir / "summary.json")["final_loss"])
    cfg = OmegaConf.load(step_dir / "config.yaml")
    assert cfg.stage.name == "teacher" and cfg.run_dir == str(teacher_run) and cfg.train.batch_size == 16
    assert "${" not in (step_dir / "config.yaml").read_text()  # resolved
    if not HAVE_TB:
        pytest.skip("tensorboard is not installed (pip install 'noisystudent[track]')")
    assert _scalars(step_dir, "loss") == [20, 40, 60, 80, 84]
    assert _scalars(step_dir, "data_wait_fraction") == [20, 40, 60, 80, 84]


def test_a_resumed_log_drops_what_was_logged_after_the_checkpoint(tmp_path):
    """A run killed after logging steps past its checkpoint resumes at the checkpoint: those records go."""
    first = MetricsLog(tmp_path, "tensorboard" if HAVE_TB else "none", None, main=True)
    for step in (2, 4, 6, 8):
        first.log({"step": step, "loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 10, "lo')  # a line cut by the kill
    resumed = MetricsLog(tmp_path, "tensorboard" if HAVE_TB else "none", 5, main=True)
    for step in (6, 8, 10):
        resumed.log({"step": step, "loss": -float(step)})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(2, 2.0), (4, 4.0), (6, -6.0), (8, -8.0),
                                                                        (10, -10.0)]
    if HAVE_TB:
        assert _scalars(tmp_path, "loss") == [2, 4, 6, 8, 10]
    MetricsLog(tmp_path, "none", None, main=True).close()  # a fresh start begins an empty file
    assert read_metrics(tmp_path) == []


@pytest.mark.slow
def test_a_killed_and_resumed_step_logs_each_step_once(tmp_path, digits_root):
    args = ["stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST, "train.epochs=12",
            "train.ckpt_every_steps=10", "train.log_every_steps=3", "num_workers=0"]
    proc = subprocess.Popen([sys.executable, "-m", "noisystudent", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    step_dir = tmp_path / "teacher"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(read_metrics(step_dir)) < 6:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(step_dir / "checkpoint.pt", weights_only=True)["step"]
    run(*args)
    expected = list(range(3, 12 * 7 + 1, 3))  # 84 steps: the last one is a log step too
    assert [r["step"] for r in read_metrics(step_dir)] == expected
    assert read_json(step_dir / "summary.json")["resumed_from_step"] == saved
    if HAVE_TB:
        assert _scalars(step_dir, "loss") == expected


def test_tracking_settings(tmp_path, digits_root):
    with pytest.raises(ConfigError, match="tracking='csv'"):
        run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST, "tracking=csv")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="tracking=wandb: the wandb package is not installed"):
            run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST, "tracking=wandb")
    run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST, "tracking=none", "max_steps=3")
    assert not (tmp_path / "teacher/tensorboard").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "teacher")] == [3]
