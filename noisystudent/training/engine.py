"""The one training loop: teacher, student (and any fine-tune) all run through `fit`.

What differs between stages is only the batch stream and the loss (see `TrainJob`); the loop
owns optimizer, schedule, EMA, mixed precision, checkpoint/resume and progress reporting. It reads
no config: its settings come checked and typed (`config.TrainSettings`)."""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from ..config import TrainSettings, learning_rate
from ..data.prefetch import DevicePrefetcher
from ..data.transforms import InputNormalizer, model_norm
from ..errors import DataError, NoisyStudentError
from ..files import atomic_write
from .tracking import MetricsLog

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# A training stream that has not decoded one image in this many samples in a row is not a stream
# with a few corrupt images: it stops with the first error instead of looping forever.
EMPTY_SAMPLES_LIMIT = 10_000


@dataclass
class TrainJob:
    """What a stage hands the loop."""

    step_dir: Path
    model: torch.nn.Module
    settings: TrainSettings
    steps_per_epoch: int
    global_batch: int
    # seed -> endless iterator of batches (dicts with "images" plus what `loss` reads)
    batches: Callable[[int], Iterator[dict]]
    # (logits, batch on device) -> (loss, parts to log)
    loss: Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]
    settings_hash: str = ""
    extra_summary: dict = field(default_factory=dict)
    # EMA model -> eval metrics (top1, top5, loss); run at every settings.eval_every_epochs epoch ends
    evaluate: Callable[[torch.nn.Module], dict] | None = None


def _optimizer(model, optim: dict, lr: float):
    extra = {k: v for k, v in optim.items() if k not in ("name", "lr", "lr_per_256", "weight_decay", "momentum")}
    kwargs = {"momentum": float(optim["momentum"])} if "momentum" in optim else {}
    return create_optimizer_v2(model, opt=optim["name"], lr=lr, weight_decay=float(optim["weight_decay"]),
                               **kwargs, **extra)


def _scheduler(optimizer, sched: dict, epochs: float, steps_per_epoch: int):
    extra = {k: v for k, v in sched.items() if k != "name"}
    scheduler, _ = create_scheduler_v2(optimizer, sched=sched["name"], num_epochs=max(1, round(epochs)),
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch, **extra)
    return scheduler


def save_checkpoint(path: Path, state: dict) -> None:
    """A kill mid-write leaves the previous checkpoint intact, never a truncated file under the real name."""
    with atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Preempted(NoisyStudentError):
    """Training stopped on SIGTERM after saving a checkpoint (exit code 143, as for a plain SIGTERM)."""

    exit_code = 143


