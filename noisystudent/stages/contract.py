"""The stage contract: what every step of the loop does around its own recipe, in one place.

A step (teacher, pseudolabel, student; evaluate without a marker) is described by a `Step`, and
`run_step` runs it on every process, in this order:

1. settings: every key the step reads is checked and turned into typed settings, before any work
   or I/O (a ConfigError names the key);
2. skip: the main process decides whether the step is finished (its `_SUCCESS` exists and
   force=false) and every process follows that one decision. A finished step whose own settings
   changed since it ran is skipped with a warning that names the keys (force=true reruns it);
3. clear (force=true only): the main process alone removes the marker, the checkpoint and the
   step's own outputs, while the others wait;
4. inputs: the embedded demo data is written (main process; the others wait), then the step's
   inputs are checked on every process (a missing input names the command that makes it);
5. seed: every process seeds Python, NumPy and torch from (seed, step, round, rank), so a step gives
   the same result alone, inside stage=iterate, or after the loop was stopped and rerun;
6. work: the step's recipe; collectives on every process, shared files from the main process;
7. finish: the main process writes config.yaml (the whole composed config, resolved), summary.json
   (with the settings the step read and their hash), then `_SUCCESS`; every process returns only
   after a barrier, once those files exist, with the summary read back from disk.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config import changed_settings, settings_hash
from ..data import digits
from ..errors import NoisyStudentError
from ..files import atomic_write_bytes
from ..rundir import SUCCESS, is_done, mark_done, read_summary
from ..training.engine import CHECKPOINT
from ..training.tracking import METRICS, TENSORBOARD

log = logging.getLogger(__name__)

CONFIG = "config.yaml"


@dataclass(frozen=True)
class Step:
    name: str
    # cfg -> typed, checked settings (raises ConfigError); no I/O
    settings: Callable[[DictConfig], Any]
    # cfg -> the flattened config keys and values the result depends on (config.read_settings)
    reads: Callable[[DictConfig], dict]
    # (cfg, settings) -> the checked inputs, on every process (raises MissingInputError / DataError)
    inputs: Callable[[DictConfig, Any], Any]
    # the recipe: StepRun -> the summary to write (main process; the others' return value is ignored)
    work: Callable[[StepRun], dict]
    # cfg -> the step directory holding _SUCCESS; None for a step without a marker (evaluate)
    out_dir: Callable[[DictConfig], Path] | None = None
    # the step's own outputs removed on force=true besides marker and checkpoint (e.g. label files)
    outputs: tuple[str, ...] = ()
    # a step of round K (cfg.round): the round is part of its seed
    per_round: bool = False


@dataclass
class StepRun:
    """What the recipe gets: the config, the accelerator, its settings and inputs, where to write."""

    cfg: DictConfig
    accelerator: Any
    settings: Any
    inputs: Any
    out: Path | None
    settings_hash: str


def step_seed(seed: int, name: str, round_idx: int, rank: int) -> int:
    """A 32-bit seed that depends on (seed, step, round, rank) only, never on what ran before."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}/{int(round_idx)}/{int(rank)}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def main_decides(accelerator, value):
    """The main process's value, on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _clear(out: Path, outputs: tuple[str, ...]) -> None:
    for name in (SUCCESS, CHECKPOINT, CONFIG, METRICS, TENSORBOARD, *outputs):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def prepare_data(cfg: DictConfig, accelerator) -> None:
    """Materialize the embedded demo data on first use (main process; the others wait)."""
    if cfg.data.get("name") == "digits":
        if accelerator.is_main_process:
            digits.materialize(cfg.data)
        accelerator.wait_for_everyone()


def run_step(step: Step, cfg: DictConfig, accelerator) -> dict:
    settings = step.settings(cfg)
    reads = step.reads(cfg)
    digest = settings_hash(reads)
    out = step.out_dir(cfg) if step.out_dir else None
    round_idx = int(cfg.round) if step.per_round else 0

    if out is not None:
        done = main_decides(accelerator, is_done(out) and not cfg.force)
        if done:
            summary = read_summary(out)
            if accelerator.is_main_process:
                changed = changed_settings(summary.get("settings", reads), reads)
                if changed:  # benchmarks/bench_accuracy.py --reuse looks for this wording: keep them together
                    log.warning("%s is finished but its settings changed since it ran: %s. It is skipped and "
                                "keeps its result; force=true reruns it", out, "; ".join(changed))
                else:
                    log.info("%s is finished (%s exists): skipped; force=true reruns it", out, out / SUCCESS)
            return summary
        if cfg.force and accelerator.is_main_process:
            _clear(out, step.outputs)
        accelerator.wait_for_everyone()

    prepare_data(cfg, accelerator)
    inputs = step.inputs(cfg, settings)

    from accelerate.utils import set_seed

    set_seed(step_seed(cfg.seed, step.name, round_idx, accelerator.process_index))
    summary = step.work(StepRun(cfg, accelerator, settings, inputs, out, digest))

    if out is None:
        accelerator.wait_for_everyone()
        return summary
    if accelerator.is_main_process:
        # everything the step was run with, beside what it read (summary.json's settings): a result traces to it
        atomic_write_bytes(out / CONFIG, OmegaConf.to_yaml(cfg, resolve=True).encode())
        mark_done(out, {**summary, "settings": reads, "config_hash": digest})
    accelerator.wait_for_everyone()
    if not is_done(out):  # every process sees the marker before it moves on (shared filesystem)
        raise NoisyStudentError(f"{out / SUCCESS} is not visible on this process after the step finished: "
                                "run_dir must be on a filesystem every process (and node) shares")
    return read_summary(out)
