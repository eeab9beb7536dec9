"""eval.sets: more labeled sets every finished model is evaluated on, with an optional class list."""

from __future__ import annotations

import pytest
import webdataset as wds
from conftest import FAST, make_cfg, run

from noisystudent.config import eval_sets
from noisystudent.data.writer import write_shard
from noisystudent.errors import ConfigError, DataError
from noisystudent.files import read_json


def _subset_shard(digits_root, path, keep: set[int]) -> int:
    """The digits eval images of the classes in `keep`, as one shard; returns how many."""
    samples = [s for s in wds.WebDataset(str(digits_root / "eval-000000.tar"), shardshuffle=False)
               if int(s["cls"]) in keep]
    write_shard(path, ({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"} for s in samples))
    return len(samples)


def test_every_model_is_scored_on_each_set(teacher_copy, digits_root, tmp_path):
    sub = tmp_path / "sub-000000.tar"
    n_sub = _subset_shard(digits_root, sub, {0, 3, 5})
    eval_pattern = make_cfg(f"data.root={digits_root}").data.eval
    report = run("stage=evaluate", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST,
                 f"+eval.sets.same='{eval_pattern}'", f"+eval.sets.sub.shards={sub}", "+eval.sets.sub.classes=[0,3,5]",
                 f"+eval.sets.all_ten.shards={sub}", f"+eval.sets.all_ten.classes={list(range(10))}")
    row = report["rounds"][0]
    same, restricted, unrestricted = row["sets"]["same"], row["sets"]["sub"], row["sets"]["all_ten"]
    # the set made of data.eval's own shards gives data.eval's metrics
    assert (same["images"], same["top1"], same["nll"]) == (row["eval_images"], row["top1"], row["nll"])
    assert restricted["images"] == unrestricted["images"] == n_sub and restricted["classes"] == [0, 3, 5]
    # restricted to 3 classes, a right answer stays right and some wrong ones become right
    assert restricted["top1"] >= unrestricted["top1"] and restricted["top1"] > row["top1"]
    md = (teacher_copy / "report.md").read_text()
    assert "## Eval set: sub" in md and "scored over 3 classes (eval.sets.sub.classes)" in md
    assert read_json(teacher_copy / "report.json")["rounds"][0]["sets"]["sub"]["top1"] == restricted["top1"]


def test_a_training_step_records_the_sets_in_its_summary(tmp_path, digits_root):
    sub = tmp_path / "sub-000000.tar"
    _subset_shard(digits_root, sub, {1, 2})
    s = run("stage=teacher", f"run_dir={tmp_path}/run", f"data.root={digits_root}", *FAST, "max_steps=3",
            f"+eval.sets.two.shards={sub}", "+eval.sets.two.classes=[1,2]")
    assert s["eval_sets"]["two"]["classes"] == [1, 2] and len(s["eval_sets"]["two"]["per_class_top1"]) == 2
    assert read_json(tmp_path / "run/teacher/summary.json")["settings"]["eval.sets.two.classes"] == [1, 2]


def test_a_label_outside_the_class_list_is_an_error(teacher_copy, digits_root, tmp_path):
    sub = tmp_path / "sub-000000.tar"
    _subset_shard(digits_root, sub, {0, 3})
    with pytest.raises(DataError, match=r"eval.sets.sub: \d+ image\(s\) have a label outside eval.sets.sub.classes"):
        run("stage=evaluate", f"run_dir={teacher_copy}", f"data.root={digits_root}", f"+eval.sets.sub.shards={sub}",
            "+eval.sets.sub.classes=[0]")


@pytest.mark.parametrize("override,message", [
    ("+eval.sets.x.classes=[1,1]", r"eval.sets.x.shards=None"),
    ("+eval.sets.x={shards:/a.tar,classes:[1,1]}", r"eval.sets.x.classes: a list of distinct labels in \[0, 10\)"),
    ("+eval.sets.x={shards:/a.tar,classes:[10]}", r"eval.sets.x.classes: a list of distinct labels in \[0, 10\)"),
    ("+eval.sets.x={shards:/a.tar,classes:/no/such.json}", r"eval.sets.x.classes='/no/such.json': cannot read"),
    ("+eval.sets.x={shards:/a.tar,labels:[1]}", r"eval.sets.x=.*a shard pattern, or \{shards"),
])
def test_bad_eval_sets_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        eval_sets(make_cfg(override), 10)


def test_a_class_list_from_a_json_file(tmp_path):
    f = tmp_path / "classes.json"
    f.write_text("[4, 2, 7]")
    (es,) = eval_sets(make_cfg(f"+eval.sets.r={{shards:/a.tar,classes:{f}}}"), 10)
    assert (es.name, es.pattern, es.classes) == ("r", "/a.tar", (4, 2, 7))
