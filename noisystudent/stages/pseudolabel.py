"""stage=pseudolabel: label data.unlabeled with the model that finished round K-1.

Each process takes a disjoint set of shards (shards[rank::world]) and writes one label file per
shard; a file is renamed into place only when whole, and a rerun skips shards that have one, so
a killed job loses only the shards in flight. Then the main process computes the selection
(confidence filter + class balancing) from per-class statistics and writes selection.json.

With pseudolabel.calibrate the teacher's temperature is first fitted on held-out labeled images
(calibration.py; kept in calibration.json, so a rerun labels its remaining shards with the same one).
Where samples carry a `cls` (the unlabeled shards', or the separate audit shards of data.audit, which
are labeled like the others but never selected), the labels are audited against it (audit.py)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ..config import DATA_SPLIT_KEYS, positive_int, read_settings, round_number, worker_nice
from ..data.labels import ERROR_SUFFIX, SCORES, SUFFIX, LabelFile, LabelFiles, label_paths, write_label_file
from ..data.shards import UNKNOWN_CLASS
from ..data.streams import rank_shards
from ..data.transforms import InputNormalizer, eval_resize_crop, eval_transform, model_norm
from ..errors import ConfigError, DataError
from ..files import read_json, write_json
from ..models.build import check_num_classes, eval_img_size, load_exported_model
from ..models.inference import prepare
from ..pseudolabels.audit import audit_label_files, plot_audits
from ..pseudolabels.calibration import fit_temperature
from ..pseudolabels.choose import Policy, check_policy, choose
from ..pseudolabels.copies import (
    CACHE,
    COPIES,
    EXAMPLES,
    CopySettings,
    EvalSide,
    copy_settings,
    find_copies,
    write_copies,
)
from ..pseudolabels.labeling import Decoding, run_model
from ..pseudolabels.pool import PoolSettings, plot_pool
from ..pseudolabels.selection import HIST_BINS, Selection, SelectionSettings, effective_thresholds
from ..pseudolabels.sheets import SHEETS
from ..pseudolabels.sheets import build as build_sheets
from ..reporting.evaluation import evaluate
from ..reporting.plots import pct, pyplot, save_png
from ..rundir import command_for_round, model_dir_for_round, pseudolabel_dir
from ..training.engine import peak_device_memory_mib
from .common import choice_set, class_names, dali_eval, eval_set_shards, num_classes, shards, warn_chosen_on_eval
from .contract import Step, StepRun, main_decides

log = logging.getLogger(__name__)

SELECTION = "selection.json"
CALIBRATION = "calibration.json"
AUDIT_PLOT = "audit.png"
AUDIT_LABELS = "audit"  # label files of data.audit's shards, beside labels/ (never read by the student)
VAL_LABELS = "val"  # label files of data.val's shards: the pool estimate's held-out reference (never selected)
POOL_PLOT = "pool.png"


@dataclass(frozen=True)
class LabelSettings:
    round: int
    num_classes: int
    threshold: float
    topk: int
    temperature: float
    hard: bool
    balance: bool
    per_class: str | int
    batch_size: int
    strict_shards: bool
    fuse_bn: bool
    compile: bool
    decode: str  # cpu | gpu (auto is resolved for the device before the step: config.resolve_device_settings)
    jpeg_draft: bool
    audit: bool  # read the unlabeled samples' cls (where present) to audit the pseudo-labels
    calibrate: bool
    policy: Policy  # the selection's levers and the pool estimate's settings
    sheets: tuple[int, int]  # contact sheets: images per panel, classes at most
    copies: CopySettings  # copies of eval images in the pool: found, counted, kept out of the selection


def settings(cfg: DictConfig) -> LabelSettings:
    p = cfg.pseudolabel
    if not isinstance(p.threshold, int | float) or not 0.0 < float(p.threshold) < 1.0:
        raise ConfigError(f"pseudolabel.threshold={p.threshold} must be in (0, 1) (the paper uses 0.3)")
    if not isinstance(p.topk, int) or p.topk < 1:
        raise ConfigError(f"pseudolabel.topk={p.topk!r} must be an integer >= 1")
    if not isinstance(p.temperature, int | float) or float(p.temperature) <= 0:
        raise ConfigError(f"pseudolabel.temperature={p.temperature} must be > 0")
    if p.per_class != "auto" and (not isinstance(p.per_class, int) or p.per_class < 1):
        raise ConfigError(f"pseudolabel.per_class={p.per_class!r}: use auto or a positive integer")
    if p.decode not in ("cpu", "gpu"):
        raise ConfigError(f"pseudolabel.decode={p.decode!r}: use auto (gpu on a CUDA device, else cpu), cpu or gpu")
    for key in ("audit", "calibrate"):
        if not isinstance(p.get(key), bool):
            raise ConfigError(f"pseudolabel.{key}={p.get(key)!r}: use true or false")
    if p.calibrate and float(p.temperature) != 1.0:
        raise ConfigError(f"pseudolabel.calibrate=true fits the temperature itself; pseudolabel.temperature="
                          f"{p.temperature} would be overridden: leave it at 1.0, or set calibrate=false")
    if not isinstance(p.ood.filter, bool):
        raise ConfigError(f"pseudolabel.ood.filter={p.ood.filter!r}: use true or false")
    policy = Policy(SelectionSettings(float(p.threshold), bool(p.balance), p.per_class, p.balance_target,
                                      p.max_repeat, p.class_quantile),
                    PoolSettings(p.ood.score, p.ood.quantile, p.prior), p.prior_correction, p.ood.filter,
                    p.prior_targets)
    check_policy(policy)
    nc = num_classes(cfg)
    return LabelSettings(round_number(cfg), nc, float(p.threshold), min(int(p.topk), nc), float(p.temperature),
                         bool(p.hard), bool(p.balance), p.per_class, positive_int(cfg, "pseudolabel.batch_size"),
                         bool(p.strict_shards), bool(p.fuse_bn), bool(p.compile), str(p.decode),
                         bool(p.jpeg_draft), bool(p.audit), bool(p.calibrate), policy,
                         (positive_int(cfg, "pseudolabel.sheets.images"),
                          positive_int(cfg, "pseudolabel.sheets.classes")), copy_settings(p))


POLICY_KEYS = ("pseudolabel.prior", "pseudolabel.prior_correction", "pseudolabel.prior_targets", "pseudolabel.ood",
               "pseudolabel.class_quantile", "pseudolabel.balance_target", "pseudolabel.max_repeat",
               "pseudolabel.sheets", "pseudolabel.eval_copies")


def reads(cfg: DictConfig) -> dict:
    return read_settings(cfg, ("round", "data.unlabeled", "data.num_classes", "data.crop_pct", *DATA_SPLIT_KEYS,
                               "pseudolabel.threshold", "pseudolabel.topk",
                               "pseudolabel.temperature", "pseudolabel.hard", "pseudolabel.balance",
                               "pseudolabel.per_class", "pseudolabel.decode", "pseudolabel.audit",
                               "pseudolabel.calibrate", "data.audit", "data.loader", "data.eval", *POLICY_KEYS,
                               *(("data.calibration",) if cfg.pseudolabel.get("calibrate") else ()),
                               *(("data.val",) if cfg.data.get("val") else ())))


def inputs(cfg: DictConfig, s: LabelSettings) -> dict:
    prev = s.round - 1
    model, info = load_exported_model(model_dir_for_round(cfg.run_dir, prev), command_for_round(cfg.run_dir, prev))
    check_num_classes(info["num_classes"], s.num_classes, f"the round-{prev} model "
                      f"({model_dir_for_round(cfg.run_dir, prev)})", "label with a model of the same classes")
    urls = shards(cfg, "unlabeled")
    out = pseudolabel_dir(cfg.run_dir, s.round)
    paths = label_paths(urls, out / "labels")
    audit_urls, audit_paths = labeled_apart(cfg, "audit", urls, out / AUDIT_LABELS)
    val_urls, val_paths = labeled_apart(cfg, "val", urls, out / VAL_LABELS)
    calibration = None
    if s.calibrate:
        key = choice_set(cfg, "data.calibration")  # data.eval only where nothing held out is set; report.md says so
        if key == "data.eval":
            warn_chosen_on_eval("pseudolabel.calibrate=true fits the temperature")
        calibration = (key, shards(cfg, key.split(".")[1]))
    # the sets whose copies are kept out of the pool: the one the report scores and every eval.sets
    eval_sets = {"data.eval": shards(cfg, "eval")} if cfg.data.get("eval") else {}
    eval_sets.update({f"eval.sets.{es.name}": found for es, found in eval_set_shards(cfg)})
    return {"model": model, "info": info, "urls": urls, "paths": paths, "audit_urls": audit_urls,
            "audit_paths": audit_paths, "val_urls": val_urls, "val_paths": val_paths, "calibration": calibration,
            "class_names": class_names(cfg, s.num_classes), "eval_sets": eval_sets}


def labeled_apart(cfg: DictConfig, name: str, unlabeled: list[str], folder: Path) -> tuple[list[str], dict]:
    """The shards of data.<name> (audit, val: labeled, labeled by the teacher like the pool, never selected) and
    their label files' paths under `folder`; none when the key is not set."""
    urls = shards(cfg, name) if cfg.data.get(name) else []
    both = set(unlabeled) & set(urls)
    if both:
        raise ConfigError(f"data.{name} and data.unlabeled share shard {sorted(both)[0]}: the shards of data.{name} "
                          "are never trained on, so they must be separate from the unlabeled ones")
    return urls, label_paths(urls, folder, f"data.{name}")


