"""stage=pseudolabel end to end: files per shard, resumability, 1 vs 2 processes, bad input."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import FAST, accelerate_launch, cli, run

from noisystudent.data.labels import LabelFile
from noisystudent.data.writer import write_shard
from noisystudent.errors import ConfigError, DataError, MissingInputError
from noisystudent.files import read_json


def _label_files(run_dir: Path) -> dict[str, bytes]:
    d = run_dir / "round_1" / "pseudolabel" / "labels"
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.labels.safetensors"))}


def _args(run_dir, digits_root, *extra):
    return ["stage=pseudolabel", f"run_dir={run_dir}", f"data.root={digits_root}", *FAST, *extra]


def test_label_files_per_shard_in_shard_order(teacher_copy, digits_root):
    s = run(*_args(teacher_copy, digits_root))
    out = teacher_copy / "round_1" / "pseudolabel"
    assert (out / "_SUCCESS").exists() and (out / "selection.png").exists()
    assert s["images_seen"] == 1158 and s["shards_labeled"] == 4 and s["corrupt_skipped"] == 0
    assert s["images_kept_by_threshold"] == sum(s["counts_before"])
    assert s["images_after_balancing"] == s["per_class"] * sum(1 for c in s["counts_before"] if c)
    for key in ("repeat_factor", "per_class_threshold", "images_per_sec", "wall_s", "confidence_histogram"):
        assert key in s
    for i in range(4):
        shard = str(digits_root / f"unlabeled-{i:06d}.tar")
        f = LabelFile(out / "labels" / f"unlabeled-{i:06d}.labels.safetensors")
        keys = [x["__key__"] for x in wds.WebDataset(shard, shardshuffle=False)]
        assert f.keys() == keys  # every image, in shard order
        ids, probs = f["topk_ids"], f["topk_probs"]
        assert ids.shape == (len(keys), 5) and probs.dtype == np.float16
        assert np.all(np.diff(probs.astype(np.float32), axis=1) <= 0)  # sorted top-k
        assert np.array_equal(f["argmax"], ids[:, 0])
        assert np.allclose(f["confidence"], probs[:, 0], atol=1e-3)
        assert f.meta["shard"] == shard
    # images are never copied: the stage wrote labels only
    assert not list(out.rglob("*.tar")) and sorted(p.name for p in out.rglob("*.png")) == [
        "audit.png", "classes-1.png", "out_of_domain.png", "pool.png", "rejected.png", "selection.png"]


def test_hard_labels_and_temperature(teacher_copy, digits_root):
    run(*_args(teacher_copy, digits_root, "pseudolabel.hard=true", "pseudolabel.temperature=2.0",
               "pseudolabel.balance=false"))
    f = LabelFile(teacher_copy / "round_1/pseudolabel/labels/unlabeled-000000.labels.safetensors")
    assert f.hard and f.meta["temperature"] == "2.0"
    sel = read_json(teacher_copy / "round_1/pseudolabel/selection.json")
    assert sel["balanced"] is False and sel["counts_after"] == sel["counts_before"]


def test_rerun_after_lost_shards_gives_identical_files(teacher_copy, digits_root, tmp_path):
    run(*_args(teacher_copy, digits_root))
    reference = _label_files(teacher_copy)
    labels = teacher_copy / "round_1" / "pseudolabel" / "labels"
    # a crash: two shards never finished, one write was in flight, the step has no marker
    (labels / "unlabeled-000001.labels.safetensors").unlink()
    (labels / "unlabeled-000003.labels.safetensors").rename(labels / ".unlabeled-000003.labels.safetensors.x.tmp")
    (teacher_copy / "round_1" / "pseudolabel" / "_SUCCESS").unlink()
    s = run(*_args(teacher_copy, digits_root))
    assert 0 < s["images_labeled_this_run"] < 1158  # only the two lost shards were labeled again
    assert _label_files(teacher_copy) == reference


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(teacher_copy, digits_root, tmp_path):
    """A real kill mid-labeling (small batches so it takes a while), then a rerun."""
    reference_run = tmp_path / "reference"
    shutil.copytree(teacher_copy, reference_run)
    run(*_args(reference_run, digits_root, "pseudolabel.batch_size=4", "num_workers=0"))
    args = _args(teacher_copy, digits_root, "pseudolabel.batch_size=4", "num_workers=0")
    proc = subprocess.Popen([sys.executable, "-m", "noisystudent", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    labels = teacher_copy / "round_1" / "pseudolabel" / "labels"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(labels.glob("*.labels.safetensors")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (teacher_copy / "round_1" / "pseudolabel" / "_SUCCESS").exists()
    partial = _label_files(teacher_copy)
    assert len(partial) < 4
    run(*args)
    assert _label_files(teacher_copy) == _label_files(reference_run)
    assert (read_json(teacher_copy / "round_1/pseudolabel/selection.json")
            == read_json(reference_run / "round_1/pseudolabel/selection.json"))


@pytest.mark.slow
def test_two_processes_write_what_one_does(teacher_copy, digits_root, tmp_path):
    """... with a held-out reference and the levers for real pools on: the same label files, pool estimate and
    selection, whatever the number of processes."""
    levers = [f"data.val='{digits_root}/eval-{{000000..000001}}.tar'", "pseudolabel.prior_correction=true",
              "pseudolabel.ood.filter=true", "pseudolabel.max_repeat=3", "pseudolabel.class_quantile=0.1"]
    one = tmp_path / "one"
    shutil.copytree(teacher_copy, one)
    run(*_args(one, digits_root, *levers))
    launcher = accelerate_launch()
    proc = cli(*_args(teacher_copy, digits_root, *levers), launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _label_files(teacher_copy) == _label_files(one)
    val = [sorted((d / "round_1/pseudolabel/val").glob("*")) for d in (teacher_copy, one)]
    assert len(val[0]) == 2 and [p.read_bytes() for p in val[0]] == [p.read_bytes() for p in val[1]]
    sel = read_json(teacher_copy / "round_1/pseudolabel/selection.json")
    assert sel == read_json(one / "round_1/pseudolabel/selection.json")
    assert sel["prior_correction"] and sel["ood"]["filter"] and sel["class_cut_score"] and sel["max_repeat"] == 3
    summary = read_json(teacher_copy / "round_1/pseudolabel/summary.json")
    assert summary["pool"] == read_json(one / "round_1/pseudolabel/summary.json")["pool"]
    assert summary["images_seen"] == 1158 and summary["processes"] == 2
    assert summary["images_labeled_this_run"] == 1158 + 539  # each shard labeled once, by one of the two


def test_no_finished_teacher(tmp_path, digits_root):
    with pytest.raises(MissingInputError, match=r"teacher.*stage=teacher run_dir="):
        run(*_args(tmp_path, digits_root))
    proc = cli(*_args(tmp_path, digits_root), "round=2")
    assert proc.returncode == 2 and "round_1/student" in proc.stderr and "stage=student" in proc.stderr


def test_teacher_classes_differ(teacher_copy, digits_root):
    with pytest.raises(ConfigError, match="10 classes but data.num_classes=12"):
        run(*_args(teacher_copy, digits_root, "data.num_classes=12"))


@pytest.mark.parametrize("override, match", [("pseudolabel.threshold=0", "threshold"),
                                             ("pseudolabel.threshold=1.5", "threshold"),
                                             ("pseudolabel.topk=0", "topk")])
def test_setting_errors(teacher_copy, digits_root, override, match):
    with pytest.raises(ConfigError, match=match):
        run(*_args(teacher_copy, digits_root, override))


def test_corrupt_images_and_unreadable_shards(teacher_copy, digits_root, tmp_path):
    from PIL import Image

    from noisystudent.data.writer import encode_png

    d = tmp_path / "unl"
    good = encode_png(Image.fromarray(np.full((8, 8), 200, np.uint8), "L"))
    write_shard(d / "u-000000.tar", ({"__key__": f"a{i}", "png": b"junk" if i in (2, 5) else good}
                                      for i in range(10)))
    write_shard(d / "u-000001.tar", ({"__key__": f"b{i}", "png": good} for i in range(6)))
    (d / "u-000002.tar").write_bytes(b"this is not a tar file at all" * 40)
    pattern = f"data.unlabeled='{d}/u-{{000000..000002}}.tar'"
    s = run(*_args(teacher_copy, digits_root, pattern))
    assert s["corrupt_skipped"] == 2 and s["images_seen"] == 14
    assert list(s["unreadable_shards"]) == [str(d / "u-000002.tar")]
    f = LabelFile(teacher_copy / "round_1/pseudolabel/labels/u-000000.labels.safetensors")
    assert f.corrupt_keys() == ["a2", "a5"] and len(f.keys()) == 8
    with pytest.raises(DataError, match="u-000002.tar cannot be read.*strict_shards"):
        run(*_args(teacher_copy, digits_root, pattern, "force=true", "pseudolabel.strict_shards=true"))


def test_class_without_images_warns(teacher_copy, digits_root, caplog):
    with caplog.at_level(logging.WARNING):
        s = run(*_args(teacher_copy, digits_root, "pseudolabel.threshold=0.97"))
    empty = [c for c, n in enumerate(s["counts_before"]) if n == 0]
    assert empty, "the weak test teacher should leave some class below 0.97"
    assert s["classes_without_images"] == empty
    assert any("no image above pseudolabel.threshold" in r.message for r in caplog.records)
    assert all(s["counts_after"][c] == (0 if c in empty else s["per_class"]) for c in range(10))
