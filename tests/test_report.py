"""report.md as the story of a run, from rows made here: the per-class comparison for many classes, the
pseudo-label sections from the rounds' summaries, and rows of an older version without calibration."""

from __future__ import annotations

from noisystudent.files import read_json
from noisystudent.reporting.report import write_report
from noisystudent.rundir import mark_done, pseudolabel_dir


def _row(round_idx, per_class, calibrated=True):
    top1 = sum(per_class) / len(per_class)
    row = {"round": round_idx, "role": "teacher" if round_idx == 0 else "student", "model": "m", "params": 10,
           "eval_img_size": 32, "top1": top1, "top5": 1.0, "eval_images": 100, "per_class_top1": per_class,
           "path": ""}
    if calibrated:
        row.update(nll=0.5, ece=0.1, reliability={"bins": 15, "images": [0] * 14 + [100],
                                                  "accuracy": [None] * 14 + [top1], "confidence": [None] * 14 + [0.97]})
    return row


def test_per_class_shows_the_classes_gained_and_lost_most(tmp_path):
    teacher = [0.5] * 30
    student = [0.5 + 0.01 * c for c in range(30)]  # class 29 gains most; class 0 changes least
    student[3] = 0.2  # the one class lost
    write_report(tmp_path, [_row(0, teacher), _row(1, student)], "eval.tar")
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Per class: round 1 student against the teacher"):]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| class")]
    assert len(rows) == 20  # 30 classes: the 10 gained most and the 10 lost most
    assert rows[0].startswith("| 29 |") and rows[-1].startswith("| 3 |") and "-30.0" in rows[-1]
    assert "28 classes gained, 1 lost" in section
    assert (tmp_path / "per_class.png").stat().st_size > 0 and (tmp_path / "reliability.png").exists()
    assert "| 0.500 | 10.0% |" in md  # NLL and ECE columns


def test_rounds_pseudolabels_and_rows_without_calibration(tmp_path):
    audit = {"images": 50, "images_without_cls": 0, "accuracy": 0.8, "ece": 0.05,
             "kept_by_threshold": {"images": 40, "accuracy": 0.9}, "after_balancing": {"images": 44, "accuracy": 0.95}}
    summary = {"images_seen": 60, "images_kept_by_threshold": 45, "images_after_balancing": 48, "threshold": 0.3,
               "per_class": 16, "temperature": 0.5, "audit": {"unlabeled": audit},
               "calibration": {"temperature": 0.5, "source": "data.eval", "images": 100,
                               "before": {"nll": 0.4, "ece": 0.12, "top1": 0.9},
                               "after": {"nll": 0.3, "ece": 0.03, "top1": 0.9}}}
    pseudolabel_dir(tmp_path, 1).mkdir(parents=True)
    mark_done(pseudolabel_dir(tmp_path, 1), summary)
    rows = [_row(0, [0.5, 0.6], calibrated=False), _row(1, [0.7, 0.6], calibrated=False)]
    report = write_report(tmp_path, rows, "eval.tar")
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | 60 | 45 (threshold 0.3) | 48 (16 per class) | 80.0% | 90.0% | 95.0% |" in md
    assert "![round 1 selection](round_1/pseudolabel/selection.png)" in md
    assert "round_1/pseudolabel/audit.png" in md
    assert ("temperature 0.500 fitted on data.eval (100 images; chosen on the eval set, the set scored here: set "
            "data.val): NLL 0.400 -> 0.300, ECE 12.0% -> 3.0%") in md
    assert not (tmp_path / "reliability.png").exists()  # rows of a version that measured no calibration
    assert md.splitlines()[7].endswith("| +10.00 |  |  |")  # their NLL and ECE cells are empty
    assert report["pseudolabels"]["1"]["audit_unlabeled"]["accuracy"] == 0.8
    assert read_json(tmp_path / "report.json")["pseudolabels"]["1"]["calibration"]["temperature"] == 0.5


def _pool_summary(estimated, predicted, train_prior):
    nc = len(estimated)
    return {"pool": {"images": 1000, "method": "confusion", "estimated_share": estimated, "predicted_share": predicted,
                     "train_prior": train_prior,
                     "ood": {"cutoff": 1.0, "score": "energy", "quantile": 0.05, "cutoff_from": "data.val",
                             "below_cutoff": 80, "share_below": 0.08, "share_estimate": 0.03,
                             "per_class_below": [10, 50, 20][:nc]}},
            "selection": {"prior_correction": False, "ood": {"filter": False}, "class_quantile": 0.0,
                          "balance_target": "uniform", "max_repeat": None}}


def test_pool_lines_name_the_classes_that_took_more_than_their_labeled_share():
    """A class twice as common in the pool as in the labeled set (where an open-set pool's foreign images go) is
    named with both shares; a pool like the labeled set gets no such line."""
    from noisystudent.reporting.report import pool_lines

    third = [1 / 3] * 3
    lines = pool_lines(_pool_summary([0.2, 0.6, 0.2], [0.2, 0.6, 0.2], third))
    far = [line for line in lines if line.startswith("- far more common")]
    assert len(far) == 1 and "1 60.0% (labeled 33.3%)" in far[0] and " 0 " not in far[0].split(":")[-1]
    assert "at least 3.0% of the pool is out of domain" in lines[0] and "mostly as 1 (50)" in lines[0]
    assert not [line for line in pool_lines(_pool_summary(third, third, third)) if line.startswith("- far more")]


def test_a_model_chosen_on_the_eval_set_says_so(tmp_path):
    """eval.keep=best without data.val chose the epoch on the set the report scores: report.md and report.json
    say so for that model, and only for it."""
    rows = [_row(0, [0.5, 0.6]), _row(1, [0.7, 0.6])]
    for r, chosen in zip(rows, (False, True), strict=True):
        step = tmp_path / ("teacher" if r["round"] == 0 else "round_1/student")
        step.mkdir(parents=True)
        mark_done(step, {"kept": "best", **({"chosen_on_eval_set": True} if chosen else {})})
        r["path"] = str(step)
    report = write_report(tmp_path, rows, "eval.tar")
    notes = [n for n in report["notes"] if "chosen on the eval set" in n]
    assert len(notes) == 1 and notes[0].startswith("round 1 student: eval.keep=best")
    md = (tmp_path / "report.md").read_text()
    assert "Note: round 1 student: eval.keep=best chose its epoch on the eval set" in md
