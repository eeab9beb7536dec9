"""timm model creation, starting weights, the exported model of a finished step, size checks."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save

from ..errors import ConfigError, MissingInputError
from ..files import atomic_write_bytes

log = logging.getLogger(__name__)

MODEL_WEIGHTS = "model.safetensors"
MODEL_INFO = "model.json"


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8] if name else []
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"model.name={name!r} is not a timm model.{hint} List them with "
            "`python -c \"import timm; print(timm.list_models('*efficientnet*'))\"`"
        )


def create_model(name: str, num_classes: int, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 pretrained: bool = False, pretrained_file: str | None = None,
                 checkpoint: str | None = None) -> torch.nn.Module:
    """A timm model with `num_classes` outputs and the given noise (dropout before the classifier,
    stochastic depth). Starting weights: timm's pretrained ones (from `pretrained_file` when given,
    offline), or any checkpoint / state dict; a classifier of another class count is re-initialised."""
    check_model_name(name)
    kwargs = {"num_classes": int(num_classes), "drop_rate": float(drop_rate)}
    if drop_path_rate:
        kwargs["drop_path_rate"] = float(drop_path_rate)
    if pretrained_file:
        if not os.path.isfile(pretrained_file):
            raise ConfigError(f"init.file={pretrained_file!r} does not exist")
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        model = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.name={name!r} does not accept this setting: {e}") from None
    except (OSError, RuntimeError) as e:
        if pretrained and not pretrained_file:
            raise ConfigError(
                f"could not fetch pretrained weights for {name!r} ({type(e).__name__}: {e}). Offline, point "
                "init.file at a local weights file (.pth/.safetensors), or set init.pretrained=false"
            ) from None
        raise
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a weights file, read by timm's `load_state_dict`: safetensors or a torch
    file (weights_only=True), its EMA weights first when it holds both (timm's `state_dict_ema` /
    `model_ema`, our checkpoint.pt's `model_ema`), DDP / compile prefixes removed."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path!r} does not exist")
    try:
        state = timm.models.load_state_dict(path, use_ema=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure gets the same advice
        raise ConfigError(f"cannot read weights file {path!r} ({type(e).__name__}: {e}); give a "
                          ".safetensors file or a torch state dict") from None
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Load matching weights; tensors whose shape differs (a classifier for another class count)
    are skipped and stay freshly initialised. Returns what was skipped, for the summary."""
    state = read_state_dict(path)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if len(missing) == len(own):
        raise ConfigError(f"weights file {path!r} has no tensor that fits {type(model).__name__}: wrong model?")
    if mismatched or missing:
        log.info("loaded %s: re-initialised %d tensors of another shape (%s), %d missing",
                 path, len(mismatched), ", ".join(mismatched[:4]), len(missing))
    return {"reinitialised": mismatched, "missing": list(missing), "unexpected": list(unexpected)}


def count_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def export_model(step_dir: str | os.PathLike, model: torch.nn.Module, info: dict) -> None:
    """The finished step's model (EMA weights) for the next stages: safetensors + a small json."""
    step_dir = Path(step_dir)
    atomic_write_bytes(step_dir / MODEL_WEIGHTS,
                       save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    atomic_write_bytes(step_dir / MODEL_INFO, json.dumps(info, indent=2).encode())


def load_exported_model(step_dir: str | os.PathLike, command_hint: str) -> tuple[torch.nn.Module, dict]:
    """The model a finished step exported, built without noise (for labeling / evaluation)."""
    step_dir = Path(step_dir)
    if not (step_dir / "_SUCCESS").exists() or not (step_dir / MODEL_WEIGHTS).exists():
        raise MissingInputError(f"no finished model at {step_dir} (expected {step_dir / MODEL_WEIGHTS} and "
                                f"{step_dir / '_SUCCESS'}); make it with `{command_hint}`")
    info = json.loads((step_dir / MODEL_INFO).read_text())
    model = timm.create_model(info["name"], num_classes=info["num_classes"])
    model.load_state_dict(load_file(str(step_dir / MODEL_WEIGHTS)))
    return model.eval(), info


def eval_img_size(info) -> int:
    """The resolution a model is evaluated and labels at: its test size, else its train size."""
    return int(info.get("test_img_size") or info["img_size"])


def check_num_classes(num_classes: int, expected: int, what: str, fix: str) -> None:
    """The one class-count check: `what` (a model, a label file, a selection) holds `num_classes`
    outputs but the config says `expected` (data.num_classes)."""
    if int(num_classes) != int(expected):
        raise ConfigError(f"{what} holds {num_classes} classes but data.num_classes={expected}; {fix}")


def model_stages(model: torch.nn.Module) -> tuple[list[str], list[list[str]]]:
    """(stem parameter names, parameter names of each stage in order), by timm's coarse `group_matcher`: its
    first group is the stem, the groups after it the stages of blocks (a trailing group holding the classifier
    is the head, never a stage). The same rule for EfficientNets, ResNets, ConvNeXts and ViTs, no names by hand."""
    from timm.models import group_parameters

    try:
        groups = group_parameters(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError) as e:
        raise ConfigError(f"{type(model).__name__} has no timm group_matcher ({e}): set finetune.freeze=0 "
                          "(nothing frozen)") from None
    ordered = [groups[k] for k in sorted(groups)]
    head = {id(p) for p in model.get_classifier().parameters()} if hasattr(model, "get_classifier") else set()
    params = dict(model.named_parameters())
    if len(ordered) > 1 and any(id(params[n]) in head for n in ordered[-1]):
        ordered = ordered[:-1]
    return ordered[0], ordered[1:]


def freeze_stages(model: torch.nn.Module, stages: int | str) -> dict:
    """Freeze the stem and the first `stages` stages (`model_stages`); 0 freezes nothing, "auto" the first half
    (efficientnet_b0: stem + blocks 0-2 of 7; resnet50: stem + layer1-2 of 4). Only parameters stop learning:
    BatchNorm statistics stay live, so that they follow the new resolution. Returns what was frozen."""
    stem, blocks = model_stages(model)
    n = len(blocks) // 2 if stages == "auto" else stages
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(blocks):
        raise ConfigError(f"finetune.freeze={stages!r}: use auto (the first half of the stages), 0 (nothing frozen) "
                          f"or the number of stages to freeze after the stem, up to {len(blocks)} for this model")
    names = set(stem + [name for stage in blocks[:n] for name in stage]) if n else set()
    frozen = 0
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
            frozen += p.numel()
    return {"stages": n, "of": len(blocks), "frozen_params": frozen, "trained_params": count_params(model) - frozen}