def error_path(label_path: Path) -> Path:
    """Where an unreadable shard's reason is kept (beside where its label file would be)."""
    return label_path.with_name(label_path.name.replace(SUFFIX, ERROR_SUFFIX))


def label_shards(run: StepRun, model, transform, resize_crop, normalize: InputNormalizer, todo: list[str],
                 audit_classes: bool, stats: dict) -> None:
    """Label the shards in `todo` (this process's share), one label file per shard, adding to this process's
    counts in `stats`; audit_classes: keep the samples' cls in the label files."""
    p, cfg, accelerator = run.settings, run.cfg, run.accelerator
    paths = {**run.inputs["paths"], **run.inputs["audit_paths"], **run.inputs["val_paths"]}
    how = Decoding(p.decode, p.jpeg_draft, p.batch_size, int(cfg.num_workers), worker_nice(cfg, accelerator.device))
    temperature = run.inputs["temperature"]
    meta = {"num_classes": p.num_classes, "topk": p.topk, "temperature": temperature, "hard": p.hard}
    counts: dict = {}
    for done in run_model(accelerator, model, normalize, todo, transform, resize_crop, how, p.topk, temperature,
                          counts=counts, num_classes=p.num_classes, audit_classes=audit_classes,
                          raw_temperature=1.0 if p.calibrate else None, dali=run.inputs["dali"]):
        url = done["source"]
        if "error" in done:
            if p.strict_shards:
                raise DataError(f"shard {url} cannot be read ({done['error']}); pseudolabel.strict_shards=true "
                                "makes this fatal: fix or drop the shard")
            log.warning("shard %s cannot be read (%s): skipped", url, done["error"])
            stats["unreadable"][url] = done["error"]
            write_json(error_path(paths[url]), {"shard": url, "error": done["error"]})
            continue
        extra = {}
        if done["cls"] is not None and (done["cls"] != UNKNOWN_CLASS).any():
            extra["cls"] = done["cls"]
        if done["confidence_raw"] is not None:
            extra["confidence_raw"] = done["confidence_raw"]
        for name in SCORES:  # a shard none of whose images decoded still gets (empty) scores and fingerprints
            extra[name] = done[name] if done[name] is not None else np.zeros(0, np.float32)
        if done["fingerprint"] is not None:  # a file without them (format 2) is refused by the copy check
            extra["fingerprint"] = done["fingerprint"]
        elif not done["keys"]:
            extra["fingerprint"] = np.zeros((0, 64), np.uint8)
        write_label_file(paths[url], url, done["keys"], done["topk_ids"], done["topk_probs"], done["confidence"],
                         done["argmax"], done["corrupt"], meta, extra)
        stats["images"] += len(done["keys"])
        stats["corrupt"] += len(done["corrupt"])
        stats["shards_done"] += 1
    decode = stats.setdefault("decode", {})  # the device decoder's counts, over both calls
    for k, v in counts.items():
        decode[k] = v if isinstance(v, str) else decode.get(k, 0) + v


