"""eval_ood.py: OOD set layouts, label spaces and logit masks, end to end on a tiny classifier, logit cache."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import as_made_before, make_imagefolder, moved_aside_before, writer_elsewhere
from PIL import Image
from safetensors.torch import save_file

import common
import eval_ood
from common import DATA_DIR, read_lines

IN1K = read_lines(DATA_DIR / "imagenet1k_wnids.txt")
IN_R = read_lines(DATA_DIR / "imagenet_r_wnids.txt")
IN_A = read_lines(DATA_DIR / "imagenet_a_wnids.txt")
EVAL_TF = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "crop_pct": 0.95,
    "crop_mode": "center",
}


def put_images(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / f"img_{i}.jpg")


def make_classifier(root: Path, classes: list[str]) -> Path:
    """A train_cls.py-layout run made by hand: random test_resnet weights + a manifest describing them."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=len(classes), output_stride=8)
    root.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "model.safetensors")
    info = {
        "model": "test_resnet",
        "num_classes": len(classes),
        "model_kwargs": {"output_stride": 8},
        "weights": "model.safetensors",
        "eval_transform": EVAL_TF,
        "classes": classes,
        "class_names": classes,
    }
    (root / "manifest.json").write_text(json.dumps({"config": {}, "metrics": {}, "classifier": info}))
    return root


def reference_accuracy(run: Path, paths, ids, space) -> tuple[float, float, int]:
    """Independent scoring: own forward pass, numpy masking over the classes shared with the set."""
    import timm
    from safetensors.torch import load_file
    from timm.data import create_transform

    info = json.loads((run / "manifest.json").read_text())["classifier"]
    model = timm.create_model("test_resnet", num_classes=info["num_classes"], output_stride=8)
    model.load_state_dict(load_file(run / "model.safetensors"))
    tf = create_transform(**EVAL_TF)
    keep = [c for c in info["classes"] if c in space]
    rows = [i for i, c in enumerate(ids) if c in keep]
    with torch.no_grad():
        logits = model.eval()(torch.stack([tf(Image.open(paths[i]).convert("RGB")) for i in rows])).numpy()
    cols = [info["classes"].index(c) for c in keep]
    sub = logits[:, cols]
    target = np.array([keep.index(ids[i]) for i in rows])
    order = np.argsort(-sub, axis=1)
    top1 = 100 * np.mean(order[:, 0] == target)
    top5 = 100 * np.mean([t in o[:5] for t, o in zip(target, order)])
    return top1, top5, len(rows)


def test_imagenet_v2_integer_folders_are_class_indices_not_strings(tmp_path):
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    for c in range(1000):
        (root / str(c)).mkdir(parents=True)
    for c in (2, 10, 100, 999):  # sorted as strings: '10' < '100' < '2' < '999'
        put_images(root / str(c), 2, seed=c)
    v2 = eval_ood.read_imagenet_set("imagenet-v2", str(root))
    paths, ids, space = v2.paths, v2.ids, v2.space
    assert space == IN1K
    assert [(Path(p).parent.name, w) for p, w in zip(paths, ids)] == [
        (str(c), IN1K[c]) for c in sorted((2, 10, 100, 999), key=str) for _ in range(2)
    ]
    # a copy with wnid-named folders reads the same labels
    wnid_root = tmp_path / "v2_wnids"
    for c in (2, 10):
        put_images(wnid_root / IN1K[c], 1, seed=c)
    assert eval_ood.read_imagenet_set("imagenet-v2", str(wnid_root)).ids == [IN1K[2], IN1K[10]]
    (root / "1000").mkdir()
    with pytest.raises(ValueError, match="neither a wnid"):
        eval_ood.read_imagenet_set("imagenet-v2", str(root))


def test_sketch_archive_level_and_foreign_classes(tmp_path):
    put_images(tmp_path / "ImageNet-Sketch" / "sketch" / IN1K[5], 2, seed=0)
    put_images(tmp_path / "ImageNet-Sketch" / "sketch" / IN1K[700], 1, seed=1)
    sketch = eval_ood.read_imagenet_set("imagenet-sketch", str(tmp_path / "ImageNet-Sketch"))
    assert sketch.ids == [IN1K[5]] * 2 + [IN1K[700]] and len(sketch.space) == 1000
    not_r = next(w for w in IN1K if w not in IN_R)
    put_images(tmp_path / "r" / not_r, 1, seed=2)
    with pytest.raises(ValueError, match="not in imagenet_r_wnids"):
        eval_ood.read_imagenet_set("imagenet-r", str(tmp_path / "r"))


