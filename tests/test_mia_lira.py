"""LiRA (mia_lira.py): the math on synthetic Gaussian scores with a known answer, and the orchestration with stand-in
stage scripts (the real ones are exercised by `make demo`)."""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import moved_aside_before

import common
import mia_lira
from common import load_dataset


def phi_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# ---------------------------------------------------------------------------------------------------------- keep matrix


def test_keep_matrix_is_balanced_and_a_function_of_ids():
    ids = [f"class{i % 3}/img{i}" for i in range(50)]
    keep = mia_lira.make_keep_matrix(ids, 8, seed=0)
    assert keep.shape == (8, 50) and keep.dtype == bool
    assert (keep.sum(0) == 4).all()  # every image IN for exactly M/2 models
    # Order-free: shuffling the ids shuffles the columns, nothing else.
    perm = np.random.default_rng(1).permutation(50)
    assert np.array_equal(mia_lira.make_keep_matrix([ids[p] for p in perm], 8, seed=0), keep[:, perm])
    assert not np.array_equal(mia_lira.make_keep_matrix(ids, 8, seed=1), keep)
    many = mia_lira.make_keep_matrix([str(i) for i in range(2000)], 8, seed=0)
    assert 0.45 < many.mean(1).min() and many.mean(1).max() < 0.55  # each model sees about half
    for bad in (3, 2, 7):
        with pytest.raises(ValueError, match="even and >= 4"):
            mia_lira.make_keep_matrix(ids, bad, seed=0)


# ---------------------------------------------------------------------------------------------------------------- score


def test_phi_matches_an_independent_float64_computation():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(0, 3, (20, 2, 7)), rng.integers(0, 7, (20, 1))
    phi = mia_lira.logit_scaled_confidence(logits, labels)
    assert phi.shape == (20, 2) and phi.dtype == np.float64
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p_y = np.take_along_axis(p, np.broadcast_to(labels[..., None], (20, 2, 1)), -1)[..., 0]
    np.testing.assert_allclose(phi, np.log(p_y) - np.log1p(-p_y), rtol=1e-9, atol=1e-9)


def test_phi_stays_finite_for_confident_logits():
    logits = torch.tensor([[60.0, -40.0, -50.0], [60.0, -40.0, -50.0]], dtype=torch.float32)
    phi = mia_lira.logit_scaled_confidence(logits, np.array([0, 1]))
    # Confidently right: φ = 60 − logsumexp(−40, −50) ≈ 100; confidently wrong: −40 − logsumexp(60, −50) ≈ −100.
    np.testing.assert_allclose(phi, [100 - math.log1p(math.exp(-10)), -100.0], rtol=1e-12)
    naive = torch.log(torch.softmax(logits, -1)[0, 0] / (1 - torch.softmax(logits, -1)[0, 0]))
    assert not torch.isfinite(naive)  # what float32 log(p/(1-p)) would have given


# ------------------------------------------------------------------------------------------------------------------ ROC


def brute_force_metrics(labels, scores, level):
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    auc = (diff > 0).mean() + 0.5 * (diff == 0).mean()
    best, tpr_low = 0.0, 0.0
    for t in np.r_[np.inf, np.unique(scores)]:  # predict member iff score >= t
        tpr, fpr = (pos >= t).mean(), (neg >= t).mean()
        best = max(best, 1 - (fpr + 1 - tpr) / 2)
        if fpr < level:
            tpr_low = max(tpr_low, tpr)
    return auc, best, tpr_low


