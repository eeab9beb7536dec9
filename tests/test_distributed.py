"""Several processes on the CPU (gloo): accelerate launch and torchrun, as on a cluster."""

from __future__ import annotations

import shutil
import sys

import pytest
from conftest import FAST, accelerate_launch, cli, free_port, launch_env, run

from noisystudent.files import read_json

pytestmark = pytest.mark.slow  # every test here launches several processes


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]



def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, digits_root):
    """teacher -> pseudolabel -> student, every stage with 2 processes: one launch of stage=iterate (each stage
    launched alone on 2 processes: the resume, torchrun and DALI tests here and in test_dali.py)."""
    d = tmp_path_factory.mktemp("ddp") / "run"
    # a 14-step teacher is unsure: a low threshold keeps a selection to train the student on
    _ok(cli("stage=iterate", "iterate.rounds=1", f"run_dir={d}", f"data.root={digits_root}", *FAST, "max_steps=14",
            "pseudolabel.threshold=0.12", launcher=accelerate_launch()))
    return d


def test_two_process_teacher_and_student(two_process_run):
    for step in ("teacher", "round_1/student"):
        s = read_json(two_process_run / step / "summary.json")
        assert s["processes"] == 2
        assert s["global_batch"] == 2 * 16  # per-device batch x processes, logged and recorded
        assert s["replicas_in_sync"] is True  # DDP kept the two replicas bit-identical
        assert s["eval"]["images"] == 539  # each eval image once across the 2 processes
        assert s["steps"] == 14
        assert s["images_seen"] >= 14 * 32
    pl = read_json(two_process_run / "round_1/pseudolabel/summary.json")
    assert pl["images_seen"] == 1158 and pl["shards_labeled"] == 4
    # only the main process wrote: one file per name, no per-rank Hydra output directories
    assert not list(two_process_run.parent.rglob(".hydra")) and not (two_process_run / "outputs").exists()


