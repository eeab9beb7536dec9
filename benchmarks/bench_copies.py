"""Copies of eval images in an unlabeled pool: how many the fingerprints find, how many clean images they match,
and what finding them costs (data/fingerprints.py; docs/pseudolabels.md#copies-of-eval-images).

    apt-get install dataset-fashion-mnist
    python benchmarks/bench_copies.py choose        # max_rms from copies of *training* images (never the test set)
    python benchmarks/bench_copies.py recall        # copies of 1% of the test images, planted into the train pool
    python benchmarks/bench_copies.py cost          # fingerprint cost next to labeling; matching time and memory
    python benchmarks/bench_copies.py photos        # eval images larger than the 28 px canvas (natural photos)

A copy is made as a web page would re-post an image: cropped by 0-10% of each side at a random place, resized to
0.5-2x, mirrored half the time, JPEG re-encoded at quality 60-90. Fingerprints are taken as stage=pseudolabel takes
them (data/fingerprints.py).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import SRC, read_idx  # noqa: E402

from noisystudent.data.fingerprints import (
    EvalIndex,
    canvas,
    fine_canvas,
    fingerprint_pil,
    match,
    match_refined,
    refine,
    variants,
)
from noisystudent.pseudolabels.copies import LOOSE  # noqa: E402


def load() -> tuple[np.ndarray, np.ndarray]:
    src = Path(SRC)
    return read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "t10k-images-idx3-ubyte.gz")


def copy_of(img: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """A re-posted copy of a 28x28 grey image, and how it was made."""
    im = Image.fromarray(img)
    w, h = im.size
    cw, ch = (int(round(s * (1 - rng.uniform(0, 0.10)))) for s in (w, h))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch))
    scale = float(rng.uniform(0.5, 2.0))
    im = im.resize((max(4, round(w * scale)), max(4, round(h * scale))), Image.BICUBIC)
    flip = bool(rng.random() < 0.5)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    quality = int(rng.integers(60, 91))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB"), {"crop": [cw, ch], "scale": round(scale, 3), "flip": flip,
                                             "quality": quality}


def pil(im) -> Image.Image:
    return Image.fromarray(im) if isinstance(im, np.ndarray) else im


def fingerprints(images) -> np.ndarray:
    """Pool images (arrays or PIL images) -> uint8 (n, 64), as the labeling step's loader workers take them."""
    return np.stack([fingerprint_pil(pil(im)) for im in images])


def eval_variants(images, batch: int = 1024) -> np.ndarray:
    """Eval images -> uint8 (n, 200, 64), as stage=pseudolabel caches them."""
    out = []
    for i in range(0, len(images), batch):
        c = torch.from_numpy(np.stack([canvas(pil(im)) for im in images[i:i + batch]])).permute(0, 3, 1, 2)
        out.append(variants(c).numpy())
    return np.concatenate(out)


def fines(images) -> np.ndarray:
    """Eval images -> their uint8 (n, 112, 112) fine canvases (the refinement's)."""
    return np.stack([fine_canvas(pil(im)) for im in images])


