"""eval_gap.py: each figure against a closed form or a brute-force computation, per class, the cache, the stage."""

import json

import numpy as np
import pytest
from conftest import TINY_CLASSES, as_made_before, make_imagefolder, moved_aside_before

import eval_gap
from common import ImageReadError, write_json, write_jsonl

TINY_RUN = "--dataset imagefolder --workers 0"  # tiny sets on a shared CPU: no loader processes to start


def tiny_gap_sets(tmp_path, train: int, val: int, synthetic: int, name: str = "synth"):
    """A real train / val split and a synthesize.py-layout set of that many images per class under tmp_path:
    (data root, set dir, the set's manifest rows)."""
    data = tmp_path / "data"
    make_imagefolder(data / "train", TINY_CLASSES, train, seed=0)
    make_imagefolder(data / "val", TINY_CLASSES, val, seed=1)
    synth = make_imagefolder(tmp_path / name, TINY_CLASSES, synthetic, seed=2)
    rows = [{"file": f"{c}/{p.name}", "label": i} for i, c in enumerate(TINY_CLASSES) for p in (synth / c).iterdir()]
    write_jsonl(synth / "manifest.jsonl", rows)
    write_json(synth / "classes.json", {"classes": TINY_CLASSES, "class_names": TINY_CLASSES})
    return data, synth, rows


def test_fid_of_a_set_with_itself_is_zero_and_of_gaussians_the_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4))
    assert eval_gap.fid(x, x) == pytest.approx(0.0, abs=1e-8)
    # N(0, I) vs N(m, 4I) in D dims: |m|^2 + D (1 + 4 - 2*2) = |m|^2 + D
    mu1, cov1, mu2, cov2 = np.zeros(3), np.eye(3), np.array([1.0, 2.0, 0.0]), 4 * np.eye(3)
    assert eval_gap.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(5.0 + 3.0)
    a, b = rng.normal(size=(20000, 3)), rng.normal(size=(20000, 3)) * 2 + mu2  # the same, from samples
    assert eval_gap.fid(a, b) == pytest.approx(8.0, rel=0.03)


