"""GPU throughput (images/s) and peak GPU memory, efficientnet_b0 at 224 px: labeling and training, ours (the
torch loader and DALI) vs timm's own scripts vs the model's limits on ready tensors, and optionally a sweep of
loader CPUs. One command, sized for under 10 minutes on one H100 host with 16 cores; a time budget
(--budget-s) starts no repeat, and no run, that would end past it:

    python benchmarks/bench_gpu.py --timm-inference /path/to/timm/inference.py \\
        --timm-train /path/to/timm/train.py --sweep-workers 4,8,16 --out gpu.json

CPU smoke test of every code path but the CUDA-only calls (test_efficientnet at 64 px, a few dozen images,
a few steps; DALI runs its CPU operators; its figures say nothing about a GPU):

    python benchmarks/bench_gpu.py --device cpu --quick --sweep-workers 1,2

Data: --images photo-like 500x375 JPEGs (bench_pseudolabel.make_jpegs) in 10 class folders, which timm's
scripts read as they are, and the same files in 2 x --workers webdataset shards (2 x the largest of
--workers and --sweep-workers; with a class per sample) for our stages. Every method runs the same model
with 10 classes, --batch images per step, --workers loader CPUs (torch: DataLoader worker processes; DALI:
pipeline threads, the same num_workers key), bf16 autocast and channels_last (timm's scripts: --amp
--amp-dtype bfloat16, our precision, --channels-last). Every row of ours names its loader (data.loader=torch
or dali): the default, auto, picks dali on CUDA where DALI is installed.

Labeling (a randomly initialised teacher, top-5 kept):
  gpu_decode      python -m noisystudent stage=pseudolabel data.loader=torch pseudolabel.decode=gpu
  cpu_decode      the same with pseudolabel.decode=cpu
  dali_label      stage=pseudolabel data.loader=dali (DALI decodes: nvJPEG "mixed" on CUDA, resize and crop on
                  the GPU; pseudolabel.decode is not used)
  timm_inference  timm's inference.py --amp --channels-last over the image folder (--timm-inference)
  forward         the limit: forward + softmax in bf16 autocast on a ready channels_last batch on the device
                  (inference_mode, cudnn.benchmark; BatchNorm not folded, as timm runs the model)
  gpu_decode_parts  why decode=gpu labels slower than decode=cpu: on --batch of the JPEGs, each part of the
                  two torch paths alone, in ms per batch: a loader worker's side (decode=cpu: PIL decode +
                  resize/crop; decode=gpu: the JPEG header check and packing), and decode=gpu's main-process
                  side (noisystudent.data.device_decode.DeviceJpegDecoder: one decode call for the batch, the
                  resize + center crop image by image, the stack), the device synchronized around each. Its
                  images/s: the whole main-process call's, the most decode=gpu can label with any number of
                  workers (the forward comes on top, in the same process and stream)
Training (RandAugment rand-n2-m9-mmax27 after a random resized crop and flip, AdamW lr 2e-3 wd 0.05, EMA
0.9999 with warm-up, label smoothing 0.1, dropout and stochastic depth 0.2 as the efficientnet_b0 preset):
  teacher         python -m noisystudent stage=teacher data.loader=torch precision=bf16 channels_last=true ...
  student         stage=student: --batch/2 labeled + --batch/2 pseudo-labeled images per step
  dali_teacher    teacher with data.loader=dali (crop, flip, RandAugment and resize on the GPU on CUDA)
  dali_student    student with data.loader=dali, on the same pseudo-labels as student
  timm_train      timm's train.py --amp --channels-last, one epoch of --steps updates (--timm-train)
  step            the limit: forward + backward + AdamW (timm.optim.create_optimizer_v2, fused) + EMA update
                  (timm.utils.ModelEmaV3) in bf16 autocast on a ready channels_last batch on the device

Steady state only: a loader starts with a burst (every worker's first batches are ready at once, and more
pile up while the first step waits for CUDA), so images/s over a whole short run overstates what the
pipeline sustains. Each subprocess method is therefore measured over the second half of its work: ours
as the difference of two runs, half the shards then all of them (labeling: one shard per worker in the
shorter run, then two) and --steps/2 then --steps steps (training), from each stage's own loop time in
summary.json; timm's from its own per-batch / per-update timer over the second half of its batches. The
limits time --steps iterations after warm-up ones. The methods are interleaved over --repeats; medians
are compared.

DALI's index pass (every image checked once, data/image_check.py; index files written under run_dir/dali_index/,
reused by every later step of that run dir) is kept out of every timing: a labeling step counts it in
its loop time (wall_s), and in a pair of runs the longer one would index the shards the shorter did not
read, so the difference would not cancel it. It is therefore made here once, before any timed run, over
all the shards (its own images/s printed with it), and copied into the run dir of every DALI row; the
records are keyed by shard path, size and mtime, not by run dir. A DALI run that still changes them fails
instead of giving a figure.

Loader CPUs (--sweep-workers 4,8,16): cpu_decode, dali_label, teacher and dali_teacher again at each
num_workers value (interleaved with the rest, in the same repeats; the value equal to --workers is the
rows above), printed as images/s per setting and images/s per loader CPU: what one core buys on each path.
At 4,8,16 with --workers 16 that is 16 subprocess runs more per repeat, as many as all the other rows take.

Goals (the issue's targets, on one H100 with 16 cores): labeling with decode=gpu >= 1.5x timm's
inference.py and >= 10,000 images/s; labeling from JPEG shards with DALI >= 12,000 images/s and >= 3x
timm's inference.py; training >= 1.15x timm's train.py and >= 0.85 of the step limit; training with DALI
>= 1.3x timm's train.py and >= 0.85 of the step limit.

Peak GPU memory: the limits' and gpu_decode_parts' torch.cuda.max_memory_allocated; a subprocess's, the peak
of nvidia-smi's memory.used for this GPU while it ran, less the level before it started (so it holds that
process's CUDA context and its allocator's cache, and DALI's memory pool, as well: not comparable one to
one with the limits' figure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_pseudolabel import make_jpegs, setup_teacher  # noqa: E402

AUG = "rand-n2-m9-mmax27"
CLASSES = 10
PRESETS = {
    "full": {"model": "efficientnet_b0", "img_size": 224, "src": (500, 375), "images": 16384, "batch": 256,
             "steps": 96, "warmup": 10},
    "quick": {"model": "test_efficientnet", "img_size": 64, "src": (160, 120), "images": 64, "batch": 8,
              "steps": 6, "warmup": 2},
}
ROWS = {  # key (for --skip and the JSON): (stage, method)
    "gpu_decode": ("labeling", "ours, torch loader, pseudolabel.decode=gpu"),
    "cpu_decode": ("labeling", "ours, torch loader, pseudolabel.decode=cpu"),
    "dali_label": ("labeling", "ours, data.loader=dali"),
    "timm_inference": ("labeling", "timm inference.py --amp --channels-last"),
    "forward": ("labeling", "limit: forward + softmax on ready tensors"),
    "gpu_decode_parts": ("labeling", "decode=gpu's main-process side alone (DeviceJpegDecoder; parts below)"),
    "teacher": ("training", "ours, stage=teacher, torch loader"),
    "student": ("training", "ours, stage=student (labeled + pseudo-labeled), torch loader"),
    "dali_teacher": ("training", "ours, stage=teacher, data.loader=dali"),
    "dali_student": ("training", "ours, stage=student, data.loader=dali"),
    "timm_train": ("training", "timm train.py --amp --channels-last"),
    "step": ("training", "limit: fwd + bwd + AdamW + EMA on ready tensors"),
}
IN_PROCESS = ("forward", "gpu_decode_parts", "step")  # peak memory: torch's allocated, not nvidia-smi's
DALI_ROWS = {"dali_label": "label_run", "dali_teacher": "teacher_run", "dali_student": "student_run"}  # run dirs
SWEEP_ROWS = {  # rows run again at each --sweep-workers value: (stage, loader)
    "teacher": ("training", "torch"),
    "dali_teacher": ("training", "dali"),
    "cpu_decode": ("labeling", "torch, decode=cpu"),
    "dali_label": ("labeling", "dali"),
}
PARTS = {  # gpu_decode_parts: key -> (where it runs, what)
    "worker_cpu_decode": ("a loader worker", "decode=cpu: PIL decode (draft) + resize + center crop"),
    "worker_raw": ("a loader worker", "decode=gpu: JPEG header check + packing the bytes"),
    "main_decode": ("main process", "decode=gpu: decode_jpeg, one call for the batch"),
    "main_resize_crop": ("main process", "decode=gpu: resize + center crop, image by image"),
    "main_stack": ("main process", "decode=gpu: stack into the batch"),
    "main_whole": ("main process", "decode=gpu: the whole DeviceJpegDecoder call"),
}


class Skip(Exception):
    """A method that cannot run here (e.g. timm's script needs a package that is not installed)."""


class GpuMemory:
    """memory.used (MiB) of this process's GPU as nvidia-smi sees it: what a subprocess holds on it."""

    def __init__(self, device: torch.device):
        self.query = None
        if device.type != "cuda":
            return
        uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", ""))
        ids = [uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"] if uuid else []
        error = None
        for gpu in [*ids, str(device.index or 0)]:  # nvidia-smi ignores CUDA_VISIBLE_DEVICES: the UUID is exact
            self.query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--id={gpu}"]
            try:
                self.read()
                return
            except (OSError, subprocess.CalledProcessError, ValueError, IndexError) as e:
                error = e
        print(f"nvidia-smi is not usable ({error}): the subprocesses' GPU memory is left out", file=sys.stderr)
        self.query = None

    def read(self) -> float:
        out = subprocess.run(self.query, capture_output=True, text=True, check=True).stdout
        return float(out.split()[0])

    def watch(self) -> subprocess.Popen | None:
        """nvidia-smi printing memory.used every 100 ms until stopped (one process, not one per reading)."""
        if self.query is None:
            return None
        return subprocess.Popen([*self.query, "--loop-ms=100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)


@dataclass
class Bench:
    device: torch.device
    model: str
    img_size: int
    images: int
    batch: int
    steps: int
    warmup: int
    workers: int
    work: Path
    data: dict
    gpu_memory: GpuMemory
    timm_inference: str | None
    timm_train: str | None


def _stop(watcher: subprocess.Popen) -> str:
    """End nvidia-smi's loop as Ctrl+C does (its output flushed); its output."""
    watcher.send_signal(signal.SIGINT)
    try:
        return watcher.communicate(timeout=10)[0]
    except subprocess.TimeoutExpired:
        watcher.kill()
        return watcher.communicate()[0]


def run_cmd(b: Bench, cmd: list[str]) -> tuple[str, float | None]:
    """Run a command to its end; its output and the GPU memory it added at its peak (MiB; None without CUDA)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if b.device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # ours would take a GPU where there is one
    base = b.gpu_memory.read() if b.gpu_memory.query else None
    watcher = b.gpu_memory.watch()
    readings: list[float] = []
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=b.work, env=env)
    finally:
        if watcher is not None:
            readings = [float(x) for x in _stop(watcher).split() if re.fullmatch(r"\d+(\.\d+)?", x)]
    text = out.stdout + out.stderr
    if out.returncode != 0:
        missing = re.findall(r"ModuleNotFoundError: .*", text)
        if missing:
            raise Skip(f"needs a package that is not installed ({missing[-1]})")
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    return text, max(readings) - base if base is not None and readings else None


def _write_shard(path: Path, items: list[tuple[str, Path, int]]) -> int:
    from noisystudent.data.writer import write_shard

    return write_shard(path, ({"__key__": key, "jpg": f.read_bytes(), "cls": str(c).encode()} for key, f, c in items))


def make_data(work: Path, images: int, src: tuple[int, int], shards: int, timm_train_images: int,
              procs: int) -> dict:
    """JPEGs in class folders (timm's image folder), the same files as shards, timm's train/validation splits."""
    root = work / f"data_{images}_{src[0]}x{src[1]}_{shards}"
    img_dir = root / "images"
    if not (root / "done").exists():
        counts = [images // CLASSES + (c < images % CLASSES) for c in range(CLASSES)]
        with ProcessPoolExecutor(procs) as pool:
            list(pool.map(make_jpegs, [img_dir / f"c{c}" for c in range(CLASSES)], counts,
                          [src] * CLASSES, range(CLASSES)))
            files = sorted(img_dir.rglob("*.jpg"))
            items = [(f"{f.parent.name}__{f.stem}", f, int(f.parent.name[1:])) for f in files]
            list(pool.map(_write_shard, [root / "shards" / f"shard-{s:06d}.tar" for s in range(shards)],
                          [items[s::shards] for s in range(shards)]))
        for i in range(timm_train_images):  # timm's epoch is its train folder: links to the same files
            f = files[i % len(files)]
            link = root / "timm" / "train" / f.parent.name / f"{i:07d}.jpg"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f)
        for c in range(CLASSES):
            (root / "timm" / "validation" / f"c{c}").mkdir(parents=True)
            (root / "timm" / "validation" / f"c{c}" / "img.jpg").symlink_to(img_dir / f"c{c}" / "img000000.jpg")
        (root / "done").touch()
    pattern = str(root / "shards" / "shard-{{000000..{:06d}}}.tar")
    return {"images": img_dir, "timm": root / "timm", "all": pattern.format(shards - 1),
            "half": pattern.format(shards // 2 - 1), "eval": str(root / "shards" / "shard-000000.tar")}


# --- our stages, through the command line -----------------------------------------------------------------

def stage_cli(b: Bench, run_dir: Path, loader: str, *overrides: str) -> tuple[dict, float | None]:
    """`python -m noisystudent ... data.loader=<loader>` in a fresh process; its summary.json and peak GPU memory.
    Fails where another loader ran, or where a DALI run made index records (the pass belongs before the timings:
    `index_pass`)."""
    from noisystudent.rundir import pseudolabel_dir, student_dir, teacher_dir

    d = b.data
    records = _index_records(run_dir)
    _, peak = run_cmd(b, [sys.executable, "-m", "noisystudent", "data=shards", f"run_dir={run_dir}",
                          f"data.labeled='{d['all']}'", f"data.unlabeled='{d['all']}'", f"data.eval='{d['eval']}'",
                          f"data.num_classes={CLASSES}", "model=efficientnet_b0", f"model.name={b.model}",
                          f"model.img_size={b.img_size}", f"model.test_img_size={b.img_size}",
                          f"num_workers={b.workers}", f"data.loader={loader}", "precision=bf16", "channels_last=true",
                          "force=true", *overrides])  # last: they win
    stage = next(o.split("=", 1)[1] for o in overrides if o.startswith("stage="))
    step = {"teacher": teacher_dir(run_dir), "pseudolabel": pseudolabel_dir(run_dir, 1),
            "student": student_dir(run_dir, 1)}[stage]
    summary = json.loads((step / "summary.json").read_text())
    ran = summary["inference"]["loader"] if stage == "pseudolabel" else summary["loader"]
    if ran != loader:
        raise RuntimeError(f"stage={stage} data.loader={loader}: its summary says the {ran} loader ran")
    if loader == "dali" and _index_records(run_dir) != records:
        raise RuntimeError(f"stage={stage} in {run_dir} made DALI index records itself: its timing would hold the "
                           "index pass, which index_pass makes before the timed runs")
    return summary, peak


def _index_records(run_dir: Path) -> dict[str, int]:
    """The DALI index records of a run dir, name -> mtime (ns): what an index pass made or remade."""
    from noisystudent.stages.common import DALI_INDEX

    return {f.name: f.stat().st_mtime_ns for f in (run_dir / DALI_INDEX).glob("*") if f.is_file()}


def index_pass(b: Bench, run_dirs: list[Path]) -> dict:
    """DALI's index pass over all the shards, as a step makes it (data/dali_index.py, --workers processes), made
    afresh in the first run dir and copied into the others: no timed DALI run makes one. Its own figures."""
    from noisystudent.data.dali_index import index_shards
    from noisystudent.data.shards import expand_shards
    from noisystudent.stages.common import DALI_INDEX

    urls = expand_shards(b.data["all"], "data.unlabeled")
    first = run_dirs[0] / DALI_INDEX
    shutil.rmtree(first, ignore_errors=True)  # a --workdir's earlier pass would time as nothing
    t0 = time.perf_counter()
    records = index_shards(first, urls, b.workers)
    wall = time.perf_counter() - t0
    for run_dir in run_dirs[1:]:
        shutil.copytree(first, run_dir / DALI_INDEX, dirs_exist_ok=True)
    images = sum(records.count(u) for u in urls)
    return {"images": images, "shards": len(urls), "workers": b.workers, "wall_s": wall,
            "images_per_sec": images / wall}


def copy_search(device: torch.device, eval_images: int, pool_images: int) -> dict:
    """The search for copies of eval images (data/fingerprints.py) on the device, once before the timed runs:
    eval_images smooth random 28x28 images (their 200 variants each, made on the device), and a pool of
    pool_images fingerprints of which 1% are noisy copies of eval variants. Its own figures: variants, index
    build, matching per 1M pool images, and the copies found (a check that the search ran as it should)."""
    from noisystudent.data.fingerprints import EvalIndex, match, variants
    from noisystudent.pseudolabels.copies import MAX_RMS

    g = torch.Generator(device="cpu").manual_seed(0)

    def smooth(n: int) -> torch.Tensor:  # uint8 (n, 1, 28, 28): 7x7 noise, upsampled (images with structure)
        coarse = torch.rand(n, 1, 7, 7, generator=g) * 255
        return F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False).round().to(torch.uint8)

    _sync(device)
    t0 = time.perf_counter()
    parts = [variants(smooth(min(4096, eval_images - a)).to(device)).cpu().numpy() for a in range(0, eval_images,
                                                                                                     4096)]
    _sync(device)
    t_variants = time.perf_counter() - t0
    ev = np.concatenate(parts)
    t0 = time.perf_counter()
    index = EvalIndex.build(ev, device)
    _sync(device)
    t_build = time.perf_counter() - t0
    planted = pool_images // 100
    pool = variants(smooth(max(1, pool_images // 200))).reshape(-1, 64)[:pool_images - planted].numpy()
    src = torch.randint(0, eval_images, (planted,), generator=g).numpy()
    noisy = ev[src, torch.randint(0, ev.shape[1], (planted,), generator=g).numpy()].astype(np.int16)
    noisy = np.clip(noisy + torch.randint(-3, 4, noisy.shape, generator=g).numpy(), 0, 255).astype(np.uint8)
    pool = np.concatenate([pool, noisy])
    stats: dict = {}
    t0 = time.perf_counter()
    found, _, _ = match(pool, index, MAX_RMS, stats=stats)
    _sync(device)
    t_match = time.perf_counter() - t0
    return {"eval_images": eval_images, "pool_images": len(pool), "variants_s": t_variants, "build_s": t_build,
            "index_gib": index.nbytes / 2**30, "match_s": t_match,
            "hours_per_1m_pool": t_match / len(pool) * 1e6 / 3600,
            "pairs_share": stats.get("pairs", 0) / max(1, len(pool) * len(index.key)),
            "planted": planted, "planted_found": int((found[len(pool) - planted:] == src).sum())}


def steady(a: tuple[float, float], b: tuple[float, float]) -> float | None:
    """images/s between two runs given as (images, seconds): the longer run's extra images over its extra
    time. None when it took no longer (noise larger than the work: raise --images / --steps)."""
    if b[1] <= a[1]:
        print(f"the longer run took no longer ({a} -> {b}): no figure from this pair", file=sys.stderr)
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def label_ours(b: Bench, loader: str, decode: str | None = None) -> dict:
    """decode: pseudolabel.decode of the torch loader (DALI decodes itself)."""
    runs, peaks = [], []
    for pattern in (b.data["half"], b.data["all"]):
        # wall_s: the labeling loop's, which on the DALI path would hold the index pass had index_pass not made it
        s, peak = stage_cli(b, b.work / "label_run", loader, "stage=pseudolabel", f"data.unlabeled='{pattern}'",
                            f"pseudolabel.batch_size={b.batch}", *([f"pseudolabel.decode={decode}"] if decode else []))
        runs.append((s["images_labeled_this_run"], s["wall_s"]))
        peaks.append(peak)
    return {"images_per_sec": steady(*runs), "peak_mib": _max(peaks), "runs": runs,
            "decode": s["inference"]["decode"]}


def train_ours(b: Bench, stage: str, loader: str) -> dict:
    if stage == "teacher":
        # an epoch far longer than the run: no end-of-epoch checkpoint inside it
        extra = ["stage=teacher", f"train.batch_size={b.batch}", "train.epochs=1",
                 f"data.labeled_samples={100 * b.steps * b.batch}"]
        run_dir = b.work / "teacher_run"
    else:
        extra = ["stage=student", f"train.batch_size={b.batch // 2}", "student.unlabel_ratio=1",
                 "student.epochs=100"]
        run_dir = b.work / "student_run"
    runs, peaks, summary = [], [], {}
    for steps in (b.steps // 2, b.steps):
        summary, peak = stage_cli(b, run_dir, loader, *extra, f"max_steps={steps}", f"train.randaugment={AUG}",
                                  f"student.randaugment={AUG}", "train.ckpt_every_steps=1000000")
        # images/s in summary.json counts from the end of the first step (so never the index pass either)
        counted = summary["images_seen"] * (summary["steps"] - 1) / summary["steps"]
        runs.append((counted, counted / summary["images_per_sec"]))
        peaks.append(peak)
    return {"images_per_sec": steady(*runs), "peak_mib": _max(peaks), "runs": runs,
            **{k: summary[k] for k in ("loader", "precision", "channels_last", "compile")}}


def prepare_student(b: Bench) -> None:
    """A finished teacher (random weights) and round-1 pseudo-labels for stage=student (either loader)."""
    run_dir = b.work / "student_run"
    setup_teacher(run_dir, b.model, b.img_size)
    # a random teacher is unsure of everything: a low threshold keeps every image
    stage_cli(b, run_dir, "torch", "stage=pseudolabel", "pseudolabel.threshold=0.01", "pseudolabel.decode=cpu",
              f"pseudolabel.batch_size={b.batch}")


# --- timm's scripts ---------------------------------------------------------------------------------------

def second_half(times: list[float], batch: int, what: str) -> float:
    """images/s from a script's own per-batch timer, over the second half of its batches."""
    if len(times) < 4:
        raise RuntimeError(f"{what}: {len(times)} timed batches in its log")
    window = times[len(times) // 2:]
    return batch * len(window) / sum(window)


def label_timm(b: Bench) -> dict:
    out, peak = run_cmd(b, [
        sys.executable, b.timm_inference, str(b.data["images"]), "--model", b.model, "--num-classes",
        str(CLASSES), "--img-size", str(b.img_size), "--crop-pct", "0.875", "--batch-size", str(b.batch),
        "--workers", str(b.workers), "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--device",
        b.device.type, "--checkpoint", str(b.work / "label_run" / "timm_ckpt.pth"), "--topk", "5",
        "--label-type", "none", "--log-freq", "1", "--no-console-results", "--results-dir",
        str(b.work / "timm_inference_out")])
    times = [float(t) for t in re.findall(r"Time (\d+\.\d+) \(", out)]
    return {"images_per_sec": second_half(times, b.batch, "timm inference.py"), "peak_mib": peak}


def train_timm(b: Bench) -> dict:
    out, peak = run_cmd(b, [
        sys.executable, b.timm_train, "--data-dir", str(b.data["timm"]), "--model", b.model, "--num-classes",
        str(CLASSES), "--img-size", str(b.img_size), "-b", str(b.batch), "-j", str(b.workers), "--epochs", "1",
        "--opt", "adamw", "--lr", "0.002", "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "0",
        "--smoothing", "0.1", "--aa", AUG, "--color-jitter", "0", "--train-interpolation", "bicubic",
        "--drop", "0.2", "--drop-path", "0.2", "--model-ema", "--model-ema-decay", "0.9999", "--model-ema-warmup",
        "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--device", b.device.type, "--log-interval", "1",
        "--output", str(b.work / "timm_train_out"), "--checkpoint-hist", "1"])
    times = [float(t) for t in re.findall(r"Time: (\d+\.\d+)s,", out)]
    return {"images_per_sec": second_half(times, b.batch, "timm train.py"), "peak_mib": peak}


# --- the limits, in this process --------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(b: Bench, step) -> dict:
    """--warmup calls, then images/s over --steps calls; the peak of allocated device memory."""
    for _ in range(b.warmup):
        step()
    _sync(b.device)
    t0 = time.perf_counter()
    for _ in range(b.steps):
        step()
    _sync(b.device)
    ips = b.steps * b.batch / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(b.device) / 2**20 if b.device.type == "cuda" else None
    return {"images_per_sec": ips, "peak_mib": peak}


def _ready(b: Bench, **model_kwargs):
    """The model and a batch on the device, channels_last; peak memory counted from here."""
    import timm

    if b.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(b.device)
    model = timm.create_model(b.model, num_classes=CLASSES, **model_kwargs)
    model = model.to(b.device, memory_format=torch.channels_last)
    x = torch.randn(b.batch, 3, b.img_size, b.img_size, device=b.device).contiguous(memory_format=torch.channels_last)
    return model, x


def forward_limit(b: Bench) -> dict:
    model, x = _ready(b)
    model.eval()

    def step():
        with torch.autocast(b.device.type, dtype=torch.bfloat16):
            logits = model(x)
        torch.softmax(logits.float(), dim=1)

    with torch.inference_mode():
        return timed(b, step)


def step_limit(b: Bench) -> dict:
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    model, x = _ready(b, drop_rate=0.2, drop_path_rate=0.2)
    model.train()
    y = torch.randint(0, CLASSES, (b.batch,), device=b.device)
    opt = create_optimizer_v2(model, opt="adamw", lr=0.002, weight_decay=0.05, fused=True)
    ema = ModelEmaV3(model, decay=0.9999, use_warmup=True)
    count = [0]

    def step():
        with torch.autocast(b.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        count[0] += 1
        ema.update(model, step=count[0])

    return timed(b, step)


def _ms(b: Bench, part, warmup: int, n: int) -> float:
    """ms per call of `part`, over n calls after `warmup`, the device synchronized around them."""
    for _ in range(warmup):
        part()
    _sync(b.device)
    t0 = time.perf_counter()
    for _ in range(n):
        part()
    _sync(b.device)
    return (time.perf_counter() - t0) / n * 1000


def gpu_decode_parts(b: Bench) -> dict:
    """The torch loader's two labeling paths by part on --batch of the benchmark's JPEGs, with the stages' own
    objects and settings (crop_pct 0.875, jpeg_draft): why decode=gpu (4,134 images/s on the H100) labeled
    slower than decode=cpu (6,459). A worker's parts are timed on this one core over 2 batches (a core's pace is
    steady, and decode=cpu takes about a second a batch at full size); the main process's over --steps."""
    from noisystudent.data.device_decode import DeviceJpegDecoder, RawJpegDecoder, collate_raw, jpeg_decoder
    from noisystudent.data.shards import SampleDecoder, collate_counting
    from noisystudent.data.transforms import eval_resize_crop, eval_transform, resize_target

    found = jpeg_decoder(b.device)
    if found is None:
        raise Skip(f"neither torchcodec's nor torchvision's decode_jpeg decodes on {b.device}")
    data_cfg = {"crop_pct": 0.875}
    resize_crop, transform = eval_resize_crop(b.img_size, data_cfg), eval_transform(b.img_size, data_cfg)
    draft = resize_target(resize_crop)
    files = sorted(b.data["images"].rglob("*.jpg"))[:b.batch]
    samples = [{"__key__": f.stem, "__url__": str(f.parent), "jpg": f.read_bytes()} for f in files]
    cpu = SampleDecoder(transform, CLASSES, labeled=False, draft_size=draft)
    raw = RawJpegDecoder(cpu)
    batch = collate_raw([raw(s) for s in samples])
    if batch["images"].numel():
        raise RuntimeError(f"{batch['images'].shape[0]} of the JPEGs were not sent raw: the parts would mix paths")
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(b.device)
    decoder = DeviceJpegDecoder(b.device, resize_crop, transform, draft, found)
    jpegs = list(torch.split(batch["jpeg_bytes"], batch["jpeg_sizes"]))
    decoded = decoder.decode(jpegs, b.device)
    crops = [decoder.resize_crop(img) for img in decoded]
    parts = {
        "worker_cpu_decode": _ms(b, lambda: collate_counting([cpu(s) for s in samples]), 1, 2),
        "worker_raw": _ms(b, lambda: collate_raw([raw(s) for s in samples]), 1, 2),
        "main_decode": _ms(b, lambda: decoder.decode(jpegs, b.device), b.warmup, b.steps),
        "main_resize_crop": _ms(b, lambda: [decoder.resize_crop(img) for img in decoded], b.warmup, b.steps),
        "main_stack": _ms(b, lambda: torch.stack(crops), b.warmup, b.steps),
        "main_whole": _ms(b, lambda: decoder(batch), b.warmup, b.steps),
    }
    peak = torch.cuda.max_memory_allocated(b.device) / 2**20 if b.device.type == "cuda" else None
    return {"images_per_sec": b.batch / parts["main_whole"] * 1000, "peak_mib": peak, "parts_ms": parts,
            "decoder": decoder.backend}


# --- report -----------------------------------------------------------------------------------------------

def _max(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def _fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def table(runs: dict[str, list[dict]], med: dict[str, float], skipped: dict[str, str]) -> str:
    lines = ["| stage | method | images/s (median) | runs | peak GPU MiB |", "|---|---|---:|---|---:|"]
    for key, (stage, method) in ROWS.items():
        if runs.get(key):
            mem = _max([r["peak_mib"] for r in runs[key]])
            src = "" if mem is None else (" (allocated)" if key in IN_PROCESS else " (nvidia-smi)")
            lines.append(f"| {stage} | {method} | {_fmt(med.get(key))} | "
                         f"{', '.join(_fmt(r['images_per_sec']) for r in runs[key])} | {_fmt(mem)}{src} |")
        elif key in skipped:
            lines.append(f"| {stage} | {method} | skipped: {skipped[key]} | | |")
    return "\n".join(lines)


def parts_table(b: Bench, results: list[dict]) -> str:
    """gpu_decode_parts' medians, with the images/s each part alone would allow (a worker's: per worker, and
    with --workers of them)."""
    lines = [f"decode=gpu and decode=cpu by part: ms per batch of {b.batch} (median of {len(results)} run(s); "
             f"{results[0]['decoder']}'s decode_jpeg on {b.device.type})",
             "| part | where | ms per batch | images/s it allows |", "|---|---|---:|---:|"]
    for key, (where, what) in PARTS.items():
        ms = statistics.median(r["parts_ms"][key] for r in results)
        alone = b.batch / ms * 1000
        allows = _fmt(alone) if where == "main process" else \
            f"{_fmt(alone)} per worker, {_fmt(alone * b.workers)} with {b.workers}"
        lines.append(f"| {what} | {where} | {ms:.2f} | {allows} |")
    return "\n".join(lines)


def sweep_key(row: str, workers: int, base: int) -> str:
    """The runs key of `row` at `workers` loader CPUs: the row itself at --workers."""
    return row if workers == base else f"{row}@{workers}"


def sweep_table(med: dict[str, float], sweep: list[int], base: int, skipped: dict[str, str]) -> str:
    cpus = (f"{n} loader CPU{'s' * (n > 1)}: images/s (per CPU)" for n in sweep)
    lines = ["| stage | loader | " + " | ".join(cpus) + " |",
             "|---|---|" + "---:|" * len(sweep)]
    for row, (stage, loader) in SWEEP_ROWS.items():
        cells = []
        for n in sweep:
            key = sweep_key(row, n, base)
            x = med.get(key)
            cells.append(f"{_fmt(x)} ({_fmt(x / n)})" if x is not None else
                         "skipped" if key in skipped or row in skipped else "n/a")
        lines.append(f"| {stage} | {loader} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GOALS = [  # (check, numerator row, denominator row or None for images/s, goal)
    ("labeling: ours gpu decode / timm inference.py", "gpu_decode", "timm_inference", 1.5),
    ("labeling: ours gpu decode, images/s", "gpu_decode", None, 10_000),
    ("training: teacher / timm train.py", "teacher", "timm_train", 1.15),
    ("training: student / timm train.py", "student", "timm_train", 1.15),
    ("training: teacher / step limit", "teacher", "step", 0.85),
    ("training: student / step limit", "student", "step", 0.85),
    ("labeling: ours DALI, images/s", "dali_label", None, 12_000),
    ("labeling: ours DALI / timm inference.py", "dali_label", "timm_inference", 3.0),
    ("training: teacher DALI / step limit", "dali_teacher", "step", 0.85),
    ("training: student DALI / step limit", "dali_student", "step", 0.85),
    ("training: teacher DALI / timm train.py", "dali_teacher", "timm_train", 1.3),
    ("training: student DALI / timm train.py", "dali_student", "timm_train", 1.3),
]


def goals(med: dict[str, float]) -> list[dict]:
    out = []
    for name, num, den, goal in GOALS:
        value = None
        if num in med and (den is None or den in med):
            value = med[num] / med[den] if den else med[num]
        out.append({"check": name, "ratio": den is not None, "value": value, "goal": goal,
                    "met": None if value is None else value >= goal})
    return out


def goal_lines(checks: list[dict], verdicts: bool) -> list[str]:
    def fmt(x: float, ratio: bool) -> str:
        return f"{x:.2f}x" if ratio else f"{x:,.0f} images/s"

    lines = []
    for c in checks:
        value = "n/a (a row is missing)" if c["value"] is None else fmt(c["value"], c["ratio"])
        verdict = "" if c["met"] is None or not verdicts else ("  met" if c["met"] else "  NOT met")
        lines.append(f"- {c['check']}: {value} (goal >= {fmt(c['goal'], c['ratio'])}){verdict}")
    return lines


def environment(device: torch.device) -> dict:
    import timm

    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    cores = len(os.sched_getaffinity(0))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "timm": timm.__version__,
            "noisystudent": commit, "cpu_cores": cores}


# --- main -------------------------------------------------------------------------------------------------

def _workers_list(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give loader CPU counts such as 4,8,16")
    return values


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--quick", action="store_true", help="smoke sizes: test_efficientnet at 64 px, a few dozen "
                    "images, a few steps")
    ap.add_argument("--images", type=int, help="JPEGs to label (rounded down to a multiple of shards x batch, the "
                    "shards 2 x the largest of --workers and --sweep-workers); full: 16384, quick: 64")
    ap.add_argument("--steps", type=int, help="training steps of the longer run (and timm's epoch), and "
                    "timed iterations of the limits; full: 96, quick: 6")
    ap.add_argument("--batch", type=int, help="images per step, labeling and training; full: 256, quick: 8")
    ap.add_argument("--workers", type=int, help="loader CPUs of every method (torch and timm: worker processes; "
                    "DALI: pipeline threads); full: the CPU cores, quick: 2")
    ap.add_argument("--sweep-workers", type=_workers_list, default=[], metavar="N,N,...",
                    help="also run cpu_decode, dali_label, teacher and dali_teacher at these loader CPU counts "
                    "(e.g. 4,8,16; the one equal to --workers is their row), for images/s per loader CPU")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every method, interleaved; medians compared")
    ap.add_argument("--skip", nargs="+", choices=ROWS, default=[], help="rows to leave out")
    ap.add_argument("--timm-inference", help="path to timm's inference.py (its row is skipped without it)")
    ap.add_argument("--timm-train", help="path to timm's train.py (its row is skipped without it)")
    ap.add_argument("--budget-s", type=float, default=570,
                    help="no repeat, and no run, is started that would end past this many seconds from the start "
                    "(a run's end foreseen from that method's last run, else the mean run so far)")
    ap.add_argument("--workdir", help="keep data and runs here (reused when there), instead of a temporary dir")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--copies-eval", type=int, help="eval images of the copy search's one-off measurement (0: skip "
                    "it; full: 50,000, quick: 500)")
    ap.add_argument("--copies-pool", type=int, help="pool images it matches (full: 200,000, quick: 2,000)")
    args = ap.parse_args()
    quick = args.quick
    args.copies_eval = (500 if quick else 50_000) if args.copies_eval is None else args.copies_eval
    args.copies_pool = (2_000 if quick else 200_000) if args.copies_pool is None else args.copies_pool
    # the methods run in the work dir: a script path given relative to here must still be found there
    args.timm_inference, args.timm_train = (os.path.abspath(p) if p else p for p in (args.timm_inference,
                                                                                     args.timm_train))
    return args


def setup(args) -> Bench:
    p = PRESETS["quick" if args.quick else "full"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --quick for the smoke test")
    workers = args.workers or (2 if args.quick else len(os.sched_getaffinity(0)))
    batch, steps = args.batch or p["batch"], args.steps or p["steps"]
    # labeling: one shard per worker in the shorter run, two in the longer (at most: fewer workers in a sweep)
    shards = 2 * max([workers, *args.sweep_workers])  # a list: max() of one int alone is a TypeError
    images = max(1, (args.images or p["images"]) // (shards * batch)) * shards * batch
    if images < steps * batch // 2:
        sys.exit(f"--images {images} < --steps x --batch / 2: the student's epoch (one pass over the "
                 "pseudo-labeled images) would end inside its run")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, images, p["src"], shards, steps * batch, min(workers, CLASSES))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # for the limits, as timm's scripts set it
    return Bench(device, p["model"], p["img_size"], images, batch, steps, p["warmup"], workers, work, data,
                 GpuMemory(device), args.timm_inference, args.timm_train)


def methods_for(b: Bench) -> dict:
    """Row key -> the method that measures it with b's settings."""
    return {"gpu_decode": lambda: label_ours(b, "torch", "gpu"), "cpu_decode": lambda: label_ours(b, "torch", "cpu"),
            "dali_label": lambda: label_ours(b, "dali"), "timm_inference": lambda: label_timm(b),
            "forward": lambda: forward_limit(b), "gpu_decode_parts": lambda: gpu_decode_parts(b),
            "teacher": lambda: train_ours(b, "teacher", "torch"), "student": lambda: train_ours(b, "student", "torch"),
            "dali_teacher": lambda: train_ours(b, "teacher", "dali"),
            "dali_student": lambda: train_ours(b, "student", "dali"), "timm_train": lambda: train_timm(b),
            "step": lambda: step_limit(b)}


def main():
    from noisystudent.config import dali_available

    args = parse_args()
    t_start = time.time()
    b = setup(args)
    env = environment(b.device)
    settings = {k: getattr(b, k) for k in ("model", "img_size", "images", "batch", "steps", "warmup", "workers")}
    settings["sweep_workers"] = args.sweep_workers
    print(f"{env['device']}, {env['cpu_cores']} CPU cores | torch {env['torch']} (CUDA {env['cuda']}) | "
          f"timm {env['timm']} | noisystudent {env['noisystudent']}")
    print(f"settings: {settings}, repeats {args.repeats}, work dir {b.work}", flush=True)

    setup_teacher(b.work / "label_run", b.model, b.img_size)  # also timm_ckpt.pth for timm's inference.py
    skipped = {k: "--skip" for k in args.skip}
    for key, script in (("timm_inference", b.timm_inference), ("timm_train", b.timm_train)):
        if script is None:
            skipped.setdefault(key, f"no --{key.replace('_', '-')} given")
    if not dali_available():
        for key in DALI_ROWS:
            skipped.setdefault(key, "NVIDIA DALI is not installed (pip install 'noisystudent[dali]')")
    methods = {k: v for k, v in methods_for(b).items() if k not in skipped}
    for n in args.sweep_workers:  # after every row: a budget that runs short cuts the sweep first
        if n != b.workers:
            at_n = methods_for(replace(b, workers=n))
            methods.update({sweep_key(row, n, b.workers): at_n[row] for row in SWEEP_ROWS if row in methods})
    if "student" in methods or "dali_student" in methods:
        prepare_student(b)
    index = None
    if any(k in methods for k in DALI_ROWS):
        index = index_pass(b, [b.work / d for k, d in DALI_ROWS.items() if k in methods])
        print(f"DALI index pass, before the timed runs: {index['images']:,} images in {index['shards']} shards, "
              f"{index['wall_s']:.1f} s with {index['workers']} worker processes "
              f"({_fmt(index['images_per_sec'])} images/s)",
              flush=True)

    copies = None
    if args.copies_eval:
        copies = copy_search(b.device, args.copies_eval, args.copies_pool)
        print(f"copy search on {b.device.type}, before the timed runs: {copies['eval_images']:,} eval images' variants "
              f"in {copies['variants_s']:.1f} s, index built in {copies['build_s']:.1f} s ({copies['index_gib']:.2f} "
              f"GiB), {copies['pool_images']:,} pool images matched in {copies['match_s']:.1f} s = "
              f"{copies['hours_per_1m_pool']:.3f} h per 1M pool images; planted copies found "
              f"{copies['planted_found']}/{copies['planted']}", flush=True)

    runs: dict[str, list[dict]] = {k: [] for k in methods}
    t_loop = time.time()
    for r in range(args.repeats):  # interleaved, so a slow spell of the machine hits every method alike
        stop = None
        for key in list(methods):
            # the first repeat alone may outlast the budget (many rows, a sweep): no run starts that would end past it,
            # foreseen from this method's last run, else its row's at --workers (a sweep's), else the mean run so far
            took = [x["wall_s"] for v in runs.values() for x in v]
            own = runs[key] or runs.get(key.split("@")[0], [])
            expect = own[-1]["wall_s"] if own else statistics.mean(took) if took else 0.0
            if time.time() + expect - t_start > args.budget_s:
                stop = f"in repeat {r + 1}: {key} (about {expect:.0f} s) would end past --budget-s {args.budget_s:.0f}"
                break
            t0 = time.time()
            try:
                runs[key].append({**methods[key](), "wall_s": round(time.time() - t0, 1)})
            except Skip as e:
                skipped[key] = str(e)
                del methods[key], runs[key]
            except RuntimeError as e:  # the other methods' figures are still worth the time spent on them
                print(f"{key} failed: {e}", file=sys.stderr)
                skipped[key] = f"failed ({str(e).splitlines()[0][:100]}...; the whole error is on stderr)"
                del methods[key], runs[key]
        print(f"repeat {r + 1} (images/s, seconds the method took): " + json.dumps(
            {k: [(_fmt(x["images_per_sec"]), x["wall_s"]) for x in v] for k, v in runs.items()}), file=sys.stderr,
            flush=True)
        per_repeat = (time.time() - t_loop) / (r + 1)
        if stop is None and r + 1 < args.repeats and time.time() + per_repeat - t_start > args.budget_s:
            stop = f"after {r + 1} repeat(s): another would end past --budget-s {args.budget_s:.0f}"
        if stop:
            print(f"stopping {stop}", file=sys.stderr)
            break
    for key in [k for k, v in runs.items() if not v]:
        skipped[key] = f"--budget-s {args.budget_s:.0f} was spent before its first run"
        del runs[key]

    figures = {k: [x["images_per_sec"] for x in v if x["images_per_sec"] is not None] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in figures.items() if v}
    checks = goals(med)
    print()
    print(table(runs, med, skipped))
    if runs.get("gpu_decode_parts"):
        print()
        print(parts_table(b, runs["gpu_decode_parts"]))
    if args.sweep_workers:
        print(f"\nLoader CPUs (num_workers: torch worker processes, DALI threads; medians; the main process and "
              f"the GPU's own work are not counted):\n{sweep_table(med, args.sweep_workers, b.workers, skipped)}")
        for key in (k for k in skipped if "@" in k):
            print(f"- {key}: {skipped[key]}")
    if index is not None:
        print(f"\nDALI index pass (made once before the timed runs, outside every figure above): "
              f"{_fmt(index['images_per_sec'])} images/s with {index['workers']} worker processes")
    print()
    on_gpu = b.device.type == "cuda"
    print("Goal checks (medians)" + ("" if on_gpu else ", CPU smoke run: its figures say nothing about the goals"))
    print("\n".join(goal_lines(checks, verdicts=on_gpu)))
    print(f"\n{time.time() - t_start:.0f} s in all")
    if args.out:
        sweep = {row: {n: med.get(sweep_key(row, n, b.workers)) for n in args.sweep_workers} for row in SWEEP_ROWS}
        result = {**env, "settings": {**settings, "repeats_done": len(next(iter(runs.values()), []))},
                  "median_images_per_sec": med, "runs": runs, "skipped": skipped, "goals": checks,
                  "index_pass": index, "copy_search": copies, "sweep_images_per_sec": sweep,
                  "wall_s": time.time() - t_start}
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
