"""data.loader=dali on DALI's CPU operators: the same samples, classes and corrupt counts as the torch path,
exact process splits, seeded repeats, the index pass's reuse, RandAugment's mapping, labeling agreement
with PIL and a teacher trained through it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST, accelerate_launch, cli, jpeg_kind, make_cfg, run

pytest.importorskip("nvidia.dali")

from noisystudent.data import dali as D  # noqa: E402
from noisystudent.data.dali_index import index_shards, load_record, record_path  # noqa: E402
from noisystudent.data.labels import LabelFile  # noqa: E402
from noisystudent.data.shards import SampleDecoder  # noqa: E402
from noisystudent.data.streams import ShardBatches  # noqa: E402
from noisystudent.data.transforms import eval_transform  # noqa: E402
from noisystudent.errors import ConfigError  # noqa: E402
from noisystudent.files import read_json  # noqa: E402

CPU = torch.device("cpu")
N_CORRUPT = sum(jpeg_kind(i) == "corrupt" for i in range(480))  # truncated JPEGs in jpeg_shards
DATA = {"crop_scale": [0.6, 1.0], "crop_pct": 1.0, "hflip": 0.5}


def _urls(folder, prefix="u-"):
    return sorted(str(p) for p in folder.glob(f"{prefix}*.tar"))


def _torch_pass(urls, labeled=False, num_classes=None, audit=False):
    """keys, classes and corrupt keys per shard as the torch path's labeling loader finds them."""
    decoder = SampleDecoder(eval_transform(32, DATA), num_classes, labeled=labeled, audit_classes=audit)
    out = {}
    for b in ShardBatches(urls, decoder, 64):
        keys, labels, corrupt = out.setdefault(b["shard"], ([], [], []))
        keys += b["keys"]
        labels += b["labels"].tolist()
        corrupt += b["corrupt_keys"]
    return out


def _dali_pass(urls, index_dir, labeled=False, num_classes=None, audit=False, batch=64):
    records = index_shards(index_dir, urls, 2)
    out = {}
    for b in D.ordered_batches(urls, records, index_dir, D.eval_recipe(32, DATA), batch, 1, CPU, labeled, num_classes,
                               audit):
        keys, labels, corrupt = out.setdefault(b["shard"], ([], [], []))
        keys += b["keys"]
        labels += b["labels"].tolist()
        corrupt += b["corrupt_keys"]
        assert b["images"].shape[0] == len(b["keys"])
        if len(b["keys"]):
            assert b["images"].dtype == torch.uint8 and tuple(b["images"].shape[1:]) == (3, 32, 32)
    return out


def test_keys_classes_and_corrupt_images_equal_the_torch_path(jpeg_shards, digits_root, tmp_path):
    # JPEGs (RGB, gray, CMYK), PNGs and truncated JPEGs, and the digits' labeled PNG shards with their classes
    urls = _urls(jpeg_shards)
    torch_found, dali_found = _torch_pass(urls), _dali_pass(urls, tmp_path / "idx")
    assert dali_found == torch_found
    assert sum(len(c) for _, _, c in dali_found.values()) == N_CORRUPT
    for part, n in (("labeled", 1), ("eval", 2)):
        lab = _urls(digits_root, f"{part}-")
        assert len(lab) == n
        assert _dali_pass(lab, tmp_path / "idx", True, 10, batch=37) == _torch_pass(lab, True, 10)
    # unlabeled shards carrying their class for the audit: -1 without audit_classes, the class with it
    unl = _urls(digits_root, "unlabeled-")[:1]
    assert _dali_pass(unl, tmp_path / "idx", audit=True, num_classes=10) == _torch_pass(unl, audit=True,
                                                                                        num_classes=10)
    assert set(_dali_pass(unl, tmp_path / "idx")[unl[0]][1]) == {-1}


def test_index_pass_is_reused_until_the_shard_changes(jpeg_shards, tmp_path):
    src = _urls(jpeg_shards)[0]
    url = str(tmp_path / "s-000000.tar")
    shutil.copy(src, url)
    records = index_shards(tmp_path / "idx", [url])
    rec, path, idx = records[url], record_path(tmp_path / "idx", url), records.index_file(url)
    assert path.exists() and idx.exists() and idx.parent == path.parent
    assert not list(tmp_path.glob("*.idx")) and not list(jpeg_shards.glob("*.idx"))  # never beside the shards
    lines = idx.read_text().splitlines()
    assert lines[0] == f"v1.2 {len(rec)}" and len(lines) == len(rec) + 1  # DALI's format: the good images only
    made = path.stat().st_mtime_ns
    assert index_shards(tmp_path / "idx", [url])[url].keys == rec.keys and path.stat().st_mtime_ns == made
    with open(url, "ab") as f:  # the shard changed: its record is made again
        f.write(b"\0" * 1024)
    assert load_record(tmp_path / "idx", url) is None
    index_shards(tmp_path / "idx", [url])
    assert path.stat().st_mtime_ns != made


