"""Accuracy on Fashion-MNIST: the whole loop over several seeds against a fully supervised reference.
Run by hand (not a test); on 2 CPU cores a full run takes hours (docs/results.md, "Accuracy on Fashion-MNIST").

    apt-get install dataset-fashion-mnist          # 60,000 train + 10,000 test images, 28x28, 10 classes
    python benchmarks/bench_accuracy.py --out /tmp/fmnist                     # 3 seeds, 2 rounds, the defaults
    python benchmarks/bench_accuracy.py --out /tmp/fmnist --seeds 0 -- pseudolabel.hard=true   # any key=value after --
    python benchmarks/bench_accuracy.py --table /tmp/fmnist/results-a.json /tmp/fmnist/results-b.json   # one table

Shards (made once per label budget and split seed, under --out/data-L<labels>-s<split seed>/): a stratified
--labels-per-class labeled images per class from the train set; every other train image unlabeled, keeping
its class in `cls` (never trained on: the pseudo-label audit reads it); the 10,000 test images as data.eval.
Each seed runs `stage=iterate` in its own run_dir (a rerun skips finished steps). The fully supervised
reference trains the same model (stage=teacher) on every train image's label for --supervised-epochs.
Printed: one markdown table (top-1 per round, gap closed, pseudo-label accuracy, wall time) and
--out/results-<name>.json (written after every run). Seeds run by separate calls (--name apiece) make one table
with --table.

--robustness: after each seed's loop, stage=evaluate scores every model of its run on ImageNet-C's 15 corruptions
at severities 1-5 and the brightness and translate sequences (the first --corruption-images test images; the same
pixels for every model and seed), against the seed's teacher: the table gains mCE, relative mCE, ECE and NLL under
corruption and mFR per round, and --out/corruptions-<name>.png plots the error per corruption, teacher against the
last round (mean over seeds)."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from noisystudent.data.writer import encode_png, update_manifest, write_shard
from noisystudent.reporting.robustness import error_plot, mean_error

SRC = "/usr/share/datasets/fashion-mnist"
PER_SHARD = 5000


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format, gzipped): uint8 images [n, 28, 28] or labels [n]."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def make_shards(src: Path, dest: Path, labels_per_class: int, split_seed: int) -> dict:
    """labeled / unlabeled / eval shards under `dest` (skipped when already there); their patterns."""
    def pattern(name, n):
        return f"{dest}/{name}-{{000000..{n - 1:06d}}}.tar"

    done = dest / "_DONE.json"
    if done.exists():
        return json.loads(done.read_text())
    images, labels = read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "train-labels-idx1-ubyte.gz")
    test_images, test_labels = read_idx(src / "t10k-images-idx3-ubyte.gz"), read_idx(src / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(split_seed)
    labeled = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:labels_per_class]
                                      for c in range(10)]))
    unlabeled = rng.permutation(np.setdiff1d(np.arange(len(labels)), labeled))  # shuffled across shards
    dest.mkdir(parents=True, exist_ok=True)
    counts, out = {}, {}
    for name, imgs, labs, idx in (("labeled", images, labels, labeled), ("unlabeled", images, labels, unlabeled),
                                  ("eval", test_images, test_labels, np.arange(len(test_labels)))):
        chunks = np.array_split(idx, max(1, -(-len(idx) // PER_SHARD)))
        for s, chunk in enumerate(chunks):
            samples = ({"__key__": f"{name}{i:05d}", "png": encode_png(Image.fromarray(imgs[i], "L")),
                        "cls": str(int(labs[i])).encode()} for i in chunk)
            counts[f"{name}-{s:06d}.tar"] = write_shard(dest / f"{name}-{s:06d}.tar", samples)
        out[name] = pattern(name, len(chunks))
    update_manifest(dest, counts, source=str(src), labels_per_class=labels_per_class, split_seed=split_seed)
    done.write_text(json.dumps(out))
    return out


def run(args: list[str], log: Path) -> None:
    """python -m noisystudent ARGS, its output to `log`. A failure stops the benchmark."""
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "noisystudent", *args], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): python -m noisystudent {' '.join(args)}; see {log}")


def summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=SRC, help="folder of the four idx .gz files (default: the Debian package's)")
    p.add_argument("--out", type=Path, help="where the shards, run directories and results go (required to run)")
    p.add_argument("--table", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="run nothing: print one table from results files of the same configuration, e.g. seeds run "
                        "by separate calls, and a results file holding only the fully supervised reference")
    p.add_argument("--labels-per-class", type=int, default=100)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--student-epochs", type=float, default=5)
    p.add_argument("--supervised-epochs", type=float, default=10)
    p.add_argument("--supervised-seeds", type=int, nargs="*", default=[0],
                   help="seeds of the fully supervised reference (none: leave it out)")
    p.add_argument("--supervised-model", default=None,
                   help="timm model of the fully supervised reference (default: the teacher's, model=demo); e.g. "
                        "the student's of a model ladder (recipe=small: test_resnet), for the gap to the larger model")
    p.add_argument("--reuse", help="a finished run to copy --reuse-steps from, {seed} for the seed (e.g. "
                   "OUT/L100-defaults-r2-e5-seed{seed}): an ablation of the student alone skips the teacher and the "
                   "labels it shares with that run. A copied step whose settings the overrides change stops the "
                   "benchmark (its result would not be this configuration's)")
    p.add_argument("--reuse-steps", nargs="+", default=["teacher", "round_1/pseudolabel"])
    p.add_argument("--name", default="", help="a label for this configuration in results.json")
    p.add_argument("--robustness", action="store_true",
                   help="also evaluate every model of each seed under corruption and perturbation (stage=evaluate)")
    p.add_argument("--corruption-images", type=int, default=2000,
                   help="with --robustness: the first N test images are corrupted (eval.corruption_images)")
    p.add_argument("overrides", nargs="*", help="key=value for every stage=iterate run (after --)")
    a = p.parse_args()
    if a.table:
        merged = {**merge_results(a.table), **({"name": a.name} if a.name else {})}
        if a.out:
            robustness_plot(a.out / f"corruptions-{merged['name']}.png", merged)
        print(table(merged))
        return
    if a.out is None:
        p.error("--out is required to run (only --table runs without it)")

    data = make_shards(Path(a.src), a.out / f"data-L{a.labels_per_class}-s{a.split_seed}", a.labels_per_class,
                       a.split_seed)
    common = ["data=shards", "data.num_classes=10", f"data.labeled='{data['labeled']}'",
              f"data.unlabeled='{data['unlabeled']}'", f"data.eval='{data['eval']}'", "model=demo"]
    # the overrides name the run directories: only characters a path and Hydra's override grammar both take
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(a.overrides)) or "defaults"
    results = {"name": a.name or tag, "labels_per_class": a.labels_per_class, "rounds": a.rounds,
               "student_epochs": a.student_epochs, "overrides": a.overrides, "reused": a.reuse and a.reuse_steps,
               "seeds": {}, "supervised": {}}
    for seed in a.seeds:
        run_dir = a.out / f"L{a.labels_per_class}-{tag}-r{a.rounds}-e{a.student_epochs:g}-seed{seed}"
        if a.reuse:
            for step in a.reuse_steps:
                src, dest = Path(a.reuse.format(seed=seed)) / step, run_dir / step
                if not dest.exists():
                    shutil.copytree(src, dest)
        log_start = (a.out / "bench.log").stat().st_size if (a.out / "bench.log").exists() else 0
        run(["stage=iterate", f"run_dir={run_dir}", *common, f"seed={seed}", f"iterate.rounds={a.rounds}",
             f"student.epochs={a.student_epochs}", *a.overrides], a.out / "bench.log")
        with open(a.out / "bench.log", errors="replace") as f:
            f.seek(log_start)
            stale = [line.strip() for line in f if "is finished but its settings changed" in line]
        if stale:  # a reused step the overrides would have run differently
            raise SystemExit(f"--reuse: {run_dir} kept a copied step that these overrides change:\n" + "\n".join(stale))
        top1 = [summary(run_dir / "teacher")["top1"]]
        # the steps' own wall times (a rerun that skipped finished steps still reports the whole loop's)
        wall = summary(run_dir / "teacher")["wall_s"]
        audit = []
        for k in range(1, a.rounds + 1):
            student, pl = summary(run_dir / f"round_{k}/student"), summary(run_dir / f"round_{k}/pseudolabel")
            top1.append(student["top1"])
            wall += student["wall_s"] + pl["wall_s"]
            pl = pl.get("audit") or {}
            audit.append((pl.get("unlabeled") or {}).get("kept_by_threshold", {}).get("accuracy"))
        results["seeds"][seed] = {"top1": top1, "pseudo_label_accuracy_kept": audit, "wall_s": wall,
                                  "run_dir": str(run_dir)}
        if a.robustness:
            results["seeds"][seed]["robustness"] = robustness(run_dir, common, seed, a, a.out / "bench.log")
        save(a.out, results)  # after every seed: a long benchmark stopped midway keeps what it measured
    for seed in a.supervised_seeds:
        model = [f"model.name={a.supervised_model}"] if a.supervised_model else []
        run_dir = a.out / "-".join(["supervised", f"L{a.labels_per_class}", *([a.supervised_model] if model else []),
                                    f"e{a.supervised_epochs:g}", f"seed{seed}"])
        run(["stage=teacher", f"run_dir={run_dir}", *common, *model, f"seed={seed}",
             f"data.labeled=['{data['labeled']}','{data['unlabeled']}']", f"train.epochs={a.supervised_epochs}"],
            a.out / "bench.log")
        done = summary(run_dir / "teacher")
        results["supervised"][seed] = {"top1": done["top1"], "wall_s": done["wall_s"], "model": done["model"]["name"]}
        save(a.out, results)
    save(a.out, results)
    robustness_plot(a.out / f"corruptions-{results['name']}.png", results)
    print(table(results))


ROBUSTNESS = ("eval.corruptions=all", "eval.severities=[1,2,3,4,5]", "eval.perturbations=[brightness,translate]")


def robustness(run_dir: Path, common: list[str], seed: int, a, log: Path) -> dict:
    """stage=evaluate under corruption on the run's models (one pass for all of them); per model (teacher first):
    clean top-1 on the corrupted images, mCE, relative mCE, mFR, NLL / ECE under corruption, error per
    corruption, and the workers' cost per view."""
    t0 = time.time()
    run(["stage=evaluate", f"run_dir={run_dir}", *common, f"seed={seed}", *ROBUSTNESS,
         f"eval.corruption_images={a.corruption_images}", *a.overrides], log)
    rows = json.loads((run_dir / "report.json").read_text())["rounds"]
    out = {"wall_s": time.time() - t0, "images": rows[0]["robustness"]["images"], "models": []}
    for r in rows:
        res, s = r["robustness"], r["robustness_summary"]
        out["models"].append({"role": r["role"], "round": r["round"], "clean_top1": res["clean"]["top1"],
                              **{k: s[k] for k in ("mce", "relative_mce", "mfr", "top1", "nll", "ece")},
                              "error": mean_error(res), "images_per_worker_s": res["images_per_worker_s"]})
    return out


