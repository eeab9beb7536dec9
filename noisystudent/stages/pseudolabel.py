"""stage=pseudolabel: label data.unlabeled with the model that finished round K-1.

Each process takes a disjoint set of shards (shards[rank::world]) and writes one label file per
shard; a file is renamed into place only when whole, and a rerun skips shards that have one, so
a killed job loses only the shards in flight. Then the main process computes the selection
(confidence filter + class balancing) from per-class statistics and writes selection.json."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import IterableDataset, get_worker_info

from ..config import worker_nice
from ..data.shards import SampleDecoder, collate_counting, make_loader, rank_shards
from ..data.transforms import InputNormalizer, eval_transform, model_norm
from ..errors import ConfigError, DataError
from ..inference import prepare
from ..labels import ERROR_SUFFIX, SUFFIX, LabelFile, label_paths, probs_to_topk, write_label_file
from ..models import load_exported_model
from ..rundir import command_for_round, mark_done, model_dir_for_round, pseudolabel_dir, read_json, write_json
from ..selection import HIST_BINS, class_statistics, select
from .common import num_classes, prepare_data, shards, skip_if_done

log = logging.getLogger(__name__)

SELECTION = "selection.json"


def check_settings(cfg: DictConfig) -> None:
    p = cfg.pseudolabel
    if not 0.0 < float(p.threshold) < 1.0:
        raise ConfigError(f"pseudolabel.threshold={p.threshold} must be in (0, 1) (the paper uses 0.3)")
    if not isinstance(p.topk, int) or p.topk < 1:
        raise ConfigError(f"pseudolabel.topk={p.topk!r} must be an integer >= 1")
    if float(p.temperature) <= 0:
        raise ConfigError(f"pseudolabel.temperature={p.temperature} must be > 0")
    if int(cfg.round) < 1:
        raise ConfigError(f"round={cfg.round} must be >= 1 (round 1 is labeled by the teacher)")


def error_path(label_path: Path) -> Path:
    """Where an unreadable shard's reason is kept (beside where its label file would be)."""
    return label_path.with_name(label_path.name.replace(SUFFIX, ERROR_SUFFIX))


class ShardBatches(IterableDataset):
    """Batches that never cross a shard. Each worker reads whole shards; a shard's last batch has
    last=True, and a shard that cannot be read yields one batch with its error instead."""

    def __init__(self, urls: list[str], decoder: SampleDecoder, batch_size: int):
        self.urls, self.decoder, self.batch_size = urls, decoder, batch_size

    def __iter__(self):
        import webdataset as wds

        info = get_worker_info()
        mine = self.urls[info.id::info.num_workers] if info else self.urls
        for url in mine:
            pending: list[dict] = []
            try:
                for sample in wds.tarfile_samples([{"url": url}]):
                    pending.append(self.decoder(sample))
                    if len(pending) == self.batch_size:
                        yield {**collate_counting(pending), "shard": url, "last": False}
                        pending = []
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - an unreadable shard is reported, not fatal
                yield {"shard": url, "error": f"{type(e).__name__}: {e}", "last": True}
                continue
            yield {**collate_counting(pending), "shard": url, "last": True}


