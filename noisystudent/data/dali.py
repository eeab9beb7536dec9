"""The DALI input path (data.loader=dali): shards read, decoded and augmented by NVIDIA DALI, on the GPU
where there is one (its hardware JPEG decoder, then crop, flip, RandAugment and resize as GPU kernels),
with DALI's CPU operators elsewhere (which is how CI tests this code).

The torch path (data/streams.py) stays the reference; this one gives the stages the same batch dicts
(uint8 images laid out channels_last, labels, targets, corrupt counts), so the training loop, evaluation
and labeling code are the same for both. What DALI lacks is done around it:

- DALI stops on a corrupt image: every image is validated once by the index pass (data/dali_index.py),
  and DALI reads only the samples listed in the index files it writes, i.e. those that decoded;
- DALI's sample key is the `source_info` property ("shard:offset:member"): batches carry it, padded
  to a fixed width, and each row is matched to its sample by shard and image offset (`SampleTable`),
  which is how labels and the student's soft targets are joined;
- the selection's repeat factors are written into the student's index files (a sample listed k times);
- processes split by whole shards (`rank_split`), as evaluation and labeling do on the torch path.

The augmentation recipe is the torch path's (`data.crop_scale`, `data.hflip`, `data.crop_pct`, the timm
RandAugment string, bicubic); `randaugment_ops` maps timm's RandAugment op by op (see docs/gpu.md)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .dali_index import ShardRecord, ShardRecords, record_path, write_dali_index

log = logging.getLogger(__name__)

INFO_WIDTH = 4096  # bytes of source_info kept per row (a shard path longer than this is an error)
IMAGE_EXT = "jpg;jpeg;png;webp"


# ---------------------------------------------------------------------------------------------------------
# The recipe: what is done to an image after decoding


@dataclass(frozen=True)
class RandAugmentSpec:
    """A timm RandAugment string, parsed as timm parses it: n ops per image, each drawn uniformly (with
    replacement) from timm's 15 default ops and applied with probability p, at magnitude m (clipped to
    [0, mmax], default 10), an op's strength being m / 10 of its reference maximum."""

    n: int
    m: float
    p: float

    @property
    def level(self) -> float:
        return self.m / 10.0


def parse_randaugment(spec: str | None, key: str = "RandAugment") -> RandAugmentSpec | None:
    if not spec:
        return None
    n, m, p, mmax = 2, 10.0, 0.5, 10.0
    for part in str(spec).split("-")[1:]:
        name, value = (re.split(r"(\d.*)", part) + [""])[:2]
        if name == "m":
            m = float(value)
        elif name == "n":
            n = int(value)
        elif name == "p":
            p = float(value)
        elif name == "mmax":
            mmax = float(value)
        elif name == "mstd" and float(value) == 0:
            continue
        else:
            raise ConfigError(f"{key}={spec!r}: data.loader=dali maps timm's RandAugment with n, m, p and mmax "
                              f"(its default ops); '{part}' has no DALI equivalent here: drop it, or set "
                              "data.loader=torch")
    return RandAugmentSpec(n, max(0.0, min(m, mmax)), p)


@dataclass(frozen=True)
class Recipe:
    """Training: random resized crop (scale, ratio), flip, RandAugment, at img_size. Eval: resize the short
    side to `resize` (img_size / crop_pct), center crop img_size. Bicubic with antialiasing either way."""

    img_size: int
    train: bool
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaugment: RandAugmentSpec | None = None
    resize: int = 0


def train_recipe(img_size: int, data_cfg, randaugment: str | None) -> Recipe:
    return Recipe(int(img_size), True, tuple(float(v) for v in data_cfg.get("crop_scale", (0.08, 1.0))),
                  hflip=float(data_cfg.get("hflip", 0.5)), randaugment=parse_randaugment(randaugment))


