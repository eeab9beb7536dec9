"""stage=finetune (round=K): round K's student fine-tuned at its test resolution -> run_dir/round_K/finetune/.

The "FixRes" step of the recipe (Touvron et al. 2019; the Noisy Student paper trains L2 at 475 px and
tests it at 800 px): training with random resized crops shows objects larger than the center crop of
the test transform does, so a model tested at a larger resolution than it trained at sees objects at
the size it learned, but with activation statistics it never saw. A short fine-tune on the labeled
images, transformed as at test time (resize + center crop, no augmentation, no dropout or stochastic
depth), at the test resolution, adapts the deeper layers to it: the shallow stages stay frozen
(`finetune.freeze`) and BatchNorm statistics are re-estimated at the new resolution once training ends.

The fine-tune is a leaf of the loop: round K+1 still learns from round K's student itself, so the
rounds' results do not depend on whether, or how, a round was fine-tuned. A model that trains and tests
at one resolution has nothing to adapt to: the step refuses, saying so, and stage=iterate leaves it out."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from omegaconf import DictConfig

from ..config import (
    DATA_KEYS,
    TrainSettings,
    eval_keys,
    optional_positive_int,
    positive_float,
    read_settings,
    round_number,
    steps_per_epoch,
    train_settings,
    worker_nice,
)
from ..data.dali import eval_recipe, index_summary, summary_counts
from ..data.prefetch import DevicePrefetcher
from ..data.shards import SampleDecoder, count_samples
from ..data.streams import labeled_batches
from ..data.transforms import InputNormalizer, eval_transform, model_norm
from ..errors import ConfigError, MissingInputError
from ..files import read_json
from ..models.build import MODEL_INFO, MODEL_WEIGHTS, check_num_classes, create_model, freeze_stages, load_weights
from ..rundir import command_for_round, finetune_dir, is_done, read_summary, student_dir
from ..training.batchnorm import reestimate_batchnorm
from ..training.engine import TrainJob, stream_seed
from ..training.losses import noisy_student_loss
from .common import dali_training_stream, eval_shards, num_classes, shards, train_and_export, uses_dali
from .contract import Step, StepRun


@dataclass(frozen=True)
class FinetuneSettings:
    train: TrainSettings  # train.* with finetune.epochs / ema_decay, no RandAugment, lr x lr_scale, no warm-up
    round: int
    num_classes: int
    img_size: int | None  # None: the model's test_img_size
    freeze: int | str
    lr_scale: float
    bn_images: int
    labeled_samples: int | None


def settings(cfg: DictConfig) -> FinetuneSettings:
    f = cfg.finetune
    if f.freeze != "auto" and (not isinstance(f.freeze, int) or isinstance(f.freeze, bool) or f.freeze < 0):
        raise ConfigError(f"finetune.freeze={f.freeze!r}: use auto (the stem and the first half of the stages), 0 "
                          "(nothing frozen) or the number of stages to freeze after the stem")
    bn_images = f.bn_images
    if not isinstance(bn_images, int) or isinstance(bn_images, bool) or bn_images < 0:
        raise ConfigError(f"finetune.bn_images={bn_images!r} must be an integer >= 0 (0: keep the statistics "
                          "training ended with)")
    base = train_settings(cfg, overrides="finetune")
    lr_scale = positive_float(f.lr_scale, "finetune.lr_scale")
    optim = dict(base.optim)
    if optim.get("lr") is not None:
        optim["lr"] = float(optim["lr"]) * lr_scale
    else:
        optim["lr_per_256"] = float(optim["lr_per_256"]) * lr_scale
    # no warm-up: the weights are trained already, and a warm-up of the recipe's length would outlast the fine-tune
    sched = {**base.sched, "warmup_epochs": 0}
    return FinetuneSettings(
        train=dataclasses.replace(base, randaugment=None, optim=optim, sched=sched),
        round=round_number(cfg, "stage=finetune fine-tunes round K's student, K >= 1"),
        num_classes=num_classes(cfg),
        img_size=optional_positive_int(cfg, "finetune.img_size"),
        freeze=f.freeze,
        lr_scale=lr_scale,
        bn_images=bn_images,
        labeled_samples=optional_positive_int(cfg, "data.labeled_samples"),
    )


def resolution(info: dict, img_size: int | None) -> int:
    """The resolution a model is fine-tuned for: finetune.img_size, else its preset's test_img_size."""
    return int(img_size or info.get("test_img_size") or info["img_size"])


def nothing_to_adapt(info: dict, img_size: int | None) -> str | None:
    """Why a model cannot be fine-tuned for its test resolution (it trains and tests at one), else None."""
    size = resolution(info, img_size)
    if size != int(info["img_size"]):
        return None
    return (f"{info['name']} trains and is tested at {size} px (test_img_size = img_size): there is no test "
            "resolution to fine-tune for. Set model.test_img_size larger than model.img_size before training "
            "(objects look as large as in training at about img_size x the mean of 1/sqrt(scale) over "
            "data.crop_scale), or finetune.img_size=N to fine-tune for a test at N px")


