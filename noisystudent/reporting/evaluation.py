"""Top-1 / top-5 / per-class accuracy and calibration (NLL, expected calibration error, the reliability
diagram's bins), each eval image counted exactly once across processes.

Every process reads a disjoint set of eval shards (split by node, then by worker), sums its
counts, and the sums are all-reduced: no padding, no duplicated samples at the end of the set."""

from __future__ import annotations

import torch

from ..data.shards import SampleDecoder
from ..data.streams import make_loader, ordered_stream, rank_shards
from ..data.transforms import InputNormalizer, model_norm
from ..errors import DataError

# no_grad, not inference_mode: the model evaluated may be updated afterwards (the EMA model of a periodic
# evaluation, its BatchNorm statistics then re-estimated), and a tensor made in inference mode cannot be
# updated in place outside it. Seen with 2 processes: a fine-tune's EMA model left a periodic evaluation
# holding inference tensors (its frozen parameters and its buffers) and update_bn failed on them.
ECE_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) measure expected calibration error


@torch.no_grad()
def evaluate(accelerator, model, urls: list[str], num_classes: int, transform, batch_size: int,
             num_workers: int, channels_last: bool = False, worker_nice: int = 0, temperature: float = 1.0,
             nll_temperatures: torch.Tensor | None = None, dali: dict | None = None,
             classes: tuple[int, ...] | None = None, where: str = "data.eval") -> dict:
    """Metrics of `model` on the labeled shards `urls`; probabilities are softmax(logits / temperature).
    `nll_temperatures`: also the mean NLL at each of these temperatures ("nll_at", for calibration.py).
    `dali` ({"index_dir", "recipe"}): read through DALI (data/dali.py) instead of the torch loader.
    `classes`: the labels the set covers: the logits are restricted to them (per_class_top1 is then in their
    order); `where` names the set in errors."""
    device = accelerator.device
    keep = None if classes is None else torch.tensor(classes, device=device)
    if keep is not None:  # label -> its place in the class list, -1 outside it
        place = torch.full((num_classes,), -1, dtype=torch.long, device=device)
        place[keep] = torch.arange(len(classes), device=device)
    scored = num_classes if classes is None else len(classes)
    outside = torch.zeros((), dtype=torch.long, device=device)
    model = model.to(device).eval()
    normalize = InputNormalizer(*model_norm(model), channels_last=channels_last)
    mine = rank_shards(urls, accelerator.process_index, accelerator.num_processes)
    if dali is not None:
        from ..data.dali import ordered_batches
        from ..data.dali_index import index_shards

        records = index_shards(dali["index_dir"], urls, max(1, num_workers), accelerator)
        loader = ordered_batches(mine, records, dali["index_dir"], dali["recipe"], batch_size, max(1, num_workers),
                                 device, labeled=True, num_classes=num_classes)
    else:
        decoder = SampleDecoder(transform, num_classes, labeled=True)
        loader = make_loader(ordered_stream(urls, decoder, batch_size), num_workers, len(mine), worker_nice,
                             pin_memory=device.type == "cuda")
    correct = torch.zeros(scored, dtype=torch.long, device=device)
    total = torch.zeros(scored, dtype=torch.long, device=device)
    top5 = torch.zeros((), dtype=torch.long, device=device)
    corrupt = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    # reliability diagram: images, right answers and summed confidence per confidence bin
    rel = torch.zeros((3, ECE_BINS), dtype=torch.float64, device=device)
    temps = None if nll_temperatures is None else nll_temperatures.to(device, torch.float64)
    nll_at = None if temps is None else torch.zeros(len(temps), dtype=torch.float64, device=device)
    k = min(5, scored)
    if mine:  # a process without shards still joins the reduce below, so it cannot hang it
        for batch in loader:
            if "error" in batch:  # DALI path: a shard the index pass could not read, as the torch loader's reraise
                raise DataError(f"evaluation: {batch['error']}")
            corrupt += batch["n_corrupt"]
            if batch["images"].numel() == 0:
                continue
            images = normalize(batch["images"].to(device, non_blocking=True))
            labels = batch["labels"].to(device, non_blocking=True)
            with accelerator.autocast():
                logits = model(images)
            if keep is not None:  # counted, not checked per batch: the host does not wait for the device here
                labels = place[labels]
                outside += (labels < 0).sum()
                inside = labels >= 0
                logits, labels = logits[inside][:, keep], labels[inside]
            pred = logits.topk(k, dim=1).indices
            hit1 = pred[:, 0] == labels
            total += torch.bincount(labels, minlength=scored)
            correct += torch.bincount(labels[hit1], minlength=scored)
            top5 += (pred == labels[:, None]).any(dim=1).sum()
            scaled = logits.float() / temperature
            loss_sum += torch.nn.functional.cross_entropy(scaled, labels, reduction="sum").double()
            conf = torch.softmax(scaled, dim=1).amax(dim=1).double()
            bins = (conf * ECE_BINS).long().clamp_(max=ECE_BINS - 1)
            rel[0] += torch.bincount(bins, minlength=ECE_BINS)
            rel[1] += torch.bincount(bins, weights=hit1.double(), minlength=ECE_BINS)
            rel[2] += torch.bincount(bins, weights=conf, minlength=ECE_BINS)
            if temps is not None:  # the batch's NLL at every temperature, [16, B, C] at a time (bounded memory)
                for i in range(0, len(temps), 16):
                    z = logits.float()[None] / temps[i:i + 16, None, None].float()
                    true_logit = z.gather(2, labels.view(1, -1, 1).expand(len(z), -1, 1)).squeeze(2)
                    nll_at[i:i + 16] += (torch.logsumexp(z, dim=2) - true_logit).sum(dim=1).double()
    correct, total, top5, corrupt, loss_sum, rel, outside = (
        accelerator.reduce(t, "sum") for t in (correct, total, top5, corrupt, loss_sum, rel, outside))
    if int(outside):
        raise DataError(f"{where}: {int(outside)} image(s) have a label outside {where}.classes: add their labels "
                        "to the list, or remove it to score every class")
    n = int(total.sum())
    per_class = [(int(c) / int(t) if int(t) else None) for c, t in zip(correct.tolist(), total.tolist())]
    return {
        "images": n,
        "corrupt_skipped": int(corrupt),
        "top1": float(correct.sum()) / n if n else 0.0,
        "top5": float(top5) / n if n else 0.0,
        "loss": float(loss_sum) / n if n else float("nan"),  # mean cross-entropy (no label smoothing)
        "per_class_top1": per_class,
        **({"classes": list(classes)} if classes is not None else {}),
        "nll": float(loss_sum) / n if n else float("nan"),  # the loss, named as calibration reports it
        "ece": float((rel[1] - rel[2]).abs().sum()) / n if n else float("nan"),
        "reliability": {"bins": ECE_BINS, "images": [int(v) for v in rel[0].tolist()],
                        "accuracy": _ratios(rel[1], rel[0]), "confidence": _ratios(rel[2], rel[0])},
        **({"nll_at": (accelerator.reduce(nll_at, "sum") / max(n, 1)).tolist()} if nll_at is not None else {}),
    }


def _ratios(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
    return [(a / b if b else None) for a, b in zip(num.tolist(), den.tolist(), strict=True)]
