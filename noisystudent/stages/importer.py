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
    result = import_images(src, dest, cfg.stage.kind, int(cfg.stage.samples_per_shard),
                           holdout=float(cfg.stage.get("holdout") or 0.0), seed=int(cfg.seed))
    key = "data.labeled" if result["kind"] == "labeled" else "data.unlabeled"
    # quoted twice: once for the shell, once for Hydra's override grammar (braces need quotes)
    use = f"'{key}=\"{result['pattern']}\"'"
    held = result.get("holdout")
    if held:
        use += f" 'data.val=\"{held['pattern']}\"'"
    print(f"{result['images']} images in {result['shards']} shard(s)"
          + (f", {held['images']} held out in {held['shards']} shard(s) (stage.holdout, never trained on)" if held
             else "")
          + f"; use {use}" + (f" data.num_classes={result['num_classes']}" if result["num_classes"] else ""))
    return result
