"""stage=export: the final model (or export.round=K) out of the run, for use without this project.

run_dir/export/ holds:
- model.safetensors + config.json: a timm model folder. `timm.create_model("local-dir:run_dir/export",
  pretrained=True)` builds it with its classes, mean/std, input size and crop_pct, no code of ours;
- model.onnx (export.onnx=true; needs onnx + onnxscript): the model with every BatchNorm folded into the
  convolution before it
  (checked: the folded model's outputs match within 1e-5, or the export is refused), dynamic batch,
  opset export.opset, checked against PyTorch with onnxruntime when it is installed;
- README.md: a model card (data, recipe, rounds, accuracy, how to load);
- summary.json + _SUCCESS, as every step."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..config import read_settings
from ..errors import ConfigError, DataError, MissingInputError
from ..files import atomic_write_bytes, read_json
from ..models.build import MODEL_WEIGHTS, eval_img_size, load_exported_model
from ..models.inference import fuse_batchnorm, relative_diff
from ..reporting.report import markdown_table
from ..rundir import SUMMARY, command_for_round, finished_models, read_summary
from .common import class_names
from .contract import Step, StepRun

log = logging.getLogger(__name__)

FOLD_RTOL = 1e-5  # how far folding BatchNorm may move the outputs (relative to their largest magnitude)
ONNX_ATOL = 1e-4  # how far onnxruntime's logits may be from PyTorch's
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportSettings:
    round: int | None  # None: the last finished model
    onnx: bool
    opset: int


def settings(cfg: DictConfig) -> ExportSettings:
    e = cfg.export
    if e.round is not None and (not isinstance(e.round, int) or isinstance(e.round, bool) or e.round < 0):
        raise ConfigError(f"export.round={e.round!r}: use null (the last finished model), 0 (the teacher) or a round K")
    if not isinstance(e.opset, int) or not 13 <= e.opset <= 23:
        raise ConfigError(f"export.opset={e.opset!r}: use an ONNX opset from 13 to 23 (e.g. 18)")
    return ExportSettings(e.round, bool(e.onnx), int(e.opset))


def _round_model(cfg: DictConfig, round_idx: int | None) -> tuple[int, str, Path] | None:
    """The finished model export.round names (None: the last one), or None when there is none. A round's
    model is its fine-tune when there is one (finished_models lists it last of the round)."""
    models = [m for m in finished_models(cfg.run_dir) if round_idx is None or m[0] == round_idx]
    return models[-1] if models else None


def _chosen(cfg: DictConfig, s: ExportSettings) -> tuple[int, str, Path]:
    chosen = _round_model(cfg, s.round)
    if chosen is not None:
        return chosen
    models = finished_models(cfg.run_dir)
    if not models:
        raise MissingInputError(f"no finished model in {cfg.run_dir}: train one first "
                                f"(`{command_for_round(cfg.run_dir, 0)}`, or stage=iterate)")
    raise MissingInputError(f"export.round={s.round}: no finished model for that round in {cfg.run_dir} "
                            f"(finished: {', '.join(str(m[0]) for m in models)}); make it with "
                            f"`{command_for_round(cfg.run_dir, s.round)}`")


def reads(cfg: DictConfig) -> dict:
    out = read_settings(cfg, ("export.onnx", "export.opset", "data.crop_pct"))
    # which model, and the settings hash of the step that made it: a retrained model is another export
    chosen = _round_model(cfg, cfg.export.round)
    if chosen is not None:
        out["model (resolved)"] = {"round": chosen[0], "path": str(chosen[2]),
                                   "config_hash": read_summary(chosen[2]).get("config_hash")}
    return out


def inputs(cfg: DictConfig, s: ExportSettings) -> dict:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None] if s.onnx else []
    if missing:
        raise ConfigError(f"export.onnx=true needs {' and '.join(missing)}: pip install 'noisystudent[export]' "
                          "(onnx, onnxscript, onnxruntime), or set export.onnx=false to export the timm folder alone")
    round_idx, role, step_dir = _chosen(cfg, s)
    model, info = load_exported_model(step_dir, command_for_round(cfg.run_dir, round_idx))
    return {"round": round_idx, "role": role, "step_dir": step_dir, "model": model, "info": info,
            "summary": read_summary(step_dir), "names": class_names(cfg, int(info["num_classes"]))}


def timm_config(model: torch.nn.Module, info: dict, crop_pct: float, names: list[str] | None) -> dict:
    """The config.json timm reads from a model folder (local-dir: or a Hub repo)."""
    from timm.data import resolve_data_config

    size = eval_img_size(info)
    data = resolve_data_config({}, model=model)
    cfg = {"architecture": info["name"], "num_classes": int(info["num_classes"]),
           "num_features": int(getattr(model, "num_features", 0)) or None,
           "pretrained_cfg": {"input_size": [3, size, size], "interpolation": "bicubic", "mean": list(data["mean"]),
                              "std": list(data["std"]), "crop_pct": float(crop_pct), "crop_mode": "center",
                              "num_classes": int(info["num_classes"])}}
    if names:
        cfg["label_names"] = names
    return cfg


def export_onnx(fused: torch.nn.Module, reference: torch.nn.Module, out: Path, example: torch.Tensor,
                check: torch.Tensor, opset: int) -> float | None:
    """The folded model to out/model.onnx with a dynamic batch dimension, through torch.export (torch's exporter
    since 2.9; the TorchScript one is deprecated). Written and checked in a temporary folder first, under its
    final names (a model over 2 GB keeps its weights in model.onnx.data, which model.onnx names), then moved
    in: a refused or interrupted export leaves no model.onnx. Returns onnxruntime's max |diff| on `check`."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(fused, (example,), input_names=["images"], output_names=["logits"],
                                    opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    tmp = out / ".onnx.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    program.save(str(tmp / ONNX_FILE))
    diff = check_onnx(tmp / ONNX_FILE, reference, check)  # another batch size than the export's
    if diff is not None and diff > ONNX_ATOL:
        shutil.rmtree(tmp)
        raise DataError(f"the ONNX model of {out}: onnxruntime's logits differ from PyTorch's by {diff:.2e} "
                        f"(allowed {ONNX_ATOL:.0e}); try another export.opset")
    for name in sorted(os.listdir(tmp), key=lambda n: n == ONNX_FILE):  # model.onnx last: its data is in place
        os.replace(tmp / name, out / name)
    tmp.rmdir()
    return diff