def test_processes_split_the_samples_exactly_once(jpeg_shards, tmp_path):
    urls = _urls(jpeg_shards)
    records = index_shards(tmp_path / "idx", urls)
    everything = [(u, k) for u in urls for k in records[u].keys]
    # ordered passes (evaluation, labeling): each process its whole shards, rank_shards' rule
    seen = []
    for rank in range(2):
        found = _dali_pass(urls[rank::2], tmp_path / "idx")
        seen += [(u, k) for u, (keys, _, _) in found.items() for k in keys]
    assert sorted(seen) == sorted(everything)
    # training with fewer shards than processes (3 shards, 4 processes): DALI splits the samples; one epoch of
    # every process together reads each sample once
    assert D.rank_split(urls, 1, 2) == (urls[1::2], 0, 1)
    reads = []
    for rank in range(4):
        mine, shard_id, num_shards = D.rank_split(urls, rank, 4)
        assert (mine, shard_id, num_shards) == (urls, rank, 4)
        pipe = D.build_pipeline(mine, [str(records.index_file(u)) for u in mine], D.eval_recipe(32, DATA),
                                16, 1, None, 0, shuffle=False, shard_id=shard_id, num_shards=num_shards)
        runner = D.PipelineRunner(pipe, mine, CPU)
        n = pipe.reader_meta("reader")["epoch_size_padded"] // num_shards
        share = [w for _ in range(-(-n // 16)) for w in next(runner)[1]]
        reads += sorted(set(share))
    table = D.SampleTable.read(records, urls, None, False)  # one shard's record at a time
    assert table.labels.tolist() == [-1] * len(everything)
    assert sorted(table.rows(reads).tolist()) == list(range(len(everything)))


def test_seeded_training_stream_repeats_bit_for_bit(jpeg_shards, tmp_path):
    urls = _urls(jpeg_shards)
    records = index_shards(tmp_path / "idx", urls)
    recipe = D.train_recipe(32, DATA, "rand-n2-m9-mmax27")

    def batches(seed, n=4):
        make = D.training_batches(urls, records, tmp_path / "idx", recipe, 16, 100, 2, CPU, 0, 1, False, None)
        it = make(seed)
        return [next(it) for _ in range(n)]

    a, b, c = batches(3), batches(3), batches(4)
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["images"], y["images"]) for x, y in zip(a, c, strict=True))
    # DALI batches hold only images that decode; the step's summary counts what the index pass dropped, once
    assert all(x["n_corrupt"] == 0 for x in a)
    found = D.index_summary(records, urls)
    assert D.summary_counts(found, found)["corrupt_skipped"] == 2 * N_CORRUPT == 2 * found["corrupt"]
    assert len(found["corrupt_keys"]) == min(20, N_CORRUPT) and "truncated" in found["first_error"].lower()
    assert a[0]["images"].shape == (16, 3, 32, 32) and a[0]["images"].is_contiguous(memory_format=torch.channels_last)


def test_randaugment_maps_timm_parameters_exactly():
    from timm.data.auto_augment import _HPARAMS_DEFAULT, _RAND_TRANSFORMS, LEVEL_TO_ARG

    hp = {**_HPARAMS_DEFAULT, "translate_pct": 0.45}
    names = {"Rotate": "rotate", "Posterize": "posterize", "Solarize": "solarize", "SolarizeAdd": "solarize_add",
             "Color": "color", "Contrast": "contrast", "Brightness": "brightness", "Sharpness": "sharpness",
             "ShearX": "shear_x", "ShearY": "shear_y", "TranslateXRel": "translate_x", "TranslateYRel": "translate_y"}
    for spec in ("rand-n2-m9-mmax27", "rand-n2-m27-mmax27", "rand-m5-n1", "rand-m15"):
        ra = D.parse_randaugment(spec)
        ops = {op.name: op for op in D.randaugment_ops(ra, 224)}
        assert len(ops) == len(_RAND_TRANSFORMS) + 1 and "identity" in ops  # timm's 15 + the skipped layer
        for timm_name, name in names.items():
            (want,) = LEVEL_TO_ARG[timm_name](ra.m, hp)
            op = ops[name]
            got = op.mag_range[1]
            if timm_name == "Posterize":  # DALI takes the bit mask: keep `want` bits
                assert int(op.mag_to_param(got)) == (0xFF if want >= 8 else (0xFF << (8 - want)) & 0xFF)
                continue
            if name.startswith("translate"):
                got /= 224  # DALI's offset is in pixels, timm's a fraction of the image
            elif timm_name == "Sharpness":
                got = float(op.mag_to_param(got)[1, 1] - 0)  # the kernel's centre: f * 1 + (1 - f) * 5 / 13
                want = want + (1 - want) * 5 / 13
            assert got == pytest.approx(abs(want), rel=1e-6), (spec, timm_name)
            assert op.randomly_negate == (timm_name in ("Rotate", "ShearX", "ShearY", "TranslateXRel",
                                                        "TranslateYRel")), timm_name
    assert D.parse_randaugment("rand-m30") == D.RandAugmentSpec(2, 10.0, 0.5)  # clipped to mmax 10, as timm does
    with pytest.raises(ConfigError, match="inc1"):
        D.parse_randaugment("rand-m9-inc1")


def test_loader_setting(monkeypatch):
    from noisystudent import config

    assert config.resolve_loader("auto", "cpu") == "torch"
    assert config.resolve_loader("dali", "cpu") == "dali"
    with pytest.raises(ConfigError, match="data.loader='pil'"):
        config.resolve_loader("pil", "cpu")
    monkeypatch.setattr(config, "dali_available", lambda: False)
    assert config.resolve_loader("auto", "cuda") == "torch"
    with pytest.raises(ConfigError, match=r"noisystudent\[dali\]"):
        config.resolve_loader("dali", "cpu")
    assert make_cfg().data.loader == "auto"


def test_a_failure_inside_dali_names_the_shard(jpeg_shards, tmp_path):
    """An image DALI cannot decode after the index pass (here: overwritten since, keeping the shard's size and
    mtime) stops the job and names the shard. In its own process: DALI 2.4's CPU operators may end the process
    with a segfault instead of raising, and the log line said before the pipeline runs names the shard then."""
    url = str(tmp_path / "s-000000.tar")
    shutil.copy(_urls(jpeg_shards)[0], url)
    records = index_shards(tmp_path / "idx", [url])
    rec = records[url]
    st = os.stat(url)
    with open(url, "r+b") as f:
        f.seek(rec.offsets[0])
        f.write(b"\0" * rec.sizes[0])
    os.utime(url, ns=(st.st_atime_ns, st.st_mtime_ns))
    code = (
        "import logging, sys, torch\n"
        "from pathlib import Path\n"
        "from noisystudent.data import dali as D\n"
        "from noisystudent.data.dali_index import index_shards\n"
        "from noisystudent.errors import DataError\n"
        "logging.basicConfig(level=logging.INFO)\n"
        f"url, idx = {url!r}, Path({str(tmp_path / 'idx')!r})\n"
        "recs = index_shards(idx, [url])\n"
        "try:\n"
        "    list(D.ordered_batches([url], recs, idx, D.eval_recipe(32, {'crop_pct': 1.0}), 64, 1,\n"
        "                           torch.device('cpu'), False, None))\n"
        "except DataError as e:\n"
        "    print('DataError:', e, file=sys.stderr)\n"
        "    sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "s-000000.tar" in proc.stderr
    if proc.returncode == 2:  # raised: the error itself names the shard and says what to do
        assert "DataError: DALI failed reading shard(s)" in proc.stderr and "data.loader=torch" in proc.stderr


def test_labels_agree_with_the_pil_path(good_teacher, digits_root, jpeg_shards, tmp_path):
    shards = f"data.unlabeled='{jpeg_shards}/u-{{000000..000002}}.tar'"
    files, cache = {}, tmp_path / "index_cache"
    for loader in ("torch", "dali"):
        d = tmp_path / loader
        shutil.copytree(good_teacher, d)
        s = run("stage=pseudolabel", f"run_dir={d}", f"data.root={digits_root}", *FAST, shards,
                "pseudolabel.batch_size=32", f"data.loader={loader}", "pseudolabel.jpeg_draft=false",
                f"data.index_cache={cache}")
        assert s["settings"]["data.loader"] == loader
        files[loader] = {p.name: LabelFile(p) for p in sorted((d / "round_1/pseudolabel/labels").glob("*.safetensors"))}
    assert s["inference"]["decode"] == {"where": "dali", "decoder": "dali (CPU operators)"}
    # data.index_cache: the records of every shard the step read live in the shared folder, none in the run dir
    assert len(list(cache.glob("u-*.rec"))) == 3 and not (tmp_path / "dali" / "dali_index").exists()
    agree = total = 0
    for name, ref in files["torch"].items():
        got = files["dali"][name]
        assert got.keys() == ref.keys() and got.corrupt_keys() == ref.corrupt_keys()
        agree += int((got["argmax"] == ref["argmax"]).sum())
        total += len(ref.keys())
    print(f"DALI vs PIL top-1 agreement: {agree}/{total} = {agree / total:.4f}")
    assert agree / total >= 0.99


@pytest.mark.slow
def test_teacher_and_student_trained_through_dali(good_teacher, digits_root, tmp_path):
    """The demo's teacher trained through DALI for the 420 steps good_teacher trained through the torch path
    (same data, model and seed), then pseudo-labels and a student through DALI on 2 processes."""
    ref = read_json(good_teacher / "teacher" / "summary.json")
    d = tmp_path / "run"
    s = run("stage=teacher", f"run_dir={d}", f"data.root={digits_root}", *FAST, "train.epochs=60", "data.loader=dali")
    assert (s["loader"], ref["loader"]) == ("dali", "torch") and s["steps"] == ref["steps"] == 420
    print(f"teacher top-1 after 420 steps: torch {ref['top1']:.4f}, dali {s['top1']:.4f}")
    # within the demo's seed-to-seed spread of the teacher (87.0-93.0% over 3 seeds, docs/results.md)
    assert abs(s["top1"] - ref["top1"]) < 0.06
    assert s["dali_index"]["indexed"] == 100 and s["corrupt_skipped"] == 0
    common = [f"run_dir={d}", f"data.root={digits_root}", *FAST, "data.loader=dali", "max_steps=12"]
    for stage in ("pseudolabel", "student"):
        proc = cli(f"stage={stage}", *common, launcher=accelerate_launch())
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    pl = read_json(d / "round_1/pseudolabel/summary.json")
    assert pl["images_seen"] == 1158 and pl["shards_labeled"] == 4 and pl["inference"]["loader"] == "dali"
    st = read_json(d / "round_1/student/summary.json")
    assert st["loader"] == "dali" and st["processes"] == 2 and st["replicas_in_sync"]
    assert st["eval"]["images"] == 539  # each eval image once across the 2 processes
    assert st["steps"] == 12 and st["images_seen"] == 12 * 2 * 32  # labeled + pseudo-labeled rows, every step
    # each process listed its own shards' selected images, each as often as the selection repeats it
    listed = sum(int(p.read_text().split()[1]) for p in (d / "round_1/student/dali_index").rglob("*.idx"))
    assert listed == sum(read_json(d / "round_1/pseudolabel/selection.json")["counts_after"])


def test_fingerprints_equal_the_torch_paths(jpeg_shards, tmp_path):
    """The labeling step's fingerprints (copies of eval images, data/fingerprints.py) come out of DALI's pipeline as
    the loader workers take them with PIL, within rounding of the two resize filters."""
    from noisystudent.data.shards import SampleDecoder

    urls = _urls(jpeg_shards)[:1]
    records = index_shards(tmp_path / "idx", urls, 2)
    got = {}
    for b in D.ordered_batches(urls, records, tmp_path / "idx", D.eval_recipe(32, DATA), 16, 1, CPU, False, None,
                               fingerprints=True):
        assert b["fingerprints"].shape == (len(b["keys"]), 64) and b["fingerprints"].dtype == torch.uint8
        got.update(zip(b["keys"], b["fingerprints"].float()))
    decoder = SampleDecoder(lambda img: np.zeros((1, 1, 3), np.uint8), None, labeled=False, fingerprint=True)
    want = {}
    for b in ShardBatches(urls, decoder, 64):
        want.update(zip(b["keys"], b["fingerprints"].float()))
    assert sorted(got) == sorted(want) and len(got) > 20
    rms = torch.stack([((got[k] - want[k]) ** 2).mean().sqrt() for k in got])
    assert rms.max() < 2.0, rms.max()  # grey levels; a thumbnail of another image is tens of levels away