def plot_selection(out: Path, hist: np.ndarray, sel: dict, threshold: float) -> None:
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), dpi=110)
    edges = np.linspace(0, 1, HIST_BINS + 1)
    a.bar(edges[:-1], hist.sum(axis=0), width=1 / HIST_BINS, align="edge")
    a.axvline(threshold, color="r", ls="--", label=f"threshold {threshold}")
    a.set_xlabel("teacher confidence (top-1 probability)")
    a.set_ylabel("images")
    a.legend()
    x = np.arange(len(sel["counts_before"]))
    b.bar(x - 0.2, sel["counts_before"], 0.4, label="kept by threshold")
    b.bar(x + 0.2, sel["counts_after"], 0.4, label="after balancing")
    b.set_xlabel("class")
    b.set_ylabel("images")
    b.legend()
    save_png(fig, out / "selection.png")


def work(run: StepRun) -> dict:
    cfg, accelerator, s = run.cfg, run.accelerator, run.settings
    model, info, urls, paths = (run.inputs[k] for k in ("model", "info", "urls", "paths"))
    audit_urls, audit_paths = run.inputs["audit_urls"], run.inputs["audit_paths"]
    val_urls, val_paths = run.inputs["val_urls"], run.inputs["val_paths"]
    (run.out / "labels").mkdir(parents=True, exist_ok=True)
    for folder, extra in ((AUDIT_LABELS, audit_urls), (VAL_LABELS, val_urls)):
        if extra:
            (run.out / folder).mkdir(parents=True, exist_ok=True)
    mine = rank_shards(urls, accelerator.process_index, accelerator.num_processes)
    todo = [u for u in mine if not paths[u].exists()]
    # the labeled sets labeled like the pool, never selected: the audit's and the held-out reference (data.val)
    audit_todo = [u for u in rank_shards(audit_urls, accelerator.process_index, accelerator.num_processes)
                  if not audit_paths[u].exists()]
    audit_todo += [u for u in rank_shards(val_urls, accelerator.process_index, accelerator.num_processes)
                   if not val_paths[u].exists()]
    if len(urls) < accelerator.num_processes:
        log.warning("%d unlabeled shards for %d processes: some processes have nothing to label", len(urls),
                    accelerator.num_processes)
    log.info("labeling %d of %d shards on this process (%d already labeled)%s", len(todo), len(mine),
             len(mine) - len(todo), f", and {len(audit_todo)} labeled shards of data.audit / data.val"
             if audit_todo else "")

    img_size = eval_img_size(info)
    transform = eval_transform(img_size, cfg.data)
    run.inputs["dali"] = dali_eval(cfg, img_size)
    normalize = InputNormalizer(*model_norm(model), channels_last=bool(cfg.channels_last))
    example = torch.randn(2, 3, img_size, img_size)
    model, applied = prepare(model, example, s.fuse_bn, bool(cfg.channels_last), s.compile)
    model = model.to(accelerator.device)
    calibration = calibrate(run, model, transform) if s.calibrate else None
    run.inputs["temperature"] = calibration["temperature"] if calibration else s.temperature
    mismatch = main_decides(accelerator, labeled_at_another_temperature(
        [paths[u] for u in urls] + [audit_paths[u] for u in audit_urls] + [val_paths[u] for u in val_urls],
        run.inputs["temperature"], s.calibrate, s.policy.pool.score) if accelerator.is_main_process else None)
    if mismatch:
        raise ConfigError(mismatch)
    t0 = time.time()
    stats = {"images": 0, "corrupt": 0, "shards_done": 0, "unreadable": {}}
    resize_crop = eval_resize_crop(img_size, cfg.data)
    if todo:
        label_shards(run, model, transform, resize_crop, normalize, todo, s.audit, stats)
    if audit_todo:
        label_shards(run, model, transform, resize_crop, normalize, audit_todo, True, stats)
    wall = time.time() - t0
    counts = stats.get("decode", {})
    labeled_now, device_decoded, cpu_fallback = (int(v) for v in accelerator.reduce(torch.tensor(
        [stats["images"], counts.get("device_decoded", 0), counts.get("cpu_fallback", 0)], device=accelerator.device),
        "sum").tolist())
    # where the images of this run were decoded (summed over processes); cpu_fallback: images the device
    # decoder does not take (not JPEG, CMYK, ...) or refused, decoded with PIL instead
    applied["decode"] = {"where": s.decode, **({"decoder": counts.get("decoder"),
                                                 "device_decoded": device_decoded, "cpu_fallback": cpu_fallback}
                                                if s.decode == "gpu" else {})}
    if run.inputs["dali"] is not None:  # DALI read and decoded every image; pseudolabel.decode was not used
        applied["decode"] = {"where": "dali", "decoder": counts.get("decoder")}
    applied["loader"] = str(cfg.data.get("loader", "torch"))
    applied["peak_device_memory_mib"] = peak_device_memory_mib(accelerator.device)  # the main process's
    accelerator.wait_for_everyone()  # every label file is written
    if not accelerator.is_main_process:
        return {}
    run.inputs["copies"] = eval_copies(run)
    summary, selection = select_and_summarize(s, run.out, run.inputs, info, applied, labeled_now, wall,
                                              accelerator.num_processes)
    summary["temperature"] = run.inputs["temperature"]  # the one the labels were made with
    return {**summary, **audit_and_calibration(s, run.out, selection, urls, paths, audit_urls, audit_paths,
                                               calibration)}


