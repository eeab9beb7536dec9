"""Batches on the device one step ahead of the training step.

While the step runs on batch k, batch k+1 is already copied to the device and normalized: on CUDA
from pinned host memory, on a side stream, so the copy overlaps the step's kernels instead of
queuing behind them on the compute stream (timm's PrefetchLoader does the same for its loaders;
ours takes our batch dicts, which carry corrupt-image counts and targets beside the images, and
normalizes uint8 batches with the model's mean and std). The host never waits for the device here:
the compute stream is told to wait for the side stream, on the device.

On a CPU there is no copy to overlap: batches pass through in the same order, one drawn ahead."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A host tensor in page-locked memory (the only kind a non_blocking copy to CUDA does not wait for)."""
    return t if t.is_pinned() else t.pin_memory()


class DevicePrefetcher:
    """Iterate batch dicts with every tensor on `device` and batch["images"] passed through `prepare`
    (uint8 -> normalized float), one batch ahead. Non-tensor entries (counts, keys, errors) are left
    on the host, where the loop reads them without touching the device."""

    def __init__(self, batches: Iterator[dict], device: torch.device, prepare: Callable[[torch.Tensor], torch.Tensor]):
        self.batches, self.device, self.prepare = batches, torch.device(device), prepare
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ahead: dict | None = None

    def _load(self, batch: dict) -> dict:
        out = dict(batch)
        if self.stream is not None and any(torch.is_tensor(v) and v.device == self.device for v in batch.values()):
            # made on the device already (the DALI loader copies its output on the compute stream): the side
            # stream must not read it before that copy is done (a device-side wait)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for k, v in batch.items():
                if torch.is_tensor(v) and v.device == self.device:
                    continue
                if torch.is_tensor(v):
                    out[k] = pinned(v).to(self.device, non_blocking=True) if self.stream else v.to(self.device)
            if out["images"].numel():
                out["images"] = self.prepare(out["images"])
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.ahead is None:
            self.ahead = self._load(next(self.batches))
        current = self.ahead
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)  # a device-side wait: the host goes on
            for v in current.values():
                if torch.is_tensor(v):
                    # made on the side stream, used on the compute stream: the allocator must not
                    # hand this memory out again before the compute stream is done with it
                    v.record_stream(compute)
        self.ahead = self._load(next(self.batches))
        return current

    def close(self) -> None:
        self.ahead = None
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
