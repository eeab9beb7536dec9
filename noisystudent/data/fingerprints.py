"""Image fingerprints that find copies of eval images in an unlabeled pool (resized, re-encoded, cropped, mirrored).

A pool image's fingerprint is its whole picture as an 8x8 grey thumbnail (64 bytes, uint8): grey as PIL's
convert("L"), shrunk with a bilinear, antialiased filter (the aspect ratio is not kept). It is taken where the
labeling step decodes the image: in the loader worker from the decoded image (before the eval transform's centre
crop), on the device from a device-decoded JPEG, in DALI's pipeline beside the model input. Kept in the label files.

An eval image gets many: it is brought to 28x28 grey (the canvas), and every crop of the canvas whose sides are 25 to
28 pixels (up to ~10% cropped away, each side on its own) at every whole-pixel offset gives a thumbnail, and its
mirror: 200 variants. A copy of the eval image (cropped, resized to any size, mirrored, re-encoded) lands near one of
them. A pool image matches the eval image whose nearest variant is within `max_rms` grey levels (root mean square over
the 64 pixels); one a little farther gets its crop searched again on the eval image's 112 px fine canvas, a quarter of
a canvas pixel at a time (`refine`): the copy of an image larger or smaller than the canvas was cropped between the
canvas's pixels.

Why thumbnails of whole images, and a crop grid on the eval side only (measured on Fashion-MNIST, benchmarks/
bench_copies.py; docs/pseudolabels.md#copies-of-eval-images):
- a DCT hash (pHash) that finds 80% of the copies matches nearly every clean pool image (centred products on black
  share their low frequencies); the teacher's features are built to make images of one class alike;
- the pool side stays 64 bytes and crop-free; the eval set is small next to the pool, so it carries the variants;
- the crops must line up to a fraction of a pixel: thumbnails of the eval transform's centre crop (whose edges fall
  between pixels) lost most of the recall on sharp-edged images, a grid fine enough everywhere would be too many
  variants; the fine search runs only where a pool image is already close.

Matching is exact nearest-variant search, pruned by the triangle inequality on the thumbnails' norms: eval variants
sorted by norm, and each block of pool images (sorted by norm) compared only with the variants whose norm is within
max_rms x 8 of its own. Runs on any torch device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIDE = 8  # the thumbnail's side: 64 bytes per image
DIMS = SIDE * SIDE
CANON = 28  # an eval image's canvas side, the crop grid's pixels
CROP_SIDES = (28, 27, 26, 25)  # up to ~10% of each side cropped away
FINE_SCALE = 4  # the fine canvas (a candidate's refinement): 4x the canvas, 112 px
FINE = FINE_SCALE * CANON
LUMA = (0.299, 0.587, 0.114)  # PIL's convert("L")


def _grey_square(img: Image.Image, side: int) -> np.ndarray:
    """An image -> uint8 (side, side) grey (PIL's luma), resized with PIL's bilinear filter (antialiased when it
    shrinks), its aspect ratio not kept: the one resize behind the fingerprint and both eval canvases."""
    grey = img if img.mode == "L" else img.convert("L")
    return np.array(grey.resize((side, side), Image.BILINEAR), dtype=np.uint8)


def fingerprint_pil(img: Image.Image) -> np.ndarray:
    """A decoded image -> its uint8 (64,) fingerprint."""
    return _grey_square(img, SIDE).reshape(DIMS)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, 1, H, W) grey levels 0..255 (PIL's luma for 3 channels)."""
    x = images.float()
    if x.shape[1] == 1:
        return x
    w = torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)
    return (x[:, :3] * w).sum(dim=1, keepdim=True)


def _thumb(grey: torch.Tensor) -> torch.Tensor:
    return F.interpolate(grey, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)


def _to_uint8(t: torch.Tensor) -> torch.Tensor:
    return t.round_().clamp_(0, 255).to(torch.uint8)


def fingerprint_tensor(image: torch.Tensor) -> torch.Tensor:
    """A decoded uint8 (C, H, W) image on any device -> its uint8 (64,) fingerprint there (as `fingerprint_pil`)."""
    return _to_uint8(_thumb(_grey(image[None])).reshape(DIMS))