def eval_copies(run: StepRun) -> dict:
    """Main process: the pool images that copy an eval image ({"rows": label file name -> rows, "summary"}), written
    to eval_copies.json; their rows are kept out of the selection unless pseudolabel.eval_copies.exclude=false."""
    s, cfg, inp = run.settings, run.cfg, run.inputs
    c = s.copies
    summary = {"exclude": c.exclude, "max_rms": c.max_rms, "checked_against": {}, "found": None, "excluded": 0}
    if not inp["eval_sets"]:
        summary["why"] = "nothing to check against: no data.eval or eval.sets"
        return {"rows": {}, "summary": summary}
    files = LabelFiles([inp["paths"][u] for u in inp["urls"] if inp["paths"][u].exists()])
    old = next((f for f in files if not f.has_fingerprints), None)
    if old is not None and not c.exclude:
        summary["why"] = (f"not checked: label files of an older version (format {old.format}, {old.path}) hold no "
                          "fingerprints; rerun with force=true to check")
        log.warning("pseudolabel: %s", summary["why"])
        return {"rows": {}, "summary": summary}
    t0 = time.time()
    side = EvalSide.read(inp["eval_sets"], Path(cfg.run_dir) / CACHE, s.batch_size, int(cfg.num_workers),
                         worker_nice(cfg, run.accelerator.device))
    rows, records = find_copies(files, side, c.max_rms)
    write_copies(run.out, records)
    summary.update(checked_against=side.images, found=len(records), excluded=len(records) if c.exclude else 0,
                   file=COPIES, examples=records[:EXAMPLES], wall_s=round(time.time() - t0, 2))
    if records:
        log.warning("pseudolabel: %d pool images are copies of eval images (%s)%s; every one is in %s",
                    len(records), ", ".join(sorted({r["eval_set"] for r in records})),
                    ", kept out of the selection" if c.exclude else ", and stay in the selection "
                    "(pseudolabel.eval_copies.exclude=false)", run.out / COPIES)
    return {"rows": rows if c.exclude else {}, "summary": summary}


