"""stage=student: the noised round-K student on labeled + round-K pseudo-labeled images.

One forward pass over the concatenated batch [labeled | pseudo-labeled] (shared BatchNorm
statistics); loss = CE(labeled, smoothing) + w * soft CE(pseudo-labeled). The pseudo-labeled stream
reads the unlabeled shards beside their label files and applies the selection while streaming:
an image is dropped, kept, or repeated k times, then shuffled through a buffer."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from omegaconf import DictConfig

from ..config import config_hash, positive_int, steps_per_epoch, worker_nice
from ..data.shards import SampleDecoder, make_loader, training_stream
from ..data.transforms import train_transform
from ..engine import TrainJob
from ..errors import ConfigError, DataError, MissingInputError
from ..labels import LabelFile, label_paths, soft_targets
from ..losses import noisy_student_loss
from ..models import MODEL_INFO, MODEL_WEIGHTS, check_model_name, count_params, create_model, load_weights
from ..presets import student_model
from ..rundir import command_for_round, is_done, model_dir_for_round, pseudolabel_dir, read_json, student_dir
from ..selection import Selection
from .common import finish_training, num_classes, prepare_data, shards, skip_if_done
from .teacher import labeled_batches

log = logging.getLogger(__name__)


class JoinPseudoLabels:
    """webdataset stage: unlabeled samples -> samples with a "target" distribution, each repeated as
    many times as the selection says (0 = dropped). One shard's label file is in memory at a time."""

    def __init__(self, paths: dict, selection: Selection, num_classes: int):
        self.paths, self.selection, self.num_classes = paths, selection, num_classes

    def _table(self, url: str) -> dict:
        f = LabelFile(self.paths[url])
        rep = self.selection.repeats(f["confidence"], f["argmax"].astype(np.int64), f["keyhash"])
        keep = np.flatnonzero(rep)
        targets = soft_targets(f["topk_ids"][keep], f["topk_probs"][keep], self.num_classes, f.hard)
        keys = f.keys()
        return {keys[i]: (int(rep[i]), torch.from_numpy(targets[j])) for j, i in enumerate(keep)}

    def __call__(self, src):
        url, table = None, {}
        for sample in src:
            if sample["__url__"] != url:
                url = sample["__url__"]
                table = self._table(url)
            entry = table.get(sample["__key__"])
            if entry is None:
                continue
            for _ in range(entry[0]):
                yield {**sample, "target": entry[1]}


def load_selection(cfg: DictConfig, nc: int) -> tuple[Selection, dict, list[str], dict]:
    pl = pseudolabel_dir(cfg.run_dir, cfg.round)
    if not is_done(pl):
        raise MissingInputError(
            f"no pseudo-labels for round {cfg.round}: {pl / '_SUCCESS'} does not exist; make them with "
            f"`python -m noisystudent stage=pseudolabel run_dir={cfg.run_dir} round={cfg.round}`")
    sel_json = read_json(pl / "selection.json")
    if int(sel_json["num_classes"]) != nc:
        raise DataError(f"{pl} holds pseudo-labels for {sel_json['num_classes']} classes but data.num_classes={nc}; "
                        f"relabel with `python -m noisystudent stage=pseudolabel round={cfg.round} force=true`")
    selection = Selection.from_json(sel_json)
    total = int(sum(sel_json["counts_after"]))
    if total == 0:
        raise DataError(f"the round-{cfg.round} selection is empty: no pseudo-label reached "
                        f"pseudolabel.threshold={sel_json['threshold']}; lower it (e.g. pseudolabel.threshold=0.1) "
                        "and rerun stage=pseudolabel with force=true")
    urls = shards(cfg, "unlabeled")
    paths = label_paths(urls, pl / "labels")
    urls = [u for u in urls if paths[u].exists()]  # unreadable shards have no label file
    return selection, sel_json, urls, paths


