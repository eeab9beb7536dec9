"""Reading the config: checks, typed settings built once, and what a step's result depends on.

Stages turn the (Hydra) config into small typed settings objects here, checked before any work
starts; the training loop and the data streams take those objects, never the config itself."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

# What `auto` means for the optional packages (tracking, data.loader): decided here, at the base, from
# what is installed and the device, so a step records the resolved value among its settings.
TRACKINGS = ("auto", "tensorboard", "wandb", "mlflow", "none")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def resolve_tracking(value) -> str:
    """`tracking`: auto = tensorboard when the package is installed (it writes files, offline), else none."""
    if value not in TRACKINGS:
        raise ConfigError(f"tracking={value!r}: use auto (tensorboard when installed), tensorboard, wandb, mlflow "
                          "or none")
    if value == "auto":
        return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else "none"
    if value != "none" and importlib.util.find_spec(_PACKAGES[value]) is None:
        extra = " (pip install 'noisystudent[track]')" if value == "tensorboard" else ""
        raise ConfigError(f"tracking={value}: the {_PACKAGES[value]} package is not installed{extra}; install it, "
                          "or set tracking=none (metrics.jsonl is written either way)")
    return value


LOADERS = ("auto", "torch", "dali")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_loader(value, device_type: str) -> str:
    """data.loader: auto = dali where DALI is installed and the device is CUDA, else torch."""
    if value not in LOADERS:
        raise ConfigError(f"data.loader={value!r}: use auto (dali where it is installed and the device is CUDA), "
                          "torch or dali")
    if value == "auto":
        return "dali" if device_type == "cuda" and dali_available() else "torch"
    if value == "dali" and not dali_available():
        raise ConfigError("data.loader=dali but NVIDIA DALI is not installed: pip install 'noisystudent[dali]' "
                          "(the CUDA 13 build; nvidia-dali-cuda120 for CUDA 12), or set data.loader=torch")
    return value


def require(cfg: DictConfig, key: str, hint: str = ""):
    """cfg value at dotted `key`, or a ConfigError naming it when missing (???) or null."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception:  # omegaconf.MissingMandatoryValue
        value = None
    if value is None:
        raise ConfigError(f"{key} is not set{': ' + hint if hint else ''}")
    return value