def reads(cfg: DictConfig) -> dict:
    out = read_settings(cfg, ("seed", "precision", "max_steps", "round", "finetune", "train", "optim", "sched",
                              "data.labeled", "data.eval", "data.labeled_samples", *DATA_KEYS, *eval_keys(cfg)),
                        ("train.epochs", "train.randaugment", *(("train.ema_decay",)
                                                               if cfg.finetune.get("ema_decay") is not None else ())))
    source = student_dir(cfg.run_dir, cfg.round)
    if is_done(source):  # a retrained student is another fine-tune
        out["model (resolved)"] = {"path": str(source), "config_hash": read_summary(source).get("config_hash")}
    return out


def inputs(cfg: DictConfig, s: FinetuneSettings) -> dict:
    source = student_dir(cfg.run_dir, s.round)
    if not is_done(source) or not (source / MODEL_INFO).exists():
        raise MissingInputError(f"no finished round-{s.round} student at {source}; make it with "
                                f"`{command_for_round(cfg.run_dir, s.round)}`")
    info = read_json(source / MODEL_INFO)
    check_num_classes(info["num_classes"], s.num_classes, f"the model in {source}", "fine-tune on data of its classes")
    why = nothing_to_adapt(info, s.img_size)
    if why:
        raise ConfigError(f"stage=finetune round={s.round}: {why}")
    labeled = shards(cfg, "labeled")
    eval_shards(cfg, resolution(info, s.img_size))
    return {"source": source, "info": info, "labeled": labeled,
            "n_labeled": count_samples(labeled, "data.labeled", s.labeled_samples, "data.labeled_samples")}


def work(run: StepRun) -> dict:
    cfg, s, accelerator, inp = run.cfg, run.settings, run.accelerator, run.inputs
    info, t = inp["info"], s.train
    size = resolution(info, s.img_size)
    # no dropout or stochastic depth: the fine-tune adapts the model to the conditions it is tested in
    model = create_model(info["name"], s.num_classes)
    load_weights(model, inp["source"] / MODEL_WEIGHTS)
    frozen = freeze_stages(model, s.freeze)
    global_batch = t.batch_size * accelerator.num_processes
    decoder = SampleDecoder(eval_transform(size, cfg.data), s.num_classes, labeled=True)
    nice, pin = worker_nice(cfg, accelerator.device), accelerator.device.type == "cuda"

    loader = {"loader": "torch"}
    if uses_dali(cfg):  # one DALI stream (its threads: num_workers) serves training and the BatchNorm pass
        dali_stream, records = dali_training_stream(cfg, accelerator, inp["labeled"], eval_recipe(size, cfg.data),
                                                    t.batch_size, t.shuffle_buffer, labeled=True, nc=s.num_classes)
        found = index_summary(records, inp["labeled"])
        loader = {"loader": "dali", "dali_index": found, **summary_counts(found)}

    def stream(workers: int):
        if loader["loader"] == "dali":
            return dali_stream
        return labeled_batches(inp["labeled"], decoder, t.batch_size, t.shuffle_buffer, workers, nice, pin_memory=pin)

    job = TrainJob(
        step_dir=run.out,
        model=model,
        settings=t,
        steps_per_epoch=steps_per_epoch(inp["n_labeled"], global_batch),
        global_batch=global_batch,
        batches=stream(t.num_workers),
        loss=lambda logits, b: noisy_student_loss(logits, b["labels"], None, t.label_smoothing, 0.0),
        settings_hash=run.settings_hash,
        extra_summary={"round": s.round, "source": str(inp["source"]), "img_size": size,
                       "trained_at": int(info["img_size"]), "labeled_images": inp["n_labeled"],
                       "frozen": frozen, "lr_scale": s.lr_scale, **loader},
    )

    def recalibrate(ema_model) -> dict:
        # at most one pass over the labeled images, in batches spread over the processes
        n_batches = math.ceil(min(s.bn_images, inp["n_labeled"]) / global_batch)
        seed = stream_seed(t.seed, accelerator.process_index, offset=17)  # apart from the training stream's
        batches = DevicePrefetcher(stream(min(1, t.num_workers))(seed),
                                   accelerator.device,
                                   InputNormalizer(*model_norm(ema_model), channels_last=t.channels_last))
        try:
            return {"batchnorm_reestimated": reestimate_batchnorm(accelerator, ema_model, batches, n_batches)}
        finally:
            batches.close()

    model_info = {"name": info["name"], "img_size": int(info["img_size"]), "test_img_size": size, "drop_rate": 0.0,
                  "drop_path_rate": 0.0, "role": "finetune", "round": s.round}
    return train_and_export(run, job, model_info, after_training=recalibrate)


STEP = Step("finetune", settings, reads, inputs, work, out_dir=lambda cfg: finetune_dir(cfg.run_dir, cfg.round),
            per_round=True)
