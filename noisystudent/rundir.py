"""The run directory: fixed paths per step, `summary.json` + `_SUCCESS` markers, atomic writes.

Layout (everything under run_dir, no timestamps, so stages find each other by convention):
    teacher/                    checkpoint/, model.safetensors, model.json, summary.json, _SUCCESS
    round_K/pseudolabel/        labels/<shard>.npz, selection.json, summary.json, plots, _SUCCESS
    round_K/student/            like teacher/
    report.json, report.md, accuracy.png
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"
_UMASK = os.umask(0)
os.umask(_UMASK)
SUMMARY = "summary.json"


def teacher_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "teacher"


def round_dir(run_dir: str | os.PathLike, round_idx: int) -> Path:
    return Path(run_dir) / f"round_{int(round_idx)}"


def pseudolabel_dir(run_dir: str | os.PathLike, round_idx: int) -> Path:
    return round_dir(run_dir, round_idx) / "pseudolabel"


def student_dir(run_dir: str | os.PathLike, round_idx: int) -> Path:
    return round_dir(run_dir, round_idx) / "student"


def model_dir_for_round(run_dir: str | os.PathLike, round_idx: int) -> Path:
    """The model that finished round `round_idx` (round 0 is the teacher)."""
    return teacher_dir(run_dir) if int(round_idx) == 0 else student_dir(run_dir, round_idx)


def command_for_round(run_dir: str | os.PathLike, round_idx: int) -> str:
    """The command that makes the model finishing round `round_idx` (for error messages)."""
    if int(round_idx) == 0:
        return f"python -m noisystudent stage=teacher run_dir={run_dir}"
    return f"python -m noisystudent stage=student run_dir={run_dir} round={int(round_idx)}"


def is_done(step_dir: str | os.PathLike) -> bool:
    return (Path(step_dir) / SUCCESS).exists()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A crash leaves either the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def mark_done(step_dir: str | os.PathLike, summary: dict) -> None:
    """summary.json first, then the _SUCCESS marker: a step with a marker always has its summary."""
    step_dir = Path(step_dir)
    write_json(step_dir / SUMMARY, summary)
    atomic_write_bytes(step_dir / SUCCESS, b"")


def clear_done(step_dir: str | os.PathLike) -> None:
    marker = Path(step_dir) / SUCCESS
    if marker.exists():
        marker.unlink()
