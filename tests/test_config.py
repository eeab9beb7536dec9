"""Config composition as the CLI does it, and the CLI's help and config errors."""

from __future__ import annotations

import pytest
from conftest import cli, make_cfg, run

from noisystudent.config import changed_settings, learning_rate, settings_hash, train_settings
from noisystudent.errors import ConfigError
from noisystudent.stages import STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes(stage):
    cfg = make_cfg(f"stage={stage}", "run_dir=/tmp/x")
    assert cfg.stage.name == stage
    assert cfg.data.labeled == "/tmp/x/data/digits/labeled-{000000..000000}.tar"
    assert cfg.data.num_classes == 10
    assert cfg.model.name == "test_efficientnet"


def test_presets_carry_the_published_values():
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


def test_a_recipe_is_opt_in_and_the_command_line_wins_over_it():
    plain, small = make_cfg(), make_cfg("recipe=small")
    assert (plain.student.model, plain.student.randaugment, plain.student.init) == (
        None, "rand-n2-m27-mmax27", "scratch")
    assert (small.student.model, small.student.randaugment, small.student.init) == (
        "test_resnet", "rand-n2-m9-mmax27", "teacher_if_same")
    # only those three keys move; no `recipe` key lands in the config (step settings hashes stay as they were)
    assert "recipe" not in small
    assert {**small.student, "model": None, "randaugment": plain.student.randaugment,
            "init": plain.student.init} == dict(plain.student)
    assert make_cfg("recipe=small", "student.model=test_efficientnet").student.model == "test_efficientnet"


def test_lr_scales_with_global_batch():
    opt = make_cfg("optim=rmsproptf").optim
    assert learning_rate(opt, 256) == pytest.approx(0.016)
    assert learning_rate(opt, 2048) == pytest.approx(0.128)
    assert learning_rate(make_cfg("optim.lr=0.5").optim, 4096) == 0.5


def test_step_settings_hold_only_the_keys_the_step_reads():
    from noisystudent.stages import pseudolabel, student, teacher

    base = make_cfg("run_dir=/a")
    # how a step runs (workers, resume, force, where) and what other steps read change nothing
    same = make_cfg("run_dir=/a", "num_workers=3", "force=true", "resume=never", "iterate.rounds=7",
                    "train.log_every_steps=3", "pseudolabel.threshold=0.5", "student.epochs=3")
    assert teacher.STEP.reads(base) == teacher.STEP.reads(same)
    assert settings_hash(teacher.STEP.reads(base)) == settings_hash(teacher.STEP.reads(same))
    changed = make_cfg("run_dir=/a", "train.epochs=7", "optim.lr=0.1")
    assert changed_settings(teacher.STEP.reads(base), teacher.STEP.reads(changed)) == [
        "optim.lr (0.002 -> 0.1)", "train.epochs (60 -> 7)"]
    # the student reads its own epochs, not the teacher's RandAugment; pseudolabel reads its threshold
    assert student.STEP.reads(base) == student.STEP.reads(make_cfg("run_dir=/a", "train.randaugment=null",
                                                                   "train.epochs=5"))
    assert student.STEP.reads(base) != student.STEP.reads(make_cfg("run_dir=/a", "student.epochs=5"))
    # ...unless the student's own is null: then the teacher's RandAugment is the student's noise too
    inherit = make_cfg("run_dir=/a", "student.randaugment=null")
    assert student.STEP.reads(inherit) != student.STEP.reads(make_cfg("run_dir=/a", "student.randaugment=null",
                                                                      "train.randaugment=null"))
    assert pseudolabel.STEP.reads(base) != pseudolabel.STEP.reads(make_cfg("run_dir=/a", "pseudolabel.threshold=0.5"))


