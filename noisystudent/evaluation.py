"""Top-1 / top-5 / per-class accuracy, each eval image counted exactly once across processes.

Every process reads a disjoint set of eval shards (split by node, then by worker), sums its
counts, and the sums are all-reduced: no padding, no duplicated samples at the end of the set."""

from __future__ import annotations

import torch

from .data.shards import SampleDecoder
from .data.streams import make_loader, ordered_stream, rank_shards
from .data.transforms import InputNormalizer, model_norm


# no_grad, not inference_mode: the model evaluated may be updated afterwards (the EMA model of a periodic
# evaluation, its BatchNorm statistics then re-estimated), and a tensor made in inference mode cannot be
# updated in place outside it. Seen with 2 processes: a fine-tune's EMA model left a periodic evaluation
# holding inference tensors (its frozen parameters and its buffers) and update_bn failed on them.
@torch.no_grad()
def evaluate(accelerator, model, urls: list[str], num_classes: int, transform, batch_size: int,
             num_workers: int, channels_last: bool = False, worker_nice: int = 0) -> dict:
    device = accelerator.device
    model = model.to(device).eval()
    decoder = SampleDecoder(transform, num_classes, labeled=True)
    normalize = InputNormalizer(*model_norm(model), channels_last=channels_last)
    mine = rank_shards(urls, accelerator.process_index, accelerator.num_processes)
    loader = make_loader(ordered_stream(urls, decoder, batch_size), num_workers, len(mine), worker_nice,
                         pin_memory=device.type == "cuda")
    correct = torch.zeros(num_classes, dtype=torch.long, device=device)
    total = torch.zeros(num_classes, dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    corrupt = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    k = min(5, num_classes)
    if mine:  # a process without shards still joins the reduce below, so it cannot hang it
        for batch in loader:
            corrupt += batch["n_corrupt"]
            if batch["images"].numel() == 0:
                continue
            images = normalize(batch["images"].to(device, non_blocking=True))
            labels = batch["labels"].to(device, non_blocking=True)
            with accelerator.autocast():
                logits = model(images)
            pred = logits.topk(k, dim=1).indices
            hit1 = pred[:, 0] == labels
            total += torch.bincount(labels, minlength=num_classes)
            correct += torch.bincount(labels[hit1], minlength=num_classes)
            top5 += (pred == labels[:, None]).any(dim=1).sum()
            loss_sum += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
    correct, total, top5, corrupt, loss_sum = (accelerator.reduce(t, "sum")
                                               for t in (correct, total, top5, corrupt, loss_sum))
    n = int(total.sum())
    per_class = [(int(c) / int(t) if int(t) else None) for c, t in zip(correct.tolist(), total.tolist())]
    return {
        "images": n,
        "corrupt_skipped": int(corrupt),
        "top1": float(correct.sum()) / n if n else 0.0,
        "top5": float(top5) / n if n else 0.0,
        "loss": float(loss_sum) / n if n else float("nan"),  # mean cross-entropy (no label smoothing)
        "per_class_top1": per_class,
    }
