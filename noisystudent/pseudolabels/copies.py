"""Copies of eval images in the unlabeled pool: found from the label files' fingerprints and kept out of the
selection, so a student is never taught the answer to an image its report scores (docs/pseudolabels.md).

The eval side (data.eval and every eval.sets) is read once: each image's crop variants (data/fingerprints.py) go into
a cache beside the run (run_dir/eval_fingerprints/), one file per set, named by a digest of the set's shards (path,
size, modification time) and of the fingerprint's version; a later step, round or rerun over the same shards reads it
back. Matching runs on the main process over the label files one at a time (the pool side is 64 bytes per image, read
file by file; the eval side's variants are indexed in memory (data/fingerprints.py: EvalIndex, 76 bytes per variant,
15 KiB per eval image), built from the cache files mapped, not read; its 112x112 fine canvases stay in the cache file,
read for candidates only)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..data.fingerprints import CANON, FINE, EvalIndex, canvas, fine_canvas, match_refined, variant_count, variants
from ..data.labels import LabelFile, _decode_strings, _encode_strings
from ..data.shards import SampleDecoder
from ..data.streams import ShardBatches, make_loader
from ..errors import ConfigError
from ..files import atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)

CACHE = "eval_fingerprints"  # under run_dir
COPIES = "eval_copies.json"  # every match of the step, beside its summary
EXAMPLES = 20  # matches listed in summary.json (all of them are in eval_copies.json)
VERSION = 2  # of the cached variants: a change of the fingerprint makes old caches unread
LOOSE = 2.0  # pool images whose nearest variant is within LOOSE x max_rms get the fine crop search
MAX_RMS = 3.8  # the default: the 99.5th percentile of planted copies' distances on training images (bench_copies.py)


@dataclass(frozen=True)
class CopySettings:
    """pseudolabel.eval_copies.*"""
    exclude: bool  # matched pool images are dropped from the selection (counted either way)
    max_rms: float  # a pool image within this many grey levels (rms over the 8x8 thumbnail) of an eval image's
    # variant is a copy of it


def copy_settings(p) -> CopySettings:
    c = p.get("eval_copies") or {}
    exclude, max_rms = c.get("exclude", True), c.get("max_rms", MAX_RMS)
    if not isinstance(exclude, bool):
        raise ConfigError(f"pseudolabel.eval_copies.exclude={exclude!r}: use true (copies of eval images are kept "
                          "out of the selection) or false (counted only)")
    if isinstance(max_rms, bool) or not isinstance(max_rms, int | float) or not 0 < float(max_rms) <= 64:
        raise ConfigError(f"pseudolabel.eval_copies.max_rms={max_rms!r}: a distance in grey levels in (0, 64]; "
                          f"{MAX_RMS} finds 99.5% of re-posted copies (docs/pseudolabels.md#copies-of-eval-images)")
    return CopySettings(exclude, float(max_rms))


def _digest(urls: list[str]) -> str:
    h = hashlib.sha256(json.dumps({"version": VERSION}).encode())
    for u in urls:
        st = os.stat(u)
        h.update(json.dumps([os.path.abspath(u), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:16]


def _both_canvases(img) -> np.ndarray:
    """The eval pass's transform: an image's canvas (28x28) and fine canvas (112x112), packed into one HWC row so
    the loader stacks them like any image (`_unpack` splits them)."""
    both = np.concatenate([canvas(img).reshape(-1), fine_canvas(img).reshape(-1)])
    return both.reshape(1, -1, 1)


def _unpack(images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    flat = images.reshape(len(images), -1)
    return (flat[:, :CANON * CANON].reshape(-1, 1, CANON, CANON).contiguous(),
            flat[:, CANON * CANON:].reshape(-1, FINE, FINE).numpy().copy())


def eval_variants(name: str, urls: list[str], cache_dir: Path, batch_size: int, workers: int,
                  nice: int = 0) -> tuple[Path, list[str], list[str]]:
    """(the cache file of one eval set, each image's shard, its key): its images' variants (uint8 (N, V, 64)) and
    fine canvases (uint8 (N, 112, 112)), from the cache or read now (and cached: written under a temporary name and
    renamed, so two runs filling it at once leave one whole file)."""
    slug = name.replace("/", "_")
    path = cache_dir / f"{slug}-{_digest(urls)}.safetensors"
    if path.exists():
        with safe_open(str(path), framework="np") as f:
            shards = [urls[i] for i in f.get_tensor("shard").tolist()]
            return path, shards, _decode_strings(f.get_tensor("keys_utf8"), f.get_tensor("key_offsets"))
    decoder = SampleDecoder(_both_canvases, None, labeled=False)
    loader = make_loader(ShardBatches(urls, decoder, batch_size), workers, len(urls), nice)
    at = {u: i for i, u in enumerate(urls)}
    shard, keys = [], []
    cache_dir.mkdir(parents=True, exist_ok=True)
    # the variants and fine canvases (25 KB an image) go to spool files batch by batch, not to memory: an eval
    # side of 1M images would otherwise hold 25 GB until the end of the pass
    spool = {n: cache_dir / f".{slug}.{n}.{os.getpid()}.spool" for n in ("variants", "fine")}
    try:
        with open(spool["variants"], "wb") as fv, open(spool["fine"], "wb") as ff, torch.inference_mode():
            for batch in loader:
                if "error" in batch:
                    raise ConfigError(f"{name}: shard {batch['shard']} cannot be read ({batch['error']}), so pool "
                                      "images cannot be checked against it: fix the shard, or set "
                                      "pseudolabel.eval_copies.exclude=false and check by hand")
                if not batch["keys"]:
                    continue
                coarse, fine = _unpack(batch["images"])
                fv.write(np.ascontiguousarray(variants(coarse).numpy()).tobytes())
                ff.write(np.ascontiguousarray(fine).tobytes())
                shard += [at[batch["shard"]]] * len(batch["keys"])
                keys += list(batch["keys"])
        kb, ko = _encode_strings(keys)
        n = len(keys)
        _write_safetensors(path, [("variants", "U8", (n, variant_count(), 64), spool["variants"]),
                                  ("fine", "U8", (n, FINE, FINE), spool["fine"]),
                                  ("shard", "I32", (n,), np.array(shard, np.int32)),
                                  ("keys_utf8", "U8", kb.shape, kb), ("key_offsets", "I64", ko.shape, ko)],
                           {"set": name})
    finally:
        for f in spool.values():
            f.unlink(missing_ok=True)
    log.info("%s: %d images fingerprinted (%d variants each) -> %s", name, len(keys), variant_count(), path)
    return path, [urls[i] for i in shard], keys


def _write_safetensors(path: Path, tensors: list[tuple[str, str, tuple, Path | np.ndarray]], metadata: dict) -> None:
    """A safetensors file from arrays and from spool files of raw bytes (copied in, never read whole): the format's
    header (little-endian u64 length, JSON of dtype, shape and byte range per tensor, padded to 8 bytes), then the
    tensors' bytes in that order. Written whole or not at all (atomic_write)."""
    header, at = {"__metadata__": metadata}, 0
    for name, dtype, shape, src in tensors:
        size = src.stat().st_size if isinstance(src, Path) else src.nbytes
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with atomic_write(path, shared=True) as out:  # runs filling one cache at once: each file whole, the last wins
        out.write(len(head).to_bytes(8, "little"))
        out.write(head)
        for _, _, _, src in tensors:
            if isinstance(src, Path):
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
            else:
                out.write(np.ascontiguousarray(src).tobytes())


@dataclass
class EvalSide:
    """Every eval image's variants, indexed, what each row is, and where its fine canvas is read from."""
    index: EvalIndex
    owners: list[tuple[str, str, str]]  # (set, shard, key) per eval image
    images: dict[str, int]  # per set
    files: list[tuple[int, Path]]  # (first row, cache file) per set: fine canvases are read row by row, when asked
    _open: dict = field(default_factory=dict)  # cache file -> its open reader (one per file, not one per candidate)

    def fine_of(self, row: int) -> np.ndarray:
        first, path = next((a, p) for a, p in reversed(self.files) if a <= row)
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="np")
        return self._open[path].get_slice("fine")[row - first]

    @classmethod
    def read(cls, sets: dict[str, list[str]], cache_dir: Path, batch_size: int, workers: int,
             nice: int = 0) -> EvalSide:
        parts, owners, images, files = [], [], {}, []
        for name, urls in sets.items():
            path, shards, keys = eval_variants(name, urls, cache_dir, batch_size, workers, nice)
            parts.append(_mapped(path, "variants"))
            files.append((len(owners), path))
            owners += [(name, s, k) for s, k in zip(shards, keys, strict=True)]
            images[name] = len(keys)
        return cls(EvalIndex.build(parts or np.zeros((0, 1, 64), np.uint8)), owners, images, files)


