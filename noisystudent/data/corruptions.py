"""Corrupted and perturbed copies of eval images, made on the fly in the loader workers (robustness evaluation:
eval.corruptions, eval.perturbations).

Corruptions are ImageNet-C's, from the `imagecorruptions` package (the `imagecorruptions-imaug` release, the
one kept up with numpy 2 and current scikit-image; the `robustness` extra): the 15 of the benchmark
(`all`) and the 4 it holds out for validation, at severities 1-5. Perturbations are ImageNet-P-style
sequences of frames (here: brightness steps and one-pixel translations), scored by how often the top-1
changes from one frame to the next.

Every variant of an image is drawn from a seed of (eval.corruption_seed, the image's key, the variant), so
every model, process count, worker count and rerun sees the same pixels. A worker decodes and resizes an image
once and emits one batch per variant of the same images (`VariantBatches`): the clean view first, then each
corruption at each severity, then each perturbation's frames in order (which is what lets the main process
compare neighbouring frames of one image)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import webdataset as wds
from omegaconf import ListConfig

from ..errors import ConfigError
from .shards import collate_counting

# ImageNet-C's 15 corruptions (Hendrycks & Dietterich, 2019), in the package's order: noise, blur, weather, digital
COMMON = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
          "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
# the 4 the benchmark holds out (for choosing hyperparameters without looking at the 15)
HELD_OUT = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
# the two corruptions that take their random state as an argument; the others draw from np.random
_TAKE_SEED = ("impulse_noise", "glass_blur")
MIN_SIZE = 32  # imagecorruptions refuses smaller images
INSTALL = "pip install 'noisystudent[robustness]' (imagecorruptions-imaug)"


@dataclass(frozen=True)
class Perturbation:
    """A sequence of `frames` frames of one image; `step` is what changes from one frame to the next."""
    name: str
    frames: int
    step: float
    what: str


# Brightness: frame j adds j * step to every pixel (in [0, 1] units) before clipping. Translate: the eval crop's
# window moved one pixel to the right per frame, over the room the resize leaves around the center crop (at most
# `frames` positions, centred on the eval crop's; `translate_offsets`).
PERTURBATIONS = {
    "brightness": Perturbation("brightness", 10, 0.03, "frame j adds 0.03 j to every pixel (in [0, 1])"),
    "translate": Perturbation("translate", 10, 1, "frame j moves the eval crop one pixel further right"),
}


@dataclass(frozen=True)
class Variant:
    """One view of every image: clean, a corruption at a severity, or a perturbation's frame."""
    kind: str  # clean | corruption | perturbation
    name: str = "clean"
    level: int = 0  # the severity, or the frame's index

    @property
    def family(self) -> str:
        """What the view is made by, for its cost: "clean", a corruption's name, or "NAME (perturbation)" (brightness
        is both a corruption and a perturbation, at very different costs)."""
        return f"{self.name} (perturbation)" if self.kind == "perturbation" else self.name


@dataclass(frozen=True)
class RobustnessPlan:
    """eval.corruptions / severities / perturbations / corruption_images / corruption_seed, checked."""
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    perturbations: tuple[str, ...]
    images: int | None  # the first N images of data.eval (None: all)
    seed: int

    @property
    def active(self) -> bool:
        return bool(self.corruptions or self.perturbations)

    def variants(self, resized: int, crop: int) -> list[Variant]:
        """The clean view, each corruption at each severity, each perturbation's frames (in this order), for
        images resized to `resized` px (short side) and center-cropped to `crop`."""
        out = [Variant("clean")]
        out += [Variant("corruption", c, s) for c in self.corruptions for s in self.severities]
        for p in self.perturbations:
            n = translate_frames(resized, crop) if p == "translate" else PERTURBATIONS[p].frames
            out += [Variant("perturbation", p, j) for j in range(n)]
        return out

    def check_geometry(self, resized: int, crop: int, where: str) -> None:
        """A ConfigError when the eval transform's geometry (short side resized to `resized`, center crop `crop`)
        cannot carry this plan; `where` names the model. Checked before a step trains, and again as it evaluates."""
        if self.corruptions and crop < MIN_SIZE:
            raise ConfigError(f"eval.corruptions: {where} is evaluated at {crop} px and imagecorruptions needs at "
                              f"least {MIN_SIZE}; evaluate at {MIN_SIZE} px or more, or set eval.corruptions=[]")
        if "translate" in self.perturbations and translate_frames(resized, crop) < 2:
            raise ConfigError(f"eval.perturbations=translate: the eval transform of {where} resizes to {resized} px "
                              f"and crops {crop} px, which leaves no room to move the crop; set data.crop_pct below "
                              "1 (e.g. 0.875), or leave translate out")

    def settings(self) -> dict:
        return {"corruptions": list(self.corruptions), "severities": list(self.severities),
                "perturbations": list(self.perturbations), "images": self.images, "seed": self.seed}