def positive_int(cfg: DictConfig, key: str) -> int:
    value = require(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")
    return value


def positive_float(value, key: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be a number > 0") from None
    if not math.isfinite(out) or out <= 0:
        raise ConfigError(f"{key}={value!r} must be a number > 0")
    return out


def optional_positive_int(cfg: DictConfig, key: str) -> int | None:
    return None if OmegaConf.select(cfg, key) is None else positive_int(cfg, key)


def round_number(cfg: DictConfig, why: str = "round 1 is labeled by the teacher") -> int:
    """`round` of a per-round step (pseudolabel, student, finetune): an integer >= 1; `why` says why to the user."""
    value = cfg.get("round")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"round={value!r} must be an integer >= 1 ({why})")
    return value


def check_randaugment(value, key: str) -> str | None:
    if value and not str(value).startswith("rand"):
        raise ConfigError(
            f"{key}={value!r} is not a timm RandAugment string: use e.g. 'rand-n2-m9-mmax27' (n = ops per "
            "image, m = magnitude, mmax = magnitude scale), or null"
        )
    return str(value) if value else None


def learning_rate(optim_cfg, global_batch: int) -> float:
    """optim.lr when set, else optim.lr_per_256 scaled linearly by the global batch."""
    if optim_cfg.get("lr") is not None:
        return float(optim_cfg["lr"])
    return float(optim_cfg["lr_per_256"]) * global_batch / 256.0


def steps_per_epoch(n_images: int, global_batch: int) -> int:
    return max(1, math.ceil(n_images / global_batch))


def worker_nice(cfg: DictConfig, device) -> int:
    """How much to lower the loader workers' CPU priority (`worker_nice`): auto = 19 on a CPU device."""
    value = cfg.get("worker_nice", "auto")
    if value == "auto":
        return 19 if getattr(device, "type", str(device)) == "cpu" else 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 19:
        raise ConfigError(f"worker_nice={value!r}: use auto or an integer from 0 (same priority as training) to 19")
    return value


PRECISIONS = ("auto", "no", "bf16", "fp16")


def resolve_precision(value, cuda: bool, bf16_ok: bool) -> str:
    """`precision`: auto = bf16 on a CUDA device that computes in bf16 natively (Ampere and later), else
    no. Not on a CPU: autocast there casts every op's inputs and is slower than fp32 on CPUs without
    bf16 matrix units. fp16 is never automatic: it needs loss scaling, whose overflow check reads a
    device value at every step."""
    if value not in PRECISIONS:
        raise ConfigError(f"precision={value!r}: use auto (bf16 on a GPU that supports it, else no), no, bf16 or fp16")
    if value == "auto":
        return "bf16" if cuda and bf16_ok else "no"
    return value


def resolve_channels_last(value, device_type: str) -> bool:
    """`channels_last`: auto = on for CUDA (tensor-core convolutions want NHWC), off elsewhere."""
    if value != "auto" and not isinstance(value, bool):
        raise ConfigError(f"channels_last={value!r}: use auto (on for a CUDA device), true or false")
    return device_type == "cuda" if value == "auto" else value


def resolve_device_settings(cfg: DictConfig, precision: str, device_type: str) -> None:
    """Replace precision=auto / channels_last=auto / pseudolabel.decode=auto by what they mean on this
    device, in the config every step reads (and records in its settings), so a summary says what ran."""
    cfg.precision = precision
    cfg.channels_last = resolve_channels_last(cfg.get("channels_last", "auto"), device_type)
    if OmegaConf.select(cfg, "pseudolabel.decode") == "auto":
        # cpu everywhere: on the one GPU measured (an H100, 16 cores; docs/gpu.md), the loader workers' PIL decode
        # labeled 6,459 images/s and the device decode 4,134. data.loader=dali decodes on the GPU instead.
        cfg.pseudolabel.decode = "cpu"
    if OmegaConf.select(cfg, "data") is not None:
        cfg.data.loader = resolve_loader(cfg.data.get("loader", "auto"), device_type)


@dataclass(frozen=True)
class TrainSettings:
    """Everything the training loop reads, checked once (see `train_settings`)."""

    epochs: float
    batch_size: int  # per device
    label_smoothing: float
    randaugment: str | None
    ema_decay: float
    ema_warmup: bool
    grad_clip: float | None
    shuffle_buffer: int
    ckpt_every_steps: int
    log_every_steps: int
    max_steps: int | None
    resume: str
    seed: int
    channels_last: bool
    compile: str | None  # torch.compile's backend, or None: not compiled (compile_backend)
    num_workers: int
    optim: dict
    sched: dict
    tracking: str = "none"  # where metrics go besides metrics.jsonl (tracking.resolve_tracking)
    eval_every_epochs: int | None = None  # evaluate the EMA model at every this many epoch ends
    eval_keep: str = "last"  # last | best (the periodic evaluation's best EMA weights)


def compile_backend(value, key: str) -> str | None:
    """false: eager; true: torch.compile with its default backend (inductor); or a backend's name, as
    torch._dynamo.list_backends(exclude_tags=()) lists them (e.g. aot_eager: traced like inductor, no code
    generation; cudagraphs). timm's train.py takes the same choice (--torchcompile BACKEND)."""
    if value is None or value is False:
        return None
    if value is True or value == "inductor":
        return "inductor"
    if isinstance(value, str):
        from torch._dynamo import list_backends

        if value in list_backends(exclude_tags=()):
            return value
    raise ConfigError(f"{key}={value!r}: use false, true (the inductor backend) or a torch.compile backend "
                      f"({', '.join(_common_backends())}; torch._dynamo.list_backends(exclude_tags=()) lists all)")


def _common_backends() -> list[str]:
    from torch._dynamo import list_backends

    return ["inductor", "aot_eager", "eager", *[b for b in list_backends() if b != "inductor"]]


# The train.* keys a section such as `student` can set for itself: train_settings picks each from this
# list, and a step's settings (student.reads) then read the section's key instead of train's.
OWN_TRAIN_KEYS = ("epochs", "randaugment", "ema_decay", "grad_clip")


def train_settings(cfg: DictConfig, overrides: str | None = None) -> TrainSettings:
    """`train.*` (+ optim, sched, the run keys), where each key of the `overrides` section (e.g.
    `student`) that is set replaces the train key of the same name: a student can have its own
    epochs, RandAugment, EMA decay or gradient clip."""

    def pick(name: str) -> tuple[str, object]:
        if overrides and OmegaConf.select(cfg, f"{overrides}.{name}") is not None:
            return f"{overrides}.{name}", OmegaConf.select(cfg, f"{overrides}.{name}")
        return f"train.{name}", OmegaConf.select(cfg, f"train.{name}")

    # every key a section may set for itself, from the one list the step's settings also read
    picked = {name: pick(name) for name in OWN_TRAIN_KEYS}
    epochs_key, epochs = picked["epochs"]
    ra_key, randaugment = picked["randaugment"]
    ema_key, ema_decay = picked["ema_decay"]
    clip_key, grad_clip = picked["grad_clip"]
    if not isinstance(ema_decay, int | float) or not 0.0 <= float(ema_decay) < 1.0:
        raise ConfigError(f"{ema_key}={ema_decay!r} must be in [0, 1) (e.g. 0.9999)")
    smoothing = OmegaConf.select(cfg, "train.label_smoothing")
    if not isinstance(smoothing, int | float) or not 0.0 <= float(smoothing) < 1.0:
        raise ConfigError(f"train.label_smoothing={smoothing!r} must be in [0, 1)")
    resume = cfg.get("resume", "auto")
    if resume not in ("auto", "never"):
        raise ConfigError(f"resume={resume!r}: use auto or never")
    workers = cfg.get("num_workers", 0)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"num_workers={workers!r} must be an integer >= 0")
    for key in ("optim.name", "sched.name"):
        require(cfg, key)
    if not isinstance(cfg.channels_last, bool):  # auto is resolved for the device as a stage starts
        raise ConfigError(f"channels_last={cfg.channels_last!r} is not resolved for a device: run the stage with "
                          "`python -m noisystudent` (which resolves auto), or set channels_last=true or false")
    return TrainSettings(
        epochs=positive_float(epochs, epochs_key),
        batch_size=positive_int(cfg, "train.batch_size"),
        label_smoothing=float(smoothing),
        randaugment=check_randaugment(randaugment, ra_key),
        ema_decay=float(ema_decay),
        ema_warmup=bool(cfg.train.get("ema_warmup", True)),
        grad_clip=None if grad_clip is None else positive_float(grad_clip, clip_key),
        shuffle_buffer=positive_int(cfg, "train.shuffle_buffer"),
        ckpt_every_steps=positive_int(cfg, "train.ckpt_every_steps"),
        log_every_steps=positive_int(cfg, "train.log_every_steps"),
        max_steps=optional_positive_int(cfg, "max_steps"),
        resume=resume,
        seed=int(cfg.seed),
        channels_last=cfg.channels_last,
        compile=compile_backend(cfg.train.get("compile", False), "train.compile"),
        num_workers=workers,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        sched=OmegaConf.to_container(cfg.sched, resolve=True),
        tracking=resolve_tracking(cfg.get("tracking", "auto")),
        **eval_settings(cfg),
    )