def test_kid_is_unbiased_on_equal_distributions_and_positive_on_different_ones():
    rng = np.random.default_rng(1)
    same = [eval_gap.kid(rng.normal(size=(200, 5)), rng.normal(size=(200, 5)), 10, 100, s)[0] for s in range(20)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))  # centred at 0: unbiased
    mean, std = eval_gap.kid(rng.normal(size=(300, 5)), rng.normal(1.0, 1.0, size=(300, 5)), 10, 100)
    assert mean > 3 * std and std > 0


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel_of_binkowski_et_al():
    """A subset as large as both sets holds every point (in another order), so each subset's value is the unbiased
    MMD² over all of them with k(a, b) = (a·b / D + 1)³, computed here pair by pair."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(12, 4)), rng.normal(0.4, 1.3, size=(12, 4))

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / 4 + 1) ** 3

    m = len(x)
    within_x = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    between = sum(k(a, b) for a in x for b in y) / (m * m)
    mean, std = eval_gap.kid(x, y, subsets=3, subset_size=100)
    assert mean == pytest.approx(within_x + within_y - 2 * between, rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)  # every subset is the whole of both sets


def test_prdc_matches_a_brute_force_computation():
    rng = np.random.default_rng(2)
    real, fake, k = rng.normal(size=(30, 3)), rng.normal(0.5, 1.2, size=(25, 3)), 3

    def kth(points, i):
        d = sorted(np.linalg.norm(points - points[i], axis=1))
        return d[k]  # d[0] is the point itself

    r_rad = [kth(real, i) for i in range(len(real))]
    f_rad = [kth(fake, j) for j in range(len(fake))]
    dist = lambda a, b: np.linalg.norm(a - b)  # noqa: E731
    precision = np.mean([any(dist(f, real[i]) < r_rad[i] for i in range(30)) for f in fake])
    recall = np.mean([any(dist(r, fake[j]) < f_rad[j] for j in range(25)) for r in real])
    density = np.mean([sum(dist(f, real[i]) < r_rad[i] for i in range(30)) for f in fake]) / k
    coverage = np.mean([min(dist(real[i], f) for f in fake) < r_rad[i] for i in range(30)])
    got = eval_gap.prdc(real, fake, k)
    assert got == pytest.approx({"precision": precision, "recall": recall, "density": density, "coverage": coverage})
    assert eval_gap.prdc(real, real, k)["precision"] == 1.0


def test_linear_mmd_is_the_papers_form():
    x, y = np.ones((4, 2)), np.zeros((5, 2))
    assert eval_gap.linear_mmd(x, y) == pytest.approx(1.0)  # |(1,1)|^2 / 2


def streamed(x, y, args, chunks=1):
    """GapStats of features x (labels y) added in `chunks` batches, with its sample plan."""
    plan = eval_gap.sample_plan(y, args)
    stats = eval_gap.GapStats(int(y.max()) + 1)
    for part in np.array_split(np.arange(len(x)), chunks):
        stats.add(part, x[part], y[part], plan.positions())
    return eval_gap.EmbeddedSet(stats, plan)


def test_per_class_figures_split_by_label():
    rng = np.random.default_rng(3)
    real, real_y = rng.normal(size=(40, 2)), np.repeat([0, 1], 20)
    other = real.copy()
    other[20:] += 5.0  # class 1 shifted, class 0 identical
    args = eval_gap.get_parser().parse_args(["--kid-subsets", "2", "--kid-subset-size", "10"])
    per = eval_gap.streamed_per_class(streamed(real, real_y, args), streamed(other, real_y, args), ["a", "b"], args)
    assert per["a"]["fid"] == pytest.approx(0.0, abs=1e-6) and per["b"]["fid"] > 40
    assert per["b"]["images"] == 20
    # a class of 3 images has its figures; one of 2 has none and is left out
    few = np.repeat([0, 1, 2, 3], [20, 20, 3, 2])
    real4, other4 = np.vstack([real, rng.normal(size=(5, 2))]), np.vstack([other, rng.normal(size=(5, 2))])
    names = ["a", "b", "c", "d"]
    per = eval_gap.streamed_per_class(streamed(real4, few, args), streamed(other4, few, args), names, args)
    assert set(per) == {"a", "b", "c"} and per["c"]["images"] == 3


def test_streamed_figures_equal_the_in_memory_ones_and_parts_merge_exactly(tmp_path):
    """Below the sample sizes every streamed figure equals gap_figures on the whole arrays; above them FID and the
    linear MMD stay exact over every image. Parts (shards, resumed chunks) merge to the single pass, via disk too."""
    rng = np.random.default_rng(4)
    # float32 values (the sampled rows are kept as float32, as extractors give them)
    x, xy = rng.normal(size=(300, 6)).astype(np.float32).astype(np.float64), rng.integers(0, 3, 300)
    z, zy = rng.normal(0.3, 1.1, size=(250, 6)).astype(np.float32).astype(np.float64), rng.integers(0, 3, 250)
    args = eval_gap.get_parser().parse_args("--kid-subsets 5 --kid-subset-size 50 --prdc-images 400".split())
    whole = eval_gap.streamed_figures(streamed(x, xy, args, 7), streamed(z, zy, args, 3), args)
    assert whole == pytest.approx(eval_gap.gap_figures(x, z, args), rel=1e-9, abs=1e-12)
    small = eval_gap.get_parser().parse_args("--kid-subsets 5 --kid-subset-size 20 --prdc-images 40".split())
    sampled = eval_gap.streamed_figures(streamed(x, xy, small), streamed(z, zy, small), small)
    assert sampled["fid"] == pytest.approx(eval_gap.fid(x, z), rel=1e-9)  # over all 300 / 250, not the 40 kept
    assert sampled["linear_mmd"] == pytest.approx(eval_gap.linear_mmd(x, z), rel=1e-9)
    # two parts, saved and loaded, merge into the one-pass statistics
    one = streamed(x, xy, small)
    keep = one.sample.positions()
    parts = []
    for k, idx in enumerate((np.arange(0, 300, 2), np.arange(1, 300, 2))):
        part = eval_gap.GapStats(3)
        part.add(idx, x[idx], xy[idx], keep)
        part.save(tmp_path / f"p{k}.safetensors")
        parts.append(eval_gap.GapStats.load(tmp_path / f"p{k}.safetensors"))
    merged = parts[0].merge(parts[1])
    assert np.allclose(merged.outer, one.stats.outer) and np.array_equal(merged.count, one.stats.count)
    assert merged.rows.keys() == one.stats.rows.keys() and merged.done == 300


def test_stage_on_a_tiny_set_writes_results_and_reuses_the_cache(tmp_path, tiny_clip_vision, monkeypatch):
    data, synth, rows = tiny_gap_sets(tmp_path, 5, 4, 4, "synth_x1")
    argv = f"{TINY_RUN} --data-root {data} --synthetic-dir {synth} --kid-subsets 3 --kid-subset-size 8"
    argv = argv.split() + ["--features", f"clip:{tiny_clip_vision}", "--output-dir", str(tmp_path / "gap")]
    metrics = eval_gap.main(argv)
    results = json.loads((tmp_path / "gap" / "results.json").read_text())
    assert set(results["per_class"]) == set(TINY_CLASSES) and results["held_out_split"] == "val"
    assert metrics["fid"] >= 0 and 0 <= metrics["precision"] <= 1 and "floor_fid" in metrics
    for name in ("results.md", "per_class.png", "precision_recall.png", "manifest.json"):
        assert (tmp_path / "gap" / name).is_file()
    cached = sorted((tmp_path / "gap_features").iterdir())
    assert len(cached) == 3 and not [p for p in cached if ".part-" in p.name]  # parts merged into one file per set
    mtimes = [p.stat().st_mtime_ns for p in cached]
    eval_gap.main(argv[:-1] + [str(tmp_path / "gap2")])  # another run, same sets: every statistics file reused
    monkeypatch.setattr(eval_gap, "clip_features", lambda *a: pytest.fail("a finished run's re-run loaded the model"))
    assert eval_gap.main(argv) == metrics
    monkeypatch.undo()
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "gap_features").iterdir())] == mtimes
    # Two jobs (--shard 0/2, 1/2), into fresh caches: the first leaves its parts and no figures, the second merges
    # them and writes the same figures as the single job.
    sharded = tmp_path / "sharded" / "gap"
    assert eval_gap.main(argv[:-1] + [str(sharded), "--shard", "0/2"]) is None
    assert not (sharded / "results.json").exists()
    again = eval_gap.main(argv[:-1] + [str(sharded), "--shard", "1/2"])
    strip = lambda m: {k: v for k, v in m.items() if k != "elapsed_s"}  # noqa: E731
    # other batches give float32 features that differ in the last bits, and FID's sqrtm magnifies them a little
    assert strip(again) == pytest.approx(strip(metrics), rel=1e-4)
    (synth / TINY_CLASSES[0] / rows[0]["file"].split("/")[1]).unlink()
    write_jsonl(synth / "manifest.jsonl", rows[1:])
    eval_gap.main(argv[:-1] + [str(tmp_path / "gap3")])  # the synthetic set changed: embedded again, reals reused
    assert len(list((tmp_path / "gap_features").iterdir())) == 4


def test_an_interrupted_part_resumes_where_it_stopped(tmp_path, tiny_clip_vision, monkeypatch):
    data, synth, _ = tiny_gap_sets(tmp_path, 6, 3, 6)
    argv = f"{TINY_RUN} --data-root {data} --synthetic-dir {synth} --kid-subsets 3 --kid-subset-size 8"
    argv = argv.split() + ["--features", f"clip:{tiny_clip_vision}", "--batch-size", "4", "--checkpoint-every", "4"]
    clean = eval_gap.main(argv + ["--output-dir", str(tmp_path / "clean" / "gap")])
    real_clip = eval_gap.clip_features
    seen = []

    def dies_after_two_batches(model_id, device):
        extractor = real_clip(model_id, device)

        def counted(x):
            if len(seen) == 2:
                raise KeyboardInterrupt
            seen.append(len(x))
            return extractor.forward(x)

        return eval_gap.Extractor(counted, extractor.transform)

    monkeypatch.setattr(eval_gap, "clip_features", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        eval_gap.main(argv + ["--output-dir", str(tmp_path / "killed" / "gap")])
    monkeypatch.setattr(eval_gap, "clip_features", real_clip)
    part = [p for p in (tmp_path / "killed" / "gap_features").iterdir() if ".part-" in p.name]
    assert len(part) == 1 and eval_gap.GapStats.load(part[0]).done == 8  # two batches of 4 kept
    resumed = eval_gap.main(argv + ["--output-dir", str(tmp_path / "killed" / "gap")])
    strip = lambda m: {k: v for k, v in m.items() if k != "elapsed_s"}  # noqa: E731
    assert strip(resumed) == pytest.approx(strip(clean), rel=1e-4)


@pytest.mark.parametrize(
    "spec, error",
    [
        ("clip:{tmp}/nope", FileNotFoundError),  # a missing directory, not the hub's "malformed repo id"
        ("timm:resnet5", ValueError),
        ("classifier:{tmp}/nope", FileNotFoundError),
        ("foo", ValueError),
    ],
)
def test_a_features_spec_naming_no_model_fails_before_the_run_dir_exists(tmp_path, spec, error):
    data, synth, _ = tiny_gap_sets(tmp_path, 3, 3, 3)
    argv = f"{TINY_RUN} --data-root {data} --synthetic-dir {synth} --features {spec.format(tmp=tmp_path)}"
    with pytest.raises(error, match="nope|resnet5|foo"):
        eval_gap.main(argv.split() + ["--output-dir", str(tmp_path / "gap")])
    assert not (tmp_path / "gap").exists()


def test_the_feature_cache_key_names_the_weights_not_just_the_kind(tmp_path):
    """Another --clip-model (or a retrained classifier) must not be served the cached features of the first."""
    args = eval_gap.get_parser().parse_args([])
    for name, weights in (("a", b"one"), ("b", b"two"), ("c", b"one")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(weights)
    space = {name: eval_gap.feature_space(f"clip:{tmp_path / name}", args) for name in "abc"}
    assert space["a"] != space["b"] and space["a"] == space["c"]  # by content, not by path
    args.clip_model = str(tmp_path / "b")
    assert eval_gap.feature_space("clip", args) == space["b"]  # the default space is --clip-model's
    run = tmp_path / "cls"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"first")
    before = eval_gap.feature_space(f"classifier:{run}", args)
    write_json(run / "manifest.json", {"metrics": {"top1": 2.0}})  # tested again: the same weights, the same space
    assert eval_gap.feature_space(f"classifier:{run}", args) == before
    (run / "model.safetensors").write_bytes(b"second")  # trained again
    assert eval_gap.feature_space(f"classifier:{run}", args) != before
    assert "/" not in before and ":" not in eval_gap.feature_space("timm:org/model", args)  # a file-name fragment


def test_a_corrupt_real_image_fails_up_front_unless_skip_bad(tmp_path, tiny_clip_vision):
    """Checked before any work, as in finetune and train_cls: it used to fail mid-embedding with a traceback."""
    data = make_imagefolder(tmp_path / "data" / "train", TINY_CLASSES, 3).parent
    make_imagefolder(data / "val", TINY_CLASSES, 3)
    (data / "train" / TINY_CLASSES[0] / "broken.jpg").write_text("not an image")
    synth = tmp_path / "synth"
    make_imagefolder(synth, TINY_CLASSES, 3)
    write_jsonl(
        synth / "manifest.jsonl", [{"file": f"{c}/{c}_000.png", "label": i} for i, c in enumerate(TINY_CLASSES)]
    )
    write_json(synth / "classes.json", {"classes": TINY_CLASSES, "class_names": TINY_CLASSES})
    argv = f"{TINY_RUN} --data-root {data} --synthetic-dir {synth} --features clip:{tiny_clip_vision}".split()
    argv += ["--prdc-images", "6", "--kid-subset-size", "3", "--kid-subsets", "2", "--per-class-images", "3"]
    with pytest.raises(ImageReadError, match=r"(?s)broken\.jpg.*--skip-bad"):
        eval_gap.main([*argv, "--output-dir", str(tmp_path / "gap")])
    assert not (tmp_path / "gap").exists()
    metrics = eval_gap.main([*argv, "--skip-bad", "--output-dir", str(tmp_path / "gap")])
    assert metrics["fid"] >= 0
    skipped = json.loads((tmp_path / "gap" / "manifest.json").read_text())["inputs"]["skipped_bad"]
    assert list(skipped["train"]) == [f"{TINY_CLASSES[0]}/broken.jpg"] and skipped["val"] == {}  # listed, as promised
    # held-out and the split it resolves to are one run (as in train_cls), also for a run that hashed the option
    manifest = tmp_path / "gap" / "manifest.json"
    old = json.loads(manifest.read_text())
    write_json(manifest, {**old, "config": {**old["config"], "test_split": "held-out"}})  # as written before
    assert eval_gap.main([*argv, "--skip-bad", "--test-split", "val", "--output-dir", str(tmp_path / "gap")]) == metrics


def small_gap_run(tmp_path, clip, out) -> list[str]:
    """eval_gap's arguments for a tiny real train / val split and a synthetic set under tmp_path."""
    data, synth, _ = tiny_gap_sets(tmp_path, 4, 3, 3)
    argv = f"{TINY_RUN} --data-root {data} --synthetic-dir {synth} --kid-subsets 2 --kid-subset-size 6"
    return argv.split() + ["--features", f"clip:{clip}", "--output-dir", str(out)]


