"""The run directory: fixed paths per step (no timestamps, so stages find each other by convention),
`summary.json` + `_SUCCESS` markers. Every file of a run is described once, in docs/rundir.md."""

from __future__ import annotations

import os
from pathlib import Path

from .files import atomic_write_bytes, read_json, write_json

SUCCESS = "_SUCCESS"
SUMMARY = "summary.json"


def teacher_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "teacher"


def round_dir(run_dir: str | os.PathLike, round_idx: int) -> Path:
    return Path(run_dir) / f"round_{int(round_idx)}"


def pseudolabel_dir(run_dir: str | os.PathLike, round_idx: int) -> Path:
    return round_dir(run_dir, round_idx) / "pseudolabel"


def student_dir(run_dir: str | os.PathLike, round_idx: int) -> Path:
    return round_dir(run_dir, round_idx) / "student"


def finetune_dir(run_dir: str | os.PathLike, round_idx: int) -> Path:
    return round_dir(run_dir, round_idx) / "finetune"


def model_dir_for_round(run_dir: str | os.PathLike, round_idx: int) -> Path:
    """The model that finished round `round_idx` (round 0 is the teacher): the one the next round learns from.
    A round's test-resolution fine-tune is a leaf beside it, never the next round's teacher."""
    return teacher_dir(run_dir) if int(round_idx) == 0 else student_dir(run_dir, round_idx)


def command_for_round(run_dir: str | os.PathLike, round_idx: int) -> str:
    """The command that makes the model finishing round `round_idx` (for error messages)."""
    if int(round_idx) == 0:
        return f"python -m noisystudent stage=teacher run_dir={run_dir}"
    return f"python -m noisystudent stage=student run_dir={run_dir} round={int(round_idx)}"


def finished_models(run_dir: str | os.PathLike) -> list[tuple[int, str, Path]]:
    """(round, role, step_dir) of every finished model, teacher first, rounds in order; a round's fine-tune
    (role "finetune") right after its student, so the last entry of a round is its final model."""
    found = []
    if is_done(teacher_dir(run_dir)):
        found.append((0, "teacher", teacher_dir(run_dir)))
    k = 1
    while is_done(student_dir(run_dir, k)):
        found.append((k, "student", student_dir(run_dir, k)))
        if is_done(finetune_dir(run_dir, k)):
            found.append((k, "finetune", finetune_dir(run_dir, k)))
        k += 1
    return found


def is_done(step_dir: str | os.PathLike) -> bool:
    return (Path(step_dir) / SUCCESS).exists()


def read_summary(step_dir: str | os.PathLike) -> dict:
    return read_json(Path(step_dir) / SUMMARY)


def mark_done(step_dir: str | os.PathLike, summary: dict) -> None:
    """summary.json first, then the _SUCCESS marker: a step with a marker always has its summary."""
    step_dir = Path(step_dir)
    write_json(step_dir / SUMMARY, summary)
    atomic_write_bytes(step_dir / SUCCESS, b"")
