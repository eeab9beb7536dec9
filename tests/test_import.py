"""stage=import: ImageFolder -> labeled shards, flat directory -> unlabeled shards, with a manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FAST, cli, run
from PIL import Image

from noisystudent.data.shards import count_samples, expand_shards
from noisystudent.files import read_json


def _img(path, seed, fmt):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path, format=fmt)


def test_import_imagefolder_and_train_on_it(tmp_path):
    src = tmp_path / "train"
    for c, name in enumerate(["cat", "dog", "eel"]):
        (src / name).mkdir(parents=True)
        for i in range(7):
            _img(src / name / f"img.{i}.{'jpg' if i % 2 else 'png'}", c * 10 + i, "JPEG" if i % 2 else "PNG")
    (src / "dog" / "notes.txt").write_text("not an image")
    (src / "eel" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    dest = tmp_path / "shards"
    proc = cli("stage=import", f"stage.src={src}", f"stage.dest={dest}", "stage.samples_per_shard=8", check=True)
    assert "data.labeled=" in proc.stdout and "data.num_classes=3" in proc.stdout
    manifest = read_json(dest / "manifest.json")
    assert manifest["kind"] == "labeled" and manifest["total"] == 21
    assert manifest["shards"] == {"labeled-000000.tar": 8, "labeled-000001.tar": 8, "labeled-000002.tar": 5}
    assert set(manifest["skipped"]) == {"dog/notes.txt", "eel/broken.jpg"}
    assert json.loads((dest / "classes.json").read_text()) == ["cat", "dog", "eel"]
    urls = expand_shards(manifest["pattern"], "data.labeled")
    assert count_samples(urls, "data.labeled") == 21
    (dest / "manifest.json").unlink()  # the header scan gives the same count
    assert count_samples(urls, "data.labeled") == 21
    # brace patterns are quoted for Hydra's override grammar, as the import command prints them
    assert f"'data.labeled=\"{manifest['pattern']}\"'" in proc.stdout
    run("stage=teacher", "data=shards", f"run_dir={tmp_path / 'run'}", f"data.labeled='{manifest['pattern']}'",
        f"data.eval='{manifest['pattern']}'", "data.num_classes=3", *FAST, "max_steps=3")
    s = read_json(tmp_path / "run" / "teacher" / "summary.json")
    assert s["eval"]["images"] == 21 and s["eval"]["corrupt_skipped"] == 0


def test_import_flat_directory_as_unlabeled(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(5):
        _img(src / f"u{i}.webp", i, "WEBP")
    result = run("stage=import", f"stage.src={src}", f"stage.dest={tmp_path / 'out'}")
    assert result["kind"] == "unlabeled" and result["images"] == 5 and result["num_classes"] is None
    import webdataset as wds

    samples = list(wds.WebDataset(result["pattern"], shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == [f"u{i}" for i in range(5)]
    assert all("webp" in s and "cls" not in s for s in samples)


def test_import_errors_name_the_setting(tmp_path):
    proc = cli("stage=import", f"stage.src={tmp_path / 'missing'}", f"stage.dest={tmp_path / 'o'}")
    assert proc.returncode == 2 and "stage.src" in proc.stderr and "is not a directory" in proc.stderr
    proc = cli("stage=import", f"stage.dest={tmp_path / 'o'}")
    assert proc.returncode != 0 and "stage.src" in proc.stderr and "Traceback" not in proc.stderr


def _folder(root, sizes):
    for c, n in enumerate(sizes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            _img(root / f"class{c}" / f"i{i}.png", 100 * c + i, "PNG")


def test_holdout_is_stratified_disjoint_and_seeded(tmp_path):
    """stage.holdout: per class round(fraction x images) go to dest/val (at least one, never the whole class),
    no image in both, the same split for the same seed, and the command prints the overrides to use."""
    import webdataset as wds

    from noisystudent.data.importer import import_images
    from noisystudent.errors import ConfigError

    src = tmp_path / "src"
    _folder(src, [20, 9, 2])

    def keys(pattern):
        return {(s["__key__"], int(s["cls"])) for s in wds.WebDataset(expand_shards(pattern, "x"), shardshuffle=False)}

    a = import_images(src, tmp_path / "a", holdout=0.25, seed=0)
    train, held = keys(a["pattern"]), keys(a["holdout"]["pattern"])
    assert not {k for k, _ in train} & {k for k, _ in held} and len(train) + len(held) == 31
    assert sorted(np.bincount([c for _, c in held], minlength=3).tolist()) == [1, 2, 5]  # round(0.25 x 20, 9, 2)
    assert read_json(tmp_path / "a/val/manifest.json")["total"] == 8 and (tmp_path / "a/val/classes.json").exists()
    again = import_images(src, tmp_path / "b", holdout=0.25, seed=0)
    other = import_images(src, tmp_path / "c", holdout=0.25, seed=1)
    assert keys(again["holdout"]["pattern"]) == held and keys(other["holdout"]["pattern"]) != held
    with pytest.raises(ConfigError, match=r"stage.holdout=1.5: the fraction of each class held out must be in \[0"):
        import_images(src, tmp_path / "d", holdout=1.5)
    proc = cli("stage=import", f"stage.src={src}", f"stage.dest={tmp_path / 'e'}", "stage.holdout=0.25", check=True)
    assert "8 held out" in proc.stdout and "data.val=" in proc.stdout and "data.labeled=" in proc.stdout