def label_shards(cfg: DictConfig, accelerator, model, transform, normalize: InputNormalizer, img_size: int,
                 todo: list[str], paths: dict[str, Path], nc: int) -> dict:
    """Label the shards in `todo` (this process's share); returns this process's counts."""
    p = cfg.pseudolabel
    device = accelerator.device
    decoder = SampleDecoder(transform, None, labeled=False, draft_size=img_size if p.jpeg_draft else None)
    loader = make_loader(ShardBatches(todo, decoder, int(p.batch_size)), int(cfg.num_workers), len(todo),
                         worker_nice(cfg, accelerator.device))
    meta = {"num_classes": nc, "topk": min(int(p.topk), nc), "temperature": float(p.temperature), "hard": bool(p.hard)}
    parts: dict[str, list] = {}
    corrupt: dict[str, list[str]] = {}
    stats = {"images": 0, "corrupt": 0, "shards_done": 0, "unreadable": {}}
    temperature = float(p.temperature)
    with torch.inference_mode():
        for batch in loader:
            url = batch["shard"]
            if "error" in batch:
                parts.pop(url, None)
                corrupt.pop(url, None)
                if p.strict_shards:
                    raise DataError(f"shard {url} cannot be read ({batch['error']}); pseudolabel.strict_shards=true "
                                    "makes this fatal: fix or drop the shard")
                log.warning("shard %s cannot be read (%s): skipped", url, batch["error"])
                stats["unreadable"][url] = batch["error"]
                write_json(error_path(paths[url]), {"shard": url, "error": batch["error"]})
                continue
            corrupt.setdefault(url, []).extend(batch["corrupt_keys"])
            if batch["images"].numel():
                images = normalize(batch["images"].to(device, non_blocking=True))
                with accelerator.autocast():
                    logits = model(images)
                probs = torch.softmax(logits.float() / temperature, dim=1)
                parts.setdefault(url, []).append((batch["keys"], *probs_to_topk(probs, meta["topk"])))
            if batch["last"]:
                chunks = parts.pop(url, [])
                keys = [k for c in chunks for k in c[0]]
                cat = [np.concatenate([c[i] for c in chunks]) if chunks else None for i in range(1, 5)]
                bad = corrupt.pop(url, [])
                write_label_file(paths[url], url, keys, *cat, bad, meta)
                stats["images"] += len(keys)
                stats["corrupt"] += len(bad)
                stats["shards_done"] += 1
    return stats


def plot_selection(out: Path, hist: np.ndarray, sel: dict, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=110)
    edges = np.linspace(0, 1, HIST_BINS + 1)
    a.bar(edges[:-1], hist.sum(axis=0), width=1 / HIST_BINS, align="edge")
    a.axvline(threshold, color="r", ls="--", label=f"threshold {threshold}")
    a.set_xlabel("teacher confidence (top-1 probability)")
    a.set_ylabel("images")
    a.legend()
    x = np.arange(len(sel["counts_before"]))
    b.bar(x - 0.2, sel["counts_before"], 0.4, label="kept by threshold")
    b.bar(x + 0.2, sel["counts_after"], 0.4, label="after balancing")
    b.set_xlabel("class")
    b.set_ylabel("images")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "selection.png")
    plt.close(fig)


def run(cfg: DictConfig, accelerator) -> dict:
    check_settings(cfg)
    out = pseudolabel_dir(cfg.run_dir, cfg.round)
    done = skip_if_done(cfg, out)
    if done is not None:
        return done
    prepare_data(cfg, accelerator)
    nc = num_classes(cfg)
    prev = int(cfg.round) - 1
    model, info = load_exported_model(model_dir_for_round(cfg.run_dir, prev), command_for_round(cfg.run_dir, prev))
    if info["num_classes"] != nc:
        raise ConfigError(f"the round-{prev} model ({model_dir_for_round(cfg.run_dir, prev)}) has "
                          f"{info['num_classes']} classes but data.num_classes={nc}; label with a model of "
                          "the same classes")
    urls = shards(cfg, "unlabeled")
    labels_dir = out / "labels"
    paths = label_paths(urls, labels_dir)
    if cfg.force and accelerator.is_main_process:
        for f in labels_dir.glob("*"):
            f.unlink()
    accelerator.wait_for_everyone()
    labels_dir.mkdir(parents=True, exist_ok=True)
    mine = rank_shards(urls, accelerator.process_index, accelerator.num_processes)
    todo = [u for u in mine if not paths[u].exists()]
    if len(urls) < accelerator.num_processes:
        log.warning("%d unlabeled shards for %d processes: some processes have nothing to label", len(urls),
                    accelerator.num_processes)
    log.info("labeling %d of %d shards on this process (%d already labeled)", len(todo), len(mine),
             len(mine) - len(todo))

    img_size = int(info.get("test_img_size") or info["img_size"])
    transform = eval_transform(img_size, cfg.data)
    normalize = InputNormalizer(*model_norm(model), channels_last=bool(cfg.channels_last))
    example = torch.randn(2, 3, img_size, img_size)
    model, applied = prepare(model, example, bool(cfg.pseudolabel.fuse_bn), bool(cfg.channels_last),
                             bool(cfg.pseudolabel.compile))
    model = model.to(accelerator.device)
    t0 = time.time()
    stats = label_shards(cfg, accelerator, model, transform, normalize, img_size, todo, paths, nc) if todo else {
        "images": 0, "corrupt": 0, "shards_done": 0, "unreadable": {}}
    wall = time.time() - t0
    labeled_now = int(accelerator.reduce(torch.tensor(stats["images"], device=accelerator.device), "sum"))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    return finish(cfg, out, urls, paths, nc, info, applied, labeled_now, wall, accelerator.num_processes)


