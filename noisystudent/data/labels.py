"""Pseudo-label files: one per unlabeled shard, next to nothing but labels (images are never copied).

Format: safetensors (byte-for-byte deterministic, read array by array without loading the rest):
    keys_utf8 uint8[*], key_offsets int64[n+1]   the sample keys, in shard order
    topk_ids int32[n, k], topk_probs float16[n, k]
    confidence float32[n] (top-1 probability), argmax int32[n]
    keyhash uint64[n]     a stable hash of the key: deterministic tie-break for balancing
    corrupt_utf8 / corrupt_offsets   keys of images that did not decode (skipped)
    logit_lse float32[n], max_logit float32[n]   (format 2) the logits' logsumexp and maximum at temperature 1:
                          out-of-domain scores (energy = -logit_lse; pseudolabels/pool.py)
    fingerprint uint8[n, 64]   (format 3) each image's 8x8 grey thumbnail (data/fingerprints.py): what finds the
                          copies of eval images in the pool
    cls int32[n]          (only when a sample carried one) its true class for the audit: -1 where unknown, -2 for
                          an image of no class of the data set (its `cls` was -1)
    confidence_raw float32[n]   (only with pseudolabel.calibrate) the top-1 probability before calibration
metadata: format, shard, num_classes, topk, temperature, hard, images, corrupt.
Written under a temporary name and renamed when whole, so a file that exists is complete.

Format 1 files (no `format` in the metadata: versions before the out-of-domain scores) are still read: everything
works from them but what needs the scores (the out-of-domain filter and count), which says to label again. Format 2
files (before the fingerprints) likewise: the search for copies of eval images refuses them, saying what to do."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from ..errors import DataError
from ..files import atomic_write_bytes

SUFFIX = ".labels.safetensors"
FORMAT = 3  # the label files this version writes (the module's docstring)
SCORES = ("logit_lse", "max_logit")  # the out-of-domain scores a format-2 file holds
ERROR_SUFFIX = ".error.json"


def shard_stem(url: str) -> str:
    name = os.path.basename(url.rstrip("/"))
    return name[:-4] if name.endswith(".tar") else name


def label_paths(urls: list[str], labels_dir: str | os.PathLike, key: str = "data.unlabeled") -> dict[str, Path]:
    """url -> its label file. Shard file names must be unique (they name the label files)."""
    out: dict[str, Path] = {}
    seen: dict[str, str] = {}
    for u in urls:
        stem = shard_stem(u)
        if stem in seen:
            raise DataError(f"{key}: shards {seen[stem]} and {u} have the same file name; label files "
                            "are named after shards, so give the shards unique names")
        seen[stem] = u
        out[u] = Path(labels_dir) / f"{stem}{SUFFIX}"
    return out


def key_hash(keys: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys],
                    dtype=np.uint64)


def _encode_strings(items: list[str]) -> tuple[np.ndarray, np.ndarray]:
    raw = [s.encode() for s in items]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in raw], out=offsets[1:])
    return np.frombuffer(b"".join(raw), dtype=np.uint8).copy(), offsets


def _decode_strings(buf: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = buf.tobytes()
    return [data[offsets[i]:offsets[i + 1]].decode() for i in range(len(offsets) - 1)]


def topk_on_device(probs, k: int):
    """(top-k ids int32, top-k probs float32) of [n, C] probabilities, left on their device."""
    import torch

    vals, ids = torch.topk(probs.float(), min(k, probs.shape[1]), dim=1)
    return ids.to(torch.int32), vals


def topk_arrays(ids, vals):
    """`topk_on_device`'s tensors -> (top-k ids int32, top-k probs float16, confidence float32, argmax int32)
    arrays, as label files store them. Reads the device: call it once the next batch is queued."""
    import torch

    ids, vals = ids.cpu().numpy(), vals.cpu()
    return ids, vals.to(torch.float16).numpy(), vals[:, 0].numpy(), ids[:, 0].copy()


def write_label_file(path: str | os.PathLike, shard: str, keys: list[str], topk_ids: np.ndarray,
                     topk_probs: np.ndarray, confidence: np.ndarray, argmax: np.ndarray,
                     corrupt_keys: list[str], meta: dict, extra: dict[str, np.ndarray] | None = None) -> None:
    """`extra`: the optional arrays (cls, confidence_raw, and the scores logit_lse and max_logit and the fingerprint
    that every file this version writes has), one row per key."""
    kb, ko = _encode_strings(keys)
    cb, co = _encode_strings(corrupt_keys)
    n = len(keys)
    k = int(meta["topk"])
    tensors = {
        "keys_utf8": kb, "key_offsets": ko,
        "topk_ids": np.ascontiguousarray(topk_ids, dtype=np.int32).reshape(n, -1) if n else np.zeros((0, k), np.int32),
        "topk_probs": np.ascontiguousarray(topk_probs, dtype=np.float16).reshape(n, -1) if n
        else np.zeros((0, k), np.float16),
        "confidence": np.ascontiguousarray(confidence, dtype=np.float32),
        "argmax": np.ascontiguousarray(argmax, dtype=np.int32),
        "keyhash": key_hash(keys),
        "corrupt_utf8": cb, "corrupt_offsets": co,
    }
    for name, arr in (extra or {}).items():
        if name == "fingerprint":
            tensors[name] = np.ascontiguousarray(arr, dtype=np.uint8).reshape(n, -1)
            continue
        tensors[name] = np.ascontiguousarray(arr, dtype=np.int32 if name == "cls" else np.float32).reshape(n)
    metadata = {k: str(v) for k, v in meta.items()}
    metadata.update(shard=shard, images=str(n), corrupt=str(len(corrupt_keys)))
    if all(name in tensors for name in SCORES):
        metadata["format"] = str(FORMAT if "fingerprint" in tensors else 2)
    # one metadata entry holding sorted JSON: safetensors writes several entries in hash-map
    # order, which would make identical labels differ byte for byte between runs
    atomic_write_bytes(path, save(tensors, metadata={"noisystudent": json.dumps(metadata, sort_keys=True)}))


class LabelFile:
    """Lazy reader: each array is read only when asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._f = safe_open(str(self.path), framework="np")
        except Exception as e:  # noqa: BLE001
            raise DataError(f"label file {self.path} cannot be read ({e}); delete it and rerun stage=pseudolabel "
                            "to label its shard again") from None
        self.meta = json.loads((self._f.metadata() or {}).get("noisystudent", "{}"))

    def __getitem__(self, name: str) -> np.ndarray:
        return self._f.get_tensor(name)

    def has(self, name: str) -> bool:
        return name in self._f.keys()  # noqa: SIM118 - safe_open has keys(), no __contains__

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def format(self) -> int:
        return int(self.meta.get("format", 1))

    @property
    def has_scores(self) -> bool:
        """Whether the file holds the out-of-domain scores (format 2)."""
        return all(self.has(name) for name in SCORES)

    @property
    def has_fingerprints(self) -> bool:
        """Whether the file holds the images' fingerprints (format 3)."""
        return self.has("fingerprint")

    @property
    def hard(self) -> bool:
        return self.meta.get("hard") == "True"

    def keys(self) -> list[str]:
        return _decode_strings(self["keys_utf8"], self["key_offsets"])

    def corrupt_keys(self) -> list[str]:
        return _decode_strings(self["corrupt_utf8"], self["corrupt_offsets"])