def _listed(value) -> list:
    """A config value as a list: a sequence's items, or the value itself (a string or a number) alone."""
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


def _names(value, key: str, valid: tuple[str, ...], everything: tuple[str, ...], what: str) -> tuple[str, ...]:
    if value is None or value == [] or value == ():
        return ()
    if value == "all":
        return everything
    names = _listed(value)
    bad = [n for n in names if n not in valid]
    if bad or len(set(map(str, names))) != len(names):
        problem = f"unknown {what} {bad[0]!r}" if bad else "a name given twice"
        raise ConfigError(f"{key}={value!r}: {problem}; use all ({', '.join(everything)}) or a list of: "
                          f"{', '.join(valid)}")
    return tuple(names)


def robustness_plan(ev) -> RobustnessPlan:
    """The robustness keys of the `eval` config node (a mapping), checked; errors name the key and the valid values."""
    corruptions = _names(ev.get("corruptions"), "eval.corruptions", COMMON + HELD_OUT, COMMON, "corruption")
    sev = ev.get("severities", list(SEVERITIES))
    sev = [] if sev is None else _listed(sev)
    if (not sev or len(set(sev)) != len(sev)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s in SEVERITIES for s in sev)):
        raise ConfigError(f"eval.severities={sev!r}: distinct integers of 1, 2, 3, 4, 5 (ImageNet-C's severities), "
                          "e.g. eval.severities=[1,2,3,4,5]")
    perturbations = _names(ev.get("perturbations"), "eval.perturbations", tuple(PERTURBATIONS), tuple(PERTURBATIONS),
                           "perturbation")
    images = ev.get("corruption_images")
    if images is not None and (not isinstance(images, int) or isinstance(images, bool) or images < 1):
        raise ConfigError(f"eval.corruption_images={images!r}: a positive number of images (the first N of "
                          "data.eval), or null for all of them")
    seed = ev.get("corruption_seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"eval.corruption_seed={seed!r}: a non-negative integer")
    plan = RobustnessPlan(corruptions, tuple(sorted(sev)), perturbations, images, seed)
    if corruptions:
        _require_package()
    return plan


def _require_package():
    try:
        import imagecorruptions  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"eval.corruptions needs the imagecorruptions package ({e}): {INSTALL}") from None


def translate_frames(resized: int, crop: int) -> int:
    """How many translate frames an image resized to `resized` px (short side) gives: the crop positions along a
    row of that length, at most the perturbation's frame count. A wider image gets the same count, so every image
    has the same sequence length."""
    return max(1, min(resized - crop + 1, PERTURBATIONS["translate"].frames))


def translate_offsets(width: int, crop: int, frames: int | None = None) -> list[int]:
    """The left columns of `frames` translate frames (default: as many as `width` allows) in a row of `width` px:
    consecutive crop positions, frame j one pixel right of frame j - 1, the sequence centred on the center crop."""
    room = width - crop
    n = translate_frames(width, crop) if frames is None else min(frames, room + 1)
    start = int(round(room / 2.0)) - (n - 1) // 2
    start = min(max(start, 0), room + 1 - n)
    return list(range(start, start + n))


def variant_seed(seed: int, key: str, variant: Variant) -> int:
    """A 32-bit seed from (corruption seed, image key, variant): the same on every process, worker and rerun."""
    text = f"{seed}/{key}/{variant.kind}/{variant.name}/{variant.level}".encode()
    return int.from_bytes(hashlib.sha1(text).digest()[:4], "little")


