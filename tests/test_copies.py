"""Copies of eval images in the pool: the fingerprints find planted copies (resized, JPEG re-encoded, cropped,
mirrored) and no distinct image of the same class; stage=pseudolabel keeps them out of the selection, with their keys
in the summary, eval_copies.json and report.md, and says what to do with label files that hold no fingerprints."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import FAST, run
from PIL import Image
from safetensors import safe_open

from noisystudent.data import fingerprints
from noisystudent.data.fingerprints import (
    EvalIndex,
    canvas,
    fine_canvas,
    fingerprint_pil,
    match,
    match_refined,
    variant_count,
    variants,
)
from noisystudent.data.labels import LabelFile, write_label_file
from noisystudent.data.writer import write_shard
from noisystudent.errors import ConfigError
from noisystudent.files import read_json
from noisystudent.pseudolabels.copies import LOOSE, MAX_RMS
from noisystudent.pseudolabels.selection import Selection


def _copy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Cropped by up to 10% of each side, resized to 1-2x, mirrored, JPEG at quality 60-90."""
    w, h = img.size
    cw, ch = (int(round(s * (1 - rng.uniform(0, 0.1)))) for s in (w, h))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((round(w * rng.uniform(1, 2)),) * 2, Image.BICUBIC)
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(60, 91)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _index(images) -> EvalIndex:
    return EvalIndex.build(variants(torch.from_numpy(np.stack([canvas(im) for im in images])).permute(0, 3, 1, 2))
                           .numpy())


def _fingerprints(images) -> np.ndarray:
    return np.stack([fingerprint_pil(im) for im in images])


