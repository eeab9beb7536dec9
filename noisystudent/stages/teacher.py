"""stage=teacher: train the first model on data.labeled -> run_dir/teacher/."""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import config_hash, positive_int, steps_per_epoch, worker_nice
from ..data.shards import SampleDecoder, count_samples, make_loader, training_stream
from ..data.transforms import train_transform
from ..engine import TrainJob
from ..losses import noisy_student_loss
from ..models import check_model_name, create_model
from ..rundir import teacher_dir
from .common import finish_training, num_classes, prepare_data, shards, skip_if_done


def labeled_batches(cfg: DictConfig, urls: list[str], transform, batch_size: int, nice: int,
                    num_workers: int | None = None):
    """seed -> endless iterator over shuffled, augmented labeled batches (loader workers at `nice`)."""
    workers = int(cfg.num_workers) if num_workers is None else num_workers
    decoder = SampleDecoder(transform, num_classes(cfg), labeled=True)

    def make(seed: int):
        stream = training_stream(urls, decoder, batch_size, int(cfg.train.shuffle_buffer), seed)
        return iter(make_loader(stream, workers, worker_nice=nice))

    return make


def run(cfg: DictConfig, accelerator) -> dict:
    out = teacher_dir(cfg.run_dir)
    done = skip_if_done(cfg, out)
    if done is not None:
        return done
    check_model_name(cfg.model.name)  # config errors before any data is touched
    prepare_data(cfg, accelerator)
    nc = num_classes(cfg)
    labeled = shards(cfg, "labeled")
    shards(cfg, "eval")  # fail now, not after training, when the eval pattern is wrong
    m = cfg.model
    model = create_model(m.name, nc, m.drop_rate, m.drop_path_rate, cfg.init.pretrained, cfg.init.file,
                         cfg.init.checkpoint)
    batch_size = positive_int(cfg, "train.batch_size")
    global_batch = batch_size * accelerator.num_processes
    n_labeled = count_samples(labeled)
    smoothing = float(cfg.train.label_smoothing)
    job = TrainJob(
        step_dir=out,
        model=model,
        epochs=float(cfg.train.epochs),
        steps_per_epoch=steps_per_epoch(n_labeled, global_batch),
        global_batch=global_batch,
        batches=labeled_batches(cfg, labeled, train_transform(m.img_size, cfg.data, cfg.train.randaugment), batch_size,
                                worker_nice(cfg, accelerator.device)),
        loss=lambda logits, b: noisy_student_loss(logits, b["labels"], None, smoothing, 0.0),
        config_hash=config_hash(cfg),
        extra_summary={"labeled_images": n_labeled, "randaugment": cfg.train.randaugment},
    )
    info = {"name": m.name, "img_size": m.img_size, "test_img_size": m.get("test_img_size") or m.img_size,
            "drop_rate": m.drop_rate, "drop_path_rate": m.drop_path_rate, "role": "teacher"}
    return finish_training(cfg, accelerator, job, info)
