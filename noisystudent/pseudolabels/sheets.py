"""Contact sheets of one pseudolabel step: what the teacher put in each class, in pictures, for report.md.

Per class (a row): its most confident selected images, its least confident selected ones (those just above the
threshold, or above the cut balancing made), and the images it repeats most (a rare class's tail); then one sheet
of the images most likely out of domain (the lowest out-of-domain scores of the pool) and one of images the
selection dropped (a key-hash sample, each with why). Every tile is captioned with its label and its confidence,
repeat count or score, and sheets.json names the shard and key of every tile and where it sits in its PNG.

Built by streaming: one pass over the label files keeps, per class and panel, the best `images` candidates seen so
far (numpy arrays of at most classes x images entries), then each shard holding a chosen image is read for those
images alone (by its tar headers when local: data/shards.image_bytes). Memory and reads are bounded by the number
of tiles, whatever the size of the pool. With more classes than `classes`, the sheets show the classes where the
trouble is: the highest share of selected images below the out-of-domain cut-off, then the highest repeat factor.

Hand-made rather than torchvision.utils.make_grid: each tile needs its own caption, which make_grid has not.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..data.labels import LabelFile
from ..data.shards import decode_image, image_bytes
from ..files import atomic_write, write_json
from .selection import Selection

SHEETS = "sheets"  # the folder, beside the label files
SHEETS_JSON = "sheets.json"
TILE = 56  # pixels of a thumbnail
CAPTION = 12  # pixels under each tile for its caption
NAME_WIDTH = 130  # the class-name column of the class sheets
ROWS_PER_SHEET = 10  # classes per class sheet
CLASS_PANELS = (("most_confident", "most confident"), ("least_confident", "least confident kept"),
                ("repeated_most", "repeated most"))


def _ordered(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 in the same order (negative floats included)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(1 << 31)).astype(np.uint32)


@dataclass
class _Best:
    """The `m` candidates with the largest uint64 keys per group, over everything offered."""
    m: int
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    key: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    file: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def offer(self, group: np.ndarray, key: np.ndarray, file: int, rows: np.ndarray) -> None:
        if not len(rows):
            return
        g = np.concatenate([self.group, group.astype(np.int64)])
        k = np.concatenate([self.key, key.astype(np.uint64)])
        f = np.concatenate([self.file, np.full(len(rows), file, np.int64)])
        r = np.concatenate([self.row, rows.astype(np.int64)])
        order = np.lexsort((~k, g))  # by group, then the key from the largest
        gs = g[order]
        start = np.r_[0, np.flatnonzero(np.diff(gs)) + 1]
        rank = np.arange(len(gs)) - np.repeat(start, np.diff(np.r_[start, len(gs)]))
        take = order[rank < self.m]
        self.group, self.key, self.file, self.row = g[take], k[take], f[take], r[take]

    def of(self, group: int) -> list[tuple[int, int]]:
        """(file, row) of the group's candidates, best first."""
        idx = np.flatnonzero(self.group == group)
        idx = idx[np.argsort(~self.key[idx], kind="stable")]
        return [(int(self.file[i]), int(self.row[i])) for i in idx]


def collect(files: list[LabelFile], selection: Selection, num_classes: int, images: int) -> dict:
    """The pass over the label files: per class and panel the chosen (file, row) pairs, each with what its caption
    shows, and per class the counts that order the classes."""
    panels = {name: _Best(images) for name, _ in CLASS_PANELS}
    ood, rejected = _Best(2 * images), _Best(2 * images)
    kept = np.zeros(num_classes, np.int64)
    after = np.zeros(num_classes, np.int64)
    below = np.zeros(num_classes, np.int64)
    cut = (selection.ood or {}).get("cut")
    for i, f in enumerate(files):
        r = selection.rows(f)
        if not len(r.argmax):
            continue
        keep = r.repeats > 0
        rows = np.flatnonzero(keep)
        kept += np.bincount(r.argmax[keep], minlength=num_classes)
        after += np.bincount(r.argmax, r.repeats, minlength=num_classes).astype(np.int64)
        panels["most_confident"].offer(r.argmax[rows], r.score[rows], i, rows)
        panels["least_confident"].offer(r.argmax[rows], ~r.score[rows], i, rows)
        many = np.flatnonzero(r.repeats > 1)
        panels["repeated_most"].offer(r.argmax[many], (r.repeats[many].astype(np.uint64) << np.uint64(40))
                                      | (r.score[many] >> np.uint64(24)), i, many)
        if r.ood_score is not None:
            if cut is not None:
                below += np.bincount(r.argmax[keep & (r.ood_score < np.float32(cut))], minlength=num_classes)
            every = np.arange(len(r.argmax))
            ood.offer(np.zeros(len(every)), ~((_ordered(r.ood_score).astype(np.uint64) << np.uint64(32))
                                              | (r.keyhash >> np.uint64(32))), i, every)
        dropped = np.flatnonzero(~keep)
        rejected.offer(np.zeros(len(dropped)), ~r.keyhash[dropped], i, dropped)
    return {"panels": panels, "ood": ood, "rejected": rejected, "kept": kept, "after": after, "below": below}


