"""Training throughput (images/s): our teacher and student stages vs a plain PyTorch loop vs the limit.

Run by hand (not a test). Same model (timm test_resnet at 160 px), batch, RandAugment, optimizer
(AdamW) and EMA everywhere:
  limit          forward + backward + optimizer step + EMA update on ready tensors (no data at all),
                 AdamW as timm makes it (torch's per-parameter loop on a CPU), default allocator;
                 limit_our_settings: the same with what our stages use on a CPU: torch's fused AdamW
                 (optim=adamw) and freed memory kept for reuse (keep_freed_memory, host_memory.py)
  reference      torch DataLoader over the JPEG files (PIL + timm's RandAugment transform) + the same step
  timm           timm's own train.py --channels-last (when --timm-train is given)
  ours_teacher   stage=teacher on the same images as shards
  ours_student   stage=student: half labeled + half pseudo-labeled per batch (unlabel_ratio=1), same total

    python benchmarks/bench_train.py --timm-train /path/to/timm/train.py [--repeats 3] [key=value ...]

Our stages run through the command line (`python -m noisystudent ...`, a fresh process each), as a
user runs them. On a shared 2-core machine single runs move by 10-15%, so every method is measured
--repeats times, interleaved, and the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_pseudolabel import make_jpegs  # noqa: E402

MODEL, IMG, AUG = "test_resnet", 160, "rand-n2-m9-mmax27"


def _step_fns(model, fused=False):
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    opt = create_optimizer_v2(model, opt="adamw", lr=0.002, weight_decay=0.05, **({"fused": True} if fused else {}))
    ema = ModelEmaV3(model, decay=0.9999, use_warmup=True)
    state = {"step": 0}

    def step(x, y):
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        ema.update(model, step=state["step"])

    return step


def bench_limit(batch, steps, channels_last=True, fused=False) -> float:
    import timm

    model = timm.create_model(MODEL, num_classes=10).train()
    x, y = torch.randn(batch, 3, IMG, IMG), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    step = _step_fns(model, fused)
    step(x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return steps * batch / (time.perf_counter() - t0)


def limit_in_subprocess(batch, steps, *flags) -> float:
    """bench_limit in a fresh process: allocator settings are per process and cannot be undone."""
    out = subprocess.run([sys.executable, __file__, "--limit-only", str(batch), str(steps), *flags],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_reference(files, labels, batch, workers) -> float:
    import timm
    from timm.data import create_transform

    model = timm.create_model(MODEL, num_classes=10).train()
    tf = create_transform(IMG, is_training=True, auto_augment=AUG, color_jitter=0.0, interpolation="bicubic")
    loader = torch.utils.data.DataLoader(_Labeled(files, labels, tf), batch_size=batch, num_workers=workers,
                                         shuffle=True, drop_last=True)
    step = _step_fns(model)
    n, t0 = 0, None
    for x, y in loader:
        if t0 is None:
            t0 = time.perf_counter()  # like ours: from the first batch (worker start-up excluded)
        step(x, y)
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


class _Labeled(torch.utils.data.Dataset):
    def __init__(self, files, labels, tf):
        self.files, self.labels, self.tf = files, labels, tf

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.tf(img.convert("RGB")), self.labels[i]


def bench_timm(script, data_dir, batch, workers, out_dir) -> float:
    cmd = [sys.executable, script, "--data-dir", str(data_dir), "--model", MODEL, "--num-classes", "10",
           "--img-size", str(IMG), "-b", str(batch), "-j", str(workers), "--epochs", "1", "--opt", "adamw",
           "--lr", "0.002", "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "0",
           "--smoothing", "0.1", "--aa", AUG, "--color-jitter", "0", "--channels-last", "--device", "cpu",
           "--no-prefetcher", "--log-interval", "1", "--model-ema", "--output", str(out_dir),
           "--checkpoint-hist", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    times = [float(t) for t in re.findall(r"Time: (\d+\.\d+)s,", out.stdout + out.stderr)]
    if len(times) < 3:
        raise RuntimeError(out.stderr[-3000:])
    times = times[1:]  # the first update includes worker start-up
    return batch * len(times) / sum(times)


def run_stage(work: Path, *overrides) -> dict:
    """One stage through the command line, as a user runs it (a fresh process); its summary.json."""
    cmd = [sys.executable, "-m", "noisystudent", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    stage = next(o.split("=", 1)[1] for o in overrides if o.startswith("stage="))
    steps = {"teacher": "teacher", "pseudolabel": "round_1/pseudolabel", "student": "round_1/student"}
    step = work / "run" / steps[stage]
    return json.loads((step / "summary.json").read_text())


def _median(xs):
    return statistics.median(xs) if xs else None


def main():
    if sys.argv[1:2] == ["--limit-only"]:  # the child of limit_in_subprocess
        if "--keep-freed-memory" in sys.argv:
            from noisystudent.training.host_memory import keep_freed_memory

            keep_freed_memory()
        print(bench_limit(int(sys.argv[2]), int(sys.argv[3]), fused="--fused" in sys.argv))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2560)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--student-steps", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3,
                    help="measure every method this many times, interleaved; medians are compared")
    ap.add_argument("--timm-train", help="path to timm's train.py, to measure it side by side")
    ap.add_argument("--workdir")
    ap.add_argument("--only-ours", action="store_true", help="skip the limit, reference and timm runs")
    ap.add_argument("overrides", nargs="*", help="extra key=value for our stages (e.g. worker_nice=0)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_"))
    n = args.images - args.images % args.batch
    train_dir = work / "imgs" / "train"
    if not train_dir.exists():
        for c in range(10):
            make_jpegs(train_dir / f"c{c}", n // 10, (200, 200), seed=c)
            make_jpegs(work / "imgs" / "validation" / f"c{c}", 8, (200, 200), seed=100 + c)
    files = sorted(train_dir.rglob("*.jpg"))
    labels = [int(p.parent.name[1:]) for p in files]
    from noisystudent.data.importer import import_images

    shards, val = work / "shards", work / "val"
    if not shards.exists():
        import_images(train_dir, shards, "labeled", samples_per_shard=max(1, n // 8))
        import_images(work / "imgs" / "validation", val, "labeled", samples_per_shard=80)
        import_images(train_dir, work / "unl", "unlabeled", samples_per_shard=max(1, n // 8))
    pattern = json.loads((shards / "manifest.json").read_text())["pattern"]
    val_pattern = json.loads((val / "manifest.json").read_text())["pattern"]
    unl_pattern = json.loads((work / "unl" / "manifest.json").read_text())["pattern"]
    steps = n // args.batch
    res = {"model": MODEL, "img_size": IMG, "randaugment": AUG, "images": n, "batch": args.batch,
           "workers": args.workers, "torch_threads": torch.get_num_threads(), "teacher_steps": steps,
           "student_steps": args.student_steps, "overrides": args.overrides}
    common = ["data=shards", f"run_dir={work / 'run'}", f"data.labeled='{pattern}'", f"data.eval='{val_pattern}'",
              f"data.unlabeled='{unl_pattern}'", "data.num_classes=10", f"model.name={MODEL}",
              f"model.img_size={IMG}", f"model.test_img_size={IMG}", "model.drop_rate=0", "model.drop_path_rate=0",
              "data.crop_scale=[0.08,1.0]", "data.hflip=0.5", f"num_workers={args.workers}", "channels_last=true",
              "force=true", "train.log_every_steps=1000", "train.ckpt_every_steps=100000", *args.overrides]
    teacher = ["stage=teacher", *common, "train.epochs=1", f"train.batch_size={args.batch}", f"train.randaugment={AUG}"]
    student = ["stage=student", *common, f"train.batch_size={args.batch // 2}", "student.unlabel_ratio=1",
               f"student.randaugment={AUG}", "student.drop_rate=0", "student.drop_path_rate=0",
               f"max_steps={args.student_steps}", "student.epochs=100"]
    runs: dict[str, list[float]] = {}
    for r in range(args.repeats):  # interleaved, so a slow spell of the machine hits every method alike
        if not args.only_ours:
            runs.setdefault("limit", []).append(limit_in_subprocess(args.batch, max(10, steps // 2)))
            runs.setdefault("limit_our_settings", []).append(
                limit_in_subprocess(args.batch, max(10, steps // 2), "--fused", "--keep-freed-memory"))
            runs.setdefault("reference", []).append(bench_reference(files, labels, args.batch, args.workers))
            if args.timm_train:
                runs.setdefault("timm", []).append(
                    bench_timm(args.timm_train, work / "imgs", args.batch, args.workers, work / "timm_out"))
        runs.setdefault("ours_teacher", []).append(run_stage(work, *teacher)["images_per_sec"])
        if r == 0:  # a 1-epoch teacher on noise is unsure: a low threshold keeps images to train on
            run_stage(work, "stage=pseudolabel", *common, "pseudolabel.threshold=0.01")
        runs.setdefault("ours_student", []).append(run_stage(work, *student)["images_per_sec"])
        print(json.dumps({k: [round(x, 1) for x in v] for k, v in runs.items()}), file=sys.stderr, flush=True)
    res["runs"] = {k: [round(x, 1) for x in v] for k, v in runs.items()}
    med = {k: _median(v) for k, v in runs.items()}
    res["median"] = {k: round(v, 1) for k, v in med.items()}
    for k in ("reference", "timm", "ours_teacher", "ours_student"):
        for lim in ("limit", "limit_our_settings"):
            if k in med and lim in med:
                res[f"{k}_vs_{lim}"] = round(med[k] / med[lim], 3)
    if "timm" in med:
        res["ours_student_vs_timm"] = round(med["ours_student"] / med["timm"], 3)
        res["ours_teacher_vs_timm"] = round(med["ours_teacher"] / med["timm"], 3)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