def labeled_at_another_temperature(paths: list[Path], temperature: float, calibrated: bool,
                                   score: str = "msp") -> str | None:
    """Why the label files an earlier run of this step left cannot be kept, or None. One threshold cannot
    serve confidences of two temperatures (a run killed with calibrate=false, rerun with calibrate=true), and a
    file of an older version has no out-of-domain score (`score`, unless msp, which every file has)."""
    for p in paths:
        if p.exists():
            f = LabelFile(p)
            made_at = float(f.meta.get("temperature", "nan"))
            if not math.isclose(made_at, temperature, rel_tol=1e-6):
                now = "fitted by pseudolabel.calibrate" if calibrated else "pseudolabel.temperature"
                return (f"label file {p} was made at temperature {made_at:g}, but this run labels at {temperature:g} "
                        f"({now}): one threshold cannot serve both. Rerun with force=true to label every shard again")
            if score != "msp" and not f.has_scores:
                return (f"label file {p} was made by an older version (label file format {f.format}) and has no "
                        f"out-of-domain score ({score}): rerun with force=true to label every shard again with this "
                        "version, or set pseudolabel.ood.score=msp")
    return None


def calibrate(run: StepRun, model, transform) -> dict:
    """The teacher's temperature: fitted on held-out labeled images (every process takes part), or read
    from calibration.json when an earlier run of this step fitted it (its labels used that one)."""
    path = run.out / CALIBRATION
    # one decision for every process (a process that skipped the fit would leave the others in its collectives)
    if main_decides(run.accelerator, path.exists()):
        found = read_json(path)
        log.info("calibration: temperature %.4f from %s (fitted by an earlier run of this step)",
                 found["temperature"], path)
        return found
    cfg, accelerator = run.cfg, run.accelerator
    key, urls = run.inputs["calibration"]

    def measure(temperature, grid):
        return evaluate(accelerator, model, urls, run.settings.num_classes, transform, int(cfg.eval.batch_size),
                        int(cfg.num_workers), bool(cfg.channels_last), worker_nice(cfg, accelerator.device),
                        temperature=temperature, nll_temperatures=grid, dali=run.inputs["dali"])

    found = fit_temperature(measure, key)
    if accelerator.is_main_process:
        write_json(path, found)
    return found


