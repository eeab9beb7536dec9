"""What the training steps share: the data keys they read, and finishing a trained model
(evaluate its EMA weights on data.eval, export them)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..config import EvalSet, eval_sets, positive_int, worker_nice
from ..data.corruptions import RobustnessPlan, first_images_quota, robustness_plan
from ..data.shards import count_samples, expand_shards
from ..data.transforms import eval_resize_crop, eval_transform
from ..errors import ConfigError
from ..models.build import MODEL_WEIGHTS, count_params, eval_img_size, export_model
from ..reporting.evaluation import evaluate, evaluate_views
from ..rundir import read_summary
from ..training.engine import TrainJob, fit
from .contract import StepRun

log = logging.getLogger(__name__)


def shards(cfg: DictConfig, which: str) -> list[str]:
    return expand_shards(cfg.data.get(which), f"data.{which}")


def eval_set_shards(cfg: DictConfig) -> list[tuple[EvalSet, list[str]]]:
    """Each of eval.sets with its shards (a ConfigError / DataError naming the set's key when wrong)."""
    return [(es, expand_shards(es.pattern, f"eval.sets.{es.name}.shards")) for es in eval_sets(cfg, num_classes(cfg))]


def eval_shards(cfg: DictConfig, eval_size: int) -> list[str]:
    """data.eval's shards, with eval.sets and the robustness keys checked too (for a model evaluated at
    `eval_size` px): a training step fails before training, not after it, when an eval pattern, class list or
    corruption is wrong."""
    eval_set_shards(cfg)
    check_robustness(cfg, robustness_plan(cfg.eval), eval_size, "this step's model")
    return shards(cfg, "eval")


def check_robustness(cfg: DictConfig, plan: RobustnessPlan, eval_size: int, where: str) -> None:
    """A ConfigError when the eval transform at `eval_size` px cannot carry `plan` (corruptions under 32 px, a
    translate sequence with no room to move); `where` names the model."""
    if plan.active:
        plan.check_geometry(_resized(eval_size, cfg), eval_size, f"{where} ({eval_size} px)")


def _resized(size: int, cfg: DictConfig) -> int:
    """The short side the eval transform resizes to before its center crop of `size` px."""
    resize = eval_resize_crop(size, cfg.data).transforms[0]
    return int(resize.size if isinstance(resize.size, int) else min(resize.size))


def num_classes(cfg: DictConfig) -> int:
    return positive_int(cfg, "data.num_classes")


DALI_INDEX = "dali_index"  # run_dir/dali_index/: the DALI path's index records of every shard a run read


def uses_dali(cfg: DictConfig) -> bool:
    """data.loader (auto resolved for the device as the stage starts: config.resolve_device_settings)."""
    return cfg.data.get("loader", "torch") == "dali"


def dali_index_dir(cfg: DictConfig) -> Path:
    """Where the index pass keeps its records: data.index_cache (a folder many runs share: each shard is then
    checked once per data set, not once per run) or run_dir/dali_index/."""
    cache = cfg.data.get("index_cache")
    return Path(str(cache)).expanduser() if cache else Path(cfg.run_dir) / DALI_INDEX


def dali_records(cfg: DictConfig, accelerator, urls: list[str]):
    """The index pass over `urls` (data/dali_index.py; every process takes part): ShardRecords (url -> ShardRecord,
    read when asked for), made once per shard and reused by every later step (and run, with data.index_cache)."""
    from ..data.dali_index import index_shards

    return index_shards(dali_index_dir(cfg), urls, max(1, int(cfg.num_workers)), accelerator)


def dali_training_stream(cfg: DictConfig, accelerator, urls: list[str], recipe, batch_size: int, shuffle_buffer: int,
                         labeled: bool, nc: int | None, records: dict | None = None, **kw):
    """(seed -> DALI training batches over `urls` (data/dali.py), the index records), after the index pass
    (`records`: those of an index pass the caller already made over `urls`)."""
    from ..data.dali import training_batches

    records = records if records is not None else dali_records(cfg, accelerator, urls)
    return training_batches(urls, records, dali_index_dir(cfg), recipe, batch_size, shuffle_buffer,
                            max(1, int(cfg.num_workers)), accelerator.device, accelerator.process_index,
                            accelerator.num_processes, labeled, nc, **kw), records


def dali_eval(cfg: DictConfig, img_size: int, data_cfg=None) -> dict | None:
    """What `evaluate` and `run_model` need to read through DALI (None on the torch path); `data_cfg`: where
    crop_pct is read (default cfg.data; predict takes the exported model's)."""
    if not uses_dali(cfg):
        return None
    from ..data.dali import eval_recipe

    return {"index_dir": dali_index_dir(cfg), "recipe": eval_recipe(img_size, data_cfg or cfg.data)}


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


def evaluate_robustness(cfg: DictConfig, accelerator, models: list[tuple[torch.nn.Module, dict]], nc: int,
                        urls: list[str], plan: RobustnessPlan | None = None) -> list[dict | None]:
    """Each (model, its model.json info) on data.eval's corrupted and perturbed views (eval.corruptions,
    eval.perturbations); None for each when both are off. Models evaluated at the same resolution share one
    pass: each corrupted image is made once for all of them."""
    plan = plan or robustness_plan(cfg.eval)
    if not plan.active:
        return [None] * len(models)
    quota = None
    if plan.images is not None:  # the first N images in shard order, whatever the process and worker counts
        quota = first_images_quota(urls, [count_samples([u], "data.eval") for u in urls], plan.images)
    out: list[dict | None] = [None] * len(models)
    for size in sorted({eval_img_size(info) for _, info in models}):
        which = [i for i, (_, info) in enumerate(models) if eval_img_size(info) == size]
        resize = eval_resize_crop(size, cfg.data).transforms[0]
        results = evaluate_views(accelerator, [models[i][0] for i in which], urls, nc, resize, size, plan,
                                 int(cfg.eval.batch_size), int(cfg.num_workers), bool(cfg.channels_last),
                                 worker_nice(cfg, accelerator.device), quota)
        for i, res in zip(which, results, strict=True):
            out[i] = res
            log.info("robustness of %s at %d px: clean top-1 %.4f on %d images, %d corruptions x %d severities, "
                     "%d perturbations", models[i][1]["name"], size, res["clean"]["top1"], res["images"],
                     len(plan.corruptions), len(plan.severities), len(plan.perturbations))
    return out


def mce_reference(cfg: DictConfig) -> tuple[dict, str] | None:
    """eval.mce_reference: None (the run's teacher: the report takes its row), else (the finished step's
    robustness result, its name). The result is the step's own (its summary.json, when it was trained with the
    robustness keys) or the one `stage=evaluate` wrote for it in its run's report.json; a reference measured on
    other corruptions is a ConfigError naming both."""
    path = cfg.eval.get("mce_reference")
    if not path:
        return None
    step = Path(path)
    try:
        own = read_summary(step).get("robustness")
    except (OSError, ValueError) as e:
        raise ConfigError(f"eval.mce_reference={path!r}: not a finished step's directory ({e}); give one whose "
                          "summary.json has a robustness result, or null for this run's teacher") from None
    plan = robustness_plan(cfg.eval).settings()
    found = [res for res in (own, *_reported_robustness(step)) if res]
    for res in found:
        if res["plan"] == plan:
            return res, str(path)
    raise ConfigError(f"eval.mce_reference={path!r} was evaluated on {[r['plan'] for r in found] or None}, this run "
                      f"on {plan}: evaluate the reference with the same eval.corruptions, severities, perturbations, "
                      "corruption_images and corruption_seed (stage=evaluate on its run), or set it to null")


def weights_fingerprint(step_dir) -> str:
    """Which exported weights a result was measured on: their file's size and modification time (a step trained
    again writes new ones)."""
    st = (Path(step_dir) / MODEL_WEIGHTS).stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def kept_robustness(step_dir: Path) -> dict | None:
    """The robustness result `stage=evaluate` wrote into the run's report.json for this step, if it measured the
    step's current weights: a report rebuilt from the summaries (stage=iterate) keeps it instead of losing it."""
    try:
        now = weights_fingerprint(step_dir)
    except OSError:
        return None
    return next((res for res in _reported_robustness(step_dir) if res.get("weights") == now), None)


def _reported_robustness(step: Path):
    """The robustness results report.json holds for `step` (a teacher/ or round_K/<step> directory), found in the
    run directory above it. Rows are matched on the step's place in its run (teacher, round_2/student), not on
    the absolute path the report recorded, so a run directory that was moved or copied still serves."""
    for run_dir in (step.parent, step.parent.parent):
        report = run_dir / "report.json"
        if not report.is_file():
            continue
        try:
            rows = json.loads(report.read_text()).get("rounds") or []
        except ValueError:
            continue  # a report being rewritten or damaged is no reference; the error then says what was found
        place = step.resolve().relative_to(run_dir.resolve()).parts
        for row in rows:
            if row.get("robustness") and Path(row.get("path", "")).parts[-len(place):] == place:
                yield row["robustness"]


def train_and_export(run: StepRun, job: TrainJob, model_info: dict,
                     after_training: Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Train, evaluate the EMA weights on data.eval, export them (main process); the step's summary.
    `after_training` (every process) may change the EMA model before that, and adds to the summary."""
    cfg, accelerator = run.cfg, run.accelerator
    nc = num_classes(cfg)

    def on_eval_set(model):
        return evaluate_model(cfg, accelerator, model, model_info, nc, shards(cfg, "eval"))

    # eval.every_epochs: the same evaluation during training, on data.val where it is set, so that eval.keep=best
    # chooses an epoch without looking at the set the step is scored on
    chosen_on = choice_set(cfg)
    if chosen_on == "data.eval":
        job.evaluate = on_eval_set
    else:
        periodic = shards(cfg, chosen_on.split(".")[1])
        job.evaluate = lambda model: evaluate_model(cfg, accelerator, model, model_info, nc, periodic)
    job.extra_summary = {**job.extra_summary, "periodic_eval_set": chosen_on}
    if chosen_on == "data.eval" and job.settings.eval_keep == "best":  # keep=best implies eval.every_epochs
        job.extra_summary["chosen_on_eval_set"] = True
        warn_chosen_on_eval("eval.keep=best chooses the epoch")
    ema_model, summary = fit(accelerator, job)
    t0 = time.time()
    if after_training is not None:
        summary = {**summary, **after_training(ema_model)}
    metrics = on_eval_set(ema_model)
    sets = on_eval_sets(cfg, accelerator, ema_model, model_info, nc, eval_set_shards(cfg))
    robustness = evaluate_robustness(cfg, accelerator, [(ema_model, model_info)], nc, shards(cfg, "eval"))[0]
    info = {**model_info, "num_classes": nc, "params": count_params(ema_model)}
    summary = {
        "model": info,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "eval": metrics,
        "eval_sets": sets,
        **({"robustness": robustness} if robustness is not None else {}),
        **summary,
        "eval_wall_s": time.time() - t0,
        "wall_s": summary["train_wall_s"] + time.time() - t0,
    }
    if accelerator.is_main_process:
        export_model(run.out, ema_model, info)
    log.info("%s: top-1 %.4f, top-5 %.4f on %d eval images", run.out, metrics["top1"], metrics["top5"],
             metrics["images"])
    return summary


def choice_set(cfg: DictConfig, *first: str) -> str:
    """The labeled set a choice reads (an epoch, a temperature): the first of `first` (e.g. data.calibration) that is
    set, else data.val (held out, never trained on), else data.eval: the set the report scores, so a choice made on
    it is flagged (`warn_chosen_on_eval`, "chosen on the eval set" in the summary and report.md)."""
    return next((k for k in (*first, "data.val") if cfg.data.get(k.split(".")[1])), "data.eval")


def warn_chosen_on_eval(what: str) -> None:
    log.warning("%s on data.eval, the set the report scores (no data.val is set): what it reports is optimistic. Set "
                "data.val to held-out labeled shards (stage=import stage.holdout=0.1 makes them)", what)


def class_names(cfg: DictConfig, num_classes: int) -> list[str] | None:
    """Names from classes.json beside the labeled shards (written by stage=import), if there is one."""
    labeled = cfg.data.get("labeled")
    first = str(labeled if isinstance(labeled, str) else list(labeled)[0]) if labeled else ""
    if not first or "://" in first or first.startswith("pipe:"):
        return None
    path = Path(first.split("{")[0]).parent / "classes.json"
    if not path.exists():
        return None
    names = json.loads(path.read_text())
    names = list(names) if isinstance(names, list) else [k for k, _ in sorted(names.items(), key=lambda kv: kv[1])]
    return names if len(names) == num_classes else None
