"""The training loop itself: the same weights as a plain loop, and no read of a device value between log
intervals (which on a GPU would make every step wait for the device), with one process and with two."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TESTS_ON_PATH, accelerate_launch, launch_env, make_cfg
from device_reads import counted_job, recording_reads, synthetic_batches
from timm.utils import ModelEmaV3

from noisystudent.config import learning_rate, train_settings
from noisystudent.data.transforms import InputNormalizer, model_norm
from noisystudent.training import engine
from noisystudent.training.losses import noisy_student_loss


def _settings(*overrides):
    return train_settings(make_cfg("train.batch_size=4", "train.ckpt_every_steps=100000", "num_workers=0",
                                   "channels_last=false", "train.grad_clip=1.0", *overrides))


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _plain_loop(model, s, steps_per_epoch, total_steps):
    """What a training loop written out by hand does with the same timm parts: the reference."""
    opt = engine._optimizer(model, s.optim, learning_rate(s.optim, s.batch_size))
    sched = engine._scheduler(opt, s.sched, s.epochs, steps_per_epoch)
    ema = ModelEmaV3(model, decay=s.ema_decay, use_warmup=s.ema_warmup)
    normalize = InputNormalizer(*model_norm(model), channels_last=False)
    batches = synthetic_batches(4, s.batch_size, 32, 7)(s.seed * 1_000_003)
    model.train()
    step = 0
    while step < total_steps:
        b = next(batches)
        if b["images"].numel() == 0:
            continue
        loss, _ = noisy_student_loss(model(normalize(b["images"])), b["labels"], None, s.label_smoothing, 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        sched.step_update(num_updates=step)
        ema.update(model, step=step)
    return model, ema.module


def test_fit_gives_the_weights_of_a_plain_loop(tmp_path):
    """Batches one step ahead on the device, losses summed there and read at the log interval, the stop
    agreed on there: none of it may change what is computed."""
    s = _settings("max_steps=9", "train.log_every_steps=4")
    job = counted_job(tmp_path / "fit", s, {"step": 0}, steps_per_epoch=50)
    start = copy.deepcopy(job.model)
    torch.manual_seed(0)
    ema_model, summary = engine.fit(_accelerator(), job)
    torch.manual_seed(0)
    ref_model, ref_ema = _plain_loop(start, s, 50, 9)
    assert summary["steps"] == 9 and summary["corrupt_skipped"] == 4  # one empty batch of 4 skipped, counted
    for (name, a), b in zip(ema_model.state_dict().items(), ref_ema.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    trained = engine.load_checkpoint(tmp_path / "fit" / engine.CHECKPOINT)["model"]
    for (name, a), b in zip(trained.items(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _steps_with_reads(reads, log_every, total):
    """The steps at which a device value was read, other than the log steps (and set-up / the end)."""
    allowed = {0, total} | set(range(log_every, total + 1, log_every))
    return sorted({(step, where) for step, where in reads if step not in allowed})


def test_no_device_read_between_log_intervals(tmp_path):
    s = _settings("max_steps=12", "train.log_every_steps=5")
    counter = {"step": 0}
    job = counted_job(tmp_path / "fit", s, counter)
    with recording_reads(counter):
        engine.fit(_accelerator(), job)
    assert counter["step"] == 12
    assert _steps_with_reads(counter["reads"], 5, 12) == []
    # the probe sees the reads that are there: the losses at each log interval
    assert {step for step, _ in counter["reads"]} >= {5, 10, 12}


def test_probe_catches_a_read_in_every_step(tmp_path):
    """The check above can fail: a loss that reads its value every step is caught."""
    s = _settings("max_steps=6", "train.log_every_steps=5")
    counter = {"step": 0}
    job = counted_job(tmp_path / "fit", s, counter)
    counted = job.loss

    def reading_loss(logits, b):
        loss, parts = counted(logits, b)
        float(loss.detach())
        return loss, parts

    job.loss = reading_loss
    with recording_reads(counter):
        engine.fit(_accelerator(), job)
    assert [step for step, _ in _steps_with_reads(counter["reads"], 5, 6)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_processes_read_the_device_only_at_log_intervals(tmp_path):
    """With several processes the SIGTERM agreement is an all-reduce read on the host: at the log interval only."""
    env = launch_env(PYTHONPATH=TESTS_ON_PATH)
    proc = subprocess.run([*accelerate_launch(), str(Path(__file__).parent / "device_reads.py"),
                           str(tmp_path), "11", "4"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        counter = json.loads((tmp_path / f"reads-{rank}.json").read_text())
        assert counter["step"] == 11
        assert _steps_with_reads(counter["reads"], 4, 11) == []
        assert {step for step, _ in counter["reads"]} >= {4, 8, 11}


@pytest.mark.parametrize("value,cuda,bf16,expected", [
    ("auto", False, False, "no"), ("auto", True, True, "bf16"), ("auto", True, False, "no"),
    ("fp16", True, True, "fp16"), ("bf16", False, False, "bf16"), ("no", True, True, "no")])
def test_precision_auto_and_explicit(value, cuda, bf16, expected):
    from noisystudent.config import resolve_precision

    assert resolve_precision(value, cuda, bf16) == expected
