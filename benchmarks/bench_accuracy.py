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

sys.path.insert(0, str(Path(__file__).parent))
import protocols  # noqa: E402 - benchmarks/protocols.py, beside this file

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


def write_sets(dest: Path, sets: dict[str, tuple], images: dict[str, np.ndarray], **info) -> dict:
    """Shards of each named set (name -> (source, indices, cls per sample)) under `dest`, once (a _DONE.json says
    they are whole); their brace patterns."""
    done = dest / "_DONE.json"
    if done.exists():
        return json.loads(done.read_text())
    dest.mkdir(parents=True, exist_ok=True)
    counts, out = {}, {}
    for name, (source, idx, cls) in sets.items():
        chunks = np.array_split(np.arange(len(idx)), max(1, -(-len(idx) // PER_SHARD)))
        for s, chunk in enumerate(chunks):
            samples = ({"__key__": f"{name}{source}{idx[j]:05d}", "cls": str(int(cls[j])).encode(),
                        "png": encode_png(Image.fromarray(images[source][idx[j]], "L"))} for j in chunk)
            counts[f"{name}-{s:06d}.tar"] = write_shard(dest / f"{name}-{s:06d}.tar", samples)
        out[name] = f"{dest}/{name}-{{000000..{len(chunks) - 1:06d}}}.tar"
    update_manifest(dest, counts, **info)
    done.write_text(json.dumps(out))
    return out


def protocol_shards(src: Path, out: Path, a, rho: float | None, ratio: float | None) -> dict:
    """The shards of one pool of --protocol: the labeled, validation, eval and fully supervised sets once per
    protocol and split (every pool shares them, and so its teacher), the pool in a folder of its own."""
    train = read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "train-labels-idx1-ubyte.gz")
    test = read_idx(src / "t10k-images-idx3-ubyte.gz"), read_idx(src / "t10k-labels-idx1-ubyte.gz")
    p = protocols.build(train[1], test[1], a.protocol, rho=rho, ratio=ratio, pool_size=a.pool_size,
                        labels_per_class=a.labels_per_class, val_per_class=a.val_per_class, split_seed=a.split_seed)
    images = {"train": train[0], "test": test[0]}
    known = "-K" + "".join(map(str, p["classes"])) if a.protocol == "open-set" else ""
    base = out / f"data-{a.protocol}{known}-L{a.labels_per_class}-V{a.val_per_class}-s{a.split_seed}"
    info = {"source": str(src), "protocol": a.protocol, "classes": p["classes"], "split_seed": a.split_seed}
    data = write_sets(base, {name: ("test" if name == "eval" else "train", p[name], p[f"{name}_cls"])
                             for name in ("labeled", "val", "eval", "full")}, images, **info)
    # the class names beside the labeled shards, as stage=import writes them: the report and its sheets show them
    (base / "classes.json").write_text(json.dumps([protocols.NAMES[c] for c in p["classes"]]))
    tag = protocols.pool_tag(a.protocol, rho, ratio, a.pool_size)
    pool = write_sets(base / f"pool-{tag}", {"unlabeled": ("train", p["pool"], p["pool_cls"])}, images,
                      pool_counts=p["pool_counts"], **info)
    return {**data, **pool, "num_classes": p["num_classes"], "tag": tag, "pool_counts": p["pool_counts"],
            "classes": p["classes"]}


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
    p.add_argument("--pool-table", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="run nothing: print one table per configuration from results files of --protocol runs (the "
                        "pools of one configuration side by side; seeds run by separate calls are merged)")
    p.add_argument("--plot", type=Path, help="with --pool-table: also plot each configuration's gains per pool")
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
    p.add_argument("--reuse-new-keys", nargs="*", default=[],
                   help="config keys a copied step may lack (made before they existed: 'KEY (None -> value)'), e.g. "
                        "pseudolabel.eval_copies.exclude pseudolabel.eval_copies.max_rms data.eval for labels made "
                        "before the copy check: such a step does not stop the benchmark. Any other change still does")
    p.add_argument("--name", default="", help="a label for this configuration in results.json")
    p.add_argument("--robustness", action="store_true",
                   help="also evaluate every model of each seed under corruption and perturbation (stage=evaluate)")
    p.add_argument("--corruption-images", type=int, default=2000,
                   help="with --robustness: the first N test images are corrupted (eval.corruption_images)")
    p.add_argument("--protocol", choices=("clean", *protocols.PROTOCOLS), default="clean",
                   help="clean: the pool is every other train image (the tables above); open-set / long-tail: a pool "
                        "unlike the labeled set (benchmarks/protocols.py), one run per --rho / --ratio and seed")
    p.add_argument("--rho", type=float, nargs="+", default=list(protocols.RHOS),
                   help="open-set: the pools' shares of unseen-class images (the first is the reference pool)")
    p.add_argument("--ratio", type=float, nargs="+", default=list(protocols.RATIOS),
                   help="long-tail: the pools' imbalance ratios (1 = balanced; the first is the reference pool)")
    p.add_argument("--pool-size", type=int, default=12000, help="open-set / long-tail: images in every pool")
    p.add_argument("--val-per-class", type=int, default=200,
                   help="open-set / long-tail: held-out train images per class (data.val and eval.sets.val: what "
                        "choices are made on; the test images are only reported)")
    p.add_argument("overrides", nargs="*", help="key=value for every stage=iterate run (after --)")
    a = p.parse_args()
    if a.table:
        merged = {**merge_results(a.table), **({"name": a.name} if a.name else {})}
        if a.out:
            robustness_plot(a.out / f"corruptions-{merged['name']}.png", merged)
        print(table(merged))
        return
    if a.pool_table:
        configs = pool_results(a.pool_table)
        print("\n\n".join(pool_table(pools) for pools in configs.values()))
        if a.plot:
            pool_plot(a.plot, configs)
        return
    if a.out is None:
        p.error("--out is required to run (only --table and --pool-table run without it)")
    if a.protocol != "clean":
        run_protocol(a)
        return

    data = make_shards(Path(a.src), a.out / f"data-L{a.labels_per_class}-s{a.split_seed}", a.labels_per_class,
                       a.split_seed)
    common = ["data=shards", "data.num_classes=10", f"data.labeled='{data['labeled']}'",
              f"data.unlabeled='{data['unlabeled']}'", f"data.eval='{data['eval']}'", "model=demo"]
    # the overrides name the run directories: only characters a path and Hydra's override grammar both take
    tag = override_tag(a.overrides)
    results = {"name": a.name or tag, "labels_per_class": a.labels_per_class, "rounds": a.rounds,
               "student_epochs": a.student_epochs, "overrides": a.overrides, "reused": a.reuse and a.reuse_steps,
               "seeds": {}, "supervised": {}}
    for seed in a.seeds:
        run_dir = a.out / f"L{a.labels_per_class}-{tag}-r{a.rounds}-e{a.student_epochs:g}-seed{seed}"
        reuse_steps(a, run_dir, seed)
        run_loop(a, run_dir, common, seed, results)
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


def override_tag(overrides: list[str]) -> str:
    """The overrides as part of a run directory's name: only characters a path and Hydra's grammar both take."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(overrides)) or "defaults"


def run_protocol(a) -> None:
    """--protocol open-set / long-tail: for each seed, one stage=iterate per pool (--rho or --ratio); every pool of a
    seed shares the first pool's teacher (the same labeled set, copied, so trained once). Each pool's results go to
    --out/results-<name>-<pool>.json (the --table format, with validation top-1 and each round's pool figures);
    --pool-table prints them side by side."""
    values = a.rho if a.protocol == "open-set" else a.ratio
    for v in values:  # every bad value before anything runs
        protocols.check_protocol(a.protocol, v if a.protocol == "open-set" else None,
                                 v if a.protocol == "long-tail" else None)
    tag = override_tag(a.overrides)
    pools = []
    for v in values:
        rho, ratio = (v, None) if a.protocol == "open-set" else (None, v)
        pools.append(protocol_shards(Path(a.src), a.out, a, rho, ratio))
    every = {}
    for pool in pools:
        name = f"{a.name or tag}-{pool['tag']}"
        every[pool["tag"]] = {"name": name, "protocol": a.protocol, "pool": pool["tag"],
                              "pool_counts": pool["pool_counts"], "classes": pool["classes"],
                              "labels_per_class": a.labels_per_class, "rounds": a.rounds,
                              "student_epochs": a.student_epochs, "overrides": a.overrides,
                              "reused": a.reuse and a.reuse_steps, "seeds": {}, "supervised": {}}
        earlier = a.out / f"results-{name}.json"  # seeds run by an earlier call of the same configuration stay
        if earlier.exists():
            old = json.loads(earlier.read_text())
            if all(old.get(k) == every[pool["tag"]][k] for k in ("rounds", "student_epochs", "overrides")):
                every[pool["tag"]]["seeds"].update({int(k): v for k, v in old["seeds"].items()})
                every[pool["tag"]]["supervised"].update({int(k): v for k, v in old["supervised"].items()})
    for seed in a.seeds:
        first = None
        for pool in pools:
            run_dir = a.out / (f"{a.protocol}-{pool['tag']}-L{a.labels_per_class}-{tag}-r{a.rounds}"
                               f"-e{a.student_epochs:g}-seed{seed}")
            reuse_steps(a, run_dir, seed, pool["tag"])
            if first is not None and not (run_dir / "teacher").exists():  # the pools' shared teacher
                shutil.copytree(first / "teacher", run_dir / "teacher")
            common = protocol_overrides(pool)
            run_loop(a, run_dir, common, seed, every[pool["tag"]])
            first = first or run_dir
            save(a.out, every[pool["tag"]])
    for seed in a.supervised_seeds:  # the fully supervised reference: every train label of the protocol's classes
        pool = pools[0]
        run_dir = a.out / f"supervised-{Path(pool['full']).parent.name}-e{a.supervised_epochs:g}-seed{seed}"
        run(["stage=teacher", f"run_dir={run_dir}", *protocol_overrides(pool), f"seed={seed}",
             f"data.labeled='{pool['full']}'", f"train.epochs={a.supervised_epochs}"], a.out / "bench.log")
        done = summary(run_dir / "teacher")
        for r in every.values():
            r["supervised"][seed] = {"top1": done["top1"], "wall_s": done["wall_s"], "model": done["model"]["name"],
                                     "val_top1": done["eval_sets"]["val"]["top1"]}
    for r in every.values():
        save(a.out, r)
        print(table(r), "\n")
    print(pool_table(list(every.values())))


def pool_table(results: list[dict]) -> str:
    """One protocol's pools side by side (mean ± std over seeds): top-1 per round on the test and validation sets,
    round 1's gain over its teacher and against the first (reference) pool's, the least gain of any round and seed
    over its own teacher, the gap closed against full
    supervision, and what the selection kept: the three rarest classes' labels right (long-tail) or the share of
    the selected labels given to images of no class (open-set)."""
    ref = results[0]
    sup = [100 * v["top1"] for v in ref["supervised"].values()]
    rounds = ref["rounds"]

    def gains(r, k=1):
        return [100 * (v["top1"][k] - v["top1"][k - 1]) for v in r["seeds"].values()]

    ref_gain = statistics.mean(gains(ref)) if ref["seeds"] else None
    head = ["pool", "teacher", *(f"round {k}" for k in range(1, rounds + 1)), "round 1 gain",
            "of the reference's gain", "least gain of a round over its teacher",
            *(["gap closed (last round)"] if sup else []), "val top-1 (last round)", "selected labels"]
    lines = [f"{ref['protocol']}: {ref['labels_per_class']} labels per class, student.epochs={ref['student_epochs']}, "
             f"overrides {' '.join(ref['overrides']) or 'none'}; the reference pool is {ref['pool']}"
             + (f"; fully supervised (every train label, {_models(ref['supervised'])}): {mean_std(sup)}"
                if sup else ""),
             "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in results:
        seeds = list(r["seeds"].values())
        if not seeds:
            continue
        cells = [r["pool"]] + [mean_std([100 * v["top1"][k] for v in seeds]) for k in range(rounds + 1)]
        g = gains(r)
        cells += [mean_std(g), f"{100 * statistics.mean(g) / ref_gain:.0f}%" if ref_gain else ""]
        # "never worse than its teacher": the smallest step over every seed and round (each round's teacher is
        # the round before's student)
        least = min(100 * (v["top1"][k] - v["top1"][k - 1]) for v in seeds for k in range(1, rounds + 1))
        cells.append(f"{least:+.2f}")
        if sup:
            m = statistics.mean(sup)
            closed = [(100 * v["top1"][-1] - 100 * v["top1"][0]) / (m - 100 * v["top1"][0]) for v in seeds]
            cells.append(f"{100 * statistics.mean(closed):.0f}%")
        val = [100 * v["val_top1"][-1] for v in seeds if v.get("val_top1")]
        cells += [mean_std(val), selected_labels(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _models(supervised: dict) -> str:
    return ", ".join(sorted({v.get("model", "?") for v in supervised.values()}))


def pool_results(paths: list[Path]) -> dict[str, list[dict]]:
    """Results files of --protocol runs -> configuration (the results' name without its pool) -> its pools, in
    the order of their values (rho, ratio), the seeds of files of the same pool merged. A file with no seed holds a
    fully supervised reference (a run with --seeds and no value): every configuration of its protocol takes it."""
    configs: dict[str, dict[str, dict]] = {}
    references: dict[str, dict] = {}
    for path in paths:
        r = json.loads(path.read_text())
        if "pool" not in r:
            raise SystemExit(f"--pool-table: {path} is not the result of a --protocol run")
        if not r["seeds"]:
            references.setdefault(r["protocol"], {}).update(r["supervised"])
            continue
        name = r["name"].removesuffix("-" + r["pool"])
        pools = configs.setdefault(name, {})
        if r["pool"] in pools:
            pools[r["pool"]]["seeds"].update(r["seeds"])
            pools[r["pool"]]["supervised"].update(r["supervised"])
        else:
            pools[r["pool"]] = r
    value = lambda r: float(re.match(r"[a-z]+([0-9.]+)", r["pool"]).group(1))  # noqa: E731 - rho0.5 -> 0.5
    out = {}
    for name, pools in configs.items():
        for r in pools.values():
            r["seeds"] = dict(sorted(r["seeds"].items(), key=lambda kv: int(kv[0])))
            if not r["supervised"]:
                r["supervised"] = references.get(r["protocol"], {})
        out[name] = sorted(pools.values(), key=value)
    return out


def pool_plot(path: Path, configs: dict[str, list[dict]]) -> None:
    """Round 1's gain over its teacher per pool (mean and std over seeds), one line per configuration, a panel per
    protocol; the last round's gain dotted."""
    from noisystudent.reporting.plots import pyplot, save_png

    plt = pyplot()
    protocols_seen = sorted({pools[0]["protocol"] for pools in configs.values()})
    fig, axes = plt.subplots(1, len(protocols_seen), figsize=(5.2 * len(protocols_seen), 3.6), dpi=120, squeeze=False)
    for ax, protocol in zip(axes[0], protocols_seen, strict=True):
        for i, (name, pools) in enumerate((n, p) for n, p in configs.items() if p[0]["protocol"] == protocol):
            labels = [r["pool"].split("-")[0] for r in pools]
            x = np.arange(len(pools))
            for k, style in ((1, "o-"), (pools[0]["rounds"], "s:")):
                if k > pools[0]["rounds"] or (k > 1 and pools[0]["rounds"] == 1):
                    continue
                g = [[100 * (v["top1"][k] - v["top1"][0]) for v in r["seeds"].values()] for r in pools]
                ax.errorbar(x + 0.04 * i, [np.mean(v) for v in g], yerr=[np.std(v, ddof=1) if len(v) > 1 else 0
                                                                         for v in g],
                            fmt=style, color=f"C{i}", capsize=3, label=f"{name}, round {k}")
            ax.set_xticks(x, labels)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("pool (open-set: share of unseen classes; long-tail: imbalance ratio)")
        ax.set_ylabel("top-1 gain over the teacher (points)")
        ax.set_title(protocol, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_png(fig, path)


def selected_labels(r: dict) -> str:
    """Round 1's selection, from its audit, mean over seeds: the labels right of the three rarest classes of the
    pool (long-tail: the pool's profile puts the last classes last) or the share of labels on images of no class."""
    audits = [v["pseudolabels"][0]["audit"] for v in r["seeds"].values() if v.get("pseudolabels")]
    audits = [x for x in audits if x]
    if not audits:
        return ""
    if r["protocol"] == "long-tail":
        counts = r["pool_counts"]
        rare = sorted(counts, key=lambda c: (counts[c], -int(c)))[:3]
        out = []
        for c in rare:
            vals = [x["per_class"]["precision_after_balancing"][int(c)] for x in audits]
            vals = [v for v in vals if v is not None]
            out.append(f"class {c}: {100 * statistics.mean(vals):.0f}%" if vals else f"class {c}: none")
        return "right: " + ", ".join(out)
    ood = [x["out_of_domain"]["share_after_balancing"] for x in audits if x.get("out_of_domain")]
    return f"of no class: {100 * statistics.mean(ood):.0f}%" if ood else ""


def protocol_overrides(pool: dict) -> list[str]:
    return ["data=shards", f"data.num_classes={pool['num_classes']}", f"data.labeled='{pool['labeled']}'",
            f"data.unlabeled='{pool['unlabeled']}'", f"data.eval='{pool['eval']}'", f"data.val='{pool['val']}'",
            f"+eval.sets.val='{pool['val']}'", "model=demo"]


def reuse_steps(a, run_dir: Path, seed: int, pool: str = "") -> None:
    """--reuse: copy --reuse-steps (whole steps, or parts of one such as round_1/pseudolabel/labels) from a finished
    run ({seed} and {pool} in its path are filled in) into `run_dir`, where they are not there yet."""
    if not a.reuse:
        return
    for step in a.reuse_steps:
        src, dest = Path(a.reuse.format(seed=seed, pool=pool)) / step, run_dir / step
        if not dest.exists():
            shutil.copytree(src, dest)


def run_loop(a, run_dir: Path, common: list[str], seed: int, results: dict) -> None:
    """stage=iterate on one run directory; its figures into results["seeds"][seed]: top-1 per round on the eval set
    (and on eval.sets.val where there is one), the audit of the labels kept, wall time and, per round, the
    pseudolabel step's pool figures."""
    log_start = (a.out / "bench.log").stat().st_size if (a.out / "bench.log").exists() else 0
    run(["stage=iterate", f"run_dir={run_dir}", *common, f"seed={seed}", f"iterate.rounds={a.rounds}",
         f"student.epochs={a.student_epochs}", *a.overrides], a.out / "bench.log")
    with open(a.out / "bench.log", errors="replace") as f:
        f.seek(log_start)
        stale = [line.strip() for line in f if "is finished but its settings changed" in line
                 and not only_new_keys(line, a.reuse_new_keys)]
    if stale:  # a reused step the overrides would have run differently
        raise SystemExit(f"--reuse: {run_dir} kept a copied step that these overrides change:\n" + "\n".join(stale))
    steps = [summary(run_dir / "teacher")] + [summary(run_dir / f"round_{k}/student") for k in range(1, a.rounds + 1)]
    labeling = [summary(run_dir / f"round_{k}/pseudolabel") for k in range(1, a.rounds + 1)]
    audit = [((pl.get("audit") or {}).get("unlabeled") or {}).get("kept_by_threshold", {}).get("accuracy")
             for pl in labeling]
    out = {"top1": [s["top1"] for s in steps], "pseudo_label_accuracy_kept": audit,
           # the steps' own wall times (a rerun that skipped finished steps still reports the whole loop's)
           "wall_s": sum(s["wall_s"] for s in steps + labeling), "run_dir": str(run_dir)}
    if all("val" in (s.get("eval_sets") or {}) for s in steps):
        out["val_top1"] = [s["eval_sets"]["val"]["top1"] for s in steps]
    out["pseudolabels"] = [pool_figures(pl) for pl in labeling]
    results["seeds"][seed] = out


def only_new_keys(line: str, keys: list[str]) -> bool:
    """A "settings changed" log line whose every change is one of `keys` appearing where the step had none."""
    changes = line.split("settings changed since it ran: ", 1)[-1].split(". It is skipped")[0].split("; ")
    return bool(keys) and all(c.split(" (", 1)[0] in keys and " (None -> " in c for c in changes)


def pool_figures(pl: dict) -> dict:
    """What a round's pseudolabel summary says about its pool: the selection's counts, the pool estimate, and the
    audit (where the pool's classes are known): labels right after balancing per class, images of no class."""
    a = (pl.get("audit") or {}).get("unlabeled") or {}
    keep = ("images_seen", "images_kept_by_threshold", "images_after_balancing", "counts_before", "counts_after",
            "per_class", "pool")
    return {**{k: pl.get(k) for k in keep},
            "audit": {k: a.get(k) for k in ("accuracy", "kept_by_threshold", "after_balancing", "per_class",
                                            "out_of_domain")} if a else None}


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
