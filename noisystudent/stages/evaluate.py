"""stage=evaluate: top-1/top-5/per-class of the teacher and every finished student on data.eval,
written to run_dir/report.json, report.md and accuracy.png."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from ..config import worker_nice
from ..data.transforms import eval_transform
from ..errors import ConfigError
from ..evaluation import evaluate
from ..models import load_exported_model
from ..report import write_report
from ..rundir import command_for_round, is_done, student_dir, teacher_dir
from .common import num_classes, prepare_data, shards

log = logging.getLogger(__name__)


def finished_models(run_dir) -> list[tuple[int, str, object]]:
    """(round, role, step_dir) of every finished model, teacher first, rounds in order."""
    found = []
    if is_done(teacher_dir(run_dir)):
        found.append((0, "teacher", teacher_dir(run_dir)))
    k = 1
    while is_done(student_dir(run_dir, k)):
        found.append((k, "student", student_dir(run_dir, k)))
        k += 1
    return found


def run(cfg: DictConfig, accelerator) -> dict:
    prepare_data(cfg, accelerator)
    nc = num_classes(cfg)
    eval_urls = shards(cfg, "eval")
    models = finished_models(cfg.run_dir)
    if not models:
        # the same error load_exported_model gives, naming the path and the command
        load_exported_model(teacher_dir(cfg.run_dir), command_for_round(cfg.run_dir, 0))
    rows = []
    for round_idx, role, step_dir in models:
        model, info = load_exported_model(step_dir, "")
        if info["num_classes"] != nc:
            raise ConfigError(f"{step_dir} holds a {info['num_classes']}-class model but data.num_classes={nc}")
        metrics = evaluate(accelerator, model, eval_urls, nc,
                           eval_transform(int(info.get("test_img_size") or info["img_size"]), cfg.data),
                           int(cfg.eval.batch_size), int(cfg.num_workers), bool(cfg.channels_last),
                           worker_nice(cfg, accelerator.device))
        rows.append({"round": round_idx, "role": role, "model": info["name"], "params": info["params"],
                     "top1": metrics["top1"], "top5": metrics["top5"], "eval_images": metrics["images"],
                     "per_class_top1": metrics["per_class_top1"], "path": str(step_dir)})
        log.info("%s (round %d, %s): top-1 %.4f top-5 %.4f", role, round_idx, info["name"], metrics["top1"],
                 metrics["top5"])
    report = {"rounds": rows}
    if accelerator.is_main_process:
        report = write_report(cfg.run_dir, rows, str(cfg.data.eval))
    accelerator.wait_for_everyone()
    return report
