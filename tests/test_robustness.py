"""Robustness evaluation: corrupted (ImageNet-C) and perturbed (ImageNet-P) views of data.eval made in the loader
workers, the same pixels for every model and process; mCE, relative mCE and flip rates in the report."""

from __future__ import annotations

import hashlib
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import FAST, make_cfg, run
from omegaconf import OmegaConf

from noisystudent.data.corruptions import (
    COMMON,
    HELD_OUT,
    FirstImages,
    Variant,
    VariantBatches,
    VariantMaker,
    first_images_quota,
    robustness_plan,
    translate_offsets,
)
from noisystudent.data.shards import SampleDecoder
from noisystudent.data.streams import make_loader, ordered_stream
from noisystudent.data.transforms import ToHWCArray
from noisystudent.errors import ConfigError
from noisystudent.files import read_json
from noisystudent.reporting.robustness import against

# two corruptions that draw from np.random (one through numba), two severities, both perturbations
SMALL = ["eval.corruptions=[gaussian_noise,glass_blur]", "eval.severities=[2,5]",
         "eval.perturbations=[brightness,translate]", "data.crop_pct=0.875"]


def _image(seed: int = 0, size: int = 36) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _digests(names, severity: int) -> dict[str, str]:
    maker = VariantMaker(32, seed=7)
    return {n: hashlib.sha1(maker(_image(), "img-001", Variant("corruption", n, severity)).tobytes()).hexdigest()
            for n in names}


def test_a_corruption_is_the_same_bytes_in_another_process_and_seeded_by_key():
    names = COMMON + HELD_OUT
    here = _digests(names, 3)
    code = ("import json, sys; sys.path.insert(0, 'tests'); from test_robustness import _digests, COMMON, HELD_OUT; "
            "print(json.dumps(_digests(COMMON + HELD_OUT, 3)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert here == __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert here == _digests(names, 3)  # a rerun in this process: the global np.random state does not leak in
    maker = VariantMaker(32, seed=7)
    img = _image()
    for n in ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "frost", "elastic_transform"):
        v = Variant("corruption", n, 3)
        a, b = maker(img, "img-001", v), maker(img, "img-002", v)
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        assert not np.array_equal(a, b), n  # another key, other noise
        assert not np.array_equal(a, VariantMaker(32, seed=8)(img, "img-001", v)), n  # another seed too


def test_a_corruption_leaves_numpys_global_random_state_as_it_was():
    np.random.seed(123)
    before = np.random.get_state()
    VariantMaker(32, seed=7)(_image(), "img-001", Variant("corruption", "shot_noise", 3))
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_wide_image_gets_the_same_translate_frames_centred_on_its_crop():
    maker, img = VariantMaker(32, seed=0, translate_frames=5), _image(size=48)[:36]  # 36 x 48: resized to 36
    clean = maker(img, "k", Variant("clean"))
    assert np.array_equal(clean, img[2:34, 8:40])  # the center crop's left column is 8
    frames = [maker(img, "k", Variant("perturbation", "translate", j)) for j in range(5)]
    assert all(np.array_equal(f, img[2:34, 6 + j:38 + j]) for j, f in enumerate(frames))  # 6..10, around 8
    assert np.array_equal(frames[2], clean)


def test_views_crop_like_the_eval_transform():
    maker, img = VariantMaker(32, seed=0), _image(size=36)
    clean = maker(img, "k", Variant("clean"))
    assert np.array_equal(clean, img[2:34, 2:34])  # torchvision's CenterCrop of 36 -> 32
    assert translate_offsets(36, 32) == [0, 1, 2, 3, 4] and translate_offsets(256, 224) == list(range(12, 22))
    frames = [maker(img, "k", Variant("perturbation", "translate", j)) for j in range(5)]
    assert all(np.array_equal(f, img[2:34, j:j + 32]) for j, f in enumerate(frames))
    bright = maker(img, "k", Variant("perturbation", "brightness", 3))
    assert np.array_equal(bright, np.clip(clean.astype(np.float32) + 255 * 0.09, 0, 255).astype(np.uint8))


