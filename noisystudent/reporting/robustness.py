"""Robustness in the report: corruption errors, mCE and relative mCE against a reference model, flip rates, and
calibration under corruption, from each model's robustness result (evaluation.evaluate_views).

The definitions are Hendrycks & Dietterich's (ImageNet-C and -P, 2019), with the reference model the run's
teacher (or eval.mce_reference) where they used AlexNet:
- corruption error CE_c = sum over severities of the model's top-1 error on corruption c / the same sum for the
  reference; mCE = the mean of CE_c over the corruptions (x 100: the reference's mCE is 100);
- relative CE_c = sum over severities of (error on c - clean error) / the same sum for the reference: how much
  the model loses to the corruption, against how much the reference loses; relative mCE, their mean;
- flip rate FP_p: how often the top-1 changes between neighbouring frames of perturbation p; FR_p = FP_p / the
  reference's FP_p; mFR, their mean."""

from __future__ import annotations

import statistics
from pathlib import Path

from .plots import pyplot, save_png

PLOT = "corruptions.png"


def errors(robustness: dict) -> dict[str, dict[str, float]]:
    """corruption -> severity -> top-1 error."""
    return {c: {s: 1.0 - m["top1"] for s, m in sev.items()} for c, sev in robustness["corruptions"].items()}


def mean_error(robustness: dict) -> dict[str, float]:
    """corruption -> its top-1 error averaged over the severities."""
    return {c: statistics.mean(e.values()) for c, e in errors(robustness).items()}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def against(robustness: dict | None, reference: dict | None) -> dict:
    """mCE, relative mCE and mFR of one model's result against the reference's (None where either is missing,
    the two were measured on different plans, or the reference shows no error to normalise by)."""
    empty = {"mce": None, "relative_mce": None, "mfr": None, "ce": {}, "relative_ce": {}, "fr": {}, "undefined": {}}
    if robustness is None or reference is None or robustness["plan"] != reference["plan"]:
        return empty
    mine, ref = errors(robustness), errors(reference)
    clean, ref_clean = 1.0 - robustness["clean"]["top1"], 1.0 - reference["clean"]["top1"]
    ce, rel = {}, {}
    for c, e in mine.items():
        total, ref_total = sum(e.values()), sum(ref[c].values())
        ce[c] = 100.0 * total / ref_total if ref_total > 0 else None
        lost, ref_lost = total - len(e) * clean, ref_total - len(e) * ref_clean
        rel[c] = 100.0 * lost / ref_lost if ref_lost > 0 else None
    fr = {}
    for p, m in robustness["perturbations"].items():
        r = reference["perturbations"][p]["flip_rate"]
        fr[p] = 100.0 * m["flip_rate"] / r if m["flip_rate"] is not None and r else None
    # a CE the reference gives nothing to normalise by (no error, or no loss to the corruption) is left out of
    # its mean, and named, so a mean over fewer corruptions than planned is never taken for the full one
    undefined = {k: [c for c, v in d.items() if v is None] for k, d in (("mce", ce), ("relative_mce", rel),
                                                                       ("mfr", fr))}
    return {"mce": _mean(ce.values()), "relative_mce": _mean(rel.values()), "mfr": _mean(fr.values()),
            "ce": ce, "relative_ce": rel, "fr": fr, "undefined": {k: v for k, v in undefined.items() if v}}


def under_corruption(robustness: dict) -> dict:
    """top-1, NLL and ECE over every corrupted image of the plan together (None without corruptions)."""
    pooled = robustness.get("corrupted") or {}
    return {k: pooled.get(k) for k in ("top1", "nll", "ece")}


def _label(row: dict) -> str:
    return "teacher" if row["round"] == 0 else f"round {row['round']} {row['role']}"


def _num(v, fmt: str = "{:.1f}") -> str:
    return "" if v is None or v != v else fmt.format(v)