def eval_settings(cfg: DictConfig) -> dict:
    """eval.every_epochs and eval.keep, checked."""
    every = optional_positive_int(cfg, "eval.every_epochs")
    keep = OmegaConf.select(cfg, "eval.keep", default="last")
    if keep not in ("last", "best"):
        raise ConfigError(f"eval.keep={keep!r}: use last (the final EMA weights) or best (the best periodic "
                          "evaluation)")
    if keep == "best" and every is None:
        raise ConfigError("eval.keep=best needs eval.every_epochs (e.g. eval.every_epochs=1): without periodic "
                          "evaluations there is no best epoch")
    return {"eval_every_epochs": every, "eval_keep": keep}


# Keys that change how a step runs, not what it computes: never part of a step's settings.
HOW_KEYS = ("train.ckpt_every_steps", "train.log_every_steps")
# The keys of the embedded digits' split (null for data=shards): they decide which images are which.
DATA_SPLIT_KEYS = ("data.labels_per_class", "data.eval_fraction", "data.split_seed")
# The evaluation keys: eval.keep=best changes which weights a training step ends with, the others what its
# summary measures.
EVAL_KEYS = ("eval.every_epochs", "eval.keep", "eval.sets")
ROBUSTNESS_KEYS = ("eval.corruptions", "eval.severities", "eval.perturbations", "eval.corruption_images",
                   "eval.corruption_seed")


