"""Training batches travel as uint8 and are normalized on the device; loader workers' priority;
the host allocator settings for CPU training."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_cfg
from PIL import Image
from torchvision import transforms as T

from noisystudent.config import worker_nice
from noisystudent.data.shards import SampleDecoder, collate_counting
from noisystudent.data.streams import make_loader
from noisystudent.data.transforms import InputNormalizer, ToHWCArray, eval_transform, stack_hwc, train_transform
from noisystudent.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _jpeg(seed: int, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("channels_last", [True, False])
def test_normalized_batch_equals_totensor_normalize(channels_last):
    """uint8 batch -> InputNormalizer gives the numbers torchvision's ToTensor + Normalize give per image."""
    imgs = [Image.open(io.BytesIO(_jpeg(s))).convert("RGB") for s in range(3)]
    reference = torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(im)) for im in imgs])
    batch = stack_hwc([ToHWCArray()(im) for im in imgs])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 40, 48)
    out = InputNormalizer(MEAN, STD, channels_last)(batch)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        InputNormalizer(MEAN, STD, channels_last)(out)


def test_train_transform_is_noisy_uint8_and_collates_channels_last():
    """The training transform (crop, flip, RandAugment) ends in HWC uint8; each call draws new noise;
    a batch of them is an NCHW uint8 tensor already laid out channels_last; corrupt images are counted."""
    cfg = make_cfg()
    tf = train_transform(32, cfg.data, "rand-n2-m27-mmax27")
    img = Image.open(io.BytesIO(_jpeg(0))).convert("RGB")
    a, b = tf(img), tf(img)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert not np.array_equal(a, b)  # noise on: two draws of the same image differ
    decode = SampleDecoder(tf, 10, labeled=True)
    samples = [decode({"__key__": f"k{i}", "jpg": _jpeg(i), "cls": b"3"}) for i in range(4)]
    samples.append(decode({"__key__": "bad", "jpg": b"not a jpeg", "cls": b"1"}))
    batch = collate_counting(samples)
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["images"].is_contiguous(memory_format=torch.channels_last)
    assert batch["n_corrupt"] == 1 and batch["corrupt_keys"] == ["bad"]
    assert batch["labels"].tolist() == [3, 3, 3, 3]


def test_eval_transform_is_clean_uint8():
    """Labeling and evaluation see the same crop every time (noise off), as uint8 like training."""
    tf = eval_transform(32, make_cfg().data)
    img = Image.open(io.BytesIO(_jpeg(1))).convert("RGB")
    a = tf(img)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, tf(img))


class _NiceProbe(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield os.nice(0)


def test_loader_workers_run_at_lower_priority():
    parent = os.nice(0)
    got = list(make_loader(_NiceProbe(), num_workers=1, worker_nice=7))
    assert got == [min(19, parent + 7)]
    assert list(make_loader(_NiceProbe(), num_workers=1)) == [parent]
    assert os.nice(0) == parent  # the main process keeps its priority


def test_worker_nice_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert worker_nice(make_cfg(), cpu) == 19 and worker_nice(make_cfg(), cuda) == 0
    assert worker_nice(make_cfg("worker_nice=5"), cuda) == 5
    with pytest.raises(ConfigError, match="worker_nice"):
        worker_nice(make_cfg("worker_nice=25"), cpu)


_FAULTS = """
import json, resource, sys
import torch
if sys.argv[1] == "keep":
    from noisystudent.training.host_memory import keep_freed_memory
    assert keep_freed_memory()

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20

def step():  # what a training step does with a big activation: allocate, touch, free
    torch.ones(48 * 2**20 // 4)

for _ in range(15):  # warm-up: the heap settles on the blocks it reuses
    step()
faults, rss = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, rss_mb()
for _ in range(10):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"faults": faults, "rss_growth_mb": rss_mb() - rss}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_stops_page_faults_of_repeated_large_allocations():
    def measure(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    default, kept = measure("default"), measure("keep")
    # 48 MB blocks (above glibc's largest adaptive mmap threshold, like a big activation): by default
    # each is a fresh mmap that faults on every page (~12k faults each); kept, the pages are reused
    assert default["faults"] > 100_000
    assert kept["faults"] < default["faults"] / 20
    assert kept["rss_growth_mb"] < 48  # reused, not piling up