def eval_recipe(img_size: int, data_cfg) -> Recipe:
    # timm's eval transform: Resize(floor(img_size / crop_pct)), CenterCrop(img_size)
    return Recipe(int(img_size), False, resize=int(np.floor(img_size / float(data_cfg.get("crop_pct", 0.875)))))


# timm fills what rotate / shear / translate uncover with ImageNet's mean colour (124, 116, 104); DALI's ops
# take one value for all channels: that colour's mean
FILL = 115


def randaugment_ops(spec: RandAugmentSpec, img_size: int) -> list:
    """timm's default RandAugment ops (`_RAND_TRANSFORMS`) as DALI augmentations, each at exactly timm's
    parameter for level L = m / 10 (each built with one magnitude bin holding that value):

    AutoContrast, Equalize, Invert: no parameter. Rotate: 30 L degrees. Posterize: int(4 L) bits kept.
    Solarize: threshold min(256, int(256 L)). SolarizeAdd: min(128, int(110 L)) added below 128.
    Color, Contrast, Brightness, Sharpness: factor 1.8 L + 0.1. ShearX/Y: 0.3 L. TranslateXRel/YRel:
    0.45 L of the image side. Rotate, shear and translate take a random sign, as in timm."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation

    L = spec.level

    # DALI's own equalize and sharpness call its deprecated `experimental` aliases (a warning at each build)
    @augmentation
    def equalize(data, _):
        return fn.equalize(data)

    @augmentation(param_device="auto")
    def sharpness(data, kernel):
        return fn.filter(data, kernel)

    def mask(bits):
        bits = int(round(float(bits)))
        return np.uint8(0xFF if bits >= 8 else (0xFF ^ (2 ** (8 - bits) - 1)) & 0xFF)

    factor = 1.8 * L + 0.1
    return [
        a.auto_contrast,
        equalize,
        a.invert,
        a.rotate.augmentation((0, 30 * L), True),
        a.posterize.augmentation((0, int(4 * L)), False, mask),
        a.solarize.augmentation((0, min(256, int(256 * L))), False, lambda t: np.float32(t)),
        a.solarize_add.augmentation((0, min(128, int(110 * L))), False, lambda s: np.uint8(int(round(float(s))))),
        a.color.augmentation((0, factor), False, lambda f: np.float32(f)),
        a.contrast.augmentation((0, factor), False, lambda f: np.float32(f)),
        a.brightness.augmentation((0, factor), False, lambda f: np.float32(f)),
        sharpness.augmentation((0, factor), False, a.sharpness_kernel_shifted),
        a.shear_x.augmentation((0, 0.3 * L), True),
        a.shear_y.augmentation((0, 0.3 * L), True),
        a.translate_x_no_shape.augmentation((0, 0.45 * L * img_size), True),
        a.translate_y_no_shape.augmentation((0, 0.45 * L * img_size), True),
        a.identity,  # last: what a layer does when it is not applied (probability 1 - p)
    ]


def _rand_augment(images, spec: RandAugmentSpec, img_size: int):
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug.core import select, signed_bin

    ops = randaugment_ops(spec, img_size)
    k = len(ops) - 1  # the identity is not drawn: it stands for a layer that is skipped
    for _ in range(spec.n):
        drawn = fn.random.uniform(values=list(range(k)), dtype=types.INT32)
        applied = fn.cast(fn.random.coin_flip(probability=spec.p), dtype=types.INT32)
        idx = drawn * applied + k * (1 - applied)
        # magnitude_bin 1 of 2 bins is each op's range's top: the exact parameter randaugment_ops computed; its
        # random sign is drawn once for the batch, before the batch is split between the ops
        images = select(ops, idx, images, magnitude_bin=signed_bin(1), num_magnitude_bins=2, fill_value=FILL)
    return images


# ---------------------------------------------------------------------------------------------------------
# Pipelines


def build_pipeline(files: list[str], index_files: list[str], recipe: Recipe, batch_size: int, threads: int,
                   device_id: int | None, seed: int, shuffle: bool, shuffle_buffer: int = 1000,
                   shard_id: int = 0, num_shards: int = 1, hw_decoder_load: float = 0.65, fingerprints: bool = False):
    """A DALI pipeline over webdataset shards: (images uint8 NHWC, source_info uint8 padded), and with
    fingerprints=True (an eval recipe) each whole decoded image's 8x8 grey thumbnail (data/fingerprints.py: PIL's
    luma weights, a linear antialiased resize, as the torch path takes it). device_id
    None runs DALI's CPU operators; else decoding is "mixed" (nvJPEG, hardware where the GPU has it) and
    every later op runs on that GPU. Ordered pipelines (shuffle=False) pad their last batch by repeating
    its last sample; the caller trims it."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    # adjust_orientation=False: PIL (the torch path) does not apply EXIF orientation either
    decode_device = "mixed" if gpu else "cpu"
    decode_kw = {"hw_decoder_load": hw_decoder_load} if gpu else {}

    @pipeline_def(batch_size=batch_size, num_threads=max(1, threads), device_id=device_id,
                  seed=seed % (2**31), enable_conditionals=recipe.randaugment is not None,
                  prefetch_queue_depth=2)
    def pipe():
        raw = fn.readers.webdataset(paths=files, index_paths=index_files, ext=[IMAGE_EXT], name="reader",
                                    random_shuffle=shuffle, initial_fill=max(2, shuffle_buffer),
                                    pad_last_batch=not shuffle, shard_id=shard_id, num_shards=num_shards,
                                    missing_component_behavior="error", dtypes=[types.UINT8])
        info = fn.pad(fn.get_property(raw, key="source_info"), fill_value=0, shape=[INFO_WIDTH])
        if recipe.train:
            images = fn.decoders.image_random_crop(raw, device=decode_device, output_type=types.RGB,
                                                   random_area=list(recipe.scale),
                                                   random_aspect_ratio=list(recipe.ratio), num_attempts=10,
                                                   adjust_orientation=False, **decode_kw)
            images = fn.resize(images, size=[recipe.img_size, recipe.img_size], interp_type=types.INTERP_CUBIC,
                               antialias=True)
            if recipe.hflip > 0:
                images = fn.flip(images, horizontal=fn.random.coin_flip(probability=recipe.hflip))
            if recipe.randaugment is not None:
                images = _rand_augment(images, recipe.randaugment, recipe.img_size)
        else:
            decoded = fn.decoders.image(raw, device=decode_device, output_type=types.RGB, adjust_orientation=False,
                                        **decode_kw)
            images = _eval_geometry(decoded, fn.peek_image_shape(raw, dtype=types.INT32, adjust_orientation=False),
                                    recipe)
            if fingerprints:
                grey = fn.color_space_conversion(decoded, image_type=types.RGB, output_type=types.GRAY)
                thumbs = fn.resize(grey, size=[8, 8], interp_type=types.INTERP_LINEAR, antialias=True)
                return images, info, thumbs
        return images, info

    p = pipe()
    p.build()
    return p