def eval_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The eval keys a training step's result depends on: the robustness keys only when corruptions or
    perturbations are on (so steps that ran before they existed, or without them, keep their settings)."""
    on = any(OmegaConf.select(cfg, k, default=None) for k in ("eval.corruptions", "eval.perturbations"))
    # the periodic evaluation reads data.val where it is set (so eval.keep=best chooses on held-out images)
    periodic = OmegaConf.select(cfg, "eval.every_epochs", default=None) is not None
    return EVAL_KEYS + (ROBUSTNESS_KEYS if on else ()) + (("data.val",) if periodic else ())


@dataclass(frozen=True)
class EvalSet:
    """One of eval.sets: a named labeled shard set every finished model is evaluated on besides data.eval."""
    name: str
    pattern: str
    classes: tuple[int, ...] | None  # the labels the set covers (predictions restricted to them), or all


def eval_sets(cfg: DictConfig, num_classes: int) -> list[EvalSet]:
    """eval.sets: NAME -> shard pattern, or NAME -> {shards: pattern, classes: [label, ...] or a JSON file of
    them}. A class list restricts the model's predictions to those labels, as ImageNet-A/R are scored (200
    of ImageNet's 1,000); every label of the set must be in it."""
    sets = OmegaConf.select(cfg, "eval.sets", default=None)
    if sets is None:
        return []
    if not OmegaConf.is_dict(sets):
        raise ConfigError(f"eval.sets={sets!r}: a mapping NAME -> shard pattern, e.g. "
                          "eval.sets='{shifted: /data/v2-{000000..000009}.tar}'")
    out = []
    for name, spec in OmegaConf.to_container(sets, resolve=True).items():
        key = f"eval.sets.{name}"
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
            raise ConfigError(f"{key}: a set's name is letters, digits, _ - . (it names report sections)")
        if isinstance(spec, str):
            spec = {"shards": spec}
        if not isinstance(spec, dict) or set(spec) - {"shards", "classes"}:
            raise ConfigError(f"{key}={spec!r}: a shard pattern, or {{shards: PATTERN, classes: [...]}}")
        pattern = spec.get("shards")
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{key}.shards={pattern!r}: the set's shard pattern, e.g. /data/a-{{000000..000003}}.tar")
        out.append(EvalSet(name, pattern, _class_list(spec.get("classes"), f"{key}.classes", num_classes)))
    return out


def _class_list(value, key: str, num_classes: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):  # a JSON file holding the list
        try:
            with open(value) as f:
                value = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}={value!r}: cannot read a JSON list of labels from it ({e})") from e
    ok = isinstance(value, list) and value and all(isinstance(c, int) and not isinstance(c, bool) for c in value)
    if not ok or len(set(value)) != len(value) or not all(0 <= c < num_classes for c in value):
        raise ConfigError(f"{key}: a list of distinct labels in [0, {num_classes}) (data.num_classes), or a JSON "
                          f"file of one; got {value!r:.200}")
    return tuple(value)
# The keys that define the data a training step reads.
DATA_KEYS = ("data.num_classes", "data.crop_scale", "data.crop_pct", "data.hflip", "data.loader", *DATA_SPLIT_KEYS)


def read_settings(cfg: DictConfig, keys: Iterable[str], drop: Iterable[str] = ()) -> dict:
    """The flattened values (dotted key -> value) of the config keys a step reads: what its result
    depends on, stored in its summary.json and compared when a finished step is skipped."""
    out: dict = {}

    def flatten(key, value):
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{key}.{k}", v)
        else:
            out[key] = value

    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        flatten(key, OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value)
    skip = set(HOW_KEYS) | set(drop)
    return {k: v for k, v in sorted(out.items()) if k not in skip}


def settings_hash(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def changed_settings(before: dict, now: dict) -> list[str]:
    """`key (old -> new)` for every key whose value differs (JSON round-trip: tuples equal lists)."""
    norm = json.loads(json.dumps(now, default=str))
    return [f"{k} ({before.get(k)!r} -> {norm.get(k)!r})" for k in sorted(set(before) | set(norm))
            if before.get(k) != norm.get(k)]
