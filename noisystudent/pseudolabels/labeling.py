"""Running a model over many images, source by source (a shard, or a chunk of an image directory): what
stage=pseudolabel and stage=predict share.

Decoding and batching are the labeling ones: PIL in the loader workers (pseudolabel.decode=cpu, JPEG
draft decoding optional), or raw JPEG bytes decoded on the device (decode=gpu, data/device_decode.py);
batches never cross a source, so each source's results are complete when its last batch is read. The
host never waits for the device within a batch: a batch's top-k stays on the device until the next
batch is queued behind it, and is read then (one batch late)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..data.device_decode import DeviceJpegDecoder, RawJpegDecoder, collate_raw, jpeg_decoder
from ..data.labels import topk_arrays, topk_on_device
from ..data.shards import SampleDecoder
from ..data.streams import ShardBatches, make_loader, read_tar
from ..data.transforms import InputNormalizer, resize_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoding:
    decode: str  # cpu | gpu
    jpeg_draft: bool
    batch_size: int
    num_workers: int
    nice: int


def run_model(accelerator, model, normalize: InputNormalizer, sources: list[str], transform, resize_crop,
              how: Decoding, topk: int, temperature: float = 1.0, read: Callable = read_tar,
              counts: dict | None = None, num_classes: int | None = None, audit_classes: bool = False,
              raw_temperature: float | None = None, dali: dict | None = None) -> Iterator[dict]:
    """Yield, source by source, {"source", "keys", "corrupt", "topk_ids", "topk_probs", "confidence",
    "argmax", "cls", "confidence_raw", "logit_lse", "max_logit", "fingerprint"} (the arrays as label files store them;
    logit_lse and max_logit are the out-of-domain scores of the logits at temperature 1, fingerprint each image's
    (data/fingerprints.py): of the whole decoded image, taken where it was decoded), or {"source", "error"} for a
    source that cannot be read. "cls": each image's class from its sample's `cls` (-1 where it has none;
    audit_classes=True, else all -1); "confidence_raw": the top-1 probability at `raw_temperature` (None when
    it is not given: the temperature was not changed by a calibration). `counts` receives the device
    decoder's counts (decode=gpu). `dali` ({"index_dir", "recipe"}): the sources are shards read through DALI
    (data/dali.py; decoding on the GPU for a CUDA device) instead of the torch loader, and `how.decode` is
    not used."""
    device = accelerator.device
    if dali is not None:
        from ..data.dali import ordered_batches
        from ..data.dali_index import index_shards

        # this process's sources only (they are disjoint across processes): no collective here
        records = index_shards(dali["index_dir"], sources, max(1, how.num_workers))
        loader = ordered_batches(sources, records, dali["index_dir"], dali["recipe"], how.batch_size,
                                 max(1, how.num_workers), device, labeled=False, num_classes=num_classes,
                                 audit_classes=audit_classes, fingerprints=True)
        if counts is not None:
            counts["decoder"] = "dali (nvJPEG, mixed)" if device.type == "cuda" else "dali (CPU operators)"
        yield from _label_batches(accelerator, model, normalize, loader, None, topk, temperature, raw_temperature)
        return
    # PIL draft decoding DCT-scales a JPEG by 1/2, 1/4 or 1/8 while staying at or above the size asked for:
    # ask for the resize target (not the crop), so the bicubic resize after it never enlarges the image
    draft = resize_target(resize_crop) if how.jpeg_draft else None
    cpu_decoder = SampleDecoder(transform, num_classes, labeled=False, draft_size=draft, audit_classes=audit_classes,
                                fingerprint=True)
    device_decoder = None
    found = jpeg_decoder(device) if how.decode == "gpu" else None
    if how.decode == "gpu" and found is None:
        log.warning("decode=gpu: neither torchcodec's nor torchvision's JPEG decoder runs on %s (no nvJPEG in this "
                    "build?): the loader workers decode every image instead", device)
        if counts is not None:
            counts["decoder"] = "none: decoded by the CPU path"
    if found is not None:
        device_decoder = DeviceJpegDecoder(device, resize_crop, transform, draft, found)
        batches = ShardBatches(sources, RawJpegDecoder(cpu_decoder), how.batch_size, collate_raw, read)
    else:
        batches = ShardBatches(sources, cpu_decoder, how.batch_size, read=read)
    loader = make_loader(batches, how.num_workers, len(sources), how.nice, pin_memory=device.type == "cuda")
    yield from _label_batches(accelerator, model, normalize, loader, device_decoder, topk, temperature, raw_temperature)
    if counts is not None and device_decoder is not None:
        counts.update(device_decoder.counts, decoder=device_decoder.backend)


def _label_batches(accelerator, model, normalize, loader, device_decoder, topk: int, temperature: float,
                   raw_temperature: float | None) -> Iterator[dict]:
    """The loop of `run_model` over batches that never cross a source (the torch loader's or DALI's)."""
    device = accelerator.device
    parts: dict[str, list] = {}
    corrupt: dict[str, list[str]] = {}

    def finish(source: str, keys: list[str], labels: list[int], last: bool, top) -> dict | None:
        """Host side of a batch: its top-k read from the device; a source's results once its last batch is in."""
        if keys:
            raw = top[2].cpu().numpy() if top[2] is not None else np.full(len(keys), np.nan, np.float32)
            ood = top[3].cpu().numpy()
            fps = top[4].cpu().numpy() if top[4] is not None else None  # None: a loader that takes none
            parts.setdefault(source, []).append((keys, *topk_arrays(*top[:2]), np.array(labels, np.int32), raw,
                                                 ood[0], ood[1], fps))
        if not last:
            return None
        chunks = parts.pop(source, [])
        names = ("topk_ids", "topk_probs", "confidence", "argmax", "cls", "confidence_raw", "logit_lse", "max_logit",
                 "fingerprint")
        arrays = [np.concatenate([c[i] for c in chunks]) if chunks and all(c[i] is not None for c in chunks) else None
                  for i in range(1, len(names) + 1)]
        out = {"source": source, "keys": [k for c in chunks for k in c[0]], "corrupt": corrupt.pop(source, []),
               **dict(zip(names, arrays, strict=True))}
        if raw_temperature is None:
            out["confidence_raw"] = None
        return out

    # the previous batch: (source, keys, labels, last, (top-k ids, probs, raw confidence, scores, fingerprints) on the
    # device)
    pending = None
    with torch.inference_mode():
        for batch in loader:
            source = batch["shard"]
            if "error" in batch:
                if pending and (done := finish(*pending)):
                    yield done
                pending = None
                parts.pop(source, None)
                corrupt.pop(source, None)
                yield {"source": source, "error": batch["error"]}
                continue
            corrupt.setdefault(source, []).extend(batch["corrupt_keys"])
            labels = batch["labels"].tolist()  # one per row of batch["keys"]
            if device_decoder is not None:
                images, keys, found_corrupt, fps = device_decoder(batch)
                corrupt[source].extend(found_corrupt)
                if found_corrupt:  # rows the device could not decode are gone: keep the labels of the rest
                    by_key = dict(zip(batch["keys"], labels, strict=True))
                    labels = [by_key[k] for k in keys]
            else:
                images, keys = batch["images"].to(device, non_blocking=True), batch["keys"]
                fps = batch.get("fingerprints")
            top = None
            if images.numel():
                with accelerator.autocast():
                    logits = model(normalize(images)).float()
                raw = None if raw_temperature is None else torch.softmax(logits / raw_temperature, 1).amax(1)
                # the out-of-domain scores (pseudolabels/pool.py), of the logits themselves: energy is -logsumexp
                ood = torch.stack([torch.logsumexp(logits, 1), logits.amax(1)])
                top = (*topk_on_device(torch.softmax(logits / temperature, dim=1), topk), raw, ood, fps)
            if pending and (done := finish(*pending)):
                yield done
            pending = (source, keys if top is not None else [], labels, batch["last"], top)
        if pending and (done := finish(*pending)):
            yield done