@contextlib.contextmanager
def _numpy_seeded(seed: int):
    """np.random's global state seeded for one call and restored after it: imagecorruptions draws from it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _load_corrupt():
    """imagecorruptions' corrupt(), with OpenCV held to one thread: a loader worker is one process of many, and
    OpenCV's own pool (one thread per core in each worker) would oversubscribe the CPU. Its results do not depend
    on the thread count (the tests compare bytes across processes)."""
    import cv2
    from imagecorruptions import corrupt

    cv2.setNumThreads(1)
    return corrupt


class VariantMaker:
    """(HWC uint8 image resized for the eval crop, key, variant) -> the variant's HWC uint8 crop of `crop` px.
    `translate_frames`: the translate sequence's length (RobustnessPlan.variants), so a wider image's frames
    are centred on its center crop too."""

    def __init__(self, crop: int, seed: int, translate_frames: int | None = None):
        self.crop, self.seed, self.translate_frames = crop, seed, translate_frames
        self._corrupt = None

    def _center(self, img: np.ndarray, left: int | None = None) -> np.ndarray:
        # torchvision's CenterCrop rounding, so the clean view is exactly the eval transform's image
        h, w = img.shape[:2]
        top = int(round((h - self.crop) / 2.0))
        left = int(round((w - self.crop) / 2.0)) if left is None else left
        return img[top:top + self.crop, left:left + self.crop]

    def __call__(self, img: np.ndarray, key: str, v: Variant) -> np.ndarray:
        if v.kind == "clean":
            return self._center(img)
        if v.kind == "corruption":
            if self._corrupt is None:
                self._corrupt = _load_corrupt()
            s = variant_seed(self.seed, key, v)
            extra = {"seed": s} if v.name in _TAKE_SEED else {}
            with _numpy_seeded(s):
                out = self._corrupt(np.ascontiguousarray(self._center(img)), severity=v.level,
                                    corruption_name=v.name, **extra)
            return out if out.ndim == 3 else out[:, :, None]
        if v.name == "brightness":
            x = self._center(img).astype(np.float32) + 255.0 * PERTURBATIONS["brightness"].step * v.level
            return np.clip(x, 0, 255).astype(np.uint8)
        if v.name == "translate":
            return self._center(img, translate_offsets(img.shape[1], self.crop, self.translate_frames)[v.level])
        raise ValueError(f"unknown variant {v}")


def warm_up(plan: RobustnessPlan, crop: int) -> None:
    """Import imagecorruptions and run glass blur once in this process, before the loader forks its workers: they
    inherit the import (about 0.5 s) and glass blur's numba kernel (about 2 s to compile) instead of paying for
    them in every worker of every evaluation."""
    if not plan.corruptions:
        return
    name = "glass_blur" if "glass_blur" in plan.corruptions else plan.corruptions[0]
    VariantMaker(crop, plan.seed)(np.zeros((crop, crop, 3), np.uint8), "warm-up", Variant("corruption", name, 1))


class VariantBatches:
    """webdataset stage: decoded samples (images resized, not cropped) -> for each `batch_size` of them, one batch
    per variant, in the order of `variants`. Each batch carries `variant` (its index), `group` (which images:
    "worker/its batch counter", the same for all variants of them) and `variant_s` (the seconds
    spent making it)."""

    def __init__(self, variants: list[Variant], maker: VariantMaker, batch_size: int):
        self.variants, self.maker, self.batch_size = variants, maker, batch_size

    def _emit(self, samples: list[dict], group: str):
        for i, v in enumerate(self.variants):
            t0 = time.perf_counter()
            views = [{**s, "image": None if s["image"] is None else self.maker(s["image"], s["key"], v)}
                     for s in samples]
            batch = collate_counting(views)
            if i:  # a corrupt sample is counted once, with the clean view
                batch = {**batch, "n_corrupt": 0, "corrupt_keys": [], "corrupt_shards": [], "first_error": None}
            yield {**batch, "variant": i, "group": group, "variant_s": time.perf_counter() - t0}

    def __call__(self, src):
        _, _, worker, _ = wds.utils.pytorch_worker_info()
        pending, n = [], 0
        for sample in src:
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield from self._emit(pending, f"{worker}/{n}")
                pending, n = [], n + 1
        if pending:
            yield from self._emit(pending, f"{worker}/{n}")


class FirstImages:
    """webdataset stage: at most quota[url] samples of each shard (eval.corruption_images: the first N images of
    data.eval in shard order, whichever process and worker reads each shard)."""

    def __init__(self, quota: dict[str, int]):
        self.quota = quota

    def __call__(self, src):
        seen: dict[str, int] = {}
        for sample in src:
            url = sample.get("__url__")
            seen[url] = seen.get(url, 0) + 1
            if seen[url] <= self.quota.get(url, 0):
                yield sample


def first_images_quota(urls: list[str], counts: list[int], n: int | None) -> dict[str, int]:
    """url -> how many of its samples belong to the first `n` of the set (shards past them get 0)."""
    quota, left = {}, (sum(counts) if n is None else n)
    for url, c in zip(urls, counts, strict=True):
        quota[url] = min(c, left)
        left -= quota[url]
    return quota
