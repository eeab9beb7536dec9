"""Unlabeled pools unlike the labeled set, built from one labeled data set (Fashion-MNIST in bench_accuracy.py):
the protocols that measure what a real pool does to self-training. Pure functions of the labels and the seed, so
the same arguments always give the same images (tests/test_protocols.py checks it).

Every protocol splits the train set per class with its own seeded permutation: the first `labels_per_class`
images are labeled, the next `val_per_class` are a held-out validation set (for choices: never trained on, never
reported), the rest may go into the pool. The split does not depend on the pool, so every pool of one protocol
shares its labeled, validation and eval sets, and so its teacher.

- open-set: labels from the `known` classes only (remapped to 0..K-1); an unlabeled pool of `pool_size` images of
  which a fraction `rho` comes from the other (unseen) classes, equally from each, and the rest equally from the
  known classes. Eval and validation hold only the known classes. An unseen image's `cls` in the pool is -1: "of
  no class of this data set" (the pseudo-label audit counts every label given to it as wrong).
- long-tail: every class labeled (balanced); the pool's classes follow an exponential profile, class 0 the most
  frequent and the last class the rarest, n_c proportional to ratio^(-c / (C - 1)), `pool_size` images in all.
  ratio=1 is the balanced pool of the same size.
"""

from __future__ import annotations

import numpy as np

from noisystudent.errors import ConfigError

PROTOCOLS = ("open-set", "long-tail")
# Fashion-MNIST: 0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker, 8 bag,
# 9 ankle boot. The open-set split keeps a top-wear and a footwear class on each side, so the unseen classes are
# near the known ones (coat and shirt look like pullover and T-shirt; sneaker and ankle boot like sandal): the
# hard case for an out-of-domain score, and the one the users meet.
KNOWN = (0, 1, 2, 3, 5, 8)
NAMES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
RHOS = (0.0, 0.25, 0.5, 0.75)
RATIOS = (1.0, 10.0, 100.0)


def check_protocol(protocol: str, rho: float | None = None, ratio: float | None = None) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if protocol == "open-set" and (rho is None or not 0.0 <= float(rho) < 1.0):
        raise ConfigError(f"--rho {rho!r}: the share of the pool from unseen classes must be in [0, 1) "
                          f"(the benchmark's: {', '.join(f'{r:g}' for r in RHOS)})")
    if protocol == "long-tail" and (ratio is None or not float(ratio) >= 1.0):
        raise ConfigError(f"--ratio {ratio!r}: the imbalance ratio (most / least frequent class) must be >= 1 "
                          f"(the benchmark's: {', '.join(f'{r:g}' for r in RATIOS)}; 1 = balanced)")


def spread(total: int, weights) -> np.ndarray:
    """`total` split in proportion to `weights`, rounded so the parts sum to it exactly (largest remainders,
    ties to the earlier part)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    rest = total - int(out.sum())
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:rest]] += 1
    return out


def tail_profile(num_classes: int, ratio: float, total: int) -> np.ndarray:
    """Images per class of an exponential long tail: class 0 the head, n_0 / n_{C-1} = ratio, summing to total."""
    return spread(total, float(ratio) ** (-np.arange(num_classes) / max(num_classes - 1, 1)))


def class_split(train_labels: np.ndarray, classes, labels_per_class: int, val_per_class: int,
                split_seed: int) -> dict[int, dict[str, np.ndarray]]:
    """Per class: its labeled, validation and remaining train indices, from a permutation seeded by
    (split_seed, class): the same for every pool."""
    out = {}
    for c in classes:
        idx = np.flatnonzero(train_labels == c)
        perm = np.random.default_rng([split_seed, int(c)]).permutation(idx)
        need = labels_per_class + val_per_class
        if len(perm) < need:
            raise ConfigError(f"class {c} has {len(perm)} train images, fewer than --labels-per-class "
                              f"{labels_per_class} + --val-per-class {val_per_class}")
        out[int(c)] = {"labeled": perm[:labels_per_class], "val": perm[labels_per_class:need], "rest": perm[need:]}
    return out


def build(train_labels: np.ndarray, test_labels: np.ndarray, protocol: str, *, rho: float | None = None,
          ratio: float | None = None, pool_size: int, labels_per_class: int, val_per_class: int, split_seed: int,
          known=KNOWN) -> dict:
    """The protocol's sets as index arrays into the train (labeled, val, pool, full) and test (eval) images, with
    the class each sample is written with ("*_cls"; -1 in the pool: of no class of this data set), and
    "num_classes", "classes" (original class of each new label), "pool_counts" (original class -> images)."""
    check_protocol(protocol, rho, ratio)
    all_classes = sorted(int(c) for c in np.unique(train_labels))
    classes = [int(c) for c in known] if protocol == "open-set" else all_classes
    if protocol == "open-set" and (len(set(classes)) != len(classes) or not set(classes) < set(all_classes)):
        raise ConfigError(f"--known {classes}: name distinct classes of the data set, leaving at least one unseen")
    new_id = {c: i for i, c in enumerate(classes)}
    unseen = [c for c in all_classes if c not in new_id]
    split = class_split(train_labels, all_classes, labels_per_class, val_per_class, split_seed)
    if protocol == "open-set":
        n_out = int(round(float(rho) * pool_size))
        counts = dict(zip(classes, spread(pool_size - n_out, np.ones(len(classes))).tolist(), strict=True))
        counts.update(zip(unseen, spread(n_out, np.ones(len(unseen))).tolist(), strict=True))
    else:
        counts = dict(zip(classes, tail_profile(len(classes), float(ratio), pool_size).tolist(), strict=True))
    pool, pool_cls = [], []
    for c, n in counts.items():
        rest = split[c]["rest"] if c in new_id else np.concatenate([split[c][k] for k in ("labeled", "val", "rest")])
        if n > len(rest):
            raise ConfigError(f"--pool-size {pool_size}: the pool needs {n} images of class {c}, which has "
                              f"{len(rest)} left after the labeled and validation images; use a smaller pool")
        pool.append(rest[:n])
        pool_cls.append(np.full(n, new_id.get(c, -1), dtype=np.int64))
    pool, pool_cls = np.concatenate(pool), np.concatenate(pool_cls)
    order = np.random.default_rng([split_seed, 7919]).permutation(len(pool))  # classes mixed across shards

    def labeled_set(part: str) -> tuple[np.ndarray, np.ndarray]:
        idx = np.sort(np.concatenate([split[c][part] for c in classes]))
        return idx, np.array([new_id[int(c)] for c in train_labels[idx]], dtype=np.int64)

    (lab, lab_cls), (val, val_cls) = labeled_set("labeled"), labeled_set("val")
    ev = np.flatnonzero(np.isin(test_labels, classes))
    full = np.flatnonzero(np.isin(train_labels, classes))
    return {"num_classes": len(classes), "classes": classes, "unseen": unseen,
            "labeled": lab, "labeled_cls": lab_cls, "val": val, "val_cls": val_cls,
            "pool": pool[order], "pool_cls": pool_cls[order],
            "pool_counts": {int(c): int(n) for c, n in counts.items()},
            "eval": ev, "eval_cls": np.array([new_id[int(c)] for c in test_labels[ev]], dtype=np.int64),
            "full": full, "full_cls": np.array([new_id[int(c)] for c in train_labels[full]], dtype=np.int64)}


def pool_tag(protocol: str, rho: float | None, ratio: float | None, pool_size: int) -> str:
    return f"rho{float(rho):g}-n{pool_size}" if protocol == "open-set" else f"ratio{float(ratio):g}-n{pool_size}"