def test_roc_metrics_match_brute_force_with_ties():
    rng = np.random.default_rng(3)
    labels = rng.random(400) < 0.4
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    m = mia_lira.roc_metrics(labels, scores, fprs=(0.05,))
    auc, bal, tpr = brute_force_metrics(labels, scores, 0.05)
    assert m["auc"] == pytest.approx(auc, abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(bal, abs=1e-12)
    assert m["tpr_at_0.05_fpr"] == pytest.approx(tpr, abs=1e-12)
    assert m["num_nonmembers"] == (~labels).sum() and m["num_members"] == labels.sum()
    # the most false positives a TPR strictly below 5% FPR can rest on: the largest k with k / non-members < 0.05
    n_neg = int((~labels).sum())
    assert m["false_positives_at_0.05_fpr"] == max(k for k in range(n_neg + 1) if k / n_neg < 0.05)
    exact = np.r_[np.ones(50, bool), np.zeros(200, bool)]  # 5% of 200 is 10 false positives: 9 lie strictly below
    assert mia_lira.roc_metrics(exact, rng.normal(size=250), fprs=(0.05,))["false_positives_at_0.05_fpr"] == 9
    # A flipped sign is not silently absorbed: the AUC becomes 1 − AUC.
    assert mia_lira.roc_metrics(labels, -scores)["auc"] == pytest.approx(1 - auc, abs=1e-12)


# -------------------------------------------------------------------------------------------------------------- attacks


def gaussian_experiment(num_models=16, num_images=3000, shift=1.0, spread=2.0, seed=0):
    """φ = μ_j + shift·[IN] + N(0, 1) per model, + N(0, 0.1²) per query: per-image difficulty μ_j ~ N(0, spread²).

    The optimal per-image test has AUC Φ(shift/√2); a global threshold sees the spread: Φ(shift/√(2(1+spread²)))."""
    rng = np.random.default_rng(seed)
    keep = mia_lira.make_keep_matrix([str(j) for j in range(num_images)], num_models, seed)
    mu = rng.normal(0, spread, num_images)
    base = mu + shift * keep + rng.normal(0, 1, keep.shape)
    return keep, base[..., None] + rng.normal(0, 0.1, (*keep.shape, 2))


def test_attacks_recover_the_known_auc():
    # 64 shadows: the per-image Gaussians are then well estimated and every calibrated attack nears the optimum.
    keep, scores = gaussian_experiment(num_models=64, num_images=2000)
    results, _ = mia_lira.evaluate_attacks(scores, keep, targets=[0, 5, 10, 15])
    optimal, global_auc = phi_cdf(1 / math.sqrt(2)), phi_cdf(1 / math.sqrt(2 * 5))
    for name in ("online", "online_fixed_variance", "offline", "offline_fixed_variance"):
        assert results[name]["auc"] == pytest.approx(optimal, abs=0.025), name
    assert results["global_threshold"]["auc"] == pytest.approx(global_auc, abs=0.025)
    assert results["online"]["num_nonmembers"] == (~keep[[0, 5, 10, 15]]).sum()
    assert results["online"]["num_targets"] == 4
    # With 16 shadows (the paper's M) the estimates are noisier: below the optimum, still far above the threshold.
    keep, scores = gaussian_experiment(num_models=16, num_images=2000)
    few, _ = mia_lira.evaluate_attacks(scores, keep, targets=[0, 5])
    assert global_auc + 0.04 < few["online"]["auc"] < optimal
    # Carlini et al.'s point: calibrating per example beats the global threshold at low FPR.
    assert results["online"]["tpr_at_0.01_fpr"] > 2 * results["global_threshold"]["tpr_at_0.01_fpr"]


def test_no_separation_gives_chance_and_sign_flip_is_caught():
    # 8 shadows, every one a target: leave-one-out gives members one IN shadow fewer than non-members; without
    # equal IN/OUT counts per example the per-example σ alone moved the online AUC to ~0.42 on pure noise.
    keep, scores = gaussian_experiment(num_models=8, shift=0.0, num_images=1500)
    results, _ = mia_lira.evaluate_attacks(scores, keep, targets=list(range(8)))
    for name, m in results.items():
        assert m["auc"] == pytest.approx(0.5, abs=0.025), name
    # Members *less* confident than non-members: the one-sided tests must see it as anti-membership (AUC < 0.5),
    # which a flipped sign in the offline or threshold attack would turn into a false "leak".
    keep, scores = gaussian_experiment(shift=-1.0, num_images=2000)
    results, _ = mia_lira.evaluate_attacks(scores, keep, targets=[0, 1])
    assert results["offline"]["auc"] < 0.3 and results["global_threshold"]["auc"] < 0.45
    assert results["online"]["auc"] > 0.65  # the two-sided likelihood ratio learns the direction from IN shadows


def test_two_sided_offline_is_the_reference_logpdf():
    keep, scores = gaussian_experiment(num_models=8, num_images=500)
    shadows = np.arange(8) != 0
    one = mia_lira.lira_attacks(scores[shadows], keep[shadows], scores[0], "one-sided")
    two = mia_lira.lira_attacks(scores[shadows], keep[shadows], scores[0], "two-sided")
    # Independently, per example: the first n OUT shadows in model order, n = the fewest any example has.
    k, sc = keep[shadows], scores[shadows]
    n = (~k).sum(0).min()
    outs = np.stack([sc[np.flatnonzero(~k[:, j])[:n], j] for j in range(k.shape[1])], 1)  # [n, N, A]
    mu, sd = np.median(outs, 0), np.std(outs, 0)
    ref = -(-0.5 * ((scores[0] - mu) / sd) ** 2 - np.log(sd * math.sqrt(2 * math.pi))).mean(-1)
    np.testing.assert_allclose(two["offline"], ref, rtol=1e-10)
    cdf = np.vectorize(lambda z: 0.5 * math.erfc(-z / math.sqrt(2)))((scores[0] - mu) / sd)  # Pr[Z < φ], Z ~ OUT
    np.testing.assert_allclose(one["offline"], np.log(cdf).mean(-1), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(one["online"], two["online"])  # only the offline test differs
    with pytest.raises(ValueError, match="offline test"):
        mia_lira.lira_attacks(scores[shadows], keep[shadows], scores[0], "both")


def test_every_attack_matches_a_per_example_reference():
    """Each attack against Carlini et al.'s formulas, example by example: median and std (ddof 0) of the first n IN
    and the first m OUT shadows (n, m the fewest any example has); the fixed-variance tests take one σ over all those
    IN scores (online) or all those OUT scores (offline). IN scores are spread 3x wider than OUT ones here, so a σ
    taken from the wrong side, or a mean for the median, shows."""
    rng = np.random.default_rng(7)
    keep = mia_lira.make_keep_matrix([str(j) for j in range(40)], 9 + 1, seed=3)[:9]  # 9 shadows: unequal counts
    base = rng.normal(0, 2, 40)[None, :, None]
    scores = np.where(keep[..., None], base + 1 + rng.normal(0, 1.5, (9, 40, 2)), base + rng.normal(0, 0.5, (9, 40, 2)))
    target = base[0] + rng.normal(0.5, 1, (40, 2))
    got = mia_lira.lira_attacks(scores, keep, target)
    n_in, n_out = keep.sum(0).min(), (~keep).sum(0).min()
    ins = [scores[np.flatnonzero(keep[:, j])[:n_in], j] for j in range(40)]  # [n_in, A] per example
    outs = [scores[np.flatnonzero(~keep[:, j])[:n_out], j] for j in range(40)]
    sd_in_all, sd_out_all = np.std(np.stack(ins)), np.std(np.stack(outs))

    def logpdf(x, mu, sd):
        return math.log(math.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)))

    def logcdf(x, mu, sd):
        return math.log(0.5 * math.erfc(-(x - mu) / (sd * math.sqrt(2))))

    expected = {name: [] for name in mia_lira.ATTACKS}
    for j in range(40):
        per_query = {name: [] for name in mia_lira.ATTACKS}
        for a in range(2):
            x, i, o = target[j, a], ins[j][:, a], outs[j][:, a]
            mu_i, sd_i, mu_o, sd_o = np.median(i), np.std(i), np.median(o), np.std(o)
            per_query["online"].append(logpdf(x, mu_i, sd_i) - logpdf(x, mu_o, sd_o))
            per_query["online_fixed_variance"].append(logpdf(x, mu_i, sd_in_all) - logpdf(x, mu_o, sd_in_all))
            per_query["offline"].append(logcdf(x, mu_o, sd_o))
            per_query["offline_fixed_variance"].append(logcdf(x, mu_o, sd_out_all))
            per_query["global_threshold"].append(x)
        for name, values in per_query.items():
            expected[name].append(np.mean(values))
    assert set(got) == set(mia_lira.ATTACKS)
    for name in mia_lira.ATTACKS:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-7, atol=1e-9, err_msg=name)


