"""Confidence filter + class balancing, from per-class statistics streamed over label files.

Rule (the paper's): drop images whose confidence is below `threshold`; then every class gets N
images: a class with more keeps its N most confident, a class with fewer has each image repeated
floor(N / n) times and its (N mod n) most confident images once more.

"Most confident" is ranked by a 64-bit score: the confidence's float32 bits, then a hash of the
key, so ties break deterministically and the same inputs always give the same selection.
The cut score of each class (the k-th largest score) is found by radix selection: a few passes
over the label files, each building a [classes x 256] histogram of the next 8 bits. Memory holds
one label file and these histograms, never anything per image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..data.labels import LabelFile
from ..errors import ConfigError

log = logging.getLogger(__name__)

HIST_BINS = 50
NO_EXTRA = 2**64  # a cut above every uint64 score: no image gets the extra repeat


def scores(confidence: np.ndarray, keyhash: np.ndarray) -> np.ndarray:
    """Order-preserving uint64: float32 confidence bits (non-negative floats sort as their bits), then
    the top 32 bits of the key hash."""
    conf_bits = np.ascontiguousarray(confidence, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (conf_bits << np.uint64(32)) | (keyhash.astype(np.uint64) >> np.uint64(32))


@dataclass
class Selection:
    threshold: float
    per_class: int | None  # N; None when balancing is off
    counts_before: np.ndarray  # images per class (argmax) above the threshold
    base_repeat: np.ndarray  # every kept image of the class is repeated this many times ...
    cut: list[int]  # ... plus once more when its score >= cut (NO_EXTRA: never)

    def repeats(self, confidence: np.ndarray, argmax: np.ndarray, keyhash: np.ndarray) -> np.ndarray:
        """Times each image appears in the student's stream (0 = dropped)."""
        keep = confidence >= self.threshold
        rep = np.where(keep, self.base_repeat[argmax], 0).astype(np.int64)
        if len(confidence):
            sc = scores(confidence, keyhash)
            cut = np.array([min(c, 2**64 - 1) for c in self.cut], dtype=np.uint64)[argmax]
            never = np.array([c == NO_EXTRA for c in self.cut])[argmax]
            rep += (keep & ~never & (sc >= cut)).astype(np.int64)
        return rep

    def counts_after(self) -> np.ndarray:
        if self.per_class is None:
            return self.counts_before.copy()
        return np.where(self.counts_before > 0, self.per_class, 0)

    def to_json(self) -> dict:
        n = np.maximum(self.counts_before, 1)
        return {
            "threshold": self.threshold,
            "per_class": self.per_class,
            "balanced": self.per_class is not None,
            "counts_before": self.counts_before.tolist(),
            "counts_after": self.counts_after().tolist(),
            "repeat_factor": [(float(self.per_class / c) if self.per_class and c else (1.0 if c else 0.0))
                              for c in self.counts_before.tolist()],
            "base_repeat": self.base_repeat.tolist(),
            "cut_score": [int(c) for c in self.cut],
            "mean_repeat": float(self.counts_after().sum() / n.sum()) if self.counts_before.sum() else 0.0,
        }

    @classmethod
    def from_json(cls, d: dict) -> Selection:
        return cls(float(d["threshold"]), d["per_class"], np.array(d["counts_before"], dtype=np.int64),
                   np.array(d["base_repeat"], dtype=np.int64), [int(c) for c in d["cut_score"]])


def _arrays(files: Iterable[LabelFile]):
    for f in files:
        yield f["confidence"], f["argmax"].astype(np.int64), f["keyhash"]


def class_statistics(files: list[LabelFile], num_classes: int, threshold: float) -> dict:
    """One pass: per-class counts above the threshold and a [classes x bins] confidence histogram."""
    counts = np.zeros(num_classes, dtype=np.int64)
    hist = np.zeros((num_classes, HIST_BINS), dtype=np.int64)
    seen = 0
    for conf, cls, _ in _arrays(files):
        seen += len(conf)
        bins = np.minimum((conf * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        hist += np.bincount(cls * HIST_BINS + bins, minlength=num_classes * HIST_BINS).reshape(num_classes, -1)
        counts += np.bincount(cls[conf >= threshold], minlength=num_classes)
    return {"seen": seen, "counts": counts, "hist": hist}


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


def top_k_cuts(files: list[LabelFile], k: np.ndarray, counts: np.ndarray, threshold: float) -> list[int]:
    """Per class, the score s such that exactly k[c] images of class c above the threshold score >= s.

    Radix selection, 8 bits per pass, most significant first; a class is settled as soon as the
    bucket holding its k-th image is taken whole."""
    num_classes = len(k)
    cut = [NO_EXTRA if k[c] <= 0 else (0 if k[c] >= counts[c] else None) for c in range(num_classes)]
    prefix = np.zeros(num_classes, dtype=np.uint64)
    need = k.astype(np.int64).copy()
    for shift in range(56, -1, -8):
        active = np.array([c is None for c in cut])
        if not active.any():
            break
        hist = np.zeros((num_classes, 256), dtype=np.int64)
        hi = np.uint64(shift + 8)
        for conf, cls, kh in _arrays(files):
            m = (conf >= threshold) & active[cls]
            sc, cl = scores(conf[m], kh[m]), cls[m]
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


def select(files: list[LabelFile], num_classes: int, threshold: float, balance: bool, per_class="auto",
           stats: dict | None = None) -> Selection:
    stats = stats or class_statistics(files, num_classes, threshold)
    counts = stats["counts"]
    if not balance:
        return Selection(threshold, None, counts, (counts > 0).astype(np.int64), [NO_EXTRA] * num_classes)
    n = resolve_per_class(per_class, counts)
    safe = np.maximum(counts, 1)
    base = np.where(counts >= n, 0, n // safe) * (counts > 0)
    extra = np.where(counts >= n, n, n - base * counts) * (counts > 0)
    cuts = top_k_cuts(files, extra, counts, threshold)
    return Selection(threshold, n, counts, base.astype(np.int64), cuts)
