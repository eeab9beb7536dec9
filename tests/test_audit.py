"""The pseudo-label audit and the teacher's calibration: exact figures on hand-made label files, the
temperature fit on logits drawn at a known temperature, and stage=pseudolabel on the digits (whose
unlabeled shards keep their classes) checked against the shards' own cls."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import webdataset as wds
from conftest import FAST, run

from noisystudent.data.labels import LabelFile, write_label_file
from noisystudent.errors import ConfigError
from noisystudent.files import read_json
from noisystudent.pseudolabels.audit import audit_label_files
from noisystudent.pseudolabels.calibration import GRID, best_temperature
from noisystudent.pseudolabels.selection import select

META = {"num_classes": 3, "topk": 1, "temperature": 1.0, "hard": False}
#            confidence, pseudo-label, true class (-1: the sample had no cls)
ROWS = [(0.95, 0, 0), (0.92, 0, 1), (0.85, 0, 0), (0.72, 1, 1), (0.45, 1, 2),
        (0.60, 2, 2), (0.20, 2, 2), (0.55, 1, 1), (0.99, 0, -1), (0.35, 0, 0)]


def _write(path, rows, first, with_cls=True):
    conf = np.array([r[0] for r in rows], np.float32)
    pred = np.array([r[1] for r in rows], np.int32)
    keys = [f"k{first + i}" for i in range(len(rows))]
    extra = {"cls": np.array([r[2] for r in rows], np.int32)} if with_cls else None
    write_label_file(path, path.name, keys, pred[:, None], conf[:, None], conf, pred, [], META, extra)
    return LabelFile(path)


def test_audit_figures_on_a_hand_made_label_file(tmp_path):
    a, b = _write(tmp_path / "a", ROWS[:5], 0), _write(tmp_path / "b", ROWS[5:], 5)
    # threshold 0.5 keeps 0,1,2,8 (class 0), 3,7 (class 1), 5 (class 2); 2 per class: class 0 keeps its two
    # most confident (8, 0), class 1 both once, class 2 its one image twice
    sel = select([a, b], 3, 0.5, True, per_class=2)
    no_cls = _write(tmp_path / "c", [(0.8, 1, 1), (0.1, 2, 2)], 10, with_cls=False)
    out = audit_label_files([a, b, no_cls], sel, 3)
    assert out["images"] == 9 and out["images_without_cls"] == 3  # image 8, and the file without cls
    assert out["accuracy"] == pytest.approx(7 / 9)
    assert out["kept_by_threshold"] == {"images": 6, "accuracy": pytest.approx(5 / 6)}
    assert out["after_balancing"] == {"images": 5, "accuracy": 1.0}  # 0, 3, 7 once, 5 twice
    pc = out["per_class"]
    assert pc["images"] == [3, 3, 3] and pc["kept"] == [3, 2, 1]
    assert pc["precision_kept"] == pytest.approx([2 / 3, 1.0, 1.0])
    assert pc["recall_kept"] == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert pc["after_balancing"] == [1, 2, 2] and pc["precision_after_balancing"] == [1.0, 1.0, 1.0]
    bins = out["bins"]
    assert bins["images"] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 2]
    assert bins["accuracy"][9] == 0.5 and bins["accuracy"][4] == 0.0 and bins["accuracy"][0] is None
    assert bins["images_after_balancing"][9] == 1 and bins["accuracy_after_balancing"][9] == 1.0
    assert bins["images_after_balancing"][6] == 2  # image 5, repeated
    assert out["ece"] == pytest.approx(4.05 / 9, abs=1e-6)
    assert "uncalibrated" not in out


def test_audit_of_files_without_classes_is_none(tmp_path):
    f = _write(tmp_path / "a", ROWS, 0, with_cls=False)
    assert audit_label_files([f], select([f], 3, 0.5, True), 3) is None


def _nll(logits, labels, t):
    z = logits / t
    z = z - z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]))


@pytest.mark.parametrize("true_t", [0.5, 2.0, 4.0])
def test_temperature_fit_recovers_the_temperature_labels_were_drawn_at(true_t):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (20000, 10))
    p = np.exp(logits / true_t)
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(10, p=row) for row in p])
    grid = GRID.tolist()
    t = best_temperature(grid, [_nll(logits, labels, g) for g in grid])
    fine = np.exp(np.linspace(math.log(t) - 0.1, math.log(t) + 0.1, 201))
    best = fine[np.argmin([_nll(logits, labels, g) for g in fine])]
    assert t == pytest.approx(best, rel=0.005)  # the parabola finds the minimum between grid points
    assert t == pytest.approx(true_t, rel=0.05)  # and it is the temperature of the draw


def _shard_classes(pattern_root, name, n):
    out = {}
    for i in range(n):
        for s in wds.WebDataset(str(pattern_root / f"{name}-{i:06d}.tar"), shardshuffle=False):
            out[s["__key__"]] = int(s["cls"])
    return out


def test_pseudolabel_audits_against_the_shards_classes(teacher_copy, digits_root):
    s = run("stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST,
            f"data.audit='{digits_root}/eval-{{000000..000001}}.tar'", "pseudolabel.calibrate=true",
            f"data.calibration={digits_root}/labeled-000000.tar")
    out = teacher_copy / "round_1" / "pseudolabel"
    truth = _shard_classes(digits_root, "unlabeled", 4)
    right = kept = kept_right = 0
    for f in sorted((out / "labels").glob("*.safetensors")):
        lf = LabelFile(f)
        assert lf.has("cls") and lf.has("confidence_raw")
        keys = lf.keys()
        assert lf["cls"].tolist() == [truth[k] for k in keys]  # each image's own class, in shard order
        assert float(lf.meta["temperature"]) == pytest.approx(s["calibration"]["temperature"])
        hit = lf["argmax"] == lf["cls"]
        right += int(hit.sum())
        kept += int((lf["confidence"] >= 0.3).sum())
        kept_right += int(hit[lf["confidence"] >= 0.3].sum())
    a = s["audit"]["unlabeled"]
    assert a["images"] == 1158 and a["images_without_cls"] == 0
    assert a["accuracy"] == pytest.approx(right / 1158)
    assert a["kept_by_threshold"]["images"] == kept == s["images_kept_by_threshold"]
    assert a["kept_by_threshold"]["accuracy"] == pytest.approx(kept_right / kept)
    assert a["after_balancing"]["images"] == s["images_after_balancing"]
    assert "uncalibrated" in a and a["uncalibrated"]["kept_by_threshold"]["images"] >= 0
    # the audit shards: labeled by the teacher into audit/, never part of the selection
    assert s["audit"]["audit_set"]["images"] == 539 and s["images_seen"] == 1158
    assert len(list((out / "audit").glob("*.safetensors"))) == 2
    cal = read_json(out / "calibration.json")
    assert cal["temperature"] == s["calibration"]["temperature"] and cal["source"] == "data.calibration"
    assert cal["images"] == 100 and cal["after"]["nll"] <= cal["before"]["nll"] + 1e-9
    assert (out / "audit.png").stat().st_size > 0

    # a rerun labels with the temperature the first run fitted (calibration.json), not a new fit
    for f in (out / "labels").glob("*.safetensors"):
        f.unlink()
    (out / "_SUCCESS").unlink()
    cal["temperature"] = 1.7  # a value no fit would give: it can only come from the file
    (out / "calibration.json").write_text(json.dumps(cal))
    args = ["stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST,
            f"data.audit='{digits_root}/eval-{{000000..000001}}.tar'", "pseudolabel.calibrate=true",
            f"data.calibration={digits_root}/labeled-000000.tar"]
    with pytest.raises(ConfigError, match="audit/eval-000000.labels.safetensors was made at temperature"):
        run(*args)  # the audit shards' label files were left at the first temperature
    shutil.rmtree(out / "audit")
    s2 = run(*args)
    assert s2["calibration"]["temperature"] == 1.7
    assert {LabelFile(f).meta["temperature"] for f in out.rglob("*.safetensors")} == {"1.7"}

    # and label files of another temperature are never mixed in: a killed run's files at T=1.7, a rerun at 1.0
    (out / "labels" / "unlabeled-000002.labels.safetensors").unlink()
    (out / "_SUCCESS").unlink()
    with pytest.raises(ConfigError, match="was made at temperature 1.7, but this run labels at 1"):
        run("stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST)


def test_an_unlabeled_cls_that_is_no_class_here_is_unknown_not_fatal():
    from noisystudent.data.shards import SampleDecoder

    dec = SampleDecoder(lambda img: img, 10, labeled=False, audit_classes=True)
    assert [dec.label_of({"cls": c}) for c in (b"3", b"n01440764", b"12", b" 7\n")] == [3, -1, -1, 7]
    assert dec.label_of({"cls": b"-1"}) == -2  # an image of no class of the data set: every label of it is wrong
    assert dec.label_of({}) == -1
    assert SampleDecoder(lambda img: img, 10, labeled=False).label_of({"cls": b"3"}) == -1  # audit off


def test_audit_off_and_bad_calibration_settings(teacher_copy, digits_root):
    s = run("stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST,
            "pseudolabel.audit=false")
    assert s["audit"] is None and s["calibration"] is None
    f = LabelFile(teacher_copy / "round_1/pseudolabel/labels/unlabeled-000000.labels.safetensors")
    assert not f.has("cls") and not f.has("confidence_raw")
    with pytest.raises(ConfigError, match="pseudolabel.temperature"):
        run("stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST,
            "pseudolabel.calibrate=true", "pseudolabel.temperature=2.0", "force=true")
    with pytest.raises(ConfigError, match="data.audit and data.unlabeled share"):
        run("stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, "force=true",
            f"data.audit={digits_root}/unlabeled-000001.tar")


def test_evaluate_reports_calibration_as_computed_by_hand(digits_root):
    """evaluate's NLL, ECE and reliability bins (summed in its loop) equal the same measures computed here
    from every eval image's logits at once."""
    import timm
    import torch
    from accelerate import Accelerator
    from conftest import make_cfg

    from noisystudent.data.shards import SampleDecoder, expand_shards
    from noisystudent.data.transforms import InputNormalizer, eval_transform, model_norm, stack_hwc
    from noisystudent.reporting.evaluation import ECE_BINS, evaluate

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10).eval()
    with torch.no_grad():  # spread the logits so the confidences cover many bins
        model.get_classifier().weight.mul_(40)
    urls = expand_shards(f"{digits_root}/eval-{{000000..000001}}.tar", "data.eval")
    tf = eval_transform(32, make_cfg().data)
    m = evaluate(Accelerator(cpu=True), model, urls, 10, tf, 64, 0, nll_temperatures=torch.tensor([1.0, 3.0]))

    dec = SampleDecoder(tf, 10, labeled=True)
    samples = [dec(s) for u in urls for s in wds.WebDataset(u, shardshuffle=False)]
    with torch.no_grad():
        logits = model(InputNormalizer(*model_norm(model), False)(stack_hwc([s["image"] for s in samples]))).double()
    labels = torch.tensor([s["label"] for s in samples])
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    bins = (conf * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    gap = sum(abs(float((pred[bins == b] == labels[bins == b]).sum()) - float(conf[bins == b].sum()))
              for b in range(ECE_BINS))
    assert m["images"] == len(samples) == 539
    assert m["ece"] == pytest.approx(gap / len(samples), abs=1e-4)
    assert m["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-4)
    assert m["nll_at"][1] == pytest.approx(float(torch.nn.functional.cross_entropy(logits / 3, labels)), rel=1e-4)
    assert m["reliability"]["images"] == torch.bincount(bins, minlength=ECE_BINS).tolist()
    assert sum(1 for n in m["reliability"]["images"] if n) >= 3  # a test that spans several bins


def test_calibration_fits_on_data_val_before_data_eval(teacher_copy, digits_root):
    """pseudolabel.calibrate=true without data.calibration fits on data.val where it is set; with neither it
    falls back to data.eval and says so."""
    from noisystudent.data.shards import count_samples

    val = f"{digits_root}/eval-000000.tar"
    s = run("stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST,
            "pseudolabel.calibrate=true", f"data.val={val}")
    assert s["calibration"]["source"] == "data.val" and s["calibration"]["images"] == count_samples([val], "data.val")
    s = run("stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST,
            "pseudolabel.calibrate=true", "force=true")
    assert s["calibration"]["source"] == "data.eval"
    assert s["calibration"]["images"] == count_samples([f"{digits_root}/eval-{i:06d}.tar" for i in (0, 1)], "e")
