"""What only a CUDA device can show; skipped without one. On a GPU machine: `python -m pytest tests/test_gpu.py`.

The CPU tests prove what they can of the GPU path (no reads of device values between log steps, the
device decoder run with the CPU as its device); these check the rest on the real thing: torch's own
sync debug mode finds no host-device synchronization inside a training step, nvJPEG decodes as the
CPU does, the auto settings become bf16 / channels_last / the DALI loader (where installed), and DALI's
GPU pipelines give the samples and labels of the torch path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, TESTS_ON_PATH, cli, free_port

from noisystudent.files import read_json

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_step_never_synchronizes_with_the_host(tmp_path):
    """A process of its own (accelerate's device is fixed once per process): fit on the GPU for 12 steps,
    logging every 5, with torch's sync debug mode on. Allowed: set-up and the end (step 0 and 12), the
    log steps (5, 10), and the one synchronize after step 1 that starts the images/s clock."""
    env = {**os.environ, "PYTHONPATH": TESTS_ON_PATH}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "device_reads.py"), str(tmp_path), "12", "5"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counter = json.loads((tmp_path / "reads-0.json").read_text())
    assert counter["step"] == 12
    allowed = {0, 1, 5, 10, 12}
    assert [s for s in counter["syncs"] if s[0] not in allowed] == []
    assert [r for r in counter["reads"] if r[0] not in allowed - {1}] == []
    assert {s[0] for s in counter["syncs"]} & {5, 10}  # the debug mode does report the log steps' reads


def test_nvjpeg_decodes_as_the_cpu_does():
    import io

    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    from noisystudent.data.device_decode import DeviceJpegDecoder, RawJpegDecoder, collate_raw
    from noisystudent.data.shards import SampleDecoder
    from noisystudent.data.transforms import eval_resize_crop, eval_transform

    rng = np.random.default_rng(0)
    samples = []
    for i in range(24):
        low = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((int(rng.integers(200, 640)), int(rng.integers(150, 480))), Image.BICUBIC)
        if i % 6 == 5:
            img = img.convert("L")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90, progressive=i % 4 == 3)
        data = buf.getvalue()
        samples.append({"__key__": f"k{i}", "jpg": data[: len(data) // 2] if i == 7 else data})
    data_cfg = OmegaConf.create({"crop_pct": 0.875})
    transform = eval_transform(224, data_cfg)
    batch = collate_raw([RawJpegDecoder(SampleDecoder(transform, None, labeled=False))(dict(s)) for s in samples])
    outputs = {}
    for device in ("cuda", "cpu"):
        decoder = DeviceJpegDecoder(torch.device(device), eval_resize_crop(224, data_cfg), transform)
        images, keys, corrupt, _ = decoder(batch)
        outputs[device] = (images.cpu(), keys, corrupt, decoder.counts)
    (gpu, gkeys, gbad, gcounts), (cpu, ckeys, cbad, _) = outputs["cuda"], outputs["cpu"]
    assert batch["corrupt_keys"] == ["k7"]  # cut off: nvJPEG would decode it, the worker keeps it from it
    assert gkeys == ckeys and gbad == cbad == []
    assert gcounts["device_decoded"] == 23 and gcounts["cpu_fallback"] == 0
    assert (gpu.float() - cpu.float()).abs().mean() < 2.0  # nvJPEG's IDCT and upsampling vs libjpeg's


def test_auto_settings_on_cuda(tmp_path, digits_root):
    d = tmp_path / "run"
    cli("stage=teacher", f"run_dir={d}", f"data.root={digits_root}", *FAST, "max_steps=3", check=True)
    s = read_json(d / "teacher" / "summary.json")
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    assert (s["precision"], s["channels_last"]) == ("bf16" if bf16 else "no", True)
    assert s["peak_device_memory_mib"] > 0
    from noisystudent.config import dali_available

    assert s["loader"] == ("dali" if dali_available() else "torch")
    cli("stage=pseudolabel", f"run_dir={d}", f"data.root={digits_root}", *FAST, check=True)
    p = read_json(d / "round_1" / "pseudolabel" / "summary.json")
    # decode=auto is the CPU path (measured faster on an H100); with DALI, DALI decodes on the GPU
    want = {"where": "dali", "decoder": "dali (nvJPEG, mixed)"} if dali_available() else {"where": "cpu"}
    assert p["inference"]["decode"] == want
    cli("stage=pseudolabel", f"run_dir={d}", f"data.root={digits_root}", *FAST, "round=1", "force=true",
        "pseudolabel.decode=gpu", "data.loader=torch", check=True)
    p = read_json(d / "round_1" / "pseudolabel" / "summary.json")
    # the digits are PNGs: on the gpu path, every one is decoded by the workers and counted as such
    assert p["inference"]["decode"]["where"] == "gpu" and p["inference"]["decode"]["cpu_fallback"] == p["images_seen"]


def test_dali_on_the_gpu_reads_what_the_torch_path_reads(tmp_path, jpeg_shards):
    """DALI's mixed decoder and GPU ops: the samples, classes and corrupt keys of the torch path, the images on
    the GPU within a few levels of PIL's, and a seeded training stream that repeats."""
    pytest.importorskip("nvidia.dali")
    import numpy as np
    from test_dali import DATA, _torch_pass, _urls

    from noisystudent.data import dali as D
    from noisystudent.data.dali_index import index_shards
    from noisystudent.data.shards import SampleDecoder
    from noisystudent.data.streams import ShardBatches
    from noisystudent.data.transforms import eval_transform

    urls, dev = _urls(jpeg_shards), torch.device("cuda")
    records = index_shards(tmp_path / "idx", urls, 4)
    found, diffs = {}, []
    ref = {}
    for b in ShardBatches(urls, SampleDecoder(eval_transform(32, DATA), None, labeled=False), 64):
        ref.update(zip(b["keys"], b["images"]))
    for b in D.ordered_batches(urls, records, tmp_path / "idx", D.eval_recipe(32, DATA), 64, 4, dev, False, None):
        keys, _, corrupt = found.setdefault(b["shard"], ([], [], []))
        keys += b["keys"]
        corrupt += b["corrupt_keys"]
        if len(b["keys"]):
            assert b["images"].device.type == "cuda"
            diffs += [(im.cpu().float() - ref[k].float()).abs().mean().item() for k, im in zip(b["keys"], b["images"])]
    want = {u: (k, [], c) for u, (k, _, c) in _torch_pass(urls).items()}
    assert {u: (k, [], c) for u, (k, _, c) in found.items()} == want
    print(f"DALI (GPU) vs PIL: mean abs pixel difference {np.mean(diffs):.3f}, worst image {np.max(diffs):.3f}")
    assert np.mean(diffs) < 1.0
    make = D.training_batches(urls, records, tmp_path / "idx", D.train_recipe(32, DATA, "rand-n2-m9-mmax27"), 32,
                              100, 4, dev, 0, 1, False, None)
    a, b = next(make(1)), next(make(1))
    assert a["images"].device.type == "cuda" and torch.equal(a["images"], b["images"])


def test_more_processes_than_gpus_is_one_clear_error(tmp_path, digits_root):
    """NCCL cannot put two ranks on one GPU and says so only at the first collective ("Duplicate GPU
    detected"): a launch of one process more than the visible GPUs stops at once with what to change."""
    n = torch.cuda.device_count() + 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(free_port()),
           "-m", "noisystudent", "stage=teacher", f"run_dir={tmp_path / 'run'}", f"data.root={digits_root}", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"{n} processes were launched on this node (LOCAL_WORLD_SIZE)" in out and "--nproc_per_node" in out
    assert not (tmp_path / "run" / "teacher" / "summary.json").exists()
