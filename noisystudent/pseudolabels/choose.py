"""One pseudolabel step's choice of images, from its label files: first what is in the pool (pool.py: the class
distribution and the out-of-domain cut-off, measured against the held-out reference where there is one), then the
selection (selection.py) with the levers the policy turns on. Runs on the main process; every pass streams the
label files."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.labels import LabelFile
from ..errors import ConfigError
from .pool import PoolSettings, check_pool_settings, estimate, reference_from_files
from .selection import Reading, Selection, SelectionSettings, check_settings, class_statistics, select


@dataclass(frozen=True)
class Policy:
    """The pseudolabel.* keys that decide which images the student sees."""
    selection: SelectionSettings
    pool: PoolSettings
    prior_correction: bool | str  # the teacher's probabilities corrected for the pool's estimated prior; auto: where
    # there is a held-out reference (the estimate is then the confusion-corrected one)
    ood_filter: bool  # images below the out-of-domain cut-off dropped
    prior_targets: bool = False  # the soft targets corrected too (else only which images carry which label)


def check_policy(p: Policy) -> None:
    check_settings(p.selection)
    check_pool_settings(p.pool)
    if not isinstance(p.prior_targets, bool):
        raise ConfigError(f"pseudolabel.prior_targets={p.prior_targets!r}: use true or false")
    if p.prior_correction not in (True, False, "auto"):
        raise ConfigError(f"pseudolabel.prior_correction={p.prior_correction!r}: use auto (on where data.val is set), "
                          "true or false")


def choose(files: list[LabelFile], reference_files: list[LabelFile], num_classes: int, policy: Policy,
           reference_source: str = "data.val", excluded: dict[str, np.ndarray] | None = None
           ) -> tuple[Selection, dict, dict]:
    """(the selection, the pool estimate, the class statistics of the selection's first pass). `excluded`: label
    file name -> rows never selected (copies of eval images: copies.py)."""
    check_policy(policy)
    reference = reference_from_files(reference_files, num_classes, policy.pool, reference_source)
    if policy.ood_filter and reference is None:
        raise ConfigError("pseudolabel.ood.filter=true places its cut-off on held-out labeled images, and there are "
                          f"none: set data.val (labeled shards, never trained on; {reference_source} held no image "
                          "with a class), or set pseudolabel.ood.filter=false")
    if policy.selection.balance_target == "labeled" and (reference is None or not reference.class_counts.all()):
        raise ConfigError("pseudolabel.balance_target=labeled follows the labeled set's class shares, measured on "
                          "data.val, which holds no image of some class (or is not set): set data.val, or use "
                          "pseudolabel.balance_target=uniform")
    pool = estimate(files, num_classes, policy.pool, reference)
    correct = policy.prior_correction is True or (policy.prior_correction == "auto" and reference is not None)
    weights = np.array(pool["class_weights"], dtype=np.float32) if correct else None
    reading = Reading(policy.selection.threshold, weights, policy.pool.score,
                      pool["ood"]["cutoff"] if policy.ood_filter else None, excluded or None)
    prior = {"uniform": None, "labeled": pool["train_prior"],
             "estimated": pool["estimated_share"]}[policy.selection.balance_target]
    stats = class_statistics(files, num_classes, reading)
    sel = select(files, num_classes, policy.selection, stats=stats, reading=reading, prior=prior)
    sel.settings["prior_correction"] = correct
    sel.settings["prior_targets"] = bool(policy.prior_targets)
    sel.settings["prior"] = pool["method"]
    return sel, pool, stats