def test_200_logit_mask_for_a_1000_way_model():
    rng = np.random.default_rng(0)
    n = 300
    ids = [IN_A[i] for i in rng.integers(0, 200, n)]
    logits = torch.from_numpy(rng.normal(size=(n, 1000)).astype(np.float32))
    res = eval_ood.score_set(logits, ids, IN1K, IN_A)
    mask = np.array([w in set(IN_A) for w in IN1K])
    masked = logits.numpy().copy()
    masked[:, ~mask] = -np.inf
    target = np.array([IN1K.index(w) for w in ids])
    assert res["top1"] == pytest.approx(100 * np.mean(masked.argmax(1) == target))
    top5 = np.argsort(-masked, 1)[:, :5]
    assert res["top5"] == pytest.approx(100 * np.mean([t in row for t, row in zip(target, top5)]))
    assert res["logit_mask"] and res["classes_scored"] == 200 and res["images"] == n
    unmasked_top5 = np.argsort(-logits.numpy(), 1)[:, :5]
    unmasked = 100 * np.mean([t in row for t, row in zip(target, unmasked_top5)])
    assert res["top5"] > unmasked  # the mask matters: random logits mostly peak outside the 200 classes


def test_subset_classifier_scores_only_shared_classes():
    model_classes = [IN_R[0], IN1K[0] if IN1K[0] not in IN_R else IN1K[1], IN_R[5]]
    ids = [IN_R[0], IN_R[5], IN_R[7], IN_R[5]]  # IN_R[7]: a class the classifier does not know -> skipped
    logits = torch.tensor([[1.0, 9.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    res = eval_ood.score_set(logits, ids, model_classes, IN_R)
    # shared = classes 0 and 2; the big logit of class 1 (not in IN-R) is masked out: rows 0, 1 right, row 3 wrong
    assert res["images"] == 3 and res["classes_scored"] == 2 and res["logit_mask"]
    assert res["top1"] == 100.0 * 2 / 3  # exact: a count of images, not a float32 percentage
    assert res["top5"] == 100.0 and res["top5_k"] == 2
    with pytest.raises(ValueError, match="shares no class"):
        eval_ood.score_set(logits, ids, ["a", "b", "c"], IN_R)


def test_end_to_end_imagenet_layouts_and_cache(tmp_path):
    not_r = next(w for w in IN1K if w not in IN_R)
    classes = [IN_R[3], not_r, IN_R[150]]
    run = make_classifier(tmp_path / "cls_real", classes)
    v2 = tmp_path / "v2"
    for c in range(1000):
        (v2 / str(c)).mkdir(parents=True)
    for j, w in enumerate(classes + [IN_R[9]]):
        put_images(v2 / str(IN1K.index(w)), 3, seed=j)
    r = tmp_path / "imagenet-r"
    for j, w in enumerate([IN_R[3], IN_R[150], IN_R[9]]):
        put_images(r / w, 2, seed=10 + j)
    out = tmp_path / "ood"
    argv = [
        "--classifier",
        str(run),
        "--output-dir",
        str(out),
        *"--workers 0 --amp no --sets".split(),
        f"imagenet-v2={v2}",
    ]
    metrics = eval_ood.main(argv)
    v2_set = eval_ood.read_imagenet_set("imagenet-v2", str(v2))
    top1, top5, n = reference_accuracy(run, v2_set.paths, v2_set.ids, v2_set.space)
    assert metrics["imagenet-v2/top1"] == pytest.approx(top1) and metrics["imagenet-v2/top5"] == pytest.approx(top5)
    results = json.loads((out / "results.json").read_text())
    assert results["imagenet-v2"]["images"] == n == 9 and results["imagenet-v2"]["classes_scored"] == 3

    # adding a set computes only its logits; the v2 cache is reused untouched
    v2_cache = out / "logits" / "imagenet-v2.safetensors"
    mtime = v2_cache.stat().st_mtime_ns
    metrics = eval_ood.main(argv + [f"imagenet-r={r}"])
    assert v2_cache.stat().st_mtime_ns == mtime
    r_set = eval_ood.read_imagenet_set("imagenet-r", str(r))
    top1, top5, n = reference_accuracy(run, r_set.paths, r_set.ids, r_set.space)
    results = json.loads((out / "results.json").read_text())
    assert results["imagenet-r"]["images"] == n == 4 and results["imagenet-r"]["classes_scored"] == 2
    assert metrics["imagenet-r/top1"] == pytest.approx(top1)
    assert "| imagenet-r | 4 | 2 | yes |" in (out / "results.md").read_text()

    # unchanged, the finished run is a no-op; a set whose files changed is scored again (its held-out figures were
    # kept as they were), and only that set
    r_cache = out / "logits" / "imagenet-r.safetensors"
    mtimes = (v2_cache.stat().st_mtime_ns, r_cache.stat().st_mtime_ns)
    assert eval_ood.main(argv + [f"imagenet-r={r}"]) == metrics
    assert (v2_cache.stat().st_mtime_ns, r_cache.stat().st_mtime_ns) == mtimes
    put_images(r / IN_R[3], 2, seed=99)
    metrics = eval_ood.main(argv + [f"imagenet-r={r}"])
    assert v2_cache.stat().st_mtime_ns == mtimes[0] and r_cache.stat().st_mtime_ns != mtimes[1]
    r_set = eval_ood.read_imagenet_set("imagenet-r", str(r))
    assert metrics["imagenet-r/top1"] == pytest.approx(reference_accuracy(run, r_set.paths, r_set.ids, r_set.space)[0])


def test_dataset_splits_for_the_demo(tmp_path, tiny_dataset):
    classes = ["red_circle", "green_square", "blue_triangle"]
    root = tmp_path / "data"
    make_imagefolder(root / "test", classes, 2, seed=1)
    make_imagefolder(root / "sketch", classes, 3, seed=4)
    run = make_classifier(tmp_path / "cls_real", classes)
    metrics = eval_ood.main(
        [
            "--classifier",
            str(run),
            "--dataset",
            "demo",
            "--data-root",
            str(root),
            "--output-dir",
            str(tmp_path / "ood"),
            *"--workers 0 --amp no --sets test sketch".split(),
        ]
    )
    for split, n in (("test", 6), ("sketch", 9)):
        files = [p for c in classes for p in sorted((root / split / c).iterdir())]
        top1, top5, count = reference_accuracy(run, files, [p.parent.name for p in files], classes)
        assert count == n and metrics[f"{split}/top1"] == pytest.approx(top1)
        assert metrics[f"{split}/top5"] == pytest.approx(top5) == 100.0
    assert json.loads((tmp_path / "ood" / "results.json").read_text())["sketch"]["logit_mask"] is False
    # The data moved (copied with its times, as cp -a): every set is fingerprinted, so it is the same finished run.
    moved = str(shutil.copytree(root, tmp_path / "data_moved"))
    argv = ["--classifier", str(run), "--dataset", "demo", "--data-root", moved, "--output-dir", str(tmp_path / "ood")]
    assert eval_ood.main([*argv, *"--workers 0 --amp no --sets test sketch".split()]) == metrics


def test_test_split_names_the_held_out_set_and_bad_images_are_caught_up_front(tmp_path):
    """--test-split decides what --sets held-out means (val/ and test/ both exist here, which alone is an error); a
    truncated image in it stops the run naming the file unless --skip-bad, which scores the rest and lists it."""
    from common import ImageReadError

    classes = ["red_circle", "green_square", "blue_triangle"]
    root = tmp_path / "data"
    make_imagefolder(root / "val", classes, 2, seed=1)
    make_imagefolder(root / "test", classes, 3, seed=2)
    bad = root / "test" / "green_square" / "green_square_002.png"
    bad.write_bytes(bad.read_bytes()[:200])
    run = make_classifier(tmp_path / "cls_real", classes)
    args = ["--classifier", str(run), "--dataset", "imagefolder", "--data-root", str(root)]
    args += "--workers 0 --mixed-precision no --sets held-out".split()
    with pytest.raises(FileNotFoundError, match="both exist"):
        eval_ood.main(args + ["--output-dir", str(tmp_path / "neither")])
    assert eval_ood.main(args + ["--test-split", "val", "--output-dir", str(tmp_path / "val")])["val/top5"] == 100.0
    with pytest.raises(ImageReadError, match="green_square_002.png"):  # the bad set last: found before any logits
        eval_ood.main(args[:-1] + ["val", "test", "--output-dir", str(tmp_path / "both")])
    assert not (tmp_path / "both" / "logits").exists()
    with pytest.raises(ImageReadError, match="green_square_002.png"):
        eval_ood.main(args + ["--test-split", "test", "--output-dir", str(tmp_path / "test")])
    eval_ood.main(args + ["--test-split", "test", "--skip-bad", "--output-dir", str(tmp_path / "test")])
    result = json.loads((tmp_path / "test" / "results.json").read_text())["test"]
    assert result["images"] == 8 and list(result["skipped_bad"]) == ["green_square/green_square_002.png"]


def test_a_dataset_split_finds_its_root_in_the_environment_as_every_stage_does(tmp_path, monkeypatch):
    """eval_ood failed ('a split name needs --data-root') where the root came from $IMAGENET_ROOT or paths.yaml, as the
    configs tell users to set it, so make <dataset> stopped at its last stage."""
    import common

    classes = ["red_circle", "green_square", "blue_triangle"]
    make_imagefolder(tmp_path / "data" / "test", classes, 2, seed=1)
    run = make_classifier(tmp_path / "cls_real", classes)
    monkeypatch.setitem(common.ROOT_KEYS, "demo", "demo_root")  # the demo has no variable of its own: lend it one
    monkeypatch.setenv("DEMO_ROOT", str(tmp_path / "data"))
    args = ["--classifier", str(run), "--dataset", "demo", "--output-dir", str(tmp_path / "ood")]
    assert eval_ood.main(args + "--workers 0 --mixed-precision no".split())["test/top5"] == 100.0


def classifier_with_two_sets(tmp_path):
    """A two-class classifier, an ImageNet-R and an ImageNet-Sketch folder of its classes: (the eval_ood run dir, the
    arguments scoring ImageNet-R into it, the Sketch root to add)."""
    classes = [IN_R[3], IN_R[150]]
    run = make_classifier(tmp_path / "cls_real", classes)
    r, sketch = tmp_path / "imagenet-r", tmp_path / "imagenet-sketch"
    for j, w in enumerate(classes):
        put_images(r / w, 2, seed=j)
        put_images(sketch / w, 2, seed=10 + j)
    out = tmp_path / "ood"
    argv = ["--classifier", str(run), "--output-dir", str(out), *"--workers 0 --amp no".split()]
    return out, argv + ["--sets", f"imagenet-r={r}"], sketch


@pytest.mark.parametrize("finished", [False, True])
def test_a_run_moved_aside_while_scoring_writes_nothing_into_its_successor(tmp_path, monkeypatch, finished):
    """Another command moves the run aside (--overwrite) while it scores: neither a fresh run nor a finished one
    scoring a set added since ('done', then written again) leaves its logits, results or manifest in the new run."""
    out, argv, sketch = classifier_with_two_sets(tmp_path)
    if finished:
        eval_ood.main(argv)
        argv.append(f"imagenet-sketch={sketch}")
    moved_aside_before(monkeypatch, eval_ood, "score_set", out)
    with pytest.raises(common.RunMovedError):
        eval_ood.main(argv)
    assert {p.name for p in out.iterdir()} <= {"run_config.json", "log.txt", ".writer-0of1.lock"}  # the new run's


def test_a_finished_run_scores_an_added_set_as_its_one_writer(tmp_path):
    """A finished run written again (a set added since) took no writer lock: two re-runs of it scored the set at once,
    each deleting the logit parts the other was about to read. The no-op re-run is not held up."""
    out, argv, sketch = classifier_with_two_sets(tmp_path)
    first = eval_ood.main(argv)
    with writer_elsewhere(out):
        assert eval_ood.main(argv) == first
        with pytest.raises(common.RunBusyError, match="being written by another process"):
            eval_ood.main(argv + [f"imagenet-sketch={sketch}"])
        assert not (out / "logits" / "imagenet-sketch.safetensors").exists()
    assert "imagenet-sketch/top1" in eval_ood.main(argv + [f"imagenet-sketch={sketch}"])  # once the other has ended


def test_an_ood_root_given_by_its_option_is_no_part_of_the_identity(tmp_path):
    """README: the sets a stage only evaluates on are not its identity but are fingerprinted. --imagenet-v2 PATH & co.
    were hashed, so naming a finished run's set by its option (or adding one so) stopped with a config mismatch,
    while the same root as KIND=PATH in --sets, in $IMAGENET_V2_ROOT or configs/paths.yaml was no part of it."""
    classes = [IN_R[3], IN_R[150]]
    run = make_classifier(tmp_path / "cls_real", classes)
    v2, r = tmp_path / "v2", tmp_path / "imagenet-r"
    for c in range(1000):
        (v2 / str(c)).mkdir(parents=True)
    for j, w in enumerate(classes):
        put_images(v2 / str(IN1K.index(w)), 2, seed=j)
        put_images(r / w, 2, seed=10 + j)
    out = tmp_path / "ood"
    argv = ["--classifier", str(run), "--output-dir", str(out), *"--workers 0 --amp no".split()]
    metrics = eval_ood.main(argv + ["--sets", f"imagenet-v2={v2}"])
    assert eval_ood.main(argv + ["--sets", "imagenet-v2", "--imagenet-v2", str(v2)]) == metrics
    more = eval_ood.main(
        argv + ["--sets", "imagenet-v2", "imagenet-r", "--imagenet-v2", str(v2), "--imagenet-r", str(r)]
    )
    assert more["imagenet-v2/top1"] == metrics["imagenet-v2/top1"] and "imagenet-r/top1" in more
    # a run made while the roots were hashed holds them (None unless given): it is adopted, not a mismatch
    for name in ("manifest.json", "run_config.json"):
        saved = json.loads((out / name).read_text())
        saved["config"].update({k: None for k in ("imagenet_v2", "imagenet_sketch", "imagenet_val")})
        saved["config"].update({"imagenet_r": str(r), "imagenet_a": None})
        (out / name).write_text(json.dumps(saved))
    assert eval_ood.main(argv + ["--sets", "imagenet-v2", "imagenet-r", "--imagenet-v2", str(v2)]) == more


def test_a_set_without_a_path_is_named_in_the_results_table(tmp_path, monkeypatch):
    """ImageNet-A not downloaded: the other sets are scored, and results.md says which set was not (the table alone
    read as if every --sets entry had been scored)."""
    monkeypatch.setattr(common, "data_location", lambda *a, **k: None)  # neither environment nor paths.yaml
    classes = [IN_R[3], IN_R[150]]
    run = make_classifier(tmp_path / "cls_real", classes)
    r = tmp_path / "imagenet-r"
    for j, w in enumerate(classes):
        put_images(r / w, 2, seed=j)
    out = tmp_path / "ood"
    argv = ["--classifier", str(run), "--output-dir", str(out), *"--workers 0 --amp no --sets".split()]
    metrics = eval_ood.main([*argv, f"imagenet-r={r}", "imagenet-a"])
    assert "imagenet-r/top1" in metrics and not any(k.startswith("imagenet-a/") for k in metrics)
    assert "Not scored, for want of a path: imagenet-a" in (out / "results.md").read_text()


def test_a_classifier_moved_or_spelled_otherwise_is_the_same_run(tmp_path, monkeypatch):
    """Its weights are the identity (classifier_weights), not its path: a runs folder moved (make RUNS=...) or the
    classifier named by a relative path instead of an absolute one was a config mismatch naming 'classifier'. A run
    made while the path was hashed is adopted."""
    out, argv, _ = classifier_with_two_sets(tmp_path)
    first = eval_ood.main(argv)
    monkeypatch.chdir(tmp_path)
    spelled = lambda path: [path if a == str(tmp_path / "cls_real") else a for a in argv]  # noqa: E731
    assert eval_ood.main(spelled("cls_real")) == first
    (tmp_path / "moved").mkdir()
    (tmp_path / "cls_real").rename(tmp_path / "moved" / "cls_real")
    assert eval_ood.main(spelled("moved/cls_real")) == first
    as_made_before(out, classifier=str(tmp_path / "cls_real"))
    assert eval_ood.main(spelled("moved/cls_real")) == first
