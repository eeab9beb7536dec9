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
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import braceexpand
import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .image_check import IMAGE_EXTS
from .transforms import stack_hwc

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
    local = [u for u in urls if is_local(u)]
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


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def count_samples(urls: list[str], key: str, declared: int | None = None, declared_key: str = "") -> int:
    """Number of samples in the shards of config key `key`: `declared` when the user set it
    (`declared_key`, e.g. data.labeled_samples), else from the manifest.json written beside local
    shards, else by reading their tar headers (no image is decoded). Remote shards (pipe:, http://,
    s3://...) cannot be counted here: without a declared count they stop the run with an error."""
    if declared is not None:
        return int(declared)
    remote = [u for u in urls if not is_local(u)]
    if remote:
        raise DataError(
            f"{key}: shard {remote[0]!r} is not a local file, so the samples per epoch cannot be counted; "
            f"set {declared_key}=N (the number of samples in {key}), or copy the shards with their "
            "manifest.json to a local or mounted path")
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


def file_image_ext(path: str) -> str:
    """The extension a file's image is stored under in a sample ("photo.JPG" -> "jpg")."""
    return os.path.splitext(path)[1][1:].lower()


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


_TAR_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def image_bytes(url: str, keys: set[str]) -> dict[str, bytes]:
    """The image entry of each sample of `keys` in one shard (those it has). A local shard is read by its tar
    headers, seeking past every other member's data (a contact sheet's few images from a large shard cost little
    more than the headers); a remote one is streamed."""
    found: dict[str, bytes] = {}
    if is_local(url):
        with tarfile.open(url, "r:") as tar:
            for member in tar:
                parts = _TAR_NAME.match(member.name)  # key and entry as webdataset splits them
                if not member.isfile() or parts is None:
                    continue
                key, ext = parts.groups()
                if key in keys and key not in found and ext in IMAGE_EXTS:
                    found[key] = tar.extractfile(member).read()
                    if len(found) == len(keys):
                        break
        return found
    import webdataset as wds

    for sample in wds.tarfile_samples([{"url": url}]):
        if sample["__key__"] in keys:
            ext = image_key(sample)
            if ext is not None:
                found[sample["__key__"]] = sample[ext]
    return found


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


UNKNOWN_CLASS = -1  # an unlabeled image whose class is not known (the pseudo-label audit leaves it out)
NO_CLASS = -2  # an unlabeled image known to belong to none of the classes (out of domain: every label of it is wrong)


def audit_class(sample: dict, num_classes: int) -> int:
    """The class an unlabeled sample's `cls` gives it for the pseudo-label audit (never trained on): a class of this
    data set; NO_CLASS for a cls of -1 (the image is of no class of this data set); UNKNOWN_CLASS without a cls, or
    with one that is no class of this data set (another label set's index or name): never a reason to stop
    labeling."""
    raw = sample.get("cls")
    if raw is None:
        return UNKNOWN_CLASS
    try:
        if int(raw.decode().strip() if isinstance(raw, bytes) else raw) == -1:
            return NO_CLASS
        return parse_label(sample, num_classes)
    except (ValueError, DataError):
        return UNKNOWN_CLASS


class SampleDecoder:
    """Turn a raw webdataset sample into (key, image or None, label); the image is the transform's
    HWC uint8 array (transforms.py). labeled=True: `cls` is required; labeled=False: the label is -1, or with
    audit_classes=True what the sample's `cls` says (`audit_class`: unlabeled shards may carry their true class to
    audit the pseudo-labels, or -1 for an image of no class: recorded beside them, never trained on).

    A sample with no image entry at all is an error (the shards are not image shards); an image
    entry that does not decode is a corrupt image: returned with image None and the reason, counted,
    dropped. Only decoding is guarded: an exception in the transform is a bug and propagates as one.
    fingerprint=True: the decoded image's fingerprint too (data/fingerprints.py; what labeling keeps)."""

    def __init__(self, transform: Callable, num_classes: int | None, labeled: bool, draft_size: int | None = None,
                 audit_classes: bool = False, fingerprint: bool = False):
        self.transform = transform
        self.num_classes = num_classes
        self.labeled = labeled
        self.draft_size = draft_size
        self.audit_classes = audit_classes
        self.fingerprint = fingerprint

    def label_of(self, sample: dict) -> int:
        if self.labeled:
            return parse_label(sample, self.num_classes)
        if not self.audit_classes:
            return UNKNOWN_CLASS
        return audit_class(sample, self.num_classes)

    def __call__(self, sample: dict) -> dict:
        ext = image_key(sample)
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        if ext is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise DataError(
                f"shard {url}, sample {key!r}: no image entry (expected one of {', '.join(IMAGE_EXTS)}; "
                f"found {found}). Shards must hold images: make them with stage=import"
            )
        label = self.label_of(sample)
        out = {"key": key, "url": url, "image": None, "label": label, "error": None}
        try:
            image = decode_image(sample[ext], self.draft_size)
        except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt image, counted by the caller
            out["error"] = f"shard {url}, sample {key!r}: {type(e).__name__}: {e}"
            return out
        if self.fingerprint:
            from .fingerprints import fingerprint_pil

            out["fingerprint"] = fingerprint_pil(image)
        out["image"] = self.transform(image)
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
    """Stack the decodable samples of a batch; report how many were corrupt, from which shards, the
    first reason (and the shard read errors since the last batch)."""
    good = [s for s in samples if s["image"] is not None]
    bad = [s for s in samples if s["image"] is None]
    shard_errors = _SHARD_ERRORS[:]
    _SHARD_ERRORS.clear()
    batch = {
        "shard_errors": shard_errors,
        "keys": [s["key"] for s in good],
        "urls": [s["url"] for s in good],
        "labels": torch.tensor([s["label"] for s in good], dtype=torch.long),
        "n_corrupt": len(bad),
        "corrupt_keys": [s["key"] for s in bad],
        "corrupt_shards": sorted({s["url"] for s in bad}),
        "first_error": bad[0].get("error") if bad else None,
    }
    # our transforms give HWC uint8 arrays (transforms.py); the device normalizes the batch
    batch["images"] = stack_hwc([s["image"] for s in good]) if good else torch.empty(0)
    if good and "target" in good[0]:
        batch["targets"] = torch.stack([s["target"] for s in good])
    if good and "fingerprint" in good[0]:
        batch["fingerprints"] = torch.from_numpy(np.stack([s["fingerprint"] for s in good]))
    return batch
