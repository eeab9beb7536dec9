"""The index pass of the DALI input path: every sample of a shard found, its image checked once, and a
DALI index file written that lists only the samples whose image decodes.

DALI's webdataset reader has no option to skip a sample whose image it cannot decode: one corrupt JPEG
in a huge shard set kills the pipeline. So the pass here reads each shard once (tar headers for the
offsets; each image's bytes for data/image_check.py, which tells a whole JPEG or PNG from a broken one without
decoding it), drops what is broken, counts it, and keeps the keys. An image the structural check
does not vouch for (another format, an unusual JPEG process, a JPEG with no EOI at its end, a PNG CRC
mismatch) is decoded by PIL, as the torch path would (JPEGs in draft mode: all of their entropy-coded data is
still read, so a truncated file is found), and kept only where it decodes. DALI then only ever sees images
PIL decodes, which are the images the torch path keeps: the two paths train and label the same samples.
`check="decode"` decodes every image with PIL instead (the pass as it was; benchmarks/bench_index.py).

Where records live: `index_dir`, run_dir/dali_index/ by default, or a folder many runs share
(`data.index_cache`): never beside the user's shards (often read-only, or shared). Per shard a record
(`<tar name>.<digest of its path>.rec`: one JSON header line (the tar's path, size and mtime it was made
from, counts, the first corrupt keys, the tar's own error, its index file's name), then one JSON line with
every kept sample's key, image extension, member offset and size, raw `cls`, and every dropped key with
why) and the DALI index file made from it (`<...>.<digest of the stamp>.idx`: named after the tar's state,
so two runs filling a shared folder at once, or a shard rewritten meanwhile, never pair a record with
another state's index). A record whose tar has another size or mtime is made again; otherwise every later
step, round and run reuses it. Writes are atomic with per-process temporary names: concurrent fills of
one record each write it whole, and the last rename wins.

Memory: `index_shards` returns `ShardRecords`, which holds a few numbers per shard (its sample count, its
corrupt count, its index file) and reads a shard's full record only when asked for it (`records[url]`):
a process holds the records of the shards it reads, not of the whole data set.

The index file format is DALI's own (`wds2idx`, version v1.2): a header `v1.2 N`, then one line per
sample, `ext offset size name` per component. Only the image component is listed; a sample listed k times
is read k times (how the student's stream applies the selection's repeat factors,
`write_dali_index(repeats=...)`)."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
from array import array
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..files import atomic_write_bytes
from .image_check import BAD, IMAGE_EXTS, OK, check_structure
from .shards import audit_class, parse_label
from .tar_headers import BlockReader
from .tar_headers import members as tar_members

INDEX_VERSION = "v1.2"
RECORD_VERSION = 2
CHECKS = ("structure", "decode")
MAX_BAD_SHOWN = 20  # corrupt keys a record's header (and so a step's summary) names


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
    unsure: int = 0  # images the structural check left to PIL (decoded to decide)

    def __len__(self) -> int:
        return len(self.keys)

    def counts(self) -> dict:
        """What a record's header says of the shard's samples (ShardRecords keeps these per shard)."""
        return {"n": len(self), "n_bad": len(self.bad), "bad_first": self.bad[:MAX_BAD_SHOWN], "unsure": self.unsure,
                "error": self.error}

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


def check_image(data: bytes | memoryview, check: str = "structure") -> tuple[str | None, bool]:
    """(None when the image is kept, else why it is dropped; whether PIL had to decode it). check="structure":
    image_check's verdict, and a PIL decode only where it is unsure; check="decode": a PIL decode of every image
    (the pass as it was)."""
    if check == "structure":
        verdict, why = check_structure(data)
        if verdict == OK:
            return None, False
        if verdict == BAD:
            return why, False
    return validate_image(data), True


def _read_shard(url: str, check: str = "structure") -> ShardRecord:
    rec = ShardRecord(url)
    samples: dict[str, dict] = {}
    order: list[str] = []
    try:
        fd = os.open(url, os.O_RDONLY)
        try:
            f = BlockReader(fd)
            for member in tar_members(f):
                if not member.regular:
                    continue
                key, ext = split_member_name(member.name)
                if not key or os.path.basename(key).startswith("."):
                    continue
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                ext = ext.lower()
                if ext in IMAGE_EXTS and "image" not in samples[key]:
                    data = f.read(member.offset, member.size)  # a view into the reader's buffer: checked at once
                    why, decoded = check_image(data, check)
                    rec.unsure += decoded
                    samples[key]["image"] = (ext, member.offset, member.size, why)
                elif ext == "cls":
                    samples[key]["cls"] = bytes(f.read(member.offset, member.size)).decode(errors="replace")
                else:
                    samples[key].setdefault("other", []).append(ext)
        finally:
            os.close(fd)
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


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def record_path(index_dir: Path, url: str) -> Path:
    return Path(index_dir) / f"{Path(url).name}.{_digest(os.path.abspath(url))}.rec"


def write_dali_index(path: Path, rec: ShardRecord, repeats: np.ndarray | None = None, shared: bool = False) -> int:
    """DALI's index file for the kept samples of `rec`, each listed repeats[i] times (default once);
    written atomically. Returns the number of samples listed."""
    reps = np.ones(len(rec), dtype=np.int64) if repeats is None else np.asarray(repeats, dtype=np.int64)
    lines = []
    for i, r in enumerate(reps):
        if r > 0:
            line = f"{rec.exts[i]} {rec.offsets[i]} {rec.sizes[i]} {rec.keys[i]}.{rec.exts[i]}"
            lines.extend([line] * int(r))
    atomic_write_bytes(path, (f"{INDEX_VERSION} {len(lines)}\n" + "".join(f"{ln}\n" for ln in lines)).encode(), shared)
    return len(lines)


def _current_head(line: bytes, url: str) -> dict | None:
    """A record's header line, when it was made in this format from the tar as it is now."""
    head = json.loads(line)
    return head if head.get("version") == RECORD_VERSION and head.get("stamp") == _stamp(url) else None


