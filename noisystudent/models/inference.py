"""Making a trained model fast for labeling: BatchNorm folded into convolutions, channels_last,
optionally torch.compile. Every change is checked against the original outputs."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

log = logging.getLogger(__name__)


def _bn_core(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d) and module.track_running_stats and module.running_mean is not None


def _post_bn(bn: nn.Module) -> nn.Module:
    """What remains of a BN layer once folded: nothing, or timm's BatchNormAct2d's drop + act."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
            if m is not None and not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def fuse_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """Fold each eval-mode BatchNorm2d into the Conv2d registered right before it in the same parent
    (conv1/bn1, conv_pw/bn2, ...) when the channel counts agree. Module order is only a hint about
    data flow, so the caller verifies the fused model against the original (see `prepare`)."""
    model = copy.deepcopy(model).eval()
    fused = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if (isinstance(conv, nn.Conv2d) and _bn_core(bn) and conv.out_channels == bn.num_features
                    and type(bn) in (nn.BatchNorm2d,) + _timm_bn_act()):
                w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
                conv.weight, conv.bias = w, b
                setattr(parent, bn_name, _post_bn(bn))
                fused += 1
    return model, fused


def _timm_bn_act() -> tuple:
    try:
        from timm.layers import BatchNormAct2d

        return (BatchNormAct2d,)
    except ImportError:  # pragma: no cover
        return ()


@torch.inference_mode()
def relative_diff(a: nn.Module, b: nn.Module, example: torch.Tensor) -> float:
    """max |a(x) - b(x)| / max(1, max |a(x)|)."""
    ya, yb = a(example).float(), b(example).float()
    return float((ya - yb).abs().max() / ya.abs().max().clamp(min=1.0))


def prepare(model: nn.Module, example: torch.Tensor, fuse_bn: bool = True, channels_last: bool = False,
            compile_model: bool = False, rtol: float = 1e-5) -> tuple[nn.Module, dict]:
    """The labeling model (eval mode: no dropout, no stochastic depth) and what was applied."""
    model = model.eval()
    applied = {"fuse_bn": 0, "channels_last": False, "compile": False}
    if fuse_bn:
        fused, n = fuse_batchnorm(model)
        diff = relative_diff(model, fused, example)
        if n and diff <= rtol:
            model, applied["fuse_bn"] = fused, n
            applied["fuse_bn_rel_diff"] = diff
        elif n:
            log.warning("BatchNorm folding changed outputs by %.2e (> %.0e): labeling with the unfused model", diff,
                        rtol)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    if compile_model:
        model = torch.compile(model, dynamic=True)
        applied["compile"] = True
    return model, applied
