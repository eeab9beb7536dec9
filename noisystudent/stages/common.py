"""What the stages share: data resolution, step skipping, finishing a training step."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from ..config import config_hash, positive_int, worker_nice
from ..data import digits
from ..data.shards import expand_shards
from ..data.transforms import eval_transform
from ..engine import CHECKPOINT, TrainJob, fit
from ..evaluation import evaluate
from ..models import count_params, export_model
from ..rundir import SUMMARY, clear_done, is_done, mark_done, read_json

log = logging.getLogger(__name__)


def prepare_data(cfg: DictConfig, accelerator) -> None:
    """Materialize the embedded demo data on first use (main process; the others wait)."""
    if cfg.data.get("name") == "digits":
        if accelerator.is_main_process:
            digits.materialize(cfg.data)
        accelerator.wait_for_everyone()


def shards(cfg: DictConfig, which: str) -> list[str]:
    return expand_shards(cfg.data.get(which), f"data.{which}")


def num_classes(cfg: DictConfig) -> int:
    return positive_int(cfg, "data.num_classes")


def skip_if_done(cfg: DictConfig, step_dir: Path) -> dict | None:
    """The summary of a finished step (it is then skipped), or None after clearing for a forced rerun."""
    if is_done(step_dir) and not cfg.force:
        log.info("%s is finished (%s exists): skipped; force=true reruns it", step_dir, step_dir / "_SUCCESS")
        return read_json(step_dir / SUMMARY)
    if cfg.force:
        clear_done(step_dir)
        ckpt = step_dir / CHECKPOINT
        if ckpt.exists():
            ckpt.unlink()
    return None


def finish_training(cfg: DictConfig, accelerator, job: TrainJob, model_info: dict) -> dict:
    """Train, evaluate the EMA weights on data.eval, export them, write summary.json + _SUCCESS."""
    job.step_dir.mkdir(parents=True, exist_ok=True)
    ema_model, summary = fit(accelerator, cfg, job)
    t0 = time.time()
    nc = num_classes(cfg)
    img = int(model_info.get("test_img_size") or model_info["img_size"])
    metrics = evaluate(accelerator, ema_model, shards(cfg, "eval"), nc, eval_transform(img, cfg.data),
                       int(cfg.eval.batch_size), int(cfg.num_workers), bool(cfg.channels_last),
                       worker_nice(cfg, accelerator.device))
    info = {**model_info, "num_classes": nc, "params": count_params(ema_model)}
    summary = {
        "model": info,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "eval": metrics,
        **summary,
        "eval_wall_s": time.time() - t0,
        "wall_s": summary["train_wall_s"] + time.time() - t0,
        "config_hash": config_hash(cfg),
    }
    if accelerator.is_main_process:
        export_model(job.step_dir, ema_model, info)
        mark_done(job.step_dir, summary)
    accelerator.wait_for_everyone()
    log.info("%s: top-1 %.4f, top-5 %.4f on %d eval images", job.step_dir, metrics["top1"], metrics["top5"],
             metrics["images"])
    return summary

