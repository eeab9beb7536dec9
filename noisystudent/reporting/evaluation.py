"""Top-1 / top-5 / per-class accuracy and calibration (NLL, expected calibration error, the reliability
diagram's bins), each eval image counted exactly once across processes.

Every process reads a disjoint set of eval shards (split by node, then by worker), sums its
counts, and the sums are all-reduced: no padding, no duplicated samples at the end of the set."""

from __future__ import annotations

import logging

import torch
from torchvision import transforms

from ..data.corruptions import INSTALL, FirstImages, RobustnessPlan, VariantBatches, VariantMaker, warm_up
from ..data.shards import SampleDecoder
from ..data.streams import make_loader, ordered_stream, rank_shards
from ..data.transforms import InputNormalizer, ToHWCArray, model_norm
from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

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
    tally = _Tally(1, scored, device, nll_temperatures)
    outside = torch.zeros((), dtype=torch.long, device=device)
    if mine:  # a process without shards still joins the reduce below, so it cannot hang it
        for batch in loader:
            if "error" in batch:  # DALI path: a shard the index pass could not read, as the torch loader's reraise
                raise DataError(f"evaluation: {batch['error']}")
            tally.corrupt += batch["n_corrupt"]
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
            tally.add(0, logits, labels, temperature)
    tally.reduce(accelerator)
    outside = accelerator.reduce(outside, "sum")
    if int(outside):
        raise DataError(f"{where}: {int(outside)} image(s) have a label outside {where}.classes: add their labels "
                        "to the list, or remove it to score every class")
    return {**tally.metrics(0), **({"classes": list(classes)} if classes is not None else {})}


VIEW_METRICS = ("images", "top1", "top5", "nll", "ece")  # what the robustness result keeps of each view