def save(out: Path, results: dict) -> None:
    path = out / f"results-{results['name']}.json"
    path.write_text(json.dumps(results, indent=1))


def merge_results(paths: list[Path]) -> dict:
    """One results dict from several results files. The files with seeds must share a configuration (label budget,
    rounds, student epochs, overrides); the supervised references must share the label budget and model."""
    runs = [(path, json.loads(path.read_text())) for path in paths]
    with_seeds = [(path, r) for path, r in runs if r["seeds"]]
    if not with_seeds:
        raise SystemExit("--table: none of these results files has a seed; name at least one run's results")
    first_path, merged = with_seeds[0]
    merged = {**merged, "seeds": {}, "supervised": {}}
    config = ("labels_per_class", "rounds", "student_epochs", "overrides")
    sup_model = None
    for path, r in runs:
        if r["seeds"]:
            differ = [k for k in config if r[k] != merged[k]]
            if differ:
                raise SystemExit(f"--table: {path} differs from {first_path} in {', '.join(differ)}: "
                                 "a table is for one configuration")
            merged["seeds"].update(r["seeds"])
        if r["supervised"]:
            if r["labels_per_class"] != merged["labels_per_class"]:
                raise SystemExit(f"--table: {path}'s supervised reference is for {r['labels_per_class']} labels per "
                                 f"class, the runs for {merged['labels_per_class']}")
            for seed, v in r["supervised"].items():
                model = v.get("model", "the teacher's model")  # files from before the model was recorded
                if sup_model not in (None, model):
                    raise SystemExit(f"--table: supervised references of two models ({sup_model}, {model}); "
                                     "name the results files of one")
                sup_model = model
                merged["supervised"][seed] = v
    merged["seeds"] = dict(sorted(merged["seeds"].items(), key=lambda kv: int(kv[0])))
    return merged