def load_head(index_dir: Path, url: str) -> dict | None:
    """The header of the stored record of `url` when it was made from the tar as it is now, else None (no record,
    an older format, another size or mtime). Reads one line."""
    try:
        with open(record_path(index_dir, url), "rb") as f:
            return _current_head(f.readline(), url)
    except (OSError, ValueError):
        return None


def load_record(index_dir: Path, url: str) -> ShardRecord | None:
    """The stored record of `url` when it was made from the tar as it is now, else None."""
    try:
        with open(record_path(index_dir, url), "rb") as f:
            head = _current_head(f.readline(), url)
            if head is None:
                return None
            body = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return ShardRecord(url, body["keys"], body["exts"], body["offsets"], body["sizes"], body["cls"],
                       [tuple(b) for b in body["bad"]], head["error"], head.get("unsure", 0))


def index_shard(index_dir: Path, url: str, check: str = "structure") -> dict:
    """The record of one shard, made and stored (the record and its DALI index file) unless one is stored for the
    tar as it is. Returns its header (load_head's): the full record is read again only by whoever reads the shard."""
    head = load_head(index_dir, url)
    if head is not None:
        return head
    stamp = _stamp(url)
    rec = _read_shard(url, check)
    path = record_path(index_dir, url)
    idx = None
    if rec.error is None and len(rec):
        idx = f"{path.stem}.{_digest(json.dumps(stamp, sort_keys=True))}.idx"
        write_dali_index(path.parent / idx, rec, shared=True)  # before the record that names it
    head = {"version": RECORD_VERSION, "stamp": stamp, "check": check, **rec.counts(), "index_file": idx}
    body = {"keys": rec.keys, "exts": rec.exts, "offsets": rec.offsets, "sizes": rec.sizes, "cls": rec.cls,
            "bad": rec.bad}
    atomic_write_bytes(path, (json.dumps(head) + "\n" + json.dumps(body) + "\n").encode(), shared=True)
    return head


