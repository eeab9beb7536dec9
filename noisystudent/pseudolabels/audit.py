"""The pseudo-label audit: how often the teacher's labels are right, where the truth is known.

Label files whose samples carried a `cls` (unlabeled shards holding back their class, or the separate
audit shards of data.audit) keep it beside each pseudo-label. This module streams over such files,
one at a time (nothing is held per image), and measures the pseudo-labels three ways:
  - all: every image with a known class, whatever its confidence;
  - kept by the threshold (before balancing): each image above pseudolabel.threshold once;
  - after balancing: each image weighted by the times the selection repeats it (0 = dropped), i.e. as
    the student's stream sees them;
overall, per confidence bin and per class (of the pseudo-label: the precision of "class c" labels; and
per true class, the share of its images kept with the right label). With a calibrated teacher the files
also hold the confidence before calibration, and the audit says what the threshold kept with it.

The labels audited are the selection's: the teacher's, corrected for the pool's class prior where the selection
corrects them, and "kept" means what passed the threshold and the out-of-domain filter. An image whose `cls` says
it belongs to no class of the data set (-1 in the shard) is audited too: any label it gets is wrong, and
"out_of_domain" says how many such images the selection kept and which classes took them."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..data.labels import LabelFile
from ..data.shards import NO_CLASS, UNKNOWN_CLASS
from ..reporting.plots import pct, pyplot, save_png
from .selection import Selection

AUDIT_BINS = 10


def _ratio(num, den):
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)
    return [None if np.isnan(v) else float(v) for v in np.atleast_1d(out)]


def _bins(confidence: np.ndarray) -> np.ndarray:
    return np.minimum((confidence * AUDIT_BINS).astype(np.int64), AUDIT_BINS - 1)


def _ece(images: np.ndarray, correct: np.ndarray, conf_sum: np.ndarray) -> float | None:
    """Expected calibration error over the bins: sum of |accuracy - mean confidence| weighted by images."""
    n = images.sum()
    return float(np.abs(correct - conf_sum).sum() / n) if n else None


def audit_label_files(files: Iterable[LabelFile], selection: Selection, num_classes: int) -> dict | None:
    """The audit of the images in `files` that have a class; None when none has one."""
    nc, t = num_classes, selection.threshold
    z = lambda n: np.zeros(n, dtype=np.float64)  # noqa: E731
    b = {k: z(AUDIT_BINS) for k in ("images", "correct", "conf", "after", "correct_after", "raw_images",
                                     "raw_correct", "raw_conf")}
    c = {k: z(nc) for k in ("true", "kept", "kept_correct", "after", "after_correct")}
    o = {k: z(nc) for k in ("kept", "after")}  # images of no class, by the label they were given
    without, raw_kept, raw_kept_correct, has_raw = 0, 0, 0, True
    no_class = uncorrected_right = 0
    for f in files:
        if not f.has("cls"):
            without += int(f.meta["images"])
            continue
        truth = f["cls"].astype(np.int64)
        known = truth != UNKNOWN_CLASS  # a class, or NO_CLASS: every label given to such an image is wrong
        without += int((~known).sum())
        r = selection.rows(f)  # the labels as the selection read them (corrected for the prior, if it was)
        conf32 = r.confidence[known]
        conf, pred = conf32.astype(np.float64), r.argmax[known]
        truth = truth[known]
        rep = r.repeats[known].astype(np.float64)
        right = (pred == truth).astype(np.float64)
        uncorrected_right += int((f["argmax"][known].astype(np.int64) == truth).sum())
        kept = r.passes[known]  # the threshold (and the out-of-domain filter), exactly as the selection compares
        outside = truth == NO_CLASS
        no_class += int(outside.sum())
        o["kept"] += np.bincount(pred[kept & outside], minlength=nc)
        o["after"] += np.bincount(pred[outside], rep[outside], minlength=nc)
        truth = np.where(outside, nc, truth)  # counted apart from the classes below
        bins = _bins(conf)
        b["images"] += np.bincount(bins, minlength=AUDIT_BINS)
        b["correct"] += np.bincount(bins, right, minlength=AUDIT_BINS)
        b["conf"] += np.bincount(bins, conf, minlength=AUDIT_BINS)
        b["after"] += np.bincount(bins, rep, minlength=AUDIT_BINS)
        b["correct_after"] += np.bincount(bins, rep * right, minlength=AUDIT_BINS)
        c["true"] += np.bincount(truth, minlength=nc + 1)[:nc]
        c["kept"] += np.bincount(pred[kept], minlength=nc)
        c["kept_correct"] += np.bincount(pred[kept], right[kept], minlength=nc)
        c["after"] += np.bincount(pred, rep, minlength=nc)
        c["after_correct"] += np.bincount(pred, rep * right, minlength=nc)
        if has_raw and f.has("confidence_raw"):
            raw32 = f["confidence_raw"][known]
            raw = raw32.astype(np.float64)
            rbins = _bins(raw)
            b["raw_images"] += np.bincount(rbins, minlength=AUDIT_BINS)
            b["raw_correct"] += np.bincount(rbins, right, minlength=AUDIT_BINS)
            b["raw_conf"] += np.bincount(rbins, raw, minlength=AUDIT_BINS)
            raw_kept += int((raw32 >= t).sum())
            raw_kept_correct += int(right[raw32 >= t].sum())
        else:
            has_raw = False
    n = int(b["images"].sum())
    if n == 0:
        return None
    out = {
        "images": n,
        "images_without_cls": without,
        "threshold": t,
        "accuracy": float(b["correct"].sum() / n),
        "ece": _ece(b["images"], b["correct"], b["conf"]),
        "kept_by_threshold": {"images": int(c["kept"].sum()),
                              "accuracy": _ratio(c["kept_correct"].sum(), c["kept"].sum())[0]},
        "after_balancing": {"images": int(c["after"].sum()),
                            "accuracy": _ratio(c["after_correct"].sum(), c["after"].sum())[0]},
        "bins": {
            "edges": np.linspace(0, 1, AUDIT_BINS + 1).round(6).tolist(),
            "images": b["images"].astype(int).tolist(),
            "accuracy": _ratio(b["correct"], b["images"]),
            "mean_confidence": _ratio(b["conf"], b["images"]),
            "images_after_balancing": b["after"].astype(int).tolist(),
            "accuracy_after_balancing": _ratio(b["correct_after"], b["after"]),
        },
        "per_class": {
            "images": c["true"].astype(int).tolist(),  # by true class
            "kept": c["kept"].astype(int).tolist(),  # by pseudo-label, above the threshold
            "precision_kept": _ratio(c["kept_correct"], c["kept"]),
            "recall_kept": _ratio(c["kept_correct"], c["true"]),  # of a true class's images, kept and right
            "after_balancing": c["after"].astype(int).tolist(),
            "precision_after_balancing": _ratio(c["after_correct"], c["after"]),
        },
    }
    if selection.weights is not None:  # what the prior correction changed: the teacher's own top-1, right
        out["uncorrected_accuracy"] = float(uncorrected_right / n)
    if no_class:
        kept_all, after_all = c["kept"].sum(), c["after"].sum()
        out["out_of_domain"] = {
            "images": no_class, "share": float(no_class / n),
            "kept_by_threshold": int(o["kept"].sum()), "after_balancing": int(o["after"].sum()),
            "share_kept": _ratio(o["kept"].sum(), kept_all)[0], "share_after_balancing": _ratio(o["after"].sum(),
                                                                                              after_all)[0],
            # per pseudo-label: the share of the images given class c (after balancing) that belong to no class
            "per_class_share_after_balancing": _ratio(o["after"], c["after"]),
        }
    if has_raw:
        out["uncalibrated"] = {"ece": _ece(b["raw_images"], b["raw_correct"], b["raw_conf"]),
                               "kept_by_threshold": {"images": raw_kept,
                                                     "accuracy": _ratio(raw_kept_correct, raw_kept)[0]}}
    return out


def plot_audits(path, audits: dict[str, dict]) -> None:
    """One row per audited set: images and pseudo-label accuracy per confidence bin (threshold marked),
    and the precision of each class's pseudo-labels before and after balancing."""
    plt = pyplot()

    fig, axes = plt.subplots(len(audits), 2, figsize=(11, 3.6 * len(audits)), dpi=110, squeeze=False)
    for (name, a), (left, right) in zip(audits.items(), axes, strict=True):
        edges = np.array(a["bins"]["edges"])
        mid, w = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        left.bar(mid, a["bins"]["images"], width=w * 0.9, color="C0", alpha=0.35, label="images")
        left.bar(mid, a["bins"]["images_after_balancing"], width=w * 0.9, fill=False, edgecolor="C0",
                 label="images after balancing")
        left.set_xlabel("teacher confidence (top-1 probability)")
        left.set_ylabel("images")
        left.axvline(a["threshold"], color="r", ls="--", label=f"threshold {a['threshold']}")
        acc = left.twinx()
        ok = [i for i, v in enumerate(a["bins"]["accuracy"]) if v is not None]
        acc.plot(mid[ok], [100 * a["bins"]["accuracy"][i] for i in ok], "o-", color="C1", label="accuracy")
        acc.plot([0, 1], [0, 100], ":", color="gray", lw=1, label="calibrated")
        acc.set_ylim(0, 102)
        acc.set_ylabel("pseudo-label accuracy (%)")
        handles = left.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
        left.legend(handles=handles, fontsize=7, loc="upper left")
        kept, after = a["kept_by_threshold"], a["after_balancing"]
        left.set_title(f"{name}: {a['images']} images with a class, {100 * a['accuracy']:.1f}% right; kept "
                       f"{kept['images']} ({pct(kept['accuracy'])} right)", fontsize=8)
        pc = a["per_class"]
        x = np.arange(len(pc["images"]))
        val = lambda v: [100 * (u if u is not None else np.nan) for u in v]  # noqa: E731
        right.bar(x - 0.2, val(pc["precision_kept"]), 0.4, label="kept by threshold")
        right.bar(x + 0.2, val(pc["precision_after_balancing"]), 0.4, label="after balancing")
        right.set_xlabel("class (of the pseudo-label)")
        right.set_ylabel("pseudo-labels right (%)")
        right.set_ylim(0, 102)
        right.legend(fontsize=7, loc="lower right")
        right.set_title(f"after balancing: {after['images']} images, {pct(after['accuracy'])} right", fontsize=8)
    save_png(fig, path)

