"""The Noisy Student loss: CE with label smoothing on labeled images + soft CE on pseudo-labeled ones,
both computed from one forward pass over the concatenated batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

_soft_ce = SoftTargetCrossEntropy()


def noisy_student_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None,
                       smoothing: float, unlabeled_weight: float) -> tuple[torch.Tensor, dict]:
    """`logits` holds the labeled rows first (len(labels)), then the pseudo-labeled rows (len(targets)).

    targets are probability vectors (soft labels, or one-hot for hard labels)."""
    n_lab = labels.shape[0]
    logits = logits.float()
    sup = F.cross_entropy(logits[:n_lab], labels, label_smoothing=smoothing)
    if targets is None or targets.shape[0] == 0:
        return sup, {"loss_labeled": sup.detach()}
    unsup = _soft_ce(logits[n_lab:], targets.float())
    return sup + unlabeled_weight * unsup, {"loss_labeled": sup.detach(), "loss_unlabeled": unsup.detach()}