def _eval_geometry(images, shape, recipe: Recipe):
    """torchvision's Resize(short side) + CenterCrop, pixel for pixel: the long side is floor(R * long / short)
    (torchvision's int()), the crop's corner round((side - S) / 2) with Python's round half to even. DALI's own
    resize_shorter and crop_pos round both differently, which moved the crop by a pixel."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    # shape: the decoded image's (H, W, C), read from the encoded header on the CPU, where argument inputs live
    h, w = shape[0], shape[1]
    short, r = dmath.min(h, w), recipe.resize
    new_h, new_w = (h * r) // short, (w * r) // short
    images = fn.resize(images, size=fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT),
                       interp_type=types.INTERP_CUBIC, antialias=True)

    def corner(side):
        d = side - recipe.img_size
        return d // 2 + fn.cast(d % 4 == 3, dtype=types.INT32)

    start = fn.cast(fn.stack(corner(new_h), corner(new_w)), dtype=types.INT32)
    return fn.slice(images, start=start, shape=[recipe.img_size] * 2, axis_names="HW", out_of_bounds_policy="pad")


def device_id_of(device: torch.device) -> int | None:
    device = torch.device(device)
    return (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" \
        else None


class PipelineRunner:
    """Batches out of a built pipeline as torch tensors: images (N, 3, S, S) uint8 laid out channels_last
    on the pipeline's device, and each row's (shard, image offset). A DALI error stops the step with a
    DataError naming the shards the pipeline reads (and, where DALI says, the sample)."""

    def __init__(self, pipe, files: list[str], device: torch.device, fingerprints: bool = False):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.files, self.device, self.fingerprints = files, torch.device(device), fingerprints
        # said before DALI runs: DALI 2.4 on its CPU operators was seen to end the process with a segfault on a
        # pipeline error (about 4 runs in 5), instead of raising it; the log then still names the shards
        log.info("DALI pipeline (%s) reads %d shard(s): %s", "gpu" if self.device.type == "cuda" else "cpu",
                 len(files), self._shown())
        try:  # the iterator runs the pipeline's first batches as it is made
            names = ["images", "info", *(["thumbs"] if fingerprints else [])]
            self.it = DALIGenericIterator([pipe], names, size=-1, auto_reset=False)
        except Exception as e:  # noqa: BLE001 - whatever DALI raises, the user needs the shards it read
            raise self._error(e) from e

    def _shown(self) -> str:
        return ", ".join(self.files[:3]) + (f" (and {len(self.files) - 3} more)" if len(self.files) > 3 else "")

    def _error(self, e: Exception) -> DataError:
        # DALI's message names the member it failed on where it knows it (its source_info)
        return DataError(f"DALI failed reading shard(s) {self._shown()}: {type(e).__name__}: {str(e).strip()[:2000]}\n"
                         "The index pass validated these images with PIL, so the shard probably changed after it "
                         "(rerun the step), or DALI cannot decode an image PIL can: set data.loader=torch for it")

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        """(images, each row's (shard, offset)), and with fingerprints the rows' uint8 (N, 64) thumbnails."""
        try:
            out = next(self.it)[0]
        except StopIteration:
            raise
        except Exception as e:  # noqa: BLE001 - whatever DALI raises, the user needs the shards it read
            raise self._error(e) from e
        images = out["images"].permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW: channels_last, no copy
        if self.fingerprints:
            return images, parse_source_info(out["info"].numpy()), out["thumbs"].reshape(len(images), -1)
        return images, parse_source_info(out["info"].numpy())


def parse_source_info(info: np.ndarray) -> list[tuple[str, int]]:
    """Rows of zero-padded "shard:offset:member" -> (shard, offset of the image member's data)."""
    out = []
    for row in info:
        text = row.tobytes().rstrip(b"\0").decode()
        path, offset, _ = text.rsplit(":", 2) if text.count(":") >= 2 else (text, "-1", "")
        if not offset.isdigit():  # a member name with ':' in it: the offset is the first all-digit field from the end
            m = re.match(r"^(.*):(\d+):(.*)$", text)
            path, offset = (m.group(1), m.group(2)) if m else (text, "-1")
        out.append((path, int(offset)))
    return out


# ---------------------------------------------------------------------------------------------------------
# What rows are: the samples of the shards a pipeline reads


class SampleTable:
    """The samples of the shards a process reads, one row each: found by (shard, image offset), with their
    labels and, for the student's stream, their top-k targets. Numpy arrays, not Python objects per sample:
    a pseudo-labeled set of many millions of images fits in a process's memory."""

    def __init__(self, records: list[ShardRecord], labels: list[np.ndarray]):
        self.urls = [r.url for r in records]
        self.pos = {u: i for i, u in enumerate(self.urls)}
        self.offsets = [np.asarray(r.offsets, dtype=np.int64) for r in records]
        self.base = np.cumsum([0] + [len(r) for r in records])
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.targets: Callable[[np.ndarray], np.ndarray] | None = None  # rows -> their targets (the student's)

    @classmethod
    def read(cls, records: ShardRecords, urls: list[str], num_classes: int | None, labeled: bool) -> SampleTable:
        """The table of `urls`, their records read one shard at a time: only the numpy columns stay (16 bytes a
        sample), never every shard's record at once (Python lists: about 190 bytes a sample)."""
        table = cls([], [])
        offsets, labels, sizes = [], [], [0]
        for url in urls:
            rec = records[url]
            offsets.append(np.asarray(rec.offsets, dtype=np.int64))
            labels.append(rec.labels(num_classes, labeled))
            sizes.append(len(rec))
        table.urls, table.pos = list(urls), {u: i for i, u in enumerate(urls)}
        table.offsets, table.base = offsets, np.cumsum(sizes)
        table.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        return table

    def rows(self, where: list[tuple[str, int]]) -> np.ndarray:
        out = np.empty(len(where), dtype=np.int64)
        for j, (url, offset) in enumerate(where):
            i = self.pos.get(url)
            k = -1 if i is None else int(np.searchsorted(self.offsets[i], offset))
            if i is None or k >= len(self.offsets[i]) or self.offsets[i][k] != offset:
                raise DataError(f"DALI returned a sample at offset {offset} of {url}, which the index pass did not "
                                "list: the shard changed since it was indexed; rerun the step")
            out[j] = self.base[i] + k
        return out


def rank_split(urls: list[str], rank: int, world: int) -> tuple[list[str], int, int]:
    """(shards, shard_id, num_shards) one process's training pipeline reads: whole shards (urls[rank::world])
    when there are at least as many as processes, so each process holds only its own shards' rows; else
    every shard, DALI splitting the samples evenly (no process without data, none waiting on another)."""
    if len(urls) >= world:
        return urls[rank::world], 0, 1
    return list(urls), rank, world


def kept(records: ShardRecords, urls: list[str]) -> list[str]:
    """The shards of `urls` that have samples DALI can read (readable, at least one image that decodes)."""
    return [u for u in urls if records.readable(u)]


def summary_counts(*found: dict) -> dict:
    """A training step's corrupt_skipped / shard_read_errors / unreadable_shards from `index_summary`s of its
    streams: every dropped image and unreadable shard once (the torch path counts each time its resampled
    stream meets one)."""
    return {"corrupt_skipped": sum(f["corrupt"] for f in found),
            "shard_read_errors": sum(f["n_unreadable"] for f in found),
            "unreadable_shards": [u for f in found for u in f["unreadable_shards"]][:20]}


def index_summary(records: ShardRecords, urls: list[str]) -> dict:
    """What the index pass found in `urls`: for summary.json (corrupt images with their keys, as the torch
    path reports them, and the shards it could not read)."""
    n_bad, bad = records.corrupt(urls)
    unreadable = [records.error(u) for u in urls if records.error(u)]
    return {"indexed": int(sum(records.count(u) for u in urls)), "corrupt": n_bad,
            "corrupt_keys": [k for k, _ in bad[:20]], "first_error": bad[0][1] if bad else None,
            "unreadable_shards": unreadable[:20], "n_unreadable": len(unreadable)}


# DALI batches hold only images that decode: what the index pass dropped is in the step's summary instead
# (`summary_counts`), counted once however often the step is resumed
NO_COUNTS = {"n_corrupt": 0, "corrupt_keys": [], "corrupt_shards": [], "first_error": None, "shard_errors": []}


def training_batches(files_all: list[str], records: ShardRecords, index_dir: Path, recipe: Recipe,
                     batch_size: int, shuffle_buffer: int, threads: int, device: torch.device, rank: int, world: int,
                     labeled: bool, num_classes: int | None, seed_offset: int = 0,
                     index_files: dict[str, Path] | None = None, targets=None):
    """seed -> endless iterator of training batch dicts from DALI (the torch path's `labeled_batches` /
    `pseudo_labeled_batches`). `index_files`: url -> the index file to read (default: the index pass's;
    the student's lists selected samples by their repeat factor); `targets(table)` fills
    the table's top-k targets (the student's pseudo-labeled stream), batches then carry "targets"."""
    mine, shard_id, num_shards = rank_split(kept(records, files_all), rank, world)
    if index_files is not None:  # the student's: shards with no selected image have none
        mine = [u for u in mine if u in index_files]
    if not mine:
        raise DataError(f"data.loader=dali: no shard of {len(files_all)} has an image that decodes "
                        f"(first: {files_all[0] if files_all else 'none'}); see the index pass's errors")
    table = SampleTable.read(records, mine, num_classes, labeled)
    if targets is not None:
        targets(table)
    idx = [str(index_files[u] if index_files is not None else records.index_file(u)) for u in mine]

    def make(seed: int) -> Iterator[dict]:
        pipe = build_pipeline(mine, idx, recipe, batch_size, threads, device_id_of(device), seed + seed_offset,
                              shuffle=True, shuffle_buffer=shuffle_buffer, shard_id=shard_id, num_shards=num_shards)
        runner = PipelineRunner(pipe, mine, device)
        for images, where in runner:
            rows = table.rows(where)
            batch = {"images": images, "labels": torch.from_numpy(table.labels[rows]), **NO_COUNTS}
            if table.targets is not None:
                batch["targets"] = torch.from_numpy(table.targets(rows))
            yield batch

    return make


def ordered_batches(urls: list[str], records: ShardRecords, index_dir: Path, recipe: Recipe,
                    batch_size: int, threads: int, device: torch.device, labeled: bool, num_classes: int | None,
                    audit_classes: bool = False, fingerprints: bool = False) -> Iterator[dict]:
    """One pass over `urls` (this process's shards) in shard order, as batches that never cross a shard
    (the torch path's ShardBatches and ordered_stream): {"shard", "keys", "labels", "images",
    "corrupt_keys", "n_corrupt", "last"} (and "fingerprints" with fingerprints=True), or {"shard", "error", "last"}
    for a shard the index pass could not read. A shard none of whose images decodes yields one empty batch with its
    corrupt keys."""
    readable = kept(records, urls)
    pipe_batches = None
    if readable:
        pipe = build_pipeline(readable, [str(records.index_file(u)) for u in readable], recipe, batch_size,
                              threads, device_id_of(device), 0, shuffle=False, fingerprints=fingerprints)
        pipe_batches = PipelineRunner(pipe, readable, device, fingerprints)
    pending: list[list] = []  # rows read but not yet handed out: [images, where(, thumbs)]

    def take(n: int) -> tuple:
        got, got_where, need = [], [], n
        while need:
            if not pending:
                pending.append(list(next(pipe_batches)))
            part = pending[0]
            where = part[1]
            use = min(need, len(where))
            got.append([t[:use] for t in part[:1] + part[2:]])
            got_where.extend(where[:use])
            if use == len(where):
                pending.pop(0)
            else:
                pending[0] = [part[0][use:], where[use:], *(t[use:] for t in part[2:])]
            need -= use
        tensors = [torch.cat(ts) if len(ts) > 1 else ts[0] for ts in zip(*got, strict=True)]
        return tensors[0], got_where, (tensors[1] if len(tensors) > 1 else None)

    for url in urls:
        if records.error(url) is not None:
            yield {"shard": url, "error": records.error(url), "last": True}
            continue
        rec = records[url]  # read now, one shard at a time: the process never holds them all
        labels = rec.labels(num_classes, labeled, audit_classes)
        corrupt = [k for k, _ in rec.bad]
        if not len(rec):
            yield {"shard": url, "keys": [], "labels": torch.zeros(0, dtype=torch.long), "images": torch.empty(0),
                   "corrupt_keys": corrupt, "n_corrupt": len(corrupt), "last": True}
            continue
        for start in range(0, len(rec), batch_size):
            n = min(batch_size, len(rec) - start)
            images, where, thumbs = take(n)
            expect = rec.offsets[start:start + n]
            if [w[1] for w in where] != expect or any(w[0] != url for w in where):
                raise DataError(f"DALI read the samples of {url} out of the order the index lists them: "
                                "rerun the step (the shard may have changed during it)")
            first = start == 0
            batch = {"shard": url, "keys": rec.keys[start:start + n],
                     "labels": torch.from_numpy(labels[start:start + n]), "images": images,
                     "corrupt_keys": corrupt if first else [], "n_corrupt": len(corrupt) if first else 0,
                     "last": start + n == len(rec)}
            if thumbs is not None:
                batch["fingerprints"] = thumbs
            yield batch
    # the pipeline pads the last batch of the pass with copies of its last sample: never handed out


def record_stem(url: str) -> str:
    return record_path(Path("."), url).stem


def pseudo_labeled_index(records: ShardRecords, urls: list[str], label_files: dict[str, Path], selection,
                         num_classes: int, out_dir: Path, rank: int, world: int):
    """The student's pseudo-labeled stream through DALI: for the shards this process reads (`rank_split`),
    index files listing each selected image as many times as the selection repeats it (written under
    `out_dir`, one folder per process), and the callback that puts each row's top-k targets into the
    SampleTable. Returns (index_files, fill_targets, images listed by this process)."""
    from .labels import LabelFile

    mine, _, _ = rank_split(kept(records, urls), rank, world)
    folder = Path(out_dir) / f"process{rank}"
    index_files, ids, probs, rests, labels, listed, hard = {}, [], [], [], [], 0, False
    for url in mine:
        rec, f = records[url], LabelFile(label_files[url])
        r = selection.rows(f)
        rep = r.repeats
        where = {k: i for i, k in enumerate(f.keys())}
        row = np.array([where.get(k, -1) for k in rec.keys], dtype=np.int64)  # label file row of each sample
        reps = np.where(row >= 0, rep[np.maximum(row, 0)], 0)
        if not reps.any():  # nothing selected in this shard: DALI does not read it
            continue
        index_files[url] = folder / f"{record_stem(url)}.idx"
        listed += write_dali_index(index_files[url], rec, reps)
        f_ids, f_probs, f_rest, f_label = selection.target_arrays(f, r)
        k = f_ids.shape[1]
        ids.append(np.where(row[:, None] >= 0, f_ids[np.maximum(row, 0)], 0).astype(np.int64).reshape(-1, k))
        # float16 as the label file keeps them, so the targets are those of the torch path, bit for bit
        probs.append(np.where(row[:, None] >= 0, f_probs[np.maximum(row, 0)], 0).astype(f_probs.dtype).reshape(-1, k))
        if f_rest is not None:
            rests.append(np.where(row >= 0, f_rest[np.maximum(row, 0)], 0).astype(np.float32))
        labels.append(np.where(row >= 0, f_label[np.maximum(row, 0)], 0).astype(np.int64))
        hard = f.hard
    all_ids = np.concatenate(ids) if ids else np.zeros((0, 1), np.int64)
    all_probs = np.concatenate(probs) if probs else np.zeros((0, 1), np.float32)
    all_rest = np.concatenate(rests) if rests else None
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)

    def fill(table: SampleTable) -> None:
        table.targets = lambda rows: selection.targets_from(all_ids[rows], all_probs[rows],
                                                            None if all_rest is None else all_rest[rows],
                                                            all_labels[rows], num_classes, hard)

    return index_files, fill, listed