def finish(cfg, out: Path, urls, paths, nc, info, applied, labeled_now, wall, processes) -> dict:
    p = cfg.pseudolabel
    unreadable = {}
    for u in urls:
        err = error_path(paths[u])
        if not paths[u].exists() and err.exists():
            unreadable[u] = read_json(err)["error"]
    files = [LabelFile(paths[u]) for u in urls if paths[u].exists()]
    for f in files:
        if f.num_classes != nc:
            raise DataError(f"label file {f.path} was made for {f.num_classes} classes, not data.num_classes={nc}; "
                            "rerun with force=true")
    stats = class_statistics(files, nc, float(p.threshold))
    sel = select(files, nc, float(p.threshold), bool(p.balance), p.per_class, stats)
    sel_json = sel.to_json()
    empty = [c for c in range(nc) if sel_json["counts_before"][c] == 0]
    if empty:
        log.warning("classes %s have no image above pseudolabel.threshold=%s: they get no pseudo-label", empty,
                    p.threshold)
    write_json(out / SELECTION, {**sel_json, "hard": bool(p.hard), "num_classes": nc})
    corrupt = sum(int(f.meta.get("corrupt", 0)) for f in files)
    summary = {
        "round": int(cfg.round),
        "teacher": info,
        "processes": processes,
        "shards": len(urls),
        "shards_labeled": len(files),
        "unreadable_shards": unreadable,
        "images_seen": int(stats["seen"]),
        "corrupt_skipped": corrupt,
        "images_kept_by_threshold": int(sum(sel_json["counts_before"])),
        "images_after_balancing": int(sum(sel_json["counts_after"])),
        "classes_without_images": empty,
        "threshold": float(p.threshold),
        "per_class": sel_json["per_class"],
        "counts_before": sel_json["counts_before"],
        "counts_after": sel_json["counts_after"],
        "repeat_factor": sel_json["repeat_factor"],
        "per_class_threshold": _per_class_threshold(stats["hist"], sel_json, float(p.threshold)),
        "confidence_histogram": stats["hist"].sum(axis=0).tolist(),
        "images_labeled_this_run": labeled_now,
        "images_per_sec": labeled_now / wall if wall > 0 and labeled_now else None,
        "wall_s": wall,
        "inference": applied,
        "topk": min(int(p.topk), nc), "temperature": float(p.temperature), "hard": bool(p.hard),
    }
    plot_selection(out, stats["hist"], sel_json, float(p.threshold))
    mark_done(out, summary)
    log.info("pseudo-labels: %d images seen, %d kept by threshold %.2f, %d after balancing (N=%s)",
             summary["images_seen"], summary["images_kept_by_threshold"], p.threshold,
             summary["images_after_balancing"], sel_json["per_class"])
    return summary


def _per_class_threshold(hist: np.ndarray, sel: dict, threshold: float) -> list[float]:
    """The effective confidence cut of each class: the threshold, or higher where balancing keeps only the
    N most confident (read off the cut score's confidence bits)."""
    out = []
    for c, cut in enumerate(sel["cut_score"]):
        if sel["base_repeat"][c] == 0 and sel["counts_before"][c] and cut < 2**64:
            conf = np.array([cut >> 32], dtype=np.uint32).view(np.float32)[0]
            out.append(max(threshold, float(conf)))
        else:
            out.append(threshold)
    return out
