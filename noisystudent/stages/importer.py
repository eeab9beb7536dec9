"""stage=import: images directory -> webdataset shards (see data/importer.py)."""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import require
from ..data.importer import import_images


def run(cfg: DictConfig, accelerator) -> dict:
    src = require(cfg, "stage.src", "the directory of images to import, e.g. stage.src=/data/train")
    dest = require(cfg, "stage.dest", "the output directory for the shards, e.g. stage.dest=/data/shards/train")
    if not accelerator.is_main_process:
        return {}
    result = import_images(src, dest, cfg.stage.kind, int(cfg.stage.samples_per_shard))
    key = "data.labeled" if result["kind"] == "labeled" else "data.unlabeled"
    # quoted twice: once for the shell, once for Hydra's override grammar (braces need quotes)
    print(f"{result['images']} images in {result['shards']} shard(s); use '{key}=\"{result['pattern']}\"'"
          + (f" data.num_classes={result['num_classes']}" if result["num_classes"] else ""))
    return result
