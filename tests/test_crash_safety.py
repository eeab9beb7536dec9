"""A kill in the middle of a checkpoint write never leaves a checkpoint that loads but is half-written."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from noisystudent.training.engine import load_checkpoint


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch
        from noisystudent.training.engine import save_checkpoint
        path = __import__("pathlib").Path({str(tmp_path / "checkpoint.pt")!r})
        save_checkpoint(path, {{"step": 100, "w": torch.ones(1000)}})
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"PK\\x03\\x04 half of a zip")  # a partial file under the temporary name ...
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)   # ... and the process dies mid-write
        torch.save = dying_save
        save_checkpoint(path, {{"step": 200, "w": torch.zeros(1000)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    state = load_checkpoint(tmp_path / "checkpoint.pt")  # weights_only=True
    assert state["step"] == 100 and torch.equal(state["w"], torch.ones(1000))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert leftovers == [".checkpoint.pt.tmp"]  # never read; the next save replaces it
    from noisystudent.training.engine import save_checkpoint

    save_checkpoint(tmp_path / "checkpoint.pt", {"step": 300})
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
