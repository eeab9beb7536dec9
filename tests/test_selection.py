"""Confidence filter and class balancing on crafted label files (pure functions, exact counts)."""

from __future__ import annotations

import numpy as np
import pytest

from noisystudent.data.labels import LabelFile, soft_targets, write_label_file
from noisystudent.pseudolabels.selection import NO_EXTRA, class_statistics, scores, select


def _files(tmp_path, conf, cls, n_files=3, topk=2, num_classes=None):
    """Spread (confidence, class) rows over several label files, the way shards would."""
    num_classes = num_classes or int(max(cls)) + 1
    files = []
    keys = [f"img{i:06d}" for i in range(len(conf))]
    for f, idx in enumerate(np.array_split(np.arange(len(conf)), n_files)):
        ids = np.stack([cls[idx], (cls[idx] + 1) % num_classes], axis=1)
        probs = np.stack([conf[idx], (1 - conf[idx]) / 2], axis=1)
        path = tmp_path / f"s{f}.labels.safetensors"
        write_label_file(path, f"s{f}.tar", [keys[i] for i in idx], ids, probs, conf[idx], cls[idx], [],
                         {"num_classes": num_classes, "topk": topk, "temperature": 1.0, "hard": False})
        files.append(LabelFile(path))
    return files, keys


def _repeats(files, sel):
    out = {}
    for f in files:
        rep = sel.repeats(f)
        out.update(zip(f.keys(), rep.tolist()))
    return out


def test_threshold_drops_exactly_the_images_below_it(tmp_path):
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.05, 1.0, 500).astype(np.float32)
    conf[:5] = [0.3, 0.29999998, 0.30000001, 0.1, 0.9]  # at and around the threshold
    cls = rng.integers(0, 4, 500).astype(np.int32)
    files, keys = _files(tmp_path, conf, cls)
    sel = select(files, 4, 0.3, balance=False)
    rep = _repeats(files, sel)
    for k, c in zip(keys, conf):
        assert rep[k] == (1 if c >= np.float32(0.3) else 0), (k, c)
    assert sel.counts_before.tolist() == [int(((conf >= 0.3) & (cls == c)).sum()) for c in range(4)]


def test_balancing_gives_n_per_class_most_confident_kept_rare_repeated(tmp_path):
    rng = np.random.default_rng(1)
    sizes = {0: 300, 1: 57, 2: 25, 3: 10}  # skewed
    cls = np.concatenate([np.full(n, c, np.int32) for c, n in sizes.items()])
    conf = rng.uniform(0.35, 1.0, len(cls)).astype(np.float32)
    conf[:40] = 0.77  # ties inside the big class: broken by key hash, still exact
    files, keys = _files(tmp_path, conf, cls, n_files=5)
    sel = select(files, 4, 0.3, balance=True, per_class=40)
    rep = _repeats(files, sel)
    per_class = {c: sum(rep[k] for k, cc in zip(keys, cls) if cc == c) for c in sizes}
    assert per_class == {0: 40, 1: 40, 2: 40, 3: 40}
    # the big classes keep their most confident images: every kept one is >= every dropped one
    for c in (0, 1):
        kept = [x for k, x, cc in zip(keys, conf, cls) if cc == c and rep[k]]
        dropped = [x for k, x, cc in zip(keys, conf, cls) if cc == c and not rep[k]]
        assert min(kept) >= max(dropped)
        assert all(rep[k] <= 1 for k, cc in zip(keys, cls) if cc == c)
    # 25 images -> N=40: each once, the 15 most confident twice
    c2 = sorted(((x, rep[k]) for k, x, cc in zip(keys, conf, cls) if cc == 2), reverse=True)
    assert [r for _, r in c2] == [2] * 15 + [1] * 10
    # 10 images -> each exactly 4 times
    assert {rep[k] for k, cc in zip(keys, cls) if cc == 3} == {4}
    assert sel.to_json()["counts_after"] == [40, 40, 40, 40]
    # same inputs, same selection
    again = select(files, 4, 0.3, balance=True, per_class=40)
    assert again.cut == sel.cut and _repeats(files, again) == rep


def test_auto_n_and_a_class_with_no_image(tmp_path):
    cls = np.array([0] * 30 + [1] * 10 + [2] * 5, np.int32)
    conf = np.linspace(0.4, 0.99, len(cls)).astype(np.float32)
    conf[cls == 2] = 0.1  # class 2 falls entirely below the threshold
    files, keys = _files(tmp_path, conf, cls, num_classes=4)
    stats = class_statistics(files, 4, 0.3)
    assert stats["counts"].tolist() == [30, 10, 0, 0] and stats["seen"] == 45
    assert stats["hist"].sum() == 45
    sel = select(files, 4, 0.3, balance=True, per_class="auto")
    assert sel.per_class == 20  # mean over the classes that kept any image
    rep = _repeats(files, sel)
    assert sum(rep[k] for k, c in zip(keys, cls) if c == 0) == 20
    assert sum(rep[k] for k, c in zip(keys, cls) if c == 1) == 20
    assert all(rep[k] == 0 for k, c in zip(keys, cls) if c == 2)
    assert sel.cut[2] == NO_EXTRA or sel.counts_before[2] == 0


def test_scores_order_by_confidence_then_hash():
    conf = np.array([0.5, 0.5, 0.9, 0.1], np.float32)
    kh = np.array([1 << 40, 2 << 40, 0, 2**64 - 1], np.uint64)
    s = scores(conf, kh)
    assert s[2] > s[1] > s[0] > s[3]


def test_soft_targets_from_topk():
    ids = np.array([[2, 0], [1, 3]])
    probs = np.array([[0.7, 0.2], [0.5, 0.5]], np.float16)
    t = soft_targets(ids, probs, 4, hard=False)
    assert np.allclose(t.sum(1), 1)
    assert np.allclose(t[0], [0.2, 0.05, 0.7, 0.05], atol=1e-3)  # fp16 storage
    assert np.allclose(t[1], [0, 0.5, 0, 0.5])
    h = soft_targets(ids, probs, 4, hard=True)
    assert h.tolist() == [[0, 0, 1, 0], [0, 1, 0, 0]]


@pytest.mark.parametrize("per_class", [0, "many"])
def test_bad_per_class(tmp_path, per_class):
    from noisystudent.errors import ConfigError

    files, _ = _files(tmp_path, np.full(6, 0.9, np.float32), np.arange(6, dtype=np.int32) % 2)
    with pytest.raises(ConfigError, match="pseudolabel.per_class"):
        select(files, 2, 0.3, balance=True, per_class=per_class)