def shown_classes(found: dict, num_classes: int, limit: int) -> list[int]:
    """Every class when there are at most `limit`, else those where the trouble is (the module's docstring)."""
    if num_classes <= limit:
        return list(range(num_classes))
    kept, after, below = found["kept"], found["after"], found["below"]
    share = np.divide(below, kept, out=np.zeros(num_classes), where=kept > 0)
    repeat = np.divide(after, kept, out=np.zeros(num_classes), where=kept > 0)
    order = sorted(range(num_classes), key=lambda c: (-share[c], -repeat[c], c))
    return sorted(order[:limit])


@dataclass
class _Tile:
    file: int
    row: int
    caption: str
    key: str = ""
    shard: str = ""


def _describe(files, selection: Selection, picks: list[tuple[int, int]], how: str) -> list[_Tile]:
    """Tiles for (file, row) picks, captioned by `how`: conf, repeat, ood or rejected."""
    out = []
    cache: dict[int, object] = {}
    for fi, row in picks:
        if fi not in cache:
            cache[fi] = selection.rows(files[fi])
        r = cache[fi]
        label, conf = int(r.argmax[row]), float(r.confidence[row])
        if how == "conf":
            caption = f"{conf:.2f}"
        elif how == "repeat":
            caption = f"x{int(r.repeats[row])}"
        elif how == "ood":
            caption = f"{label} {float(r.ood_score[row]):.1f}{'' if r.repeats[row] else ' -'}"
        else:
            why = "thr" if conf < selection.threshold else ("ood" if not r.passes[row] else "bal")
            caption = f"{label} {conf:.2f} {why}"
        out.append(_Tile(fi, row, caption))
    return out


