"""What is in the pool (pseudolabels/pool.py) and the selection's levers for real pools, on label files made here:
a simulated teacher whose probabilities are the exact posterior of its (Gaussian) logits, so what an estimate
should recover is known. Then the same on a real teacher of the digits (the out-of-domain score, the contact
sheets)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import FAST, make_cfg, run
from PIL import Image

from noisystudent.data.labels import LabelFile, soft_targets, write_label_file
from noisystudent.data.shards import image_bytes
from noisystudent.data.streams import JoinPseudoLabels
from noisystudent.data.writer import encode_png, write_shard
from noisystudent.errors import ConfigError
from noisystudent.files import read_json
from noisystudent.pseudolabels.audit import audit_label_files
from noisystudent.pseudolabels.choose import Policy, choose
from noisystudent.pseudolabels.pool import PoolSettings, confusion_prior, em_prior, estimate, reference_from_files
from noisystudent.pseudolabels.selection import Reading, Selection, SelectionSettings, select
from noisystudent.pseudolabels.sheets import _thumbnail

C = 10
TAIL = 20.0 ** (-np.arange(C) / (C - 1))  # a planted long tail: class 0 twenty times class 9
TAIL = TAIL / TAIL.sum()


def simulate(n: int, prior: np.ndarray, seed: int, strength: float = 2.2, topk: int = 5):
    """n images drawn from `prior`; each one's logits = strength * one-hot(class) + N(0, 1), and its probabilities
    softmax(strength * logits): the posterior of its class under a uniform prior, i.e. a calibrated teacher
    trained on balanced labels."""
    rng = np.random.default_rng(seed)
    y = rng.choice(C, n, p=prior)
    z = strength * np.eye(C)[y] + rng.normal(size=(n, C))
    logits = strength * z
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1)[:, :topk]
    probs = np.take_along_axis(p, ids, 1)
    lse = (np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)).astype(np.float32)
    return y, ids.astype(np.int32), probs.astype(np.float32), lse, logits.max(1).astype(np.float32)


def label_files(tmp_path, name: str, n: int, prior, seed: int, shards: int = 4, **kw) -> list[LabelFile]:
    y, ids, probs, lse, mx = simulate(n, prior, seed, **kw)
    files = []
    for s, rows in enumerate(np.array_split(np.arange(n), shards)):
        path = tmp_path / f"{name}-{s}.labels.safetensors"
        write_label_file(path, f"{name}-{s}.tar", [f"{name}{s}-{i}" for i in rows], ids[rows], probs[rows],
                         probs[rows, 0], ids[rows, 0], [], {"num_classes": C, "topk": ids.shape[1], "temperature": 1.0,
                                                            "hard": False},
                         {"cls": y[rows], "logit_lse": lse[rows], "max_logit": mx[rows]})
        files.append(LabelFile(path))
    return files


def tv(a, b) -> float:
    return 0.5 * float(np.abs(np.asarray(a) - np.asarray(b)).sum())


@pytest.fixture(scope="module")
def tail_pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("tail_pool")
    return label_files(d, "pool", 20000, TAIL, 0), label_files(d, "val", 5000, np.full(C, 1 / C), 1)


def test_the_estimated_prior_recovers_a_planted_long_tail(tail_pool):
    """The stated errors (docs/pseudolabels.md), for a teacher 72% right: the teacher's own predictions are off the
    planted prior by 0.10 in total variation; corrected by its confusion on 500 held-out images per class, by under
    0.04 (the confusion matrix's own sampling error: 0.015 with 2,000 per class); by EM, which needs no labels but a
    calibrated teacher (this one is), by under 0.02."""
    pool_files, val_files = tail_pool
    ref = reference_from_files(val_files, C, PoolSettings("energy", 0.05), "data.val")
    est = estimate(pool_files, C, PoolSettings("energy", 0.05, "auto"), ref)
    assert est["method"] == "confusion" and est["images"] == 20000 and ref.images == 5000
    truth = np.bincount(np.concatenate([f["cls"] for f in pool_files]), minlength=C) / 20000
    predicted = tv(est["predicted_share"], truth)
    assert predicted > 0.08
    assert tv(est["estimates"]["confusion"], truth) < 0.04
    assert tv(est["estimates"]["em"], truth) < 0.02
    # the weights the correction applies: estimated share over the labeled share (uniform here)
    assert np.allclose(np.array(est["class_weights"]) * np.array(est["train_prior"]),
                       np.maximum(est["estimated_share"], 0.01 / C) / np.maximum(est["estimated_share"],
                                                                                0.01 / C).sum(), rtol=1e-6)
    # without a reference: em is the estimate, and there is no cut-off (nor an out-of-domain count)
    alone = estimate(pool_files, C, PoolSettings("energy", 0.05, "auto"), None)
    assert alone["method"] == "em" and alone["ood"]["cutoff"] is None and alone["ood"]["below_cutoff"] is None
    with pytest.raises(ConfigError, match="pseudolabel.prior=confusion needs held-out labeled images.*data.val"):
        estimate(pool_files, C, PoolSettings("energy", 0.05, "confusion"), None)


def test_the_estimators_on_exact_inputs():
    # a confusion matrix that mixes two classes, predicted counts made from a known prior: recovered exactly
    m = np.array([[80, 30, 0], [20, 70, 10], [0, 0, 90]])
    truth = np.array([0.6, 0.1, 0.3])
    predicted = (m / m.sum(0)) @ truth * 100000
    assert np.allclose(confusion_prior(m * 1000, predicted), truth, atol=2e-3)
    # EM with every image's full distribution: the prior that its re-weighted posteriors average to
    ids = np.tile(np.arange(3), (3, 1))
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]], np.float32)
    pi = em_prior(ids, probs, np.full(3, 1 / 3))
    post = probs * pi / np.full(3, 1 / 3)
    assert np.allclose((post / post.sum(1, keepdims=True)).mean(0), pi, atol=1e-6)


def test_the_prior_correction_makes_the_rare_classes_labels_right(tail_pool):
    """The paper's selection on a long tail repeats the rare classes' labels, most of which belong to the head;
    the corrected one keeps labels of the rare classes that are mostly right."""
    pool_files, val_files = tail_pool
    paper = Policy(SelectionSettings(0.3), PoolSettings(), prior_correction=False, ood_filter=False)
    fixed = Policy(SelectionSettings(0.3), PoolSettings(), prior_correction=True, ood_filter=False)
    rare = [7, 8, 9]
    before = audit_label_files(pool_files, choose(pool_files, val_files, C, paper)[0], C)
    sel, pool, _ = choose(pool_files, val_files, C, fixed)
    after = audit_label_files(pool_files, sel, C)
    for c in rare:
        assert before["per_class"]["precision_after_balancing"][c] < 0.5
        assert after["per_class"]["precision_after_balancing"][c] >= 0.5
    assert after["after_balancing"]["accuracy"] > before["after_balancing"]["accuracy"] + 0.05
    assert after["uncorrected_accuracy"] == pytest.approx(before["accuracy"])
    # the selection records what it applied; the soft targets stay the teacher's (prior_targets=false), a hard
    # target is the label the selection gave
    j = sel.to_json()
    assert j["prior_correction"] and j["prior"] == "confusion" and len(j["class_weights"]) == C
    assert j["prior_targets"] is False
    again = Selection.from_json(j)
    f = pool_files[0]
    r = again.rows(f)
    assert np.array_equal(r.repeats, sel.rows(f).repeats)
    keep = np.flatnonzero(r.repeats)
    ids, probs, rest, label = again.target_arrays(f, r)
    t = again.targets_from(ids[keep], probs[keep], rest, label[keep], C, hard=False)
    assert np.array_equal(t, soft_targets(f["topk_ids"][keep], f["topk_probs"][keep], C, hard=False))
    hard = again.targets_from(ids[keep], probs[keep], rest, label[keep], C, hard=True)
    assert np.array_equal(hard.argmax(1), r.argmax[keep]) and np.all(hard.sum(1) == 1)
    assert (hard.argmax(1) != f["argmax"][keep]).any()  # the correction moved some labels
    # with prior_targets=true the soft targets are the corrected probabilities: their top class is the label
    both = choose(pool_files, val_files, C, Policy(SelectionSettings(0.3), PoolSettings(), True, False, True))[0]
    r = both.rows(f)
    keep = np.flatnonzero(r.repeats)
    ids, probs, rest, label = both.target_arrays(f, r)
    t = both.targets_from(ids[keep], probs[keep], rest[keep], label[keep], C, hard=False)
    assert np.allclose(t.sum(1), 1, atol=1e-5) and np.array_equal(t.argmax(1), r.argmax[keep])
    # a selection.json of the version that always corrected the targets (no prior_targets key) still does
    assert Selection.from_json({k: v for k, v in both.to_json().items() if k != "prior_targets"}).corrects_targets


def test_unit_weights_change_nothing_but_rounding(tail_pool):
    """A correction by weights of 1 reads the labels the file has; its confidences differ from the file's by the
    rounding of the top-k's float16 probabilities alone."""
    pool_files, _ = tail_pool
    plain, ones = Reading(0.3), Reading(0.3, np.ones(C, np.float32))
    for f in pool_files:
        a, b = plain.rows(f), ones.rows(f)
        assert np.array_equal(a.argmax, b.argmax)
        assert np.allclose(a.confidence, b.confidence, atol=2e-3)
        assert (a.passes != b.passes).sum() <= 0.002 * len(a.passes)


def test_each_lever_does_what_it_says(tail_pool):
    pool_files, val_files = tail_pool
    base = dict(prior_correction=False, ood_filter=False)
    # class_quantile: each class keeps exactly its ceil((1 - q) n) most confident images before balancing
    sel0, _, stats = choose(pool_files, val_files, C, Policy(SelectionSettings(0.3), PoolSettings(), **base))
    q = choose(pool_files, val_files, C, Policy(SelectionSettings(0.3, class_quantile=0.25), PoolSettings(),
                                                **base))[0]
    assert q.counts_before.tolist() == np.ceil(0.75 * stats["counts"]).astype(int).tolist()
    for c in range(C):  # every image it keeps is at least as confident as every one it drops
        kept, dropped = [], []
        for f in pool_files:
            r = q.rows(f)
            m = (r.argmax == c) & r.passes
            kept += r.score[m & (r.repeats > 0)].tolist()
            dropped += r.score[m & (r.repeats == 0)].tolist()
        assert not dropped or min(kept) > max(dropped)
    # max_repeat: no image more often than the cap; a class gets min(N, cap x n)
    cap = choose(pool_files, val_files, C, Policy(SelectionSettings(0.3, max_repeat=2), PoolSettings(), **base))[0]
    assert max(int(cap.repeats(f).max()) for f in pool_files) <= 2
    assert cap.counts_after().tolist() == np.minimum(sel0.per_class, 2 * sel0.counts_before).tolist()
    # the estimated balance target shares N x classes in proportion to the pool estimate
    est_sel, pool, _ = choose(pool_files, val_files, C, Policy(SelectionSettings(0.3, balance_target="estimated"),
                                                                PoolSettings(), **base))
    got = est_sel.counts_after() / est_sel.counts_after().sum()
    assert tv(got, pool["estimated_share"]) < 0.01 and est_sel.counts_after().sum() == pytest.approx(C * sel0.per_class,
                                                                                                       abs=C)
    # the out-of-domain filter drops exactly the images below the reference's cut-off
    ood, pool, _ = choose(pool_files, val_files, C, Policy(SelectionSettings(0.3), PoolSettings(), False, True))
    cut = np.float32(pool["ood"]["cutoff"])
    for f in pool_files:
        assert not np.any(ood.repeats(f)[f["logit_lse"] < cut])


@pytest.mark.parametrize("override,match", [
    ("pseudolabel.balance_target=prior", r"pseudolabel.balance_target='prior'.*uniform, labeled, estimated"),
    ("pseudolabel.max_repeat=0", r"pseudolabel.max_repeat=0.*null.*>= 1"),
    ("pseudolabel.class_quantile=1.0", r"pseudolabel.class_quantile=1.0.*\[0, 1\)"),
    ("pseudolabel.ood.score=odin", r"pseudolabel.ood.score='odin'.*energy, max_logit, msp"),
    ("pseudolabel.ood.quantile=0.7", r"pseudolabel.ood.quantile=0.7.*\(0, 0.5\)"),
    ("pseudolabel.prior=bbse", r"pseudolabel.prior='bbse'.*auto, confusion, em"),
    ("pseudolabel.prior_correction=maybe", r"pseudolabel.prior_correction='maybe'.*auto.*true or false"),
])
def test_a_bad_setting_names_the_key_and_the_valid_values(override, match):
    from noisystudent.stages.pseudolabel import settings

    with pytest.raises(ConfigError, match=match):
        settings(make_cfg("stage=pseudolabel", "pseudolabel.decode=cpu", override))


def test_needs_a_reference_where_a_lever_does(tail_pool):
    pool_files, _ = tail_pool
    with pytest.raises(ConfigError, match="pseudolabel.ood.filter=true.*set data.val"):
        choose(pool_files, [], C, Policy(SelectionSettings(0.3), PoolSettings(), False, True))
    with pytest.raises(ConfigError, match="pseudolabel.balance_target=labeled.*data.val"):
        choose(pool_files, [], C, Policy(SelectionSettings(0.3, balance_target="labeled"), PoolSettings(), False,
                                         False))


def test_older_label_files_and_selections_still_read(tmp_path, tail_pool):
    """A format 1 label file (no scores) serves everything but the out-of-domain scores, and says what to do there;
    a selection.json of an older version (no levers) gives the repeats it gave."""
    f = tail_pool[0][0]
    n = int(f.meta["images"])
    old = tmp_path / "old.labels.safetensors"
    write_label_file(old, "old.tar", f.keys(), f["topk_ids"], f["topk_probs"], f["confidence"], f["argmax"], [],
                     {"num_classes": C, "topk": 5, "temperature": 1.0, "hard": False})
    lf = LabelFile(old)
    assert lf.format == 1 and not lf.has_scores and f.format == 2 and f.has_scores and n
    est = estimate([lf], C, PoolSettings("msp", 0.05, "em"), None)  # the confidence is a score every file has
    assert est["images"] == n
    with pytest.raises(ConfigError, match=r"older version \(label file format 1\).*force=true.*ood.score=msp"):
        estimate([lf], C, PoolSettings("energy", 0.05, "em"), None)
    sel = select([lf], C, SelectionSettings(0.3))
    j = sel.to_json()
    older = {k: j[k] for k in ("threshold", "per_class", "balanced", "counts_before", "counts_after",
                               "repeat_factor", "base_repeat", "cut_score", "mean_repeat")}
    assert np.array_equal(Selection.from_json(older).repeats(lf), sel.repeats(lf))


@pytest.mark.parametrize("prior_targets", [False, True])
def test_the_dali_tables_targets_are_the_torch_paths(tail_pool, tmp_path, prior_targets):
    """With a prior correction the student's targets are made from the selection's labels (and corrected
    probabilities): the DALI path's table (data/dali.py) gives the torch path's (JoinPseudoLabels), row for row."""
    from noisystudent.data.dali import SampleTable, pseudo_labeled_index
    from noisystudent.data.dali_index import ShardRecord, ShardRecords

    pool_files, val_files = tail_pool
    sel = choose(pool_files, val_files, C, Policy(SelectionSettings(0.3), PoolSettings(), True, False,
                                                  prior_targets))[0]
    f = pool_files[0]
    url = f.meta["shard"]
    n = len(f.keys())  # a record as the index pass would make it (its offsets are all the join needs)
    rec = ShardRecord(url, keys=f.keys(), exts=["png"] * n, offsets=list(range(n)), sizes=[1] * n, cls=[None] * n)
    index_files, fill, listed = pseudo_labeled_index(ShardRecords.holding([rec]), [url], {url: f.path}, sel, C,
                                                     tmp_path, 0, 1)
    table = SampleTable([rec], [np.full(len(rec.keys), -1)])
    fill(table)
    torch_table = JoinPseudoLabels({url: f.path}, sel, C)._table(url)
    keys = f.keys()
    for row, key in enumerate(keys):
        if key in torch_table:
            assert np.allclose(table.targets(np.array([row]))[0], torch_table[key][1].numpy(), atol=1e-7)
    assert listed == int(sel.repeats(f).sum())


# -- on a real teacher: the digits demo's, labeling digits with planted foreign images -----------------------------


def foreign_shard(path) -> None:
    """60 images of uniform noise and 60 crops of photographs (scikit-learn's sample images), 8x8 gray like the
    digits, each with cls -1: of no class of the data set."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.fromarray(p).convert("L")) for p in load_sample_images().images]
    samples = []
    for i in range(60):
        img = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L")
        samples.append({"__key__": f"noise{i:03d}", "png": encode_png(img), "cls": b"-1"})
    for i in range(60):
        p = photos[i % 2]
        y, x = rng.integers(0, p.shape[0] - 64), rng.integers(0, p.shape[1] - 64)
        img = Image.fromarray(p[y:y + 64, x:x + 64]).resize((8, 8), Image.BILINEAR)
        samples.append({"__key__": f"photo{i:03d}", "png": encode_png(img), "cls": b"-1"})
    write_shard(path, samples)


@pytest.fixture(scope="module")
def foreign_run(tmp_path_factory, good_teacher, digits_root):
    d = tmp_path_factory.mktemp("foreign_run")
    shutil.copytree(good_teacher / "teacher", d / "run" / "teacher")
    foreign_shard(d / "foreign-000000.tar")
    s = run("stage=pseudolabel", f"run_dir={d / 'run'}", f"data.root={digits_root}", *FAST,
            f"data.unlabeled=['{digits_root}/unlabeled-000000.tar','{d}/foreign-000000.tar']",
            f"data.val='{digits_root}/eval-{{000000..000001}}.tar'")
    return d / "run" / "round_1" / "pseudolabel", s


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The chance that an in-domain image scores above a foreign one."""
    return float((inside[:, None] > outside[None, :]).mean() + 0.5 * (inside[:, None] == outside[None, :]).mean())


def test_the_out_of_domain_score_ranks_planted_foreign_images_below_the_pool(foreign_run):
    out, s = foreign_run
    digits = LabelFile(out / "labels" / "unlabeled-000000.labels.safetensors")
    foreign = LabelFile(out / "labels" / "foreign-000000.labels.safetensors")
    noise = np.array([k.startswith("noise") for k in foreign.keys()])  # noqa: SIM118 - LabelFile.keys() decodes the keys
    for score in ("logit_lse", "max_logit"):
        assert auroc(digits[score], foreign[score][noise]) > 0.95, score
        assert auroc(digits[score], foreign[score][~noise]) > 0.95, score
    # the count: the cut-off is the 5% quantile of data.val's scores; at least (b - q) / (1 - q) out of domain
    val = np.concatenate([LabelFile(p)["logit_lse"] for p in sorted((out / "val").glob("*.safetensors"))])
    pool = s["pool"]
    ood = pool["ood"]
    assert ood["cutoff"] == pytest.approx(float(np.quantile(val, 0.05, method="lower")))
    below = int((digits["logit_lse"] < np.float32(ood["cutoff"])).sum() + (foreign["logit_lse"] < ood["cutoff"]).sum())
    assert ood["below_cutoff"] == below and pool["images"] == len(digits.keys()) + 120
    true_share = 120 / pool["images"]
    assert 0.7 * true_share < ood["share_estimate"] <= true_share + 0.03
    # the audit knows them as images of no class: every label they got is wrong
    a = s["audit"]["unlabeled"]
    assert a["out_of_domain"]["images"] == 120 and a["images"] == pool["images"]
    # and the contact sheet of the most likely out-of-domain images shows foreign ones
    sheets = read_json(out / "sheets" / "sheets.json")
    tiles = next(sh for sh in sheets["sheets"] if sh["kind"] == "out_of_domain")["tiles"]
    assert len(tiles) == 16 and sum(t["key"].startswith(("noise", "photo")) for t in tiles) >= 15


def test_the_contact_sheets_show_the_images_the_label_files_name(foreign_run):
    out, s = foreign_run
    sheets = read_json(out / "sheets" / "sheets.json")
    sel = Selection.from_json(read_json(out / "selection.json"))
    files = {LabelFile(p).meta["shard"]: LabelFile(p) for p in sorted((out / "labels").glob("*.safetensors"))}
    rows = {url: (f.keys(), sel.rows(f)) for url, f in files.items()}
    per = sheets["images_per_panel"]
    assert sheets["classes_shown"] == list(range(10)) and per == 8
    for sheet in sheets["sheets"]:
        png = Image.open(out / sheet["file"]).convert("RGB")
        for t in sheet["tiles"]:  # the pixels at the tile's place are the named image's thumbnail
            data = image_bytes(t["shard"], {t["key"]})[t["key"]]
            crop = png.crop((t["x"], t["y"], t["x"] + t["size"], t["y"] + t["size"]))
            assert np.array_equal(np.asarray(crop), np.asarray(_thumbnail(data))), (sheet["file"], t["key"])
        if sheet["kind"] != "classes":
            continue
        for c in sheet["classes"]:  # and they are the ones the panel says, recomputed from the label files
            every = [(key, int(r.score[i]), int(r.repeats[i])) for keys, r in rows.values()
                     for i, key in enumerate(keys) if r.argmax[i] == c and r.repeats[i] > 0]
            by_score = sorted(every, key=lambda e: -e[1])
            shown = {p: [t["key"] for t in sheet["tiles"] if t["sheet_class"] == c and t["panel"] == p]
                     for p in ("most_confident", "least_confident", "repeated_most")}
            assert shown["most_confident"] == [e[0] for e in by_score[:per]]
            assert shown["least_confident"] == [e[0] for e in by_score[::-1][:per]]
            many = sorted((e for e in every if e[2] > 1), key=lambda e: (-e[2], -e[1]))
            assert shown["repeated_most"] == [e[0] for e in many[:per]]
    assert (out / "pool.png").stat().st_size > 0
    # the report shows them
    from noisystudent.reporting.report import pseudolabel_sections

    text = pseudolabel_sections(out.parents[1], {1: s})
    assert "sheets/classes-1.png" in text and "sheets/out_of_domain.png" in text and "at least" in text


def test_an_empty_pool_is_estimated_without_failing(tail_pool):
    _, val_files = tail_pool
    ref = reference_from_files(val_files, C, PoolSettings(), "data.val")
    est = estimate([], C, PoolSettings(), ref)
    assert est["images"] == 0 and np.allclose(est["estimated_share"], 1 / C) and est["ood"]["below_cutoff"] == 0
    assert est["ood"]["share_estimate"] is None
