"""Labeling throughput (images/s): our pseudolabel stage vs a plain PyTorch loop vs the model's pure forward.

Run by hand (not a test). Two regimes:
  compute: efficientnet_b0 at 224 px on ImageNet-sized JPEGs (500x375)
  decode:  a tiny model (test_efficientnet, 64 px) on large JPEGs (1024x768): decoding dominates

    python benchmarks/bench_pseudolabel.py --regime compute
    python benchmarks/bench_pseudolabel.py --regime decode --timm-inference /path/to/timm/inference.py
    python benchmarks/bench_pseudolabel.py --regime tiny --ours-only 5 --workdir /tmp/bl   # ours alone, 5 times
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_pseudolabel.py ...   # another version's stage

Every method labels the same JPEG bytes with the same randomly initialised model and batch size:
  forward        model(x) + softmax on ready tensors, nothing else: the limit (the better of NCHW and
                 channels_last; the model unfused, as timm runs it)
  reference      torch DataLoader over the JPEG files (PIL + timm eval transform), model, softmax
  timm           timm's own inference.py --channels-last (when --timm-inference is given)
  ours-plain     stage=pseudolabel with every lever off (no BN folding, no draft decode, NCHW)
  ours           stage=pseudolabel with the default levers (+ channels_last) = what users get
Also, with --memory, peak RSS of the stage with S and 10 x S shards (flat memory = no growth).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REGIMES = {
    "compute": {"model": "efficientnet_b0", "img_size": 224, "src": (500, 375), "images": 512, "batch": 32},
    "decode": {"model": "test_efficientnet", "img_size": 64, "src": (1024, 768), "images": 2048, "batch": 64},
    # the benchmarks' own case (Fashion-MNIST, the digits): a tiny model on tiny images, where what labeling does
    # per image besides the forward (the out-of-domain scores, the label files) weighs the most
    "tiny": {"model": "test_efficientnet", "img_size": 32, "src": (32, 32), "images": 8192, "batch": 128},
}


def make_jpegs(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: smooth random fields plus fine noise (random noise alone decodes unusually slowly)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        low = rng.integers(0, 255, (size[1] // 32 + 1, size[0] // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize(size, Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
        path = root / f"img{i:06d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return files


def bench_forward(model, batch, img_size, n_images, channels_last=False) -> float:
    x = torch.randn(batch, 3, img_size, img_size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_images // batch):
            torch.softmax(model(x), dim=1)
    return (n_images // batch) * batch / (time.perf_counter() - t0)


class Files(torch.utils.data.Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB"))


def bench_reference(model, files, transform, batch, workers) -> float:
    loader = torch.utils.data.DataLoader(Files(files, transform), batch_size=batch, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for x in loader:
            torch.softmax(model(x), dim=1)
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def bench_timm(script, data_dir, model_name, img_size, batch, workers, ckpt) -> float:
    cmd = [sys.executable, script, str(data_dir), "--model", model_name, "--num-classes", "10", "--img-size",
           str(img_size), "--batch-size", str(batch), "--workers", str(workers), "--channels-last", "--device",
           "cpu", "--checkpoint", str(ckpt), "--log-freq", "1", "--no-console-results", "--results-dir",
           str(Path(ckpt).parent / "timm_out")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    times = [float(m) for m in re.findall(r"Time (\d+\.\d+) \(", out.stdout + out.stderr)]
    if not times:
        raise RuntimeError(out.stderr[-2000:])
    # its own per-batch timer over the whole loop (first batch included, like our wall clock)
    return batch * len(times) / sum(times)


def bench_ours(run_dir, pattern, batch, workers, levers: bool, extra=()) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from noisystudent.__main__ import run_stage

    opts = ["pseudolabel.fuse_bn=true", "pseudolabel.jpeg_draft=true", "channels_last=true"] if levers else [
        "pseudolabel.fuse_bn=false", "pseudolabel.jpeg_draft=false", "channels_last=false"]
    with initialize_config_module("noisystudent.conf", version_base="1.3"):
        cfg = compose("config", overrides=["stage=pseudolabel", "data=shards", f"run_dir={run_dir}",
                                           f"data.unlabeled='{pattern}'", "data.num_classes=10", "data.labeled=x",
                                           "data.eval=x", "data.crop_pct=0.875", f"pseudolabel.batch_size={batch}",
                                           f"num_workers={workers}", "force=true", *opts, *extra])
    OmegaConf.resolve(cfg)
    return run_stage(cfg)


def setup_teacher(run_dir: Path, model_name: str, img_size: int):
    import timm

    from noisystudent.models.build import export_model
    from noisystudent.rundir import mark_done, teacher_dir

    model = timm.create_model(model_name, num_classes=10).eval()
    info = {"name": model_name, "img_size": img_size, "test_img_size": img_size, "num_classes": 10,
            "params": sum(p.numel() for p in model.parameters())}
    export_model(teacher_dir(run_dir), model, info)
    mark_done(teacher_dir(run_dir), {"bench": True})
    torch.save({"state_dict": model.state_dict()}, run_dir / "timm_ckpt.pth")
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--regime", choices=REGIMES, default="compute")
    ap.add_argument("--images", type=int)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--timm-inference", help="path to timm's inference.py, to measure it side by side")
    ap.add_argument("--compile", action="store_true", help="also measure ours with torch.compile")
    ap.add_argument("--memory", action="store_true", help="peak RSS with S and 10 x S shards (separate processes)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--only-ours", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ours-only", type=int, metavar="N", help="measure only ours (the default levers), N times, and "
                    "print the images/s of each: e.g. two versions of the stage side by side (PYTHONPATH)")
    ap.add_argument("pattern", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    r = REGIMES[args.regime]
    n = args.images or r["images"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix=f"bench_{args.regime}_"))
    img_dir = work / "images"
    if not img_dir.exists():
        make_jpegs(img_dir / "c0", n, r["src"])  # one class dir: the layout timm's inference.py reads
    files = sorted(img_dir.rglob("*.jpg"))[:n]
    shard_dir = work / f"shards{args.shards}"
    if not shard_dir.exists():
        from noisystudent.data.importer import import_images

        import_images(img_dir, shard_dir, "unlabeled", samples_per_shard=max(1, (n + args.shards - 1) // args.shards))
    pattern = json.loads((shard_dir / "manifest.json").read_text())["pattern"]
    run_dir = work / ("run_mem" if args.only_ours else "run")
    model = setup_teacher(run_dir, r["model"], r["img_size"])
    if args.only_ours:  # used by --memory: one stage run in a fresh process, then its peak RSS
        bench_ours(work / "run_mem", args.pattern, r["batch"], args.workers, True)
        print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    if args.ours_only:
        import noisystudent

        rates = [bench_ours(run_dir, pattern, r["batch"], args.workers, True)["images_per_sec"]
                 for _ in range(args.ours_only)]
        print(json.dumps({"regime": args.regime, "package": str(Path(noisystudent.__file__).parent),
                          "images_per_sec": rates, "median": float(np.median(rates))}))
        return

    from timm.data import create_transform

    from noisystudent.data.transforms import model_norm

    mean, std = model_norm(model)
    # the plain loop's transform: timm's eval transform as timm users run it (float, normalized per image)
    tf = create_transform(r["img_size"], is_training=False, crop_pct=0.875, interpolation="bicubic", mean=mean, std=std)
    res = {"regime": args.regime, "model": r["model"], "img_size": r["img_size"], "source_jpeg": r["src"],
           "images": n, "batch": r["batch"], "workers": args.workers, "torch_threads": torch.get_num_threads()}
    # the limit: the model's forward on ready tensors, NCHW and channels_last (timm's --channels-last)
    res["forward_nchw"] = bench_forward(copy.deepcopy(model), r["batch"], r["img_size"], n)
    res["forward_channels_last"] = bench_forward(copy.deepcopy(model), r["batch"], r["img_size"], n,
                                                 channels_last=True)
    res["forward"] = max(res["forward_nchw"], res["forward_channels_last"])
    res["reference"] = bench_reference(model, files, tf, r["batch"], args.workers)
    if args.timm_inference:
        res["timm"] = bench_timm(args.timm_inference, img_dir, r["model"], r["img_size"], r["batch"], args.workers,
                                 run_dir / "timm_ckpt.pth")
    res["ours_plain"] = bench_ours(run_dir, pattern, r["batch"], args.workers, False)["images_per_sec"]
    s = bench_ours(run_dir, pattern, r["batch"], args.workers, True)
    res["ours"], res["ours_levers"] = s["images_per_sec"], s["inference"]
    if args.compile:
        res["ours_compile"] = bench_ours(run_dir, pattern, r["batch"], args.workers, True,
                                         ["pseudolabel.compile=true"])["images_per_sec"]
    for k in ("reference", "timm", "ours_plain", "ours", "ours_compile"):
        if k in res:
            res[f"{k}_vs_forward"] = res[k] / res["forward"]
    if "timm" in res:
        res["ours_vs_timm"] = res["ours"] / res["timm"]
    if args.memory:
        res["peak_rss_mb"] = {}
        for mult in (1, 10):
            # mult x the shards (same size each: the base shards under new names), so 10 x the images
            many = work / f"many{mult}"
            many.mkdir(exist_ok=True)
            base = sorted(shard_dir.glob("*.tar"))
            for m in range(mult):
                for b in base:
                    link = many / f"m{m:03d}-{b.name}"
                    if not link.exists():
                        link.symlink_to(b)
            pat = str(many / f"m{{000..{mult - 1:03d}}}-unlabeled-{{000000..{len(base) - 1:06d}}}.tar")
            cmd = [sys.executable, __file__, "--regime", args.regime, "--images", str(n), "--workers",
                   str(args.workers), "--shards", str(args.shards), "--workdir", str(work), "--only-ours", pat]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res["peak_rss_mb"][f"{len(base) * mult}_shards_{n * mult}_images"] = json.loads(
                out.strip().splitlines()[-1])["maxrss_mb"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
