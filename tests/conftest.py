"""Shared fixtures: configs composed like the CLI does, a tiny digits run directory, a trained teacher."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from noisystudent.data.writer import write_shard

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


# One torch thread in the test process and in every process a test starts (cli and launch_env set it too):
# for the tests' tiny models it is the faster setting on 2 cores (a FAST one-round iterate: 13.6 s with 1
# thread, 15.2 s with 2), the loader worker keeps the other core, and a test comparing a killed command-line
# run's files with an in-process run's compares the same arithmetic (the thread count changes the bits).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# The multi-process tests are CPU (gloo) tests of the distributed logic: NCCL cannot put two ranks on one
# GPU, so where fewer than 2 GPUs are visible their processes run with the GPUs hidden.
MULTI_PROCESS_ENV = {"CUDA_VISIBLE_DEVICES": ""} if torch.cuda.device_count() < 2 else {}
# PYTHONPATH for a helper script of tests/ run as a process of its own, keeping what the caller had there
TESTS_ON_PATH = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


def free_port() -> int:
    """A TCP port nobody listens on now, for a launcher's rendezvous (tests never share one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(processes: int = 2) -> list[str]:
    """`accelerate launch` for N CPU processes on this machine, on a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


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


class WarmInterpreter:
    """tests/warm_cli.py, started once per test session: `python -m noisystudent ARGS` in a forked child of an
    interpreter that already imported torch, timm and the stages (its docstring says why and what is shared)."""

    def __init__(self):
        self.proc, self.pending = None, b""

    def _line(self, timeout: float | None) -> str | None:
        """The next line warm_cli.py answers, or None when none came within `timeout` seconds."""
        import select

        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            if not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 4096)
            assert chunk, f"tests/warm_cli.py ended ({self.proc.wait()})"
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def run(self, args, cwd, env, timeout) -> subprocess.CompletedProcess:
        import json
        import tempfile

        if self.proc is None or self.proc.poll() is not None:
            self.proc, self.pending = subprocess.Popen([sys.executable, str(Path(__file__).parent / "warm_cli.py")],
                                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                                       env=env), b""
            assert self._line(120) == "ready", "tests/warm_cli.py did not start"
        cmd = ["python", "-m", "noisystudent", *args]
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"argv": list(args), "cwd": str(cwd or os.getcwd()), "env": env, "stdout": str(out),
                       "stderr": str(err)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = int(self._line(60).split()[1])  # "pid N"
            ended = self._line(timeout)  # "exit CODE"
            if ended is None:
                os.killpg(pid, signal.SIGKILL)
                self._line(60)
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(cmd, int(ended.split()[1]), out.read_text(), err.read_text())

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


WARM = WarmInterpreter()
# Where a GPU is visible, the commands start fresh interpreters: an import in the warm one that asked the CUDA
# driver anything would leave its forked children unable to use the GPU.
WARM_CUDA_UNSAFE = torch.cuda.is_available()


@pytest.fixture(scope="session", autouse=True)
def _close_warm_interpreter():
    yield
    WARM.close()


def cli(*args: str, cwd=None, check=False, timeout=600, launcher=None) -> subprocess.CompletedProcess:
    """Run the command line (python -m noisystudent ...) in a warm interpreter (WarmInterpreter), or as fresh
    processes under a launcher (accelerate launch ...)."""
    env = launch_env() if launcher else {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if launcher or WARM_CUDA_UNSAFE:
        cmd = (launcher or [sys.executable]) + ["-m", "noisystudent", *args]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    else:
        proc = WARM.run(args, cwd, env, timeout)
        cmd = proc.args
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


# JPEG shards for the decode tests (pseudolabel.decode=gpu, data.loader=dali): the digits as photos
KINDS = {"cmyk": 7, "png": 11, "corrupt": 29}  # every n-th image is one of these; the others RGB or gray JPEGs


def _encode_image(img: Image.Image, kind: str) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if kind == "png":
        img.save(buf, format="PNG")
        return "png", buf.getvalue()
    if kind == "cmyk":
        img.convert("CMYK").save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    if kind == "corrupt":  # a valid header, then the scan cut off: no decoder can read it
        data = data[: len(data) // 2]
    return "jpg", data


def jpeg_kind(i: int) -> str:
    for kind, every in KINDS.items():
        if i % every == every - 1:
            return kind
    return "gray" if i % 5 == 0 else "rgb"


@pytest.fixture(scope="session")
def jpeg_shards(tmp_path_factory):
    """The digits as photos of varied sizes (24-120 px, some wider than tall), mostly JPEG, in 3 shards."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:480]
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("jpegs")
    for s in range(3):
        samples = []
        for i in range(s * 160, (s + 1) * 160):
            h = int(rng.integers(24, 121))
            w = int(h * rng.uniform(0.7, 1.4))
            gray = Image.fromarray((digits[i] * 255 / 16).astype(np.uint8)).resize((w, h), Image.BICUBIC)
            tint = rng.uniform(0.6, 1.0, 3)
            img = gray if jpeg_kind(i) == "gray" else Image.fromarray(
                (np.asarray(gray, np.float32)[..., None] * tint).astype(np.uint8))
            ext, data = _encode_image(img, jpeg_kind(i))
            samples.append({"__key__": f"img{i:04d}", ext: data})
        write_shard(d / f"u-{s:06d}.tar", samples)
    return d


@pytest.fixture(scope="session")
def good_teacher(tmp_path_factory, digits_root):
    """A teacher as sure of itself as a real one (the demo's 60 epochs, 420 steps): near-ties, which any change
    of pixels flips, are then as rare as in real labeling. Shared by the decode tests of both paths."""
    d = tmp_path_factory.mktemp("good_teacher")
    run("stage=teacher", f"run_dir={d}", f"data.root={digits_root}", *FAST, "train.epochs=60")
    return d
