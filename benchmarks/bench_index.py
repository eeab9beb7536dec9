"""The DALI path's index pass (noisystudent/data/dali_index.py): what it costs per image, what it keeps and drops,
and the memory a process holds after it.

    python benchmarks/bench_index.py speed --work /tmp/bench_index --images 10000 --old /tmp/ns-old
    python benchmarks/bench_index.py speed --work /tmp/bench_index --images 10000 --old /tmp/ns-old --grain 30
    python benchmarks/bench_index.py agree --images 400
    python benchmarks/bench_index.py memory --work /tmp/bench_index --shards 1 10 100 --old /tmp/ns-old

speed: --images photo-like JPEGs (crops of scikit-learn's two sample photos, 500x375, JPEG quality 75-95, some
mirrored, tinted, blurred or noisy; 10 shards with a class per sample) indexed by one thread, each method in its own
process over the same shards (read once before, so they come from the page cache): the pass before issue 35
(`--old`: a checkout of that code, e.g. `git worktree add /tmp/ns-old 9e07f23`; every image decoded by PIL in draft
mode), the same decode in today's code (check="decode"), a full PIL decode of every image (for scale), today's
structural check (check="structure"), and the tar headers alone (the floor: no image byte read). Per method: CPU
time per image of the process (so another job on the machine costs wall time, not these figures), images/s per
core, bytes read per image (/proc/self/io rchar: from the page cache or the disk).

agree: what each check keeps and drops on images of every kind the tests use and more: RGB, gray and CMYK JPEGs,
progressive and EXIF-carrying JPEGs, PNGs (RGB, palette, 16-bit gray), WebP, and broken ones: truncated at a
random point, flipped bits and overwritten blocks in a JPEG's scan data and in a PNG's, data after a JPEG's EOI,
text, empty files. Prints per kind how many images PIL's decode (the pass as it was) and the structural check with
its fallback (as it is) keep, and every image on which they differ.

memory: the peak memory of a process that loads the index of N shards of 10,000 tiny PNG samples each (1, 10 and
100 shards: 10k to 1M samples) and then reads one shard's records, as a labeling process reading its own shards
does: today's code and, with --old, the code before issue 35 (which loaded every shard's record). Each figure is the
process's peak RSS less its RSS after imports.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

KINDS_OK = ("rgb", "gray", "cmyk", "progressive", "exif", "png_rgb", "png_palette", "png_gray16", "webp")
KINDS_BAD = ("jpeg_truncated", "jpeg_scan_bitflips", "jpeg_scan_overwritten", "jpeg_trailing_data", "png_truncated",
             "png_bitflip", "text", "empty")


# ---------------------------------------------------------------------------------------------------- data
def photo(rng: np.random.Generator, size=(500, 375), grain: float = 0.0) -> Image.Image:
    """A crop of one of scikit-learn's sample photos at a random place and scale, resized to `size`, with a random
    mirror, tint, blur or sensor noise: photo statistics (what JPEG's cost depends on), never twice the same."""
    from sklearn.datasets import load_sample_images

    if not hasattr(photo, "images"):
        photo.images = [Image.fromarray(a) for a in load_sample_images().images]
    src = photo.images[int(rng.integers(len(photo.images)))]
    scale = rng.uniform(0.45, 1.0)
    w, h = int(src.width * scale), int(src.width * scale * size[1] / size[0])
    h = min(h, src.height)
    x, y = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
    img = src.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, np.float32) * rng.uniform(0.8, 1.2, 3)
    if rng.random() < 0.3:
        arr += rng.normal(0, rng.uniform(2, 8), arr.shape)
    if grain:  # fine detail everywhere: larger files, as photos of textured scenes
        arr += rng.normal(0, grain, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return img


def jpeg(img: Image.Image, quality: int, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def make_shards(work: Path, images: int, shards: int = 10, grain: float = 0.0) -> list[str]:
    from noisystudent.data.writer import write_shard

    folder = work / (f"jpeg-{images}" + (f"-grain{grain:g}" if grain else ""))
    urls = [str(folder / f"photos-{s:06d}.tar") for s in range(shards)]
    if all(os.path.exists(u) for u in urls):
        return urls
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = -(-images // shards)
    sizes = []
    for s, url in enumerate(urls):
        samples = []
        for i in range(s * per, min(images, (s + 1) * per)):
            data = jpeg(photo(rng, grain=grain), int(rng.integers(75, 96)))
            sizes.append(len(data))
            samples.append({"__key__": f"photo{i:07d}", "jpg": data, "cls": str(i % 10).encode()})
        write_shard(url, samples)
    print(f"made {images} JPEGs of 500x375 in {shards} shards under {folder}: {np.mean(sizes) / 1e3:.1f} KB mean "
          f"(min {min(sizes) / 1e3:.1f}, max {max(sizes) / 1e3:.1f})", flush=True)
    return urls


# --------------------------------------------------------------------------------------------------- speed
def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def _speed(method: str, urls: list[str], out: Path) -> None:
    """One method over `urls` in this process (the child of `speed`)."""
    import tarfile

    from noisystudent.data import dali_index as DI

    def full_decode(url):
        n = 0
        with tarfile.open(url, "r:") as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(tar.extractfile(m).read())) as img:
                        img.convert("RGB")
                    n += 1
        return n

    def tar_only(url):
        with tarfile.open(url, "r:") as tar:
            return sum(m.name.endswith(".jpg") for m in tar)

    run = {"as_it_was": lambda u: len(DI._read_shard(u)),  # the old signature: no check argument
           "decode": lambda u: len(DI._read_shard(u, "decode")),
           "full_decode": full_decode,
           "structure": lambda u: len(DI._read_shard(u, "structure")),
           "tar_headers": tar_only}[method]
    b0, c0, t0 = rchar(), time.process_time(), time.perf_counter()
    n = sum(run(u) for u in urls)
    cpu, wall, read = time.process_time() - c0, time.perf_counter() - t0, rchar() - b0
    out.write_text(json.dumps({"method": method, "images": n, "cpu_s": cpu, "wall_s": wall, "bytes_read": read}))


def speed(a) -> None:
    urls = make_shards(a.work, a.images, grain=a.grain)
    for u in urls:  # into the page cache, so every method reads the same way
        Path(u).read_bytes()
    methods = (["as_it_was"] if a.old else []) + ["decode", "full_decode", "structure", "tar_headers"]
    rows = {}
    for rep in range(a.repeats):
        for m in methods:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            if m == "as_it_was":
                env["PYTHONPATH"] = str(a.old)
            out = a.work / f"speed-{m}.json"
            subprocess.run([sys.executable, __file__, "_speed", m, *urls, "--result", str(out)], check=True, env=env,
                           cwd=a.old if m == "as_it_was" else None)
            r = json.loads(out.read_text())
            rows.setdefault(m, []).append(r)
            print(f"repeat {rep}: {m}: {r['images'] / r['cpu_s']:.0f} images/s per core", flush=True)
    base = np.median([r["cpu_s"] / r["images"] for r in rows["as_it_was" if a.old else "decode"]])
    print(f"\n{a.images} JPEGs, 500x375 (grain {a.grain:g}), one thread; medians of {a.repeats} repeats\n")
    print("| method | CPU per image (us) | images/s per core | cheaper than the pass as it was | "
          "bytes read per image |")
    print("|---|---|---|---|---|")
    for m, rs in rows.items():
        per = float(np.median([r["cpu_s"] / r["images"] for r in rs]))
        kept = rs[0]["images"]
        print(f"| {m} | {per * 1e6:.1f} | {1 / per:,.0f} | {base / per:.1f}x | "
              f"{np.median([r['bytes_read'] for r in rs]) / max(kept, 1):,.0f} |")
    (a.work / "speed.json").write_text(json.dumps(rows, indent=1))


# --------------------------------------------------------------------------------------------------- agree
def variants(rng: np.random.Generator, n: int) -> list[tuple[str, bytes]]:
    """n images of every kind (KINDS_OK, KINDS_BAD)."""
    out = []
    for _ in range(n):
        img = photo(rng, (int(rng.integers(64, 640)), int(rng.integers(64, 480))))
        q = int(rng.integers(60, 96))
        base = jpeg(img, q)
        buf = io.BytesIO()
        exif = Image.Exif()
        exif[0x010F] = "camera" * int(rng.integers(1, 2000))  # Make: an APP1 segment of up to 12 KB
        kinds = {"rgb": base, "gray": jpeg(img.convert("L"), q), "cmyk": jpeg(img.convert("CMYK"), q),
                 "progressive": jpeg(img, q, progressive=True), "exif": jpeg(img, q, exif=exif.tobytes())}
        for mode, kind in (("RGB", "png_rgb"), ("P", "png_palette"), ("I;16", "png_gray16")):
            buf = io.BytesIO()
            (img.convert(mode) if mode != "I;16" else Image.fromarray(
                np.asarray(img.convert("L"), np.uint16) * 257)).save(buf, format="PNG")
            kinds[kind] = buf.getvalue()
        buf = io.BytesIO()
        img.save(buf, format="WEBP", quality=q)
        kinds["webp"] = buf.getvalue()
        sos = base.find(b"\xff\xda")
        scan = np.frombuffer(base, np.uint8).copy()
        flips = rng.integers(sos + 20, len(base) - 2, int(rng.integers(1, 20)))
        scan[flips] ^= (1 << rng.integers(0, 8, len(flips))).astype(np.uint8)
        over = np.frombuffer(base, np.uint8).copy()
        at, span = int(rng.integers(sos + 20, len(base) - 200)), int(rng.integers(16, 200))
        over[at:at + span] = rng.integers(0, 256, span)
        png = bytearray(kinds["png_rgb"])
        png[int(rng.integers(40, len(png) - 20))] ^= 1 << int(rng.integers(0, 8))
        kinds.update({
            "jpeg_truncated": base[:int(rng.integers(2, len(base) - 2))],
            "jpeg_scan_bitflips": scan.tobytes(), "jpeg_scan_overwritten": over.tobytes(),
            "jpeg_trailing_data": base + rng.bytes(int(rng.integers(1, 5000))),
            "png_truncated": kinds["png_rgb"][:int(rng.integers(8, len(kinds["png_rgb"]) - 1))],
            "png_bitflip": bytes(png), "text": b"not an image " * int(rng.integers(1, 50)), "empty": b""})
        out += [(k, v) for k, v in kinds.items()]
    return out


def agree(a) -> None:
    from noisystudent.data.dali_index import check_image

    rng = np.random.default_rng(a.seed)
    table, differ = {}, []
    for i, (kind, data) in enumerate(variants(rng, a.images)):
        old = check_image(data, "decode")[0] is None
        new, decoded = check_image(data, "structure")
        new = new is None
        t = table.setdefault(kind, [0, 0, 0, 0])
        t[0] += 1
        t[1] += old
        t[2] += new
        t[3] += decoded
        if old != new:
            differ.append((i, kind, old, new, check_image(data, "decode")[0]))
    print(f"{a.images} images of each kind (seed {a.seed})\n")
    print("| kind | images | kept by PIL's decode (the pass as it was) | kept by the structural check (as it is) | "
          "decoded by PIL (unsure) |")
    print("|---|---|---|---|---|")
    for kind, (n, old, new, dec) in table.items():
        print(f"| {kind} | {n} | {old} | {new} | {dec} |")
    print(f"\n{len(differ)} images kept by one and dropped by the other")
    for d in differ[:30]:
        print("  ", d)


# -------------------------------------------------------------------------------------------------- memory
def make_tiny_shards(folder: Path, shards: int, per: int) -> list[str]:
    from noisystudent.data.writer import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    urls = []
    for s in range(shards):
        url = folder / f"tiny-{s:06d}.tar"
        if not url.exists():
            write_shard(url, [{"__key__": f"s{s:06d}-{i:06d}", "png": pngs[i % 64], "cls": str(i % 10).encode()}
                              for i in range(per)])
        urls.append(str(url))
    return urls


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def _memory(urls: list[str], index_dir: str, out: Path) -> None:
    from noisystudent.data.dali_index import index_shards

    base = rss_kb()
    t0 = time.perf_counter()
    records = index_shards(Path(index_dir), urls, 1)
    load_s = time.perf_counter() - t0
    rec = records[urls[0]]  # a process reading its first shard, as labeling does
    after = rss_kb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.write_text(json.dumps({"shards": len(urls), "samples_read": len(rec), "base_kb": base, "after_kb": after,
                               "peak_kb": peak, "load_s": load_s}))


def memory(a) -> None:
    folder = a.work / "tiny"
    codes = [("as it is", None)] + ([("as it was", a.old)] if a.old else [])
    print("| shards (10,000 samples each) | samples | code | peak memory over imports (MiB) | loading the index (s) |")
    print("|---|---|---|---|---|")
    for n in a.shards:
        urls = make_tiny_shards(folder, n, a.per_shard)
        for name, code in codes:
            env = {**os.environ, **({"PYTHONPATH": str(code)} if code else {})}
            index_dir = a.work / f"tiny-index-{'old' if code else 'new'}"
            out = a.work / "memory.json"
            # made first (not measured), then loaded in a fresh process: what every later step does
            for _ in ("make", "measure"):
                subprocess.run([sys.executable, __file__, "_memory", *urls, "--index-dir", str(index_dir),
                                "--result", str(out)], check=True, env=env, cwd=code)
            r = json.loads(out.read_text())
            print(f"| {n} | {n * a.per_shard:,} | {name} | {(r['peak_kb'] - r['base_kb']) / 1024:.1f} | "
                  f"{r['load_s']:.2f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("speed", "agree", "memory", "_speed", "_memory"))
    p.add_argument("args", nargs="*")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_index"))
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grain", type=float, default=0.0,
                   help="speed: grey levels of fine noise added to every photo (30: files of about 90 KB)")
    p.add_argument("--old", type=Path, help="a checkout of the code before issue 35 (its pass decoded every image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--per-shard", type=int, default=10000)
    p.add_argument("--result", type=Path)
    p.add_argument("--index-dir")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.mode == "_speed":
        _speed(a.args[0], a.args[1:], a.result)
    elif a.mode == "_memory":
        _memory(a.args, a.index_dir, a.result)
    else:
        {"speed": speed, "agree": agree, "memory": memory}[a.mode](a)


if __name__ == "__main__":
    main()
