"""stage=iterate: teacher, then for each round pseudolabel -> student -> report, skipping every step
that is already finished (so a killed run, rerun, continues where it stopped)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from ..config import positive_int
from ..report import markdown_table, write_report
from ..rundir import SUMMARY, read_json
from . import pseudolabel, student, teacher
from .evaluate import finished_models

log = logging.getLogger(__name__)


def report_from_summaries(cfg: DictConfig) -> list[dict]:
    """One row per finished model, from the eval metrics each step stored in its summary.json."""
    rows = []
    for round_idx, role, step_dir in finished_models(cfg.run_dir):
        s = read_json(step_dir / SUMMARY)
        rows.append({"round": round_idx, "role": role, "model": s["model"]["name"], "params": s["model"]["params"],
                     "top1": s["top1"], "top5": s["top5"], "eval_images": s["eval"]["images"],
                     "per_class_top1": s["eval"]["per_class_top1"], "path": str(step_dir)})
    return rows


def run(cfg: DictConfig, accelerator) -> dict:
    rounds = positive_int(cfg, "iterate.rounds")
    teacher.run(cfg, accelerator)
    rows = report_from_summaries(cfg)
    for k in range(1, rounds + 1):
        round_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(round_cfg):
            round_cfg.round = k
        pseudolabel.run(round_cfg, accelerator)
        student.run(round_cfg, accelerator)
        if accelerator.is_main_process:
            rows = report_from_summaries(cfg)
            write_report(cfg.run_dir, rows, str(cfg.data.eval))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(markdown_table(rows, str(cfg.data.eval)))
    return {"rounds": rows}
