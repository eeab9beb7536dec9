"""The index pass of the DALI input path: every sample of a shard found, its image validated once, and a
DALI index file written that lists only the samples whose image decodes.

DALI's webdataset reader has no option to skip a sample whose image it cannot decode: one corrupt JPEG
in a huge shard set kills the pipeline. So the pass here reads each shard once (tar headers for the
offsets, PIL for the image: JPEGs in draft mode, which still reads all of their entropy-coded data and so
finds a truncated file, at a fraction of a full decode), drops what does not decode, counts it, and
keeps the keys. DALI then only ever sees images PIL has decoded, which are the images the torch path
keeps: the two paths train and label the same samples.

What is written lives under the run directory (`run_dir/dali_index/`), never beside the user's shards
(often read-only, or shared by other runs): per shard a JSON record (size and mtime of the tar it was
made from, every sample's key, image member offset and size, raw `cls`, the keys that did not decode and
why) and the DALI index file made from it. A record whose tar has another size or mtime is made again;
otherwise it is reused by every later step and round. The index file format is DALI's own (`wds2idx`,
version v1.2): a header `v1.2 N`, then one line per sample, `ext offset size name` per component. Only
the image component is listed; a sample listed k times is read k times (how the student's stream applies
the selection's repeat factors, `write_dali_index(repeats=...)`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..files import atomic_write_bytes
from .shards import IMAGE_EXTS, audit_class, parse_label

INDEX_VERSION = "v1.2"
RECORD_VERSION = 1


def split_member_name(name: str) -> tuple[str, str]:
    """tar member name -> (sample key, extension), as webdataset and DALI split it: the key runs to the
    first dot of the file name ("a/b.c.jpg" -> ("a/b", "c.jpg"))."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def validate_image(data: bytes) -> str | None:
    """None when PIL decodes the image (as the torch path would), else the reason."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", (1, 1))  # DCT-scaled decode: every byte of the scan is still read
        img.load()
        img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any failure makes it a corrupt image, as on the torch path
        return f"{type(e).__name__}: {e}"
    return None


@dataclass
class ShardRecord:
    """One shard as the index pass found it."""

    url: str
    keys: list[str] = field(default_factory=list)
    exts: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # of each kept sample's image member's data
    sizes: list[int] = field(default_factory=list)
    cls: list[str | None] = field(default_factory=list)  # the raw .cls text, None where there is none
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, why) of images that did not decode
    error: str | None = None  # the tar itself could not be read: the shard is left out, as on the torch path

    def __len__(self) -> int:
        return len(self.keys)

    def labels(self, num_classes: int | None, labeled: bool, audit_classes: bool = False) -> np.ndarray:
        """Each kept sample's class, with the torch path's rules (`SampleDecoder.label_of`): labeled shards
        must carry a valid class (a DataError naming shard and key otherwise); unlabeled ones give -1, or with
        audit_classes what their cls says (`audit_class`: a class, no class, or unknown)."""
        out = np.full(len(self.keys), -1, dtype=np.int64)
        for i, (key, raw) in enumerate(zip(self.keys, self.cls, strict=True)):
            sample = {"__url__": self.url, "__key__": key, "jpg": b""}
            if raw is not None:
                sample["cls"] = raw
            if labeled:
                out[i] = parse_label(sample, num_classes)
            elif audit_classes:
                out[i] = audit_class(sample, num_classes)
        return out


def _read_shard(url: str) -> ShardRecord:
    rec = ShardRecord(url)
    samples: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(url, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not key or os.path.basename(key).startswith("."):
                    continue
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                ext = ext.lower()
                if ext in IMAGE_EXTS and "image" not in samples[key]:
                    f = tar.extractfile(member)  # validated now: a shard's images are never all in memory
                    why = validate_image(f.read() if f else b"")
                    samples[key]["image"] = (ext, member.offset_data, member.size, why)
                elif ext == "cls":
                    f = tar.extractfile(member)
                    samples[key]["cls"] = (f.read() if f else b"").decode(errors="replace")
                else:
                    samples[key].setdefault("other", []).append(ext)
    except (tarfile.TarError, OSError, EOFError) as e:
        rec.error = f"{type(e).__name__}: {e} (shard {url})"
        return rec
    for key in order:
        s = samples[key]
        if "image" not in s:
            found = sorted(s.get("other", [])) + (["cls"] if "cls" in s else [])
            raise DataError(f"shard {url}, sample {key!r}: no image entry (expected one of {', '.join(IMAGE_EXTS)}; "
                            f"found {found}). Shards must hold images: make them with stage=import")
        ext, offset, size, why = s["image"]
        if why is not None:
            rec.bad.append((key, f"shard {url}, sample {key!r}: {why}"))
            continue
        rec.keys.append(key)
        rec.exts.append(ext)
        rec.offsets.append(offset)
        rec.sizes.append(size)
        rec.cls.append(s.get("cls"))
    return rec


def _stamp(url: str) -> dict:
    st = os.stat(url)
    return {"url": os.path.abspath(url), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def record_path(index_dir: Path, url: str) -> Path:
    digest = hashlib.sha1(os.path.abspath(url).encode()).hexdigest()[:12]
    return Path(index_dir) / f"{Path(url).name}.{digest}.json"


def write_dali_index(path: Path, rec: ShardRecord, repeats: np.ndarray | None = None) -> int:
    """DALI's index file for the kept samples of `rec`, each listed repeats[i] times (default once);
    written atomically. Returns the number of samples listed."""
    reps = np.ones(len(rec), dtype=np.int64) if repeats is None else np.asarray(repeats, dtype=np.int64)
    lines = []
    for i, r in enumerate(reps):
        if r > 0:
            line = f"{rec.exts[i]} {rec.offsets[i]} {rec.sizes[i]} {rec.keys[i]}.{rec.exts[i]}"
            lines.extend([line] * int(r))
    atomic_write_bytes(path, (f"{INDEX_VERSION} {len(lines)}\n" + "".join(f"{ln}\n" for ln in lines)).encode())
    return len(lines)


def load_record(index_dir: Path, url: str) -> ShardRecord | None:
    """The stored record of `url` when it was made from the tar as it is now, else None."""
    path = record_path(index_dir, url)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("version") != RECORD_VERSION or data.get("stamp") != _stamp(url):
        return None
    rec = ShardRecord(url, data["keys"], data["exts"], data["offsets"], data["sizes"], data["cls"],
                      [tuple(b) for b in data["bad"]], data["error"])
    return rec


def index_shard(index_dir: Path, url: str) -> ShardRecord:
    """The record of one shard: reused when stored for the tar as it is, else made and stored (the JSON
    record and its DALI index file, `<record>.idx`)."""
    rec = load_record(index_dir, url)
    if rec is not None:
        return rec
    stamp = _stamp(url)
    rec = _read_shard(url)
    path = record_path(index_dir, url)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rec.error is None and len(rec):
        write_dali_index(path.with_suffix(".idx"), rec)
    atomic_write_bytes(path, json.dumps({"version": RECORD_VERSION, "stamp": stamp, "keys": rec.keys,
                                         "exts": rec.exts, "offsets": rec.offsets, "sizes": rec.sizes,
                                         "cls": rec.cls, "bad": rec.bad, "error": rec.error}).encode())
    return rec


def index_path(index_dir: Path, url: str) -> Path:
    """The DALI index file of `url` (every kept sample once), made by `index_shard`."""
    return record_path(index_dir, url).with_suffix(".idx")


def index_shards(index_dir: Path, urls: list[str], threads: int = 1, accelerator=None) -> dict[str, ShardRecord]:
    """url -> record for every shard of `urls`. With an accelerator, each process makes the records of
    its share (urls[rank::world]) and all then read every record; within a process `threads` threads
    validate shards in parallel (PIL decodes without holding the GIL)."""
    urls = list(dict.fromkeys(urls))
    mine = urls if accelerator is None else urls[accelerator.process_index::accelerator.num_processes]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        made = dict(zip(mine, pool.map(lambda u: index_shard(index_dir, u), mine), strict=True))
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    out = {}
    for url in urls:
        rec = made.get(url) or load_record(index_dir, url)
        if rec is None:  # another process's record is missing: that process failed, or the tar changed since
            raise DataError(f"the DALI index record of shard {url} is missing from {index_dir} after the index "
                            "pass (another process failed, or the shard changed during it): rerun the step")
        out[url] = rec
    return out