def table(results: dict) -> str:
    seeds = results["seeds"]
    sup = [100 * v["top1"] for v in results["supervised"].values()]
    ref = statistics.mean(sup) if sup else None
    lines = [f"{results['name']}: {results['labels_per_class']} labels per class, student.epochs="
             f"{results['student_epochs']}, seeds {', '.join(map(str, seeds)) or 'none'}", "",
             "| " + " | ".join(["model", *(f"seed {s}" for s in seeds), "mean ± std", "gap closed"]) + " |",
             "|---|" + "---|" * len(seeds) + "---|---|"]
    teacher = [100 * v["top1"][0] for v in seeds.values()]
    # a call with no seeds (only the supervised reference) has no teacher or rounds to show
    for k in range(results["rounds"] + 1 if seeds else 0):
        vals = [100 * v["top1"][k] for v in seeds.values()]
        closed = ""
        if ref is not None and k:
            gaps = [(v - t) / (ref - t) for v, t in zip(vals, teacher, strict=True) if ref != t]
            closed = f"{100 * statistics.mean(gaps):.0f}%" if gaps else ""
        lines.append(f"| {'teacher' if k == 0 else f'round {k} student'} | "
                     + " | ".join(f"{v:.2f}" for v in vals) + f" | {mean_std(vals)} | {closed} |")
    if sup:
        model = next(iter(results["supervised"].values())).get("model", "the teacher's model")
        lines.append(f"| fully supervised ({model}, seeds {', '.join(map(str, results['supervised']))}) | "
                     + " | " * len(seeds) + f"{mean_std(sup)} | |")
    for k in range(results["rounds"] if seeds else 0):
        acc = [v["pseudo_label_accuracy_kept"][k] for v in seeds.values()]
        lines.append(f"| round {k + 1} pseudo-labels kept, right | "
                     + " | ".join("-" if x is None else f"{100 * x:.1f}" for x in acc) + " | | |")
    if seeds:
        lines.append("| wall (min) | " + " | ".join(f"{v['wall_s'] / 60:.0f}" for v in seeds.values()) + " | | |")
    if seeds and all("robustness" in v for v in seeds.values()):
        lines += ["", robustness_table(results)]
    return "\n".join(lines)


