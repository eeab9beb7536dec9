"""What each selection lever does to the labels a student would get, measured on finished pseudolabel steps whose pool
images carry their true class (`cls`; -1 in the shard: of no class): the --protocol runs of bench_accuracy.py.

Training a student per lever costs minutes; choosing from the same label files costs a second. So for every lever
alone (and the paper's rule) this applies the selection to a step's label files and its data.val labels exactly as
the pseudolabel stage does (noisystudent.pseudolabels.choose), and audits the result: the labels right after
balancing, per class, and the share given to images of no class. It also scores the pool estimate (total variation
against the pool's true class shares: the teacher's predictions, the confusion-corrected estimate, EM) and each
out-of-domain score's AUROC where the pool holds images of no class.

    python benchmarks/bench_levers.py /tmp/fmnist/long-tail-ratio100-*/round_1/pseudolabel [...] [--json out.json]
    python benchmarks/bench_levers.py --foreign RUN_DIR STEP_DIR  # far out-of-domain images against RUN_DIR's teacher

--foreign: labels a shard of images from no fashion data set (uniform noise, crops of scikit-learn's two sample
photos, its handwritten digits; 300 of each, made here) with RUN_DIR's teacher (a copy, in RUN_DIR/foreign) and prints
each score's AUROC against STEP_DIR's in-domain pool images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from noisystudent.data.labels import LabelFile  # noqa: E402
from noisystudent.pseudolabels.audit import audit_label_files  # noqa: E402
from noisystudent.pseudolabels.choose import Policy, choose  # noqa: E402
from noisystudent.pseudolabels.pool import PoolSettings  # noqa: E402
from noisystudent.pseudolabels.selection import SelectionSettings, in_domain_score  # noqa: E402

# each lever alone, as the pseudolabel.* keys would set it
LEVERS = {
    "the paper's rule (selection=paper)": {},
    "prior_correction=true": {"prior_correction": True},
    "prior_correction=true prior=em": {"prior_correction": True, "prior": "em"},
    "ood.filter=true": {"ood_filter": True},
    "class_quantile=0.2": {"class_quantile": 0.2},
    "balance_target=estimated": {"balance_target": "estimated"},
    "max_repeat=4": {"max_repeat": 4},
}
SCORES = ("energy", "max_logit", "msp")


def policy(lever: dict, threshold: float) -> Policy:
    return Policy(SelectionSettings(threshold, True, "auto", lever.get("balance_target", "uniform"),
                                    lever.get("max_repeat"), lever.get("class_quantile", 0.0)),
                  PoolSettings("energy", 0.05, lever.get("prior", "auto")),
                  lever.get("prior_correction", False), lever.get("ood_filter", False))


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an in-domain image scores above an out-of-domain one): the rank statistic, ties counted half."""
    s = np.concatenate([inside, outside])
    ranks = _ranks(s)
    return float((ranks[: len(inside)].sum() - len(inside) * (len(inside) + 1) / 2) / (len(inside) * len(outside)))


def _ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank."""
    order = s.argsort(kind="stable")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def step_files(step: Path) -> tuple[list[LabelFile], list[LabelFile], float]:
    files = [LabelFile(p) for p in sorted((step / "labels").glob("*.safetensors"))]
    reference = [LabelFile(p) for p in sorted((step / "val").glob("*.safetensors"))]
    if not files:
        raise SystemExit(f"{step}: no label files under labels/ (a finished pseudolabel step of a --protocol run?)")
    threshold = float(json.loads((step / "summary.json").read_text())["threshold"])
    return files, reference, threshold


def measure(step: Path, rare: int = 3) -> dict:
    files, reference, threshold = step_files(step)
    nc = files[0].num_classes
    truth = np.concatenate([np.asarray(f["cls"]) for f in files])
    if not (truth >= 0).any():
        raise SystemExit(f"{step}: its pool images carry no class (cls): nothing to measure the labels against")
    out: dict = {"step": str(step)}
    counts = np.bincount(truth[truth >= 0], minlength=nc)
    true_share = counts / counts.sum()
    # the rarest classes of the pool that have images (long tails); on a balanced pool, the last classes
    rarest = [int(c) for c in sorted(np.flatnonzero(counts), key=lambda c: (counts[c], -c))[:rare]]
    out["rarest_classes"] = rarest
    if (truth == -2).any():
        scores = {sc: np.concatenate([in_domain_score(f, sc) for f in files]) for sc in SCORES}
        out["auroc_near"] = {sc: auroc(v[truth >= 0], v[truth == -2]) for sc, v in scores.items()}
    out["levers"] = {}
    for name, lever in LEVERS.items():
        sel, pool, _ = choose(files, reference, nc, policy(lever, threshold))
        a = audit_label_files(files, sel, nc)
        prec = a["per_class"]["precision_after_balancing"]
        rec = {"right_after_balancing": a["after_balancing"]["accuracy"], "images": a["after_balancing"]["images"],
               "rarest_right": [prec[c] for c in rarest]}
        if "out_of_domain" in a:
            rec["of_no_class"] = a["out_of_domain"]["share_after_balancing"]
        out["levers"][name] = rec
        if not lever:
            tv = {"predicted": 0.5 * float(np.abs(np.array(pool["predicted_share"]) - true_share).sum())}
            tv.update({m: 0.5 * float(np.abs(np.array(e) - true_share).sum()) for m, e in pool["estimates"].items()})
            out["estimate_tv"] = tv
            out["of_no_class_true"] = float((truth == -2).mean())
            out["of_no_class_estimate"] = pool["ood"].get("share_estimate")
    return out


def foreign_shard(path: Path, per_kind: int = 300, seed: int = 0) -> None:
    """Images of no fashion class, 28x28 grey: uniform noise, crops of the two sample photos, handwritten digits."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    from noisystudent.data.writer import encode_png, write_shard

    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.fromarray(p).convert("L")) for p in load_sample_images().images]
    digits = load_digits().images
    samples = []
    for i in range(per_kind):
        noise = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 112), rng.integers(0, p.shape[1] - 112)
        crop = Image.fromarray(p[y:y + 112, x:x + 112]).resize((28, 28), Image.BILINEAR)
        digit = Image.fromarray((digits[i] * 255 / 16).astype(np.uint8), "L").resize((28, 28), Image.BILINEAR)
        for kind, img in (("noise", Image.fromarray(noise, "L")), ("photo", crop), ("digit", digit)):
            samples.append({"__key__": f"{kind}{i:04d}", "png": encode_png(img), "cls": b"-1"})
    write_shard(path, samples)


