"""stage=teacher: train the first model on data.labeled -> run_dir/teacher/."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ..config import (
    DATA_KEYS,
    TrainSettings,
    eval_keys,
    optional_positive_int,
    read_settings,
    steps_per_epoch,
    train_settings,
    worker_nice,
)
from ..data.dali import index_summary, summary_counts, train_recipe
from ..data.shards import SampleDecoder, count_samples
from ..data.streams import labeled_batches
from ..data.transforms import train_transform
from ..models.build import check_model_name, create_model
from ..rundir import teacher_dir
from ..training.engine import TrainJob
from ..training.losses import noisy_student_loss
from .common import dali_training_stream, eval_shards, num_classes, shards, train_and_export, uses_dali
from .contract import Step, StepRun


@dataclass(frozen=True)
class TeacherSettings:
    train: TrainSettings
    num_classes: int
    labeled_samples: int | None


def settings(cfg: DictConfig) -> TeacherSettings:
    check_model_name(cfg.model.name)
    return TeacherSettings(train_settings(cfg), num_classes(cfg), optional_positive_int(cfg, "data.labeled_samples"))


def reads(cfg: DictConfig) -> dict:
    return read_settings(cfg, ("seed", "precision", "max_steps", "model", "init", "train", "optim", "sched",
                               "data.labeled", "data.eval", "data.labeled_samples", *DATA_KEYS, *eval_keys(cfg)))


def inputs(cfg: DictConfig, s: TeacherSettings) -> dict:
    labeled = shards(cfg, "labeled")
    # fail now, not after training, when the eval pattern is wrong or the robustness plan does not fit the model
    eval_shards(cfg, int(cfg.model.get("test_img_size") or cfg.model.img_size))
    return {"labeled": labeled,
            "n_labeled": count_samples(labeled, "data.labeled", s.labeled_samples, "data.labeled_samples")}


def work(run: StepRun) -> dict:
    cfg, s, accelerator = run.cfg, run.settings, run.accelerator
    m = cfg.model
    model = create_model(m.name, s.num_classes, m.drop_rate, m.drop_path_rate, cfg.init.pretrained, cfg.init.file,
                         cfg.init.checkpoint)
    t = s.train
    global_batch = t.batch_size * accelerator.num_processes
    loader = {"loader": "torch"}
    if uses_dali(cfg):
        batches, records = dali_training_stream(cfg, accelerator, run.inputs["labeled"],
                                                train_recipe(m.img_size, cfg.data, t.randaugment), t.batch_size,
                                                t.shuffle_buffer, labeled=True, nc=s.num_classes)
        found = index_summary(records, run.inputs["labeled"])
        loader = {"loader": "dali", "dali_index": found, **summary_counts(found)}
    else:
        decoder = SampleDecoder(train_transform(m.img_size, cfg.data, t.randaugment), s.num_classes, labeled=True)
        batches = labeled_batches(run.inputs["labeled"], decoder, t.batch_size, t.shuffle_buffer, t.num_workers,
                                  worker_nice(cfg, accelerator.device), pin_memory=accelerator.device.type == "cuda")
    job = TrainJob(
        step_dir=run.out,
        model=model,
        settings=t,
        steps_per_epoch=steps_per_epoch(run.inputs["n_labeled"], global_batch),
        global_batch=global_batch,
        batches=batches,
        loss=lambda logits, b: noisy_student_loss(logits, b["labels"], None, t.label_smoothing, 0.0),
        settings_hash=run.settings_hash,
        extra_summary={"labeled_images": run.inputs["n_labeled"], "randaugment": t.randaugment, **loader},
    )
    info = {"name": m.name, "img_size": m.img_size, "test_img_size": m.get("test_img_size") or m.img_size,
            "drop_rate": m.drop_rate, "drop_path_rate": m.drop_path_rate, "role": "teacher"}
    return train_and_export(run, job, info)


STEP = Step("teacher", settings, reads, inputs, work, out_dir=lambda cfg: teacher_dir(cfg.run_dir))
