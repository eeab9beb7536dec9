"""stage=student: the noised round-K student on labeled + round-K pseudo-labeled images.

One forward pass over the concatenated batch [labeled | pseudo-labeled] (shared BatchNorm
statistics); loss = CE(labeled, smoothing) + w * soft CE(pseudo-labeled). The pseudo-labeled stream
reads the unlabeled shards beside their label files and applies the selection while streaming:
an image is dropped, kept, or repeated k times, then shuffled through a buffer (data/streams.py).
With student.targets=online the targets come from the teacher on the student's augmented view
instead of the label files (online_targets.py)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ..config import (
    DATA_KEYS,
    OWN_TRAIN_KEYS,
    TrainSettings,
    eval_keys,
    read_settings,
    round_number,
    steps_per_epoch,
    train_settings,
    worker_nice,
)
from ..data.dali import index_summary, pseudo_labeled_index, summary_counts, train_recipe
from ..data.labels import label_paths
from ..data.shards import SampleDecoder
from ..data.streams import JoinPseudoLabels, labeled_batches, mixed_batches, pseudo_labeled_batches
from ..data.transforms import train_transform
from ..errors import ConfigError, DataError, MissingInputError
from ..files import read_json
from ..models.build import (
    MODEL_INFO,
    MODEL_WEIGHTS,
    check_model_name,
    check_num_classes,
    count_params,
    create_model,
    load_exported_model,
    load_weights,
)
from ..models.presets import student_model
from ..pseudolabels.selection import Selection
from ..rundir import command_for_round, is_done, model_dir_for_round, pseudolabel_dir, read_summary, student_dir
from ..training.engine import TrainJob
from ..training.losses import noisy_student_loss
from ..training.online_targets import OnlineTargets
from .common import (
    DALI_INDEX,
    dali_records,
    dali_training_stream,
    eval_shards,
    num_classes,
    shards,
    train_and_export,
    uses_dali,
)
from .contract import Step, StepRun


@dataclass(frozen=True)
class StudentSettings:
    train: TrainSettings  # train.* with student.epochs / randaugment / ema_decay / grad_clip where set
    round: int
    num_classes: int
    preset: dict  # name, img_size, test_img_size
    drop_rate: float
    drop_path_rate: float
    unlabel_ratio: float
    unlabeled_weight: float
    init: str
    allow_smaller: bool
    targets: str  # offline (the label files' targets) | online (the teacher on the student's view)


INIT_CHOICES = ("scratch", "teacher", "teacher_if_same")


def teacher_model_name(cfg: DictConfig, round_idx: int) -> str:
    """The model the round's teacher is, from the config: the `model` preset in round 1, the previous round's
    student from round 2 on."""
    return str(cfg.model.name if round_idx <= 1 else student_model(cfg, round_idx - 1).name)


def resolved_init(cfg: DictConfig, round_idx: int) -> str:
    """student.init as this round applies it. teacher_if_same starts from the teacher's weights only where the
    student is the teacher's model (recipe=small: from round 2 on, where both are test_resnet): weights of another
    architecture would mostly not fit, and a student of the teacher's model that starts from it keeps what it knew."""
    init = str(cfg.student.init)
    if init == "teacher_if_same":
        same = student_model(cfg, round_idx).name == teacher_model_name(cfg, round_idx)
        return "teacher" if same else "scratch"
    return init


def settings(cfg: DictConfig) -> StudentSettings:
    st = cfg.student
    round_idx = round_number(cfg)
    if st.get("targets", "offline") not in ("offline", "online"):
        raise ConfigError(f"student.targets={st.get('targets')!r}: use offline (the label files' targets, as the "
                          "paper) or online (the teacher labels the student's augmented view at every step)")
    if st.init not in INIT_CHOICES:
        raise ConfigError(f"student.init={st.init!r}: use scratch (the paper), teacher or teacher_if_same (the "
                          "teacher's weights where the student is the teacher's model, scratch otherwise)")
    if not isinstance(st.unlabel_ratio, int | float) or st.unlabel_ratio <= 0:
        raise ConfigError(f"student.unlabel_ratio={st.unlabel_ratio!r} must be > 0 (the paper: 1 for B0, 3 above)")
    if not isinstance(st.unlabeled_weight, int | float) or st.unlabeled_weight < 0:
        raise ConfigError(f"student.unlabeled_weight={st.unlabeled_weight!r} must be >= 0")
    preset = student_model(cfg, round_idx)
    check_model_name(preset.name)
    return StudentSettings(
        train=train_settings(cfg, overrides="student"),
        round=round_idx,
        num_classes=num_classes(cfg),
        preset={"name": preset.name, "img_size": int(preset.img_size),
                "test_img_size": int(preset.get("test_img_size") or preset.img_size)},
        drop_rate=float(preset.drop_rate if st.drop_rate is None else st.drop_rate),
        drop_path_rate=float(preset.drop_path_rate if st.drop_path_rate is None else st.drop_path_rate),
        unlabel_ratio=float(st.unlabel_ratio),
        unlabeled_weight=float(st.unlabeled_weight),
        init=resolved_init(cfg, round_idx),
        allow_smaller=bool(st.allow_smaller),
        targets=str(st.get("targets", "offline")),
    )


