"""Files written whole or not at all: every file the pipeline writes goes through `atomic_write`.

The data goes to a temporary file beside the target, is fsync'ed, then renamed over the target: a
kill or a crash at any point leaves the old file or the new one, never a truncated file under the
real name (a half-written checkpoint or label file would otherwise load, or fail, on the rerun)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, shared: bool = False) -> Iterator[IO[bytes]]:
    """`with atomic_write(p) as f: f.write(...)`: p appears, complete, only when the block succeeds.
    shared=True: other processes may write p at the same time (a cache that several runs fill): each writes
    its own temporary file, and the last rename wins whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One fixed temporary name per target where only one process ever writes a given path: what a kill
    # leaves behind is replaced by the next write instead of piling up.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp" if shared else f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, shared: bool = False) -> None:
    with atomic_write(path, shared) as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


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