def test_loader_workers_make_the_same_views_and_the_first_n_images(digits_root):
    urls = sorted(str(p) for p in digits_root.glob("eval-*.tar"))
    counts = [sum(1 for _ in wds.WebDataset(u, shardshuffle=False)) for u in urls]
    quota = first_images_quota(urls, counts, counts[0] + 5)
    assert quota == {urls[0]: counts[0], urls[1]: 5}
    views = [Variant("clean"), Variant("corruption", "impulse_noise", 4), Variant("perturbation", "brightness", 1)]
    from torchvision import transforms

    def collect(workers):
        decoder = SampleDecoder(transforms.Compose([transforms.Resize(36), ToHWCArray()]), 10, labeled=True)
        stream = ordered_stream(urls, decoder, 50, split_by_node=False, select=FirstImages(quota),
                                batches=VariantBatches(views, VariantMaker(32, 0), 50))
        out = {}
        for b in make_loader(stream, workers):
            for key, img in zip(b["keys"], b["images"].permute(0, 2, 3, 1), strict=True):
                out[(key, b["variant"])] = hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()
        return out

    one, two = collect(0), collect(2)
    assert one == two and len(one) == 3 * (counts[0] + 5)


@pytest.mark.parametrize("override,match", [
    ({"corruptions": ["gaussian_noise", "fogg"]}, r"eval.corruptions=.*unknown corruption 'fogg'.*gaussian_noise"),
    ({"corruptions": "every"}, r"eval.corruptions='every': unknown corruption 'every'; use all \("),
    ({"corruptions": "all", "severities": [0, 3]}, r"eval.severities=\[0, 3\]: distinct integers of 1, 2, 3, 4, 5"),
    ({"corruptions": "all", "severities": [6]}, r"eval.severities=\[6\]"),
    ({"corruptions": "all", "severities": [2, 2]}, r"eval.severities=\[2, 2\]"),
    ({"perturbations": ["zoom"]}, r"eval.perturbations=\['zoom'\]: unknown perturbation 'zoom'.*brightness, translate"),
    ({"corruptions": "all", "corruption_images": 0}, r"eval.corruption_images=0: a positive number"),
    ({"corruptions": 5}, r"eval.corruptions=5: unknown corruption 5; use all"),
    ({"corruptions": "all", "severities": 2.5}, r"eval.severities=\[2.5\]: distinct integers"),
])
def test_bad_robustness_settings_name_the_key_and_the_valid_values(override, match):
    with pytest.raises(ConfigError, match=match):
        robustness_plan(OmegaConf.create(override))


def test_a_plan_the_eval_geometry_cannot_carry_is_an_error_naming_the_model():
    plan = robustness_plan(OmegaConf.create({"corruptions": ["fog"], "perturbations": ["translate"]}))
    plan.check_geometry(36, 32, "m")
    with pytest.raises(ConfigError, match=r"eval.corruptions: m is evaluated at 28 px .* at least 32"):
        plan.check_geometry(32, 28, "m")
    with pytest.raises(ConfigError, match=r"eval.perturbations=translate: the eval transform of m resizes to 32"):
        plan.check_geometry(32, 32, "m")


def test_all_is_the_benchmarks_fifteen_and_a_single_severity_is_taken():
    plan = robustness_plan(OmegaConf.create({"corruptions": "all", "severities": 3}))
    assert plan.corruptions == COMMON and len(COMMON) == 15 and plan.severities == (3,)
    assert not robustness_plan(OmegaConf.create(OmegaConf.to_container(make_cfg().eval))).active  # off by default


def _result(clean_top1, top1_by_corruption, flip=None, plan=None):
    corruptions = {c: {str(s + 1): {"top1": t} for s, t in enumerate(v)} for c, v in top1_by_corruption.items()}
    return {"plan": plan or {"p": 1}, "clean": {"top1": clean_top1}, "corruptions": corruptions,
            "perturbations": {p: {"flip_rate": f} for p, f in (flip or {}).items()}}


def test_mce_is_100_for_the_reference_and_as_defined_for_another_model():
    ref = _result(0.9, {"a": [0.8, 0.6], "b": [0.7, 0.5]}, {"brightness": 0.2})
    other = _result(0.95, {"a": [0.9, 0.8], "b": [0.6, 0.5]}, {"brightness": 0.05})
    same = against(ref, ref)
    assert same["mce"] == pytest.approx(100) and same["relative_mce"] == pytest.approx(100)
    assert same["mfr"] == pytest.approx(100)
    got = against(other, ref)
    # CE_a = (0.1 + 0.2) / (0.2 + 0.4); CE_b = (0.4 + 0.5) / (0.3 + 0.5)
    assert got["ce"]["a"] == pytest.approx(100 * 0.3 / 0.6) and got["ce"]["b"] == pytest.approx(100 * 0.9 / 0.8)
    assert got["mce"] == pytest.approx(100 * (0.3 / 0.6 + 0.9 / 0.8) / 2)
    # relative: (0.3 - 2 x 0.05) / (0.6 - 2 x 0.1) and (0.9 - 0.1) / (0.8 - 0.2)
    assert got["relative_mce"] == pytest.approx(100 * (0.2 / 0.4 + 0.8 / 0.6) / 2)
    assert got["mfr"] == pytest.approx(25)
    assert against(other, _result(0.9, {"a": [0.8, 0.6], "b": [0.7, 0.5]}, plan={"p": 2}))["mce"] is None


