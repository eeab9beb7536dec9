"""Shared fixtures: configs composed like the CLI does, a tiny digits run directory, a trained teacher."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

# small and quick: 32 px test model, few steps, one loader worker
FAST = [
    "model=demo",
    "train.epochs=12",
    "train.batch_size=16",
    "student.epochs=1",
    "num_workers=1",
    "train.shuffle_buffer=200",
    "train.ckpt_every_steps=5",
    "eval.batch_size=64",
    "pseudolabel.batch_size=64",
]


# The multi-process tests are CPU (gloo) tests of the distributed logic: NCCL cannot put two ranks on one
# GPU, so where fewer than 2 GPUs are visible their processes run with the GPUs hidden.
MULTI_PROCESS_ENV = {"CUDA_VISIBLE_DEVICES": ""} if torch.cuda.device_count() < 2 else {}
# PYTHONPATH for a helper script of tests/ run as a process of its own, keeping what the caller had there
TESTS_ON_PATH = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


def launch_env(**extra: str) -> dict:
    """The environment of a launched multi-process job: unbuffered, one torch thread, MULTI_PROCESS_ENV."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **MULTI_PROCESS_ENV, **extra}


def make_cfg(*overrides: str):
    with initialize_config_module("noisystudent.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def run(*overrides: str):
    from noisystudent.__main__ import run_stage

    return run_stage(make_cfg(*overrides))


def cli(*args: str, cwd=None, check=False, timeout=600, launcher=None) -> subprocess.CompletedProcess:
    """Run the real command line (python -m noisystudent ...), or under a launcher (accelerate launch ...)."""
    cmd = (launcher or [sys.executable]) + ["-m", "noisystudent", *args]
    env = launch_env() if launcher else {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate fixes one device per process: on a GPU machine, a test that builds Accelerator(cpu=True)
    in-process must not meet the CUDA state an earlier in-process stage left behind."""
    yield
    if torch.cuda.is_available():
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The digits shards, materialized once."""
    from noisystudent.data.digits import materialize

    root = tmp_path_factory.mktemp("digits")
    materialize(make_cfg(f"data.root={root}").data)
    return root


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, digits_root) -> Path:
    """A run_dir with a finished teacher (session-wide; tests copy it before writing)."""
    run_dir = tmp_path_factory.mktemp("teacher_run")
    run("stage=teacher", f"run_dir={run_dir}", f"data.root={digits_root}", *FAST)
    return run_dir


@pytest.fixture
def teacher_copy(teacher_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(teacher_run, dst)
    return dst
