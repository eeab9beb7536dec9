"""Entry point: `python -m noisystudent stage=NAME key=value ...` (Hydra), also under
`accelerate launch -m noisystudent ...` / torchrun (every process composes the same config;
only the main process writes shared files)."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import resolve_device_settings, resolve_precision
from .errors import ConfigError, NoisyStudentError
from .stages import MODULES
from .training.host_memory import keep_freed_memory

log = logging.getLogger("noisystudent")


def make_accelerator(cfg: DictConfig):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.get("precision", "auto"), cuda,
                                  cuda and torch.cuda.is_bf16_supported(including_emulation=False))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if cuda else 0
    if local_world > gpus > 0:
        # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") only at the first collective
        raise ConfigError(
            f"{local_world} processes were launched on this node (LOCAL_WORLD_SIZE) but {gpus} "
            f"GPU(s) are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one "
            f"process per GPU. Launch with --num_processes / --nproc_per_node {gpus}, or hide "
            "the GPUs (CUDA_VISIBLE_DEVICES=) to run the processes on the CPU")
    # Without an accelerator device, accelerate only sets up the gloo process group when told
    # cpu=True; otherwise each of N launched processes would silently run alone as "rank 0 of 1".
    accelerator = Accelerator(mixed_precision=precision, cpu=world > 1 and not cuda)
    if world > 1 and accelerator.num_processes != world:
        raise ConfigError(f"launched as {world} processes (WORLD_SIZE) but accelerate set up "
                          f"{accelerator.num_processes}; check the launcher's settings")
    set_seed(int(cfg.seed) + accelerator.process_index)
    reuse = cfg.get("keep_freed_memory", "auto")
    if reuse not in ("auto", True, False):
        raise ConfigError(f"keep_freed_memory={reuse!r}: use auto (on when the model runs on a CPU), true or false")
    if reuse is True or (reuse == "auto" and accelerator.device.type == "cpu"):
        keep_freed_memory()
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    return accelerator


def run_stage(cfg: DictConfig, accelerator=None):
    name = cfg.stage.name
    if name not in MODULES:
        raise ConfigError(f"stage={name!r} is not a stage: use one of {', '.join(MODULES)}")
    module = importlib.import_module(f".stages.{MODULES[name]}", __package__)
    accelerator = accelerator or make_accelerator(cfg)
    # precision=auto / channels_last=auto become what they mean on this accelerator's device
    resolve_device_settings(cfg, str(accelerator.mixed_precision), accelerator.device.type)
    if hasattr(module, "STEP"):  # a step of the loop: run under the stage contract (stages/contract.py)
        from .stages.contract import run_step

        return run_step(module.STEP, cfg, accelerator)
    return module.run(cfg, accelerator)


def end_child_processes() -> None:
    """Kill this process's children (DataLoader workers) before an error exit. Workers ignore SIGTERM
    (so that a scheduler's SIGTERM lets the main process checkpoint first), and Python's exit handler
    stops children with SIGTERM and then waits for them: without this, a process leaving on an error
    raised while a loader was running would wait at exit forever, holding its GPUs."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


def submitit_processes() -> None:
    """Under Hydra's submitit launcher (hydra/launcher=submitit_slurm, or submitit_local), each task of the job
    is one process of the step: export the variables torch's env:// rendezvous reads (RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from submitit's job environment, as torchrun
    would, replacing any the submitting shell passed on (a MASTER_PORT set there is kept: submitit reads it).
    A job of one task runs as one process, whatever the shell had set."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False, overwrite=True)  # accelerate picks the GPU by LOCAL_RANK
    else:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(key, None)


@hydra.main(version_base="1.3", config_path="pkg://noisystudent.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    logging.getLogger().setLevel(logging.INFO)
    try:
        submitit_processes()
        OmegaConf.resolve(cfg)
        run_stage(cfg)
        close_process_group()
    except NoisyStudentError as e:
        # caught here, inside hydra.main, which would otherwise print it with its own advice and exit 1
        print(f"noisystudent error: {_user_message(e)}", file=sys.stderr)
        end_child_processes()
        sys.exit(e.exit_code)
    except BaseException:
        end_child_processes()  # then Hydra prints the traceback (a bug, not a user error) and exits 1
        raise


def close_process_group() -> None:
    """Tear the process group down once every process finished the stage (they all passed its last barrier),
    instead of leaving it to interpreter exit, where a rank was seen to abort ("terminate called without an
    active exception") under torchrun on a loaded machine."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _user_message(exc: BaseException) -> str:
    """Our message without the DataLoader-worker traceback wrapper that PyTorch adds."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip()


def die_with_launcher() -> None:
    """torchrun / accelerate launch start each rank in a session of its own, so a launcher killed outright
    (SIGKILL, the OOM killer) would leave its ranks running on alone, holding their GPUs. Under a
    launcher, ask the kernel to SIGKILL this rank when its parent dies (Linux; elsewhere a no-op)."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the call above
        os._exit(137)


def version_text() -> str:
    """`noisystudent --version`: ours, and the releases a result depends on (torch, its CUDA, timm and the rest of the
    stack), as a bug report wants them."""
    from importlib import metadata

    from . import __version__

    def release(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    import torch

    cuda = torch.version.cuda or "none (a CPU build)"
    if torch.cuda.is_available():
        cuda += f", {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}"
    dali = next((f"{name} {release(name)}" for name in ("nvidia-dali-cuda130", "nvidia-dali-cuda120")
                 if release(name) != "not installed"), "nvidia-dali not installed")
    lines = [f"noisystudent {__version__}", f"python {sys.version.split()[0]}",
             f"torch {torch.__version__} (CUDA {cuda})"]
    lines += [f"{name} {release(name)}" for name in ("torchvision", "timm", "accelerate", "webdataset", "hydra-core")]
    return "\n".join([*lines, dali])


def main() -> None:
    # ours, before Hydra: its own --version would print Hydra's release
    if any(a in ("--version", "-V") for a in sys.argv[1:]):
        print(version_text())
        return
    die_with_launcher()
    _hydra_main()


if __name__ == "__main__":
    main()
