"""Model presets by name (conf/model/<name>.yaml), for per-round architectures."""

from __future__ import annotations

from importlib import resources

from omegaconf import DictConfig, OmegaConf


def model_preset(name: str, fallback: DictConfig) -> DictConfig:
    """conf/model/<name>.yaml; a name with no preset is taken as a timm model name with the
    resolution and noise of `fallback`."""
    path = resources.files("noisystudent.conf") / "model" / f"{name}.yaml"
    if path.is_file():
        return OmegaConf.create(path.read_text())
    return OmegaConf.merge(fallback, {"name": name})


def student_model(cfg: DictConfig, round_idx: int) -> DictConfig:
    """The round's student preset: student.model, else iterate.models[round-1] (the last entry
    repeats), else the top-level `model`."""
    if cfg.student.get("model"):
        return model_preset(cfg.student.model, cfg.model)
    models = list(cfg.iterate.get("models") or [])
    if models:
        return model_preset(models[min(round_idx, len(models)) - 1], cfg.model)
    return cfg.model
