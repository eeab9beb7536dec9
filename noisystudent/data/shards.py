"""Shard patterns, sample decoding and the webdataset streams the stages read.

A sample is `__key__` + one image (jpg|jpeg|png|webp) + an integer class in `cls` (labeled shards).
Decoding happens in DataLoader workers and batching too (webdataset's usual pattern), so that a
corrupt image can be dropped *and counted*: each batch carries how many images it lost, and the
training / labeling loops add those counts to summary.json.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import braceexpand
import torch
import webdataset as wds
from PIL import Image

from ..errors import DataError
from .transforms import stack_hwc

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"


def expand_shards(pattern, key: str) -> list[str]:
    """Expand a brace pattern (or a list of them) to shard paths and check they exist.

    `key` is the config key the pattern came from; errors name it and say what to do."""
    if pattern is None or (isinstance(pattern, str) and not pattern.strip()):
        raise DataError(f"{key} is not set: give a shard pattern such as {key}='data/train-{{000000..000127}}.tar'")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls: list[str] = []
    for p in patterns:
        urls.extend(braceexpand.braceexpand(str(p)))
    if not urls:
        raise DataError(f"{key}={pattern!r} expands to no shard")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"{key}={pattern!r}: shard {missing[0]} does not exist{more}. Check the pattern, or make "
            "shards with `python -m noisystudent stage=import stage.src=DIR stage.dest=DIR`"
        )
    empty = [u for u in local if os.path.getsize(u) == 0]
    if empty:
        raise DataError(f"{key}={pattern!r}: shard {empty[0]} is empty (0 bytes); remove it from the pattern")
    return urls


def count_samples(urls: list[str]) -> int:
    """Number of samples in the shards: from the manifest written beside them when there is one,
    else by reading tar headers (no image is decoded)."""
    total = 0
    manifests: dict[Path, dict] = {}
    for url in urls:
        path = Path(url)
        mpath = path.parent / MANIFEST
        if mpath not in manifests:
            manifests[mpath] = json.loads(mpath.read_text()).get("shards", {}) if mpath.exists() else {}
        if path.name in manifests[mpath]:
            total += int(manifests[mpath][path.name])
            continue
        keys = set()
        try:
            with tarfile.open(url, "r:") as tar:
                for member in tar:
                    if member.isfile() and not os.path.basename(member.name).startswith("."):
                        keys.add(member.name.split(".", 1)[0])
        except (tarfile.TarError, OSError) as e:
            # training skips (and counts) what it cannot read; the count leaves it out too
            logging.getLogger(__name__).warning("shard %s cannot be read (%s): counted as empty", url, e)
        total += len(keys)
    return total


def image_key(sample: dict) -> str | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode to RGB. With `draft_size`, JPEGs are decoded at a reduced scale (PIL draft mode)
    that still covers draft_size: DCT scaling is far cheaper than decoding full size and resizing."""
    img = Image.open(io.BytesIO(data))
    if draft_size and img.format == "JPEG" and min(img.size) >= 2 * draft_size:
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return img.convert("RGB")


def parse_label(sample: dict, num_classes: int) -> int:
    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
    raw = sample.get("cls")
    if raw is None:
        raise DataError(
            f"shard {url}, sample {key!r}: no .cls entry; labeled shards need an integer class per sample "
            f"(found entries: {sorted(k for k in sample if not k.startswith('__'))})"
        )
    try:
        label = int(raw.decode().strip() if isinstance(raw, bytes) else raw)
    except ValueError:
        raise DataError(f"shard {url}, sample {key!r}: .cls holds {raw[:20]!r}, not an integer class") from None
    if not 0 <= label < num_classes:
        raise DataError(
            f"shard {url}, sample {key!r}: class {label} is outside [0, {num_classes}) "
            f"(data.num_classes={num_classes}); fix the shard or set data.num_classes"
        )
    return label


class SampleDecoder:
    """Turn a raw webdataset sample into (key, image or None, label); the image is the transform's
    HWC uint8 array (transforms.py).

    A sample with no image entry at all is an error (the shards are not image shards); an image
    entry that does not decode is a corrupt image: returned with image None, counted, dropped."""

    def __init__(self, transform: Callable, num_classes: int | None, labeled: bool, draft_size: int | None = None):
        self.transform = transform
        self.num_classes = num_classes
        self.labeled = labeled
        self.draft_size = draft_size

    def __call__(self, sample: dict) -> dict:
        ext = image_key(sample)
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        if ext is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise DataError(
                f"shard {url}, sample {key!r}: no image entry (expected one of {', '.join(IMAGE_EXTS)}; "
                f"found {found}). Shards must hold images: make them with stage=import"
            )
        label = parse_label(sample, self.num_classes) if self.labeled else -1
        try:
            tensor = self.transform(decode_image(sample[ext], self.draft_size))
        except Exception:  # noqa: BLE001 - any decode failure is a corrupt image, counted by the caller
            tensor = None
        out = {"key": key, "url": url, "image": tensor, "label": label}
        for extra in ("repeat", "target"):
            if extra in sample:
                out[extra] = sample[extra]
        return out


