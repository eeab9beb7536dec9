"""Which pseudo-labeled images the student sees, and how often: streamed over label files, exact, flat in memory.

The paper's rule: drop images whose confidence is below `threshold`; then every class gets N images: a class with
more keeps its N most confident, a class with fewer has each image repeated floor(N / n) times and its (N mod n)
most confident images once more.

The levers a real pool asks for (docs/pseudolabels.md, "Selecting from a real pool"), each off in the paper's rule:
- `weights`: the teacher's probabilities re-weighted per class, p'(c|x) ~ p(c|x) w_c, before anything else reads
  them, so that they follow the pool's estimated class prior instead of the labeled set's (pool.py estimates it);
  the threshold, the ranking and the student's soft targets all read the corrected probabilities;
- `ood`: images whose out-of-domain score is below a cut-off are dropped (pool.py places the cut-off);
- `class_quantile` q: each class also drops the least confident fraction q of what it kept (a threshold relative to
  the class's own confidences);
- the balance target: N per class (uniform, the paper), or N x classes shared by a prior (the labeled set's, or
  the pool's estimate);
- `max_repeat`: no image is repeated more than this many times (a rare class then gets fewer than its target).

"Most confident" is ranked by a 64-bit score: the (corrected) confidence's float32 bits, then a hash of the key, so
ties break deterministically and the same inputs always give the same selection. Every per-class cut is found by
radix selection: a few passes over the label files, each building a [classes x 256] histogram of the next 8 bits.
Memory holds one label file and these histograms, never anything per image, and every process that applies the
selection computes the same bits from the same files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..data.labels import LabelFile
from ..errors import ConfigError

log = logging.getLogger(__name__)

HIST_BINS = 50
NO_EXTRA = 2**64  # a cut above every uint64 score: no image gets the extra repeat
BALANCE_TARGETS = ("uniform", "labeled", "estimated")
OOD_SCORES = ("energy", "max_logit", "msp")


def scores(confidence: np.ndarray, keyhash: np.ndarray) -> np.ndarray:
    """Order-preserving uint64: float32 confidence bits (non-negative floats sort as their bits), then
    the top 32 bits of the key hash."""
    conf_bits = np.ascontiguousarray(confidence, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (conf_bits << np.uint64(32)) | (keyhash.astype(np.uint64) >> np.uint64(32))


def score_confidence(score: int) -> float:
    """The confidence a ranking score was made from (its top 32 bits)."""
    return float(np.array([int(score) >> 32], dtype=np.uint32).view(np.float32)[0])


def in_domain_score(f: LabelFile, name: str) -> np.ndarray:
    """The out-of-domain score of each image of a label file, higher = more like the teacher's training data:
    energy (Liu et al. 2020; stored as -energy = the logits' logsumexp), max_logit, or msp (the maximum softmax
    probability, Hendrycks & Gimpel 2017: the teacher's confidence, which any label file has)."""
    if name == "msp":
        return f["confidence"].astype(np.float32)
    if not f.has_scores:
        raise ConfigError(f"label file {f.path} was made by an older version (label file format {f.format}) and has "
                          f"no out-of-domain score ({name}); label its shards again with this version: rerun "
                          "stage=pseudolabel with force=true (or use pseudolabel.ood.score=msp)")
    return f["logit_lse" if name == "energy" else "max_logit"].astype(np.float32)


def corrected(topk_ids: np.ndarray, topk_probs: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-k probabilities, mass left to the other classes) after p'(c|x) ~ p(c|x) w_c, renormalised. The other
    classes' mass is re-weighted by the mean weight of the classes outside the row's top k (exact when the file
    keeps every class: topk >= num_classes)."""
    p = topk_probs.astype(np.float32)
    rest = np.clip(1.0 - p.sum(axis=1), 0.0, None)
    w = weights.astype(np.float32)
    k = topk_ids.shape[1]
    wk = w[topk_ids]
    others = len(w) - k
    rest_w = rest * ((w.sum() - wk.sum(axis=1)) / others if others > 0 else 0.0)
    u = p * wk
    z = u.sum(axis=1) + rest_w
    z = np.where(z > 0, z, 1.0).astype(np.float32)
    return (u / z[:, None]).astype(np.float32), (rest_w / z).astype(np.float32)


@dataclass
class Rows:
    """One label file as the selection reads it: per image the label, its confidence and ranking score, its
    out-of-domain score (when the selection has one) and whether it passes the threshold and the filter."""
    confidence: np.ndarray  # float32, after the prior correction
    argmax: np.ndarray  # int64
    keyhash: np.ndarray
    score: np.ndarray  # uint64 ranking score
    ood_score: np.ndarray | None
    passes: np.ndarray  # bool: >= threshold and not filtered out of domain
    topk_ids: np.ndarray | None = None  # with a correction: the corrected top-k (the soft targets)
    topk_probs: np.ndarray | None = None
    rest: np.ndarray | None = None
    repeats: np.ndarray | None = None  # Selection.rows: times each image appears in the student's stream


@dataclass
class Reading:
    """How a label file's rows become the labels the selection ranks: the threshold, the class weights of the
    prior correction (None: the teacher's probabilities as they are) and the out-of-domain filter."""
    threshold: float
    weights: np.ndarray | None = None
    ood_score: str | None = None  # the score's name (recorded even when it filters nothing)
    ood_cut: float | None = None  # images with a score below it are dropped (None: no filter)
    excluded: dict[str, np.ndarray] | None = None  # label file name -> rows never selected (copies of eval images)

    def rows(self, f: LabelFile) -> Rows:
        kh = f["keyhash"]
        if self.weights is None:
            conf, argmax = f["confidence"].astype(np.float32), f["argmax"].astype(np.int64)
            ids = probs = rest = None
        else:
            ids = f["topk_ids"].astype(np.int64)
            top = f["topk_probs"].astype(np.float32)
            if len(top):
                top[:, 0] = f["confidence"]  # the top-1 as the file keeps it in float32, the rest in float16
            probs, rest = corrected(ids, top, self.weights)
            best = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
            conf = probs[np.arange(len(probs)), best] if len(probs) else np.zeros(0, np.float32)
            argmax = ids[np.arange(len(ids)), best] if len(ids) else np.zeros(0, np.int64)
        passes = conf >= np.float32(self.threshold)  # float32 against the threshold, as every reader compares
        ood = in_domain_score(f, self.ood_score) if self.ood_score else None
        if self.ood_cut is not None:
            passes &= ood >= np.float32(self.ood_cut)
        if self.excluded and f.path.name in self.excluded:
            passes[self.excluded[f.path.name]] = False
        return Rows(conf, argmax, kh, scores(conf, kh), ood, passes, ids, probs, rest)


@dataclass
class Selection:
    threshold: float
    per_class: int | None  # N; None when balancing is off
    counts_before: np.ndarray  # images per class (argmax) that pass the threshold, the filter and the class cut
    base_repeat: np.ndarray  # every kept image of the class is repeated this many times ...
    cut: list[int]  # ... plus once more when its score >= cut (NO_EXTRA: never)
    targets: np.ndarray | None = None  # images per class after balancing (None: counts_before)
    weights: np.ndarray | None = None  # the prior correction's class weights
    ood: dict | None = None  # {"score", "cut", "filter"}: images below cut are dropped when filter
    class_cut: list[int] | None = None  # class_quantile: per class, images with a lower score are dropped
    excluded: dict[str, np.ndarray] | None = None  # label file name -> rows never selected (copies of eval images)
    settings: dict = field(default_factory=dict)  # balance_target, max_repeat, class_quantile, prior (recorded)

    @property
    def reading(self) -> Reading:
        ood = self.ood or {}
        return Reading(self.threshold, self.weights, ood.get("score"), ood.get("cut") if ood.get("filter") else None,
                       self.excluded)

    def rows(self, f: LabelFile) -> Rows:
        """The file's rows with the selection applied: Rows plus .repeats (times each image appears in the
        student's stream, 0 = dropped)."""
        r = self.reading.rows(f)
        keep = r.passes.copy()
        if self.class_cut is not None and len(keep):
            keep &= r.score >= np.array(self.class_cut, dtype=np.uint64)[r.argmax]
        rep = np.where(keep, self.base_repeat[r.argmax], 0).astype(np.int64) if len(keep) else np.zeros(0, np.int64)
        if len(keep):
            cut = np.array([min(c, 2**64 - 1) for c in self.cut], dtype=np.uint64)[r.argmax]
            never = np.array([c == NO_EXTRA for c in self.cut])[r.argmax]
            rep += (keep & ~never & (r.score >= cut)).astype(np.int64)
        r.repeats = rep
        return r

    def repeats(self, f: LabelFile) -> np.ndarray:
        """Times each image of the label file appears in the student's stream (0 = dropped)."""
        return self.rows(f).repeats

    @property
    def corrects_targets(self) -> bool:
        """Whether the soft targets are the corrected probabilities too (pseudolabel.prior_targets), not only
        which images carry which label."""
        return self.weights is not None and bool(self.settings.get("prior_targets", True))

    def target_arrays(self, f: LabelFile, r: Rows | None = None) -> tuple[np.ndarray, ...]:
        """(top-k ids, top-k probabilities, mass outside them or None, label) of every image of the file, as the
        targets are made from them (`targets_from`): the file's own top-k, or corrected like the selection read
        them (prior_targets); `label` is the class the selection gave the image (a hard target's)."""
        if self.weights is None:
            return f["topk_ids"], f["topk_probs"], None, f["argmax"].astype(np.int64)
        r = r or self.reading.rows(f)
        if self.corrects_targets:
            return r.topk_ids, r.topk_probs, r.rest, r.argmax
        return f["topk_ids"], f["topk_probs"], None, r.argmax

    def targets_from(self, ids: np.ndarray, probs: np.ndarray, rest: np.ndarray | None, label: np.ndarray,
                     num_classes: int, hard: bool) -> np.ndarray:
        """[n, C] soft (or hard) targets from rows of `target_arrays`. A hard target is the one-hot of the label the
        selection gave. A soft one is the label file's (labels.soft_targets), or with corrected targets the
        corrected top-k, and the mass outside it spread over the other classes in proportion to their weights."""
        from ..data.labels import soft_targets

        n = len(ids)
        if hard:
            out = np.zeros((n, num_classes), dtype=np.float32)
            out[np.arange(n), label] = 1.0
            return out
        if rest is None:
            return soft_targets(ids, probs, num_classes, hard)
        out = np.zeros((n, num_classes), dtype=np.float32)
        if n == 0:
            return out
        rows = np.arange(n)
        w = np.broadcast_to(self.weights.astype(np.float32), (n, num_classes)).copy()
        w[rows[:, None], ids] = 0.0
        denom = w.sum(axis=1, keepdims=True)
        out += np.divide(rest[:, None] * w, denom, out=np.zeros_like(w), where=denom > 0)
        out[rows[:, None], ids] = probs
        return out / out.sum(axis=1, keepdims=True)

    def counts_after(self) -> np.ndarray:
        if self.targets is not None:
            return np.asarray(self.targets, dtype=np.int64).copy()
        if self.per_class is None:
            return self.counts_before.copy()
        return np.where(self.counts_before > 0, self.per_class, 0)

    def to_json(self) -> dict:
        after = self.counts_after()
        n = np.maximum(self.counts_before, 1)
        return {
            "threshold": self.threshold,
            "per_class": self.per_class,
            "balanced": self.per_class is not None,
            "counts_before": self.counts_before.tolist(),
            "counts_after": after.tolist(),
            "repeat_factor": [float(a / c) if c else 0.0 for a, c in zip(after.tolist(), self.counts_before.tolist())],
            "base_repeat": self.base_repeat.tolist(),
            "cut_score": [int(c) for c in self.cut],
            "mean_repeat": float(after.sum() / n[self.counts_before > 0].sum()) if self.counts_before.sum() else 0.0,
            "class_weights": None if self.weights is None else [float(w) for w in self.weights],
            "ood": self.ood,
            "class_cut_score": None if self.class_cut is None else [int(c) for c in self.class_cut],
            "excluded_rows": {k: v.tolist() for k, v in sorted((self.excluded or {}).items())},
            **self.settings,
        }

    @classmethod
    def from_json(cls, d: dict) -> Selection:
        """A selection.json, this version's or an older one's (which had none of the levers)."""
        weights = d.get("class_weights")
        return cls(float(d["threshold"]), d["per_class"], np.array(d["counts_before"], dtype=np.int64),
                   np.array(d["base_repeat"], dtype=np.int64), [int(c) for c in d["cut_score"]],
                   targets=np.array(d["counts_after"], dtype=np.int64),
                   weights=None if weights is None else np.array(weights, dtype=np.float32),
                   ood=d.get("ood"), class_cut=None if d.get("class_cut_score") is None else
                   [int(c) for c in d["class_cut_score"]],
                   excluded={k: np.array(v, dtype=np.int64) for k, v in d.get("excluded_rows", {}).items()} or None,
                   settings={k: d[k] for k in ("balance_target", "max_repeat", "class_quantile", "prior",
                                               "prior_correction", "prior_targets") if k in d})


@dataclass(frozen=True)
class SelectionSettings:
    """What the selection is asked for (pseudolabel.* keys; checked by `check_settings`)."""
    threshold: float
    balance: bool = True
    per_class: str | int = "auto"
    balance_target: str = "uniform"
    max_repeat: int | None = None
    class_quantile: float = 0.0


def check_settings(s: SelectionSettings) -> None:
    if s.balance_target not in BALANCE_TARGETS:
        raise ConfigError(f"pseudolabel.balance_target={s.balance_target!r}: use one of {', '.join(BALANCE_TARGETS)} "
                          "(uniform: N per class, as the paper; labeled: the labeled set's class shares, measured on "
                          "data.val; estimated: the pool's estimated class shares)")
    if s.max_repeat is not None and (not isinstance(s.max_repeat, int) or isinstance(s.max_repeat, bool)
                                     or s.max_repeat < 1):
        raise ConfigError(f"pseudolabel.max_repeat={s.max_repeat!r}: use null (no cap, as the paper) or an integer "
                          ">= 1 (the most times one image may appear in the student's stream)")
    if not isinstance(s.class_quantile, int | float) or not 0.0 <= float(s.class_quantile) < 1.0:
        raise ConfigError(f"pseudolabel.class_quantile={s.class_quantile!r} must be in [0, 1) (0: off, as the paper; "
                          "q: each class drops its least confident fraction q)")


def _rows(files: Iterable[LabelFile], reading: Reading) -> Iterator[Rows]:
    for f in files:
        yield reading.rows(f)


def class_statistics(files: list[LabelFile], num_classes: int, reading: Reading | float) -> dict:
    """One pass: per-class counts of the images that pass (threshold and filter), a [classes x bins] histogram of
    the (corrected) confidence of every image, and how many images the threshold alone keeps."""
    if not isinstance(reading, Reading):
        reading = Reading(float(reading))
    counts = np.zeros(num_classes, dtype=np.int64)
    above = np.zeros(num_classes, dtype=np.int64)
    hist = np.zeros((num_classes, HIST_BINS), dtype=np.int64)
    seen = 0
    for r in _rows(files, reading):
        conf, cls = r.confidence, r.argmax
        seen += len(conf)
        bins = np.minimum((conf * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        hist += np.bincount(cls * HIST_BINS + bins, minlength=num_classes * HIST_BINS).reshape(num_classes, -1)
        counts += np.bincount(cls[r.passes], minlength=num_classes)
        above += np.bincount(cls[conf >= np.float32(reading.threshold)], minlength=num_classes)
    return {"seen": seen, "counts": counts, "hist": hist, "above_threshold": above}


def resolve_per_class(per_class, counts: np.ndarray) -> int:
    """N: an int, or auto = the mean count over the classes that kept any image (rounded)."""
    if per_class in ("auto", None):
        present = counts[counts > 0]
        return int(round(present.mean())) if len(present) else 0
    try:
        n = int(per_class)
    except (TypeError, ValueError):
        raise ConfigError(f"pseudolabel.per_class={per_class!r}: use auto or a positive integer") from None
    if n < 1:
        raise ConfigError(f"pseudolabel.per_class={per_class!r} must be >= 1")
    return n


def top_k_cuts(files: list[LabelFile], k: np.ndarray, counts: np.ndarray, reading: Reading | float,
               floor: list[int] | None = None) -> list[int]:
    """Per class, the score s such that exactly k[c] of the class's passing images (those at or above `floor[c]`
    where given) score >= s; counts[c]: how many there are.

    Radix selection, 8 bits per pass, most significant first; a class is settled as soon as the
    bucket holding its k-th image is taken whole."""
    if not isinstance(reading, Reading):
        reading = Reading(float(reading))
    num_classes = len(k)
    cut = [NO_EXTRA if k[c] <= 0 else (0 if k[c] >= counts[c] else None) for c in range(num_classes)]
    prefix = np.zeros(num_classes, dtype=np.uint64)
    need = k.astype(np.int64).copy()
    low = None if floor is None else np.array(floor, dtype=np.uint64)
    for shift in range(56, -1, -8):
        active = np.array([c is None for c in cut])
        if not active.any():
            break
        hist = np.zeros((num_classes, 256), dtype=np.int64)
        hi = np.uint64(shift + 8)
        for r in _rows(files, reading):
            m = r.passes & active[r.argmax]
            if low is not None:
                m &= r.score >= low[r.argmax]
            sc, cl = r.score[m], r.argmax[m]
            if shift < 56:
                same = (sc >> hi) == (prefix[cl] >> hi)
                sc, cl = sc[same], cl[same]
            digit = ((sc >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64)
            hist += np.bincount(cl * 256 + digit, minlength=num_classes * 256).reshape(num_classes, 256)
        for c in np.flatnonzero(active):
            above = 0
            for d in range(255, -1, -1):
                if above + hist[c, d] >= need[c]:
                    need[c] -= above
                    prefix[c] |= np.uint64(d) << np.uint64(shift)
                    if need[c] == hist[c, d] or shift == 0:
                        cut[c] = int(prefix[c])
                    break
                above += hist[c, d]
    return [int(c) for c in cut]


def balance_targets(counts: np.ndarray, n: int, target: str, prior: np.ndarray | None,
                    max_repeat: int | None) -> np.ndarray:
    """Images per class after balancing: N for every class that kept any (uniform), or N x those classes shared in
    proportion to `prior` (labeled / estimated; rounded); then at most max_repeat x what the class kept."""
    present = counts > 0
    if target == "uniform" or prior is None:
        out = np.where(present, n, 0).astype(np.int64)
    else:
        share = np.where(present, np.asarray(prior, dtype=np.float64), 0.0)
        total = n * int(present.sum())
        out = np.rint(total * share / share.sum()).astype(np.int64) if share.sum() > 0 else np.zeros_like(counts)
        out = np.where(present, np.maximum(out, 1), 0)  # a class the pool has keeps at least one image
    if max_repeat is not None:
        out = np.minimum(out, counts * int(max_repeat))
    return out


def select(files: list[LabelFile], num_classes: int, threshold: float | SelectionSettings, balance: bool = True,
           per_class="auto", stats: dict | None = None, reading: Reading | None = None,
           prior: np.ndarray | None = None) -> Selection:
    """The selection over `files`. `threshold` is a float (with balance and per_class: the paper's rule) or the
    whole SelectionSettings; `reading`: the prior correction and the out-of-domain filter (default: none);
    `prior`: the class shares a labeled / estimated balance target follows."""
    s = threshold if isinstance(threshold, SelectionSettings) else SelectionSettings(float(threshold), balance,
                                                                                     per_class)
    check_settings(s)
    reading = reading or Reading(s.threshold)
    stats = stats or class_statistics(files, num_classes, reading)
    counts = stats["counts"]
    class_cut = None
    if s.class_quantile > 0:
        keep = np.ceil((1.0 - float(s.class_quantile)) * counts).astype(np.int64)
        class_cut = top_k_cuts(files, keep, counts, reading)
        class_cut = [0 if c == NO_EXTRA else c for c in class_cut]  # a class with nothing: nothing to drop
        counts = np.minimum(keep, counts)
    ood = None if reading.ood_score is None else {"score": reading.ood_score, "cut": reading.ood_cut,
                                                   "filter": reading.ood_cut is not None}
    recorded = {"balance_target": s.balance_target, "max_repeat": s.max_repeat, "class_quantile": s.class_quantile}
    if not s.balance:
        return Selection(s.threshold, None, counts, (counts > 0).astype(np.int64), [NO_EXTRA] * num_classes,
                         targets=counts.copy(), weights=reading.weights, ood=ood, class_cut=class_cut,
                         excluded=reading.excluded, settings=recorded)
    if s.balance_target != "uniform" and prior is None:
        raise ConfigError(f"pseudolabel.balance_target={s.balance_target}: no class prior to follow (the labeled "
                          "set's is measured on data.val; the pool's is the pool estimate's): set data.val, or use "
                          "pseudolabel.balance_target=uniform")
    n = resolve_per_class(s.per_class, counts)
    targets = balance_targets(counts, n, s.balance_target, prior, s.max_repeat)
    safe = np.maximum(counts, 1)
    base = np.where(counts >= targets, 0, targets // safe) * (counts > 0)
    extra = np.where(counts >= targets, targets, targets - base * counts) * (counts > 0)
    cuts = top_k_cuts(files, extra, counts, reading, class_cut)
    return Selection(s.threshold, n, counts, base.astype(np.int64), cuts, targets=targets, weights=reading.weights,
                     ood=ood, class_cut=class_cut, excluded=reading.excluded, settings=recorded)


def effective_thresholds(sel: Selection) -> list[float]:
    """The effective confidence cut of each class: the threshold, or higher where the class cut or balancing keeps
    only the most confident (read off the cut scores' confidence bits)."""
    out = []
    for c in range(len(sel.cut)):
        t = sel.threshold
        if sel.class_cut is not None and sel.class_cut[c]:
            t = max(t, score_confidence(sel.class_cut[c]))
        cut = sel.cut[c]
        if sel.base_repeat[c] == 0 and sel.counts_before[c] and cut < 2**64 and not math.isnan(t):
            t = max(t, score_confidence(cut))
        out.append(t)
    return out
