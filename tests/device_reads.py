"""Counting the training loop's reads of device values, on a CPU.

A read (`.item()`, `float(t)`, `int(t)`, `bool(t)`, `.tolist()`, `.numpy()`) of a tensor computed on
a GPU makes the host wait until the device has caught up: in a training step, it stalls the GPU
queue. GPUs are rare for this project, so the loop is checked on a CPU: every such call is recorded
with the optimizer step it happened in. Calls made by torch itself are left out: its optimizers read
their step counters, which are host tensors on a GPU too.

Also run as a script under `accelerate launch` (2 processes: the SIGTERM agreement's path), writing
the steps with reads of each rank to a JSON file."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
TORCH_DIR = os.path.dirname(torch.__file__)


@contextlib.contextmanager
def recording_reads(counter: dict):
    """Record (counter["step"], where) for each read of a tensor made outside torch's own code."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    counter.setdefault("reads", [])

    def wrap(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if not caller.f_code.co_filename.startswith(TORCH_DIR):
                counter["reads"].append((counter["step"], f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}"))
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def synthetic_batches(num_classes: int, batch: int, img: int, empty_every: int = 0):
    """seed -> endless uint8 batches (channels_last, as the loaders make them), with an empty batch
    (all images corrupt) every `empty_every` batches."""

    def make(seed: int):
        rng = np.random.default_rng(seed)
        i = 0
        while True:
            i += 1
            if empty_every and i % empty_every == 0:
                yield {"images": torch.empty(0), "labels": torch.empty(0, dtype=torch.long), "n_corrupt": batch,
                       "shard_errors": [], "corrupt_shards": ["synthetic"], "first_error": "synthetic corrupt"}
                continue
            x = torch.from_numpy(rng.integers(0, 256, (batch, img, img, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
            y = torch.from_numpy(rng.integers(0, num_classes, batch))
            yield {"images": x, "labels": y, "n_corrupt": 0, "shard_errors": [], "corrupt_shards": [],
                   "first_error": None}

    return make


def counted_job(step_dir: Path, settings, counter: dict, steps_per_epoch: int = 1000):
    """A TrainJob on a tiny timm model whose loss counts the optimizer steps in counter["step"]."""
    import timm

    from noisystudent.training.engine import TrainJob
    from noisystudent.training.losses import noisy_student_loss

    def loss(logits, b):
        counter["step"] += 1
        return noisy_student_loss(logits, b["labels"], None, settings.label_smoothing, 0.0)

    model = timm.create_model("test_efficientnet", num_classes=4, drop_rate=0.2, drop_path_rate=0.1)
    return TrainJob(step_dir=step_dir, model=model, settings=settings, steps_per_epoch=steps_per_epoch,
                    global_batch=settings.batch_size, batches=synthetic_batches(4, settings.batch_size, 32, 7),
                    loss=loss)


@contextlib.contextmanager
def recording_cuda_syncs(counter: dict):
    """On CUDA, also record (step, message) for every host-device synchronization torch reports in its
    sync debug mode, whatever made it (a read, a blocking copy, an explicit synchronize)."""
    import warnings

    counter.setdefault("syncs", [])
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if "synchroniz" in str(message):
            counter["syncs"].append((counter["step"], str(message)[:200]))
        else:
            shown(message, category, *args, **kwargs)

    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown


def main() -> None:
    """fit with reads recorded (and, on CUDA, synchronizations); each rank writes reads-RANK.json with
    {"step": steps done, "reads": [[step, where], ...], "syncs": [[step, message], ...]}. Launched under
    accelerate launch on a CPU (gloo), or alone on a GPU."""
    from accelerate import Accelerator
    from hydra import compose, initialize_config_module

    from noisystudent.config import train_settings
    from noisystudent.training.engine import fit

    out, steps, log_every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    cuda = accelerator.device.type == "cuda"
    with initialize_config_module("noisystudent.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"max_steps={steps}", f"train.log_every_steps={log_every}",
                                           "train.ckpt_every_steps=100000", "train.batch_size=4",
                                           "train.grad_clip=1.0", f"channels_last={str(cuda).lower()}",
                                           "num_workers=0"])
    counter = {"step": 0}
    job = counted_job(out / "step", train_settings(cfg), counter)
    torch.manual_seed(0)
    with recording_reads(counter), (recording_cuda_syncs(counter) if cuda else contextlib.nullcontext()):
        fit(accelerator, job)
    (out / f"reads-{accelerator.process_index}.json").write_text(json.dumps(counter))
    if torch.distributed.is_initialized():  # torn down before exit, as the CLI does (close_process_group):
        accelerator.wait_for_everyone()  # left to interpreter exit, a gloo rank was seen to abort there
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
