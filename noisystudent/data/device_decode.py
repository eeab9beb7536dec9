"""Labeling with JPEGs decoded on the device (pseudolabel.decode=gpu).

A GPU labels efficientnet_b0-sized inputs far faster than its host's cores decode ImageNet-sized
JPEGs with PIL, so labeling a large unlabeled set is decode-bound on the CPU path. On this path:

- loader workers do not decode what the device can: they open each JPEG's header only (PIL reads
  no pixel data for that) and hand the raw bytes over, packed into one buffer per batch. What the
  device cannot take (PNG, WebP, JPEGs in CMYK or other modes, a file PIL cannot open) is decoded
  in the worker exactly as on the CPU path (`SampleDecoder`) and counted as a CPU fallback;
- the main process decodes the batch's JPEGs in one call (nvJPEG on CUDA; the same call runs on a
  CPU, which is how the tests run this code), then resizes and center-crops each image on the
  device with the very transforms of the CPU path (timm's eval transform: resize by crop_pct,
  bicubic with antialias, center crop), so both paths share one definition of the geometry;
- a batch the decoder refuses is split in halves until the images it cannot take are found; each
  of those is decoded on the CPU (PIL) instead, and counted. One that PIL cannot decode either is
  a corrupt image: skipped, and listed in its shard's label file as on the CPU path.

Images come out uint8, in shard order, normalized afterwards like every other batch.

The decoder is torchcodec's `decode_jpeg` when torchcodec is installed (`pip install
noisystudent[gpu]`): torchvision's, which has the same call, is deprecated from torchvision 0.29 in
its favour. Without torchcodec, torchvision's is used."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from .fingerprints import DIMS, fingerprint_pil, fingerprint_tensor
from .shards import SampleDecoder, collate_counting, decode_image, image_key

log = logging.getLogger(__name__)

# what the device decoder takes: JPEGs whose pixels PIL would give as RGB or grayscale
DEVICE_MODES = ("RGB", "L")


def torchcodec_decoder() -> Callable:
    from torchcodec.decoders import decode_jpeg

    return lambda data, device: decode_jpeg(data, mode="RGB", device=device)


def torchvision_decoder() -> Callable:
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data, device):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated.*")
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


def _tiny_jpeg() -> torch.Tensor:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def jpeg_decoder(device) -> tuple[Callable, str] | None:
    """(decode(list of CPU uint8 tensors, device) -> list of (3, H, W) uint8 RGB tensors, its name): torchcodec's
    when it is installed and decodes on `device`, else torchvision's (the same call); None when neither
    does (a build without nvJPEG, a device that is not NVIDIA's): each is tried on a small JPEG first."""
    for name, make in (("torchcodec", torchcodec_decoder), ("torchvision", torchvision_decoder)):
        try:
            decode = make()
            decode([_tiny_jpeg()], device)
        except Exception:  # noqa: BLE001 - not installed, or not able to decode there: try the next
            continue
        return decode, name
    return None


class RawJpegDecoder:
    """Loader-worker side: a JPEG the device can decode passes through as its bytes; anything else is
    decoded here by `cpu` (the CPU path's SampleDecoder), which also reports corrupt images."""

    def __init__(self, cpu: SampleDecoder):
        self.cpu = cpu

    def __call__(self, sample: dict) -> dict:
        ext = image_key(sample)
        if ext in ("jpg", "jpeg"):
            data = sample[ext]
            try:
                with Image.open(io.BytesIO(data)) as img:  # the header only: no pixel is decoded here
                    ok = img.format == "JPEG" and img.mode in DEVICE_MODES
                # nvJPEG decodes a truncated JPEG without an error (the missing rows come out gray), where
                # PIL refuses it: one without its end-of-image marker goes to the CPU path, which counts it
                # as corrupt. The marker cannot occur inside entropy-coded data (0xFF is stuffed there).
                ok = ok and b"\xff\xd9" in data[-64:]
            except Exception:  # noqa: BLE001 - not even a header: the CPU path reports why
                ok = False
            if ok:
                return {"key": sample["__key__"], "url": sample.get("__url__", "?"), "jpeg": data, "image": None,
                        "label": self.cpu.label_of(sample), "error": None}
        out = self.cpu(sample)
        out["cpu_fallback"] = out["image"] is not None
        return out


def collate_raw(samples: list[dict]) -> dict:
    """A batch in shard order: the raw JPEGs packed into one uint8 buffer (one shared-memory tensor to
    pass from the worker, not one per image), the images the worker decoded, the corrupt ones counted."""
    kept = [s for s in samples if s.get("jpeg") is not None or s["image"] is not None]
    batch = collate_counting([s for s in samples if s.get("jpeg") is None])  # worker-decoded + corrupt
    jpegs = [s["jpeg"] for s in kept if s.get("jpeg") is not None]
    batch.update(
        keys=[s["key"] for s in kept],
        labels=torch.tensor([s["label"] for s in kept], dtype=torch.long),  # rows in shard order, as keys
        jpeg_bytes=torch.from_numpy(np.frombuffer(b"".join(jpegs), dtype=np.uint8).copy()),
        jpeg_sizes=[len(j) for j in jpegs],
        # rows of the batch: which ones are raw JPEGs (the others are batch["images"], in order)
        is_jpeg=[s.get("jpeg") is not None for s in kept],
        cpu_fallback=sum(1 for s in samples if s.get("cpu_fallback")),
    )
    return batch


class DeviceJpegDecoder:
    """Main-process side: a `collate_raw` batch -> (uint8 (N, 3, S, S) on `device` in shard order, keys,
    keys of images found corrupt here). `resize_crop` is the CPU path's resize + center crop (timm's eval
    transform), which torchvision applies to tensors as to PIL images; `cpu_transform` is the whole CPU
    path's transform, for the images the device decoder refuses."""

    def __init__(self, device: torch.device, resize_crop: Callable, cpu_transform: Callable,
                 draft_size: int | None = None, decoder: tuple[Callable, str] | None = None):
        self.device, self.resize_crop, self.cpu_transform = torch.device(device), resize_crop, cpu_transform
        self.draft_size = draft_size
        decoder = decoder or jpeg_decoder(self.device)
        if decoder is None:
            raise RuntimeError(f"no JPEG decoder runs on {self.device} (torchcodec, torchvision)")
        self.decode, self.backend = decoder
        self.counts = {"device_decoded": 0, "cpu_fallback": 0, "corrupt": 0}

    def _device_decode(self, data: list[torch.Tensor], first: int) -> dict[int, torch.Tensor | None]:
        """Row -> decoded (3, H, W) tensor on the device, or None where the decoder refuses the image
        (found by splitting a refused batch in halves)."""
        try:
            return dict(zip(range(first, first + len(data)), self.decode(data, self.device), strict=True))
        except RuntimeError:
            if len(data) == 1:
                return {first: None}
            half = len(data) // 2
            return {**self._device_decode(data[:half], first), **self._device_decode(data[half:], first + half)}

    def _cpu_decode(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the image, its fingerprint) on the device, or None for an image that does not decode."""
        try:
            img = decode_image(data.numpy().tobytes(), self.draft_size)
        except Exception:  # noqa: BLE001 - not decodable at all: a corrupt image
            return None
        fp = torch.from_numpy(fingerprint_pil(img)).to(self.device)
        return torch.from_numpy(np.array(self.cpu_transform(img))).permute(2, 0, 1).to(self.device), fp

    def __call__(self, batch: dict) -> tuple[torch.Tensor, list[str], list[str], torch.Tensor]:
        """(images, keys, corrupt keys, each image's fingerprint: uint8 (N, 64) on the device, taken from the
        whole decoded image as the CPU path takes it; data/fingerprints.py)."""
        data = list(torch.split(batch["jpeg_bytes"], batch["jpeg_sizes"])) if batch["jpeg_sizes"] else []
        decoded = self._device_decode(data, 0) if data else {}
        worker_images = batch["images"].to(self.device, non_blocking=True) if batch["images"].numel() else None
        worker_fps = batch["fingerprints"].to(self.device) if "fingerprints" in batch else None
        rows, keys, corrupt, fps = [], [], [], []
        j = w = 0
        for key, is_jpeg in zip(batch["keys"], batch["is_jpeg"], strict=True):
            if not is_jpeg:
                rows.append(worker_images[w])
                fps.append(worker_fps[w] if worker_fps is not None else
                           torch.zeros(DIMS, dtype=torch.uint8, device=self.device))
                w += 1
            else:
                img = decoded[j]
                if img is not None:
                    fps.append(fingerprint_tensor(img))
                    img = self.resize_crop(img)
                    self.counts["device_decoded"] += 1
                else:
                    got = self._cpu_decode(data[j])
                    self.counts["cpu_fallback" if got is not None else "corrupt"] += 1
                    if got is not None:
                        img, fp = got
                        fps.append(fp)
                j += 1
                if img is None:
                    corrupt.append(key)
                    continue
                rows.append(img)
            keys.append(key)
        self.counts["cpu_fallback"] += batch["cpu_fallback"]
        images = torch.stack(rows) if rows else torch.empty(0, dtype=torch.uint8, device=self.device)
        fingerprints = torch.stack(fps) if fps else torch.zeros((0, DIMS), dtype=torch.uint8, device=self.device)
        return images, keys, corrupt, fingerprints