def check_onnx(path: Path, reference: torch.nn.Module, batch: torch.Tensor) -> float | None:
    """max |onnxruntime - PyTorch (unfolded)| on `batch`; None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: %s is written but not checked (pip install onnxruntime)", path)
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": batch.numpy()})
    with torch.no_grad():
        expected = reference(batch).numpy()
    return float(abs(logits - expected).max())


def model_card(cfg: DictConfig, inp: dict, run_out: Path, files: list[str], fold: dict, onnx_diff) -> str:
    info, summary = inp["info"], inp["summary"]
    size = eval_img_size(info)
    # a fine-tune trains without noise: the noise that made the model is its student's
    noise = read_summary(summary["source"]).get("noise") if inp["role"] == "finetune" else summary.get("noise")
    report = Path(cfg.run_dir) / "report.json"
    rows = read_json(report)["rounds"] if report.exists() else []
    lines = [
        f"# {info['name']}: noisystudent round {inp['round']} ({inp['role']})", "",
        "Trained with noisystudent (Noisy Student self-training: a teacher labels unlabeled images, an "
        "equal-or-larger student learns from them under noise, round after round).", "",
        "## Data", "",
        f"- labeled: `{cfg.data.get('labeled')}`", f"- unlabeled: `{cfg.data.get('unlabeled')}`",
        f"- evaluated on: `{cfg.data.get('eval')}`", f"- classes: {info['num_classes']}"
        + (f" ({', '.join(inp['names'][:10])}{', ...' if len(inp['names']) > 10 else ''})" if inp["names"] else ""),
        "", "## Recipe", "",
        f"- model: `{info['name']}`, {summary['model']['params']:,} parameters, trained at {info['img_size']} px, "
        + (f"then fine-tuned at {size} px on the labeled images without augmentation (FixRes; "
           f"{summary.get('epochs', 0):.3g} epochs, {summary['frozen']['stages']} of {summary['frozen']['of']} "
           "stages frozen), " if inp["role"] == "finetune" else "")
        + f"evaluated at {size} px (crop_pct {cfg.data.get('crop_pct', 0.875)})",
        f"- noise: {json.dumps(noise)}" if noise else "- the teacher (round 0)",
        f"- steps: {summary.get('steps')}, global batch {summary.get('global_batch')}, "
        f"precision {summary.get('precision', '?')}",
        f"- accuracy on the eval set: top-1 {100 * summary['top1']:.2f}%, top-5 {100 * summary['top5']:.2f}% "
        f"({summary['eval']['images']} images)", "",
    ]
    if rows:
        lines += ["## Rounds", "", *markdown_table(rows).splitlines()[2:-2], ""]
    lines += [
        "## Files", "",
        *[f"- `{f}`" for f in files],
        *([f"- BatchNorm folded into {fold['layers']} convolutions for ONNX (outputs moved by {fold['rel_diff']:.1e}, "
           f"relative)" + (f"; onnxruntime vs PyTorch: max |diff| {onnx_diff:.1e}" if onnx_diff is not None else "")]
          if fold else []), "",
        "## Load it", "",
        "```python",
        "import timm",
        f'model = timm.create_model("local-dir:{run_out}", pretrained=True).eval()  # this folder',
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
        "```", "",
    ]
    if "model.onnx" in files:
        lines += ["```python", "import onnxruntime",
                  'session = onnxruntime.InferenceSession("model.onnx")',
                  'logits = session.run(None, {"images": batch})[0]  # batch: float32 (N, 3, H, W), normalized',
                  "```", ""]
    return "\n".join(lines)


def work(run: StepRun) -> dict:
    cfg, s, inp, accelerator = run.cfg, run.settings, run.inputs, run.accelerator
    if not accelerator.is_main_process:  # one process writes; the others wait at the contract's barrier
        return {}
    model, info = inp["model"].eval(), inp["info"]
    size = eval_img_size(info)
    out = run.out
    files = [MODEL_WEIGHTS, "config.json", "README.md"]
    onnx_diff, fold = None, None
    if s.onnx:  # first, so that a refused export leaves no new file behind
        example = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        fused, n_folded = fuse_batchnorm(model)
        rel = relative_diff(model, fused, example)
        if rel > FOLD_RTOL:
            raise DataError(f"folding BatchNorm into the convolutions of {inp['step_dir']} moved its outputs by "
                            f"{rel:.2e} (relative; allowed {FOLD_RTOL:.0e}): refusing an ONNX model that differs "
                            "from the trained one; export.onnx=false exports the timm folder alone")
        fold = {"layers": n_folded, "rel_diff": rel}
        onnx_diff = export_onnx(fused, model, out, example, torch.randn(3, 3, size, size), s.opset)
        files.insert(2, ONNX_FILE)
    atomic_write_bytes(out / MODEL_WEIGHTS, (inp["step_dir"] / MODEL_WEIGHTS).read_bytes())  # plain timm names
    config = timm_config(model, info, float(cfg.data.get("crop_pct", 0.875)), inp["names"])
    atomic_write_bytes(out / "config.json", json.dumps(config, indent=2).encode())
    atomic_write_bytes(out / "README.md", model_card(cfg, inp, out, files, fold, onnx_diff).encode())
    log.info("exported round %d (%s) to %s: %s", inp["round"], info["name"], out, ", ".join(files))
    return {"round": inp["round"], "role": inp["role"], "source": str(inp["step_dir"]), "model": info,
            "files": files, "batchnorm_folded": fold and fold["layers"], "fold_rel_diff": fold and fold["rel_diff"],
            "onnx_opset": s.opset if s.onnx else None, "onnx_max_abs_diff": onnx_diff,
            "label_names": bool(inp["names"]), "top1": inp["summary"]["top1"]}


STEP = Step("export", settings, reads, inputs, work, out_dir=lambda cfg: Path(cfg.run_dir) / "export",
            outputs=(MODEL_WEIGHTS, "config.json", ONNX_FILE, ONNX_FILE + ".data", ".onnx.tmp", "README.md",
                     SUMMARY))