def canvas(img: Image.Image) -> np.ndarray:
    """An eval image -> its uint8 (28, 28, 1) grey canvas (HWC, as the loaders stack images)."""
    return _grey_square(img, CANON)[:, :, None]


def fine_canvas(img: Image.Image) -> np.ndarray:
    """An eval image -> its uint8 (112, 112) grey fine canvas: where a close candidate's crop is searched to a quarter
    of the canvas's pixel (`refine`)."""
    return _grey_square(img, FINE)


def crop_grid() -> list[tuple[int, int, int, int]]:
    """(y, x, height, width) of every crop of the canvas with sides in CROP_SIDES, at every offset."""
    per_axis = [(s, o) for s in CROP_SIDES for o in range(CANON - s + 1)]
    return [(y, x, h, w) for h, y in per_axis for w, x in per_axis]


def variants(canvases: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) canvases -> uint8 (N, V, 64): the thumbnail of every crop of the grid, then of each
    mirrored (a mirrored copy's thumbnail is the mirrored thumbnail: the filter is symmetric). V = 200."""
    c = _grey(canvases)
    t = torch.stack([_thumb(c[:, :, y:y + h, x:x + w]) for y, x, h, w in crop_grid()], dim=1)[:, :, 0]
    both = torch.cat([t, t.flip(-1)], dim=1)
    # contiguous: a channels_last batch (as the loaders stack images) would leave strides a raw writer ignores
    return _to_uint8(both.reshape(len(canvases), -1, DIMS)).contiguous()


def variant_count() -> int:
    return 2 * len(crop_grid())


def refine(fingerprint: np.ndarray, fine: np.ndarray, variant: int, reach: int = 2) -> float:
    """The rms distance of a pool fingerprint to the thumbnails of the crops of an eval image's fine canvas around
    its nearest variant's crop: each side and offset moved by up to `reach` fine pixels (a quarter of a canvas
    pixel each). An eval image larger or smaller than the canvas puts its copies' crops between the canvas's
    pixels; this finds them there (docs/pseudolabels.md#copies-of-eval-images)."""
    grid = crop_grid()
    flip = variant >= len(grid)
    y, x, h, w = (FINE_SCALE * a for a in grid[variant % len(grid)])
    t = torch.from_numpy(np.array(fine, dtype=np.float32))[None]
    q = torch.from_numpy(np.asarray(fingerprint)).float()
    best = float("inf")
    for hh in range(h - reach, h + reach + 1):
        for ww in range(w - reach, w + reach + 1):
            crops = [t[:, yy:yy + hh, xx:xx + ww] for yy in range(y - reach, y + reach + 1)
                     for xx in range(x - reach, x + reach + 1)
                     if yy >= 0 and xx >= 0 and yy + hh <= FINE and xx + ww <= FINE]
            if not crops:
                continue
            th = _thumb(torch.stack(crops))
            if flip:
                th = th.flip(-1)
            best = min(best, float(((th.reshape(len(crops), DIMS) - q) ** 2).mean(1).min().sqrt()))
    return best


@dataclass
class EvalIndex:
    """Every eval variant, sorted by norm, with the eval image it belongs to."""
    thumbs: torch.Tensor  # uint8 (M, 64), sorted by norm (a slice becomes float32 only while it is compared)
    norms: torch.Tensor  # float32 (M,), ascending
    owner: torch.Tensor  # int64 (M,): the eval image's row
    variant: torch.Tensor  # int16 (M,): which of its image's variants (`variants`' order)

    @classmethod
    def build(cls, eval_variants: np.ndarray, device: torch.device | str = "cpu") -> EvalIndex:
        """`eval_variants`: uint8 (N, V, 64), as `variants` gives them."""
        n, v, d = eval_variants.shape
        t = torch.from_numpy(np.ascontiguousarray(eval_variants).reshape(n * v, d)).to(device)
        # in slices: the float copy of a large eval side would be 4x its uint8 size
        norms = torch.cat([t[i:i + (1 << 20)].float().norm(dim=1) for i in range(0, len(t), 1 << 20)]) if len(t) \
            else torch.zeros(0, device=device)
        order = torch.argsort(norms)
        owner = torch.arange(n, device=device).repeat_interleave(v)
        variant = torch.arange(v, device=device, dtype=torch.int16).repeat(n)
        return cls(t[order].contiguous(), norms[order].contiguous(), owner[order].contiguous(),
                   variant[order].contiguous())

    @property
    def nbytes(self) -> int:
        return sum(x.element_size() * x.numel() for x in (self.thumbs, self.norms, self.owner, self.variant))


def match(pool: np.ndarray, index: EvalIndex, max_rms: float, block: int = 256,
          span: int = 1 << 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For uint8 (n, 64) pool fingerprints: (the matched eval image's row, -1 where none is within max_rms;
    the rms distance to its nearest variant, inf where none is within max_rms; which variant, -1 where none). Exact:
    the pruning only skips variants whose norm alone puts them farther than max_rms."""
    n = len(pool)
    found = np.full(n, -1, dtype=np.int64)
    dist = np.full(n, np.inf, dtype=np.float32)
    which = np.full(n, -1, dtype=np.int64)
    if n == 0 or len(index.norms) == 0:
        return found, dist, which
    device = index.thumbs.device
    q = torch.from_numpy(np.ascontiguousarray(pool)).to(device).float()
    qn = q.norm(dim=1)
    order = torch.argsort(qn)
    q, qn = q[order], qn[order]
    reach = float(max_rms) * SIDE  # an rms of r over 64 values is an L2 distance of 8 r
    lo_all = torch.searchsorted(index.norms, qn - reach).cpu().numpy()
    hi_all = torch.searchsorted(index.norms, qn + reach, right=True).cpu().numpy()
    best_d = torch.full((n,), float("inf"), device=device)
    best_i = torch.full((n,), -1, dtype=torch.int64, device=device)
    best_v = torch.full((n,), -1, dtype=torch.int64, device=device)
    for s in range(0, n, block):
        e = min(s + block, n)
        lo, hi = int(lo_all[s:e].min()), int(hi_all[s:e].max())
        qb = q[s:e]
        q2 = (qb * qb).sum(1, keepdim=True)
        for a in range(lo, hi, span):  # the band in slices: a block's distances stay block x span floats
            b = min(a + span, hi)
            d2 = q2 + (index.norms[a:b] ** 2)[None] - 2.0 * qb @ index.thumbs[a:b].float().T
            m, j = d2.min(dim=1)
            better = m < best_d[s:e]
            best_d[s:e] = torch.where(better, m.clamp_min(0.0), best_d[s:e])
            best_i[s:e] = torch.where(better, index.owner[a:b][j], best_i[s:e])
            best_v[s:e] = torch.where(better, index.variant[a:b][j].long(), best_v[s:e])
    rms = (best_d / DIMS).sqrt()
    back = torch.empty_like(order)
    back[order] = torch.arange(n, device=device)
    rms, best_i, best_v = rms[back].cpu().numpy(), best_i[back].cpu().numpy(), best_v[back].cpu().numpy()
    hit = rms <= float(max_rms)
    found[hit] = best_i[hit]
    dist[hit] = rms[hit]
    which[hit] = best_v[hit]
    return found, dist, which


def match_refined(pool: np.ndarray, index: EvalIndex, fine_of, max_rms: float, loose: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`match` within max_rms, and for the pool images whose nearest variant is between max_rms and `loose`, the
    crop search on that eval image's fine canvas (`refine`; fine_of(row) gives it): (row or -1, distance or inf,
    whether the match needed the refinement)."""
    found, dist, which = match(pool, index, loose)
    refined = np.zeros(len(pool), dtype=bool)
    for i in np.flatnonzero((found >= 0) & (dist > max_rms)).tolist():
        d = refine(pool[i], fine_of(int(found[i])), int(which[i]))
        if d <= max_rms:
            dist[i], refined[i] = d, True
    miss = dist > max_rms
    found[miss], dist[miss] = -1, np.inf
    return found, dist, refined
