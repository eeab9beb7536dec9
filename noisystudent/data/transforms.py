"""Clean and noised image transforms, built by timm's create_transform.

Noise (RandAugment) is a *training* transform only: the teacher labels through the clean eval
transform, as the paper prescribes.

Images leave the loader workers as uint8 (timm's prefetcher convention), for training, evaluation
and labeling alike: the workers do only the PIL work (crop, flip, RandAugment; resize and center
crop), and `InputNormalizer` turns the whole batch into normalized floats on the device. A uint8
batch is a quarter of the float one to pass between processes (and to copy to a GPU), and one
batched normalize costs less than per-image ToTensor + Normalize in the workers, which on a
CPU-bound box compete with the model for the cores."""

from __future__ import annotations

import numpy as np
import torch
from timm.data import create_transform, resolve_data_config
from torchvision import transforms

from ..config import check_randaugment


def model_norm(model) -> tuple[tuple, tuple]:
    cfg = resolve_data_config({}, model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


class ToHWCArray:
    """PIL image -> HWC uint8 array. Batches of these stack to NHWC, which viewed as NCHW is already
    channels_last: no layout copy anywhere (see `stack_hwc`)."""

    def __call__(self, img) -> np.ndarray:
        arr = np.asarray(img, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def stack_hwc(arrays: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays -> an (N, C, H, W) uint8 tensor laid out channels_last."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def train_transform(img_size: int, data_cfg, randaugment: str | None):
    """Random resized crop + flip + RandAugment (timm string, e.g. 'rand-n2-m27-mmax27') -> HWC uint8.

    Normalization happens on the batch, on the device: see `InputNormalizer`."""
    randaugment = check_randaugment(randaugment, "RandAugment setting")
    primary, secondary, _ = create_transform(
        img_size,
        is_training=True,
        scale=tuple(data_cfg.get("crop_scale", (0.08, 1.0))),
        hflip=float(data_cfg.get("hflip", 0.5)),
        color_jitter=0.0,
        auto_augment=randaugment or None,
        interpolation="bicubic",
        separate=True,  # timm's PIL stages only; its final ToTensor + Normalize are replaced below
    )
    return transforms.Compose([*primary.transforms, *secondary.transforms, ToHWCArray()])


class InputNormalizer:
    """A uint8 (N, C, H, W) batch on the device -> float32, (x / 255 - mean) / std, in the model's
    memory format: the same numbers as torchvision's ToTensor + Normalize, computed once per batch."""

    def __init__(self, mean, std, channels_last: bool):
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1)
        self.shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)]).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"InputNormalizer expects a uint8 batch, got {images.dtype}")
        if self.scale.device != images.device:
            self.scale, self.shift = self.scale.to(images.device), self.shift.to(images.device)
        x = images.to(dtype=torch.float32, memory_format=self.memory_format)
        return x.mul_(self.scale).sub_(self.shift)


def eval_resize_crop(img_size: int, data_cfg) -> transforms.Compose:
    """timm's eval geometry: resize the short side to img_size / crop_pct (bicubic, antialiased), center
    crop img_size. torchvision applies it alike to a PIL image and to a (C, H, W) tensor on any device,
    which is how pseudolabel.decode=gpu crops on the GPU exactly what the CPU path crops."""
    timm_eval = create_transform(
        img_size,
        is_training=False,
        crop_pct=float(data_cfg.get("crop_pct", 0.875)),
        interpolation="bicubic",
        use_prefetcher=True,  # no ToTensor + Normalize: its last stage is a uint8 conversion, left out here
    )
    return transforms.Compose(timm_eval.transforms[:-1])


def resize_target(resize_crop: transforms.Compose) -> int:
    """The short side `eval_resize_crop` resizes to (before its center crop)."""
    size = resize_crop.transforms[0].size
    return int(size if isinstance(size, int) else min(size))


def eval_transform(img_size: int, data_cfg):
    """Resize + center crop (crop_pct), no augmentation -> HWC uint8 (normalized by `InputNormalizer`)."""
    return transforms.Compose([*eval_resize_crop(img_size, data_cfg).transforms, ToHWCArray()])
