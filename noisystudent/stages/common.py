"""What the training steps share: the data keys they read, and finishing a trained model
(evaluate its EMA weights on data.eval, export them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..config import EvalSet, eval_sets, positive_int, worker_nice
from ..data.shards import expand_shards
from ..data.transforms import eval_transform
from ..models.build import count_params, eval_img_size, export_model
from ..reporting.evaluation import evaluate
from ..training.engine import TrainJob, fit
from .contract import StepRun

log = logging.getLogger(__name__)


def shards(cfg: DictConfig, which: str) -> list[str]:
    return expand_shards(cfg.data.get(which), f"data.{which}")


def eval_set_shards(cfg: DictConfig) -> list[tuple[EvalSet, list[str]]]:
    """Each of eval.sets with its shards (a ConfigError / DataError naming the set's key when wrong)."""
    return [(es, expand_shards(es.pattern, f"eval.sets.{es.name}.shards")) for es in eval_sets(cfg, num_classes(cfg))]


def eval_shards(cfg: DictConfig) -> list[str]:
    """data.eval's shards, with eval.sets checked too: a training step fails before training, not after it,
    when an eval pattern or class list is wrong."""
    eval_set_shards(cfg)
    return shards(cfg, "eval")


def num_classes(cfg: DictConfig) -> int:
    return positive_int(cfg, "data.num_classes")


DALI_INDEX = "dali_index"  # run_dir/dali_index/: the DALI path's index records of every shard a run read


def uses_dali(cfg: DictConfig) -> bool:
    """data.loader (auto resolved for the device as the stage starts: config.resolve_device_settings)."""
    return cfg.data.get("loader", "torch") == "dali"


def dali_records(cfg: DictConfig, accelerator, urls: list[str]) -> dict:
    """The index pass over `urls` (data/dali_index.py; every process takes part): url -> ShardRecord,
    made once per shard for the run and reused by every later step."""
    from ..data.dali_index import index_shards

    return index_shards(Path(cfg.run_dir) / DALI_INDEX, urls, max(1, int(cfg.num_workers)), accelerator)


def dali_training_stream(cfg: DictConfig, accelerator, urls: list[str], recipe, batch_size: int, shuffle_buffer: int,
                         labeled: bool, nc: int | None, records: dict | None = None, **kw):
    """(seed -> DALI training batches over `urls` (data/dali.py), the index records), after the index pass
    (`records`: those of an index pass the caller already made over `urls`)."""
    from ..data.dali import training_batches

    records = records if records is not None else dali_records(cfg, accelerator, urls)
    return training_batches(urls, records, Path(cfg.run_dir) / DALI_INDEX, recipe, batch_size, shuffle_buffer,
                            max(1, int(cfg.num_workers)), accelerator.device, accelerator.process_index,
                            accelerator.num_processes, labeled, nc, **kw), records


def dali_eval(cfg: DictConfig, img_size: int, data_cfg=None) -> dict | None:
    """What `evaluate` and `run_model` need to read through DALI (None on the torch path); `data_cfg`: where
    crop_pct is read (default cfg.data; predict takes the exported model's)."""
    if not uses_dali(cfg):
        return None
    from ..data.dali import eval_recipe

    return {"index_dir": Path(cfg.run_dir) / DALI_INDEX, "recipe": eval_recipe(img_size, data_cfg or cfg.data)}


def evaluate_model(cfg: DictConfig, accelerator, model, model_info: dict, nc: int, urls: list[str],
                   classes: tuple[int, ...] | None = None, where: str = "data.eval") -> dict:
    """evaluate() on `urls` as every stage calls it: the model's eval resolution, the eval.* / loader settings."""
    size = eval_img_size(model_info)
    return evaluate(accelerator, model, urls, nc, eval_transform(size, cfg.data), int(cfg.eval.batch_size),
                    int(cfg.num_workers), bool(cfg.channels_last), worker_nice(cfg, accelerator.device),
                    dali=dali_eval(cfg, size), classes=classes, where=where)


def on_eval_sets(cfg: DictConfig, accelerator, model, model_info: dict, nc: int,
                 sets: list[tuple[EvalSet, list[str]]]) -> dict:
    """The model's metrics on each of eval.sets (name -> evaluate's metrics; `sets`: eval_set_shards)."""
    out = {}
    for es, urls in sets:
        out[es.name] = evaluate_model(cfg, accelerator, model, model_info, nc, urls, es.classes,
                                      f"eval.sets.{es.name}")
        log.info("eval.sets.%s: top-1 %.4f on %d images", es.name, out[es.name]["top1"], out[es.name]["images"])
    return out


def train_and_export(run: StepRun, job: TrainJob, model_info: dict,
                     after_training: Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Train, evaluate the EMA weights on data.eval, export them (main process); the step's summary.
    `after_training` (every process) may change the EMA model before that, and adds to the summary."""
    cfg, accelerator = run.cfg, run.accelerator
    nc = num_classes(cfg)

    def on_eval_set(model):
        return evaluate_model(cfg, accelerator, model, model_info, nc, shards(cfg, "eval"))

    job.evaluate = on_eval_set  # eval.every_epochs: the same evaluation during training
    ema_model, summary = fit(accelerator, job)
    t0 = time.time()
    if after_training is not None:
        summary = {**summary, **after_training(ema_model)}
    metrics = on_eval_set(ema_model)
    sets = on_eval_sets(cfg, accelerator, ema_model, model_info, nc, eval_set_shards(cfg))
    info = {**model_info, "num_classes": nc, "params": count_params(ema_model)}
    summary = {
        "model": info,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "eval": metrics,
        "eval_sets": sets,
        **summary,
        "eval_wall_s": time.time() - t0,
        "wall_s": summary["train_wall_s"] + time.time() - t0,
    }
    if accelerator.is_main_process:
        export_model(run.out, ema_model, info)
    log.info("%s: top-1 %.4f, top-5 %.4f on %d eval images", run.out, metrics["top1"], metrics["top5"],
             metrics["images"])
    return summary
