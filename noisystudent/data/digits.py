"""The embedded demo data: scikit-learn's handwritten digits (ships with sklearn, no download).

Materialized on first use into labeled / unlabeled / eval shards: a stratified eval split, then
`labels_per_class` labeled images per class, the rest unlabeled. The unlabeled shards keep each
image's class in `cls`, as a user holding back part of a labeled set would: training never reads it, the
pseudo-label audit does (how often the teacher's labels are right, per round). Few labels per class
leave the teacher well short of a fully supervised model, which is the gap the students should close."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..files import atomic_write_bytes
from .writer import encode_png, update_manifest, write_shard

log = logging.getLogger(__name__)

SHARDS = {"labeled": 1, "unlabeled": 4, "eval": 2}
DONE = "_MATERIALIZED"


def split_indices(labels: np.ndarray, labels_per_class: int, eval_fraction: float, seed: int) -> dict:
    """Stratified split into eval / labeled / unlabeled index arrays (deterministic in seed)."""
    rng = np.random.default_rng(seed)
    parts = {"labeled": [], "unlabeled": [], "eval": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_eval = int(round(len(idx) * eval_fraction))
        rest = idx[n_eval:]
        if labels_per_class > len(rest):
            raise ConfigError(
                f"data.labels_per_class={labels_per_class} is more than the {len(rest)} images class {c} "
                "has outside the eval split; lower it"
            )
        parts["eval"].append(idx[:n_eval])
        parts["labeled"].append(rest[:labels_per_class])
        parts["unlabeled"].append(rest[labels_per_class:])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def materialize(cfg_data) -> Path:
    """Write the digits shards under cfg_data.root unless they are there already."""
    root = Path(cfg_data.root)
    if (root / DONE).exists():
        return root
    from sklearn.datasets import load_digits

    if not 0 < float(cfg_data.eval_fraction) < 1:
        raise ConfigError(f"data.eval_fraction={cfg_data.eval_fraction} must be in (0, 1)")
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    parts = split_indices(digits.target, int(cfg_data.labels_per_class), float(cfg_data.eval_fraction),
                          int(cfg_data.split_seed))
    counts = {}
    for part, idx in parts.items():
        for s, chunk in enumerate(np.array_split(idx, SHARDS[part])):
            name = f"{part}-{s:06d}.tar"

            def samples(chunk=chunk, part=part):
                for i in chunk:
                    sample = {"__key__": f"digit{i:05d}", "png": encode_png(Image.fromarray(images[i], "L"))}
                    sample["cls"] = str(int(digits.target[i])).encode()  # unlabeled: for the audit only
                    yield sample

            counts[name] = write_shard(root / name, samples())
    # class names beside the labeled shards, where stage=import writes them (export puts them in config.json)
    atomic_write_bytes(root / "classes.json", json.dumps([str(c) for c in range(10)]).encode())
    update_manifest(root, counts, source="sklearn.datasets.load_digits",
                    split={k: int(len(v)) for k, v in parts.items()})
    atomic_write_bytes(root / DONE, b"")
    log.info("digits: wrote %s to %s", {k: len(v) for k, v in parts.items()}, root)
    return root
