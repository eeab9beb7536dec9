"""BatchNorm statistics re-estimated for the weights a step ends with, at the resolution they will see.

After a test-resolution fine-tune the EMA weights carry running statistics that are an average over
the run of other weights' statistics, partly at another resolution. torch's `update_bn` (the
cumulative average SWA uses) recomputes them over a few batches; with several processes each
process measures its own batches and the means of their statistics are taken, so every replica
ends with the same buffers."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import update_bn


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def reestimate_batchnorm(accelerator, model: nn.Module, batches: Iterator[dict], n_batches: int) -> dict:
    """Recompute every BatchNorm's running mean and variance of `model` (in place) from `n_batches` batches
    of `batches` (dicts whose "images" are the model's input, on its device), averaged over processes.
    Returns what was done, for the summary."""
    layers = batchnorm_layers(model)
    if not layers or n_batches < 1:
        return {"layers": len(layers), "images": 0}
    seen = {"images": 0}

    def inputs():
        taken = 0
        while taken < n_batches:
            batch = next(batches)
            if batch["images"].numel() == 0:  # every image of the batch was corrupt (counted by the stream)
                continue
            seen["images"] += batch["images"].shape[0]
            taken += 1
            yield batch["images"]

    was_training = model.training
    with torch.no_grad():
        update_bn(inputs(), model)
    model.train(was_training)
    if accelerator.num_processes > 1:
        for layer in layers:
            for buf in (layer.running_mean, layer.running_var):
                buf.copy_(accelerator.reduce(buf.detach().clone(), "mean"))
    images = int(accelerator.reduce(torch.tensor(seen["images"], device=accelerator.device), "sum"))
    return {"layers": len(layers), "images": images, "batches_per_process": n_batches}
