"""The webdataset pipelines the stages read, as small composable stages, and their loaders.

- training: endless, shuffled, resampled streams of labeled batches (`labeled_batches`), of
  pseudo-labeled batches (`pseudo_labeled_batches`: unlabeled shards joined with their label files
  and the selection applied on the fly), and the student's mix of both (`mixed_batches`);
- evaluation: one ordered pass, each shard read by one worker of one process (`ordered_stream`);
- labeling: batches that never cross a shard, one label file per shard (`ShardBatches`).

Decoding and batching happen in DataLoader workers (webdataset's usual pattern), so a corrupt image
can be dropped *and counted*: each batch carries how many images it lost (data/shards.py)."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .labels import LabelFile
from .shards import SampleDecoder, collate_counting, file_image_ext, skip_and_record_shard_error


class _SeededShuffle:
    """webdataset's shuffle buffer with an rng seeded from (seed, rank, worker): wds.shuffle() without
    an rng seeds from pid and time, which made runs with the same `seed` differ."""

    def __init__(self, bufsize: int, initial: int, seed: int):
        self.bufsize, self.initial, self.seed = bufsize, initial, seed

    def __call__(self, src):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{rank}-{worker}")
        return wds.shuffle(self.bufsize, self.initial, rng=rng)(src)


def training_stream(urls: list[str], decoder: SampleDecoder, batch_size: int, shuffle_buffer: int, seed: int,
                    extra_stages: Iterable = ()) -> wds.DataPipeline:
    """An endless, shuffled stream of batches for training.

    Shards are resampled (each worker of each process draws shards at random with its own seed),
    so there is no per-rank split that could leave a rank without data and hang a collective;
    the loop counts optimizer steps, and an epoch is len(dataset) / global batch."""
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=skip_and_record_shard_error),
        *extra_stages,
        _SeededShuffle(shuffle_buffer, min(shuffle_buffer, 1000), seed),
        wds.map(decoder),
        wds.batched(batch_size, collation_fn=collate_counting, partial=False),
    )


def ordered_stream(urls: list[str], decoder: SampleDecoder, batch_size: int, split_by_node: bool = True,
                   select: Callable | None = None, batches: Callable | None = None) -> wds.DataPipeline:
    """One pass, in shard order, each shard read by exactly one worker of exactly one process.

    Used for evaluation (each eval image is counted exactly once across processes). `select`: a stage that
    drops samples before they are decoded; `batches`: a stage that batches the decoded samples instead of
    `batch_size` at a time (the robustness evaluation's views, data/corruptions.py)."""
    stages = [wds.SimpleShardList(urls)]
    if split_by_node:
        stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, wds.tarfile_to_samples(handler=wds.reraise_exception)]
    stages += [select] if select is not None else []
    stages += [wds.map(decoder),
               batches or wds.batched(batch_size, collation_fn=collate_counting, partial=True)]
    return wds.DataPipeline(*stages)


class _WorkerInit:
    """Set up each loader worker: ignore SIGTERM, lower its CPU priority by `nice`."""

    def __init__(self, nice: int):
        self.nice = nice

    def __call__(self, _worker_id: int) -> None:
        # A scheduler's SIGTERM goes to the whole process group. The main process answers it by saving a
        # checkpoint (engine.fit); a worker dying of it first would crash the main process before it can.
        # (Workers still end when their DataLoader shuts them down, or are killed when the main process
        # exits on an error: see __main__.end_child_processes.)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Where workers and the model share the cores (CPU training), the step's threads wait for each
        # other at every op: a worker taking one core stalls both. At a lower priority the workers run
        # when the step leaves a core idle, or when it waits for a batch, and then on all cores at once.
        if self.nice:
            os.nice(self.nice)


