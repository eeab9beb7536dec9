"""run_dir/report.json and report.md, the story of a run: one row per finished model (teacher = round 0)
with its accuracy and calibration, then per round what the teacher's pseudo-labels were (the selection,
the audit, the calibration), the training curves, and the last round against the teacher class by class.
Pictures beside them: accuracy.png, reliability.png, training_curves.png, per_class.png."""

from __future__ import annotations

import os
from pathlib import Path

from ..files import atomic_write_bytes, write_json
from ..models.build import eval_img_size
from ..rundir import is_done, pseudolabel_dir, read_summary
from ..training.tracking import read_metrics
from .plots import pct, pyplot, save_png
from .robustness import section as robustness_section

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT = "accuracy.png"
CURVES = "training_curves.png"
RELIABILITY = "reliability.png"
PER_CLASS = "per_class.png"


SET_METRICS = ("images", "top1", "top5", "nll", "ece", "classes")  # what a row keeps of each of eval.sets


def report_row(round_idx: int, role: str, info: dict, metrics: dict, step_dir, sets: dict | None = None,
               robustness: dict | None = None) -> dict:
    """One row of the report: a finished model (its model.json info), its eval metrics, those on each of
    eval.sets (name -> metrics) and its robustness result (evaluation.evaluate_views), if measured."""
    return {"round": round_idx, "role": role, "model": info["name"], "params": info["params"],
            "eval_img_size": eval_img_size(info),
            "top1": metrics["top1"], "top5": metrics["top5"], "eval_images": metrics["images"],
            # calibration on the eval set (absent from the summaries of older versions)
            "nll": metrics.get("nll"), "ece": metrics.get("ece"), "reliability": metrics.get("reliability"),
            "per_class_top1": metrics["per_class_top1"], "path": str(step_dir),
            "sets": {name: {k: m[k] for k in SET_METRICS if k in m} for name, m in (sets or {}).items()},
            "robustness": robustness}


def write_report(run_dir: str | os.PathLike, rows: list[dict], eval_pattern: str, notes: list[str] = (),
                 reference: tuple[dict, str] | None = None) -> dict:
    """rows: dicts with round, role, model, params, top1, top5, per_class_top1 (teacher first); notes: lines
    that say what the run left out and why; reference: (robustness result, name) of the model mCE is normalised
    by (default: the teacher's row)."""
    run_dir = Path(run_dir)
    if reference is None:
        teacher = next((r for r in rows if r["round"] == 0), None)
        reference = (teacher and teacher.get("robustness"), "the teacher")
    robustness = robustness_section(run_dir, rows, *reference)
    teacher_top1 = next((r["top1"] for r in rows if r["round"] == 0), None)
    for r in rows:
        r["gain_over_teacher"] = None if teacher_top1 is None else r["top1"] - teacher_top1
    labeling = pseudolabel_summaries(run_dir, rows)
    notes = [*notes, *chosen_on_eval_notes(rows)]
    report = {"eval": eval_pattern, "rounds": rows, "notes": list(notes),
              **({"mce_reference": reference[1]} if any(r.get("robustness") for r in rows) else {}),
              "pseudolabels": {str(k): _labeling_record(s) for k, s in labeling.items()}}
    write_json(run_dir / REPORT_JSON, report)
    _plot(run_dir / PLOT, rows)
    text = markdown_table(rows, eval_pattern, notes)
    if _reliability(run_dir / RELIABILITY, rows):
        text += (f"\n![reliability diagrams]({RELIABILITY})\n\nCalibration on the eval set: NLL, and ECE (expected "
                 "calibration error: the gap between confidence and accuracy, averaged over 15 confidence bins). "
                 "A calibrated model's curve follows the diagonal.\n")
    text += robustness
    text += pseudolabel_sections(run_dir, labeling)
    if _curves(run_dir / CURVES, rows):
        text += ("\n## Training\n\nTraining loss per step (from each step's metrics.jsonl) and, with "
                 f"eval.every_epochs, the EMA model's top-1 during training.\n\n![training curves]({CURVES})\n")
    text += per_class_section(run_dir / PER_CLASS, rows)
    atomic_write_bytes(run_dir / REPORT_MD, text.encode())
    return report


