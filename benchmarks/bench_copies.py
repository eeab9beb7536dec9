"""Copies of eval images in an unlabeled pool: how many the fingerprints find, how many clean images they match,
and what finding them costs (data/fingerprints.py; docs/pseudolabels.md#copies-of-eval-images).

    apt-get install dataset-fashion-mnist
    python benchmarks/bench_copies.py choose        # max_rms from copies of *training* images (never the test set)
    python benchmarks/bench_copies.py recall        # copies of 1% of the test images, planted into the train pool
    python benchmarks/bench_copies.py cost          # the fingerprint's cost next to labeling
    python benchmarks/bench_copies.py match         # matching time and memory per 1M pool images, eval 10k-1M
    python benchmarks/bench_copies.py photos        # eval images larger than the 28 px canvas (natural photos)

A copy is made as a web page would re-post an image: cropped by 0-10% of each side at a random place, resized to
0.5-2x, mirrored half the time, JPEG re-encoded at quality 60-90. Fingerprints are taken as stage=pseudolabel takes
them (data/fingerprints.py).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import SRC, read_idx  # noqa: E402

from noisystudent.data.fingerprints import (
    LIST_SIZE,
    EvalIndex,
    canvas,
    fine_canvas,
    fingerprint_pil,
    match,
    match_refined,
    refine,
    variant_count,
    variants,
)
from noisystudent.pseudolabels.copies import LOOSE, MAX_RMS  # noqa: E402


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
    batch)."""
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


def synthetic(images: np.ndarray, first: int, n: int) -> list[np.ndarray]:
    """Eval images n beyond a data set's own: image i is data set image i % len(images), moved by up to 3 px,
    scaled by 0.9-1.1, turned by up to 10 degrees, its brightness and contrast changed by up to 20%, mirrored half
    the time (seeded by i): distinct images of the data set's kind, as a larger eval set of it would hold."""
    out = []
    for i in range(first, first + n):
        rng = np.random.default_rng(i)
        im = Image.fromarray(images[i % len(images)])
        im = im.rotate(float(rng.uniform(-10, 10)), Image.BILINEAR, translate=tuple(rng.integers(-3, 4, 2).tolist()))
        side = round(28 * float(rng.uniform(0.9, 1.1)))
        im = im.resize((side, side), Image.BILINEAR).resize((28, 28), Image.BILINEAR)
        a = np.asarray(im, np.float32) * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-20, 20))
        a = np.clip(a, 0, 255).astype(np.uint8)
        out.append(a[:, ::-1] if rng.random() < 0.5 else a)
    return out


def eval_image(train: np.ndarray, row: int) -> np.ndarray:
    return train[row] if row < len(train) else synthetic(train, row, 1)[0]


class AnonPeak:
    """The peak of this process's anonymous memory (RssAnon), sampled every 50 ms: what the index holds, without the
    pages of a mapped file (clean, given back to the page cache when memory is short)."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self.base = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def write_variants(train: np.ndarray, n_eval: int, path: Path) -> None:
    """The eval pass of an eval side of n_eval images (the data set's own, then `synthetic` ones), in batches
    straight into a .npy file (renamed into place when whole)."""
    t0 = time.time()
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (n_eval, variant_count(), 64))
    for a in range(0, n_eval, 4096):
        b = min(a + 4096, n_eval)
        own = list(train[a:min(b, len(train))])
        more = synthetic(train, max(a, len(train)), b - max(a, len(train))) if b > len(train) else []
        out[a:b] = eval_variants(own + more)
    out.flush()
    del out
    tmp.rename(path)
    print(f"eval {n_eval:,}: variants in {time.time() - t0:.0f} s ({(time.time() - t0) / n_eval * 1e3:.2f} ms per "
          "image)", flush=True)


def cmd_match(args) -> None:
    """Matching time and memory per pool image against eval sides of several sizes: each side's variants written to
    a file first (as stage=pseudolabel caches them), the index built from the file mapped, then args.pool test
    images matched, with the fine search where one lands close."""
    torch.set_num_threads(args.threads)
    train, test = load()
    pool = fingerprints(test[:args.pool])  # a pool of other images than the eval side's
    Path(args.work).mkdir(parents=True, exist_ok=True)
    for n_eval in args.eval_sizes:
        path = Path(args.work) / f"variants-{n_eval}.npy"
        if not path.exists():
            write_variants(train, n_eval, path)
        with AnonPeak() as mem:
            t0 = time.time()
            index = EvalIndex.build([np.load(path, mmap_mode="r")], list_size=args.list_size)
            t_build = time.time() - t0
            built = AnonPeak.now() - mem.base
            stats: dict = {}
            t0 = time.time()
            found, _, refined = match_refined(pool, index, lambda r: fine_canvas(pil(eval_image(train, r))),
                                              args.max_rms, LOOSE * args.max_rms, stats=stats)
            dt = time.time() - t0
        share = stats.get("pairs", 0) / (len(pool) * len(index.key))
        print(f"eval {n_eval:,} images ({len(index.key):,} variants in {len(index.centroids):,} lists): build "
              f"{t_build:.0f} s, index {index.nbytes / 2**30:.2f} GiB (anonymous memory after it +{built / 2**30:.2f} "
              f"GiB, peak while building and matching +{(mem.peak - mem.base) / 2**30:.2f} GiB); {len(pool):,} pool "
              f"images in {dt:.1f} s = {dt / len(pool) * 1e6 / 3600:.2f} h per 1M pool images on {args.threads} "
              f"thread(s); distances computed: {100 * share:.3f}% of pool x variants; {(found >= 0).sum()} matched "
              f"({refined.sum()} by the fine search)", flush=True)
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
    c.add_argument("--threads", type=int, default=1)
    m = sub.add_parser("match")
    m.add_argument("--max-rms", type=float, default=MAX_RMS)
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--eval-sizes", type=int, nargs="+", default=[10000, 50000, 1000000])
    m.add_argument("--pool", type=int, default=10000, help="pool images matched (the time is per 1M, linear)")
    m.add_argument("--list-size", type=int, default=LIST_SIZE)
    m.add_argument("--work", default="/tmp/bench_copies", help="where each eval side's variants are written (12.8 GB "
                   "for 1M eval images; made once, reused)")
    p = sub.add_parser("photos")
    p.add_argument("--tile", type=int, default=96)
    p.add_argument("--copies", type=int, default=500)
    p.add_argument("--distinct", type=int, default=40, help="tiles checked against the others")
    p.add_argument("--max-rms", type=float, default=4.6)
    args = ap.parse_args()
    commands = {"choose": cmd_choose, "recall": cmd_recall, "cost": cmd_cost, "match": cmd_match, "photos": cmd_photos}
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