def reads(cfg: DictConfig) -> dict:
    # A train.* key that the student's own key of the same name replaces is not read (train.randaugment is
    # the teacher's noise unless student.randaugment is null). The preset is taken as resolved (not
    # iterate.models, whose other rounds do not matter here).
    drop = ["student.model", "student.init"]
    for key in OWN_TRAIN_KEYS:
        if cfg.student.get(key) is not None:
            drop.append(f"train.{key}")
    preset = student_model(cfg, int(cfg.round))
    # student.init as resolved for this round: teacher_if_same reads as the scratch or teacher it gives, so a
    # round it does not change keeps its finished step
    return {**read_settings(cfg, ("seed", "precision", "max_steps", "round", "student", "train", "optim", "sched",
                                  "data.labeled", "data.unlabeled", "data.eval", *DATA_KEYS, *eval_keys(cfg)), drop),
            "student.model (resolved)": {k: preset.get(k) for k in ("name", "img_size", "test_img_size",
                                                                     "drop_rate", "drop_path_rate")},
            "student.init": resolved_init(cfg, int(cfg.round))}


def inputs(cfg: DictConfig, s: StudentSettings) -> dict:
    prev = s.round - 1
    prev_dir = model_dir_for_round(cfg.run_dir, prev)
    if not is_done(prev_dir) or not (prev_dir / MODEL_INFO).exists():
        raise MissingInputError(f"no finished round-{prev} model at {prev_dir}; make it with "
                                f"`{command_for_round(cfg.run_dir, prev)}`")
    pl = pseudolabel_dir(cfg.run_dir, s.round)
    if not is_done(pl):
        raise MissingInputError(
            f"no pseudo-labels for round {s.round}: {pl / '_SUCCESS'} does not exist; make them with "
            f"`python -m noisystudent stage=pseudolabel run_dir={cfg.run_dir} round={s.round}`")
    sel_json = read_json(pl / "selection.json")
    check_num_classes(sel_json["num_classes"], s.num_classes, f"the round-{s.round} selection ({pl})",
                      f"relabel with `python -m noisystudent stage=pseudolabel round={s.round} force=true`")
    if int(sum(sel_json["counts_after"])) == 0:
        raise DataError(f"the round-{s.round} selection is empty: no pseudo-label reached "
                        f"pseudolabel.threshold={sel_json['threshold']}; lower it (e.g. pseudolabel.threshold=0.1) "
                        "and rerun stage=pseudolabel with force=true")
    urls = shards(cfg, "unlabeled")
    paths = label_paths(urls, pl / "labels")
    eval_shards(cfg, s.preset["test_img_size"])
    return {"teacher_dir": prev_dir, "teacher": read_json(prev_dir / MODEL_INFO), "selection": sel_json,
            "label_temperature": float(read_summary(pl).get("temperature", 1.0)),
            "labeled": shards(cfg, "labeled"), "paths": paths,
            "unlabeled": [u for u in urls if paths[u].exists()]}  # unreadable shards have no label file


