"""eval_gap.py: each figure against a closed form or a brute-force computation, per class, the cache, the stage."""

import json

import numpy as np
import pytest

import eval_gap
from conftest import TINY_CLASSES, make_imagefolder


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


def test_per_class_figures_split_by_label():
    rng = np.random.default_rng(3)
    real, real_y = rng.normal(size=(40, 2)), np.repeat([0, 1], 20)
    other = real.copy()
    other[20:] += 5.0  # class 1 shifted, class 0 identical
    args = eval_gap.get_parser().parse_args(["--kid-subsets", "2", "--kid-subset-size", "10"])
    per = eval_gap.per_class_figures(real, real_y, other, real_y, ["a", "b"], args)
    assert per["a"]["fid"] == pytest.approx(0.0, abs=1e-6) and per["b"]["fid"] > 40


def test_stage_on_a_tiny_set_writes_results_and_reuses_the_cache(tmp_path, tiny_clip_vision):
    from common import write_json, write_jsonl

    data = tmp_path / "data"
    make_imagefolder(data / "train", TINY_CLASSES, 5, seed=0)
    make_imagefolder(data / "val", TINY_CLASSES, 4, seed=1)
    synth = make_imagefolder(tmp_path / "synth_x1", TINY_CLASSES, 4, seed=2)
    rows = [{"file": f"{c}/{p.name}", "label": i} for i, c in enumerate(TINY_CLASSES) for p in (synth / c).iterdir()]
    write_jsonl(synth / "manifest.jsonl", rows)
    write_json(synth / "classes.json", {"classes": TINY_CLASSES, "class_names": TINY_CLASSES})
    argv = f"--dataset imagefolder --data-root {data} --synthetic-dir {synth} --kid-subsets 3 --kid-subset-size 8"
    argv = argv.split() + ["--features", f"clip:{tiny_clip_vision}", "--output-dir", str(tmp_path / "gap")]
    metrics = eval_gap.main(argv)
    results = json.loads((tmp_path / "gap" / "results.json").read_text())
    assert set(results["per_class"]) == set(TINY_CLASSES) and results["held_out_split"] == "val"
    assert metrics["fid"] >= 0 and 0 <= metrics["precision"] <= 1 and "floor_fid" in metrics
    for name in ("results.md", "per_class.png", "precision_recall.png", "manifest.json"):
        assert (tmp_path / "gap" / name).is_file()
    cached = sorted((tmp_path / "gap_features").iterdir())
    assert len(cached) == 3
    mtimes = [p.stat().st_mtime_ns for p in cached]
    eval_gap.main(argv[:-1] + [str(tmp_path / "gap2")])  # another run, same sets: every feature file reused
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "gap_features").iterdir())] == mtimes
    (synth / TINY_CLASSES[0] / rows[0]["file"].split("/")[1]).unlink()
    write_jsonl(synth / "manifest.jsonl", rows[1:])
    eval_gap.main(argv[:-1] + [str(tmp_path / "gap3")])  # the synthetic set changed: embedded again, reals reused
    assert len(list((tmp_path / "gap_features").iterdir())) == 4


def test_a_missing_feature_model_fails_before_the_run_dir_exists(tmp_path):
    from conftest import make_imagefolder

    data = make_imagefolder(tmp_path / "data" / "train", TINY_CLASSES, 3).parent
    make_imagefolder(data / "val", TINY_CLASSES, 3)
    synth = tmp_path / "synth"
    make_imagefolder(synth, TINY_CLASSES, 3)
    from common import write_json, write_jsonl

    write_jsonl(
        synth / "manifest.jsonl", [{"file": f"{c}/{c}_000.png", "label": i} for i, c in enumerate(TINY_CLASSES)]
    )
    write_json(synth / "classes.json", {"classes": TINY_CLASSES, "class_names": TINY_CLASSES})
    argv = f"--dataset imagefolder --data-root {data} --synthetic-dir {synth} --features clip:{tmp_path / 'nope'}"
    with pytest.raises(OSError):
        eval_gap.main(argv.split() + ["--output-dir", str(tmp_path / "gap")])
    assert not (tmp_path / "gap").exists()
