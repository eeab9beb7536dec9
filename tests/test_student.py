"""The noised student, the iterated loop and the report."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, run

from noisystudent.errors import ConfigError, DataError, MissingInputError
from noisystudent.files import read_json
from noisystudent.training.losses import noisy_student_loss


def test_mixed_loss_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g)
    labels = torch.tensor([0, 3, 4])
    targets = torch.softmax(torch.randn(4, 5, generator=g), dim=1)
    loss, parts = noisy_student_loss(logits, labels, targets, smoothing=0.1, unlabeled_weight=0.7)
    # by hand: smoothed CE on the first 3 rows, soft CE on the last 4
    logp = torch.log_softmax(logits, dim=1)
    smooth = torch.full((3, 5), 0.1 / 5)
    smooth[torch.arange(3), labels] += 0.9
    sup = -(smooth * logp[:3]).sum(1).mean()
    unsup = -(targets * logp[3:]).sum(1).mean()
    assert torch.allclose(loss, sup + 0.7 * unsup, atol=1e-6)
    assert torch.allclose(parts["loss_labeled"], sup, atol=1e-6)
    assert torch.allclose(parts["loss_unlabeled"], unsup, atol=1e-6)
    only_sup, _ = noisy_student_loss(logits[:3], labels, None, 0.0, 1.0)
    assert torch.allclose(only_sup, F.cross_entropy(logits[:3], labels))


@pytest.fixture(scope="module")
def labeled_run(tmp_path_factory, teacher_run, digits_root):
    """A run_dir with teacher + round-1 pseudo-labels (module-wide; tests copy it)."""
    d = tmp_path_factory.mktemp("pl") / "run"
    shutil.copytree(teacher_run, d)
    run("stage=pseudolabel", f"run_dir={d}", f"data.root={digits_root}", *FAST)
    return d


def _student(run_dir, digits_root, *extra):
    return run("stage=student", f"run_dir={run_dir}", f"data.root={digits_root}", *FAST, *extra)


def test_student_trains_with_noise_recorded(labeled_run, digits_root, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(labeled_run, d)
    s = _student(d, digits_root, "max_steps=12", "student.unlabel_ratio=2", "student.drop_rate=0.3")
    out = d / "round_1" / "student"
    for name in ("_SUCCESS", "summary.json", "model.safetensors", "checkpoint.pt"):
        assert (out / name).exists()
    assert s["noise"] == {"randaugment": "rand-n2-m27-mmax27", "drop_rate": 0.3, "drop_path_rate": 0.1}
    assert s["unlabeled_batch"] == 32 and s["steps"] == 12
    assert s["images_seen"] == 12 * (16 + 32)  # one forward over [labeled | 2 x pseudo-labeled]
    assert s["teacher"]["role"] == "teacher" and s["model"]["params"] >= s["teacher"]["params"]


def test_equal_or_larger_check(tmp_path, digits_root):
    common = [f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST]
    run("stage=teacher", *common, "model.name=test_resnet", "max_steps=2")  # 373,658 parameters
    run("stage=pseudolabel", *common, "pseudolabel.threshold=0.01")  # a 2-step teacher is unsure of everything
    with pytest.raises(ConfigError, match=r"student test_efficientnet has 101,766 parameters, fewer than its "
                                          r"teacher test_resnet \(373,658\).*student.allow_smaller=true"):
        run("stage=student", *common, "student.model=test_efficientnet")
    s = run("stage=student", *common, "student.model=test_efficientnet", "student.allow_smaller=true", "max_steps=2")
    assert s["model"]["name"] == "test_efficientnet"
    # equal is allowed, and the larger student starts from the teacher's weights where shapes match
    s = run("stage=student", *common, "student.model=test_resnet", "student.init=teacher", "max_steps=2",
            "force=true")
    assert s["model"]["params"] == s["teacher"]["params"] and s["init"] == "teacher"


def test_recipe_small_gives_the_larger_student_and_milder_noise(labeled_run, digits_root, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(labeled_run, d)
    s = _student(d, digits_root, "recipe=small", "max_steps=2")
    assert s["model"]["name"] == "test_resnet" and s["model"]["params"] > 3 * s["teacher"]["params"]
    # the student takes the teacher preset's resolution and noise; only RandAugment's magnitude drops
    assert s["noise"] == {"randaugment": "rand-n2-m9-mmax27", "drop_rate": 0.2, "drop_path_rate": 0.1}
    assert s["model"]["img_size"] == 32
    # round 1's student is larger than its teacher: teacher_if_same (the recipe's) starts it from scratch
    assert s["init"] == "scratch"
    # the command line still wins over the recipe
    s = _student(d, digits_root, "recipe=small", "student.randaugment=rand-n1-m5", "max_steps=2", "force=true")
    assert s["noise"]["randaugment"] == "rand-n1-m5" and s["model"]["name"] == "test_resnet"


def test_student_input_errors(teacher_copy, labeled_run, digits_root, tmp_path):
    with pytest.raises(MissingInputError, match=r"no pseudo-labels for round 1.*stage=pseudolabel"):
        _student(teacher_copy, digits_root)
    d = tmp_path / "labeled"
    shutil.copytree(labeled_run, d)
    with pytest.raises(ConfigError, match="selection .* holds 10 classes but data.num_classes=12"):
        _student(d, digits_root, "data.num_classes=12")
    sel = d / "round_1" / "pseudolabel" / "selection.json"
    j = read_json(sel)
    j["counts_after"] = [0] * 10
    sel.write_text(__import__("json").dumps(j))
    with pytest.raises(DataError, match=r"selection is empty.*pseudolabel.threshold"):
        _student(d, digits_root)


def test_stream_applies_the_selection(labeled_run, digits_root):
    """The pseudo-labeled stream holds each image as many times as the selection says."""
    import webdataset as wds

    from noisystudent.data.labels import label_paths
    from noisystudent.data.shards import expand_shards
    from noisystudent.data.streams import JoinPseudoLabels
    from noisystudent.pseudolabels.selection import Selection

    pl = labeled_run / "round_1" / "pseudolabel"
    sel_json = read_json(pl / "selection.json")
    urls = expand_shards(str(digits_root / "unlabeled-{000000..000003}.tar"), "x")
    join = JoinPseudoLabels(label_paths(urls, pl / "labels"), Selection.from_json(sel_json), 10)
    counts = np.zeros(10, int)
    for sample in join(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())):
        t = sample["target"]
        assert abs(float(t.sum()) - 1) < 1e-4
        counts[int(t.argmax())] += 1
    assert counts.tolist() == sel_json["counts_after"]


@pytest.mark.slow
def test_iterate_one_round_end_to_end(tmp_path, digits_root, capsys):
    r = run("stage=iterate", "iterate.rounds=1", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST)
    for p in ("teacher/_SUCCESS", "round_1/pseudolabel/_SUCCESS", "round_1/student/_SUCCESS", "report.json",
              "report.md", "accuracy.png", "training_curves.png"):
        assert (tmp_path / p).exists(), p
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training curves](training_curves.png)" in (tmp_path / "report.md").read_text()
    report = read_json(tmp_path / "report.json")
    assert [row["round"] for row in report["rounds"]] == [0, 1]
    assert report["rounds"][1]["gain_over_teacher"] == pytest.approx(
        report["rounds"][1]["top1"] - report["rounds"][0]["top1"])
    assert "| 1 | student | test_efficientnet |" in capsys.readouterr().out
    assert r["rounds"][1]["params"] == report["rounds"][1]["params"]
    # stage=evaluate re-measures every finished model and agrees with what the steps recorded
    ev = run("stage=evaluate", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST)
    assert [round(x["top1"], 6) for x in ev["rounds"]] == [round(x["top1"], 6) for x in report["rounds"]]


@pytest.mark.slow
def test_a_step_gives_the_same_model_however_it_is_launched(tmp_path, digits_root):
    """Each step seeds itself from (seed, step, round, rank): the round-1 student trained inside iterate,
    alone (as the Slurm recipe runs it), or by an iterate rerun after its teacher, is the same, byte for byte."""
    common = [f"data.root={digits_root}", *FAST, "max_steps=8", "pseudolabel.threshold=0.12"]
    ref = tmp_path / "ref"
    run("stage=iterate", "iterate.rounds=1", f"run_dir={ref}", *common)
    weights = (ref / "round_1/student/model.safetensors").read_bytes()
    alone = tmp_path / "alone"
    shutil.copytree(ref, alone, ignore=shutil.ignore_patterns("student", "report.*", "accuracy.png"))
    run("stage=student", f"run_dir={alone}", *common)
    assert (alone / "round_1/student/model.safetensors").read_bytes() == weights
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed, ignore=shutil.ignore_patterns("round_1", "report.*", "accuracy.png"))
    run("stage=iterate", "iterate.rounds=1", f"run_dir={resumed}", *common)
    assert (resumed / "round_1/student/model.safetensors").read_bytes() == weights
    assert (resumed / "teacher/summary.json").read_bytes() == (ref / "teacher/summary.json").read_bytes()


def test_iterate_models_per_round(tmp_path, digits_root):
    from conftest import make_cfg

    from noisystudent.models.presets import student_model

    cfg = make_cfg("iterate.models=[demo,efficientnet_b0,resnet50]")
    assert [student_model(cfg, k).name for k in (1, 2, 3, 4)] == [
        "test_efficientnet", "efficientnet_b0", "resnet50", "resnet50"]
    assert student_model(make_cfg("iterate.models=[test_resnet]"), 1).img_size == 32  # a plain timm name


@pytest.mark.slow
def test_killed_iterate_resumes_to_the_same_files(tmp_path, digits_root, teacher_run):
    """SIGKILL stage=iterate during round 1's student, rerun: it finishes, the steps done before the kill
    are not redone, and the file set equals an uninterrupted run's. Both runs start from the shared finished
    teacher (the loop skips it: its settings are FAST's), so the kill meets the pseudo-labels and the student."""
    args = ["stage=iterate", "iterate.rounds=1", f"data.root={digits_root}", *FAST, "num_workers=0"]
    ref = tmp_path / "ref"
    shutil.copytree(teacher_run, ref)
    run(*args, f"run_dir={ref}")
    d = tmp_path / "killed"
    shutil.copytree(teacher_run, d)
    proc = subprocess.Popen([sys.executable, "-m", "noisystudent", *args, f"run_dir={d}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = d / "round_1" / "student" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ckpt.exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (d / "round_1" / "student" / "_SUCCESS").exists()
    teacher_summary = (d / "teacher" / "summary.json").read_bytes()
    labels = {p.name: p.read_bytes() for p in (d / "round_1/pseudolabel/labels").iterdir()}
    saved_step = torch.load(ckpt, weights_only=True)["step"]
    run(*args, f"run_dir={d}")
    assert (d / "teacher" / "summary.json").read_bytes() == teacher_summary  # not retrained
    assert {p.name: p.read_bytes() for p in (d / "round_1/pseudolabel/labels").iterdir()} == labels
    assert read_json(d / "round_1/student/summary.json")["resumed_from_step"] == saved_step

    def files(root):
        # TensorBoard names its event files by time and process, and a resumed step adds one: the folder counts
        return sorted({str(p.relative_to(root).parent if "tensorboard" in p.parts else p.relative_to(root))
                       for p in root.rglob("*") if p.is_file() and "data" not in p.parts})

    assert files(d) == files(ref)