def work(run: StepRun) -> dict:
    cfg, s, accelerator, inp = run.cfg, run.settings, run.accelerator, run.inputs
    t, name = s.train, s.preset["name"]
    model = create_model(name, s.num_classes, s.drop_rate, s.drop_path_rate)
    teacher, params = inp["teacher"], count_params(model)
    if params < teacher["params"] and not s.allow_smaller:
        raise ConfigError(
            f"the student {name} has {params:,} parameters, fewer than its teacher {teacher['name']} "
            f"({teacher['params']:,}); Noisy Student needs an equal-or-larger student. Pick a larger "
            "student.model, or set student.allow_smaller=true")
    if s.init == "teacher":
        load_weights(model, inp["teacher_dir"] / MODEL_WEIGHTS)

    tf = train_transform(s.preset["img_size"], cfg.data, t.randaugment)
    unl_batch = max(1, int(round(s.unlabel_ratio * t.batch_size)))
    global_batch = t.batch_size * accelerator.num_processes
    n_selected = int(sum(inp["selection"]["counts_after"]))
    # the num_workers decoders are shared by the two streams in proportion to their batch sizes
    # (each at least 1 when any): more processes than that only compete for the same cores
    workers = t.num_workers
    lab_workers = min(workers, max(1, round(workers / (1 + s.unlabel_ratio)))) if workers else 0
    unl_workers = max(1, workers - lab_workers) if workers else 0
    nice = worker_nice(cfg, accelerator.device)
    selection = Selection.from_json(inp["selection"])
    join = JoinPseudoLabels(inp["paths"], selection, s.num_classes)
    online = None
    if s.targets == "online":  # the labels' own temperature (the fitted one after pseudolabel.calibrate)
        online = OnlineTargets(load_exported_model(inp["teacher_dir"], "")[0], model, accelerator,
                               inp["label_temperature"], bool(inp["selection"].get("hard")),
                               inp["selection"].get("class_weights") if selection.corrects_targets else None)

    def loss(logits, b):
        targets = b.get("targets")
        if online is not None and targets is not None:
            targets = online(b["images"][len(b["labels"]):])
        return noisy_student_loss(logits, b["labels"], targets, t.label_smoothing, s.unlabeled_weight)

    loader = {"loader": "torch", "loader_workers": {"labeled": lab_workers, "unlabeled": unl_workers}}
    if uses_dali(cfg):
        labeled, unlabeled, loader = dali_streams(run, tf_recipe=train_recipe(s.preset["img_size"], cfg.data,
                                                                              t.randaugment), unl_batch=unl_batch)
    else:
        labeled = labeled_batches(inp["labeled"], SampleDecoder(tf, s.num_classes, labeled=True), t.batch_size,
                                  t.shuffle_buffer, lab_workers, nice)
        unlabeled = pseudo_labeled_batches(inp["unlabeled"], join, SampleDecoder(tf, None, labeled=False), unl_batch,
                                           t.shuffle_buffer, unl_workers, nice)
    batches = mixed_batches(labeled, unlabeled, pin_memory=accelerator.device.type == "cuda")
    job = TrainJob(
        step_dir=run.out,
        model=model,
        settings=t,
        # an epoch is one pass over the selected pseudo-labeled images
        steps_per_epoch=steps_per_epoch(n_selected, unl_batch * accelerator.num_processes),
        global_batch=global_batch,
        batches=batches,
        loss=loss,
        settings_hash=run.settings_hash,
        extra_summary={
            "round": s.round,
            "teacher": teacher,
            "noise": {"randaugment": t.randaugment, "drop_rate": s.drop_rate, "drop_path_rate": s.drop_path_rate},
            "unlabel_ratio": s.unlabel_ratio, "unlabeled_batch": unl_batch, "unlabeled_weight": s.unlabeled_weight,
            "init": s.init, "targets": s.targets,
            "pseudo_labeled_images": n_selected, "hard_labels": bool(inp["selection"].get("hard")),
            "labeled_images_per_step": global_batch,
            **loader,
        },
    )
    info = {**s.preset, "drop_rate": s.drop_rate, "drop_path_rate": s.drop_path_rate, "role": "student",
            "round": s.round}
    return train_and_export(run, job, info)


def dali_streams(run: StepRun, tf_recipe, unl_batch: int):
    """The student's two streams through DALI (data/dali.py): the labeled one, and the pseudo-labeled one
    reading index files that list each selected image as often as the selection repeats it (in the step's
    dali_index/, remade at every start: they follow the selection). Each stream's pipeline has num_workers
    threads."""
    cfg, s, accelerator, inp = run.cfg, run.settings, run.accelerator, run.inputs
    t = s.train
    labeled, lab_records = dali_training_stream(cfg, accelerator, inp["labeled"], tf_recipe, t.batch_size,
                                                t.shuffle_buffer, labeled=True, nc=s.num_classes)
    unl_records = dali_records(cfg, accelerator, inp["unlabeled"])
    index_files, fill, listed = pseudo_labeled_index(
        unl_records, inp["unlabeled"], inp["paths"], Selection.from_json(inp["selection"]), s.num_classes,
        run.out / DALI_INDEX, accelerator.process_index, accelerator.num_processes)
    unlabeled, _ = dali_training_stream(cfg, accelerator, inp["unlabeled"], tf_recipe, unl_batch, t.shuffle_buffer,
                                        labeled=False, nc=None, records=unl_records, seed_offset=17,
                                        index_files=index_files, targets=fill)
    lab_found, unl_found = index_summary(lab_records, inp["labeled"]), index_summary(unl_records, inp["unlabeled"])
    return labeled, unlabeled, {"loader": "dali", **summary_counts(lab_found, unl_found), "dali_index": {
        "labeled": lab_found, "unlabeled": {**unl_found, "listed_by_process_0": listed}}}


STEP = Step("student", settings, reads, inputs, work, out_dir=lambda cfg: student_dir(cfg.run_dir, cfg.round),
            per_round=True)
