"""stage=iterate: teacher, then for each round pseudolabel -> student -> report, skipping every step
that is already finished (so a killed run, rerun, continues where it stopped). Each step runs
under the stage contract (contract.py), exactly as when it is launched alone."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from ..config import positive_int
from ..report import markdown_table, report_row, write_report
from ..rundir import finished_models, read_summary
from . import pseudolabel, student, teacher
from .contract import run_step

log = logging.getLogger(__name__)


def report_from_summaries(cfg: DictConfig) -> list[dict]:
    """One row per finished model, from the eval metrics each step stored in its summary.json."""
    rows = []
    for round_idx, role, step_dir in finished_models(cfg.run_dir):
        s = read_summary(step_dir)
        rows.append(report_row(round_idx, role, s["model"], s["eval"], step_dir))
    return rows


def run(cfg: DictConfig, accelerator) -> dict:
    rounds = positive_int(cfg, "iterate.rounds")
    # every round's settings are checked before the teacher starts, not when the round comes
    round_cfgs = []
    for k in range(1, rounds + 1):
        round_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(round_cfg):
            round_cfg.round = k
        pseudolabel.STEP.settings(round_cfg)
        student.STEP.settings(round_cfg)
        round_cfgs.append(round_cfg)
    run_step(teacher.STEP, cfg, accelerator)
    rows = report_from_summaries(cfg)
    for round_cfg in round_cfgs:
        run_step(pseudolabel.STEP, round_cfg, accelerator)
        run_step(student.STEP, round_cfg, accelerator)
        rows = report_from_summaries(cfg)
        if accelerator.is_main_process:
            write_report(cfg.run_dir, rows, str(cfg.data.eval))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(markdown_table(rows, str(cfg.data.eval)))
    return {"rounds": rows}