def stop_requested(accelerator, flag: dict, agree: bool) -> bool:
    """Whether to stop for a SIGTERM after this step. With one process, as soon as it came (a host flag).
    With several, every process must stop at the same step, or the others would wait forever in the next
    collective: they agree by an all-reduce, which reads a device value, so only at the steps where
    `agree` is true (the log interval, checkpoints, the last step), never in between. A stop therefore
    comes at most train.log_every_steps steps after the signal (see docs/stages.md)."""
    if accelerator.num_processes == 1:
        return flag["set"]
    if not agree:
        return False
    t = torch.tensor([1 if flag["set"] else 0], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


def peak_device_memory_mib(device: torch.device) -> float | None:
    """The most memory torch's allocator held for tensors on a CUDA device in this process (None elsewhere)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def replicas_in_sync(accelerator, model) -> bool:
    """True when every process holds bit-identical weights (DDP keeps them so; a wrong setup does not)."""
    with torch.no_grad():
        probe = torch.stack([sum(p.double().sum() for p in model.parameters()),
                             sum((p.double() ** 2).sum() for p in model.parameters())]).to(accelerator.device)
    gathered = accelerator.gather(probe.view(1, 2))
    return bool((gathered == gathered[0]).all())


class _EmptyStreamGuard:
    """Counts the samples since the last decoded image; past EMPTY_SAMPLES_LIMIT, a DataError naming the
    shards those samples came from and the first error seen."""

    def __init__(self):
        self.samples, self.shards, self.first_error = 0, set(), None

    def empty(self, batch: dict, stream: str) -> None:
        self.samples += batch["n_corrupt"]
        self.shards.update(batch.get("corrupt_shards", ()))
        self.first_error = self.first_error or batch.get("first_error")
        if batch["n_corrupt"] == 0 and not batch.get("shard_errors"):
            self.samples += 1  # a batch with nothing in it at all counts too, so this cannot loop forever
        if self.samples >= EMPTY_SAMPLES_LIMIT:
            shards = sorted(self.shards)
            more = f" (and {len(shards) - 5} more)" if len(shards) > 5 else ""
            raise DataError(
                f"{stream}: not one image decoded in the last {self.samples} samples, from shard(s) "
                f"{', '.join(shards[:5]) or '(none named)'}{more}; first error: {self.first_error or 'none recorded'}. "
                "Check that these shards hold images the decoder reads (jpg, png, webp)")

    def reset(self) -> None:
        self.samples, self.shards, self.first_error = 0, set(), None


def periodic_eval(job: TrainJob, ema, step: int, history: list, best_ema: dict | None, keep_best: bool,
                  metrics: MetricsLog) -> dict | None:
    """Evaluate the EMA model at an epoch end (every process: the evaluation is a collective), record it in the
    history and the metrics; returns the best evaluation's EMA weights (on the host) when they are kept."""
    epoch = step // job.steps_per_epoch
    m = job.evaluate(ema.module)
    record = {"epoch": epoch, "step": step, "top1": m["top1"], "top5": m["top5"], "loss": m["loss"], "ece": m["ece"]}
    log.info("%s epoch %d: EMA top-1 %.4f, top-5 %.4f, loss %.4f", job.step_dir.name, epoch, m["top1"], m["top5"],
             m["loss"])
    metrics.log({"step": step, "epoch": float(epoch), "eval_top1": m["top1"], "eval_top5": m["top5"],
                 "eval_loss": m["loss"], "eval_ece": m["ece"]})
    is_best = all(m["top1"] > h["top1"] for h in history)
    history.append(record)
    if keep_best and is_best:
        return {k: v.detach().to("cpu", copy=True) for k, v in ema.module.state_dict().items()}
    return best_ema


def fit(accelerator, job: TrainJob) -> tuple[torch.nn.Module, dict]:
    """Train job.model; return (EMA model, training summary). Resumes from job.step_dir/checkpoint.pt."""
    s = job.settings
    device = accelerator.device
    # the module itself: what the EMA follows and checkpoints save, free of DDP and compile wrappers
    bare = job.model.to(device)
    if s.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    lr = learning_rate(s.optim, job.global_batch)
    optimizer = _optimizer(bare, s.optim, lr)
    scheduler = _scheduler(optimizer, s.sched, s.epochs, job.steps_per_epoch)
    ema = ModelEmaV3(bare, decay=s.ema_decay, use_warmup=s.ema_warmup)
    total_steps = max(1, round(s.epochs * job.steps_per_epoch))
    if s.max_steps:
        total_steps = min(total_steps, s.max_steps)

    ckpt_path = job.step_dir / CHECKPOINT
    step, images_seen, corrupt, prior_wall = 0, 0, 0, 0.0
    shard_errors: dict[str, int] = {}  # error (with the shard's url) -> times hit; shards are resampled
    resumed_from = None
    # periodic evaluations of the EMA model: (epoch, step, top1, top5, loss), and the best one's weights
    history: list[dict] = []
    best_ema: dict | None = None
    if s.resume == "auto" and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        bare.load_state_dict(state["model"])
        ema.load_state_dict(state["model_ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, images_seen, corrupt, prior_wall = (state["step"], state["images_seen"], state["corrupt"],
                                                  state["wall_s"])
        resumed_from = step
        history, best_ema = state.get("eval_history", []), state.get("best_ema")
        log.info("resuming %s at step %d / %d", job.step_dir, step, total_steps)
        if state.get("settings_hash") != job.settings_hash:
            log.warning("%s was written with other settings (hash %s, now %s): continuing with the new ones; "
                        "resume=never (or force=true) starts the step again", ckpt_path, state.get("settings_hash"),
                        job.settings_hash)
    # Every process loaded the same checkpoint into the bare modules above; prepare only wraps them
    # (DDP broadcasts rank 0's weights, which are the same), so nothing loaded is lost.
    model, optimizer = accelerator.prepare(bare, optimizer)
    if s.compile:
        # compiled around DDP (its graph breaks at the gradient buckets); checkpoints, the EMA and the
        # exported weights all read `bare`, so none of them holds compile's `_orig_mod.` names
        model = torch.compile(model)
    scheduler.step_update(num_updates=step)

    log.info("training %s: %d steps (%.3g epochs x %d), global batch %d, lr %.3g, %d process(es)",
             job.step_dir.name, total_steps, s.epochs, job.steps_per_epoch, job.global_batch, lr,
             accelerator.num_processes)

    def snapshot():
        return {
            # model_ema: the key timm's load_state_dict(use_ema=True) reads, so the checkpoint loads in timm
            "model": bare.state_dict(), "model_ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
            "images_seen": images_seen, "corrupt": corrupt, "wall_s": prior_wall + time.time() - t0,
            "settings_hash": job.settings_hash, "eval_history": history, "best_ema": best_ema,
        }

    def checkpoint():
        state = snapshot()
        if accelerator.is_main_process:
            save_checkpoint(ckpt_path, state)
        accelerator.wait_for_everyone()

    # SIGTERM (Slurm preemption/requeue, a scheduler's timeout) -> checkpoint at the end of the step, then exit
    stop_flag = {"set": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_flag.update(set=True))
    # Seed the stream with the start step so a resumed run does not replay the same batches.
    # Batches come as uint8 (data/transforms.py) and reach the device one step ahead, normalized there
    # with the model's mean and std (data/prefetch.py).
    batches = DevicePrefetcher(job.batches(s.seed * 1_000_003 + step * 7919 + accelerator.process_index), device,
                               InputNormalizer(*model_norm(bare), channels_last=s.channels_last))
    metrics = MetricsLog(job.step_dir, s.tracking, resumed_from, accelerator.is_main_process)
    model.train()
    t0 = time.time()
    loop_images, loop_t0 = 0, None
    # per log interval: host time spent waiting for the next batch, and the wall time of the interval
    wait_s, interval_t0, interval_images, grad_norm = 0.0, time.time(), 0, None
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process,
               desc=job.step_dir.name, mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    # the loss and its parts are summed on the device and read at the log interval only
    logged: dict[str, torch.Tensor] = {}
    logged_steps, last_losses = 0, {}
    empty = _EmptyStreamGuard()
    try:
        while step < total_steps:
            t_wait = time.time()
            batch = next(batches)
            wait_s += time.time() - t_wait
            corrupt += batch["n_corrupt"]
            for err in batch.get("shard_errors", ()):
                shard_errors[err] = shard_errors.get(err, 0) + 1
            if batch["images"].numel() == 0:
                empty.empty(batch, f"training stream of {job.step_dir}")
                if accelerator.num_processes == 1 and stop_flag["set"]:
                    checkpoint()  # nothing trained since the last step, but the stop is honoured at once
                    raise Preempted(f"stopped by SIGTERM at step {step} of {total_steps}; checkpoint saved to "
                                    f"{ckpt_path}: rerun the same command to continue (resume=auto)")
                continue
            empty.reset()
            images = batch["images"]  # on the device, normalized (DevicePrefetcher)
            with accelerator.autocast():
                logits = model(images)
            loss, parts = job.loss(logits, batch)
            accelerator.backward(loss)
            log_next = (step + 1) % s.log_every_steps == 0 or step + 1 == total_steps
            if s.grad_clip:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), s.grad_clip)
            elif log_next:  # the norm is queued on the device here and read with the loss at the log step
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in bare.parameters() if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(num_updates=step)
            ema.update(bare, step=step)
            n = images.shape[0] * accelerator.num_processes
            images_seen += n
            loop_images += n
            interval_images += n
            if loop_t0 is None:  # images/s counts from the end of the first step: start-up and warm-up excluded
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # once: the clock starts when the first step is done, not queued
                loop_t0, loop_images = time.time(), 0
            for name, value in {"loss": loss.detach(), **parts}.items():
                logged[name] = logged[name] + value.detach() if name in logged else value.detach().clone()
            logged_steps += 1
            bar.update(1)
            # Nothing above waits for the device: the loss is summed there, and read (with images/s and the
            # stop agreement of several processes) only at the log interval.
            log_now = step % s.log_every_steps == 0 or step == total_steps
            if log_now:
                last_losses = {k: float(v) / logged_steps for k, v in logged.items()}  # the one read of the device
                logged.clear()
                logged_steps = 0
                now = time.time()
                ips = loop_images / max(now - loop_t0, 1e-9) if loop_images else 0.0
                lr_now = optimizer.param_groups[0]["lr"]
                bar.set_postfix(**{k: f"{v:.3f}" for k, v in last_losses.items()}, lr=f"{lr_now:.2e}",
                                img_s=f"{ips:.0f}", refresh=False)
                metrics.log({"step": step, "epoch": step / job.steps_per_epoch, **last_losses, "lr": lr_now,
                             "images_per_sec": interval_images / max(now - interval_t0, 1e-9),
                             "data_wait_fraction": min(1.0, wait_s / max(now - interval_t0, 1e-9)),
                             "grad_norm": None if grad_norm is None else float(grad_norm)})
                wait_s, interval_t0, interval_images = 0.0, now, 0
            epoch_end = step % job.steps_per_epoch == 0
            every = s.eval_every_epochs
            if epoch_end and every and job.evaluate and (step // job.steps_per_epoch) % every == 0:
                best_ema = periodic_eval(job, ema, step, history, best_ema, s.eval_keep == "best", metrics)
            save_now = step % s.ckpt_every_steps == 0 or epoch_end or step == total_steps
            stop = stop_requested(accelerator, stop_flag, agree=log_now or save_now)
            if save_now or stop:
                checkpoint()
            if stop:
                raise Preempted(f"stopped by SIGTERM at step {step} of {total_steps}; checkpoint saved to "
                                f"{ckpt_path}: rerun the same command to continue (resume=auto)")
    finally:  # whatever ends the loop, the caller gets its SIGTERM handler back
        signal.signal(signal.SIGTERM, previous_handler)
        metrics.close()
        bar.close()
        batches.close()
        del batches  # shuts the loader workers down now, not at interpreter exit
    # a SIGTERM after the last agreement (in the final checkpoint's write) still stops the step here, before
    # evaluation and export: the checkpoint holds every step, so the rerun goes straight to them
    if stop_requested(accelerator, stop_flag, agree=True):
        raise Preempted(f"stopped by SIGTERM after the last step ({step}); checkpoint saved to {ckpt_path}: rerun "
                        "the same command to evaluate and export (resume=auto)")
    loop_end = time.time()
    wall = loop_end - t0
    best = max(history, key=lambda h: h["top1"]) if history else None  # the first of equal ones
    if s.eval_keep == "best" and best_ema is not None:
        ema.module.load_state_dict(best_ema)
    in_sync = replicas_in_sync(accelerator, bare)
    corrupt_total = int(accelerator.reduce(torch.tensor(corrupt, device=device), "sum"))
    n_shard_errors = int(accelerator.reduce(torch.tensor(sum(shard_errors.values()), device=device), "sum"))
    summary = {
        "steps": step,
        "resumed_from_step": resumed_from,
        "epochs": step / job.steps_per_epoch,
        "global_batch": job.global_batch,
        "lr": lr,
        "processes": accelerator.num_processes,
        # what precision=auto / channels_last=auto became on this device, and train.compile
        "precision": str(accelerator.mixed_precision), "channels_last": s.channels_last, "compile": s.compile,
        "replicas_in_sync": in_sync,
        "peak_device_memory_mib": peak_device_memory_mib(device),
        "images_seen": images_seen,
        "images_per_sec": loop_images / max(loop_end - loop_t0, 1e-9) if loop_images else 0.0,
        "train_wall_s": prior_wall + wall,
        # mean over the last log interval: the loss and its parts (labeled / pseudo-labeled for a student)
        "final_loss": last_losses.get("loss", float("nan")),
        "final_loss_parts": {k: v for k, v in last_losses.items() if k != "loss"},
        "corrupt_skipped": corrupt_total,
        # shard read errors while training (the stream skips the shard and draws another);
        # the messages are this process's, the count is summed over processes
        "shard_read_errors": n_shard_errors,
        "unreadable_shards": sorted(shard_errors)[:20],
        # eval.every_epochs: the EMA model's top-1/top-5/loss at those epoch ends; the weights kept (eval.keep)
        "periodic_eval": history, "best_epoch": best and best["epoch"], "best_top1": best and best["top1"],
        "kept": "best" if s.eval_keep == "best" and best_ema is not None else "last",
        **job.extra_summary,
    }
    return ema.module, summary