def _full(plan, clean, top1):
    """A robustness result as evaluate_views writes it, with one corruption at severity 1 and one perturbation."""
    view = {"images": 10, "top1": top1, "top5": 1.0, "nll": 1.0, "ece": 0.1}
    return {"plan": {"corruptions": ["fog"], "severities": [1], "perturbations": ["brightness"], "images": None,
                     "seed": plan}, "img_size": 32, "images": 10, "clean": {**view, "top1": clean},
            "corrupted": view, "corruptions": {"fog": {"1": view}},
            "perturbations": {"brightness": {"frames": 10, "pairs": 90, "flip_rate": 0.1}},
            "images_per_worker_s": {"clean": 100.0, "fog": 50.0}}


def test_the_report_lists_a_model_measured_on_another_plan_without_comparing_it(tmp_path):
    from noisystudent.reporting.robustness import section

    rows = [{"round": k, "role": role, "model": "m", "robustness": _full(plan, 0.9, top1)}
            for k, role, plan, top1 in ((0, "teacher", 0, 0.6), (1, "student", 1, 0.7), (2, "student", 0, 0.8))]
    text = section(tmp_path, rows, rows[0]["robustness"], "the teacher")  # as write_report: the teacher's row
    assert "so not compared here: round 1 student (m)" in text
    assert "| fog | 40.0 (100.0) | 20.0 (50.0) |" in text  # the teacher and round 2 only
    assert rows[1]["robustness_summary"]["mce"] is None and rows[2]["robustness_summary"]["mce"] == pytest.approx(50)
    # a reference that shows no error on a corruption: its CE is undefined, left out of the mean and named
    rows[0]["robustness"]["corruptions"]["fog"]["1"] = {**rows[0]["robustness"]["corruptions"]["fog"]["1"],
                                                        "top1": 1.0}
    text = section(tmp_path, rows, rows[0]["robustness"], "the teacher")
    assert rows[2]["robustness_summary"]["mce"] is None and "mce leaves out fog (round 2 student)" in text


def test_flip_rate_compares_each_frame_with_the_one_before(teacher_copy, digits_root):
    """The flips evaluate_views counts, against the same frames' predictions counted here one image at a time."""
    from accelerate import Accelerator
    from torchvision import transforms

    from noisystudent.data.transforms import InputNormalizer, eval_resize_crop, model_norm
    from noisystudent.models.build import load_exported_model
    from noisystudent.stages.common import evaluate_robustness

    cfg = make_cfg(f"data.root={digits_root}", *FAST, "eval.perturbations=[brightness,translate]",
                   "data.crop_pct=0.875", "eval.corruption_images=64")
    model, info = load_exported_model(teacher_copy / "teacher", "")
    urls = sorted(str(p) for p in digits_root.glob("eval-*.tar"))
    got = evaluate_robustness(cfg, Accelerator(cpu=True), [(model, info)], 10, urls)[0]["perturbations"]
    # the same frames, from the loader's stages, predicted in the same batches of 64
    plan = robustness_plan(cfg.eval)
    views = plan.variants(36, 32)
    decoder = SampleDecoder(transforms.Compose([eval_resize_crop(32, cfg.data).transforms[0], ToHWCArray()]), 10,
                            labeled=True)
    stream = ordered_stream(urls, decoder, 64, split_by_node=False, select=FirstImages(first_images_quota(
        urls, [sum(1 for _ in wds.WebDataset(u, shardshuffle=False)) for u in urls], 64)),
        batches=VariantBatches(views, VariantMaker(32, 0, 5), 64))
    normalize = InputNormalizer(*model_norm(model), channels_last=False)
    pred = {}
    with torch.no_grad():
        for b in make_loader(stream, 0):
            pred[b["variant"]] = model(normalize(b["images"])).argmax(1)
    for name in ("brightness", "translate"):
        frames = [pred[i] for i, v in enumerate(views) if v.name == name and v.kind == "perturbation"]
        neighbours = sum(int((b != a).sum()) for a, b in zip(frames, frames[1:]))
        against_first = sum(int((f != frames[0]).sum()) for f in frames[1:])
        assert got[name]["pairs"] == 64 * (len(frames) - 1)
        assert got[name]["flip_rate"] == neighbours / got[name]["pairs"]
        assert neighbours != against_first, name  # the check tells the two definitions apart on these images