# Shard read errors seen by this (worker) process since its last batch: the training stream skips an
# unreadable shard and goes on, and the next batch carries the errors to the main process to count.
_SHARD_ERRORS: list[str] = []


def skip_and_record_shard_error(exn: Exception) -> bool:
    """webdataset handler for training streams: skip the shard (webdataset appends its url to the
    exception's args), remember the error, continue."""
    _SHARD_ERRORS.append(f"{type(exn).__name__}: {exn}")
    logging.getLogger(__name__).warning("skipping unreadable shard data: %s", _SHARD_ERRORS[-1])
    return True


def collate_counting(samples: list[dict]) -> dict:
    """Stack the decodable samples of a batch; report how many were corrupt (and shard read errors)."""
    good = [s for s in samples if s["image"] is not None]
    shard_errors = _SHARD_ERRORS[:]
    _SHARD_ERRORS.clear()
    batch = {
        "shard_errors": shard_errors,
        "keys": [s["key"] for s in good],
        "urls": [s["url"] for s in good],
        "labels": torch.tensor([s["label"] for s in good], dtype=torch.long),
        "n_corrupt": len(samples) - len(good),
        "corrupt_keys": [s["key"] for s in samples if s["image"] is None],
    }
    # our transforms give HWC uint8 arrays (transforms.py); the device normalizes the batch
    batch["images"] = stack_hwc([s["image"] for s in good]) if good else torch.empty(0)
    if good and "target" in good[0]:
        batch["targets"] = torch.stack([s["target"] for s in good])
    return batch


class _SeededShuffle:
    """webdataset's shuffle buffer with an rng seeded from (seed, rank, worker): wds.shuffle() without
    an rng seeds from pid and time, which made runs with the same `seed` differ."""

    def __init__(self, bufsize: int, initial: int, seed: int):
        self.bufsize, self.initial, self.seed = bufsize, initial, seed

    def __call__(self, src):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{rank}-{worker}")
        return wds.shuffle(self.bufsize, self.initial, rng=rng)(src)


def training_stream(
    urls: list[str],
    decoder: SampleDecoder,
    batch_size: int,
    shuffle_buffer: int,
    seed: int,
    extra_stages: Iterable = (),
) -> wds.DataPipeline:
    """An endless, shuffled stream of batches for training.

    Shards are resampled (each worker of each process draws shards at random with its own seed),
    so there is no per-rank split that could leave a rank without data and hang a collective;
    the loop counts optimizer steps, and an epoch is len(dataset) / global batch."""
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=skip_and_record_shard_error),
        *extra_stages,
        _SeededShuffle(shuffle_buffer, min(shuffle_buffer, 1000), seed),
        wds.map(decoder),
        wds.batched(batch_size, collation_fn=collate_counting, partial=False),
    )


def ordered_stream(urls: list[str], decoder: SampleDecoder, batch_size: int,
                   split_by_node: bool = True) -> wds.DataPipeline:
    """One pass, in shard order, each shard read by exactly one worker of exactly one process.

    Used for evaluation (each eval image is counted exactly once across processes)."""
    stages = [wds.SimpleShardList(urls)]
    if split_by_node:
        stages.append(wds.split_by_node)
    stages += [
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.map(decoder),
        wds.batched(batch_size, collation_fn=collate_counting, partial=True),
    ]
    return wds.DataPipeline(*stages)


class _WorkerInit:
    """Set up each loader worker: ignore SIGTERM, lower its CPU priority by `nice`."""

    def __init__(self, nice: int):
        self.nice = nice

    def __call__(self, _worker_id: int) -> None:
        # A scheduler's SIGTERM goes to the whole process group. The main process answers it by saving a
        # checkpoint (engine.fit); a worker dying of it first would crash the main process before it can.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Where workers and the model share the cores (CPU training), the step's threads wait for each
        # other at every op: a worker taking one core stalls both. At a lower priority the workers run
        # when the step leaves a core idle, or when it waits for a batch, and then on all cores at once.
        if self.nice:
            os.nice(self.nice)


def make_loader(pipeline, num_workers: int, shards_per_process: int | None = None,
                worker_nice: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader over a pipeline that batches itself. Workers beyond the number of shards a
    process reads would get no shard, so their number is capped to it."""
    if shards_per_process is not None:
        num_workers = min(num_workers, max(shards_per_process, 0))
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        worker_init_fn=_WorkerInit(worker_nice) if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def rank_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """The shards one process reads when it takes a disjoint share (same rule as wds.split_by_node)."""
    return urls[rank::world_size]