def audit_and_calibration(s: LabelSettings, out: Path, selection: Selection, urls, paths, audit_urls, audit_paths,
                          calibration: dict | None) -> dict:
    """Main process: the audit of every labeled set with classes against the step's selection (summary keys,
    audit.png) and the calibration's record."""
    sets = {"unlabeled": (urls, paths), "audit_set": (audit_urls, audit_paths)}
    audits = {}
    for name, (u, p) in sets.items():
        files = LabelFiles([p[x] for x in u if p[x].exists()])
        found = audit_label_files(files, selection, s.num_classes) if files else None
        if found is not None:
            audits[name] = found
            kept, after = found["kept_by_threshold"], found["after_balancing"]
            log.info("pseudo-label audit (%s, %d images with a class): %.1f%% right; kept by threshold %d, %s right; "
                     "after balancing %d, %s right", name, found["images"], 100 * found["accuracy"], kept["images"],
                     pct(kept["accuracy"]), after["images"], pct(after["accuracy"]))
    if audit_urls and "audit_set" not in audits:
        log.warning("data.audit: no sample of its shards has a cls, so there is nothing to audit with")
    if audits:
        plot_audits(out / AUDIT_PLOT, {("data.unlabeled" if k == "unlabeled" else "data.audit"): v
                                       for k, v in audits.items()})
    return {"audit": audits or None, "calibration": calibration}