def test_stage_evaluate_reports_every_view_and_the_clean_view_is_data_evals(teacher_copy, digits_root):
    report = run("stage=evaluate", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST, *SMALL)
    row = report["rounds"][0]
    res = row["robustness"]
    # without a cap the clean view is data.eval's evaluation, pixel for pixel
    assert res["images"] == row["eval_images"] == 539
    assert (res["clean"]["top1"], res["clean"]["nll"]) == (row["top1"], pytest.approx(row["nll"]))
    assert set(res["corruptions"]) == {"gaussian_noise", "glass_blur"}
    assert all(set(v) == {"2", "5"} for v in res["corruptions"].values())
    # severity 5 of gaussian noise hurts more than severity 2 (ImageNet-C's scale)
    noise = res["corruptions"]["gaussian_noise"]
    assert noise["5"]["top1"] < noise["2"]["top1"] <= row["top1"] + 0.02
    flips = res["perturbations"]
    assert flips["brightness"]["frames"] == 10 and flips["brightness"]["pairs"] == 539 * 9
    assert flips["translate"]["frames"] == 5 and flips["translate"]["pairs"] == 539 * 4
    assert all(0 <= f["flip_rate"] <= 1 for f in flips.values())
    assert row["robustness_summary"]["mce"] == pytest.approx(100)  # the teacher is the reference
    assert set(res["images_per_worker_s"]) == {"clean", "gaussian_noise", "glass_blur", "brightness (perturbation)",
                                               "translate (perturbation)"}
    # under corruption: the corrupted views counted as one set (equal image counts: its top-1 is their mean)
    views = [m for sev in res["corruptions"].values() for m in sev.values()]
    assert res["corrupted"]["images"] == 539 * 4
    assert res["corrupted"]["top1"] == pytest.approx(statistics.mean(m["top1"] for m in views))
    assert res["corrupted"]["nll"] == pytest.approx(statistics.mean(m["nll"] for m in views))
    summary = row["robustness_summary"]
    assert (summary["top1"], summary["ece"]) == (res["corrupted"]["top1"], res["corrupted"]["ece"])
    md = (teacher_copy / "report.md").read_text()
    assert "## Robustness" in md and "| gaussian_noise | " in md and "### Flip rate per perturbation" in md
    assert read_json(teacher_copy / "report.json")["mce_reference"] == "the teacher"


def test_a_training_step_records_robustness_and_checks_it_before_training(tmp_path, digits_root):
    s = run("stage=teacher", f"run_dir={tmp_path}/run", f"data.root={digits_root}", *FAST, "max_steps=3",
            "eval.corruptions=[contrast]", "eval.severities=[1]", "eval.corruption_images=40")
    assert s["robustness"]["images"] == 40 and set(s["robustness"]["corruptions"]) == {"contrast"}
    settings = read_json(tmp_path / "run/teacher/summary.json")["settings"]
    assert settings["eval.corruptions"] == ["contrast"] and settings["eval.corruption_images"] == 40
    # off (the default), the robustness keys are not part of a step's settings: older runs stay finished
    plain = run("stage=teacher", f"run_dir={tmp_path}/plain", f"data.root={digits_root}", *FAST, "max_steps=1")
    assert "robustness" not in plain and "eval.corruptions" not in plain["settings"]
    with pytest.raises(ConfigError, match="eval.corruptions=.*unknown corruption 'fogg'"):
        run("stage=teacher", f"run_dir={tmp_path}/bad", f"data.root={digits_root}", *FAST, "eval.corruptions=[fogg]")
    assert not (tmp_path / "bad/teacher/checkpoint.pt").exists()
    # what only the model's size tells (the digits' crop_pct 1 leaves the crop no room to move): before training too
    with pytest.raises(ConfigError, match="eval.perturbations=translate: the eval transform of this step's model"):
        run("stage=teacher", f"run_dir={tmp_path}/tight", f"data.root={digits_root}", *FAST,
            "eval.perturbations=[translate]")
    assert not (tmp_path / "tight/teacher").exists()