def test_two_process_resume_continues_at_saved_step(two_process_run, digits_root, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(two_process_run, d)
    (d / "teacher" / "_SUCCESS").unlink()  # as if killed after its last checkpoint (step 14)
    _ok(cli("stage=teacher", f"run_dir={d}", f"data.root={digits_root}", *FAST, "max_steps=20",
            launcher=accelerate_launch()))
    s = read_json(d / "teacher" / "summary.json")
    assert s["resumed_from_step"] == 14 and s["steps"] == 20 and s["replicas_in_sync"]


def test_torchrun_and_fewer_eval_shards_than_processes(two_process_run, digits_root, tmp_path):
    """evaluate under torchrun with 1 eval shard for 2 processes: no hang, every image once."""
    one_shard = f"data.eval='{digits_root}/eval-000000.tar'"
    proc = _ok(cli("stage=evaluate", f"run_dir={two_process_run}", f"data.root={digits_root}", one_shard,
                   "num_workers=2", launcher=torchrun(), timeout=300))
    report = read_json(two_process_run / "report.json")
    single = run("stage=evaluate", f"run_dir={two_process_run}", f"data.root={digits_root}", one_shard)
    assert [r["eval_images"] for r in report["rounds"]] == [270, 270]
    assert [r["top1"] for r in report["rounds"]] == [r["top1"] for r in single["rounds"]]
    assert "Traceback" not in proc.stderr


def test_two_process_robustness_counts_each_image_once_and_matches_one_process(two_process_run, digits_root,
                                                                              tmp_path):
    """Corrupted and perturbed views on 2 processes x 2 workers: the first 300 images (270 of shard 0, 30 of
    shard 1, read by different processes), each once, every view the same pixels as on 1 process."""
    from test_robustness import SMALL

    d = tmp_path / "run"
    shutil.copytree(two_process_run, d)
    args = ("stage=evaluate", f"run_dir={d}", f"data.root={digits_root}", *FAST, *SMALL, "num_workers=2",
            "eval.corruption_images=300")
    _ok(cli(*args, launcher=accelerate_launch(), timeout=300))
    two = read_json(d / "report.json")["rounds"]
    one = run(*args)["rounds"]
    assert [r["role"] for r in two] == ["teacher", "student"]
    for a, b in zip(two, one, strict=True):
        ra, rb = a["robustness"], b["robustness"]
        assert ra["images"] == 300 and ra["perturbations"]["brightness"]["pairs"] == 300 * 9
        for key in ("clean", "corrupted", "corruptions", "perturbations", "plan"):
            assert ra[key] == rb[key], key
    teacher, student = (r["robustness"] for r in two)
    assert two[0]["robustness_summary"]["mce"] == pytest.approx(100)
    # the student's mCE, as defined: per corruption, summed errors over the teacher's, then the mean
    ce = [sum(1 - m["top1"] for m in student["corruptions"][c].values())
          / sum(1 - m["top1"] for m in teacher["corruptions"][c].values()) for c in teacher["corruptions"]]
    assert two[1]["robustness_summary"]["mce"] == pytest.approx(100 * sum(ce) / len(ce))


def test_fewer_unlabeled_shards_than_processes(two_process_run, digits_root, tmp_path):
    """1 shard for 2 processes (x 2 workers): the idle process waits, nothing hangs, one label file."""
    d = tmp_path / "run"
    shutil.copytree(two_process_run, d, ignore=shutil.ignore_patterns("round_1"))
    _ok(cli("stage=pseudolabel", f"run_dir={d}", f"data.root={digits_root}", *FAST, "num_workers=2",
            f"data.unlabeled='{digits_root}/unlabeled-000002.tar'", launcher=torchrun(), timeout=300))
    s = read_json(d / "round_1/pseudolabel/summary.json")
    assert s["processes"] == 2 and s["shards_labeled"] == 1 and s["images_seen"] == 289


def test_two_nodes_one_process_each(digits_root, tmp_path):
    """The multi-node path: two launchers (one per 'node', here both on localhost) rendezvous with
    --nnodes 2 --node_rank i, as pipelines/slurm/stage.sbatch does with srun on real nodes."""
    import subprocess

    args = ["-m", "noisystudent", "stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST,
            "max_steps=6", "num_workers=0"]
    env, port = launch_env(), str(free_port())  # one rendezvous port for both nodes
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(i),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    s = read_json(tmp_path / "teacher" / "summary.json")
    assert s["processes"] == 2 and s["replicas_in_sync"] and s["steps"] == 6 and s["eval"]["images"] == 539


def test_sigterm_stops_both_processes_at_one_log_step(digits_root, tmp_path):
    """SIGTERM to the whole launch (what Slurm's scancel / a time limit sends): the two ranks agree to stop
    at the next log step (train.log_every_steps=5; the agreement reads the device, so only there), save
    one checkpoint at that step and exit; the rerun continues from it."""
    import os
    import signal
    import subprocess
    import time

    from noisystudent.training.engine import CHECKPOINT, load_checkpoint

    args = ["-m", "noisystudent", "stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST,
            "train.batch_size=4", "train.epochs=40", "train.ckpt_every_steps=100000", "train.log_every_steps=5",
            "num_workers=1"]
    env = launch_env()
    proc = subprocess.Popen([*accelerate_launch(), *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpt = tmp_path / "teacher" / CHECKPOINT
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "no checkpoint in 240 s"
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    stops = [int(part.split()[0]) for part in err.split("stopped by SIGTERM at step ")[1:]]
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]  # both ranks, one step
    # a step where the ranks agree: a log step, or an epoch's end (100 labeled / global batch 8 = 13 steps)
    assert stops[0] % 5 == 0 or stops[0] % 13 == 0
    assert load_checkpoint(ckpt)["step"] == stops[0]
    _ok(cli("stage=teacher", *args[3:], f"max_steps={stops[0] + 2}",
            launcher=accelerate_launch()))
    s = read_json(tmp_path / "teacher" / "summary.json")
    assert s["resumed_from_step"] == stops[0] and s["steps"] == stops[0] + 2 and s["replicas_in_sync"]


def test_hydra_submitit_launcher_runs_a_step_as_two_tasks(digits_root, tmp_path):
    """hydra/launcher=submitit_local is Hydra's submitit launcher (the code path of submitit_slurm, with local
    processes for Slurm's tasks): one job of 2 tasks is one step on 2 processes, as under torchrun."""
    _ok(cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10",
            f"hydra.sweep.dir={tmp_path}/hydra", "stage=teacher", f"run_dir={tmp_path}/run", f"data.root={digits_root}",
            *FAST, "max_steps=4", timeout=300))
    s = read_json(tmp_path / "run/teacher/summary.json")
    assert s["processes"] == 2 and s["replicas_in_sync"] and s["steps"] == 4 and s["eval"]["images"] == 539
    assert len(list((tmp_path / "hydra/.submitit").glob("*/*_log.out"))) == 2  # one log per task
