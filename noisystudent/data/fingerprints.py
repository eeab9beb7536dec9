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

Matching is exact nearest-variant search (`EvalIndex`, `match`): the eval variants are grouped in lists around
centroids, each list sorted by distance to its centroid, and a pool image is compared only with the rows of each list
whose distance to the centroid is within the radius of its own (the triangle inequality: no variant within the radius
is skipped). On Fashion-MNIST that is 2-3% of the pool x variants pairs. Runs on any torch device."""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=256)
def _shrink(side: int) -> torch.Tensor:
    """float32 (8, side): the thumbnail's resize along one axis as a matrix. Antialiased bilinear resizing is
    separable, so a crop's thumbnail is shrink(h) @ crop @ shrink(w).T (`_thumb` up to float rounding)."""
    eye = torch.eye(side)[None, None]  # resized along its height only: A @ I = A
    return F.interpolate(eye, size=(SIDE, side), mode="bilinear", antialias=True, align_corners=False)[0, 0]


@functools.lru_cache(maxsize=64)  # keyed by a crop of the grid along one axis: 10 of them
def _around(side: int, start: int, reach: int) -> tuple[torch.Tensor, int]:
    """(float32 (8 n, FINE), n): `_shrink` of each of the n crops of the fine canvas along one axis whose side and
    start are within `reach` of (side, start) and that fit in it, stacked: one product shrinks them all."""
    crops = [(s, a) for s in range(side - reach, side + reach + 1) for a in range(start - reach, start + reach + 1)
             if a >= 0 and a + s <= FINE]
    out = torch.zeros(SIDE * len(crops), FINE)
    for k, (s, a) in enumerate(crops):
        out[SIDE * k:SIDE * (k + 1), a:a + s] = _shrink(s)
    return out, len(crops)


def refine(fingerprint: np.ndarray, fine: np.ndarray, variant: int, reach: int = 2) -> float:
    """The rms distance of a pool fingerprint to the thumbnails of the crops of an eval image's fine canvas around
    its nearest variant's crop: each side and offset moved by up to `reach` fine pixels (a quarter of a canvas
    pixel each). An eval image larger or smaller than the canvas puts its copies' crops between the canvas's
    pixels; this finds them there (docs/pseudolabels.md#copies-of-eval-images). All (2 reach + 1)^4 crops'
    thumbnails come from two matrix products (`_around`), not one resize per crop."""
    grid = crop_grid()
    y, x, h, w = (FINE_SCALE * a for a in grid[variant % len(grid)])
    q = torch.from_numpy(np.asarray(fingerprint)).float().reshape(SIDE, SIDE)
    if variant >= len(grid):
        q = q.flip(-1)  # the mirrored crop's thumbnail is the crop's, mirrored
    rows, n_rows = _around(h, y, reach)
    cols, n_cols = _around(w, x, reach)
    t = torch.from_numpy(np.array(fine, dtype=np.float32))
    thumbs = (rows @ t @ cols.T).reshape(n_rows, SIDE, n_cols, SIDE).transpose(1, 2)
    return float(((thumbs - q) ** 2).mean((-2, -1)).min().sqrt())


LIST_SIZE = 4096  # eval variants per list, about: a query's band in a list is a slice of it
CENTROID_DISTANCES = 1 << 24  # pool images x centroids held at once in `match`: 64 MiB
BIG = 4096.0  # > any distance between thumbnails (255 x 8 = 2040) + 2 x a radius: lists' keys never overlap


def _nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 15) -> torch.Tensor:
    """The row of each x's nearest centroid (float32 (n, 64) against (k, 64)), in chunks: a chunk's distances stay
    chunk x k floats."""
    c2 = (centroids * centroids).sum(1)
    return torch.cat([(c2[None] - 2.0 * x[i:i + chunk] @ centroids.T).argmin(1) for i in range(0, len(x), chunk)]) \
        if len(x) else torch.zeros(0, dtype=torch.int64, device=x.device)


