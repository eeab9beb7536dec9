"""The loop users launch on a multi-GPU node, as a whole: `stage=iterate` under `accelerate launch` with
2 processes (gloo on CPU) on webdataset shards the test writes; a rerun, a SIGKILL of the whole launch,
a forced step. And errors that must end every process promptly instead of hanging."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import accelerate_launch, launch_env
from PIL import Image

from noisystudent.data.labels import LabelFile
from noisystudent.data.writer import write_shard
from noisystudent.files import read_json

CLASSES = 4
PALETTE = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40]], dtype=np.float32)

pytestmark = pytest.mark.slow  # every test here launches several processes


def _jpeg(cls: int, rng: np.random.Generator) -> bytes:
    """A 24x24 JPEG of class `cls`: the class colour in a random square on a noisy grey background."""
    img = rng.normal(128, 30, (24, 24, 3))
    x, y = rng.integers(0, 10, 2)
    img[y:y + 14, x:x + 14] = PALETTE[cls] + rng.normal(0, 25, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(path, n: int, seed: int, labeled: bool) -> None:
    rng = np.random.default_rng(seed)

    def samples():
        for i in range(n):
            c = i % CLASSES
            label = {"cls": str(c).encode()} if labeled else {}
            yield {"__key__": f"{path.stem}-{i:04d}", "jpg": _jpeg(c, rng), **label}

    write_shard(path, samples())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    _write(d / "L-000000.tar", 64, 0, labeled=True)
    _write(d / "E-000000.tar", 64, 1, labeled=True)
    _write(d / "A-000000.tar", 32, 2, labeled=True)  # the audit shards: labeled, never trained on
    _write(d / "V-000000.tar", 32, 3, labeled=True)  # data.val: the held-out reference of the pool estimate
    for i in range(6):  # half of the unlabeled shards keep their class (for the audit)
        _write(d / f"U-{i:06d}.tar", 32, 10 + i, labeled=i % 2 == 0)
    return d


def _loop_args(shards, run_dir, *extra):
    return ["stage=iterate", "iterate.rounds=2", f"run_dir={run_dir}", "data=shards", f"data.num_classes={CLASSES}",
            f"data.labeled={shards}/L-000000.tar", f"data.unlabeled='{shards}/U-{{000000..000005}}.tar'",
            f"data.eval={shards}/E-000000.tar", "data.crop_scale=[0.5,1.0]", "data.crop_pct=1.0", "model=demo",
            "train.batch_size=16", "train.epochs=4", "student.epochs=1", "train.shuffle_buffer=100",
            "pseudolabel.batch_size=4", "pseudolabel.threshold=0.26", "num_workers=1", "eval.batch_size=32",
            # the last round's student fine-tuned for a test at 28 px (the demo preset tests at its 32)
            "finetune.img_size=28",
            # the EMA model evaluated at every epoch end: a collective inside the training loop of 2 processes
            "eval.every_epochs=1",
            # the teacher of each round calibrated on data.val (below) across both processes, its labels audited
            "pseudolabel.calibrate=true", f"data.audit={shards}/A-000000.tar",
            # one more eval set for every model: the audit shards, with a class list (every class, reordered)
            f"+eval.sets.audit.shards={shards}/A-000000.tar", "+eval.sets.audit.classes=[3,1,0,2]",
            # a held-out reference: the pool estimated and the selection corrected for it, filtered, capped
            f"data.val={shards}/V-000000.tar", "pseudolabel.prior_correction=true", "pseudolabel.ood.filter=true",
            "pseudolabel.max_repeat=3", *extra]


def _launch(*args, **popen):
    env = launch_env()
    return subprocess.Popen([*accelerate_launch(), "-m", "noisystudent", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def _ok(proc, timeout=400):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-2000:] + err[-5000:]
    return out, err


def _labels(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.glob("round_*/pseudolabel/labels/*"))}


def _report(run_dir):
    return [{k: v for k, v in row.items() if k != "path"} for row in read_json(run_dir / "report.json")["rounds"]]


def _outputs(run_dir):
    """Every file a step wrote with its mtime: what a no-op rerun must leave untouched."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()
            and p.name not in ("report.json", "report.md", "accuracy.png", "training_curves.png", "reliability.png",
                               "per_class.png")}


@pytest.fixture(scope="module")
def loop_run(shards, tmp_path_factory):
    """An uninterrupted 2-process stage=iterate: teacher + 2 rounds + report."""
    d = tmp_path_factory.mktemp("loop") / "run"
    _ok(_launch(*_loop_args(shards, d)))
    return d