def _font():
    try:
        return ImageFont.load_default(size=10)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _thumbnail(data: bytes | None) -> Image.Image:
    if data is None:
        return Image.new("RGB", (TILE, TILE), (200, 0, 0))  # the shard no longer has it
    try:
        img = decode_image(data)
    except Exception:  # noqa: BLE001 - a corrupt image gets a red tile, not a failed step
        return Image.new("RGB", (TILE, TILE), (200, 0, 0))
    img = ImageOps.contain(img, (TILE, TILE), Image.NEAREST if max(img.size) < TILE // 2 else Image.BICUBIC)
    canvas = Image.new("RGB", (TILE, TILE), (255, 255, 255))
    canvas.paste(img, ((TILE - img.width) // 2, (TILE - img.height) // 2))
    return canvas


def _draw_tiles(sheet: Image.Image, draw, font, tiles: list[_Tile], thumbs: dict, x: int, y: int, record: list) -> None:
    for j, t in enumerate(tiles):
        tx = x + j * (TILE + 2)
        sheet.paste(thumbs[(t.shard, t.key)], (tx, y))
        draw.text((tx + 1, y + TILE), t.caption, fill=(0, 0, 0), font=font)
        record.append({"shard": t.shard, "key": t.key, "caption": t.caption, "x": tx, "y": y, "size": TILE})


def build(files: list[LabelFile], selection: Selection, num_classes: int, out_dir: Path, images: int = 8,
          classes: int = 20, class_names: list[str] | None = None) -> dict:
    """Write the sheets' PNGs and sheets.json under out_dir/sheets/; returns sheets.json's content."""
    found = collect(files, selection, num_classes, images)
    shown = shown_classes(found, num_classes, classes)
    def name(c: int) -> str:
        return str(c) if not class_names or class_names[c] == str(c) else f"{c} {class_names[c]}"[:20]

    rows = {c: {p: _describe(files, selection, found["panels"][p].of(c), "repeat" if p == "repeated_most" else "conf")
                for p, _ in CLASS_PANELS} for c in shown}
    ood = _describe(files, selection, found["ood"].of(0), "ood") if selection.ood else []
    rejected = _describe(files, selection, found["rejected"].of(0), "rejected")
    every = [t for r in rows.values() for ts in r.values() for t in ts] + ood + rejected
    by_file = defaultdict(list)
    for t in every:
        by_file[t.file].append(t)
    wanted = defaultdict(set)
    for fi, ts in by_file.items():
        keys, shard = files[fi].keys(), files[fi].meta["shard"]
        for t in ts:
            t.key, t.shard = keys[t.row], shard
            wanted[shard].add(t.key)
    thumbs = {}
    for shard, keys in wanted.items():
        got = image_bytes(shard, keys)
        thumbs.update({(shard, k): _thumbnail(got.get(k)) for k in keys})
    folder = Path(out_dir) / SHEETS
    folder.mkdir(parents=True, exist_ok=True)
    font = _font()
    record = {"images_per_panel": images, "classes_shown": shown, "num_classes": num_classes, "sheets": []}
    width = NAME_WIDTH + len(CLASS_PANELS) * (images * (TILE + 2) + 10)
    for start in range(0, len(shown), ROWS_PER_SHEET):
        block = shown[start:start + ROWS_PER_SHEET]
        height = 16 + len(block) * (TILE + CAPTION + 4)
        sheet = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        tiles: list = []
        for p, (_, title) in enumerate(CLASS_PANELS):
            draw.text((NAME_WIDTH + p * (images * (TILE + 2) + 10), 2), title, fill=(0, 0, 0), font=font)
        for i, c in enumerate(block):
            y = 16 + i * (TILE + CAPTION + 4)
            kept, after = int(found["kept"][c]), int(found["after"][c])
            draw.text((2, y + 4), name(c), fill=(0, 0, 0), font=font)
            draw.text((2, y + 18), f"kept {kept:,}", fill=(80, 80, 80), font=font)
            draw.text((2, y + 30), f"seen {after:,}", fill=(80, 80, 80), font=font)
            for p, (panel, _) in enumerate(CLASS_PANELS):
                _draw_tiles(sheet, draw, font, rows[c][panel], thumbs,
                            NAME_WIDTH + p * (images * (TILE + 2) + 10), y, tiles)
                for t in tiles[len(tiles) - len(rows[c][panel]):]:
                    t.update(sheet_class=c, panel=panel)
        path = folder / f"classes-{start // ROWS_PER_SHEET + 1}.png"
        _save(sheet, path)
        record["sheets"].append({"file": f"{SHEETS}/{path.name}", "kind": "classes", "classes": block, "tiles": tiles})
    for kind, tiles_of, title in (("out_of_domain", ood, "most likely out of domain (label, score; - = dropped)"),
                                  ("rejected", rejected, "dropped by the selection (label, confidence, why)")):
        if not tiles_of:
            continue
        per_row = images
        n_rows = -(-len(tiles_of) // per_row)
        sheet = Image.new("RGB", (max(per_row * (TILE + 2), 320), 16 + n_rows * (TILE + CAPTION + 4)), "white")
        draw = ImageDraw.Draw(sheet)
        draw.text((2, 2), title, fill=(0, 0, 0), font=font)
        tiles = []
        for i in range(n_rows):
            _draw_tiles(sheet, draw, font, tiles_of[i * per_row:(i + 1) * per_row], thumbs, 0,
                        16 + i * (TILE + CAPTION + 4), tiles)
        path = folder / f"{kind}.png"
        _save(sheet, path)
        record["sheets"].append({"file": f"{SHEETS}/{path.name}", "kind": kind, "tiles": tiles})
    write_json(folder / SHEETS_JSON, record)
    return record


def _save(img: Image.Image, path: Path) -> None:
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def markdown(record: dict, rel: str) -> list[str]:
    """report.md's lines for one step's sheets (`rel`: the step's folder relative to the report)."""
    lines = []
    for s in record["sheets"]:
        what = {"classes": f"classes {', '.join(map(str, s.get('classes', [])))}", "out_of_domain":
                "the images most likely out of domain", "rejected": "images the selection dropped"}[s["kind"]]
        lines += [f"![{what}]({rel}/{s['file']})", ""]
    return lines


def load(out_dir: Path) -> dict | None:
    path = Path(out_dir) / SHEETS / SHEETS_JSON
    return json.loads(path.read_text()) if path.exists() else None