class ShardRecords(Mapping):
    """url -> ShardRecord over the shards of one index pass, read from `index_dir` when asked for. Holds per shard
    only its counts and index file (a few numbers: flat in the data set's size), so a process that reads some
    shards holds only their records."""

    def __init__(self, index_dir: Path):
        self.index_dir = Path(index_dir)
        self.urls: list[str] = []
        self._pos: dict[str, int] = {}
        self._n, self._n_bad, self._idx = array("q"), array("q"), []
        # only the shards that have them: a handful in a healthy data set
        self._errors: dict[str, str] = {}
        self._bad_first: dict[str, list[tuple[str, str]]] = {}
        self._held: dict[str, ShardRecord] = {}

    def add(self, url: str, head: dict) -> None:
        """One shard's record header (load_head's); the header itself is not kept."""
        self._pos[url] = len(self.urls)
        self.urls.append(url)
        self._n.append(head["n"])
        self._n_bad.append(head["n_bad"])
        self._idx.append(head["index_file"])
        if head["error"]:
            self._errors[url] = head["error"]
        if head["bad_first"]:
            self._bad_first[url] = [tuple(b) for b in head["bad_first"]]

    @classmethod
    def holding(cls, records: list[ShardRecord], index_dir: Path = Path(".")) -> ShardRecords:
        """Records made in memory (no index pass behind them: tests, tools), held and handed out as they are."""
        out = cls(index_dir)
        for rec in records:
            out.add(rec.url, {**rec.counts(), "index_file": None})
            out._held[rec.url] = rec
        return out

    def __getitem__(self, url: str) -> ShardRecord:
        if url not in self._pos:
            raise KeyError(url)
        if url in self._held:
            return self._held[url]
        rec = load_record(self.index_dir, url)
        if rec is None:
            raise DataError(f"the DALI index record of shard {url} in {self.index_dir} is gone or no longer matches "
                            "the tar (it changed during the step?): rerun the step")
        return rec

    def __iter__(self):
        return iter(self.urls)

    def __len__(self) -> int:
        return len(self.urls)

    def count(self, url: str) -> int:
        """Kept samples of `url`."""
        return self._n[self._pos[url]]

    def error(self, url: str) -> str | None:
        return self._errors.get(url)

    def readable(self, url: str) -> bool:
        """`url` has samples DALI can read (the tar reads, at least one image decodes)."""
        return url not in self._errors and self.count(url) > 0

    def index_file(self, url: str) -> Path:
        """The DALI index file of `url` (every kept sample once)."""
        name = self._idx[self._pos[url]]
        if name is None:
            raise DataError(f"shard {url} has no sample DALI can read: it has no index file")
        return self.index_dir / name

    def corrupt(self, urls: list[str]) -> tuple[int, list[tuple[str, str]]]:
        """(images dropped from `urls`, the first MAX_BAD_SHOWN of them as (key, why))."""
        shown = [b for u in urls for b in self._bad_first.get(u, ())][:MAX_BAD_SHOWN]
        return sum(self._n_bad[self._pos[u]] for u in urls), shown


def _make_records(index_dir: Path, urls: list[str], workers: int, check: str) -> dict[str, dict]:
    """index_shard over `urls`, in `workers` processes: the check is Python and numpy on small arrays, which hold
    the GIL (threads measured no faster than one), so a host's cores need processes. Forked, as torch's DataLoader
    workers are (they touch no device); an error in one shard stops the others at once."""
    found = {u: load_head(index_dir, u) for u in urls}  # stored already (a later step, round or run): no pool
    todo = [u for u, head in found.items() if head is None]
    if workers <= 1 or len(todo) <= 1:
        return {u: found[u] or index_shard(index_dir, u, check) for u in urls}
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx)
    try:
        found.update(zip(todo, pool.map(index_shard, repeat(index_dir), todo, repeat(check)), strict=True))
        return found
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def index_shards(index_dir: Path, urls: list[str], threads: int = 1, accelerator=None,
                 check: str = "structure") -> ShardRecords:
    """The records of every shard of `urls` (ShardRecords: read lazily). With an accelerator, each process makes
    the records of its share (urls[rank::world]) and all then read every record's header; within a process
    `threads` worker processes check shards in parallel (num_workers: the loader CPUs of each process)."""
    if check not in CHECKS:
        raise ValueError(f"check={check!r}: use one of {CHECKS}")
    urls = list(dict.fromkeys(urls))
    mine = urls if accelerator is None else urls[accelerator.process_index::accelerator.num_processes]
    made = _make_records(index_dir, mine, threads, check)
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
    records = ShardRecords(index_dir)
    for url in urls:
        head = made.pop(url, None) or load_head(index_dir, url)
        if head is None:  # another process's record is missing: that process failed, or the tar changed since
            raise DataError(f"the DALI index record of shard {url} is missing from {index_dir} after the index "
                            "pass (another process failed, or the shard changed during it): rerun the step")
        records.add(url, head)
    return records