def distances(fp: np.ndarray, index: EvalIndex, fine: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Each copy's distance to its own source as stage=pseudolabel measures it: the nearest variant, or the fine
    crop search around it where that is closer (inf where the nearest eval image is not the source)."""
    found, dist, which = match(fp, index, 1e9)
    out = np.where(found == src, dist, np.inf)
    for i in np.flatnonzero(found == src).tolist():
        out[i] = min(out[i], refine(fp[i], fine[src[i]], int(which[i])))
    return out


def planted(eval_images: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    src = rng.choice(len(eval_images), n, replace=False)
    made = [copy_of(eval_images[i], rng) for i in src]
    return src, fingerprints([m[0] for m in made]), [m[1] for m in made]


def cmd_choose(args) -> None:
    """max_rms: the largest distance of a planted copy to its source at the asked recall, on a split of the
    training images (eval side: train[:10000]; copies of 2,000 of them), so the test set never sets it."""
    train, _ = load()
    ev = train[:10000]
    index = EvalIndex.build(eval_variants(ev))
    src, fp, _ = planted(ev, 2000, seed=1)
    own = np.sort(distances(fp, index, fines(ev), src))
    print(f"nearest eval image is the copy's source for {np.mean(np.isfinite(own)):.2%} of {len(src):,} copies")
    for recall in (0.99, 0.995, 0.999):
        print(f"recall {recall}: max_rms {own[int(np.ceil(recall * len(own))) - 1]:.2f}")


CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def cmd_recall(args) -> None:
    train, test = load()
    labels = read_idx(Path(SRC) / "train-labels-idx1-ubyte.gz")
    t0 = time.time()
    index = EvalIndex.build(eval_variants(test))
    fine = fines(test)
    t_eval = time.time() - t0
    rows = []
    for seed in range(args.seeds):
        src, fp, how = planted(test, len(test) // 100, seed=100 + seed)
        found, dist, _ = match_refined(fp, index, fine.__getitem__, args.max_rms, LOOSE * args.max_rms)
        rows.append({"seed": seed, "copies": len(src), "found": int((found >= 0).sum()),
                     "found_own": int((found == src).sum()),
                     "missed": [{**h, "src": int(s)} for h, s, f in zip(how, src, found, strict=True) if f < 0]})
    copies = sum(r["copies"] for r in rows)
    found = sum(r["found"] for r in rows)
    t0 = time.time()
    pool_fp = fingerprints(train)
    t_fp = time.time() - t0
    t0 = time.time()
    pf, pd, refined = match_refined(pool_fp, index, fine.__getitem__, args.max_rms, LOOSE * args.max_rms)
    t_match = time.time() - t0
    # the same pairs at full resolution: rms of the 28x28 pixels, best of the image and its mirror
    hits = np.flatnonzero(pf >= 0)
    full = [min(np.sqrt(((train[i].astype(float) - test[pf[i]]) ** 2).mean()),
                np.sqrt(((train[i].astype(float) - test[pf[i]][:, ::-1]) ** 2).mean())) for i in hits]
    out = {"max_rms": args.max_rms, "copies": copies, "found": found, "recall": found / copies,
           "found_their_own_source": sum(r["found_own"] for r in rows),
           "missed": [m for r in rows for m in r["missed"]],
           "clean_pool": len(train), "clean_matched": len(hits), "clean_matched_by_refinement": int(refined.sum()),
           "clean_matched_per_class": {name: int(np.sum(labels[hits] == c)) for c, name in enumerate(CLASSES)},
           # how alike the matched pairs are at 28x28 (rms grey levels, the better of the image and its mirror)
           "clean_matched_full_res_rms": {"quartiles": [round(float(q), 1) for q in np.quantile(full, [.25, .5, .75])]
                                          if full else None, **{f"<= {t}": int(np.sum(np.array(full) <= t))
                                                                for t in (5, 10, 20)}},
           "seconds": {"eval_variants_10k": t_eval, "pool_fingerprints_60k": t_fp, "match_60k": t_match}}
    print(json.dumps({k: v for k, v in out.items() if k != "missed"}, indent=1))
    print("missed:", out["missed"][:20])
    if args.sheet:
        sheet(train, test, hits, pf, pd, Path(args.sheet))


def sheet(train, test, hits, pf, pd, out: Path, cols: int = 12) -> None:
    """Each clean pool image the fingerprints matched, above the eval image it matched (most alike first)."""
    order = hits[np.argsort(pd[hits])][: cols * 4]
    rows = -(-len(order) // cols)
    canvas = Image.new("L", (cols * 30, rows * 62), 255)
    for k, i in enumerate(order):
        x, y = (k % cols) * 30, (k // cols) * 62
        canvas.paste(Image.fromarray(train[i]), (x + 1, y + 1))
        canvas.paste(Image.fromarray(test[pf[i]]), (x + 1, y + 30))
    canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST).save(out)
    print("wrote", out)


def cmd_cost(args) -> None:
    """The fingerprint's cost in the labeling loop (per image, on this CPU, next to a forward pass of the same
    batch), and matching time and memory per pool image against eval sets of several sizes."""
    import timm
    from sklearn.datasets import load_sample_image

    from noisystudent.data.shards import decode_image
    from noisystudent.data.transforms import eval_transform

    torch.set_num_threads(args.threads)
    photo = Image.fromarray(load_sample_image("china.jpg")).resize((500, 375), Image.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    for size, model_name in ((32, "test_efficientnet"), (224, "efficientnet_b0")):
        t = eval_transform(size, {"crop_pct": 0.875})
        reps = 200
        t0 = time.perf_counter()
        for _ in range(reps):
            img = decode_image(jpeg, size)  # the worker's decode, JPEG draft mode on, as labeling does
            t(img)
        t_decode = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fingerprint_pil(img)
        t_fp = (time.perf_counter() - t0) / reps
        model = timm.create_model(model_name, num_classes=10).eval()
        x = torch.randn(32, 3, size, size)
        with torch.inference_mode():
            model(x)
            t0 = time.perf_counter()
            model(x)
            t_model = (time.perf_counter() - t0) / 32
        print(f"500x375 JPEG -> {size}px: decode + transform {1e3 * t_decode:.2f} ms/image, fingerprint "
              f"{1e3 * t_fp:.3f} ms/image (+{100 * t_fp / t_decode:.1f}% of the worker's work); {model_name} forward "
              f"{1e3 * t_model:.2f} ms/image: fingerprint = {100 * t_fp / (t_decode + t_model):.2f}% of decode + model "
              f"on one core")
    train, test = load()
    pool = fingerprints(test[:args.pool])  # a pool of other images than the eval side's
    for n_eval in args.eval_sizes:
        reps = -(-n_eval // len(train))
        # eval sides larger than one data set: the train images again, each pixel nudged so no two are alike
        ev = np.concatenate([train] * reps)[:n_eval]
        var = eval_variants(ev)
        if reps > 1:
            rng = np.random.default_rng(0)
            var = np.clip(var.astype(np.int16) + rng.integers(-3, 4, var.shape), 0, 255).astype(np.uint8)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        index = EvalIndex.build(var)
        del var
        fine = fines(ev)
        t0 = time.time()
        _, _, refined = match_refined(pool, index, fine.__getitem__, args.max_rms, LOOSE * args.max_rms)
        dt = time.time() - t0
        print(f"eval {n_eval:,} images ({index.thumbs.shape[0]:,} variants, index {index.nbytes / 2**20:,.0f} MiB, "
              f"peak RSS +{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**10:,.0f} MiB): "
              f"{len(pool):,} pool images in {dt:.1f} s ({refined.sum()} matched by the fine search) = "
              f"{dt / len(pool) * 1e6 / 3600:.2f} h per 1M pool images")
        del index


def cmd_photos(args) -> None:
    """Eval images larger than the 28 px canvas: tiles of scikit-learn's two sample photos (natural images), copies
    of them planted as above; how far the copies land, and how far distinct tiles are."""
    from sklearn.datasets import load_sample_image

    tiles = []
    for name in ("china.jpg", "flower.jpg"):
        photo = load_sample_image(name)
        for y in range(0, photo.shape[0] - args.tile + 1, args.tile):
            for x in range(0, photo.shape[1] - args.tile + 1, args.tile):
                tiles.append(photo[y:y + args.tile, x:x + args.tile])
    index = EvalIndex.build(eval_variants(tiles))
    fine = fines(tiles)
    rng = np.random.default_rng(0)
    src = rng.choice(len(tiles), args.copies)
    copies = []
    for i in src:
        im = Image.fromarray(tiles[i])
        w = h = args.tile
        cw, ch = (int(round(v * (1 - rng.uniform(0, 0.10)))) for v in (w, h))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch))
        scale = float(rng.uniform(0.5, 2.0))
        im = im.resize((max(4, round(cw * scale)), max(4, round(ch * scale))), Image.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(60, 91)))
        copies.append(Image.open(io.BytesIO(buf.getvalue())))
    fp = fingerprints(copies)
    found, dist, _ = match(fp, index, 1e9)
    coarse = np.sort(np.where(found == src, dist, np.inf))
    own = np.sort(distances(fp, index, fine, src))
    # distinct tiles: each tile against the others (its own variants left out)
    others = []
    for i in range(len(tiles)):
        keep = np.ones(len(tiles), bool)
        keep[i] = False
        rest = [t for t, k in zip(tiles, keep, strict=True) if k]
        f_i = fingerprints([tiles[i]])
        got, d, w = match(f_i, EvalIndex.build(eval_variants(rest)), 1e9)
        others.append(min(d[0], refine(f_i[0], fine_canvas(pil(rest[got[0]])), int(w[0]))))
        if i >= args.distinct:
            break
    print(f"{len(tiles)} tiles of {args.tile} px; {args.copies} copies: nearest is the source for "
          f"{np.mean(found == src):.1%}; distance to the source: nearest variant median {np.median(coarse):.2f}, "
          f"99% {coarse[int(.99 * len(coarse)) - 1]:.2f}; with the fine search median {np.median(own):.2f}, "
          f"90% {own[int(.9 * len(own))]:.2f}, 99% {own[int(.99 * len(own)) - 1]:.2f}; "
          f"found at max_rms {args.max_rms}: {np.mean(own <= args.max_rms):.1%}. "
          f"Distinct tiles' nearest other tile: min {np.min(others):.2f}, median {np.median(others):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("choose")
    r = sub.add_parser("recall")
    r.add_argument("--max-rms", type=float, default=4.6)
    r.add_argument("--seeds", type=int, default=10, help="independent plantings of 1%% of the test images")
    r.add_argument("--sheet", default=None, help="a PNG of the clean pool images that matched")
    c = sub.add_parser("cost")
    c.add_argument("--max-rms", type=float, default=4.6)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--eval-sizes", type=int, nargs="+", default=[10000, 50000])
    c.add_argument("--pool", type=int, default=10000, help="pool images matched (the time is per 1M, linear)")
    p = sub.add_parser("photos")
    p.add_argument("--tile", type=int, default=96)
    p.add_argument("--copies", type=int, default=500)
    p.add_argument("--distinct", type=int, default=40, help="tiles checked against the others")
    p.add_argument("--max-rms", type=float, default=4.6)
    args = ap.parse_args()
    {"choose": cmd_choose, "recall": cmd_recall, "cost": cmd_cost, "photos": cmd_photos}[args.cmd](args)


if __name__ == "__main__":
    main()