# ---------------------------------------------------------------------------------------------------- attack-only main


def test_attack_only_mode_writes_the_report(tmp_path):
    src = tmp_path / "experiment"
    src.mkdir()
    keep, real = gaussian_experiment(num_models=8, num_images=1500, shift=1.5)
    _, synthetic = gaussian_experiment(num_models=8, num_images=1500, shift=0.0)
    np.save(src / "keep.npy", keep)
    np.save(src / "scores_real.npy", real)
    np.save(src / "scores_synthetic.npy", synthetic)
    out = tmp_path / "attack"
    argv = [*"--dataset demo --num-shadows 8 --scores-from".split(), str(src), "--output-dir", str(out)]
    metrics = mia_lira.main(argv)
    assert metrics["real"]["online_fixed_variance"]["auc"] > 0.75
    assert all(abs(m["auc"] - 0.5) < 0.04 for m in metrics["synthetic"].values())
    assert metrics["real"]["online"]["num_targets"] == 8
    assert json.loads((out / "results.json").read_text()) == metrics
    table = (out / "results.md").read_text()
    assert table.count("| real |") == len(mia_lira.ATTACKS) and "non-members" in table
    assert (out / "roc.png").stat().st_size > 1000 and (out / "manifest.json").is_file()
    assert mia_lira.main(argv) == metrics  # complete: a no-op


