"""What is in the unlabeled pool, without its labels: the classes it holds and how much of it looks out of domain.

Read from the label files of one pseudolabel step, streamed (one file in memory at a time), and from the label
files of a held-out labeled set the same teacher labeled (data.val, "the reference"), where there is one:

- **out of domain**: every image has scores of the teacher's logits (label files format 2): energy (Liu et al.
  2020), max logit, or the maximum softmax probability (msp). The cut-off is the `quantile` of the reference's
  scores: it gives up that share of in-domain images. The pool's share below the cut-off, b, overstates the
  out-of-domain share by the in-domain images below it; if in-domain images fall below as often in the pool as in
  the reference, at least (b - q) / (1 - q) of the pool is out of domain (a lower bound: the out-of-domain images
  above the cut-off are not counted). Without a reference there is no cut-off and no count: only the ranking.
- **the class distribution**, over the images above the cut-off: the teacher's predictions as they are; corrected
  by its confusion on the reference (`confusion`: the class prior pi that best explains the predicted shares
  q = M pi, M[i, j] = P(predicted i | class j) on the reference, found by maximum likelihood, so it stays a
  distribution: BBSE (Lipton et al. 2018) without its negative shares); and without labels (`em`: Saerens et al.
  2002, the prior that makes the teacher's prior-adjusted posteriors average to it), on a sample of at most
  `em_images` images chosen by key hash (the same images whatever the order or number of processes).

The estimate the selection uses (`prior`: auto = confusion with a reference, else em) turns into class weights
w_c = pi_c / pi_train(c) (pi_train: the reference's class shares, else uniform), which selection.py applies to the
teacher's probabilities (p'(c|x) ~ p(c|x) w_c) when pseudolabel.prior_correction is on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..data.labels import LabelFile
from ..errors import ConfigError
from .selection import OOD_SCORES, in_domain_score

log = logging.getLogger(__name__)

PRIORS = ("auto", "confusion", "em")
EM_IMAGES = 200_000  # images in the EM sample: its standard error per class share is under 0.002
EM_ITERATIONS = 300
SHARE_FLOOR = 0.01  # no class's estimated share is taken below this fraction of a uniform share (1 / C)
PLOT_SCORES = 20_000  # scores kept for the plot's histograms (a key-hash sample, like EM's)


@dataclass(frozen=True)
class PoolSettings:
    score: str = "energy"  # pseudolabel.ood.score
    quantile: float = 0.05  # pseudolabel.ood.quantile
    prior: str = "auto"  # pseudolabel.prior


def check_pool_settings(s: PoolSettings) -> None:
    if s.score not in OOD_SCORES:
        raise ConfigError(f"pseudolabel.ood.score={s.score!r}: use one of {', '.join(OOD_SCORES)} (energy: the "
                          "logits' logsumexp; max_logit; msp: the teacher's confidence)")
    if not isinstance(s.quantile, int | float) or not 0.0 < float(s.quantile) < 0.5:
        raise ConfigError(f"pseudolabel.ood.quantile={s.quantile!r} must be in (0, 0.5): the share of data.val's "
                          "images the out-of-domain cut-off gives up (e.g. 0.05)")
    if s.prior not in PRIORS:
        raise ConfigError(f"pseudolabel.prior={s.prior!r}: use one of {', '.join(PRIORS)} (auto: confusion with "
                          "data.val, else em)")


@dataclass
class Reference:
    """The held-out labeled images as this round's teacher labeled them."""
    source: str
    confusion: np.ndarray  # [predicted, true] counts of the images at or above the cut-off
    class_counts: np.ndarray  # [true] every image's class
    scores: np.ndarray  # the out-of-domain score of every image (for the cut-off and the plot)
    cutoff: float

    @property
    def images(self) -> int:
        return int(self.class_counts.sum())