def make_loader(pipeline, num_workers: int, shards_per_process: int | None = None,
                worker_nice: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader over a pipeline that batches itself. Workers beyond the number of shards a
    process reads would get no shard, so their number is capped to it. pin_memory (for a CUDA
    device): batches arrive in page-locked memory, so their copy to the device need not wait."""
    if shards_per_process is not None:
        num_workers = min(num_workers, max(shards_per_process, 0))
    return torch.utils.data.DataLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        worker_init_fn=_WorkerInit(worker_nice) if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=pin_memory,
    )


def rank_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """The shards one process reads when it takes a disjoint share (same rule as wds.split_by_node)."""
    return urls[rank::world_size]


BatchStream = Callable[[int], Iterator[dict]]  # seed -> endless iterator of batches


def labeled_batches(urls: list[str], decoder: SampleDecoder, batch_size: int, shuffle_buffer: int,
                    num_workers: int, nice: int, pin_memory: bool = False) -> BatchStream:
    """seed -> endless iterator over shuffled, augmented labeled batches (loader workers at `nice`)."""

    def make(seed: int):
        return iter(make_loader(training_stream(urls, decoder, batch_size, shuffle_buffer, seed), num_workers,
                                worker_nice=nice, pin_memory=pin_memory))

    return make


class JoinPseudoLabels:
    """webdataset stage: unlabeled samples -> samples with a "target" distribution, each repeated as
    many times as the selection says (0 = dropped). One shard's label file is in memory at a time."""

    def __init__(self, paths: dict, selection, num_classes: int):
        self.paths, self.selection, self.num_classes = paths, selection, num_classes

    def _table(self, url: str) -> dict:
        f = LabelFile(self.paths[url])
        r = self.selection.rows(f)
        rep = r.repeats
        keep = np.flatnonzero(rep)
        ids, probs, rest, label = self.selection.target_arrays(f, r)
        targets = self.selection.targets_from(ids[keep], probs[keep], None if rest is None else rest[keep],
                                              label[keep], self.num_classes, f.hard)
        keys = f.keys()
        return {keys[i]: (int(rep[i]), torch.from_numpy(targets[j])) for j, i in enumerate(keep)}

    def __call__(self, src):
        url, table = None, {}
        for sample in src:
            if sample["__url__"] != url:
                url = sample["__url__"]
                table = self._table(url)
            entry = table.get(sample["__key__"])
            if entry is None:
                continue
            for _ in range(entry[0]):
                yield {**sample, "target": entry[1]}


def pseudo_labeled_batches(urls: list[str], join: JoinPseudoLabels, decoder: SampleDecoder, batch_size: int,
                           shuffle_buffer: int, num_workers: int, nice: int) -> BatchStream:
    """seed -> endless iterator over the selected pseudo-labeled images, augmented, with their targets."""

    def make(seed: int):
        # its own seed, apart from the labeled stream's (both start from the same step seed)
        stream = training_stream(urls, decoder, batch_size, shuffle_buffer, seed + 17, [join])
        return iter(make_loader(stream, num_workers, worker_nice=nice))

    return make


def concat_images(parts: list[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    """uint8 (N, C, H, W) batches laid out channels_last (`stack_hwc`) -> one such batch, in page-locked
    memory when asked (for a CUDA device: the one host copy, written where the device copy reads it)."""
    parts = [p for p in parts if p.numel()]
    if not parts:
        return torch.empty(0)
    if len(parts) == 1 and not pin_memory:
        return parts[0]
    n, (c, h, w) = sum(p.shape[0] for p in parts), parts[0].shape[1:]
    on_device = parts[0].device.type != "cpu"  # the DALI loader's batches are on the GPU already
    out = torch.empty((n, h, w, c), dtype=parts[0].dtype, device=parts[0].device,
                      pin_memory=pin_memory and not on_device).permute(0, 3, 1, 2)
    return torch.cat(parts, out=out)


def mixed_batches(labeled: BatchStream, pseudo_labeled: BatchStream, pin_memory: bool = False) -> BatchStream:
    """The student's batches: [labeled | pseudo-labeled] images concatenated for one forward pass."""

    def make(seed: int):
        lab, unl = labeled(seed), pseudo_labeled(seed)
        while True:
            a, b = next(lab), next(unl)
            yield {"images": concat_images([a["images"], b["images"]], pin_memory),
                   "labels": a["labels"], "targets": b.get("targets"),
                   "n_corrupt": a["n_corrupt"] + b["n_corrupt"], "shard_errors": a["shard_errors"] + b["shard_errors"],
                   "corrupt_shards": a["corrupt_shards"] + b["corrupt_shards"],
                   "first_error": a["first_error"] or b["first_error"]}

    return make


def read_tar(url: str) -> Iterator[dict]:
    """The samples of one webdataset shard, in order."""
    return wds.tarfile_samples([{"url": url}])


class ImageFiles:
    """Image files read as if they were shards: `chunks` maps a source name to its files; each file is a
    sample keyed by its path relative to `root` (for labeling a directory with ShardBatches)."""

    def __init__(self, root: str, chunks: dict[str, list[str]]):
        self.root, self.chunks = root, chunks

    def __call__(self, source: str) -> Iterator[dict]:
        for path in self.chunks[source]:
            ext = file_image_ext(path)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:  # unreadable: no bytes, so it counts as a corrupt image of its own
                data = b""
            yield {"__key__": os.path.relpath(path, self.root), "__url__": source, ext: data}


class ShardBatches(IterableDataset):
    """Labeling: batches that never cross a shard. Each worker reads whole shards; a shard's last batch
    has last=True, and a shard that cannot be read yields one batch with its error instead."""

    def __init__(self, urls: list[str], decoder: Callable[[dict], dict], batch_size: int,
                 collate: Callable[[list[dict]], dict] = collate_counting, read: Callable | None = None):
        self.urls, self.decoder, self.batch_size, self.collate = urls, decoder, batch_size, collate
        self.read = read or read_tar

    def __iter__(self):
        info = get_worker_info()
        mine = self.urls[info.id::info.num_workers] if info else self.urls
        for url in mine:
            pending: list[dict] = []
            samples = self.read(url)
            while True:
                try:  # only reading the shard is guarded: decoding guards itself, a transform bug propagates
                    sample = next(samples)
                except StopIteration:
                    yield {**self.collate(pending), "shard": url, "last": True}
                    break
                except Exception as e:  # noqa: BLE001 - an unreadable shard is reported, not fatal
                    yield {"shard": url, "error": f"{type(e).__name__}: {e}", "last": True}
                    break
                pending.append(self.decoder(sample))
                if len(pending) == self.batch_size:
                    yield {**self.collate(pending), "shard": url, "last": False}
                    pending = []