def run(cfg: DictConfig, accelerator) -> dict:
    out = student_dir(cfg.run_dir, cfg.round)
    done = skip_if_done(cfg, out)
    if done is not None:
        return done
    preset = student_model(cfg, int(cfg.round))
    check_model_name(preset.name)
    prepare_data(cfg, accelerator)
    nc = num_classes(cfg)
    s = cfg.student
    drop_rate = preset.drop_rate if s.drop_rate is None else s.drop_rate
    drop_path = preset.drop_path_rate if s.drop_path_rate is None else s.drop_path_rate
    model = create_model(preset.name, nc, drop_rate, drop_path)
    prev_dir = model_dir_for_round(cfg.run_dir, int(cfg.round) - 1)
    teacher_info = read_json(prev_dir / MODEL_INFO) if (prev_dir / MODEL_INFO).exists() else None
    if teacher_info is None:
        prev = int(cfg.round) - 1
        raise MissingInputError(f"no finished round-{prev} model at {prev_dir}; make it with "
                                f"`{command_for_round(cfg.run_dir, prev)}`")
    params = count_params(model)
    if params < teacher_info["params"] and not s.allow_smaller:
        raise ConfigError(
            f"the student {preset.name} has {params:,} parameters, fewer than its teacher {teacher_info['name']} "
            f"({teacher_info['params']:,}); Noisy Student needs an equal-or-larger student. Pick a larger "
            "student.model, or set student.allow_smaller=true")
    selection, sel_json, unl_urls, paths = load_selection(cfg, nc)
    labeled = shards(cfg, "labeled")
    shards(cfg, "eval")

    if s.init == "teacher":
        load_weights(model, prev_dir / MODEL_WEIGHTS)
    elif s.init != "scratch":
        raise ConfigError(f"student.init={s.init!r}: use scratch or teacher")

    tf = train_transform(preset.img_size, cfg.data, s.randaugment)
    batch_size = positive_int(cfg, "train.batch_size")
    ratio = float(s.unlabel_ratio)
    unl_batch = max(1, int(round(ratio * batch_size)))
    global_batch = batch_size * accelerator.num_processes
    n_selected = int(sum(sel_json["counts_after"]))
    epochs = float(s.epochs if s.epochs is not None else cfg.train.epochs)
    # the num_workers decoders are shared by the two streams in proportion to their batch sizes
    # (each at least 1 when any): more processes than that only compete for the same cores
    workers = int(cfg.num_workers)
    lab_workers = min(workers, max(1, round(workers / (1 + ratio)))) if workers else 0
    unl_workers = max(1, workers - lab_workers) if workers else 0
    nice = worker_nice(cfg, accelerator.device)
    lab_batches = labeled_batches(cfg, labeled, tf, batch_size, nice, lab_workers)
    join = JoinPseudoLabels(paths, selection, nc)
    unl_decoder = SampleDecoder(tf, None, labeled=False)
    buffer = int(cfg.train.shuffle_buffer)

    def batches(seed: int):
        lab = lab_batches(seed)
        unl = iter(make_loader(training_stream(unl_urls, unl_decoder, unl_batch, buffer, seed + 17, [join]),
                               unl_workers, worker_nice=nice))
        while True:
            a, b = next(lab), next(unl)
            yield {"images": torch.cat([a["images"], b["images"]]) if b["images"].numel() else a["images"],
                   "labels": a["labels"], "targets": b.get("targets"),
                   "n_corrupt": a["n_corrupt"] + b["n_corrupt"], "shard_errors": a["shard_errors"] + b["shard_errors"]}

    smoothing, weight = float(cfg.train.label_smoothing), float(s.unlabeled_weight)
    job = TrainJob(
        step_dir=out,
        model=model,
        epochs=epochs,
        # an epoch is one pass over the selected pseudo-labeled images
        steps_per_epoch=steps_per_epoch(n_selected, unl_batch * accelerator.num_processes),
        global_batch=global_batch,
        batches=batches,
        loss=lambda logits, b: noisy_student_loss(logits, b["labels"], b.get("targets"), smoothing, weight),
        config_hash=config_hash(cfg),
        extra_summary={
            "round": int(cfg.round),
            "teacher": teacher_info,
            "noise": {"randaugment": s.randaugment, "drop_rate": drop_rate, "drop_path_rate": drop_path},
            "unlabel_ratio": ratio, "unlabeled_batch": unl_batch, "unlabeled_weight": weight,
            "init": s.init, "pseudo_labeled_images": n_selected, "hard_labels": bool(sel_json.get("hard")),
            "labeled_images_per_step": global_batch,
            "loader_workers": {"labeled": lab_workers, "unlabeled": unl_workers},
        },
    )
    info = {"name": preset.name, "img_size": preset.img_size,
            "test_img_size": preset.get("test_img_size") or preset.img_size, "drop_rate": drop_rate,
            "drop_path_rate": drop_path, "role": "student", "round": int(cfg.round)}
    if not math.isfinite(epochs) or epochs <= 0:
        raise ConfigError(f"student.epochs={epochs} must be > 0")
    return finish_training(cfg, accelerator, job, info)
