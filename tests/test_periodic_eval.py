"""eval.every_epochs: the EMA model evaluated during training; eval.keep=best ends the step with the best one."""

from __future__ import annotations

import pytest
from conftest import FAST, run

from noisystudent.errors import ConfigError
from noisystudent.training.tracking import read_metrics

# a learning rate that triples every 2 epochs: the model gets worse before the end, so best != last
UNSTABLE = [*FAST, "train.epochs=8", "eval.every_epochs=1", "train.ema_decay=0.5", "optim.lr=0.01", "sched=step",
            "sched.decay_rate=3.0", "sched.decay_epochs=2", "sched.warmup_epochs=0"]


@pytest.mark.parametrize("keep", ["last", "best"])
def test_periodic_evaluation_and_the_weights_kept(tmp_path, digits_root, keep):
    s = run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *UNSTABLE, f"eval.keep={keep}")
    history = s["periodic_eval"]
    assert [h["epoch"] for h in history] == list(range(1, 9)) and [h["step"] for h in history] == [
        7 * e for e in range(1, 9)]
    best = max(history, key=lambda h: h["top1"])
    assert s["best_epoch"] == best["epoch"] and s["best_top1"] == best["top1"]
    assert best["epoch"] != 8, "the settings no longer make the last epoch worse than the best: change UNSTABLE"
    kept = best if keep == "best" else history[-1]
    assert s["kept"] == keep
    # no data.val: the epoch is chosen on data.eval, the set the step is scored on, and the summary says so
    assert s["periodic_eval_set"] == "data.eval" and s.get("chosen_on_eval_set", False) == (keep == "best")
    # the final evaluation (same eval set, same code) measures the weights the step ends with
    assert s["top1"] == pytest.approx(kept["top1"]) and s["eval"]["loss"] == pytest.approx(kept["loss"])
    evals = [r for r in read_metrics(tmp_path / "teacher") if "eval_top1" in r]
    assert [(r["step"], r["eval_top1"]) for r in evals] == [(h["step"], h["top1"]) for h in history]


def test_keep_best_needs_periodic_evaluation(tmp_path, digits_root):
    with pytest.raises(ConfigError, match="eval.keep=best needs eval.every_epochs"):
        run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST, "eval.keep=best")
    with pytest.raises(ConfigError, match="eval.keep='first'"):
        run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *FAST, "eval.keep=first")


def test_a_resumed_step_keeps_its_evaluations(tmp_path, digits_root):
    args = ["stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *UNSTABLE, "eval.every_epochs=2",
            "eval.keep=best"]
    run(*args, "max_steps=21")  # 3 epochs: evaluated at epoch 2; the checkpoint holds it and the best weights
    (tmp_path / "teacher/_SUCCESS").unlink()  # as if killed after the last checkpoint
    s = run(*args)
    assert s["resumed_from_step"] == 21
    assert [h["epoch"] for h in s["periodic_eval"]] == [2, 4, 6, 8]
    assert s["top1"] == pytest.approx(s["best_top1"])


def test_keep_best_chooses_on_data_val_where_it_is_set(tmp_path, digits_root):
    """With data.val the periodic evaluation reads it: the epoch kept is the best on data.val (scored again at
    the end as one of eval.sets), and nothing is chosen on data.eval."""
    val = f"{digits_root}/unlabeled-{{000000..000001}}.tar"  # never trained on by a teacher; each image has a cls
    s = run("stage=teacher", f"run_dir={tmp_path}", f"data.root={digits_root}", *UNSTABLE, "eval.keep=best",
            f"data.val='{val}'", f"+eval.sets.v='{val}'")
    assert s["periodic_eval_set"] == "data.val" and "chosen_on_eval_set" not in s
    history = s["periodic_eval"]
    best = max(history, key=lambda h: h["top1"])
    assert s["best_epoch"] == best["epoch"] and s["eval_sets"]["v"]["top1"] == pytest.approx(best["top1"])
    assert s["eval_sets"]["v"]["images"] != s["eval"]["images"]  # two different sets
    assert s["settings"]["data.val"] == val  # a step whose data.val changes is rerun, not skipped
