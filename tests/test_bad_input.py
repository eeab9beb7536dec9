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
from noisystudent.files import read_json


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


def test_all_corrupt_training_stream_stops_with_the_first_error(tmp_path):
    """64 undecodable PNGs: training used to loop forever on empty batches; now it stops, naming the shard
    and the first error, well within the timeout."""
    shard = tmp_path / "junk-000000.tar"
    _labeled_shard(shard, n=64, payload=lambda i: {"png": b"\x89PNG not an image"})
    proc = cli(*_shards_args(tmp_path, str(shard)), "max_steps=3", "num_workers=1", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not one image decoded" in proc.stderr and str(shard) in proc.stderr
    assert "first error: shard" in proc.stderr and "UnidentifiedImageError" in proc.stderr


def test_a_transform_bug_is_raised_as_the_bug(tmp_path, monkeypatch):
    """Only decoding is taken as a corrupt image; an exception in the transform propagates as itself."""
    from noisystudent.stages import teacher

    shard = tmp_path / "ok-000000.tar"
    _labeled_shard(shard, n=20)

    def broken_transform(*_a, **_k):
        def apply(_img):
            raise ValueError("a bug in the transform")
        return apply

    monkeypatch.setattr(teacher, "train_transform", broken_transform)
    with pytest.raises(ValueError, match="a bug in the transform"):
        run(*_shards_args(tmp_path, str(shard)), "max_steps=2")


def test_remote_shards_need_a_declared_sample_count(tmp_path):
    shard = tmp_path / "r-000000.tar"
    _labeled_shard(shard, n=40)
    remote = [f"data.labeled='pipe:cat {shard}'" if a.startswith("data.labeled=") else a
              for a in _shards_args(tmp_path, str(shard))]
    with pytest.raises(DataError, match=r"data.labeled: shard 'pipe:cat .*' is not a local file.*data.labeled_samples"):
        run(*remote)
    s = run(*remote, "data.labeled_samples=40", "train.epochs=2")
    assert s["labeled_images"] == 40 and s["steps"] == 2 * 5  # 40 images / batch 8 per epoch


def test_finished_step_with_changed_settings_warns(teacher_copy, digits_root, caplog):
    import logging

    args = ["stage=teacher", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST]
    with caplog.at_level(logging.WARNING):
        run(*args, "iterate.rounds=5", "num_workers=0", "pseudolabel.threshold=0.5")  # keys the teacher does not read
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with caplog.at_level(logging.WARNING):
        s = run(*args, "train.epochs=3", "train.label_smoothing=0.0")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "settings changed" in warning and "force=true" in warning
    assert "train.epochs (12 -> 3)" in warning and "train.label_smoothing (0.1 -> 0.0)" in warning
    assert s["settings"]["train.epochs"] == 12  # skipped: the result it had


def test_settings_are_checked_before_any_work(tmp_path, digits_root):
    """A bad student setting stops stage=iterate before the teacher is trained."""
    with pytest.raises(ConfigError, match="student.epochs"):
        run("stage=iterate", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST, "student.epochs=0")
    assert not (tmp_path / "teacher").exists()
