"""stage=predict: a directory of images or shards -> top-k with class names, as pseudolabel decodes and batches;
corrupt files counted and listed; 2 processes write what one does."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import webdataset as wds
from conftest import FAST, accelerate_launch, cli, run
from PIL import Image

from noisystudent.data.labels import LabelFile
from noisystudent.errors import MissingInputError


@pytest.fixture(scope="module")
def photos(tmp_path_factory, digits_root):
    """The first 45 unlabeled digits as files in two folders (PNG and JPEG), one corrupt file, one text file."""
    d = tmp_path_factory.mktemp("photos")
    samples = list(wds.WebDataset(str(digits_root / "unlabeled-000000.tar"), shardshuffle=False))[:45]
    for i, sample in enumerate(samples):
        img = Image.open(io.BytesIO(sample["png"])).convert("RGB").resize((40, 40))
        sub = d / ("a" if i < 20 else "b")
        sub.mkdir(exist_ok=True)
        img.save(sub / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    (d / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (d / "notes.txt").write_text("not an image")
    return d


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "predict" / "predictions.jsonl").read_text().splitlines()]


def test_predict_on_a_directory(teacher_copy, digits_root, photos):
    s = run("stage=predict", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, f"predict.src={photos}",
            "predict.files_per_source=8")
    rows = _rows(teacher_copy)
    assert s["images"] == len(rows) == 45 and s["corrupt_skipped"] == 1 and s["other_files_left_out"] == 1
    assert s["corrupt"] == [{"source": f"{photos}#000005", "key": "b/broken.jpg"}]
    assert [r["key"] for r in rows] == [f"a/{i:03d}.{'png' if i % 2 else 'jpg'}" for i in range(20)] + \
        [f"b/{i:03d}.{'png' if i % 2 else 'jpg'}" for i in range(20, 45)]  # the directory's order
    for r in rows:
        assert len(r["top"]) == 5 and r["top"][0]["name"] == str(r["top"][0]["class"])  # names from classes.json
        assert [t["prob"] for t in r["top"]] == sorted((t["prob"] for t in r["top"]), reverse=True)
    table = list(csv.DictReader((teacher_copy / "predict" / "predictions.csv").open()))
    assert [(t["key"], int(t["class_1"]), t["name_1"]) for t in table] == \
        [(r["key"], r["top"][0]["class"], r["top"][0]["name"]) for r in rows]


def test_predict_on_shards_gives_the_pseudo_labels(teacher_copy, digits_root):
    """Same decoding, batching and model as pseudolabel: the same top-k for every image of the shard."""
    shard = digits_root / "unlabeled-000001.tar"
    run("stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, f"data.unlabeled={shard}")
    run("stage=predict", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, f"predict.src={shard}")
    labels = LabelFile(teacher_copy / "round_1/pseudolabel/labels/unlabeled-000001.labels.safetensors")
    rows = _rows(teacher_copy)
    assert [r["key"] for r in rows] == labels.keys()
    assert np.array_equal(np.array([[t["class"] for t in r["top"]] for r in rows]), labels["topk_ids"])


@pytest.mark.slow
def test_predict_uses_the_export_and_two_processes_write_what_one_does(teacher_copy, digits_root, photos, tmp_path):
    run("stage=export", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, "export.onnx=false")
    args = [f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, f"predict.src={photos}",
            "predict.files_per_source=8"]
    one = run("stage=predict", *args)
    assert one["model_from"] == str(teacher_copy / "export")
    single = (teacher_copy / "predict" / "predictions.jsonl").read_bytes()
    proc = cli("stage=predict", *args, "force=true", launcher=accelerate_launch())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (teacher_copy / "predict" / "predictions.jsonl").read_bytes() == single
    assert not (teacher_copy / "predict" / ".parts").exists()


def test_predict_errors(teacher_copy, digits_root, tmp_path):
    with pytest.raises(MissingInputError, match="holds no image"):
        run("stage=predict", f"run_dir={teacher_copy}", f"data.root={digits_root}", f"predict.src={tmp_path}")
    with pytest.raises(MissingInputError, match="no finished model for round 3"):
        run("stage=predict", f"run_dir={teacher_copy}", f"data.root={digits_root}",
            f"predict.src={digits_root / 'eval-000000.tar'}", "predict.model=3")
    shutil.rmtree(tmp_path, ignore_errors=True)