def reference_from_files(files: list[LabelFile], num_classes: int, s: PoolSettings, source: str) -> Reference | None:
    """The reference from the label files of a labeled set (their `cls`), or None when none has a class. Holds
    one score per image: a held-out set is small next to a pool (50,000 ImageNet images: 200 KB)."""
    truth, pred, score = [], [], []
    for f in files:
        if not f.has("cls"):
            continue
        t = f["cls"].astype(np.int64)
        ok = (t >= 0) & (t < num_classes)
        truth.append(t[ok])
        pred.append(f["argmax"].astype(np.int64)[ok])
        score.append(in_domain_score(f, s.score)[ok])
    if not truth or not sum(len(t) for t in truth):
        return None
    truth, pred, score = np.concatenate(truth), np.concatenate(pred), np.concatenate(score).astype(np.float32)
    cutoff = float(np.quantile(score, float(s.quantile), method="lower"))
    inside = score >= np.float32(cutoff)
    confusion = np.bincount(pred[inside] * num_classes + truth[inside],
                            minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return Reference(source, confusion, np.bincount(truth, minlength=num_classes), np.sort(score), cutoff)


def confusion_prior(confusion: np.ndarray, predicted: np.ndarray, iterations: int = 2000) -> np.ndarray:
    """The class prior pi maximising the likelihood of the predicted counts under q = M pi (M: P(predicted |
    class) from the confusion counts, each class's column lightly smoothed toward uniform so a class the reference
    never confused still explains what it may), by the EM's multiplicative updates (pi stays a distribution)."""
    c = confusion.shape[0]
    if predicted.sum() == 0:  # no image to explain (every shard unreadable, or all below the cut-off)
        return np.full(c, 1.0 / c)
    n = confusion.sum(axis=0).astype(np.float64)
    m = (confusion + 0.5 / c) / (n + 0.5)[None, :]
    q = predicted.astype(np.float64) / max(predicted.sum(), 1)
    pi = np.full(c, 1.0 / c)
    for _ in range(iterations):
        mix = m @ pi
        new = pi * (m.T @ np.divide(q, mix, out=np.zeros_like(q), where=mix > 0))
        new /= new.sum()
        if np.abs(new - pi).max() < 1e-9:
            return new
        pi = new
    return pi


def em_prior(ids: np.ndarray, probs: np.ndarray, train_prior: np.ndarray,
             iterations: int = EM_ITERATIONS) -> np.ndarray:
    """Saerens et al. (2002): the prior pi that the teacher's posteriors, adjusted by pi / train_prior and
    renormalised, average to; from each image's top-k probabilities (the rest of its mass spread evenly over the
    other classes, as the label files keep it)."""
    n, k = ids.shape
    c = len(train_prior)
    if n == 0:
        return np.asarray(train_prior, dtype=np.float64).copy()
    p = probs.astype(np.float64)
    rest = np.clip(1.0 - p.sum(axis=1), 0.0, None) / max(c - k, 1)  # each other class's probability
    pi = np.asarray(train_prior, dtype=np.float64).copy()
    for _ in range(iterations):
        w = pi / train_prior
        top = p * w[ids]
        z = top.sum(axis=1) + rest * (w.sum() - w[ids].sum(axis=1))
        top /= z[:, None]
        r = rest / z
        # mass per class: the top-k's, plus every image's rest share for each class outside its top k
        mass = np.bincount(ids.ravel(), top.ravel(), minlength=c)
        mass += w * (r.sum() - np.bincount(ids.ravel(), np.repeat(r, k), minlength=c))
        new = mass / n
        new /= new.sum()
        if np.abs(new - pi).max() < 1e-9:
            return new
        pi = new
    return pi


def estimate(files: list[LabelFile], num_classes: int, s: PoolSettings, reference: Reference | None) -> dict:
    """The pool estimate (summary.json's `pool`; the module's docstring): one pass over the pool's label files."""
    check_pool_settings(s)
    c = num_classes
    total = sum(int(f.meta.get("images", 0)) for f in files)
    # the EM and plot samples: images whose key hash falls under a fixed fraction of the hash range
    frac_em = min(1.0, EM_IMAGES / max(total, 1))
    frac_plot = min(1.0, PLOT_SCORES / max(total, 1))
    cut = None if reference is None else np.float32(reference.cutoff)
    predicted = np.zeros(c, np.int64)
    below_by_class = np.zeros(c, np.int64)
    ids_s, probs_s, plot_scores = [], [], []
    for f in files:
        n = int(f.meta.get("images", 0))
        if not n:
            continue
        argmax = f["argmax"].astype(np.int64)
        score = in_domain_score(f, s.score)
        below = score < cut if cut is not None else np.zeros(n, bool)
        below_by_class += np.bincount(argmax[below], minlength=c)
        inside = ~below
        predicted += np.bincount(argmax[inside], minlength=c)
        kh = f["keyhash"]
        em = inside & (kh.astype(np.float64) < frac_em * 2.0**64)
        if em.any():
            ids_s.append(f["topk_ids"][em].astype(np.int64))
            probs_s.append(f["topk_probs"][em].astype(np.float32))
        plot_scores.append(score[kh.astype(np.float64) < frac_plot * 2.0**64])
    train_prior = (reference.class_counts / reference.class_counts.sum() if reference is not None
                   and reference.class_counts.all() else np.full(c, 1.0 / c))
    k = ids_s[0].shape[1] if ids_s else 1
    em = em_prior(np.concatenate(ids_s) if ids_s else np.zeros((0, k), np.int64),
                  np.concatenate(probs_s) if probs_s else np.zeros((0, k), np.float32), train_prior)
    estimates = {"em": em.tolist()}
    if reference is not None:
        estimates["confusion"] = confusion_prior(reference.confusion, predicted).tolist()
    method = s.prior if s.prior != "auto" else ("confusion" if reference is not None else "em")
    if method not in estimates:
        raise ConfigError("pseudolabel.prior=confusion needs held-out labeled images to measure the teacher's "
                          "confusion on: set data.val, or use pseudolabel.prior=em (or auto)")
    share = np.asarray(estimates[method])
    floored = np.maximum(share, SHARE_FLOOR / c)
    weights = floored / floored.sum() / train_prior
    n_in = int(predicted.sum())
    below_total = int(below_by_class.sum())
    ood = {"score": s.score, "quantile": float(s.quantile), "cutoff": None if cut is None else float(cut),
           "cutoff_from": None if reference is None else reference.source,
           "below_cutoff": below_total if cut is not None else None,
           "share_below": below_total / total if cut is not None and total else None,
           "per_class_below": below_by_class.tolist() if cut is not None else None, "share_estimate": None}
    if cut is not None and total:
        b, q = below_total / total, float(s.quantile)
        ood["share_estimate"] = max(0.0, (b - q) / (1.0 - q))
    return {"images": total, "images_in_domain": n_in, "reference": None if reference is None else reference.source,
            "reference_images": None if reference is None else reference.images,
            "predicted": predicted.tolist(), "predicted_share": (predicted / max(n_in, 1)).tolist(),
            "estimates": estimates, "method": method, "estimated_share": share.tolist(),
            "train_prior": train_prior.tolist(), "class_weights": weights.tolist(), "ood": ood,
            "em_images": int(sum(len(x) for x in ids_s)),
            "_plot": {"pool_scores": np.concatenate(plot_scores) if plot_scores else np.zeros(0, np.float32),
                      "reference_scores": None if reference is None else reference.scores}}


def plot_pool(path, pool: dict, class_names: list[str] | None = None) -> None:
    """pool.png: the pool's classes as the teacher predicted them and as estimated, and the out-of-domain score of
    the pool against the reference's, with the cut-off."""
    from ..reporting.plots import pct, pyplot, save_png

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4), dpi=110)
    c = len(pool["predicted_share"])
    x = np.arange(c)
    a.bar(x - 0.2, np.array(pool["predicted_share"]) * 100, 0.4, label="predicted by the teacher")
    a.bar(x + 0.2, np.array(pool["estimated_share"]) * 100, 0.4, label=f"estimated ({pool['method']})")
    a.set_xlabel("class")
    a.set_ylabel("share of the in-domain pool (%)")
    if class_names and c <= 20:
        a.set_xticks(x, class_names, rotation=45, ha="right", fontsize=7)
    a.legend(fontsize=7)
    a.set_title(f"{pool['images_in_domain']:,} images above the out-of-domain cut-off", fontsize=8)
    ood, plot = pool["ood"], pool["_plot"]
    ref = plot["reference_scores"]
    sample = plot["pool_scores"]
    both = np.concatenate([sample] + ([ref] if ref is not None else [])) if len(sample) else ref
    if both is not None and len(both):
        bins = np.linspace(float(np.min(both)), float(np.max(both)), 50)
        b.hist(sample, bins=bins, density=True, alpha=0.5, label="pool (a sample)")
        if ref is not None:
            b.hist(ref, bins=bins, density=True, histtype="step", lw=1.5, label=f"{pool['reference']} (held out)")
    if ood["cutoff"] is not None:
        b.axvline(ood["cutoff"], color="r", ls="--",
                  label=f"cut-off ({100 * ood['quantile']:g}% of {ood['cutoff_from']})")
        title = (f"{pct(ood['share_below'])} of the pool below the cut-off: at least {pct(ood['share_estimate'])} "
                 "out of domain")
    else:
        title = "no held-out set (data.val): no cut-off"
    b.set_title(title, fontsize=8)
    b.set_xlabel(f"out-of-domain score ({ood['score']}; higher = more like the labeled images)")
    b.set_ylabel("density")
    b.legend(fontsize=7)
    save_png(fig, path)