def test_a_report_rebuilt_from_the_summaries_keeps_stage_evaluates_result_while_the_weights_stay(teacher_copy,
                                                                                                  digits_root):
    import os

    from noisystudent.stages.iterate import report_from_summaries

    run("stage=evaluate", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST,
        "eval.corruptions=[contrast]", "eval.severities=[1]", "eval.corruption_images=20")
    measured = read_json(teacher_copy / "report.json")["rounds"][0]["robustness"]
    cfg = make_cfg(f"run_dir={teacher_copy}", f"data.root={digits_root}")
    assert report_from_summaries(cfg)[0]["robustness"] == measured
    weights = teacher_copy / "teacher/model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # as if trained again
    assert report_from_summaries(cfg)[0]["robustness"] is None


def test_translate_without_room_and_a_reference_of_another_plan_are_errors(teacher_copy, digits_root, tmp_path):
    with pytest.raises(ConfigError, match="eval.perturbations=translate: .* set data.crop_pct below 1"):
        run("stage=evaluate", f"run_dir={teacher_copy}", f"data.root={digits_root}", "eval.perturbations=[translate]")
    quick = ("eval.corruptions=[contrast]", "eval.corruption_images=20")
    with pytest.raises(ConfigError, match="eval.mce_reference=.*not a finished step's directory"):
        run("stage=evaluate", f"run_dir={teacher_copy}", f"data.root={digits_root}", *quick,
            f"eval.mce_reference={tmp_path}/nothing")
    with pytest.raises(ConfigError, match="eval.mce_reference=.*was evaluated on None"):
        run("stage=evaluate", f"run_dir={teacher_copy}", f"data.root={digits_root}", *quick,
            f"eval.mce_reference={teacher_copy}/teacher")
    # what the error advises works: stage=evaluate on the reference's run (here, moved after it) makes its
    # report.json row the reference, without touching the finished step's summary.json
    run("stage=evaluate", f"run_dir={teacher_copy}", f"data.root={digits_root}", *quick)
    baseline = tmp_path / "baseline"
    shutil.move(teacher_copy, baseline)
    run("stage=evaluate", f"run_dir={baseline}", f"data.root={digits_root}", *quick,
        f"eval.mce_reference={baseline}/teacher")
    report = read_json(baseline / "report.json")
    assert report["mce_reference"] == f"{baseline}/teacher"
    assert report["rounds"][0]["robustness_summary"]["mce"] == pytest.approx(100)  # itself, against itself
    assert "robustness" not in read_json(baseline / "teacher/summary.json")
    with pytest.raises(ConfigError, match="eval.mce_reference=.*was evaluated on .*'images': 20.*this run on"):
        run("stage=evaluate", f"run_dir={baseline}", f"data.root={digits_root}", "eval.corruptions=[contrast]",
            f"eval.mce_reference={baseline}/teacher")


def test_robustness_shares_the_loaders_decoding_with_several_models(teacher_copy, digits_root):
    """Two models in one pass give each what a pass of its own gives (views are made once for both)."""
    from accelerate import Accelerator

    from noisystudent.models.build import load_exported_model
    from noisystudent.stages.common import evaluate_robustness

    cfg = make_cfg(f"data.root={digits_root}", *FAST, *SMALL, "eval.corruption_images=64")
    model, info = load_exported_model(teacher_copy / "teacher", "")
    other = load_exported_model(teacher_copy / "teacher", "")[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    urls = sorted(str(p) for p in digits_root.glob("eval-*.tar"))
    acc = Accelerator(cpu=True)
    both = evaluate_robustness(cfg, acc, [(model, info), (other, info)], 10, urls)
    alone = evaluate_robustness(cfg, acc, [(other, info)], 10, urls)
    assert both[1]["corruptions"] == alone[0]["corruptions"] and both[1]["perturbations"] == alone[0]["perturbations"]
    assert both[0]["corruptions"] != both[1]["corruptions"] and both[0]["images"] == 64
    top1 = [m["top1"] for sev in both[0]["corruptions"].values() for m in sev.values()]
    assert statistics.mean(top1) < both[0]["clean"]["top1"]