def test_two_process_iterate_on_shards(loop_run):
    for step in ("teacher", "round_1/pseudolabel", "round_1/student", "round_2/pseudolabel", "round_2/student",
                 "round_2/finetune"):
        assert (loop_run / step / "_SUCCESS").exists(), step
        s = read_json(loop_run / step / "summary.json")
        assert s["processes"] == 2
        assert s["settings"] and s["config_hash"]
    for k in (1, 2):
        pl = read_json(loop_run / f"round_{k}/pseudolabel/summary.json")
        assert pl["images_seen"] == 6 * 32 and pl["shards_labeled"] == 6 and pl["images_after_balancing"] > 0
        assert pl["audit"]["unlabeled"]["images"] == 3 * 32 and pl["audit"]["unlabeled"]["images_without_cls"] == 96
        assert pl["audit"]["audit_set"]["images"] == 32
        assert pl["calibration"]["source"] == "data.val" and pl["calibration"]["images"] == 32
        temps = {LabelFile(f).meta["temperature"] for f in (loop_run / f"round_{k}/pseudolabel").rglob("*.safetensors")}
        assert temps == {str(pl["calibration"]["temperature"])}  # one temperature, labels and audit, both processes
        assert pl["pool"]["reference_images"] == 32 and pl["pool"]["method"] == "confusion"
        assert pl["selection"]["prior_correction"] and pl["selection"]["ood"]["filter"]
        assert len(list((loop_run / f"round_{k}/pseudolabel/val").glob("*.safetensors"))) == 1
        assert (loop_run / f"round_{k}/pseudolabel/sheets/classes-1.png").exists()
        st = read_json(loop_run / f"round_{k}/student/summary.json")
        assert st["replicas_in_sync"] is True and st["eval"]["images"] == 64
        assert st["eval_sets"]["audit"]["images"] == 32  # each image once across the 2 processes
    assert [h["epoch"] for h in read_json(loop_run / "teacher/summary.json")["periodic_eval"]] == [1, 2, 3, 4]
    assert all(h["top1"] >= 0 for h in read_json(loop_run / "teacher/summary.json")["periodic_eval"])
    assert read_json(loop_run / "teacher/summary.json")["periodic_eval_set"] == "data.val"  # two processes too
    ft = read_json(loop_run / "round_2/finetune/summary.json")
    assert ft["replicas_in_sync"] is True and ft["img_size"] == 28 and ft["eval"]["images"] == 64
    # 64 labeled images, 2 processes x batch 16: 2 batches on each for the BatchNorm statistics
    assert ft["batchnorm_reestimated"] == {"layers": ft["batchnorm_reestimated"]["layers"], "images": 64,
                                           "batches_per_process": 2}
    assert not (loop_run / "round_1/finetune").exists()  # iterate.finetune=final
    assert [(r["round"], r["role"]) for r in _report(loop_run)] == [(0, "teacher"), (1, "student"), (2, "student"),
                                                                    (2, "finetune")]
    md = (loop_run / "report.md").read_text()
    assert [r["sets"]["audit"]["classes"] for r in _report(loop_run)] == [[3, 1, 0, 2]] * 4
    for part in ("## Eval set: audit", "## Pseudo-labels", "### Round 2", "round_2/pseudolabel/audit.png",
                 "calibration: temperature", "## Per class: round 2 finetune against the teacher", "reliability.png",
                 "round_2/pseudolabel/pool.png", "round_2/pseudolabel/sheets/classes-1.png", "- out of domain: ",
                 "- selection: prior correction, out-of-domain filter, at most 3 repeats"):
        assert part in md, part


def test_rerun_of_a_finished_loop_changes_nothing(loop_run, shards):
    before = _outputs(loop_run)
    out, err = _ok(_launch(*_loop_args(shards, loop_run)))
    assert _outputs(loop_run) == before
    assert "training" not in err and "labeling" not in err
    assert "| 2 | student |" in out and "| 2 | finetune |" in out


def test_sigkill_of_the_launch_in_round_1_then_rerun_equals_uninterrupted(loop_run, shards, tmp_path):
    d = tmp_path / "run"
    proc = _launch(*_loop_args(shards, d))
    labels = d / "round_1" / "pseudolabel" / "labels"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(labels.glob("*.labels.safetensors")):
        time.sleep(0.01)
    # The launcher's process group: the ranks are not in it (torchrun starts each in a session of its own);
    # they must die with their launcher, not run on alone.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    time.sleep(1)
    assert _no_process_left(str(d))
    assert (d / "teacher" / "_SUCCESS").exists()
    assert not (d / "round_1" / "pseudolabel" / "_SUCCESS").exists()
    assert not (d / "round_1" / "student").exists()
    _ok(_launch(*_loop_args(shards, d)))
    assert _labels(d) == _labels(loop_run)
    assert _report(d) == _report(loop_run)


def test_forced_step_on_two_processes(loop_run, shards, tmp_path):
    """force=true: only the main process removes the old outputs; the step is redone to the same files."""
    import shutil

    d = tmp_path / "run"
    shutil.copytree(loop_run, d)
    before = _labels(d)
    args = [a for a in _loop_args(shards, d) if not a.startswith(("stage=", "iterate."))]
    _ok(_launch("stage=pseudolabel", "round=2", "force=true", *args))
    assert _labels(d) == before
    labeled = read_json(d / "round_2/pseudolabel/summary.json")["images_labeled_this_run"]
    assert labeled == 6 * 32 + 32 + 32  # the pool, the audit shard and data.val


def _no_process_left(marker: str) -> bool:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1


def test_loader_worker_error_ends_every_process(shards, tmp_path):
    """A class outside data.num_classes, raised inside a loader worker on both ranks: every process exits
    promptly with the message, none is left waiting for its workers."""
    run_dir = tmp_path / "worker_error_run"
    args = [a for a in _loop_args(shards, run_dir, "num_workers=2")
            if not a.startswith(("stage=", "iterate.", "+eval.sets"))]  # (its class list names class 3: refused first)
    proc = _launch("stage=teacher", *args, "data.num_classes=3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "class 3 is outside [0, 3)" in err
    time.sleep(1)
    assert _no_process_left(str(run_dir))