class LabelFiles(Sequence):
    """Label files opened one at a time, when each is read (a fresh LabelFile per access): a pass over the
    thousands of files of a large pool holds one open, as an open file keeps what was read of it mapped."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LabelFiles(self.paths[i])
        return LabelFile(self.paths[i])

    def __iter__(self) -> Iterator[LabelFile]:
        for p in self.paths:
            yield LabelFile(p)


def soft_targets(topk_ids: np.ndarray, topk_probs: np.ndarray, num_classes: int, hard: bool) -> np.ndarray:
    """[n, C] target distributions from top-k: one-hot of the top class for hard labels; for soft
    labels the top-k probabilities, with the mass the file did not keep spread evenly over the
    other classes (exact when topk >= num_classes)."""
    n, k = topk_ids.shape
    out = np.zeros((n, num_classes), dtype=np.float32)
    if n == 0:
        return out
    rows = np.arange(n)[:, None]
    if hard:
        out[np.arange(n), topk_ids[:, 0]] = 1.0
        return out
    probs = topk_probs.astype(np.float32)
    rest = np.clip(1.0 - probs.sum(axis=1, keepdims=True), 0.0, None)
    if num_classes > k:
        out += rest / (num_classes - k)
    out[rows, topk_ids] = probs
    return out / out.sum(axis=1, keepdims=True)
