"""stage=predict: a model of the run on a directory of images or on shards -> top-k predictions with class
names, as JSON lines and CSV (run_dir/predict/, or predict.out).

The model: the exported one (run_dir/export/, when stage=export ran), else the last finished model, or
predict.model=K (round K; 0 = the teacher), or predict.model=PATH (an exported folder). Decoding and
batching are the labeling ones (labeling.py: decode=cpu|gpu from pseudolabel.decode, batches never
cross a source); each process takes a disjoint share of the sources (shards, or chunks of the
directory's files) and writes its part; the main process joins the parts in source order."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from omegaconf import DictConfig

from ..config import positive_int, read_settings, worker_nice
from ..data.shards import IMAGE_EXTS, expand_shards, file_image_ext
from ..data.streams import ImageFiles, rank_shards, read_tar
from ..data.transforms import InputNormalizer, eval_resize_crop, eval_transform, model_norm
from ..errors import ConfigError, MissingInputError
from ..files import atomic_write, atomic_write_bytes, read_json
from ..models.build import MODEL_WEIGHTS, eval_img_size, load_exported_model
from ..models.inference import prepare
from ..pseudolabels.labeling import Decoding, run_model
from ..rundir import SUMMARY, command_for_round, finished_models, is_done, read_summary
from .common import dali_eval
from .contract import Step, StepRun
from .export import class_names

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
TABLE = "predictions.csv"


@dataclass(frozen=True)
class PredictSettings:
    src: str
    model: int | str | None
    topk: int
    batch_size: int
    decode: str
    jpeg_draft: bool
    files_per_source: int


def settings(cfg: DictConfig) -> PredictSettings:
    p = cfg.predict
    if not p.src:
        raise ConfigError("predict.src is not set: give a directory of images (predict.src=/data/photos) or a shard "
                          "pattern (predict.src='/data/shards/x-{000000..000009}.tar')")
    if not isinstance(p.topk, int) or p.topk < 1:
        raise ConfigError(f"predict.topk={p.topk!r} must be an integer >= 1")
    if cfg.pseudolabel.decode not in ("cpu", "gpu"):
        raise ConfigError(f"pseudolabel.decode={cfg.pseudolabel.decode!r}: use auto, cpu or gpu")
    return PredictSettings(str(p.src), p.model, int(p.topk), positive_int(cfg, "pseudolabel.batch_size"),
                           str(cfg.pseudolabel.decode), bool(cfg.pseudolabel.jpeg_draft),
                           positive_int(cfg, "predict.files_per_source"))


def reads(cfg: DictConfig) -> dict:
    out = read_settings(cfg, ("predict.src", "predict.model", "predict.topk", "data.crop_pct", "pseudolabel.decode",
                                "data.loader"))
    # which model predict.model resolves to, and the settings hash of the step that made it: predictions of a
    # model trained or exported since are not these
    _, path = _resolve(cfg, cfg.predict.model)
    if path is not None:
        summary = path / SUMMARY
        out["model (resolved)"] = {"path": str(path),
                                   "config_hash": read_summary(path).get("config_hash") if summary.exists() else None}
    return out


def _resolve(cfg: DictConfig, model) -> tuple[str, Path | None]:
    """What predict.model names: ("folder", an exported folder) or ("step", a finished step's directory);
    the path is None when that model does not exist."""
    if isinstance(model, str) and not model.isdigit():
        return "folder", Path(model)
    export = Path(cfg.run_dir) / "export"
    if model is None and is_done(export):
        return "folder", export
    models = [m for m in finished_models(cfg.run_dir) if model is None or m[0] == int(model)]
    return "step", models[-1][2] if models else None


def out_dir(cfg: DictConfig) -> Path:
    return Path(cfg.predict.out) if cfg.predict.get("out") else Path(cfg.run_dir) / "predict"


def _sources(src: str, files_per_source: int) -> tuple[list[str], object, int]:
    """(sources, their reader, files left out) for a directory of images or a shard pattern."""
    if os.path.isdir(src):
        files, other = [], 0
        for dirpath, dirnames, names in os.walk(src):
            dirnames.sort()
            for name in sorted(names):
                if file_image_ext(name) in IMAGE_EXTS:  # as ImageFiles reads it
                    files.append(os.path.join(dirpath, name))
                else:
                    other += 1
        if not files:
            raise MissingInputError(f"predict.src={src!r} holds no image ({', '.join(IMAGE_EXTS)})")
        chunks = {f"{src}#{i // files_per_source:06d}": files[i:i + files_per_source]
                  for i in range(0, len(files), files_per_source)}
        return list(chunks), ImageFiles(src, chunks), other
    return expand_shards(src, "predict.src"), read_tar, 0


def _load_model(cfg: DictConfig, s: PredictSettings) -> tuple[torch.nn.Module, dict, list[str] | None, str]:
    """(model, info with name/num_classes/img sizes, class names, where it came from)."""
    kind, path = _resolve(cfg, s.model)
    if kind == "folder":
        if not (path / "config.json").exists() or not (path / MODEL_WEIGHTS).exists():
            raise MissingInputError(f"predict.model={s.model!r}: not an exported model folder (config.json + "
                                    f"{MODEL_WEIGHTS}); make one with `python -m noisystudent stage=export`")
        return _from_export(path)
    if path is None:
        k = 0 if s.model is None else int(s.model)
        raise MissingInputError(f"no finished model{'' if s.model is None else f' for round {k}'} in {cfg.run_dir}; "
                                f"make it with `{command_for_round(cfg.run_dir, k)}`")
    model, info = load_exported_model(path, "")
    crop = float(cfg.data.get("crop_pct", 0.875))
    return model, {**info, "crop_pct": crop}, class_names(cfg, int(info["num_classes"])), str(path)


def _from_export(folder: Path):
    config = read_json(folder / "config.json")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    pc = config["pretrained_cfg"]
    size = int(pc["input_size"][-1])
    info = {"name": config["architecture"], "num_classes": config["num_classes"], "img_size": size,
            "test_img_size": size, "crop_pct": float(pc.get("crop_pct", 0.875))}
    return model, info, config.get("label_names"), str(folder)


def inputs(cfg: DictConfig, s: PredictSettings) -> dict:
    sources, reader, other = _sources(s.src, s.files_per_source)
    model, info, names, origin = _load_model(cfg, s)
    return {"sources": sources, "read": reader, "other_files": other, "model": model, "info": info,
            "names": names, "origin": origin}


def _part(out: Path, index: int) -> Path:
    """One source's predictions (JSON lines), written by the process that read it."""
    return out / ".parts" / f"{index:06d}.jsonl"


def work(run: StepRun) -> dict:
    cfg, s, inp, accelerator = run.cfg, run.settings, run.inputs, run.accelerator
    info, names = inp["info"], inp["names"]
    size = eval_img_size(info)
    data_cfg = {"crop_pct": info["crop_pct"]}
    transform, resize_crop = eval_transform(size, data_cfg), eval_resize_crop(size, data_cfg)
    channels_last = bool(cfg.channels_last)
    model, _ = prepare(inp["model"], torch.randn(2, 3, size, size), True, channels_last)
    model = model.to(accelerator.device)
    normalize = InputNormalizer(*model_norm(inp["model"]), channels_last=channels_last)
    index = {source: i for i, source in enumerate(inp["sources"])}
    mine = rank_shards(inp["sources"], accelerator.process_index, accelerator.num_processes)
    how = Decoding(s.decode, s.jpeg_draft, s.batch_size, int(cfg.num_workers), worker_nice(cfg, accelerator.device))
    k = min(s.topk, int(info["num_classes"]))
    (run.out / ".parts").mkdir(parents=True, exist_ok=True)
    # DALI reads shards; a directory of image files goes through the torch loader (its summary says which ran)
    dali = dali_eval(cfg, size, data_cfg) if inp["read"] is read_tar else None
    inp["loader"] = "dali" if dali else "torch"
    for done in run_model(accelerator, model, normalize, mine, transform, resize_crop, how, k, read=inp["read"],
                          dali=dali):
        record = {"source": done["source"], "error": done.get("error"), "corrupt": done.get("corrupt", [])}
        lines = [json.dumps(record)]  # the first line of a part: what was skipped in this source
        if "error" in done:
            log.warning("%s cannot be read (%s): skipped", done["source"], done["error"])
        else:
            for i, key in enumerate(done["keys"]):
                top = [{"class": int(c), **({"name": names[int(c)]} if names else {}), "prob": round(float(p), 4)}
                       for c, p in zip(done["topk_ids"][i], done["topk_probs"][i], strict=True)]
                lines.append(json.dumps({"key": key, "source": done["source"], "top": top}))
        atomic_write_bytes(_part(run.out, index[done["source"]]), ("\n".join(lines) + "\n").encode())
    accelerator.wait_for_everyone()  # every part is written
    if not accelerator.is_main_process:
        return {}
    return _join(run.out, inp, k)


def _join(out: Path, inp: dict, k: int) -> dict:
    """The parts -> predictions.jsonl + predictions.csv, in source order, streamed (memory does not grow
    with the number of images)."""
    images, corrupt, unreadable = 0, [], {}
    header = ["key", "source", *[f"{what}_{i + 1}" for i in range(k) for what in ("class", "name", "prob")]]
    with atomic_write(out / PREDICTIONS) as jsonl, atomic_write(out / TABLE) as table:
        rows = io.TextIOWrapper(table, encoding="utf-8", newline="")
        writer = csv.writer(rows)
        writer.writerow(header)
        for i in range(len(inp["sources"])):
            with open(_part(out, i), encoding="utf-8") as part:
                skipped = json.loads(part.readline())
                if skipped["error"]:
                    unreadable[skipped["source"]] = skipped["error"]
                corrupt += [{"source": skipped["source"], "key": key} for key in skipped["corrupt"]]
                for line in part:
                    row = json.loads(line)
                    jsonl.write(line.encode())
                    writer.writerow([row["key"], row["source"],
                                     *[v for t in row["top"] for v in (t["class"], t.get("name", ""), t["prob"])]])
                    images += 1
        rows.flush()
        rows.detach()
    shutil.rmtree(out / ".parts")
    log.info("predictions for %d images in %s (%d corrupt, %d unreadable sources)", images, out / PREDICTIONS,
             len(corrupt), len(unreadable))
    return {"model": inp["info"], "model_from": inp["origin"], "images": images, "corrupt_skipped": len(corrupt),
            "corrupt": corrupt[:1000], "unreadable_sources": unreadable, "other_files_left_out": inp["other_files"],
            "topk": k, "label_names": bool(inp["names"]), "files": [PREDICTIONS, TABLE], "loader": inp["loader"]}


STEP = Step("predict", settings, reads, inputs, work, out_dir=out_dir, outputs=(PREDICTIONS, TABLE, ".parts"))