def test_a_finished_run_is_not_served_for_other_feature_weights(tmp_path, tiny_clip_vision):
    """The weights behind --features are the run's identity: a feature model changed in place (a CLIP dir saved
    again, a classifier trained again) is a config mismatch, not 'already finished' with the old figures."""
    import shutil

    from safetensors.torch import load_file, save_file

    from common import ConfigMismatchError

    clip = shutil.copytree(tiny_clip_vision, tmp_path / "clip")
    argv = small_gap_run(tmp_path, clip, tmp_path / "gap")
    eval_gap.main(argv)
    weights = next(clip.glob("*.safetensors"))
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ConfigMismatchError, match="feature_space"):
        eval_gap.main(argv)


def test_a_run_moved_aside_while_computing_writes_no_figures_into_its_successor(
    tmp_path, tiny_clip_vision, monkeypatch
):
    from common import RunMovedError

    out = tmp_path / "gap"
    argv = small_gap_run(tmp_path, tiny_clip_vision, out)
    moved_aside_before(monkeypatch, eval_gap, "all_figures", out)
    with pytest.raises(RunMovedError):
        eval_gap.main(argv)
    assert {p.name for p in out.iterdir()} <= {"run_config.json", "log.txt", ".writer-0of1.lock"}  # the new run's


def test_a_set_or_feature_model_moved_or_spelled_otherwise_is_the_same_run(tmp_path, tiny_clip_vision, monkeypatch):
    """The set's and the feature model's files are the identity (sets, feature_space), not their paths: a runs folder
    moved or a relative path for an absolute one was a config mismatch naming 'synthetic_dir' or 'features'. A run
    made while the paths were hashed is adopted."""
    import shutil

    clip = shutil.copytree(tiny_clip_vision, tmp_path / "clip")
    out = tmp_path / "gap"
    argv = small_gap_run(tmp_path, clip, out)
    first = eval_gap.main(argv)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "moved").mkdir()
    (tmp_path / "synth").rename(tmp_path / "moved" / "synth")
    relative = {str(tmp_path / "synth"): "moved/synth", f"clip:{clip}": "clip:clip"}
    argv = [relative.get(a, a) for a in argv]
    assert eval_gap.main(argv) == first
    as_made_before(out, synthetic_dir=str(tmp_path / "synth"), features=f"clip:{clip}")
    assert eval_gap.main(argv) == first
