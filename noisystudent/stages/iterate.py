"""stage=iterate: teacher, then for each round pseudolabel -> student (-> finetune, per iterate.finetune)
-> report, skipping every step that is already finished (so a killed run, rerun, continues where it
stopped). Each step runs under the stage contract (contract.py), exactly as when it is launched alone."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ..config import positive_int
from ..errors import ConfigError
from ..models.presets import student_model
from ..reporting.report import REPORT_MD, report_row, write_report
from ..rundir import finished_models, read_summary
from . import finetune, pseudolabel, student, teacher
from .common import kept_robustness, mce_reference
from .contract import run_step

FINETUNE = ("final", "every", "none")

log = logging.getLogger(__name__)


def report_from_summaries(cfg: DictConfig) -> list[dict]:
    """One row per finished model, from the eval metrics each step stored in its summary.json; a model trained
    without the robustness keys keeps the result a later stage=evaluate measured on it, if any."""
    rows = []
    for round_idx, role, step_dir in finished_models(cfg.run_dir):
        s = read_summary(step_dir)
        rows.append(report_row(round_idx, role, s["model"], s["eval"], step_dir, s.get("eval_sets"),
                               s.get("robustness") or kept_robustness(step_dir)))
    return rows


def finetune_plan(cfg: DictConfig, round_cfg: DictConfig, rounds: int) -> tuple[bool, str | None]:
    """(whether round K's student is fine-tuned in the loop, why not when iterate.finetune asked for it)."""
    mode = cfg.iterate.get("finetune", "final")
    if mode not in FINETUNE:
        raise ConfigError(f"iterate.finetune={mode!r}: use final (the last round's student, as the paper), every "
                          "(each round's) or none")
    k = int(round_cfg.round)
    if mode == "none" or (mode == "final" and k != rounds):
        return False, None
    finetune.STEP.settings(round_cfg)
    preset = student_model(round_cfg, k)
    info = {"name": preset.name, "img_size": preset.img_size, "test_img_size": preset.get("test_img_size")}
    why = finetune.nothing_to_adapt(info, round_cfg.finetune.get("img_size"))
    return why is None, why and f"iterate.finetune={mode}: round {k} is not fine-tuned: {why}."


def run(cfg: DictConfig, accelerator) -> dict:
    rounds = positive_int(cfg, "iterate.rounds")
    # every round's settings are checked before the teacher starts, not when the round comes
    round_cfgs, notes = [], []
    for k in range(1, rounds + 1):
        round_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(round_cfg):
            round_cfg.round = k
        pseudolabel.STEP.settings(round_cfg)
        student.STEP.settings(round_cfg)
        tune, why = finetune_plan(cfg, round_cfg, rounds)
        if why:
            notes.append(why)
        round_cfgs.append((round_cfg, tune))
    for note in notes:
        log.info("%s", note)
    reference = mce_reference(cfg)  # checked before the teacher starts, as the rounds' settings
    run_step(teacher.STEP, cfg, accelerator)
    rows = report_from_summaries(cfg)
    for round_cfg, tune in round_cfgs:
        run_step(pseudolabel.STEP, round_cfg, accelerator)
        run_step(student.STEP, round_cfg, accelerator)
        if tune:
            run_step(finetune.STEP, round_cfg, accelerator)
        rows = report_from_summaries(cfg)
        if accelerator.is_main_process:
            write_report(cfg.run_dir, rows, str(cfg.data.eval), notes, reference)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the whole story: the table, the pseudo-labels of each round, per class
        print((Path(cfg.run_dir) / REPORT_MD).read_text())
    return {"rounds": rows, "notes": notes}