def _digits(n: int, size: int = 28) -> tuple[list[Image.Image], np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = [Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            for i in range(n)]
    return imgs, d.target[:n]


@pytest.mark.parametrize("size", [28, 64])
def test_planted_copies_found_and_distinct_images_of_a_class_not(size):
    """Eval images of the canvas's size (28 px: copies' crops fall on its grid) and twice it (64 px: between its
    pixels, found by the fine search)."""
    imgs, labels = _digits(600, size)
    ev, pool = imgs[:200], imgs[200:]
    rng = np.random.default_rng(0)
    src = rng.choice(200, 40, replace=False)
    index, fine = _index(ev), np.stack([fine_canvas(im) for im in ev])
    assert index.thumbs.shape == (200 * variant_count(), 64) and variant_count() == 200
    copies = _fingerprints([_copy(ev[i], rng) for i in src])
    found, dist, refined = match_refined(copies, index, fine.__getitem__, MAX_RMS, LOOSE * MAX_RMS)
    assert (found == src).all() and (dist <= MAX_RMS).all()
    coarse, _, _ = match(copies, index, MAX_RMS)
    if size == 64:  # the grid alone misses some; the fine search finds them
        assert (coarse == -1).sum() >= 5 and refined.sum() == (coarse == -1).sum()
    # 400 other handwritten digits, 40 of each class the eval images have: none is a copy
    found, _, _ = match_refined(_fingerprints(pool), index, fine.__getitem__, MAX_RMS, LOOSE * MAX_RMS)
    assert (found == -1).all() and set(labels[200:]) == set(labels[:200])


@pytest.mark.parametrize("list_size", [8, 100, 10_000])
def test_match_is_the_exact_nearest_variant(list_size, monkeypatch):
    """The lists' pruning never changes the answer: against brute force over every variant, with many small lists
    (a query's band cut short in most), a few, and one. The eval side is clustered as real images are (variants of
    one image near each other), so the pruning skips most lists and rows."""
    rng = np.random.default_rng(1)
    base = rng.integers(40, 216, (50, 1, 64))
    ev = np.clip(base + rng.integers(-30, 31, (50, 6, 64)), 0, 255).astype(np.uint8)
    pool = np.clip(ev[rng.integers(0, 50, 300), rng.integers(0, 6, 300)].astype(int)
                   + rng.integers(-12, 13, (300, 64)), 0, 255).astype(np.uint8)
    index = EvalIndex.build(ev, list_size=list_size)
    k = max(1, 300 // list_size)  # lists, about
    assert k / 2 <= len(index.centroids) <= 2 * k and sorted(index.source.tolist()) == list(range(300))
    monkeypatch.setattr(fingerprints, "CENTROID_DISTANCES", 70 * 5)  # the centroids 5 at a time
    found, dist, which = match(pool, index, 7.0, block=16, chunk=70)
    full = np.sqrt(((pool[:, None, None].astype(float) - ev[None].astype(float)) ** 2).mean(-1))  # [pool, eval, V]
    d = full.min(-1)
    want = np.where(d.min(1) <= 7.0, d.argmin(1), -1)
    assert (found == want).all() and 0 < (want >= 0).sum() < 300
    hit = want >= 0
    assert np.allclose(dist[hit], d.min(1)[hit], atol=1e-3)
    assert (full[np.flatnonzero(hit), found[hit]].argmin(-1) == which[hit]).all() and (which[~hit] == -1).all()


def test_refine_is_the_nearest_of_every_crop_around_the_variant():
    """refine's two products per crop size give each crop's thumbnail as resizing that crop does: against a resize
    of every crop one by one, for plain and mirrored variants, near the canvas's edge and inside it."""
    from noisystudent.data.fingerprints import FINE_SCALE, _thumb, crop_grid, refine

    rng = np.random.default_rng(3)
    fine = np.asarray(Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).resize((112, 112)))
    grid = crop_grid()
    for variant in (0, 57, len(grid) - 1, len(grid), len(grid) + 77):
        y, x, h, w = (FINE_SCALE * a for a in grid[variant % len(grid)])
        t = torch.from_numpy(fine.astype(np.float32))[None]
        crops = [t[:, a:a + hh, b:b + ww] for hh in range(h - 2, h + 3) for ww in range(w - 2, w + 3)
                 for a in range(y - 2, y + 3) for b in range(x - 2, x + 3)
                 if a >= 0 and b >= 0 and a + hh <= 112 and b + ww <= 112]
        thumbs = torch.stack([_thumb(c[None])[0] for c in crops]).reshape(len(crops), 8, 8)
        if variant >= len(grid):
            thumbs = thumbs.flip(-1)
        # a pool image close to one of those crops (as a copy is), elsewhere far from the rest
        near = thumbs[int(rng.integers(len(crops)))].reshape(64).numpy() + rng.normal(0, 2, 64)
        fp = np.clip(near, 0, 255).round().astype(np.uint8)
        want = float(((thumbs.reshape(len(crops), 64) - torch.from_numpy(fp).float()) ** 2).mean(1).min().sqrt())
        assert refine(fp, fine, variant) == pytest.approx(want, abs=1e-3)


def test_index_built_from_mapped_parts_is_the_index_of_the_whole(tmp_path):
    """EvalSide builds one index over every eval set's cache file, mapped: the same index as from one array."""
    from safetensors.numpy import save_file

    from noisystudent.pseudolabels.copies import _mapped

    rng = np.random.default_rng(2)
    ev = rng.integers(0, 256, (40, 6, 64), dtype=np.uint8)
    for i, part in enumerate((ev[:15], ev[15:], ev[:0])):
        save_file({"fine": np.zeros((len(part), 4), np.uint8), "variants": part}, tmp_path / f"{i}.safetensors")
    parts = [_mapped(tmp_path / f"{i}.safetensors", "variants") for i in range(3)]
    assert isinstance(parts[0], np.memmap) and (parts[1] == ev[15:]).all() and parts[2].shape == (0, 6, 64)
    whole, mapped = EvalIndex.build(ev, list_size=16), EvalIndex.build(parts, list_size=16)
    for a, b in zip((whole.thumbs, whole.key, whole.source, whole.starts), (mapped.thumbs, mapped.key, mapped.source,
                                                                          mapped.starts), strict=True):
        assert torch.equal(a, b)


def _plant(digits_root, tmp_path, n: int = 10) -> tuple[str, list[str], list[str]]:
    """An extra unlabeled shard: copies of n demo eval images (keys copy-*) and n unlabeled images as they are."""
    eval_shard = sorted(digits_root.glob("eval-*.tar"))[0]
    samples = list(wds.WebDataset(str(eval_shard), shardshuffle=False))[:n]
    rng = np.random.default_rng(0)
    out = []
    for i, s in enumerate(samples):
        # the 8x8 digit enlarged 2x, mirrored, JPEG: not cropped (a pixel of the original is 12.5% of it)
        img = Image.open(io.BytesIO(s["png"])).convert("L").resize((16, 16), Image.BICUBIC)
        buf = io.BytesIO()
        img.transpose(Image.FLIP_LEFT_RIGHT).save(buf, "JPEG", quality=int(rng.integers(60, 91)))
        out.append({"__key__": f"copy-{i}", "jpg": buf.getvalue()})
    shard = tmp_path / "planted" / "planted-000000.tar"
    write_shard(shard, iter(out))
    pattern = f"{{{digits_root}/unlabeled-{{000000..000003}}.tar,{shard}}}"
    return pattern, [o["__key__"] for o in out], [s["__key__"] for s in samples]


def test_pseudolabel_keeps_planted_copies_out_with_their_keys(teacher_copy, digits_root, tmp_path):
    pattern, copies, sources = _plant(digits_root, tmp_path)
    # the demo's originals are 8 px, smaller than the eval canvas (28 px): its enlargement blurs them, and copies land
    # farther than the default allows (docs/pseudolabels.md#copies-of-eval-images: what the default finds)
    args = ["stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST,
            "pseudolabel.eval_copies.max_rms=9"]
    s = run(*args, f"data.unlabeled='{pattern}'")
    c = s["eval_copies"]
    assert c["exclude"] and c["checked_against"] == {"data.eval": 539}
    found = json.loads((teacher_copy / "round_1/pseudolabel/eval_copies.json").read_text())
    planted = {r["key"]: r for r in found if r["shard"].endswith("planted-000000.tar")}
    assert sorted(planted) == sorted(copies)  # every copy, and nothing else of that shard
    assert all(planted[k]["eval_key"] == src for k, src in zip(copies, sources, strict=True))
    # the clean demo pool adds a few: thin 1s that differ by a pixel's shift at 8x8 (docs/pseudolabels.md)
    assert c["found"] == len(found) == c["excluded"] and c["found"] <= len(copies) + 10
    sel = Selection.from_json(read_json(teacher_copy / "round_1/pseudolabel/selection.json"))
    f = LabelFile(teacher_copy / "round_1/pseudolabel/labels/planted-000000.labels.safetensors")
    assert f.format == 3 and f["fingerprint"].shape == (len(copies), 64)
    assert (sel.repeats(f) == 0).all()  # never in the student's stream
    # report.md's line for the round: the count, the sets checked, keys of the matches, where the rest are
    from noisystudent.reporting.report import copies_lines

    line = copies_lines(s, "round_1/pseudolabel")[0]
    assert f"{c['found']:,} pool images match an image of data.eval (539 images)" in line
    assert "kept out of the selection" in line and "`copy-" in line and "eval_copies.json" in line
    # the eval side was cached beside the run and is read back, not recomputed
    cache = sorted((teacher_copy / "eval_fingerprints").glob("*.safetensors"))
    assert len(cache) == 1 and sorted(p.name for p in (teacher_copy / "eval_fingerprints").iterdir()) == [cache[0].name]
    with safe_open(str(cache[0]), framework="np") as f:  # written from spool files: the set's 539 images whole
        assert f.get_slice("variants").get_shape() == [539, 200, 64] and f.get_tensor("shard").shape == (539,)
        assert f.get_slice("fine").get_shape() == [539, 112, 112] and f.metadata() == {"set": "data.eval"}
    stamp = cache[0].stat().st_mtime_ns
    s2 = run(*args, f"data.unlabeled='{pattern}'", "force=true", "pseudolabel.eval_copies.exclude=false")
    assert cache[0].stat().st_mtime_ns == stamp
    assert s2["eval_copies"]["found"] == c["found"] and s2["eval_copies"]["excluded"] == 0, s2["eval_copies"]
    sel = Selection.from_json(read_json(teacher_copy / "round_1/pseudolabel/selection.json"))
    assert sel.excluded is None


def test_label_files_without_fingerprints_are_refused(teacher_copy, digits_root):
    args = ["stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST]
    run(*args)
    labels = teacher_copy / "round_1/pseudolabel/labels"
    p = sorted(labels.glob("*.labels.safetensors"))[0]
    f = LabelFile(p)  # rewritten as a version before the fingerprints wrote it
    old = {k: f[k] for k in ("logit_lse", "max_logit")}
    write_label_file(p, f.meta["shard"], f.keys(), f["topk_ids"], f["topk_probs"], f["confidence"], f["argmax"], [],
                     {k: f.meta[k] for k in ("num_classes", "topk", "temperature", "hard")}, old)
    assert LabelFile(p).format == 2 and not LabelFile(p).has_fingerprints
    (teacher_copy / "round_1/pseudolabel/_SUCCESS").unlink()
    with pytest.raises(ConfigError, match=f"{p.name}.*no image fingerprints.*force=true.*eval_copies.exclude=false"):
        run(*args)
    s = run(*args, "pseudolabel.eval_copies.exclude=false")
    assert s["eval_copies"]["found"] is None and "not checked" in s["eval_copies"]["why"]


@pytest.mark.parametrize("override, match_", [
    ("pseudolabel.eval_copies.exclude=maybe", "pseudolabel.eval_copies.exclude='maybe'"),
    ("pseudolabel.eval_copies.max_rms=0", "pseudolabel.eval_copies.max_rms=0"),
])
def test_bad_settings(teacher_copy, digits_root, override, match_):
    with pytest.raises(ConfigError, match=match_):
        run("stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, override)