def select_and_summarize(s: LabelSettings, out: Path, inp: dict, info, applied, labeled_now, wall,
                         processes) -> tuple[dict, Selection]:
    """Main process: what is in the pool and the selection, from every label file (choose.py); selection.json,
    selection.png, pool.png and the contact sheets; the step's summary and the selection (the audit weighs each
    image by it)."""
    nc = s.num_classes
    urls, paths = inp["urls"], inp["paths"]
    unreadable = {}
    for u in urls:
        err = error_path(paths[u])
        if not paths[u].exists() and err.exists():
            unreadable[u] = read_json(err)["error"]
    # opened one at a time, pass after pass: memory does not grow with the number of label files
    files = LabelFiles([paths[u] for u in urls if paths[u].exists()])
    reference = LabelFiles([inp["val_paths"][u] for u in inp["val_urls"] if inp["val_paths"][u].exists()])
    for f in LabelFiles(files.paths + reference.paths):
        check_num_classes(f.num_classes, nc, f"label file {f.path}", "rerun with force=true")
    sel, pool, stats = choose(files, reference, nc, s.policy, excluded=inp["copies"]["rows"])
    sel_json = sel.to_json()
    empty = [c for c in range(nc) if sel_json["counts_before"][c] == 0]
    if empty:
        log.warning("classes %s have no image above pseudolabel.threshold=%s: they get no pseudo-label", empty,
                    s.threshold)
    write_json(out / SELECTION, {**sel_json, "hard": s.hard, "num_classes": nc})
    corrupt = sum(int(f.meta.get("corrupt", 0)) for f in files)
    plot = pool.pop("_plot")
    summary = {
        "round": s.round,
        "teacher": info,
        "processes": processes,
        "shards": len(urls),
        "shards_labeled": len(files),
        "unreadable_shards": unreadable,
        "images_seen": int(stats["seen"]),
        "corrupt_skipped": corrupt,
        "images_above_threshold": int(stats["above_threshold"].sum()),
        "images_kept_by_threshold": int(sum(sel_json["counts_before"])),
        "eval_copies": inp["copies"]["summary"],
        "images_after_balancing": int(sum(sel_json["counts_after"])),
        "classes_without_images": empty,
        "threshold": s.threshold,
        "per_class": sel_json["per_class"],
        "counts_before": sel_json["counts_before"],
        "counts_after": sel_json["counts_after"],
        "repeat_factor": sel_json["repeat_factor"],
        "per_class_threshold": effective_thresholds(sel),
        "confidence_histogram": stats["hist"].sum(axis=0).tolist(),
        "selection": {k: sel_json[k] for k in ("prior", "prior_correction", "prior_targets", "ood", "class_quantile",
                                                "balance_target", "max_repeat", "class_weights")},
        "pool": pool,
        "images_labeled_this_run": labeled_now,
        "images_per_sec": labeled_now / wall if wall > 0 and labeled_now else None,
        "wall_s": wall,
        "inference": applied,
        "topk": s.topk, "temperature": s.temperature, "hard": s.hard,
    }
    plot_selection(out, stats["hist"], sel_json, s.threshold)
    plot_pool(out / POOL_PLOT, {**pool, "_plot": plot}, inp["class_names"])
    summary["sheets"] = build_sheets(files, sel, nc, out, s.sheets[0], s.sheets[1], inp["class_names"])["sheets"]
    summary["sheets"] = [{k: v for k, v in sheet.items() if k != "tiles"} for sheet in summary["sheets"]]
    ood = pool["ood"]
    log.info("pool: %d images; %s; classes as estimated (%s): %s", pool["images"],
             f"{ood['below_cutoff']:,} below the {ood['score']} cut-off of {ood['cutoff_from']}, at least "
             f"{pct(ood['share_estimate'])} out of domain" if ood["cutoff"] is not None
             else "no data.val: no out-of-domain cut-off", pool["method"],
             " ".join(f"{100 * x:.1f}%" for x in pool["estimated_share"][:20]))
    log.info("pseudo-labels: %d images seen, %d kept by threshold %.2f%s, %d after balancing (N=%s)",
             summary["images_seen"], summary["images_kept_by_threshold"], s.threshold,
             " and the out-of-domain filter" if s.policy.ood_filter else "", summary["images_after_balancing"],
             sel_json["per_class"])
    return summary, sel


STEP = Step("pseudolabel", settings, reads, inputs, work, out_dir=lambda cfg: pseudolabel_dir(cfg.run_dir, cfg.round),
            outputs=("labels", AUDIT_LABELS, VAL_LABELS, SELECTION, "selection.png", AUDIT_PLOT, CALIBRATION, POOL_PLOT,
                     SHEETS, COPIES), per_round=True)
