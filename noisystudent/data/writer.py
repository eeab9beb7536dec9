"""Writing image shards: one tar per shard, made under a temporary name and renamed when whole,
plus a manifest (sample count per shard) that lets training size its epochs without a scan."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from PIL import Image

from ..files import atomic_write, write_json
from .shards import MANIFEST


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    """Write samples (dicts with __key__ and payloads) to one tar, atomically. Returns the count."""
    n = 0
    with atomic_write(path) as f, wds.TarWriter(f) as sink:
        for sample in samples:
            sink.write(sample)
            n += 1
    return n


def update_manifest(directory: str | os.PathLike, counts: dict[str, int], **info) -> dict:
    """Merge shard counts into directory/manifest.json (atomically)."""
    mpath = Path(directory) / MANIFEST
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {"shards": {}}
    manifest["shards"].update(counts)
    manifest.update(info)
    manifest["total"] = int(sum(manifest["shards"].values()))
    write_json(mpath, manifest)
    return manifest
