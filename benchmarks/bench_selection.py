"""The main process's work after labeling, per million pool images: the pool estimate, the selection with and
without the levers for real pools, and the contact sheets' pass; and its memory as the pool grows (flat: nothing is
held per image). Run by hand (not a test); label files are made up (a 1,000-class teacher's top-5, as ImageNet's).

    python benchmarks/bench_selection.py                         # 1M images in 100 label files, 1,000 classes
    python benchmarks/bench_selection.py --images 4000000 --files 400 --memory   # and peak RSS at 1x and 4x

Printed: seconds per step and per million images, and with --memory each size's peak RSS (a fresh process each)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from noisystudent.data.labels import LabelFiles, write_label_file
from noisystudent.pseudolabels.choose import Policy, choose
from noisystudent.pseudolabels.pool import PoolSettings
from noisystudent.pseudolabels.selection import SelectionSettings, class_statistics, select
from noisystudent.pseudolabels.sheets import collect


def make_files(folder: Path, images: int, files: int, classes: int, seed: int = 0, prefix: str = "s",
               ratio: float = 50.0) -> list[Path]:
    """Label files of a made-up teacher: a pool long-tailed by `ratio`, top-5 probabilities, scores and classes."""
    rng = np.random.default_rng(seed)
    prior = ratio ** (-np.arange(classes) / (classes - 1))
    prior /= prior.sum()
    out = []
    for f, n in enumerate(np.full(files, images // files)):
        y = rng.choice(classes, n, p=prior)
        ids = np.empty((n, 5), np.int32)
        ids[:, 0] = np.where(rng.random(n) < 0.7, y, rng.integers(0, classes, n))
        ids[:, 1:] = rng.integers(0, classes, (n, 4))
        probs = np.sort(rng.dirichlet(np.full(6, 0.5), n)[:, :5], axis=1)[:, ::-1].astype(np.float32)
        lse = rng.normal(8, 2, n).astype(np.float32)
        path = folder / f"{prefix}{f:05d}.labels.safetensors"
        write_label_file(path, f"{prefix}{f:05d}.tar", [f"{prefix}{f}-{i}" for i in range(n)], ids, probs, probs[:, 0],
                         ids[:, 0], [], {"num_classes": classes, "topk": 5, "temperature": 1.0, "hard": False},
                         {"cls": y.astype(np.int32), "logit_lse": lse, "max_logit": lse - 1})
        out.append(path)
    return out


def memory() -> dict:
    """This process's resident memory now (anonymous: what it allocated; file: mapped files and libraries) and its
    peak, in MiB (Linux)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile", "VmHWM")}


def measure(folder: Path, reference_folder: Path, classes: int) -> dict:
    files = LabelFiles(sorted(folder.glob("*.safetensors")))  # as the pseudolabel step reads them
    ref = LabelFiles(sorted(reference_folder.glob("*.safetensors")))
    n = sum(int(f.meta["images"]) for f in files)
    out = {"images": n, "memory_before": memory()}
    t = time.perf_counter()
    sel = select(files, classes, SelectionSettings(0.3), stats=class_statistics(files, classes, 0.3))
    out["paper_selection_s"] = time.perf_counter() - t
    t = time.perf_counter()
    levers = Policy(SelectionSettings(0.3, max_repeat=8), PoolSettings(), prior_correction=True, ood_filter=True)
    sel, pool, _ = choose(files, ref, classes, levers)
    out["estimate_and_levers_s"] = time.perf_counter() - t
    t = time.perf_counter()
    collect(files, sel, classes, 8)
    out["sheets_pass_s"] = time.perf_counter() - t
    out["memory_after"] = memory()
    for k in ("paper_selection_s", "estimate_and_levers_s", "sheets_pass_s"):
        out[k[:-2] + "_s_per_million"] = out[k] / (n / 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--memory", action="store_true", help="also measure the pool at a quarter of --images, each size "
                                                          "in a fresh process, for its peak RSS")
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # (folder, reference folder): one measurement
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(Path(a.measure[0]), Path(a.measure[1]), a.classes)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "val"
        ref.mkdir()
        make_files(ref, 50 * a.classes, 5, a.classes, seed=1, prefix="v", ratio=1.0)  # a balanced held-out set
        sizes = [(a.images // 4, max(1, a.files // 4)), (a.images, a.files)] if a.memory else [(a.images, a.files)]
        for images, files in sizes:
            folder = Path(tmp) / f"pool{images}"
            folder.mkdir()
            make_files(folder, images, files, a.classes)
            proc = subprocess.run([sys.executable, __file__, "--classes", str(a.classes), "--measure", str(folder),
                                   str(ref)], capture_output=True, text=True, check=True)
            print(proc.stdout.strip())


if __name__ == "__main__":
    main()
