"""student.targets=online: consistent teaching (Beyer et al. 2022, "Knowledge distillation: A good teacher
is patient and consistent"). The teacher labels the very view the student sees, at every step, instead
of the clean view it labeled once, offline.

Offline (the paper's Noisy Student): the teacher labels each unlabeled image once, without noise, and
the student learns those fixed targets under RandAugment, so a crop that cut the object away still
carries the full image's label. Online: the teacher, frozen and in eval mode (no dropout or stochastic
depth), runs on the student's augmented batch, and its softmax is the target. The selection (which images,
how many times: threshold and class balancing) is still the offline one, from the label files, and where that
selection corrected the teacher's probabilities for the pool's class prior, the online ones are corrected by the
same class weights.

Costs one more forward pass of the teacher per step (no backward), and the teacher's weights in memory."""

from __future__ import annotations

import torch

from ..data.transforms import model_norm


class OnlineTargets:
    """Teacher probabilities for a batch normalized for the student. `temperature` and `hard` as
    pseudolabel.temperature / pseudolabel.hard (one-hot of the teacher's top class); `class_weights`: the
    selection's prior correction (p(c|x) w_c, renormalised), or None."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, accelerator, temperature: float,
                 hard: bool, class_weights=None):
        self.teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
        self.weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32,
                                                                       device=accelerator.device)
        self.accelerator, self.temperature, self.hard = accelerator, float(temperature), bool(hard)
        # the batch arrives normalized with the student's mean/std: x_teacher = x * a + b gives the teacher's
        (sm, ss), (tm, ts) = model_norm(student), model_norm(teacher)
        self.scale = torch.tensor([s / t for s, t in zip(ss, ts, strict=True)]).view(1, -1, 1, 1)
        self.shift = torch.tensor([(m - n) / t for m, n, t in zip(sm, tm, ts, strict=True)]).view(1, -1, 1, 1)
        self.same_norm = (sm, ss) == (tm, ts)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:
            return images.new_zeros((0, 0))
        if not self.same_norm:
            self.scale, self.shift = self.scale.to(images.device), self.shift.to(images.device)
            images = images * self.scale + self.shift
        with self.accelerator.autocast():
            logits = self.teacher(images)
        probs = torch.softmax(logits.float() / self.temperature, dim=1)
        if self.weights is not None:
            probs = probs * self.weights
            probs = probs / probs.sum(dim=1, keepdim=True)
        if self.hard:
            return torch.nn.functional.one_hot(probs.argmax(dim=1), probs.shape[1]).float()
        return probs