def test_train_settings_are_checked_and_student_keys_override():
    s = train_settings(make_cfg("student.ema_decay=0.99", "student.grad_clip=1.0", "channels_last=false"),
                       overrides="student")
    assert (s.epochs, s.randaugment, s.ema_decay, s.grad_clip) == (20.0, "rand-n2-m27-mmax27", 0.99, 1.0)
    t = train_settings(make_cfg("channels_last=false"))
    assert (t.epochs, t.randaugment, t.ema_decay, t.grad_clip) == (60.0, "rand-n2-m9-mmax27", 0.9999, None)
    for override, key in (("student.epochs=0", "student.epochs"), ("train.ema_decay=1.5", "train.ema_decay"),
                          ("student.grad_clip=-1", "student.grad_clip"), ("train.batch_size=0", "train.batch_size"),
                          ("resume=sometimes", "resume"), ("max_steps=0", "max_steps")):
        with pytest.raises(ConfigError, match=key):
            train_settings(make_cfg(override, "channels_last=false"), overrides="student")


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


def test_device_settings_resolve_auto_for_the_device_and_explicit_values_win():
    from noisystudent.config import dali_available, resolve_device_settings

    # decode=auto is the CPU path on every device (measured faster on an H100); the loader is DALI on CUDA
    # where it is installed
    cuda_loader = "dali" if dali_available() else "torch"
    for device, expected in (("cpu", (False, "cpu", "torch")), ("cuda", (True, "cpu", cuda_loader))):
        cfg = make_cfg()
        assert (cfg.precision, cfg.channels_last, cfg.pseudolabel.decode, cfg.data.loader) == ("auto",) * 4
        resolve_device_settings(cfg, "no", device)
        assert (cfg.channels_last, cfg.pseudolabel.decode, cfg.data.loader) == expected
        cfg = make_cfg("channels_last=false", "pseudolabel.decode=cpu")
        resolve_device_settings(cfg, "bf16", device)
        assert (cfg.precision, cfg.channels_last, cfg.pseudolabel.decode) == ("bf16", False, "cpu")
    with pytest.raises(ConfigError, match="channels_last='sometimes'"):
        resolve_device_settings(make_cfg("channels_last=sometimes"), "no", "cpu")
    with pytest.raises(ConfigError, match="channels_last='auto' is not resolved"):
        train_settings(make_cfg())


@pytest.mark.parametrize("override,key", [("precision=fp8", "precision='fp8'"),
                                          ("pseudolabel.decode=nvjpeg", "pseudolabel.decode='nvjpeg'")])
def test_device_setting_errors_name_the_key(override, key, tmp_path):
    proc = cli("stage=pseudolabel", f"run_dir={tmp_path}", override)
    assert proc.returncode == 2 and key in proc.stderr, proc.stderr[-2000:]


def test_train_compile_takes_a_backend(tmp_path, digits_root):
    from noisystudent.config import compile_backend

    assert [compile_backend(v, "train.compile") for v in (False, None, True, "inductor", "aot_eager")] == [
        None, None, "inductor", "inductor", "aot_eager"]
    # a typo is not taken for true (bool("inductr") would be), and the error lists backends to pick from
    with pytest.raises(ConfigError, match=r"train.compile='inductr': use false, true .*inductor, aot_eager"):
        run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", "train.compile=inductr")


def test_student_init_teacher_if_same_resolves_per_round_and_keeps_finished_rounds():
    from noisystudent.stages import student

    def resolved(*over):
        cfg = make_cfg("run_dir=/a", *over)
        if cfg.student.init not in student.INIT_CHOICES:
            student.settings(cfg)  # refuses it
        return student.resolved_init(cfg, int(cfg.round)), settings_hash(student.reads(cfg))

    # recipe=small (whose default it is): round 1's student (test_resnet) is not its teacher's model
    # (test_efficientnet), so round 1 is the paper's scratch student, settings hash included; round 2's is
    scratch1, h1 = resolved("recipe=small", "round=1", "student.init=scratch")
    assert scratch1 == "scratch"
    assert resolved("recipe=small", "round=1") == (scratch1, h1)
    init2, h2 = resolved("recipe=small", "round=2")
    assert init2 == "teacher" and h2 != resolved("recipe=small", "round=2", "student.init=scratch")[1]
    assert h2 == resolved("recipe=small", "round=2", "student.init=teacher")[1]
    # the defaults' student is the teacher's model in every round
    assert resolved("round=1", "student.init=teacher_if_same")[0] == "teacher"
    with pytest.raises(ConfigError, match=r"student.init='warm': use scratch .*teacher_if_same"):
        resolved("student.init=warm")
