"""Does the test-resolution fine-tune help? One round's student of finished runs, evaluated at a test size:
as trained, with only its BatchNorm statistics re-estimated at that size, and fine-tuned (stage=finetune
with the given settings, in a copy of the run). Run by hand (not a test), on runs made with e.g.

    for S in 0 1 2; do python -m noisystudent stage=iterate run_dir=/tmp/fx_s$S seed=$S finetune.img_size=36; done
    python benchmarks/bench_fixres.py --size 36 --round 2 /tmp/fx_s0 /tmp/fx_s1 /tmp/fx_s2 -- finetune.lr_scale=1

(`finetune.img_size=36` makes iterate fine-tune the last round for 36 px; the demo preset itself tests at 32.)
Each run is evaluated on its own data.eval with its own seed; the table is printed as markdown."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from accelerate import Accelerator
from omegaconf import OmegaConf

from noisystudent.data.prefetch import DevicePrefetcher
from noisystudent.data.shards import SampleDecoder, expand_shards
from noisystudent.data.streams import labeled_batches
from noisystudent.data.transforms import InputNormalizer, eval_transform, model_norm
from noisystudent.models.build import load_exported_model
from noisystudent.reporting.evaluation import evaluate
from noisystudent.training.batchnorm import reestimate_batchnorm


def _settings(run_dir: Path, round_idx: int) -> dict:
    return json.loads((run_dir / f"round_{round_idx}/student/summary.json").read_text())["settings"]


def student_at(run_dir: Path, round_idx: int, size: int, reestimate: bool) -> float:
    """top-1 of round K's student at `size` px, optionally with its BatchNorm statistics re-estimated there on
    (at most) one pass over the labeled images in batches of 32."""
    s = _settings(run_dir, round_idx)
    data = OmegaConf.create({k.split(".", 1)[1]: v for k, v in s.items() if k.startswith("data.")})
    accelerator = Accelerator(cpu=True)
    model, info = load_exported_model(run_dir / f"round_{round_idx}/student", "")
    nc = int(info["num_classes"])
    if reestimate:
        labeled = expand_shards(s["data.labeled"], "data.labeled")
        stream = labeled_batches(labeled, SampleDecoder(eval_transform(size, data), nc, labeled=True), 32, 200, 0, 0)
        batches = DevicePrefetcher(stream(1), accelerator.device, InputNormalizer(*model_norm(model), False))
        reestimate_batchnorm(accelerator, model, batches, n_batches=4)
    metrics = evaluate(accelerator, model, expand_shards(s["data.eval"], "data.eval"), nc, eval_transform(size, data),
                       128, 0, False, 0)
    return metrics["top1"]


def finetuned(run_dir: Path, round_idx: int, size: int, extra: list[str]) -> float:
    """top-1 of stage=finetune round=K for `size` px with `extra` settings, in a copy of the run."""
    seed = _settings(run_dir, round_idx)["seed"]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("finetune", "export", "predict"))
        data_root = run_dir / "data" / "digits"
        subprocess.run([sys.executable, "-m", "noisystudent", "stage=finetune", f"round={round_idx}", f"seed={seed}",
                        f"run_dir={copy}", f"finetune.img_size={size}",
                        *([f"data.root={data_root}"] if data_root.exists() else []), *extra],
                       check=True, capture_output=True)
        return json.loads((copy / f"round_{round_idx}/finetune/summary.json").read_text())["top1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--size", type=int, required=True, help="the test resolution")
    ap.add_argument("--round", type=int, required=True)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = ap.parse_args(argv[:cut]), argv[cut + 1:]  # after --: settings of a second fine-tune
    rows = {"student at its train resolution": [], f"student at {args.size} px, as trained": [],
            f"student at {args.size} px, BatchNorm re-estimated only": [],
            f"fine-tune at {args.size} px (defaults)": []}
    if extra:
        rows[f"fine-tune at {args.size} px, {' '.join(extra)}"] = []
    for run_dir in args.runs:
        train_size = json.loads((run_dir / f"round_{args.round}/student/model.json").read_text())["img_size"]
        values = [student_at(run_dir, args.round, train_size, False), student_at(run_dir, args.round, args.size, False),
                  student_at(run_dir, args.round, args.size, True), finetuned(run_dir, args.round, args.size, [])]
        if extra:
            values.append(finetuned(run_dir, args.round, args.size, extra))
        for key, v in zip(rows, values, strict=True):
            rows[key].append(100 * v)
    print("| top-1 | " + " | ".join(str(r) for r in args.runs) + " | mean |")
    print("|---|" + "---|" * (len(args.runs) + 1))
    for key, vals in rows.items():
        print(f"| {key} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.2f} |")


if __name__ == "__main__":
    main()