def test_a_run_moved_aside_while_attacking_writes_nothing_into_its_successor(tmp_path, monkeypatch):
    src = tmp_path / "experiment"
    src.mkdir()
    keep, real = gaussian_experiment(num_models=8, num_images=300, shift=1.5)
    np.save(src / "keep.npy", keep)
    np.save(src / "scores_real.npy", real)
    out = tmp_path / "attack"
    moved_aside_before(monkeypatch, mia_lira, "attack", out)
    argv = [*"--dataset demo --num-shadows 8 --arms real --scores-from".split(), str(src), "--output-dir", str(out)]
    with pytest.raises(common.RunMovedError):
        mia_lira.main(argv)
    assert {p.name for p in out.iterdir()} <= {"run_config.json", "log.txt", ".writer-0of1.lock"}  # the new run's


def test_bad_inputs_fail_before_the_run_dir(tmp_path, tiny_dataset):
    """Wrong --num-shadows, --data-root or --scores-from fail before the output dir exists (no config left behind
    for the corrected command to conflict with)."""
    out = tmp_path / "mia"
    base = ["--dataset", "demo", "--output-dir", str(out)]
    with pytest.raises(ValueError, match="even and >= 4"):
        mia_lira.main([*base, "--data-root", str(tiny_dataset), "--num-shadows", "3"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mia_lira.main([*base, "--data-root", str(tmp_path / "no_data"), "--num-shadows", "4"])
    with pytest.raises(FileNotFoundError, match="keep.npy"):
        mia_lira.main([*base, "--scores-from", str(tmp_path)])
    assert not out.exists()


# -------------------------------------------------------------------------------------- orchestration (stand-in stages)

FAKE_STAGE = """
import json, os, shutil, sys
from pathlib import Path
argv = sys.argv[1:]
get = lambda flag: argv[argv.index(flag) + 1] if flag in argv else None
out = Path(get("--output-dir"))
if get("--subset-mask") and not Path(get("--subset-mask")).is_file():  # a real stage np.load()s it
    sys.exit(f"no mask {get('--subset-mask')} in {os.getcwd()}")
out.mkdir(parents=True, exist_ok=True)
with open(os.environ["FAKE_STAGE_LOG"], "a") as f:
    f.write(json.dumps([Path(sys.argv[0]).name] + argv) + "\\n")
manifest = {"config": {}}
if Path(sys.argv[0]).name == "train_cls.py":  # a classifier as train_cls.py describes it; weights from the test
    shutil.copy(os.environ["FAKE_STAGE_WEIGHTS"], out / "model.safetensors")
    transform = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
                 "crop_pct": 1.0, "crop_mode": "center"}
    manifest["classifier"] = {"model": "resnet18", "num_classes": 3, "weights": "model.safetensors",
                              "eval_transform": transform, "classes": json.loads(os.environ["FAKE_STAGE_CLASSES"])}
(out / "manifest.json").write_text(json.dumps(manifest))
"""


@pytest.fixture()
def fake_stages(tmp_path, monkeypatch, tiny_dataset):
    import timm
    from safetensors.torch import save_file

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("finetune.py", "synthesize.py", "train_cls.py"):
        (scripts / name).write_text(FAKE_STAGE)
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", num_classes=3).state_dict(), str(tmp_path / "weights.safetensors"))
    classes = load_dataset("demo", tiny_dataset, "train").classes
    monkeypatch.setattr(mia_lira, "PROJECT_DIR", scripts)
    monkeypatch.setenv("FAKE_STAGE_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_STAGE_WEIGHTS", str(tmp_path / "weights.safetensors"))
    monkeypatch.setenv("FAKE_STAGE_CLASSES", json.dumps(classes))
    return tmp_path / "calls.jsonl"


def read_calls(log: Path):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def test_shadow_pipelines_run_resume_and_score(tmp_path, tiny_dataset, fake_stages):
    out = tmp_path / "lira"
    argv = [
        "--dataset",
        "demo",
        "--data-root",
        str(tiny_dataset),
        "--output-dir",
        str(out),
        *"--num-shadows 4 --num-workers 0 --pretrained-model gen/sd --train-cls-args".split(),
        "--epochs 1",
    ]
    metrics = mia_lira.main(argv)
    calls = read_calls(fake_stages)
    assert [c[0] for c in calls] == ["finetune.py", "synthesize.py", "train_cls.py"] * 4 + ["train_cls.py"] * 4
    keep = np.load(out / "keep.npy")
    assert keep.shape == (4, 12) and (keep.sum(0) == 2).all()
    seeds = set()
    for c in calls:
        flag = lambda f: c[c.index(f) + 1] if f in c else None  # noqa: E731
        seeds.add((c[0], flag("--seed")))
        if c[0] == "finetune.py" or (c[0] == "train_cls.py" and flag(mia_lira.CLS_TRAIN_DIRS) == "real"):
            shadow = int(Path(flag("--subset-mask")).stem.split("_")[1])
            assert np.array_equal(np.load(flag("--subset-mask")), keep[shadow])
        if c[0] == "train_cls.py":
            assert c[-2:] == ["--epochs", "1"]
            if flag(mia_lira.CLS_TRAIN_DIRS) != "real":  # the synthetic arm trains on its own shadow's images
                assert flag("--subset-mask") is None and flag(mia_lira.CLS_TRAIN_DIRS).endswith("synth")
                assert Path(flag(mia_lira.CLS_TRAIN_DIRS)).parent == Path(flag("--output-dir")).parent
        if c[0] == "synthesize.py":
            assert flag(mia_lira.SYNTH_SCALE) == "1" and flag("--pretrained-model") == "gen/sd"
            assert Path(flag(mia_lira.SYNTH_FINETUNE_DIR)).parent == Path(flag("--output-dir")).parent
    assert len({s for _, s in seeds}) == 4  # one seed per shadow, shared by its stages
    scores = np.load(out / "scores_real.npy")
    assert scores.shape == (4, 12, 2) and np.isfinite(scores).all()
    assert set(metrics) == {"real", "synthetic"} and set(metrics["real"]) == set(mia_lira.ATTACKS)

    # Interrupted experiment: the run is not complete and one shadow lost its classifier -> only that stage reruns.
    (out / "manifest.json").unlink()
    (out / "shadows" / "real" / "shadow_02" / "cls" / "manifest.json").unlink()
    fake_stages.unlink()
    mia_lira.main(argv)
    calls = read_calls(fake_stages)
    assert len(calls) == 1 and calls[0][0] == "train_cls.py"
    assert "shadow_02" in calls[0][calls[0].index("--output-dir") + 1]


def test_test_split_reaches_every_shadow_classifier_and_not_the_identity(tmp_path, tiny_dataset, fake_stages):
    base = ["--dataset", "demo", "--data-root", str(tiny_dataset), "--output-dir", str(tmp_path / "lira")]
    argv = base + [*"--num-shadows 4 --num-workers 0 --arms real --train-cls-args".split(), "--epochs 1"]
    mia_lira.main(argv + ["--test-split", "val"])
    calls = read_calls(fake_stages)
    assert len(calls) == 4 and all(c[c.index("--test-split") + 1] == "val" for c in calls)
    assert mia_lira.main(argv) == mia_lira.main(argv + ["--test-split", "test"])  # finished: no config mismatch
    assert len(read_calls(fake_stages)) == 4  # and no shadow ran again
    fake_stages.unlink()
    mia_lira.main(base + [*"--num-shadows 4 --num-workers 0 --arms real".split(), "--output-dir", str(tmp_path / "b")])
    assert not any("--test-split" in c for c in read_calls(fake_stages))  # the default leaves train_cls's own


def test_sharded_jobs_wait_for_each_other(tmp_path, tiny_dataset, fake_stages):
    out = tmp_path / "lira"
    base = [
        "--dataset",
        "demo",
        "--data-root",
        str(tiny_dataset),
        "--output-dir",
        str(out),
        *"--num-shadows 4 --num-workers 0 --arms real".split(),
    ]
    assert mia_lira.main(base + ["--shard", "0/2"]) == {"status": "partial"}
    assert len(read_calls(fake_stages)) == 2 and not (out / "manifest.json").exists()
    metrics = mia_lira.main(base + ["--shard", "1/2"])
    assert len(read_calls(fake_stages)) == 4 and set(metrics) == {"real"}


def test_relative_paths_mean_the_working_directory(tmp_path, tiny_dataset, fake_stages, monkeypatch):
    """The stages ran in the project folder, so `--output-dir lira` run from elsewhere left them looking for
    lira/masks/shadow_00.npy there."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_dataset, work / "mydata")
    monkeypatch.chdir(work)
    argv = [*"--dataset demo --data-root mydata --output-dir lira --num-shadows 4 --num-workers 0".split()]
    metrics = mia_lira.main(argv)
    assert set(metrics) == {"real", "synthetic"}
    assert (work / "lira" / "shadows" / "synthetic" / "shadow_03" / "cls" / "manifest.json").is_file()
    assert len(read_calls(fake_stages)) == 16


def test_stage_scripts_missing_beside_it_fail_at_start(tmp_path, tiny_dataset, monkeypatch):
    """mia_lira.py copied alone: a clear error before the run dir, not a failed shadow after the keep matrix."""
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "train_cls.py").write_text("")
    monkeypatch.setattr(mia_lira, "PROJECT_DIR", tmp_path / "alone")
    out = tmp_path / "lira"
    argv = ["--dataset", "demo", "--data-root", str(tiny_dataset), "--output-dir", str(out), "--num-shadows", "4"]
    with pytest.raises(FileNotFoundError, match=r"lacks finetune.py, synthesize.py: copy"):
        mia_lira.main(argv)
    assert not out.exists()


def test_failed_stage_names_the_command(tmp_path, tiny_dataset, fake_stages):
    (mia_lira.PROJECT_DIR / "train_cls.py").write_text("import sys; sys.exit(3)")
    argv = [
        "--dataset",
        "demo",
        "--data-root",
        str(tiny_dataset),
        "--output-dir",
        str(tmp_path / "lira"),
        *"--num-shadows 4 --arms real".split(),
    ]
    with pytest.raises(RuntimeError, match=r"real shadow 0 failed in `.*train_cls.py"):
        mia_lira.main(argv)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_shadow_commands_leave_an_unset_data_root_to_the_stages():
    """With the data root from configs/paths.yaml or the environment, args.data_root is None: passing the string
    'None' on made every shadow stage look for None/train."""
    args = mia_lira.get_parser().parse_args(["--dataset", "in10"])
    args.stage_config = None
    cmd = mia_lira.stage_command(args, "train_cls.py", Path("out"), 3, None, [])
    assert "--data-root" not in cmd and "None" not in cmd
    args.data_root = "/data/imagenet"
    cmd = mia_lira.stage_command(args, "train_cls.py", Path("out"), 3, None, [])
    assert cmd[cmd.index("--data-root") + 1] == "/data/imagenet"
