"""Config checks and derived values shared by the stages."""

from __future__ import annotations

import hashlib
import json
import math

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

# Keys that change how a step runs, not what it computes: left out of the config hash.
_RUNTIME_KEYS = ("stage", "force", "resume", "num_workers", "worker_nice", "keep_freed_memory", "run_dir",
                 "max_steps")


def config_hash(cfg: DictConfig) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for k in _RUNTIME_KEYS:
        plain.pop(k, None)
    return hashlib.sha1(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:12]


def require(cfg: DictConfig, key: str, hint: str = ""):
    """cfg value at dotted `key`, or a ConfigError naming it when missing (???) or null."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception:  # omegaconf.MissingMandatoryValue
        value = None
    if value is None:
        raise ConfigError(f"{key} is not set{': ' + hint if hint else ''}")
    return value


def positive_int(cfg: DictConfig, key: str) -> int:
    value = require(cfg, key)
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")
    return value


def learning_rate(optim_cfg: DictConfig, global_batch: int) -> float:
    """optim.lr when set, else optim.lr_per_256 scaled linearly by the global batch."""
    if optim_cfg.get("lr") is not None:
        return float(optim_cfg.lr)
    return float(optim_cfg.lr_per_256) * global_batch / 256.0


def steps_per_epoch(n_images: int, global_batch: int) -> int:
    return max(1, math.ceil(n_images / global_batch))


def worker_nice(cfg: DictConfig, device) -> int:
    """How much to lower the loader workers' CPU priority (`worker_nice`): auto = 19 on a CPU device."""
    value = cfg.get("worker_nice", "auto")
    if value == "auto":
        return 19 if getattr(device, "type", str(device)) == "cpu" else 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 19:
        raise ConfigError(f"worker_nice={value!r}: use auto or an integer from 0 (same priority as training) to 19")
    return value