@torch.no_grad()
def evaluate_views(accelerator, models: list, urls: list[str], num_classes: int, resize, crop: int,
                   plan: RobustnessPlan, batch_size: int, num_workers: int, channels_last: bool = False,
                   worker_nice: int = 0, quota: dict[str, int] | None = None) -> list[dict]:
    """The robustness evaluation: each of `models` (evaluated at the same resolution) on the clean view of
    `urls`, on each of plan's corruptions at each severity and on each perturbation's frames, in one pass: a
    loader worker decodes and resizes each image once and makes every view of it once, for all the models.
    `resize` (PIL -> PIL) and `crop` are the eval transform's two halves; `quota`: url -> how many of its first
    images to use (eval.corruption_images).

    Per model: the plan, the clean view's and every corruption/severity's top-1, top-5, NLL and ECE, each
    perturbation's flip rate (how often the top-1 changes between neighbouring frames), and the workers' cost
    per view (images per second of one worker's time; the same for every model of the pass)."""
    device = accelerator.device
    resized = int(resize.size if isinstance(resize.size, int) else min(resize.size))
    plan.check_geometry(resized, crop, "the model")
    views = plan.variants(resized, crop)
    seq = {p: i for i, p in enumerate(plan.perturbations)}
    frames = {p: sum(1 for v in views if v.name == p and v.kind == "perturbation") for p in seq}
    models = [m.to(device).eval() for m in models]
    normalizers = [InputNormalizer(*model_norm(m), channels_last=channels_last) for m in models]
    if quota is not None:
        urls = [u for u in urls if quota.get(u, 0)]
    mine = rank_shards(urls, accelerator.process_index, accelerator.num_processes)
    try:
        warm_up(plan, crop)
    except ImportError as e:
        raise ConfigError(f"eval.corruptions needs the imagecorruptions package ({e}): {INSTALL}") from None
    decoder = SampleDecoder(transforms.Compose([resize, ToHWCArray()]), num_classes, labeled=True)
    stream = ordered_stream(urls, decoder, batch_size, select=None if quota is None else FirstImages(quota),
                            batches=VariantBatches(views, VariantMaker(crop, plan.seed, frames.get("translate")),
                                                   batch_size))
    loader = make_loader(stream, num_workers, len(mine), worker_nice, pin_memory=device.type == "cuda")
    tallies = [_Tally(len(views), num_classes, device) for _ in models]
    # per model: [flips, frame pairs] per perturbation
    flips = torch.zeros((len(models), 2, max(len(seq), 1)), dtype=torch.long, device=device)
    prev: dict = {}  # (worker's batch, sequence, model) -> the previous frame's top-1
    seconds = [0.0] * len(views)  # workers' time making each view (host numbers, from the batches)
    corrupt = 0
    if mine:  # a process without shards still joins the reduce below, so it cannot hang it
        for batch in loader:
            i, v = batch["variant"], views[batch["variant"]]
            corrupt += batch["n_corrupt"]
            seconds[i] += batch["variant_s"]
            if batch["images"].numel() == 0:
                continue
            raw = batch["images"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            for k, (model, normalize, tally) in enumerate(zip(models, normalizers, tallies, strict=True)):
                with accelerator.autocast():
                    logits = model(normalize(raw))
                top1 = tally.add(i, logits, labels)
                if v.kind != "perturbation":
                    continue
                p, where = seq[v.name], (batch["group"], v.name, k)
                if v.level:
                    flips[k, 0, p] += (top1 != prev[where]).sum()
                    flips[k, 1, p] += len(top1)
                if v.level == frames[v.name] - 1:
                    del prev[where]
                else:
                    prev[where] = top1
    for tally in tallies:
        tally.corrupt += corrupt
        tally.reduce(accelerator)
    flips = accelerator.reduce(flips, "sum").tolist()
    secs = accelerator.reduce(torch.tensor(seconds, dtype=torch.float64, device=device), "sum").tolist()
    out = []
    for tally, (flip, pairs) in zip(tallies, flips, strict=True):
        metrics = [{k: m[k] for k in VIEW_METRICS} for m in map(tally.metrics, range(len(views)))]
        cost: dict = {}  # view family -> [images made, worker seconds]
        for v, m, t in zip(views, metrics, secs, strict=True):
            c = cost.setdefault(v.family, [0, 0.0])
            c[0], c[1] = c[0] + m["images"], c[1] + t
        corrupted = [i for i, v in enumerate(views) if v.kind == "corruption"]
        out.append({
            "plan": plan.settings(),
            "img_size": crop,
            "images": metrics[0]["images"],
            "corrupt_skipped": int(tally.corrupt),
            "clean": metrics[0],
            # every corrupted image of the plan together: ECE from their pooled confidence bins, not a mean of ECEs
            "corrupted": {k: m[k] for k in VIEW_METRICS} if (m := tally.pooled(corrupted)) else None,
            "corruptions": {c: {str(v.level): m for v, m in zip(views, metrics, strict=True)
                                if v.name == c and v.kind == "corruption"} for c in plan.corruptions},
            "perturbations": {p: {"frames": frames[p], "pairs": pairs[k],
                                  "flip_rate": flip[k] / pairs[k] if pairs[k] else None} for p, k in seq.items()},
            # images per second of one worker's time, each view made from the decoded, resized image
            "images_per_worker_s": {name: (made / t if t > 0 else None) for name, (made, t) in cost.items()},
        })
    slow = sorted((r, name) for name, r in out[0]["images_per_worker_s"].items() if r and name != "clean")[:3]
    if slow:
        log.info("robustness: %d images x %d views, %d model(s); slowest views per worker: %s", out[0]["images"],
                 len(views), len(models), ", ".join(f"{name} {r:.0f} images/s" for r, name in slow))
    return out


class _Tally:
    """Per-view sums of an evaluation, on the device (nothing read back until `metrics`): right answers and
    images per class, top-5 hits, summed NLL, the reliability bins; `views` of them (the clean view, or each
    corruption at each severity). `nll_temperatures`: the clean view's NLL at each of these temperatures too."""

    def __init__(self, views: int, scored: int, device, nll_temperatures: torch.Tensor | None = None):
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.scored, self.k = scored, min(5, scored)
        self.correct, self.total, self.top5 = zeros(views, scored), zeros(views, scored), zeros(views)
        self.loss = zeros(views, dtype=torch.float64)
        # reliability diagram: images, right answers and summed confidence per confidence bin
        self.rel = zeros(views, 3, ECE_BINS, dtype=torch.float64)
        self.corrupt = zeros()
        self.temps = None if nll_temperatures is None else nll_temperatures.to(device, torch.float64)
        self.nll_at = None if self.temps is None else zeros(len(self.temps), dtype=torch.float64)

    def add(self, v: int, logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Count one batch of view `v`; its top-1 predictions."""
        pred = logits.topk(self.k, dim=1).indices
        hit1 = pred[:, 0] == labels
        self.total[v] += torch.bincount(labels, minlength=self.scored)
        self.correct[v] += torch.bincount(labels[hit1], minlength=self.scored)
        self.top5[v] += (pred == labels[:, None]).any(dim=1).sum()
        scaled = logits.float() / temperature
        self.loss[v] += torch.nn.functional.cross_entropy(scaled, labels, reduction="sum").double()
        conf = torch.softmax(scaled, dim=1).amax(dim=1).double()
        bins = (conf * ECE_BINS).long().clamp_(max=ECE_BINS - 1)
        self.rel[v, 0] += torch.bincount(bins, minlength=ECE_BINS)
        self.rel[v, 1] += torch.bincount(bins, weights=hit1.double(), minlength=ECE_BINS)
        self.rel[v, 2] += torch.bincount(bins, weights=conf, minlength=ECE_BINS)
        if self.temps is not None and v == 0:  # the batch's NLL at every temperature, [16, B, C] at a time
            temps = self.temps
            for i in range(0, len(temps), 16):
                z = logits.float()[None] / temps[i:i + 16, None, None].float()
                true_logit = z.gather(2, labels.view(1, -1, 1).expand(len(z), -1, 1)).squeeze(2)
                self.nll_at[i:i + 16] += (torch.logsumexp(z, dim=2) - true_logit).sum(dim=1).double()
        return pred[:, 0]

    def reduce(self, accelerator) -> None:
        """Sum every process's counts (each process evaluated its own images)."""
        for name in ("correct", "total", "top5", "loss", "rel", "corrupt", "nll_at"):
            if getattr(self, name) is not None:
                setattr(self, name, accelerator.reduce(getattr(self, name), "sum"))

    def pooled(self, views: list[int]) -> dict | None:
        """The metrics of `views` counted as one set of images (None when empty); after `reduce`."""
        if not views:
            return None
        idx = torch.tensor(views, device=self.total.device)
        both = _Tally(1, self.scored, self.total.device)
        for name in ("correct", "total", "top5", "loss", "rel"):
            setattr(both, name, getattr(self, name)[idx].sum(dim=0, keepdim=True))
        both.corrupt = self.corrupt
        return both.metrics(0)

    def metrics(self, v: int) -> dict:
        total, correct, rel = self.total[v], self.correct[v], self.rel[v]
        n = int(total.sum())
        per_class = [(int(c) / int(t) if int(t) else None) for c, t in zip(correct.tolist(), total.tolist())]
        loss = float(self.loss[v]) / n if n else float("nan")
        return {
            "images": n,
            "corrupt_skipped": int(self.corrupt),
            "top1": float(correct.sum()) / n if n else 0.0,
            "top5": float(self.top5[v]) / n if n else 0.0,
            "loss": loss,  # mean cross-entropy (no label smoothing)
            "per_class_top1": per_class,
            "nll": loss,  # the loss, named as calibration reports it
            "ece": float((rel[1] - rel[2]).abs().sum()) / n if n else float("nan"),
            "reliability": {"bins": ECE_BINS, "images": [int(x) for x in rel[0].tolist()],
                            "accuracy": _ratios(rel[1], rel[0]), "confidence": _ratios(rel[2], rel[0])},
            **({"nll_at": (self.nll_at / max(n, 1)).tolist()} if self.nll_at is not None and v == 0 else {}),
        }


def _ratios(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
    return [(a / b if b else None) for a, b in zip(num.tolist(), den.tolist(), strict=True)]
