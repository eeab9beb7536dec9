"""run_dir/report.json, report.md and accuracy.png: one row per finished model (teacher = round 0)."""

from __future__ import annotations

import os
from pathlib import Path

from .files import atomic_write, atomic_write_bytes, write_json
from .models import eval_img_size
from .tracking import read_metrics

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT = "accuracy.png"
CURVES = "training_curves.png"


def report_row(round_idx: int, role: str, info: dict, metrics: dict, step_dir) -> dict:
    """One row of the report: a finished model (its model.json info) and its eval metrics."""
    return {"round": round_idx, "role": role, "model": info["name"], "params": info["params"],
            "eval_img_size": eval_img_size(info),
            "top1": metrics["top1"], "top5": metrics["top5"], "eval_images": metrics["images"],
            "per_class_top1": metrics["per_class_top1"], "path": str(step_dir)}


def write_report(run_dir: str | os.PathLike, rows: list[dict], eval_pattern: str, notes: list[str] = ()) -> dict:
    """rows: dicts with round, role, model, params, top1, top5, per_class_top1 (teacher first); notes: lines
    that say what the run left out and why."""
    run_dir = Path(run_dir)
    teacher_top1 = next((r["top1"] for r in rows if r["round"] == 0), None)
    for r in rows:
        r["gain_over_teacher"] = None if teacher_top1 is None else r["top1"] - teacher_top1
    report = {"eval": eval_pattern, "rounds": rows, "notes": list(notes)}
    write_json(run_dir / REPORT_JSON, report)
    _plot(run_dir / PLOT, rows)
    text = markdown_table(rows, eval_pattern, notes)
    if _curves(run_dir / CURVES, rows):
        text += ("\n## Training\n\nTraining loss per step (from each step's metrics.jsonl) and, with "
                 f"eval.every_epochs, the EMA model's top-1 during training.\n\n![training curves]({CURVES})\n")
    atomic_write_bytes(run_dir / REPORT_MD, text.encode())
    return report


def markdown_table(rows: list[dict], eval_pattern: str = "", notes: list[str] = ()) -> str:
    lines = ["# noisystudent report", ""]
    if eval_pattern:
        lines += [f"Evaluated on `{eval_pattern}`, each model at its own resolution (eval res.: a student at its "
                  "preset's test_img_size, a fine-tune at the resolution it was fine-tuned for).", ""]
    lines += ["| round | role | model | params | eval res. | top-1 | top-5 | gain over teacher |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = "" if r.get("gain_over_teacher") is None or r["round"] == 0 else f"{100 * r['gain_over_teacher']:+.2f}"
        res = f"{r['eval_img_size']} px" if r.get("eval_img_size") else ""
        lines.append(f"| {r['round']} | {r['role']} | {r['model']} | {r['params']:,} | {res} | {100 * r['top1']:.2f} | "
                     f"{100 * r['top5']:.2f} | {gain} |")
    lines += [""] + [f"Note: {n}" for n in notes] + ([""] if notes else [])
    lines += [f"![accuracy per round]({PLOT})", ""]
    return "\n".join(lines)


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    chain = [r for r in rows if r["role"] != "finetune"]  # the teacher and the students, round after round
    tuned = [r for r in rows if r["role"] == "finetune"]  # a round's fine-tune, beside its student
    rounds = [r["round"] for r in chain]
    ax.plot(rounds, [100 * r["top1"] for r in chain], "o-", label="top-1")
    ax.plot(rounds, [100 * r["top5"] for r in chain], "s--", label="top-5")
    if tuned:
        ax.plot([r["round"] for r in tuned], [100 * r["top1"] for r in tuned], "D", color="C2",
                label="top-1, fine-tuned at " + ", ".join(sorted({f"{r['eval_img_size']} px" for r in tuned})))
    ax.set_xticks(rounds, [("teacher" if r == 0 else f"round {r}") for r in rounds])
    ax.set_ylabel("eval accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _label(row: dict) -> str:
    return "teacher" if row["round"] == 0 else f"round {row['round']} {row['role']}"


def _curves(path: Path, rows: list[dict]) -> bool:
    """Loss against epoch for every step that logged metrics, and the periodic evaluations' top-1 when there
    are any; False (no file) when no step has metrics (a run of an older version)."""
    logs = [(_label(r), read_metrics(r["path"])) for r in rows if r.get("path")]
    logs = [(label, recs) for label, recs in logs if recs]
    if not logs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = any("eval_top1" in rec for _, recs in logs for rec in recs)
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(9 if evals else 5, 3.2), dpi=120, squeeze=False)
    for label, recs in logs:
        train = [r for r in recs if "loss" in r]
        axes[0][0].plot([r["epoch"] for r in train], [r["loss"] for r in train], label=label)
        if evals:
            ev = [r for r in recs if "eval_top1" in r]
            if ev:
                axes[0][1].plot([r["epoch"] for r in ev], [100 * r["eval_top1"] for r in ev], "o-", label=label)
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend(fontsize=7)
    if evals:
        axes[0][1].set_xlabel("epoch")
        axes[0][1].set_ylabel("EMA top-1 during training (%)")
        axes[0][1].legend(fontsize=7)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True
