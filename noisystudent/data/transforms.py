"""Clean and noised image transforms, built by timm's create_transform.

Noise (RandAugment) is a *training* transform only: the teacher labels through the clean eval
transform, as the paper prescribes."""

from __future__ import annotations

from timm.data import create_transform, resolve_data_config

from ..errors import ConfigError


def model_norm(model) -> tuple[tuple, tuple]:
    cfg = resolve_data_config({}, model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


def train_transform(img_size: int, data_cfg, randaugment: str | None, mean, std):
    """Random resized crop + flip + RandAugment (timm string, e.g. 'rand-n2-m27-mmax27')."""
    if randaugment and not str(randaugment).startswith("rand"):
        raise ConfigError(
            f"RandAugment setting {randaugment!r} is not a timm RandAugment string: use e.g. "
            "'rand-n2-m9-mmax27' (n = ops per image, m = magnitude, mmax = magnitude scale), or null"
        )
    return create_transform(
        img_size,
        is_training=True,
        scale=tuple(data_cfg.get("crop_scale", (0.08, 1.0))),
        hflip=float(data_cfg.get("hflip", 0.5)),
        color_jitter=0.0,
        auto_augment=randaugment or None,
        interpolation="bicubic",
        mean=mean,
        std=std,
    )


def eval_transform(img_size: int, data_cfg, mean, std):
    """Resize + center crop (crop_pct) + normalize: no augmentation."""
    return create_transform(
        img_size,
        is_training=False,
        crop_pct=float(data_cfg.get("crop_pct", 0.875)),
        interpolation="bicubic",
        mean=mean,
        std=std,
    )
