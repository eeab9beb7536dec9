"""What robustness evaluation costs a loader worker: images/s of one process making each corruption and
perturbation (noisystudent.data.corruptions.VariantMaker, what the eval workers run), per size.

    python benchmarks/bench_corruptions.py                       # 32 and 224 px, severities 1-5, all 19 + 2
    python benchmarks/bench_corruptions.py --sizes 224 --images 8 --json /tmp/corruption_cost.json

Images are made here (smooth gradients with noise and edges; no download): the cost of a corruption hardly
depends on the content. Each figure is the mean over the severities of (images / seconds) for one process and
one thread, after a warm-up image (numba's compile of glass_blur and imports are not counted). A worker of
stage=evaluate decodes and resizes each image once and pays the sum of these for every variant it makes, so the
throughput of a whole plan per worker is 1 / sum(1 / rate) over its variants."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def images(size: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(n):
        base = np.stack([x * rng.uniform(80, 200), y * rng.uniform(80, 200), (x + y) * rng.uniform(40, 120)], -1)
        base[size // 4: size // 2, size // 3: 2 * size // 3] += 60.0  # an edge for the blurs to smear
        out.append(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    return out


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one worker = one thread, as in the eval loader
    from noisystudent.data.corruptions import COMMON, HELD_OUT, SEVERITIES, Variant, VariantMaker, translate_offsets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[32, 224])
    p.add_argument("--images", type=int, default=16, help="images per corruption and severity")
    p.add_argument("--corruptions", nargs="*", default=list(COMMON + HELD_OUT))
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()

    results = {}
    for size in a.sizes:
        resized = int(size / 0.875)  # the eval resize of data.crop_pct=0.875, so translate has room
        imgs = images(resized, a.images)
        maker = VariantMaker(size, seed=0)
        rates = {}
        variants = {c: [Variant("corruption", c, s) for s in SEVERITIES] for c in a.corruptions}
        variants["brightness (perturbation)"] = [Variant("perturbation", "brightness", j) for j in range(10)]
        variants["translate (perturbation)"] = [Variant("perturbation", "translate", j)
                                                for j in range(len(translate_offsets(resized, size)))]
        for name, vs in variants.items():
            maker(imgs[0], "warm-up", vs[0])
            per = []
            for v in vs:
                t = time.perf_counter()
                for i, img in enumerate(imgs):
                    maker(img, f"img{i}", v)
                per.append(len(imgs) / (time.perf_counter() - t))
            rates[name] = sum(per) / len(per)
            print(f"{size:4d} px  {name:28s} {rates[name]:10.1f} images/s per worker", flush=True)
        common = [rates[c] for c in COMMON if c in rates]
        if len(common) == len(COMMON):
            # one image through all 15 x 5 corrupted views: what eval.corruptions=all costs a worker per image
            per_image = sum(len(SEVERITIES) / r for r in common)
            rates["all 15 x 5 (images/s through every view)"] = 1.0 / per_image
            print(f"{size:4d} px  all 15 corruptions x 5 severities: {1.0 / per_image:.2f} source images/s per worker")
        results[size] = rates
    for size, rates in results.items():
        slow = sorted((r, n) for n, r in rates.items() if not n.startswith("all"))[:3]
        print(f"{size} px, slowest: " + ", ".join(f"{n} {r:.1f}/s" for r, n in slow))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"images": a.images, "rates": results}, f, indent=1)


if __name__ == "__main__":
    main()