def markdown_table(rows: list[dict], eval_pattern: str = "", notes: list[str] = ()) -> str:
    lines = ["# noisystudent report", ""]
    if eval_pattern:
        lines += [f"Evaluated on `{eval_pattern}`, each model at its own resolution (eval res.: a student at its "
                  "preset's test_img_size, a fine-tune at the resolution it was fine-tuned for).", ""]
    lines += ["| round | role | model | params | eval res. | top-1 | top-5 | gain over teacher | NLL | ECE |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = "" if r.get("gain_over_teacher") is None or r["round"] == 0 else f"{100 * r['gain_over_teacher']:+.2f}"
        res = f"{r['eval_img_size']} px" if r.get("eval_img_size") else ""
        nll = f"{r['nll']:.3f}" if _measured(r.get("nll")) else ""
        ece = f"{100 * r['ece']:.1f}%" if _measured(r.get("ece")) else ""
        lines.append(f"| {r['round']} | {r['role']} | {r['model']} | {r['params']:,} | {res} | {100 * r['top1']:.2f} | "
                     f"{100 * r['top5']:.2f} | {gain} | {nll} | {ece} |")
    lines += [""] + [f"Note: {n}" for n in notes] + ([""] if notes else [])
    lines += [f"![accuracy per round]({PLOT})", ""]
    lines += set_tables(rows)
    return "\n".join(lines)


def set_tables(rows: list[dict]) -> list[str]:
    """A table per set of eval.sets, the models as rows (the lines of report.md's section)."""
    names = sorted({name for r in rows for name in r.get("sets", {})})
    lines = []
    for name in names:
        first = next(r["sets"][name] for r in rows if name in r.get("sets", {}))
        scope = f"{len(first['classes'])} classes (eval.sets.{name}.classes)" if "classes" in first else "all classes"
        lines += [f"## Eval set: {name}", "", f"{first['images']:,} images, scored over {scope}.", "",
                  "| round | role | model | top-1 | top-5 | NLL | ECE |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            m = r.get("sets", {}).get(name)
            if m is None:  # a model evaluated before the set was added: stage=evaluate measures it
                lines.append(f"| {r['round']} | {r['role']} | {r['model']} | | | | |")
                continue
            nll = f"{m['nll']:.3f}" if _measured(m.get("nll")) else ""
            ece = f"{100 * m['ece']:.1f}%" if _measured(m.get("ece")) else ""
            lines.append(f"| {r['round']} | {r['role']} | {r['model']} | {100 * m['top1']:.2f} | {100 * m['top5']:.2f} "
                         f"| {nll} | {ece} |")
        lines.append("")
    return lines


def _plot(path: Path, rows: list[dict]) -> None:
    plt = pyplot()

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
    save_png(fig, path)


def chosen_on_eval_notes(rows: list[dict]) -> list[str]:
    """A note per model whose weights eval.keep=best chose on data.eval, the set this report scores (no data.val):
    its top-1 here is optimistic."""
    out = []
    for r in rows:
        if r.get("path") and (Path(r["path"]) / "summary.json").is_file() and \
                read_summary(r["path"]).get("chosen_on_eval_set"):
            out.append(f"{_label(r)}: eval.keep=best chose its epoch on the eval set, the set scored here, so its "
                       "top-1 is optimistic (chosen on the eval set; set data.val to choose on held-out images).")
    return out


def _label(row: dict) -> str:
    return "teacher" if row["round"] == 0 else f"round {row['round']} {row['role']}"


def _curves(path: Path, rows: list[dict]) -> bool:
    """Loss against epoch for every step that logged metrics, and the periodic evaluations' top-1 when there
    are any; False (no file) when no step has metrics (a run of an older version)."""
    logs = [(_label(r), read_metrics(r["path"])) for r in rows if r.get("path")]
    logs = [(label, recs) for label, recs in logs if recs]
    if not logs:
        return False
    plt = pyplot()

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
    save_png(fig, path)
    return True



def _measured(v) -> bool:
    """A value to print: not missing (an older version's row) and not NaN (an eval set without images)."""
    return v is not None and v == v


def pseudolabel_summaries(run_dir: Path, rows: list[dict]) -> dict[int, dict]:
    """Round -> the summary of its finished pseudolabel step, for the rounds that have a student."""
    rounds = sorted({r["round"] for r in rows if r["round"] > 0})
    return {k: read_summary(pseudolabel_dir(run_dir, k)) for k in rounds if is_done(pseudolabel_dir(run_dir, k))}


def _labeling_record(s: dict) -> dict:
    keys = ("images_seen", "images_kept_by_threshold", "images_after_balancing", "threshold", "per_class",
            "temperature", "classes_without_images", "corrupt_skipped", "unreadable_shards", "selection")
    out = {k: s.get(k) for k in keys}
    if s.get("pool"):
        out["pool"] = {k: s["pool"][k] for k in ("images", "method", "estimated_share", "predicted_share", "ood")}
    for name, a in (s.get("audit") or {}).items():
        out[f"audit_{name}"] = {k: a[k] for k in ("images", "accuracy", "kept_by_threshold", "after_balancing",
                                                  "ece")}
    if s.get("calibration"):
        out["calibration"] = {k: s["calibration"][k] for k in ("temperature", "source", "images", "before", "after")}
    if s.get("eval_copies"):
        out["eval_copies"] = {k: s["eval_copies"].get(k) for k in ("found", "excluded", "checked_against", "max_rms")}
    return out


def pseudolabel_sections(run_dir: Path, labeling: dict[int, dict]) -> str:
    """Per round: what the teacher of that round labeled, what the selection kept, how right it was."""
    if not labeling:
        return ""
    lines = ["", "## Pseudo-labels", "",
             "What each round's teacher (the teacher, then the previous round's student) labeled, what the confidence "
             "threshold and class balancing kept, and, where the images' classes are known (unlabeled shards that "
             "carry a `cls`, or the audit shards of data.audit), how often the pseudo-labels were right.", ""]
    lines += ["| round | images | kept by threshold | after balancing | right: all | right: kept | right: after "
              "balancing |", "|---|---|---|---|---|---|---|"]
    for k, s in labeling.items():
        a = (s.get("audit") or {}).get("unlabeled") or {}
        lines.append(f"| {k} | {s['images_seen']:,} | {s['images_kept_by_threshold']:,} (threshold {s['threshold']}) "
                     f"| {s['images_after_balancing']:,} ({s['per_class']} per class) | {pct(a.get('accuracy'))} | "
                     f"{pct(a.get('kept_by_threshold', {}).get('accuracy'))} | "
                     f"{pct(a.get('after_balancing', {}).get('accuracy'))} |")
    for k, s in labeling.items():
        rel = os.path.relpath(pseudolabel_dir(run_dir, k), run_dir)
        lines += ["", f"### Round {k}", ""]
        lines += copies_lines(s, rel) + pool_lines(s) + [f"![round {k} selection]({rel}/selection.png)", ""]
        if s.get("pool"):
            lines += [f"![round {k}: the pool's classes and out-of-domain scores]({rel}/pool.png)", ""]
        for name, a in (s.get("audit") or {}).items():
            where = "data.unlabeled" if name == "unlabeled" else "data.audit (never trained on)"
            lines.append(f"- audit on {where}: {a['images']:,} images with a class, {pct(a['accuracy'])} right; "
                         f"above the threshold {a['kept_by_threshold']['images']:,}, "
                         f"{pct(a['kept_by_threshold']['accuracy'])} right; after balancing "
                         f"{a['after_balancing']['images']:,}, {pct(a['after_balancing']['accuracy'])} right; "
                         f"teacher ECE {pct(a['ece'])}.")
            o = a.get("out_of_domain")
            if o:
                lines.append(f"- of these, {o['images']:,} belong to no class ({pct(o['share'])}): the threshold kept "
                             f"{o['kept_by_threshold']:,} of them; after balancing they are {o['after_balancing']:,} "
                             f"({pct(o['share_after_balancing'])} of what the student sees).")
        cal = s.get("calibration")
        if cal:
            b, f = cal["before"], cal["after"]
            on_eval = cal["source"] == "data.eval"
            chosen = "; chosen on the eval set, the set scored here: set data.val" if on_eval else ""
            line = (f"- calibration: temperature {cal['temperature']:.3f} fitted on {cal['source']} "
                    f"({cal['images']:,} images{chosen}): NLL {b['nll']:.3f} -> {f['nll']:.3f}, ECE {pct(b['ece'])} -> "
                    f"{pct(f['ece'])}")
            raw = ((s.get("audit") or {}).get("unlabeled") or {}).get("uncalibrated")
            if raw:
                now = s["audit"]["unlabeled"]["kept_by_threshold"]
                line += (f"; the threshold keeps {now['images']:,} images ({pct(now['accuracy'])} right) where "
                         f"it would keep {raw['kept_by_threshold']['images']:,} "
                         f"({pct(raw['kept_by_threshold']['accuracy'])} right) uncalibrated")
            lines.append(line + ".")
        if s.get("audit"):
            lines += ["", f"![round {k} pseudo-label audit]({rel}/audit.png)"]
        if s.get("sheets"):
            lines += ["", "What the teacher put in each class (per class: the most confident images it kept, the least "
                      "confident, and those repeated most; captions: confidence or repeats), the images most likely "
                      "out of domain (label, score) and a sample of those the selection dropped (label, confidence, "
                      "why: thr = below the threshold, ood = out-of-domain filter, bal = balancing); "
                      "`sheets/sheets.json` names every image:", ""]
            for sh in s["sheets"]:
                lines += [f"![{sh['kind']}]({rel}/{sh['file']})", ""]
    return "\n".join(lines) + "\n"


def copies_lines(s: dict, rel: str, show: int = 5) -> list[str]:
    """What a round found of copies of eval images in its pool (a pseudolabel summary's `eval_copies`)."""
    c = s.get("eval_copies")
    if not c:
        return []
    if c.get("found") is None:
        return [f"- copies of eval images: {c.get('why', 'not checked')}."]
    sets = ", ".join(f"{n} ({m:,} images)" for n, m in c["checked_against"].items())
    if not c["found"]:
        return [f"- copies of eval images: none found against {sets} (max_rms {c['max_rms']:g})."]
    shown = "; ".join(f"`{e['key']}` ({os.path.basename(e['shard'])}) = {e['eval_set']} `{e['eval_key']}`"
                      for e in c["examples"][:show])
    more = f" and {c['found'] - show:,} more" if c["found"] > show else ""
    what = ("kept out of the selection" if c["excluded"]
            else "left in the selection (pseudolabel.eval_copies.exclude=false)")
    return [f"- copies of eval images: {c['found']:,} pool images match an image of {sets} (max_rms {c['max_rms']:g}), "
            f"{what}: {shown}{more}; every one in `{rel}/{c.get('file', 'eval_copies.json')}`."]


def pool_lines(s: dict) -> list[str]:
    """What a round's pool estimate says (a pseudolabel summary's `pool` and `selection`), in a few lines."""
    pool = s.get("pool")
    if not pool:
        return []
    ood, nc = pool["ood"], len(pool["estimated_share"])
    if ood["cutoff"] is not None:
        took = sorted(range(nc), key=lambda c: -ood["per_class_below"][c])[:3]
        lines = [f"- out of domain: {ood['below_cutoff']:,} of {pool['images']:,} images "
                 f"({pct(ood['share_below'])}) score below the {ood['score']} cut-off, which gives up "
                 f"{100 * ood['quantile']:g}% of {ood['cutoff_from']}: at least {pct(ood['share_estimate'])} of the "
                 "pool is out of domain. The teacher labeled them mostly as "
                 + ", ".join(f"{c} ({ood['per_class_below'][c]:,})" for c in took) + "."]
    else:
        lines = ["- out of domain: not measured (no data.val to place the cut-off on; the contact sheet still shows "
                 "the images with the lowest scores)."]
    est, pred = pool["estimated_share"], pool["predicted_share"]
    rare = sorted(range(nc), key=lambda c: est[c])[:3]
    # the classes the teacher predicts at least 1.2 times as often as they are estimated to occur: where the
    # paper's selection repeats wrong labels
    over = [c for c in sorted(range(nc), key=lambda c: -(pred[c] / max(est[c], 1e-9)))[:3]
            if pred[c] >= 1.2 * est[c]]
    lines.append(f"- classes ({pool['method']} estimate; the teacher's own predictions in brackets): rarest "
                 + ", ".join(f"{c} {pct(est[c])} ({pct(pred[c])})" for c in rare) + "; "
                 + ("over-predicted by 20% or more: " + ", ".join(f"{c} {pct(est[c])} ({pct(pred[c])})" for c in over)
                    if over else "no class over-predicted by 20% or more") + ".")
    # a class far more common in the pool than in the labeled set: a long tail's head, or a class that takes the
    # images of classes nobody labeled (the open-set case, which no logit score separates well: its contact sheet
    # shows it)
    prior = pool.get("train_prior") or [1.0 / nc] * nc
    by_ratio = sorted(range(nc), key=lambda c: -(est[c] / max(prior[c], 1e-9)))
    common = [c for c in by_ratio[:3] if est[c] >= 1.5 * prior[c]]
    if common:
        lines.append("- far more common in the pool than in the labeled set (1.5 times or more; where images of "
                     "classes nobody labeled go, look at the class's contact sheet): "
                     + ", ".join(f"{c} {pct(est[c])} (labeled {pct(prior[c])})" for c in common) + ".")
    sel = s.get("selection") or {}
    levers = [name for name, on in (("prior correction", sel.get("prior_correction")),
                                    ("out-of-domain filter", (sel.get("ood") or {}).get("filter")),
                                    (f"class quantile {sel.get('class_quantile')}", sel.get("class_quantile")),
                                    (f"balance target {sel.get('balance_target')}",
                                     sel.get("balance_target") not in (None, "uniform")),
                                    (f"at most {sel.get('max_repeat')} repeats", sel.get("max_repeat"))) if on]
    lines.append("- selection: " + (", ".join(levers) if levers else "the paper's (threshold and uniform balancing)")
                 + ".")
    return lines + [""]


def per_class_section(path: Path, rows: list[dict], show: int = 10) -> str:
    """The last round's final model against the teacher, class by class (all classes up to 2 x `show`,
    else the `show` it gained most on and the `show` it lost most on), and a scatter of every class."""
    teacher = next((r for r in rows if r["round"] == 0), None)
    last = rows[-1] if rows else None
    if teacher is None or last is teacher:
        return ""
    t, s = teacher["per_class_top1"], last["per_class_top1"]
    both = [(c, t[c], s[c]) for c in range(len(t)) if t[c] is not None and s[c] is not None]
    if not both:  # no class measured in both (an eval set with no readable image)
        return ""
    order = sorted(both, key=lambda x: x[2] - x[1], reverse=True)
    chosen = order if len(order) <= 2 * show else order[:show] + order[-show:]
    who = f"round {last['round']} {last['role']}"
    which = "" if chosen is order else f" (the {show} classes gained most and the {show} lost most, of {len(order)})"
    lines = ["", f"## Per class: {who} against the teacher", "",
             f"Top-1 per class on the eval set{which}; "
             f"{sum(1 for _, a, b in both if b > a)} classes gained, {sum(1 for _, a, b in both if b < a)} lost.", "",
             f"| class | teacher | {who} | change |", "|---|---|---|---|"]
    lines += [f"| {c} | {100 * a:.1f} | {100 * b:.1f} | {100 * (b - a):+.1f} |" for c, a, b in chosen]
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.2, 4), dpi=120)
    ax.scatter([100 * a for _, a, _ in both], [100 * b for _, _, b in both], s=14)
    low = max(0.0, 100 * min(min(a, b) for _, a, b in both) - 5)  # zoomed on where the classes lie
    ax.plot([low, 100], [low, 100], ":", color="gray")
    ax.set_xlim(low, 101)
    ax.set_ylim(low, 101)
    if len(both) <= 2 * show:
        for c, a, b in both:
            ax.annotate(str(c), (100 * a, 100 * b), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("teacher top-1 per class (%)")
    ax.set_ylabel(f"{who} top-1 per class (%)")
    ax.set_title("above the diagonal: classes the students improved", fontsize=8)
    ax.grid(alpha=0.3)
    save_png(fig, path)
    return "\n".join(lines) + f"\n\n![per-class top-1]({path.name})\n"


def _reliability(path: Path, rows: list[dict]) -> bool:
    """Accuracy against confidence per bin, one curve per model; False (no file) when no row has the bins."""
    rows = [r for r in rows if r.get("reliability")]
    if not rows:
        return False
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.6, 4), dpi=120)
    ax.plot([0, 100], [0, 100], ":", color="gray", label="calibrated")
    for r in rows:
        rel = r["reliability"]
        pts = [(c, a) for c, a in zip(rel["confidence"], rel["accuracy"], strict=True) if c is not None]
        ax.plot([100 * c for c, _ in pts], [100 * a for _, a in pts], "o-", ms=3,
                label=f"{_label(r)} (ECE {pct(r.get('ece'))})")
    ax.set_xlabel("confidence (%)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, path)
    return True
