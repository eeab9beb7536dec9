"""stage=evaluate: top-1/top-5/per-class of the teacher and every finished student on data.eval (and on
eval.sets, and under eval.corruptions / eval.perturbations), written to run_dir/report.json, report.md and
accuracy.png."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from ..config import ROBUSTNESS_KEYS, read_settings
from ..data.corruptions import robustness_plan
from ..files import read_json
from ..models.build import MODEL_INFO, check_num_classes, eval_img_size, load_exported_model
from ..reporting.report import report_row, write_report
from ..rundir import command_for_round, finished_models, teacher_dir
from .common import (
    check_robustness,
    eval_set_shards,
    evaluate_model,
    evaluate_robustness,
    mce_reference,
    num_classes,
    on_eval_sets,
    shards,
    weights_fingerprint,
)
from .contract import Step, StepRun

log = logging.getLogger(__name__)


def settings(cfg: DictConfig) -> int:
    return num_classes(cfg)


def inputs(cfg: DictConfig, nc: int) -> dict:
    eval_urls, sets = shards(cfg, "eval"), eval_set_shards(cfg)
    plan, reference = robustness_plan(cfg.eval), mce_reference(cfg)
    models = finished_models(cfg.run_dir)
    if not models:
        # the same error load_exported_model gives, naming the path and the command
        load_exported_model(teacher_dir(cfg.run_dir), command_for_round(cfg.run_dir, 0))
    for _, _, step_dir in models:  # before any model is evaluated
        check_robustness(cfg, plan, eval_img_size(read_json(step_dir / MODEL_INFO)), f"the model in {step_dir}")
    return {"eval": eval_urls, "sets": sets, "models": models, "robustness": plan, "reference": reference}


def work(run: StepRun) -> dict:
    cfg, accelerator, nc = run.cfg, run.accelerator, run.settings
    rows, loaded = [], []
    for round_idx, role, step_dir in run.inputs["models"]:
        model, info = load_exported_model(step_dir, "")
        check_num_classes(info["num_classes"], nc, f"the model in {step_dir}", "evaluate on data of its classes")
        metrics = evaluate_model(cfg, accelerator, model, info, nc, run.inputs["eval"])
        sets = on_eval_sets(cfg, accelerator, model, info, nc, run.inputs["sets"])
        rows.append(report_row(round_idx, role, info, metrics, step_dir, sets))
        loaded.append((model, info))
        log.info("%s (round %d, %s): top-1 %.4f top-5 %.4f", role, round_idx, info["name"], metrics["top1"],
                 metrics["top5"])
    # every model at once: the corrupted views are made once for all of them
    for row, res in zip(rows, evaluate_robustness(cfg, accelerator, loaded, nc, run.inputs["eval"],
                                                  run.inputs["robustness"]), strict=True):
        if res is not None:  # which weights it measured: iterate keeps the result in its report while they stay
            res["weights"] = weights_fingerprint(row["path"])
        row["robustness"] = res
    report = {"rounds": rows}
    if accelerator.is_main_process:
        report = write_report(cfg.run_dir, rows, str(cfg.data.eval), reference=run.inputs["reference"])
    return report


STEP = Step("evaluate", settings,
            lambda cfg: read_settings(cfg, ("data.eval", "data.num_classes", "data.loader", "eval.sets",
                                            *ROBUSTNESS_KEYS, "eval.mce_reference")),
            inputs, work)
