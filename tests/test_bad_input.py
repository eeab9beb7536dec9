"""Bad input: one clear error naming the file, key or setting (no library traceback), or a counted skip."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from conftest import FAST, cli, run
from PIL import Image

from noisystudent.data.writer import encode_png, write_shard
from noisystudent.errors import ConfigError, DataError
from noisystudent.rundir import read_json


def _png(value: int = 128) -> bytes:
    return encode_png(Image.fromarray(np.full((8, 8), value, np.uint8), "L"))


def _labeled_shard(path, n=20, label=lambda i: i % 10, payload=lambda i: {"png": _png(i * 10 % 255)}):
    return write_shard(path, ({"__key__": f"s{i:04d}", **payload(i), "cls": str(label(i)).encode()} for i in range(n)))


def _shards_args(tmp_path, labeled, eval_=None):
    return ["stage=teacher", "data=shards", f"run_dir={tmp_path / 'run'}", f"data.labeled='{labeled}'",
            f"data.eval='{eval_ or labeled}'", "data.num_classes=10", "model=demo", "train.epochs=1",
            "train.batch_size=8", "num_workers=0", "data.crop_scale=[0.6,1.0]"]


def test_missing_shard_pattern_names_key_and_file(tmp_path):
    proc = cli(*_shards_args(tmp_path, str(tmp_path / "nope-{000000..000003}.tar")))
    assert proc.returncode == 2
    assert "data.labeled" in proc.stderr and "nope-000000.tar does not exist" in proc.stderr
    assert "stage=import" in proc.stderr and "Traceback" not in proc.stderr


def test_unset_and_empty_shard_patterns(tmp_path):
    with pytest.raises(DataError, match="data.labeled is not set"):
        run(*_shards_args(tmp_path, ""))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.tar is empty"):
        run(*_shards_args(tmp_path, str(empty)))


def test_label_outside_num_classes(tmp_path):
    shard = tmp_path / "bad-000000.tar"
    _labeled_shard(shard, label=lambda i: 12 if i == 7 else i % 10)
    proc = cli(*_shards_args(tmp_path, str(shard)))
    assert proc.returncode == 2, proc.stderr
    assert "class 12 is outside [0, 10)" in proc.stderr and "s0007" in proc.stderr and str(shard) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_non_image_payload(tmp_path):
    shard = tmp_path / "txt-000000.tar"
    _labeled_shard(shard, payload=lambda i: {"txt": b"hello"})
    with pytest.raises(DataError, match=r"no image entry .* found \['cls', 'txt'\]"):
        run(*_shards_args(tmp_path, str(shard)))


def test_unknown_model_name(tmp_path):
    proc = cli(*_shards_args(tmp_path, "x.tar"), "model.name=efficientnet_b99")
    assert proc.returncode == 2
    assert "model.name='efficientnet_b99' is not a timm model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_settings_are_config_errors(tmp_path, digits_root):
    with pytest.raises(ConfigError, match="precision"):
        run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", "precision=fp8")
    with pytest.raises(ConfigError, match="train.batch_size"):
        run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", "train.batch_size=0")
    with pytest.raises(ConfigError, match="RandAugment"):
        run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", "train.randaugment=autoaug")


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    shard = tmp_path / "c-000000.tar"
    bad = {3, 11}
    _labeled_shard(shard, n=40, payload=lambda i: {"png": b"\x89PNG garbage" if i in bad else _png(i * 5)})
    run(*_shards_args(tmp_path, str(shard)), "train.epochs=2")
    s = read_json(tmp_path / "run" / "teacher" / "summary.json")
    assert s["eval"]["corrupt_skipped"] == 2  # the eval pass reads each image once
    assert s["eval"]["images"] == 38
    assert s["corrupt_skipped"] >= 1  # the training stream saw them too (it resamples, so at least once)


def test_unreadable_training_shard_is_skipped_and_counted(tmp_path):
    good = tmp_path / "g-000000.tar"
    _labeled_shard(good, n=40)
    bad = tmp_path / "g-000001.tar"
    bad.write_bytes(b"not a tar archive " * 100)
    args = _shards_args(tmp_path, str(tmp_path / "g-{000000..000001}.tar"), str(good))
    run(*args, "train.epochs=3")
    s = read_json(tmp_path / "run" / "teacher" / "summary.json")
    assert s["shard_read_errors"] >= 1
    assert any("g-000001.tar" in e for e in s["unreadable_shards"])
    assert s["eval"]["images"] == 40


def test_tar_member_without_key_structure_is_read(tmp_path):
    """Sanity for the fixtures above: a hand-made tar with a nested dir key still decodes."""
    shard = tmp_path / "h-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(12):
            for ext, data in (("png", _png(i * 9)), ("cls", str(i % 10).encode())):
                info = tarfile.TarInfo(f"dir/k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    run(*_shards_args(tmp_path, str(shard)))
    assert read_json(tmp_path / "run" / "teacher" / "summary.json")["eval"]["images"] == 12


def test_fast_settings_are_valid(tmp_path, digits_root):
    # the FAST overrides used across the suite compose and run for one step
    run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST, "max_steps=1")
    assert read_json(tmp_path / "teacher" / "summary.json")["steps"] == 1
