"""A plain (non-editable) install finds the packaged configs: python -m noisystudent works anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_non_editable_install_ships_the_configs(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    assert (target / "noisystudent" / "conf" / "config.yaml").exists()
    assert (target / "noisystudent" / "conf" / "model" / "efficientnet_b7.yaml").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-m", "noisystudent", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "pseudolabel" in out and "efficientnet_l2" in out
    probe = subprocess.run([sys.executable, "-c", "import noisystudent; print(noisystudent.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert probe.startswith(str(target))


def test_version_is_ours_with_the_stack():
    """--version prints our release (not Hydra's), from the one place it lives, with torch and its CUDA."""
    from importlib import metadata

    import noisystudent

    out = subprocess.run([sys.executable, "-m", "noisystudent", "--version"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == f"noisystudent {noisystudent.__version__}"
    assert metadata.version("noisystudent") == noisystudent.__version__  # pyproject reads it from __init__.py
    assert any(line.startswith("torch ") and "CUDA" in line for line in out)
    assert any(line.startswith("timm ") for line in out) and not any("Hydra" in line for line in out)