def section(run_dir: Path, rows: list[dict], reference: dict | None, reference_name: str) -> str:
    """report.md's robustness section (and corruptions.png), or "" when no row has a robustness result. Each
    row gets `robustness_summary` (mCE, relative mCE, mFR, means under corruption) for report.json."""
    measured = [r for r in rows if r.get("robustness")]
    if not measured:
        return ""
    for r in rows:
        res = r.get("robustness")
        r["robustness_summary"] = {**against(res, reference), **(under_corruption(res) if res else {})}
    # The per-corruption tables compare models on one plan: the reference's, else the first model's. A finished
    # step kept from an earlier plan (its settings changed since) is listed, not compared.
    plan = (reference or measured[0]["robustness"])["plan"]
    other = [r for r in measured if r["robustness"]["plan"] != plan]
    measured = [r for r in measured if r["robustness"]["plan"] == plan]
    if not measured:
        return "\n".join(["", "## Robustness", "", _other_plans(other, reference_name)]) + "\n"
    n = measured[0]["robustness"]["images"]
    which = (f"data.eval's first {n:,} images (eval.corruption_images)" if plan["images"]
             else f"All {n:,} images of data.eval")
    lines = ["", "## Robustness", "",
             f"{which} made into {len(plan['corruptions'])} corruptions at severities "
             f"{', '.join(map(str, plan['severities']))} (imagecorruptions, ImageNet-C's) and "
             f"{len(plan['perturbations'])} perturbation sequences, the same pixels for every model "
             f"(eval.corruption_seed={plan['seed']}). mCE and relative mCE: corruption errors normalised by "
             f"{reference_name}'s (100 for it by construction); mFR: flip rates normalised alike. Lower is more "
             "robust."]
    sizes = sorted({r["robustness"].get("img_size") for r in measured} - {None})
    if len(sizes) > 1:
        lines[-1] += (f" The models are evaluated at {', '.join(f'{x} px' for x in sizes)}: each is corrupted at its "
                      "own size, so models at different sizes do not see the same pixels.")
    lines += ["", "| round | role | model | clean top-1 | corrupted top-1 | mCE | relative mCE | NLL corrupted | "
              "ECE corrupted | mFR |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, res = r["robustness_summary"], r.get("robustness")
        clean = _num(100 * res["clean"]["top1"], "{:.2f}") if res else ""
        lines.append(f"| {r['round']} | {r['role']} | {r['model']} | {clean} | "
                     f"{_num(s.get('top1') and 100 * s['top1'], '{:.2f}')} | {_num(s['mce'])} | "
                     f"{_num(s['relative_mce'])} | {_num(s.get('nll'), '{:.3f}')} | "
                     f"{_num(s.get('ece') and 100 * s['ece'])}{'%' if s.get('ece') is not None else ''} | "
                     f"{_num(s['mfr'])} |")
    if plan["corruptions"]:
        lines += ["", "### Error per corruption", "",
                  "Top-1 error (%) averaged over the severities, and the corruption error CE against "
                  f"{reference_name} in brackets.", ""]
        lines += _per_model(measured, "corruption", plan["corruptions"], lambda r, c: (
            f"{100 * mean_error(r['robustness'])[c]:.1f} ({_num(r['robustness_summary']['ce'].get(c))})"))
        if len(measured) > 1:  # the first model (the teacher) against the last
            error_plot(run_dir / PLOT, [(_label(r), mean_error(r["robustness"])) for r in (measured[0], measured[-1])])
            lines += ["", f"![error per corruption]({PLOT})"]
        lines += ["", "### Top-1 per corruption and severity", ""]
        for r in measured:
            lines += [f"{_label(r)} ({r['model']}):", "",
                      "| corruption | " + " | ".join(f"severity {s}" for s in plan["severities"]) + " |",
                      "|---|" + "---|" * len(plan["severities"])]
            for c in plan["corruptions"]:
                sev = r["robustness"]["corruptions"][c]
                lines.append(f"| {c} | " + " | ".join(f"{100 * sev[str(s)]['top1']:.2f}" for s in plan["severities"])
                             + " |")
            lines.append("")
    if plan["perturbations"]:
        lines += ["", "### Flip rate per perturbation", "",
                  "How often the top-1 changes between neighbouring frames (%), and FR against "
                  f"{reference_name} in brackets.", ""]
        frames = measured[0]["robustness"]["perturbations"]

        def flip_cell(r, p):
            fp = r["robustness"]["perturbations"][p]["flip_rate"]
            return f"{_num(fp and 100 * fp, '{:.2f}')} ({_num(r['robustness_summary']['fr'].get(p))})"

        lines += _per_model(measured, "perturbation (frames)", plan["perturbations"], flip_cell,
                            lambda p: f"{p} ({frames[p]['frames']})")
    undefined = sorted({f"{k} leaves out {', '.join(cs)} ({_label(r)})" for r in measured
                        for k, cs in r["robustness_summary"]["undefined"].items()})
    if undefined:
        lines += ["", f"Where {reference_name} shows no error (mCE, mFR) or loses nothing (relative mCE) on a "
                  "corruption, its ratio is undefined and left out of the mean: " + "; ".join(undefined) + "."]
    if other:
        lines += ["", _other_plans(other, reference_name)]
    cost = measured[-1]["robustness"].get("images_per_worker_s") or {}
    slow = sorted((v, k) for k, v in cost.items() if v and k != "clean")
    if slow:
        lines += ["", "Cost in the loader workers (images per second of one worker, the last model's pass): "
                  + ", ".join(f"{k} {v:,.0f}" for v, k in slow) + "."]
    return "\n".join(lines) + "\n"


def _other_plans(rows: list[dict], reference_name: str) -> str:
    return ("Measured on another plan than " + reference_name + "'s (other corruptions, severities, perturbations, "
            "images or seed), so not compared here: " + ", ".join(f"{_label(r)} ({r['model']})" for r in rows)
            + ". Rerun stage=evaluate with one plan for every model.")


def _per_model(rows: list[dict], head: str, items, cell, name=str) -> list[str]:
    """A markdown table: one line per item, one column per model (`cell(row, item)`)."""
    lines = [f"| {head} | " + " | ".join(_label(r) for r in rows) + " |", "|---|" + "---|" * len(rows)]
    return lines + [f"| {name(i)} | " + " | ".join(cell(r, i) for r in rows) + " |" for i in items]


def error_plot(path: Path, series: list[tuple[str, dict[str, float]]], title: str = "") -> None:
    """Grouped bars: top-1 error (%) per corruption, one bar per (label, corruption -> error) of `series`."""
    plt = pyplot()
    names = list(series[0][1])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(names) + 1.5), 3.4), dpi=120)
    width = 0.8 / len(series)
    for k, (label, err) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [100 * err[c] for c in names], width, label=label)
    ax.set_xticks(range(len(names)), [c.replace("_", " ") for c in names], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("top-1 error (%)")
    if title:
        ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    save_png(fig, path)
