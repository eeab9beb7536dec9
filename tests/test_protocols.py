"""The benchmark's pools unlike the labeled set (benchmarks/protocols.py): deterministic, what they say they are,
and a bad setting is an error naming the option and its valid values. On made-up labels: no data set needed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from noisystudent.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import protocols  # noqa: E402

TRAIN = np.repeat(np.arange(10), 1000)  # 10 classes of 1,000 train images, 100 test images each
TEST = np.repeat(np.arange(10), 100)
ARGS = {"pool_size": 2000, "labels_per_class": 20, "val_per_class": 30, "split_seed": 3}


def build(protocol, **kw):
    return protocols.build(TRAIN, TEST, protocol, **{**ARGS, **kw})


@pytest.mark.parametrize("protocol,kw", [("open-set", {"rho": 0.5}), ("long-tail", {"ratio": 10})])
def test_the_same_arguments_give_the_same_images(protocol, kw):
    a, b = build(protocol, **kw), build(protocol, **kw)
    for key, value in a.items():
        assert np.array_equal(value, b[key]) if isinstance(value, np.ndarray) else value == b[key], key
    other = build(protocol, **{**kw, "split_seed": 4})
    assert not np.array_equal(a["pool"], other["pool"]) and not np.array_equal(a["labeled"], other["labeled"])


def test_open_set_pools_share_labeled_val_and_eval_and_mix_unseen_classes_by_rho():
    pools = {rho: build("open-set", rho=rho) for rho in protocols.RHOS}
    known, unseen = list(protocols.KNOWN), [c for c in range(10) if c not in protocols.KNOWN]
    for rho, p in pools.items():
        for key in ("labeled", "val", "eval", "labeled_cls"):
            assert np.array_equal(p[key], pools[0.0][key])  # one teacher serves every pool
        assert p["num_classes"] == 6 and p["classes"] == known
        assert set(TRAIN[p["labeled"]]) == set(known) and np.bincount(p["labeled_cls"]).tolist() == [20] * 6
        assert set(TEST[p["eval"]]) == set(known) and len(p["eval"]) == 600
        assert len(p["pool"]) == 2000 and len(set(p["pool"].tolist())) == 2000
        outside = p["pool_cls"] == -1
        assert outside.sum() == round(rho * 2000) and set(TRAIN[p["pool"][outside]]) <= set(unseen)
        # the known part equally from each known class, remapped to 0..5; the unseen part equally too
        assert np.ptp(np.bincount(p["pool_cls"][~outside], minlength=6)) <= 1
        assert np.ptp(np.bincount(TRAIN[p["pool"][outside]], minlength=10)[unseen]) <= 1
        assert np.array_equal(np.array(known)[p["pool_cls"][~outside]], TRAIN[p["pool"][~outside]])
        # never an image in two sets
        assert not (set(p["pool"]) & set(p["labeled"])) and not (set(p["pool"]) & set(p["val"]))
        assert not (set(p["labeled"]) & set(p["val"]))


def test_long_tail_follows_its_profile_and_ratio_one_is_balanced():
    for ratio in protocols.RATIOS:
        p = build("long-tail", ratio=ratio)
        counts = np.bincount(p["pool_cls"], minlength=10)
        assert counts.sum() == 2000 and counts.tolist() == protocols.tail_profile(10, ratio, 2000).tolist()
        assert np.all(np.diff(counts) <= 0)  # class 0 the head, class 9 the rarest
        assert counts[0] / counts[-1] == pytest.approx(ratio, rel=0.05)
        assert np.bincount(p["labeled_cls"]).tolist() == [20] * 10  # labeled and eval stay balanced
        assert np.bincount(TEST[p["eval"]]).tolist() == [100] * 10
    assert protocols.tail_profile(10, 1, 2000).tolist() == [200] * 10


@pytest.mark.parametrize("kw,match", [
    ({"protocol": "open-set", "rho": 1.0}, r"--rho 1\.0.*\[0, 1\).*0, 0\.25, 0\.5, 0\.75"),
    ({"protocol": "open-set", "rho": -0.1}, r"--rho -0\.1.*\[0, 1\)"),
    ({"protocol": "long-tail", "ratio": 0.5}, r"--ratio 0\.5.*>= 1.*1, 10, 100"),
    ({"protocol": "imbalanced"}, r"--protocol 'imbalanced'.*open-set, long-tail"),
    ({"protocol": "long-tail", "ratio": 100, "pool_size": 20000}, r"--pool-size 20000.*class 0"),
])
def test_a_bad_setting_names_the_option_and_the_valid_values(kw, match):
    protocol = kw.pop("protocol")
    with pytest.raises(ConfigError, match=match):
        build(protocol, **kw)
