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


def stream_seed(seed: int, rank: int, step: int = 0, offset: int = 0) -> int:
    """The seed of a process's batch stream: from the run's seed, the process and the step it starts at (so a
    resumed run does not replay the batches already trained on); `offset` keeps a second stream of the same
    step (the fine-tune's BatchNorm pass) apart from the first."""
    return seed * 1_000_003 + step * 7919 + offset + rank


@dataclass
class TrainState:
    """What a checkpoint holds beside the modules, and what the summary reports of the run so far."""

    step: int = 0
    images_seen: int = 0
    corrupt: int = 0
    prior_wall: float = 0.0  # seconds trained before this process started (earlier runs of a resumed step)
    resumed_from: int | None = None
    # periodic evaluations of the EMA model (epoch, step, top1, top5, loss, ece), and the best one's weights
    history: list[dict] = field(default_factory=list)
    best_ema: dict | None = None
    shard_errors: dict[str, int] = field(default_factory=dict)  # error (with the shard's url) -> times hit

    def state_dict(self, bare, ema, optimizer, scheduler, settings_hash: str, wall_s: float) -> dict:
        return {
            # model_ema: the key timm's load_state_dict(use_ema=True) reads, so the checkpoint loads in timm
            "model": bare.state_dict(), "model_ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": self.step,
            "images_seen": self.images_seen, "corrupt": self.corrupt, "wall_s": self.prior_wall + wall_s,
            "settings_hash": settings_hash, "eval_history": self.history, "best_ema": self.best_ema,
        }

    def load(self, state: dict, bare, ema, optimizer, scheduler) -> None:
        bare.load_state_dict(state["model"])
        ema.load_state_dict(state["model_ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.step, self.images_seen, self.corrupt = state["step"], state["images_seen"], state["corrupt"]
        self.prior_wall, self.resumed_from = state["wall_s"], state["step"]
        self.history, self.best_ema = state.get("eval_history", []), state.get("best_ema")


class StopOnSigterm:
    """SIGTERM (Slurm preemption/requeue, a scheduler's timeout) sets a flag; the loop checkpoints at the end
    of the step and raises Preempted. Inside `with`, the caller's handler is back afterwards."""

    def __init__(self, accelerator):
        self.accelerator, self.signalled, self.previous = accelerator, False, None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signalled", True))
        return self

    def __exit__(self, *exc):
        self.restore()

    def restore(self) -> None:
        """The caller's handler back (idempotent); `signalled` stays readable."""
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def now(self) -> bool:
        """The signal came and there is one process (nothing to agree with)."""
        return self.accelerator.num_processes == 1 and self.signalled

    def requested(self, agree: bool) -> bool:
        """Whether to stop for a SIGTERM after this step. With one process, as soon as it came (a host flag).
        With several, every process must stop at the same step, or the others would wait forever in the next
        collective: they agree by an all-reduce, which reads a device value, so only at the steps where
        `agree` is true (the log interval, checkpoints, the last step), never in between. A stop therefore
        comes at most train.log_every_steps steps after the signal (see docs/stages.md)."""
        if self.accelerator.num_processes == 1:
            return self.signalled
        if not agree:
            return False
        t = torch.tensor([1 if self.signalled else 0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, "sum").item() > 0)


def preempted(step: int, total_steps: int, ckpt_path: Path) -> Preempted:
    return Preempted(f"stopped by SIGTERM at step {step} of {total_steps}; checkpoint saved to {ckpt_path}: rerun "
                     "the same command to continue (resume=auto)")


class IntervalMeter:
    """The loss and its parts summed on the device and read once per log interval, with the interval's
    images/s and the host's wait for batches; images/s over the whole loop counts from the end of its
    first step (start-up and warm-up excluded)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.last = 0, {}
        self.wait_s, self.t0, self.images = 0.0, time.time(), 0
        self.loop_t0, self.loop_images = None, 0

    def add(self, loss: torch.Tensor, parts: dict, n_images: int) -> None:
        self.images += n_images
        self.loop_images += n_images
        if self.loop_t0 is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # once: the clock starts when the first step is done, not queued
            self.loop_t0, self.loop_images = time.time(), 0
        for name, value in {"loss": loss.detach(), **parts}.items():
            self.sums[name] = self.sums[name] + value.detach() if name in self.sums else value.detach().clone()
        self.steps += 1

    def read(self) -> dict:
        """The interval's means (the one read of the device), images/s and data-wait fraction; starts the next."""
        self.last = {k: float(v) / self.steps for k, v in self.sums.items()}
        self.sums.clear()
        self.steps = 0
        now = time.time()
        out = {"losses": self.last, "images_per_sec": self.images / max(now - self.t0, 1e-9),
               "data_wait_fraction": min(1.0, self.wait_s / max(now - self.t0, 1e-9)),
               "loop_images_per_sec": self.loop_images_per_sec(now)}
        self.wait_s, self.t0, self.images = 0.0, now, 0
        return out

    def loop_images_per_sec(self, now: float) -> float:
        return self.loop_images / max(now - self.loop_t0, 1e-9) if self.loop_images else 0.0


@dataclass
class _Parts:
    """The objects one run of the loop trains (built by `_build`)."""

    bare: torch.nn.Module  # the module itself: what the EMA follows and checkpoints save, no DDP/compile wrapper
    model: torch.nn.Module  # what the step calls: bare, wrapped by accelerate (DDP) and torch.compile
    optimizer: object
    scheduler: object
    ema: ModelEmaV3
    lr: float
    total_steps: int


def _build(accelerator, job: TrainJob, state: TrainState) -> _Parts:
    """Model on the device, optimizer, schedule and EMA from timm, the checkpoint loaded when resuming, then
    the model wrapped for the processes (and compiled)."""
    s = job.settings
    bare = job.model.to(accelerator.device)
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
    if s.resume == "auto" and ckpt_path.exists():
        saved = load_checkpoint(ckpt_path)
        state.load(saved, bare, ema, optimizer, scheduler)
        log.info("resuming %s at step %d / %d", job.step_dir, state.step, total_steps)
        if saved.get("settings_hash") != job.settings_hash:
            log.warning("%s was written with other settings (hash %s, now %s): continuing with the new ones; "
                        "resume=never (or force=true) starts the step again", ckpt_path, saved.get("settings_hash"),
                        job.settings_hash)
    # Every process loaded the same checkpoint into the bare modules above; prepare only wraps them
    # (DDP broadcasts rank 0's weights, which are the same), so nothing loaded is lost.
    model, optimizer = accelerator.prepare(bare, optimizer)
    if s.compile:
        # compiled around DDP (its graph breaks at the gradient buckets); checkpoints, the EMA and the
        # exported weights all read `bare`, so none of them holds compile's `_orig_mod.` names
        model = torch.compile(model, backend=s.compile)
    scheduler.step_update(num_updates=state.step)
    return _Parts(bare, model, optimizer, scheduler, ema, lr, total_steps)


def _train_step(accelerator, job: TrainJob, p: _Parts, images: torch.Tensor, batch: dict, step: int,
                want_norm: bool):
    """Forward, backward, clip, update, schedule and EMA; returns (loss, parts, grad norm or None). Nothing here
    waits for the device: the norm (asked for at log steps only) is queued and read with the loss."""
    s = job.settings
    with accelerator.autocast():
        logits = p.model(images)
    loss, parts = job.loss(logits, batch)
    accelerator.backward(loss)
    grad_norm = None
    if s.grad_clip:
        grad_norm = accelerator.clip_grad_norm_(p.model.parameters(), s.grad_clip)
    elif want_norm:
        grad_norm = torch.nn.utils.get_total_norm([g.grad for g in p.bare.parameters() if g.grad is not None])
    p.optimizer.step()
    p.optimizer.zero_grad(set_to_none=True)
    p.scheduler.step_update(num_updates=step + 1)
    p.ema.update(p.bare, step=step + 1)
    return loss, parts, grad_norm


def fit(accelerator, job: TrainJob) -> tuple[torch.nn.Module, dict]:
    """Train job.model; return (EMA model, training summary). Resumes from job.step_dir/checkpoint.pt."""
    s, device = job.settings, accelerator.device
    state = TrainState()
    p = _build(accelerator, job, state)
    ckpt_path, total_steps = job.step_dir / CHECKPOINT, p.total_steps
    log.info("training %s: %d steps (%.3g epochs x %d), global batch %d, lr %.3g, %d process(es)",
             job.step_dir.name, total_steps, s.epochs, job.steps_per_epoch, job.global_batch, p.lr,
             accelerator.num_processes)

    with StopOnSigterm(accelerator) as stop:  # whatever ends the loop, the caller gets its handler back
        # Batches come as uint8 (data/transforms.py) and reach the device one step ahead, normalized there with
        # the model's mean and std (data/prefetch.py); the stream is seeded with the start step (stream_seed).
        batches = DevicePrefetcher(job.batches(stream_seed(s.seed, accelerator.process_index, state.step)),
                                   device, InputNormalizer(*model_norm(p.bare), channels_last=s.channels_last))
        metrics = bar = None
        try:
            metrics = MetricsLog(job.step_dir, s.tracking, state.resumed_from, accelerator.is_main_process)
            p.model.train()
            t0 = time.time()
            meter, empty = IntervalMeter(device), _EmptyStreamGuard()

            def checkpoint():
                saved = state.state_dict(p.bare, p.ema, p.optimizer, p.scheduler, job.settings_hash,
                                         time.time() - t0)
                if accelerator.is_main_process:
                    save_checkpoint(ckpt_path, saved)
                accelerator.wait_for_everyone()

            bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process,
                       desc=job.step_dir.name, mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
            while state.step < total_steps:
                t_wait = time.time()
                batch = next(batches)
                meter.wait_s += time.time() - t_wait
                state.corrupt += batch["n_corrupt"]
                for err in batch.get("shard_errors", ()):
                    state.shard_errors[err] = state.shard_errors.get(err, 0) + 1
                if batch["images"].numel() == 0:
                    empty.empty(batch, f"training stream of {job.step_dir}")
                    if stop.now():
                        checkpoint()  # nothing trained since the last step, but the stop is honoured at once
                        raise preempted(state.step, total_steps, ckpt_path)
                    continue
                empty.reset()
                images = batch["images"]  # on the device, normalized (DevicePrefetcher)
                log_now = (state.step + 1) % s.log_every_steps == 0 or state.step + 1 == total_steps
                loss, parts, grad_norm = _train_step(accelerator, job, p, images, batch, state.step, log_now)
                state.step += 1
                n = images.shape[0] * accelerator.num_processes
                state.images_seen += n
                meter.add(loss, parts, n)
                bar.update(1)
                # Nothing above waits for the device: the loss is summed there, and read (with images/s and the
                # stop agreement of several processes) only at the log interval.
                if log_now:
                    _log_interval(job, p, state.step, meter.read(), grad_norm, bar, metrics)
                epoch_end = state.step % job.steps_per_epoch == 0
                if epoch_end and job.evaluate and s.eval_every_epochs and (
                        state.step // job.steps_per_epoch) % s.eval_every_epochs == 0:
                    state.best_ema = periodic_eval(job, p.ema, state.step, state.history, state.best_ema,
                                                   s.eval_keep == "best", metrics)
                save_now = state.step % s.ckpt_every_steps == 0 or epoch_end or state.step == total_steps
                stop_here = stop.requested(agree=log_now or save_now)
                if save_now or stop_here:
                    checkpoint()
                if stop_here:
                    raise preempted(state.step, total_steps, ckpt_path)
        finally:  # the caller's SIGTERM handler back first, then the loop's files and loader workers closed
            stop.restore()
            if metrics is not None:
                metrics.close()
            if bar is not None:
                bar.close()
            batches.close()
            del batches  # the last reference: shuts the loader workers down now, not at interpreter exit
        # a SIGTERM after the last agreement (in the final checkpoint's write) still stops the step here, before
        # evaluation and export: the checkpoint holds every step, so the rerun goes straight to them
        if stop.requested(agree=True):
            raise Preempted(f"stopped by SIGTERM after the last step ({state.step}); checkpoint saved to "
                            f"{ckpt_path}: rerun the same command to evaluate and export (resume=auto)")
    return p.ema.module, _summary(accelerator, job, p, state, meter, time.time() - t0)


def _log_interval(job: TrainJob, p: _Parts, step: int, interval: dict, grad_norm, bar, metrics: MetricsLog) -> None:
    losses, lr_now = interval["losses"], p.optimizer.param_groups[0]["lr"]
    bar.set_postfix(**{k: f"{v:.3f}" for k, v in losses.items()}, lr=f"{lr_now:.2e}",
                    img_s=f"{interval['loop_images_per_sec']:.0f}", refresh=False)
    metrics.log({"step": step, "epoch": step / job.steps_per_epoch, **losses, "lr": lr_now,
                 "images_per_sec": interval["images_per_sec"], "data_wait_fraction": interval["data_wait_fraction"],
                 "grad_norm": None if grad_norm is None else float(grad_norm)})


def _summary(accelerator, job: TrainJob, p: _Parts, state: TrainState, meter: IntervalMeter, wall: float) -> dict:
    """The training part of summary.json (after the loop: the weights kept, the counts summed over processes)."""
    s, device = job.settings, accelerator.device
    loop_end = time.time()
    best = max(state.history, key=lambda h: h["top1"]) if state.history else None  # the first of equal ones
    if s.eval_keep == "best" and state.best_ema is not None:
        p.ema.module.load_state_dict(state.best_ema)
    in_sync = replicas_in_sync(accelerator, p.bare)
    corrupt_total = int(accelerator.reduce(torch.tensor(state.corrupt, device=device), "sum"))
    n_shard_errors = int(accelerator.reduce(torch.tensor(sum(state.shard_errors.values()), device=device), "sum"))
    last = meter.last
    return {
        "steps": state.step,
        "resumed_from_step": state.resumed_from,
        "epochs": state.step / job.steps_per_epoch,
        "global_batch": job.global_batch,
        "lr": p.lr,
        "processes": accelerator.num_processes,
        # what precision=auto / channels_last=auto became on this device, and train.compile's backend (None: eager)
        "precision": str(accelerator.mixed_precision), "channels_last": s.channels_last, "compile": s.compile,
        "replicas_in_sync": in_sync,
        "peak_device_memory_mib": peak_device_memory_mib(device),
        "images_seen": state.images_seen,
        "images_per_sec": meter.loop_images_per_sec(loop_end),
        "train_wall_s": state.prior_wall + wall,
        # mean over the last log interval: the loss and its parts (labeled / pseudo-labeled for a student)
        "final_loss": last.get("loss", float("nan")),
        "final_loss_parts": {k: v for k, v in last.items() if k != "loss"},
        "corrupt_skipped": corrupt_total,
        # shard read errors while training (the stream skips the shard and draws another);
        # the messages are this process's, the count is summed over processes
        "shard_read_errors": n_shard_errors,
        "unreadable_shards": sorted(state.shard_errors)[:20],
        # eval.every_epochs: the EMA model's top-1/top-5/loss at those epoch ends; the weights kept (eval.keep)
        "periodic_eval": state.history, "best_epoch": best and best["epoch"], "best_top1": best and best["top1"],
        "kept": "best" if s.eval_keep == "best" and state.best_ema is not None else "last",
        **job.extra_summary,
    }
