"""student.targets=online: the teacher's probabilities on the student's own augmented batch."""

from __future__ import annotations

import shutil

import pytest
import timm
import torch
from accelerate import Accelerator
from conftest import FAST, run

from noisystudent.data.transforms import InputNormalizer, model_norm
from noisystudent.errors import ConfigError
from noisystudent.training.online_targets import OnlineTargets


def _models():
    torch.manual_seed(0)
    teacher = timm.create_model("test_efficientnet", num_classes=10).eval()
    with torch.no_grad():
        teacher.get_classifier().weight.mul_(20)  # confident enough that temperature and argmax matter
    student = timm.create_model("test_efficientnet", num_classes=10)
    # a student normalized otherwise than its teacher: the targets must still be the teacher's own view
    student.pretrained_cfg = {**student.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    return teacher, student


@pytest.mark.parametrize("temperature,hard,weights", [(1.0, False, None), (2.0, False, None), (1.0, True, None),
                                                     (1.0, False, [0.2] * 5 + [3.0] * 5)])
def test_online_targets_are_the_teachers_softmax_on_the_same_images(temperature, hard, weights):
    """... corrected by the selection's class weights where it has them (pseudolabel.prior_correction)."""
    teacher, student = _models()
    raw = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    as_student = InputNormalizer(*model_norm(student), channels_last=False)(raw)
    targets = OnlineTargets(teacher, student, Accelerator(cpu=True), temperature, hard, weights)(as_student)
    with torch.no_grad():
        logits = teacher(InputNormalizer(*model_norm(teacher), channels_last=False)(raw))
    want = torch.softmax(logits / temperature, dim=1)
    if weights is not None:
        want = want * torch.tensor(weights)
        want = want / want.sum(1, keepdim=True)
    if hard:
        want = torch.nn.functional.one_hot(want.argmax(1), 10).float()
    assert torch.allclose(targets, want, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_student_with_online_targets_learns_other_targets(tmp_path, teacher_run, digits_root):
    d = tmp_path / "run"
    shutil.copytree(teacher_run, d)
    base = [f"run_dir={d}", f"data.root={digits_root}", *FAST, "max_steps=6", "train.log_every_steps=6"]
    run("stage=pseudolabel", *base)
    offline = run("stage=student", *base)
    online = run("stage=student", *base, "student.targets=online", "force=true")
    assert offline["targets"] == "offline" and online["targets"] == "online"
    assert online["settings"]["student.targets"] == "online"
    # the same seed gives both the same batches (an offline rerun gives the same loss to the last digit): only the
    # targets of the unlabeled rows differ, the teacher's answer on the augmented view instead of the label file's
    assert online["final_loss_parts"]["loss_unlabeled"] != pytest.approx(offline["final_loss_parts"]["loss_unlabeled"],
                                                                          rel=1e-4)
    with pytest.raises(ConfigError, match="student.targets"):
        run("stage=student", *base, "student.targets=teacher", "force=true")
