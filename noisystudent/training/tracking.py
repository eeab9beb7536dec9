"""What a training step reports while it runs: metrics.jsonl in its step directory, and the experiment
tracker chosen by `tracking` (accelerate's tracker classes: TensorBoard, Weights & Biases, MLflow).

Main process only. A resumed step continues the same files without repeating a step: metrics.jsonl
keeps the records up to the checkpoint's step (a killed run may have logged past it) and TensorBoard
drops its events from the next step on (SummaryWriter's purge_step)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..files import atomic_write_bytes

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"  # the event files' folder in the step directory


def _tracker(kind: str, step_dir: Path, first_step: int):
    from accelerate import tracking

    name = step_dir.name if step_dir.parent.name in ("", ".") else f"{step_dir.parent.name}/{step_dir.name}"
    if kind == "tensorboard":
        # TensorBoard reads a folder's event files in name order (events.out.tfevents.<seconds>.<host>...) and
        # applies the last purge it reads: a resumed run's file must sort after the killed run's, so it waits
        # for the next second when that run started in this one
        old = [int(p.name.split(".")[3]) for p in (step_dir / TENSORBOARD).glob("events.out.tfevents.*")
               if p.name.split(".")[3].isdigit()]
        while old and time.time() < max(old) + 1:
            time.sleep(0.05)
        # events of steps >= first_step that a killed run wrote are dropped when this writer starts
        return tracking.TensorBoardTracker(TENSORBOARD, step_dir, purge_step=first_step)
    if kind == "wandb":
        return tracking.WandBTracker(name, dir=str(step_dir))
    return tracking.MLflowTracker(name, logging_dir=str(step_dir))


class MetricsLog:
    """Append one record per log interval; the trackers get the same numbers at the same step."""

    def __init__(self, step_dir: Path, tracking: str, resumed_step: int | None, main: bool):
        self.path, self.main, self.tracker = Path(step_dir) / METRICS, main, None
        if not main:
            return
        kept = b""
        if resumed_step is not None and self.path.exists():
            lines = [ln for ln in self.path.read_bytes().splitlines(keepends=True) if ln.strip()]
            kept = b"".join(ln for ln in lines if _step(ln) is not None and _step(ln) <= resumed_step)
        atomic_write_bytes(self.path, kept)  # a fresh start begins an empty file
        self.file = open(self.path, "ab")  # noqa: SIM115 - held open for the whole step, closed in close()
        if tracking != "none":
            self.tracker = _tracker(tracking, Path(step_dir), (resumed_step or 0) + 1)
            self.tracker.start()

    def log(self, record: dict) -> None:
        if not self.main:
            return
        self.file.write((json.dumps(record) + "\n").encode())
        self.file.flush()
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def close(self) -> None:
        if not self.main:
            return
        self.file.close()
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def _step(line: bytes) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut by a kill mid-write


def read_metrics(step_dir: str | os.PathLike) -> list[dict]:
    path = Path(step_dir) / METRICS
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
