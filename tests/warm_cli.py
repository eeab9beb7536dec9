"""A warm interpreter for the tests' command-line runs (conftest.cli): it imports torch, timm and every stage
once, then forks one child per command, which runs `python -m noisystudent ARGS` as the interpreter would
(runpy, sys.argv, exit code, exit handlers) with its stdout and stderr in files.

Why: starting Python and importing torch + timm takes about 4 s on 2 cores, longer than most of the commands
the tests run (a config error, a 3-step teacher). Only the interpreter's start is shared; everything the
command does (Hydra's composition, the Accelerator, CUDA, loader workers) happens in the child, which nothing
ran before it. The launcher tests (accelerate launch, torchrun, the kill tests) still start fresh processes.

Protocol, one command at a time: a JSON line {argv, cwd, env, stdout, stderr} on stdin; the answer is
`pid N` when the child started, then `exit CODE` when it ended."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import sys
import traceback


def preload() -> None:
    import accelerate  # noqa: F401
    import hydra  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401
    import webdataset  # noqa: F401

    from noisystudent.stages import MODULES

    for module in MODULES.values():
        importlib.import_module(f"noisystudent.stages.{module}")


def child(request: dict) -> None:
    """In the forked child: become the command, never return."""
    code = 1
    try:
        os.setpgrp()  # a timeout kills the command with its loader workers, not the warm interpreter
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["noisystudent", *request["argv"]]
        try:
            runpy.run_module("noisystudent", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()  # what the interpreter runs at exit (multiprocessing's, logging's)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed stream: nothing left to say
                stream.flush()
        os._exit(code)


def main() -> None:
    preload()
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