def foreign(run_dir: Path, step: Path) -> dict:
    """Label the foreign shard with run_dir's teacher (its own config, only data.unlabeled changed) and score it."""
    from bench_accuracy import run

    out = run_dir / "foreign"
    out.mkdir(exist_ok=True)
    shard = out / "foreign-000000.tar"
    if not shard.exists():
        foreign_shard(shard)
    labeled = out / "run"
    if not (labeled / "teacher").exists():
        shutil.copytree(run_dir / "teacher", labeled / "teacher")
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "teacher/config.yaml")  # the --protocol runs' teachers are model=demo
    run(["stage=pseudolabel", f"run_dir={labeled}", "data=shards", f"data.num_classes={cfg.data.num_classes}",
         f"data.labeled='{cfg.data.labeled}'", f"data.unlabeled=['{shard}']", "model=demo"], out / "log")
    theirs = LabelFile(next((labeled / "round_1/pseudolabel/labels").glob("*.safetensors")))
    files, _, _ = step_files(step)
    truth = np.concatenate([np.asarray(f["cls"]) for f in files])
    sample_keys = theirs.keys()  # the keys of its samples (LabelFile has no mapping protocol)
    kinds = np.array([k.rstrip("0123456789") for k in sample_keys])
    res = {}
    for sc in SCORES:
        inside = np.concatenate([in_domain_score(f, sc) for f in files])[truth >= 0]
        fs = in_domain_score(theirs, sc)
        res[sc] = {k: auroc(inside, fs[kinds == k]) for k in ("noise", "photo", "digit")}
    return res


def table(rows: list[dict]) -> str:
    """The levers (rows) against the steps (columns): labels right after balancing, the rarest classes' in brackets,
    the share on images of no class in square brackets; mean over the steps of one pool (seeds)."""
    pools: dict[str, list[dict]] = {}
    for r in rows:
        pools.setdefault(_pool_name(r["step"]), []).append(r)
    head = ["selection", *pools]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in LEVERS:
        cells = [name]
        for rs in pools.values():
            recs = [r["levers"][name] for r in rs]
            cell = f"{100 * statistics.mean(x['right_after_balancing'] for x in recs):.1f}"
            rare = [[x["rarest_right"][i] for x in recs if x["rarest_right"][i] is not None] for i in range(3)]
            if _pool_name(rs[0]["step"]).startswith("long-tail"):
                cell += " (" + "/".join(f"{100 * statistics.mean(v):.0f}" if v else "-" for v in rare) + ")"
            if "of_no_class" in recs[0]:
                cell += f" [{100 * statistics.mean(x['of_no_class'] for x in recs):.0f}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    est = ["", "| pool | teacher's predictions | confusion-corrected (data.val) | EM | of no class: true / at least |",
           "|---|---|---|---|---|"]
    for pool, rs in pools.items():
        tv = {m: [r["estimate_tv"].get(m) for r in rs if r["estimate_tv"].get(m) is not None]
              for m in ("predicted", "confusion", "em")}
        share = [r["of_no_class_estimate"] for r in rs if r.get("of_no_class_estimate") is not None]
        est.append(f"| {pool} | " + " | ".join(_mean_std(tv[m], 3) for m in tv)
                   + f" | {100 * rs[0]['of_no_class_true']:.0f}% / {_mean_std([100 * s for s in share], 1)}% |")
    return "\n".join(lines + est)


def _pool_name(step: str) -> str:
    """A --protocol run directory's protocol and pool: long-tail-ratio100-n12000-...-seed0 -> long-tail-ratio100."""
    parts = Path(step).parts
    run = next((p for p in parts if p.startswith(("long-tail-", "open-set-"))), parts[0])
    return "-".join(run.split("-")[:3])


def _mean_std(v: list[float], digits: int) -> str:
    if not v:
        return "-"
    return f"{statistics.mean(v):.{digits}f}" + (f" ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("steps", nargs="+", type=Path, help="finished round_K/pseudolabel directories of --protocol runs")
    ap.add_argument("--foreign", type=Path, help="a run directory whose teacher labels the far out-of-domain shard")
    ap.add_argument("--json", type=Path, help="write every figure here too")
    a = ap.parse_args()
    if a.foreign:
        res = foreign(a.foreign, a.steps[0])
        for sc, row in res.items():
            print(sc, " ".join(f"{k} {v:.3f}" for k, v in row.items()))
        out = res
    else:
        out = [measure(s) for s in a.steps]
        print(table(out))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
