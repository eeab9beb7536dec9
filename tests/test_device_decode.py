"""pseudolabel.decode=gpu, run with the CPU as the device: raw JPEG bytes from the workers, batched decoding
and the resize + crop on the device, per-image fallback to the CPU path, against today's PIL path."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from conftest import FAST, jpeg_kind, run

from noisystudent.data import device_decode
from noisystudent.data.device_decode import DeviceJpegDecoder, RawJpegDecoder, collate_raw
from noisystudent.data.labels import LabelFile
from noisystudent.data.shards import SampleDecoder
from noisystudent.data.transforms import eval_resize_crop, eval_transform


def _label(teacher_run, tmp_path, shards, name, *extra):
    d = tmp_path / name
    shutil.copytree(teacher_run, d)
    s = run("stage=pseudolabel", f"run_dir={d}", *FAST, f"data.unlabeled='{shards}/u-{{000000..000002}}.tar'",
            "pseudolabel.batch_size=32", *extra)
    files = {p.name: LabelFile(p) for p in sorted((d / "round_1/pseudolabel/labels").glob("*.safetensors"))}
    return s, files


def test_gpu_decode_labels_as_the_cpu_path_does(good_teacher, digits_root, jpeg_shards, tmp_path):
    args = (f"data.root={digits_root}",)
    # PIL decoding every image in full (also where the gpu path falls back to it): the default draft
    # decoding of large JPEGs is a CPU shortcut of its own (it moves 2% of these labels), not what the
    # GPU path is measured against
    args = (*args, "pseudolabel.jpeg_draft=false")
    cpu, cpu_files = _label(good_teacher, tmp_path, jpeg_shards, "cpu", *args, "pseudolabel.decode=cpu")
    gpu, gpu_files = _label(good_teacher, tmp_path, jpeg_shards, "gpu", *args, "pseudolabel.decode=gpu")
    n = 480
    n_corrupt = sum(jpeg_kind(i) == "corrupt" for i in range(n))
    n_fallback = sum(jpeg_kind(i) in ("cmyk", "png") for i in range(n))
    assert gpu["inference"]["decode"] == {"where": "gpu", "decoder": "torchcodec", "device_decoded":
                                          n - n_corrupt - n_fallback, "cpu_fallback": n_fallback}
    assert cpu["inference"]["decode"] == {"where": "cpu"}
    assert gpu["images_seen"] == cpu["images_seen"] == n - n_corrupt
    assert gpu["corrupt_skipped"] == cpu["corrupt_skipped"] == n_corrupt
    agree, diffs = 0, []
    for name, f in cpu_files.items():
        g = gpu_files[name]
        assert g.keys() == f.keys() and g.corrupt_keys() == f.corrupt_keys()  # shard order, same images skipped
        agree += int((g["argmax"] == f["argmax"]).sum())
        diffs.append(np.abs(g["confidence"] - f["confidence"]))
    diff = np.concatenate(diffs)
    print(f"top-1 agreement {agree / diff.size:.4f}, mean |top-1 prob diff| {diff.mean():.4f}, max {diff.max():.4f}")
    assert agree / diff.size >= 0.99
    assert diff.mean() < 0.02


def test_device_resize_crop_matches_pil_and_both_decoders_agree(jpeg_shards):
    """The geometry is shared (timm's eval transform on a tensor): per image, the device path's crop is
    the PIL path's within JPEG/bicubic rounding; torchvision's and torchcodec's decoders give the same."""
    import webdataset as wds
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.create({"crop_pct": 0.875})
    transform = eval_transform(32, data_cfg)
    cpu = SampleDecoder(transform, None, labeled=False, fingerprint=True)
    samples = list(wds.WebDataset(str(jpeg_shards / "u-000000.tar"), shardshuffle=False))[:40]
    batch = collate_raw([RawJpegDecoder(cpu)(dict(s)) for s in samples])
    outputs = {}
    for backend in ("torchcodec", "torchvision"):
        decoder = DeviceJpegDecoder("cpu", eval_resize_crop(32, data_cfg), transform)
        decoder.decode = getattr(device_decode, f"{backend}_decoder")()
        outputs[backend] = decoder(batch)
    images, keys, corrupt, fingerprints = outputs["torchcodec"]
    assert torch.equal(images, outputs["torchvision"][0]) and keys == outputs["torchvision"][1]
    assert keys == [s["__key__"] for s in samples if jpeg_kind(int(s["__key__"][3:])) != "corrupt"]
    # corrupt: every cut-off JPEG is found by the worker (no end-of-image marker), never left to a device
    # decoder (nvJPEG decodes a truncated scan without an error, gray where the data ends)
    assert corrupt == outputs["torchvision"][2] == []
    assert batch["corrupt_keys"] == [s["__key__"] for s in samples if jpeg_kind(int(s["__key__"][3:])) == "corrupt"]
    pil = torch.stack([torch.from_numpy(np.array(cpu(dict(s))["image"])).permute(2, 0, 1) for s in samples
                       if s["__key__"] in keys])
    assert images.shape == pil.shape == (len(keys), 3, 32, 32)
    assert (images.float() - pil.float()).abs().mean() < 3.0  # of 255: decoder + bicubic rounding only
    # the fingerprints (copies of eval images): taken on the device from the whole decoded JPEG, as the worker
    # takes them from the PIL image; the PNG and CMYK rows come from the worker itself
    on_cpu = torch.stack([torch.from_numpy(cpu(dict(s))["fingerprint"]) for s in samples if s["__key__"] in keys])
    assert fingerprints.shape == (len(keys), 64) and fingerprints.dtype == torch.uint8
    assert ((fingerprints.float() - on_cpu.float()) ** 2).mean().sqrt() < 1.5  # grey levels, rms


def test_refused_images_fall_back_to_the_cpu_one_by_one(jpeg_shards):
    """A decoder that refuses some images: the batch is split until they are found; they decode on the CPU."""
    import webdataset as wds
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.create({"crop_pct": 0.875})
    transform = eval_transform(32, data_cfg)
    cpu = SampleDecoder(transform, None, labeled=False)
    samples = [s for s in wds.WebDataset(str(jpeg_shards / "u-000001.tar"), shardshuffle=False)
               if jpeg_kind(int(s["__key__"][3:])) in ("rgb", "gray")][:32]
    batch = collate_raw([RawJpegDecoder(cpu)(dict(s)) for s in samples])
    decoder = DeviceJpegDecoder("cpu", eval_resize_crop(32, data_cfg), transform)
    plain, _, _, plain_fps = decoder(batch)
    real, calls = decoder.decode, []

    def refusing(data, device):  # refuses any batch holding the 4th or the 20th image
        calls.append(len(data))
        if any(t.numel() in (batch["jpeg_sizes"][3], batch["jpeg_sizes"][19]) for t in data):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, device)

    decoder.decode = refusing
    decoder.counts = {k: 0 for k in decoder.counts}
    images, keys, corrupt, fps = decoder(batch)
    assert keys == [s["__key__"] for s in samples] and corrupt == [] and fps.shape == (32, 64)
    assert decoder.counts == {"device_decoded": 30, "cpu_fallback": 2, "corrupt": 0}
    assert len(calls) < 32  # halves, not one call per image
    same = [i for i in range(32) if i not in (3, 19)]
    assert torch.equal(images[same], plain[same])
    assert (images[[3, 19]].float() - plain[[3, 19]].float()).abs().mean() < 3.0
    assert torch.equal(fps[same], plain_fps[same])
    assert ((fps[[3, 19]].float() - plain_fps[[3, 19]].float()) ** 2).mean().sqrt() < 1.5


def test_no_decoder_on_the_device_falls_back_to_the_cpu_path(teacher_copy, digits_root, jpeg_shards, monkeypatch,
                                                             caplog):
    """decode=gpu where no JPEG decoder runs on the device: a warning, and the workers decode everything."""
    from noisystudent.pseudolabels import labeling

    monkeypatch.setattr(labeling, "jpeg_decoder", lambda device: None)
    s = run("stage=pseudolabel", f"run_dir={teacher_copy}", f"data.root={digits_root}", *FAST,
            f"data.unlabeled='{jpeg_shards}/u-000000.tar'", "pseudolabel.decode=gpu")
    assert s["inference"]["decode"]["decoder"] == "none: decoded by the CPU path"
    assert s["inference"]["decode"]["device_decoded"] == 0
    assert s["images_seen"] == 160 - sum(jpeg_kind(i) == "corrupt" for i in range(160))
    assert "no nvJPEG" in caplog.text