ROBUST_ROWS = (("clean top-1 (%)", "clean_top1", 100), ("corrupted top-1 (%)", "top1", 100), ("mCE", "mce", 1),
               ("relative mCE", "relative_mce", 1), ("ECE under corruption (%)", "ece", 100),
               ("NLL under corruption", "nll", 1), ("mFR", "mfr", 1))


def robustness_table(results: dict) -> str:
    """Per round (mean ± std over seeds): the robustness figures, against each seed's teacher."""
    seeds = list(results["seeds"].values())
    n = seeds[0]["robustness"]["images"]
    lines = [f"Robustness: the first {n:,} test images, ImageNet-C's 15 corruptions x 5 severities, brightness and "
             "translate sequences; mCE, relative mCE and mFR against each seed's teacher (100).", "",
             "| model | " + " | ".join(label for label, _, _ in ROBUST_ROWS) + " |",
             "|---|" + "---|" * len(ROBUST_ROWS)]
    for k in range(results["rounds"] + 1):
        cells = []
        for _, key, scale in ROBUST_ROWS:
            vals = [scale * m[key] for m in (round_model(v, k) for v in seeds) if m[key] is not None]
            cells.append(mean_std(vals))
        lines.append(f"| {'teacher' if k == 0 else f'round {k} student'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def round_model(seed_result: dict, k: int) -> dict:
    """A seed's robustness figures of round k's student (k = 0: the teacher), as the table's top-1 rows (a round's
    fine-tune, with iterate.finetune, is a row of its own in the run's report, not here)."""
    role = "teacher" if k == 0 else "student"
    return next(m for m in seed_result["robustness"]["models"] if m["round"] == k and m["role"] == role)


def robustness_plot(path: Path, results: dict) -> None:
    """Error per corruption, mean over seeds: the teacher against the last round's student."""
    seeds = [v for v in results["seeds"].values() if "robustness" in v]
    if not seeds:
        return
    series = []
    for k, label in ((0, "teacher"), (results["rounds"], f"round {results['rounds']} student")):
        names = round_model(seeds[0], k)["error"]
        series.append((label, {c: statistics.mean(round_model(v, k)["error"][c] for v in seeds) for c in names}))
    error_plot(path, series, f"Fashion-MNIST, {len(seeds)} seed(s): top-1 error per corruption (mean of severities)")


if __name__ == "__main__":
    main()
