"""Import a directory of images as shards (the image bytes are stored as they are, not re-encoded).

ImageFolder-style `src/<class>/<image>` -> labeled shards (class ids by sorted class name, written
to classes.json); a flat `src/<image>` -> unlabeled shards. A manifest records per-shard counts
and the files that were skipped (not an image by extension, or not decodable)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from PIL import Image

from ..errors import ConfigError
from ..files import atomic_write_bytes
from .shards import IMAGE_EXTS
from .writer import update_manifest, write_shard

log = logging.getLogger(__name__)

_SUFFIXES = {f".{e}" for e in IMAGE_EXTS}


def _ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _verify(path: Path) -> str | None:
    """None if the file decodes as an image, else the reason."""
    try:
        with Image.open(path) as img:
            img.verify()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means not importable
        return f"{type(e).__name__}: {e}"


def scan(src: Path, kind: str) -> tuple[str, list[tuple[Path, int]], list[str]]:
    """(kind, [(file, class id or -1)], class names) for an ImageFolder or a flat directory."""
    if not src.is_dir():
        raise ConfigError(f"stage.src={str(src)!r} is not a directory")
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if kind == "auto":
        kind = "labeled" if class_dirs else "unlabeled"
    if kind not in ("labeled", "unlabeled"):
        raise ConfigError(f"stage.kind={kind!r}: use labeled, unlabeled or auto")
    if kind == "labeled":
        if not class_dirs:
            raise ConfigError(f"stage.src={str(src)!r} has no class subdirectories; a labeled import needs "
                              "src/<class name>/<images>, or use stage.kind=unlabeled")
        files = [(f, c) for c, d in enumerate(class_dirs) for f in sorted(d.rglob("*")) if f.is_file()]
        return kind, files, [d.name for d in class_dirs]
    return kind, [(f, -1) for f in sorted(src.rglob("*")) if f.is_file()], []


def holdout_split(good: list[tuple[Path, int]], src: Path, fraction: float, seed: int
                  ) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(kept, held out): per class, round(fraction x its images) held out (at least one, and at least one kept,
    for a class of two or more), chosen by a permutation seeded by (seed, class) over the files' sorted relative
    paths: stratified, disjoint, and the same for the same folder and seed on any machine."""
    import numpy as np

    by_class: dict[int, list[tuple[Path, int]]] = {}
    for item in good:
        by_class.setdefault(item[1], []).append(item)
    kept, held = [], []
    for c, items in sorted(by_class.items()):
        items.sort(key=lambda fc: str(fc[0].relative_to(src)))
        order = np.random.default_rng([seed, c]).permutation(len(items))
        n = min(max(round(fraction * len(items)), 1), len(items) - 1) if len(items) > 1 else 0
        held += [items[i] for i in sorted(order[:n])]
        kept += [items[i] for i in sorted(order[n:])]
    return kept, held


def import_images(src: str | os.PathLike, dest: str | os.PathLike, kind: str = "auto",
                  samples_per_shard: int = 5000, prefix: str | None = None, holdout: float = 0.0,
                  seed: int = 0) -> dict:
    """holdout > 0 (labeled only): that fraction of every class goes to dest/val/ instead (stratified, seeded):
    held-out shards for data.val, never trained on."""
    src, dest = Path(src), Path(dest)
    if samples_per_shard < 1:
        raise ConfigError(f"stage.samples_per_shard={samples_per_shard} must be >= 1")
    if not 0.0 <= float(holdout) < 1.0:
        raise ConfigError(f"stage.holdout={holdout!r}: the fraction of each class held out must be in [0, 1), "
                          "e.g. stage.holdout=0.1")
    kind, files, classes = scan(src, kind)
    if holdout and kind != "labeled":
        raise ConfigError(f"stage.holdout={holdout}: only a labeled folder (class subfolders) is split; "
                          f"{src} is imported as {kind}")
    prefix = prefix or kind
    skipped: dict[str, str] = {}
    good: list[tuple[Path, int]] = []
    for f, c in files:
        if f.suffix.lower() not in _SUFFIXES:
            skipped[str(f.relative_to(src))] = "not an image extension"
        elif (why := _verify(f)) is not None:
            skipped[str(f.relative_to(src))] = why
        else:
            good.append((f, c))
    if not good:
        raise ConfigError(f"stage.src={str(src)!r}: no importable image ({', '.join(IMAGE_EXTS)}) found")
    held: list[tuple[Path, int]] = []
    if holdout:
        good, held = holdout_split(good, src, float(holdout), int(seed))
    result = _write_set(src, dest, good, prefix, kind, classes, samples_per_shard, skipped)
    if held:
        val = _write_set(src, dest / "val", held, "val", kind, classes, samples_per_shard, {},
                         holdout=float(holdout), seed=int(seed))
        result["holdout"] = {k: val[k] for k in ("images", "shards", "pattern")}
    return result


def _write_set(src: Path, dest: Path, good: list[tuple[Path, int]], prefix: str, kind: str, classes: list[str],
               samples_per_shard: int, skipped: dict[str, str], **info) -> dict:
    counts: dict[str, int] = {}
    n_shards = (len(good) + samples_per_shard - 1) // samples_per_shard
    for s in range(n_shards):
        chunk = good[s * samples_per_shard:(s + 1) * samples_per_shard]

        def samples(chunk=chunk):
            for f, c in chunk:
                rel = f.relative_to(src).with_suffix("")
                # keys must not contain dots (webdataset splits key/extension at the first dot)
                sample = {"__key__": str(rel).replace(os.sep, "__").replace(".", "_"), _ext(f): f.read_bytes()}
                if c >= 0:
                    sample["cls"] = str(c).encode()
                yield sample

        name = f"{prefix}-{s:06d}.tar"
        counts[name] = write_shard(dest / name, samples())
    if classes:
        atomic_write_bytes(dest / "classes.json", json.dumps(classes, indent=1).encode())
    pattern = str(dest / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")
    manifest = update_manifest(dest, counts, kind=kind, num_classes=len(classes) or None,
                               skipped=skipped, pattern=pattern, **info)
    log.info("imported %d images into %d shards: %s (%d files skipped; see %s)", len(good), n_shards, pattern,
             len(skipped), dest / "manifest.json")
    return {"kind": kind, "images": len(good), "shards": n_shards, "pattern": pattern,
            "num_classes": len(classes) or None, "skipped": len(skipped), "manifest": manifest}