def _kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 6) -> torch.Tensor:
    """k centroids of float32 rows x (Lloyd's iterations from a seeded sample of the rows). Their quality only sets
    how much the search skips, never what it finds."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k].to(x.device)].clone()
    for _ in range(iters):
        a = _nearest(x, c)
        s = torch.zeros_like(c).index_add_(0, a, x)
        n = torch.bincount(a, minlength=len(c)).to(x.dtype)
        c = torch.where(n[:, None] > 0, s / n.clamp_min(1)[:, None], c)  # an empty list keeps its centroid
    return c


@dataclass
class EvalIndex:
    """Every eval variant, in lists around centroids: list j holds rows starts[j]:starts[j + 1], sorted by their
    distance to its centroid. The key of a row is j x BIG + that distance, so one sorted array finds, for any
    query and list, the band of rows whose distance to the centroid is within a radius of the query's: by the
    triangle inequality every variant within that radius of the query lies in the band (the search stays exact).
    The centroids come from a two-level k-means over a sample of the variants (sqrt of the lists at the top; each
    variant goes to its top centroid's nearest child), so building costs a few hundred distances per variant.
    Memory: 76 bytes per variant (the thumbnail, its key and its source): 14 GiB per 1M eval images of 200
    variants."""
    thumbs: torch.Tensor  # uint8 (M, 64), list by list (a slice becomes float32 only while it is compared)
    key: torch.Tensor  # float64 (M,), ascending: list x BIG + the distance to the list's centroid
    source: torch.Tensor  # int32 (M,): the variant's row in the input, eval image x V + which variant
    centroids: torch.Tensor  # float32 (K, 64)
    starts: torch.Tensor  # int64 (K + 1,)
    per_image: int  # V, variants per eval image

    @classmethod
    def build(cls, eval_variants: np.ndarray | list[np.ndarray], device: torch.device | str = "cpu",
              list_size: int = LIST_SIZE, seed: int = 0) -> EvalIndex:
        """`eval_variants`: uint8 (N, V, 64) as `variants` gives them, or a list of such arrays (one per eval set or
        cache file; np.memmaps are read in order, slice by slice, twice). Building holds 80 bytes per variant at its
        peak (the index and where each row goes), and a slice of rows as float32."""
        parts = [eval_variants] if isinstance(eval_variants, np.ndarray) else list(eval_variants)
        v = parts[0].shape[1] if parts else 1
        if any(p.shape[1:] != (v, DIMS) for p in parts):
            raise ValueError(f"eval variants must be (N, {v}, {DIMS}) arrays, got {[p.shape for p in parts]}")
        m = sum(len(p) * v for p in parts)
        rows = 1 << 18

        def slices(step: int = 1):
            """(first row, float32 rows) over every part in order; with step > 1, every step-th row only."""
            at = 0
            for p in parts:
                flat = p.reshape(len(p) * v, DIMS)
                for a in range(0, len(flat), rows):  # np.array: a copy (a map is read-only)
                    yield at + a, torch.from_numpy(np.array(flat[a:a + rows:step])).to(device).float()
                at += len(flat)

        k = max(1, m // list_size)
        # the centroids' sample: every step-th variant (a sequential read; ~64 per list)
        step = max(1, m // (64 * k))
        sample = torch.cat([x for _, x in slices(step)]) if m else torch.zeros(0, DIMS, device=device)
        top = _kmeans(sample, max(1, round(k ** 0.5)), seed) if m else torch.zeros(0, DIMS, device=device)
        in_top = _nearest(sample, top)
        children, first = [], [0]
        for t in range(len(top)):  # each top centroid gets children in proportion to its share of the sample
            part = sample[in_top == t]
            kids = _kmeans(part, max(1, round(k * len(part) / max(1, len(sample)))), seed + 1 + t) if len(part) \
                else top[t:t + 1]
            children.append(kids)
            first.append(first[-1] + len(kids))
        del sample, in_top
        centroids = torch.cat(children) if children else torch.zeros(0, DIMS, device=device)
        key = torch.empty(m, dtype=torch.float64, device=device)
        for a, x in slices():  # pass 1: each variant's list (its top centroid's nearest child) and distance
            t = _nearest(x, top)
            j = torch.empty(len(x), dtype=torch.int64, device=device)
            for u in t.unique().tolist():
                sel = (t == u).nonzero()[:, 0]
                j[sel] = first[u] + _nearest(x[sel], children[u])
            key[a:a + len(x)] = j.double() * BIG + (x - centroids[j]).norm(dim=1).double()
        key, order = torch.sort(key)
        source = order.to(torch.int32)
        del order
        starts = torch.searchsorted(key, torch.arange(len(centroids) + 1, device=device, dtype=torch.float64) * BIG)
        where = torch.empty(m, dtype=torch.int32, device=device)  # each input row's place in the index
        for a in range(0, m, rows):
            where[source[a:a + rows].long()] = torch.arange(a, min(a + rows, m), dtype=torch.int32, device=device)
        thumbs = torch.empty((m, DIMS), dtype=torch.uint8, device=device)
        for a, x in slices():  # pass 2: each slice's rows to their place
            thumbs[where[a:a + len(x)].long()] = x.to(torch.uint8)
        del where
        return cls(thumbs, key, source, centroids, starts, v)

    @property
    def nbytes(self) -> int:
        return sum(x.element_size() * x.numel() for x in (self.thumbs, self.key, self.source, self.centroids,
                                                           self.starts))


def match(pool: np.ndarray, index: EvalIndex, max_rms: float, block: int = 128, chunk: int | None = None,
          stats: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For uint8 (n, 64) pool fingerprints: (the matched eval image's row, -1 where none is within max_rms;
    the rms distance to its nearest variant, inf where none is within max_rms; which variant, -1 where none).

    Exact: for `chunk` pool images at a time, each (image, list) pair gives the band of that list's rows whose
    distance to the centroid is within the radius of the image's (EvalIndex); the pairs of one list, sorted by the
    image's distance, go `block` at a time through one matrix product with the union of their bands. `stats`, where
    given, gets the number of (pool image, eval variant) distances computed ("pairs")."""
    n = len(pool)
    found = np.full(n, -1, dtype=np.int64)
    dist = np.full(n, np.inf, dtype=np.float32)
    which = np.full(n, -1, dtype=np.int64)
    if n == 0 or len(index.key) == 0:
        return found, dist, which
    device = index.thumbs.device
    reach = float(max_rms) * SIDE  # an rms of r over 64 values is an L2 distance of 8 r
    c2 = (index.centroids * index.centroids).sum(1)
    lo_list, hi_list = index.starts[:-1], index.starts[1:]
    # each list's nearest and farthest row from its centroid: a list whose rows are all farther from a query's
    # distance than the radius is not searched for it
    filled = hi_list > lo_list
    ids = torch.arange(len(lo_list), device=device, dtype=torch.float64)
    near = torch.where(filled, index.key[lo_list.clamp_max(len(index.key) - 1)] - ids * BIG, float("inf"))
    far = torch.where(filled, index.key[(hi_list - 1).clamp_min(0)] - ids * BIG, -float("inf"))
    chunk = chunk or 4096
    piece = max(1, CENTROID_DISTANCES // chunk)  # centroids at a time
    best_d = torch.full((n,), float("inf"), device=device)
    best_r = torch.full((n,), -1, dtype=torch.int64, device=device)
    for s in range(0, n, chunk):
        q = torch.from_numpy(np.ascontiguousarray(pool[s:s + chunk])).to(device).float()
        q2 = (q * q).sum(1, keepdim=True)
        pairs = []  # (pool image, list, its distance to the list's centroid) where the list may hold a match
        for c0 in range(0, len(c2), piece):
            c1 = c0 + piece
            dq = (c2[None, c0:c1] - 2.0 * q @ index.centroids[c0:c1].T + q2).clamp_min_(0).sqrt_()
            ii, jj = ((dq + reach >= near[None, c0:c1]) & (dq - reach <= far[None, c0:c1])).nonzero(as_tuple=True)
            pairs.append((ii, jj + c0, dq[ii, jj].double()))
        i, j, dij = (torch.cat(t) for t in zip(*pairs, strict=True))
        at = j.double() * BIG + dij  # the pair's place among the index's keys: its band is at +- reach
        lo = torch.maximum(torch.searchsorted(index.key, at - reach), lo_list[j])
        hi = torch.minimum(torch.searchsorted(index.key, at + reach, right=True), hi_list[j])
        keep = lo < hi
        i, j, at, lo, hi = i[keep], j[keep], at[keep], lo[keep], hi[keep]
        order = torch.argsort(at)  # by list, then by the image's distance: bands overlap most
        i, j = i[order], j[order].cpu()
        lo, hi = lo[order].tolist(), hi[order].tolist()  # one transfer per chunk; both ascend within a list
        cut = torch.ones(len(j), dtype=torch.bool)
        cut[1:] = j[1:] != j[:-1]
        heads = cut.nonzero()[:, 0].tolist() + [len(j)]
        got_q, got_d, got_r = [], [], []  # per block: its pool images, their nearest row of the block, its distance
        for h0, h1 in zip(heads[:-1], heads[1:], strict=True):
            l0 = lo[h0]
            t = index.thumbs[l0:hi[h1 - 1]].float()  # the list's rows any of its pairs reads
            t2 = (t * t).sum(1)
            for a in range(h0, h1, block):
                b = min(a + block, h1)
                r0, r1 = lo[a] - l0, hi[b - 1] - l0
                rows_q = i[a:b]
                # |q - t|^2 = |t|^2 - 2 q.t (+ |q|^2, the same for the row): one pass over the block's distances
                mval, mrow = torch.addmm(t2[None, r0:r1], q[rows_q], t[r0:r1].T, alpha=-2.0).min(dim=1)
                got_q.append(rows_q)
                got_d.append(mval)
                got_r.append(mrow + (r0 + l0))
                if stats is not None:
                    stats["pairs"] = stats.get("pairs", 0) + (b - a) * (r1 - r0)
        if not got_q:
            continue
        # each pool image's nearest over its blocks (ties: the lowest row, so the answer never depends on order)
        g, d, r = torch.cat(got_q), torch.cat(got_d) + q2[:, 0][torch.cat(got_q)], torch.cat(got_r)
        m = torch.full((len(q),), float("inf"), device=device).scatter_reduce_(0, g, d, "amin")
        win = d == m[g]
        first = torch.full((len(q),), len(index.key), dtype=torch.int64, device=device)
        first.scatter_reduce_(0, g[win], r[win], "amin")
        seen = first < len(index.key)
        best_d[s:s + len(q)] = torch.where(seen, m.clamp_min(0.0), best_d[s:s + len(q)])
        best_r[s:s + len(q)] = torch.where(seen, first, best_r[s:s + len(q)])
    rms = (best_d / DIMS).sqrt().cpu().numpy()
    row = best_r.cpu().numpy()
    hit = rms <= float(max_rms)
    src = index.source[torch.from_numpy(row[hit]).to(device)].cpu().numpy().astype(np.int64)
    found[hit] = src // index.per_image
    dist[hit] = rms[hit]
    which[hit] = src % index.per_image
    return found, dist, which


def match_refined(pool: np.ndarray, index: EvalIndex, fine_of, max_rms: float, loose: float,
                  stats: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`match` within max_rms, and for the pool images whose nearest variant is between max_rms and `loose`, the
    crop search on that eval image's fine canvas (`refine`; fine_of(row) gives it): (row or -1, distance or inf,
    whether the match needed the refinement)."""
    found, dist, which = match(pool, index, loose, stats=stats)
    refined = np.zeros(len(pool), dtype=bool)
    for i in np.flatnonzero((found >= 0) & (dist > max_rms)).tolist():
        d = refine(pool[i], fine_of(int(found[i])), int(which[i]))
        if d <= max_rms:
            dist[i], refined[i] = d, True
    miss = dist > max_rms
    found[miss], dist[miss] = -1, np.inf
    return found, dist, refined