def _mapped(path: Path, name: str) -> np.ndarray:
    """A uint8 tensor of a safetensors file, mapped instead of read (the index is built from it slice by slice:
    12 GiB of variants per 1M eval images are never in memory twice). The file is replaced only by a rename, so the
    mapping stays whole while a concurrent run refills the cache."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(size))[name]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if entry["dtype"] != "U8":
        raise ValueError(f"{path}: {name} is {entry['dtype']}, not uint8: delete the file to make it again")
    if end == begin:  # an empty set: nothing to map
        return np.zeros(shape, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size + begin, shape=shape)


def find_copies(files: Iterable[LabelFile], side: EvalSide, max_rms: float) -> tuple[dict[str, np.ndarray], list]:
    """({label file name: rows that copy an eval image}, one record per match), file by file. A record's `refined`:
    the match needed the fine crop search (data/fingerprints.py: `refine`)."""
    rows_by_file: dict[str, np.ndarray] = {}
    records = []
    for f in files:
        if not f.has_fingerprints:
            raise ConfigError(f"label file {f.path} was made by an older version (format {f.format}) and holds no "
                              "image fingerprints, so its images cannot be checked for copies of eval images: rerun "
                              "stage=pseudolabel with force=true to label again, or set "
                              "pseudolabel.eval_copies.exclude=false (nothing is then checked)")
        found, dist, refined = match_refined(f["fingerprint"], side.index, side.fine_of, max_rms, LOOSE * max_rms)
        hit = np.flatnonzero(found >= 0)
        if not len(hit):
            continue
        rows_by_file[f.path.name] = hit
        keys = f.keys()
        shard = f.meta.get("shard", f.path.name)
        for i in hit.tolist():
            name, eshard, ekey = side.owners[int(found[i])]
            records.append({"shard": shard, "key": keys[i], "eval_set": name, "eval_shard": eshard,
                            "eval_key": ekey, "rms": round(float(dist[i]), 2), "refined": bool(refined[i])})
    return rows_by_file, records


def write_copies(out: Path, records: list[dict]) -> None:
    atomic_write_bytes(out / COPIES, json.dumps(records, indent=0).encode())
