"""train_cls.py on a tiny timm model (test_resnet, 0.5 M parameters) and 32 px data: sources, resume, outputs."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, as_made_before, make_imagefolder, writer_elsewhere
from safetensors.torch import load_file, save_file

import common
import train_cls
from common import ConfigMismatchError, RunDir, RunMovedError, load_dataset, read_jsonl, write_json, write_jsonl

TINY = (
    "--dataset demo --model test_resnet --input-size 32 --batch-size 4 "
    "--max-device-batch 4 --lr 0.05 --decay-milestones 2 --workers 0 --amp no"
).split()


def make_synthetic(root: Path, classes, per_class: int, seed: int) -> Path:
    """A synthesize.py-layout dir whose classes.json lists the classes in an order unlike folder sort order."""
    make_imagefolder(root, classes, per_class, seed=seed)
    rows = [
        {"file": f"{c}/{f.name}", "label": label, "class_id": c, "source": "x", "seed": 0}
        for label, c in enumerate(classes)
        for f in sorted((root / c).iterdir())
    ]
    write_jsonl(root / "manifest.jsonl", rows)
    write_json(root / "classes.json", {"classes": list(classes), "class_names": list(classes)})
    return root


def test_release_recipe_changes_only_options_left_at_paper_values():
    parser = train_cls.get_parser()
    args = parser.parse_args("--recipe release --smoothing 0.3".split())
    train_cls.apply_recipe(args, parser)
    assert (args.opt, args.warmup_epochs, args.color_jitter, args.smoothing) == ("sgd", 5, 0.4, 0.3)
    paper = parser.parse_args([])
    train_cls.apply_recipe(paper, parser)
    assert (paper.opt, paper.warmup_epochs, paper.color_jitter, paper.smoothing) == ("momentum", 0, 0.0, 0.0)


@pytest.mark.parametrize(
    "batch,world,max_dev,expected",
    [(1024, 8, 128, 1), (1024, 4, 128, 2), (1024, 1, 128, 8), (12, 1, 5, 3), (12, 2, 4, 2)],
)
def test_accumulation_keeps_the_global_batch(batch, world, max_dev, expected):
    accum = train_cls.accumulation_steps(batch, world, max_dev)
    assert accum == expected
    assert batch % (world * accum) == 0 and batch // (world * accum) <= max_dev


def test_epoch_batches_are_the_same_global_batches_for_any_world_size():
    def global_steps(world, accum):
        per_rank = [list(train_cls.EpochBatches(30, 12, 7, range(1, 3), r, world, accum)) for r in range(world)]
        steps = len(per_rank[0]) // accum
        return [
            sorted(k for r in range(world) for mb in per_rank[r][s * accum : (s + 1) * accum] for k in mb)
            for s in range(steps)
        ]

    one = global_steps(1, 1)
    assert len(one) == 2 * (30 // 12)  # 2 epochs, last incomplete batch dropped
    assert global_steps(2, 3) == one and global_steps(3, 2) == one

    # Finer: the same micro-batches, numbered alike by global_micro, for any world x accum split of the batch.
    def micro_batches(world, accum):
        return {
            (e, train_cls.global_micro(m % (len(mbs) // 2), r, world, accum)): sorted(i for _, i in mb)
            for r in range(world)
            for mbs in [list(train_cls.EpochBatches(30, 12, 7, range(1, 3), r, world, accum))]
            for m, mb in enumerate(mbs)
            for e in {k[0] for k in mb}
        }

    assert micro_batches(1, 6) == micro_batches(2, 3) == micro_batches(3, 2) == micro_batches(6, 1)
    assert len(micro_batches(1, 6)) == 2 * 2 * 6  # epochs x steps x micro-batches of 2
    # within an epoch no image repeats; epochs are shuffled differently
    first = [i for step in one[:2] for _, i in step]
    assert len(set(first)) == 24 and {e for step in one[2:] for e, _ in step} == {2}
    assert sorted(i for _, i in one[0]) != sorted(i for _, i in one[2])


def test_every_micro_batch_of_every_epoch_draws_its_own_mixup_and_drop_path(tmp_path, tiny_dataset, monkeypatch):
    """The per-step seed (mixup: numpy, drop-path: torch) must differ across epochs: without the epoch in it, every
    epoch replayed the first one's mixup draws."""
    seeds, seed_torch = [], torch.manual_seed

    def recording(seed):
        if sys._getframe(1).f_code.co_name == "train_steps":
            seeds.append(seed)
        return seed_torch(seed)

    monkeypatch.setattr(torch, "manual_seed", recording)
    argv = TINY + ["--data-root", str(tiny_dataset), "--epochs", "2", "--mixup", "0.2", "--output-dir", str(tmp_path)]
    train_cls.main(argv)
    assert len(seeds) == 2 * 3 and len(set(seeds)) == len(seeds)  # 12 images / batch 4: 3 steps per epoch


def test_two_processes_learn_what_one_process_accumulating_learns(tmp_path, tiny_dataset):
    """Batch 8 as 1 process x 2 micro-batches of 4, or as torchrun's 2 CPU processes x 1: the same micro-batches and
    mixup/cutmix draws, so the same learned weights up to float summation order (~1e-8 here; the strided split this
    replaced, same global batches but other micro-batches, differed by 4e-2). BatchNorm running statistics are left
    out: a process's come from its own micro-batches, averaged over processes after each epoch (timm's --dist-bn
    reduce), which one process accumulating does not do. So the model tested is the one saved."""
    import os
    import subprocess
    import sys

    args = TINY + [
        "--data-root",
        str(tiny_dataset),
        *"--epochs 2 --seed 3 --batch-size 8 --eval-every 2 --mixup 0.2 --cutmix 1.0".split(),
    ]
    train_cls.main(args + ["--output-dir", str(tmp_path / "one")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(Path(train_cls.__file__)),
            *args,
            "--output-dir",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    learned = [k for k in one if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(learned) > 10
    for k in learned:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


def test_processes_test_and_save_one_model(tmp_path, tiny_dataset):
    """Each process's BatchNorm statistics come from its own micro-batches; they are averaged after every epoch
    (timm's --dist-bn reduce, the release's default), so the processes test one model, the one rank 0 saves."""
    import os
    import subprocess
    import sys

    spy = tmp_path / "spy.py"  # train_cls run by torchrun, its evaluate recording the statistics it tests with
    spy.write_text(
        "import sys, torch, train_cls\n"
        "real = train_cls.evaluate\n"
        "def evaluate(model, *a, **k):\n"
        "    stats = {n: b.clone() for n, b in model.named_buffers() if 'running_' in n}\n"
        f"    torch.save(stats, '{tmp_path}/bn.%d.pt' % torch.distributed.get_rank())\n"
        "    return real(model, *a, **k)\n"
        "train_cls.evaluate = evaluate\n"
        "train_cls.main(sys.argv[1:])\n"
    )
    args = TINY + ["--data-root", str(tiny_dataset), *"--epochs 1 --seed 3 --batch-size 8".split()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(train_cls.__file__).parent), env.get("PYTHONPATH", "")])
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(spy), *args]
    proc = subprocess.run([*run, "--output-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"bn.{r}.pt") for r in (0, 1))
    assert len(rank0) > 4 and all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    saved = load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(saved[n.removeprefix("module.")], b) for n, b in rank0.items())


def test_train_sources_are_relabelled_by_class_id(tmp_path, tiny_dataset):
    shuffled = [TINY_CLASSES[2], TINY_CLASSES[0], TINY_CLASSES[1]]
    synth = make_synthetic(tmp_path / "synth", shuffled, 2, seed=5)
    args = train_cls.get_parser().parse_args(
        TINY + ["--data-root", str(tiny_dataset), "--train-dirs", "real", str(synth)]
    )
    paths, labels, _ = train_cls.load_train_sources(args, TINY_CLASSES)
    real = load_dataset("demo", tiny_dataset, "train")
    assert len(paths) == len(real) + 6
    for path, label in zip(paths, labels):  # the class folder name decides the label, in the test split's order
        assert TINY_CLASSES[label] == Path(path).parent.name

    other = make_synthetic(tmp_path / "other", ["red_circle", "green_square", "purple_blob"], 1, seed=6)
    args.train_dirs = [str(other)]
    with pytest.raises(ValueError, match="purple_blob"):
        train_cls.load_train_sources(args, TINY_CLASSES)


def test_subset_mask_selects_real_images(tmp_path, tiny_dataset):
    real = load_dataset("demo", tiny_dataset, "train")
    mask = np.zeros(len(real), bool)
    mask[[0, 5, 6, 11]] = True
    np.save(tmp_path / "keep.npy", mask)
    args = train_cls.get_parser().parse_args(
        TINY + ["--data-root", str(tiny_dataset), "--subset-mask", str(tmp_path / "keep.npy")]
    )
    paths, labels, _ = train_cls.load_train_sources(args, TINY_CLASSES)
    assert paths == [real.abspath(i) for i in (0, 5, 6, 11)]
    assert labels == [real.samples[i].label for i in (0, 5, 6, 11)]
    np.save(tmp_path / "bad.npy", mask[:-1])
    args.subset_mask = str(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="one entry per train image"):
        train_cls.load_train_sources(args, TINY_CLASSES)


def test_a_run_moved_aside_mid_epoch_saves_no_checkpoint_into_its_successor(tmp_path, tiny_dataset, monkeypatch):
    """A corrected command moves the run aside (--overwrite) while its second epoch trains: the old process stops
    before that epoch's checkpoint, which the new run would otherwise resume from under its own config."""
    out, epochs = tmp_path / "cls", []
    real_train_steps = train_cls.train_steps

    def overwritten_in_epoch_2(*a, **k):
        stats = real_train_steps(*a, **k)
        epochs.append(len(epochs) + 1)
        if len(epochs) == 2:
            RunDir(out, {"another": "config"}, overwrite=True).start()
        return stats

    monkeypatch.setattr(train_cls, "train_steps", overwritten_in_epoch_2)
    with pytest.raises(RunMovedError, match="moved aside"):
        train_cls.main(TINY + ["--data-root", str(tiny_dataset), "--epochs", "3", "--output-dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [".writer-0of1.lock", "run_config.json"]  # the new run's
    old_run = next(tmp_path.glob("cls.old-*"))
    assert [p.name for p in (old_run / "checkpoints").iterdir()] == ["checkpoint-1"]


@pytest.mark.parametrize("twice", [["real", "real"], ["real", "DATA"], ["SYN", "SYN/"]])
def test_a_training_source_named_twice_is_an_error(tmp_path, tiny_dataset, twice):
    """It counted twice: 24 train images from 12, and a mix run's real:synthetic ratio changed without a word."""
    synthetic = make_synthetic(tmp_path / "syn", TINY_CLASSES, 2, seed=5)
    dirs = [d.replace("DATA", str(tiny_dataset)).replace("SYN", str(synthetic)) for d in twice]
    argv = TINY + ["--data-root", str(tiny_dataset), "--epochs", "1", "--output-dir", str(tmp_path / "c")]
    with pytest.raises(ValueError, match="names one source twice"):
        train_cls.main(argv + ["--train-dirs", *dirs])


def test_a_synthetic_set_made_from_other_data_is_named(tmp_path, tiny_dataset, monkeypatch):
    synthetic = make_synthetic(tmp_path / "syn", TINY_CLASSES, 2, seed=5)
    write_json(synthetic / "manifest.json", {"config": {"source_fingerprint": "another split"}})
    said = []
    real_warn = common.warn_if_made_from_other_data
    monkeypatch.setattr(common, "warn_if_made_from_other_data", lambda *a: said.append(real_warn(*a)))
    argv = TINY + ["--data-root", str(tiny_dataset), "--epochs", "1", "--train-dirs", "real", str(synthetic)]
    train_cls.main(argv + ["--output-dir", str(tmp_path / "c")])
    assert len(said) == 1 and "(another split) is not this one's" in said[0]


def test_resume_never_sets_old_checkpoints_aside_so_a_later_resume_takes_the_new_ones(tmp_path, tiny_dataset):
    """The old run's checkpoint-3 outranked the new run's checkpoint-1: pruning dropped the new one and a later
    resume continued the old run under the new run's metrics."""
    argv = TINY + ["--data-root", str(tiny_dataset), "--epochs", "3", "--output-dir", str(tmp_path / "c")]
    train_cls.main(argv + ["--epochs-per-job", "2"])  # "killed" after 2 epochs
    train_cls.main(argv + ["--resume", "never", "--epochs-per-job", "1"])
    assert [p.name for p in (tmp_path / "c" / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert (tmp_path / "c" / "checkpoints.old" / "checkpoint-2").is_dir()  # set aside, not deleted
    train_cls.main(argv)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "c" / "metrics.jsonl")] == [1, 2, 3]
    assert "checkpoints/checkpoint-1 (1 epochs done)" in (tmp_path / "c" / "log.txt").read_text()


def test_a_kill_just_after_a_checkpoint_loses_no_metrics_row(tmp_path, tiny_dataset, monkeypatch):
    real_save = common.save_checkpoint

    def killed_after_epoch_2(accelerator, run, n, keep):
        real_save(accelerator, run, n, keep)
        if n == 2:
            raise KeyboardInterrupt  # kill -9 between the checkpoint and what follows it

    argv = TINY + ["--data-root", str(tiny_dataset), "--epochs", "3", "--output-dir", str(tmp_path / "c")]
    monkeypatch.setattr(common, "save_checkpoint", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_cls.main(argv)
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    train_cls.main(argv)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "c" / "metrics.jsonl")] == [1, 2, 3]


def test_resume_equals_uninterrupted_and_outputs_are_self_describing(tmp_path, tiny_dataset):
    common = TINY + ["--data-root", str(tiny_dataset), *"--epochs 3 --seed 3".split()]
    straight = train_cls.main(common + ["--output-dir", str(tmp_path / "a")])
    # 2 epochs, "job ends", then the same command resumes for the last epoch
    part = train_cls.main(common + ["--output-dir", str(tmp_path / "b"), "--epochs-per-job", "2"])
    assert part["epochs_done"] == 2 and not (tmp_path / "b" / "manifest.json").exists()
    resumed = train_cls.main(common + ["--output-dir", str(tmp_path / "b")])
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    # Bitwise on the CPU; CUDA's atomics-based kernels are not bitwise deterministic, so a GPU gets a tolerance.
    tol = {"rtol": 0, "atol": 0} if not torch.cuda.is_available() else {"rtol": 1e-3, "atol": 1e-4}
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)
    same = (lambda x, y: x == y) if not torch.cuda.is_available() else (lambda x, y: x == pytest.approx(y, rel=1e-3))
    if torch.cuda.is_available():
        assert resumed.keys() == straight.keys()
        assert all(same(resumed[k], straight[k]) for k in straight if isinstance(straight[k], (int, float)))
    else:
        assert resumed == straight
    rows_a, rows_b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["epoch"] for r in rows_b] == [1, 2, 3]
    assert same([r["train_loss"] for r in rows_a], [r["train_loss"] for r in rows_b])
    assert rows_a[0]["lr"] == pytest.approx(0.05) and rows_a[1]["lr"] == pytest.approx(0.01)  # x0.2 from milestone

    # a complete run is a no-op; another config is refused
    mtime = (tmp_path / "a" / "manifest.json").stat().st_mtime_ns
    assert train_cls.main(common + ["--output-dir", str(tmp_path / "a")]) == straight
    assert (tmp_path / "a" / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigMismatchError, match="lr"):
        train_cls.main(common + ["--output-dir", str(tmp_path / "a"), "--lr", "0.2"])

    # the manifest alone rebuilds the model and its eval transform; top-1/top-5 recomputed independently
    import timm
    from timm.data import create_transform

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    info = manifest["classifier"]
    assert info["classes"] == TINY_CLASSES and info["eval_transform"]["input_size"] == [3, 32, 32]
    model = timm.create_model(
        info["model"],
        pretrained=True,
        num_classes=info["num_classes"],
        pretrained_cfg_overlay={"file": str(tmp_path / "a" / info["weights"]), "num_classes": info["num_classes"]},
    ).eval()
    assert all(torch.equal(model.state_dict()[k], a[k]) for k in a)
    transform = create_transform(**info["eval_transform"])
    test = load_dataset("demo", tiny_dataset, "test")
    x = torch.stack(
        [transform(__import__("PIL.Image").Image.open(test.abspath(i)).convert("RGB")) for i in range(len(test))]
    )
    with torch.no_grad():
        logits = model(x)
    y = torch.tensor([s.label for s in test.samples])
    top1 = (logits.argmax(1) == y).float().mean().item() * 100
    top3 = (logits.topk(3, 1).indices == y[:, None]).any(1).float().mean().item() * 100
    assert manifest["metrics"]["top1"] == pytest.approx(top1) and manifest["metrics"]["top5"] == pytest.approx(top3)
    assert manifest["config"]["num_classes"] == 3 and manifest["config"]["model"] == "test_resnet"


def test_pretrained_file_loads_backbone_and_resets_head(tmp_path):
    import timm

    source = timm.create_model("test_resnet", num_classes=1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "in1k.safetensors")
    args = train_cls.get_parser().parse_args(
        [*"--model test_resnet --pretrained --pretrained-file".split(), str(tmp_path / "in1k.safetensors")]
    )
    model = train_cls.build_model(args, 3)
    head = model.get_classifier()
    assert head.out_features == 3
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, source.state_dict()[k]), k


def test_default_run_names_are_the_makefile_names():
    assert train_cls.default_name(["real"]) == "real"
    assert train_cls.default_name(["runs/in10/synth_x2"]) == "synth_x2"
    assert train_cls.default_name(["real", "runs/in10/synth_x1"]) == "mix_x1"  # README / Makefile: cls_mix_x<N>
    assert train_cls.default_name(["real", "a", "b"]) == "real+a+b"


def test_bad_training_images_stop_the_run_before_it_starts_or_are_skipped(tmp_path):
    """A truncated and an empty image in train/: an error naming both before any output is written (a run that
    decodes lazily finished 1 epoch and failed in epoch 2); with --skip-bad they are left out and listed."""
    from common import ImageReadError

    root = tmp_path / "data"
    make_imagefolder(root / "train", TINY_CLASSES, 4, seed=0)
    make_imagefolder(root / "test", TINY_CLASSES, 2, seed=1)
    good = root / "train" / "red_circle" / "red_circle_000.png"
    truncated = root / "train" / "red_circle" / "red_circle_001.png"
    truncated.write_bytes(good.read_bytes()[:200])
    empty = root / "train" / "green_square" / "green_square_002.png"
    empty.write_bytes(b"")
    args = TINY + ["--data-root", str(root), "--epochs", "1"]
    with pytest.raises(ImageReadError, match="2 unreadable") as err:
        train_cls.main(args + ["--output-dir", str(tmp_path / "a")])
    assert "red_circle_001.png" in str(err.value) and "green_square_002.png" in str(err.value)
    assert not (tmp_path / "a").exists()
    train_cls.main(args + ["--output-dir", str(tmp_path / "b"), "--skip-bad"])
    real = json.loads((tmp_path / "b" / "manifest.json").read_text())["inputs"]["real"]
    assert sorted(real["skipped_bad"]) == ["green_square/green_square_002.png", "red_circle/red_circle_001.png"]
    assert real["images"] == 10
    for i in (0, 2, 3):  # every red_circle image unreadable: --skip-bad would leave the class no example
        (root / "train" / "red_circle" / f"red_circle_{i:03d}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no training image of class\(es\) \['red_circle'\]"):
        train_cls.main(args + ["--output-dir", str(tmp_path / "c"), "--skip-bad"])
    assert not (tmp_path / "c").exists()


def test_a_changed_training_split_is_a_config_mismatch_not_a_resume(tmp_path):
    root = tmp_path / "data"
    make_imagefolder(root / "train", TINY_CLASSES, 4, seed=0)
    make_imagefolder(root / "test", TINY_CLASSES, 2, seed=1)
    args = TINY + ["--data-root", str(root), "--epochs", "1", "--output-dir", str(tmp_path / "run")]
    train_cls.main(args)
    train_cls.main(args)  # unchanged: a no-op
    make_imagefolder(root / "train", TINY_CLASSES, 5, seed=2)  # one more image per class, the others rewritten
    with pytest.raises(ConfigMismatchError, match="train_fingerprints"):
        train_cls.main(args)


def test_an_imagefolder_with_a_val_split_needs_no_split_flags(tmp_path):
    """The README layout DIR/train + DIR/val: train_cls finds val/ itself (it looked for test/ and failed)."""
    root = tmp_path / "data"
    make_imagefolder(root / "train", TINY_CLASSES, 4, seed=0)
    make_imagefolder(root / "val", TINY_CLASSES, 2, seed=1)
    args = TINY + ["--dataset", "imagefolder", "--data-root", str(root), "--epochs", "1"]
    train_cls.main(args + ["--output-dir", str(tmp_path / "run")])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    tested = manifest["inputs"]["test_split"]
    assert {k: v for k, v in tested.items() if k != "fingerprint"} == {"split": "val", "images": 6, "skipped_bad": {}}


def test_a_changed_held_out_split_tests_the_finished_classifier_again_without_retraining(tmp_path):
    root = tmp_path / "data"
    make_imagefolder(root / "train", TINY_CLASSES, 4, seed=0)
    make_imagefolder(root / "val", TINY_CLASSES, 2, seed=1)
    args = TINY + ["--dataset", "imagefolder", "--data-root", str(root), "--epochs", "1", "--output-dir", str(tmp_path)]
    first = train_cls.main(args)
    run_files = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    assert train_cls.main(args) == first  # unchanged: a no-op
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()} == run_files
    make_imagefolder(root / "val", TINY_CLASSES, 5, seed=2)  # the split edited: its figures were stale
    with writer_elsewhere(tmp_path):  # a re-run of the same command testing it too: one writer of the manifest
        with pytest.raises(common.RunBusyError):
            train_cls.main(args)
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.is_file()}
    lock = ".writer-0of1.lock"  # the other writer's, which it wrote its pid into
    assert {k: v for k, v in written.items() if k != lock} == {k: v for k, v in run_files.items() if k != lock}
    again = train_cls.main(args)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["inputs"]["test_split"]["images"] == 15 and manifest["metrics"] == again
    assert round(again["top1"] * 15 / 100, 6).is_integer()  # a share of the 15 images it now holds
    for name in ("model.safetensors", "metrics.jsonl", "run_config.json"):  # not retrained
        assert (tmp_path / name).stat().st_mtime_ns == run_files[name]


def test_a_bad_test_image_stops_the_run_before_training_or_is_skipped(tmp_path):
    """A truncated image in the held-out split: an error naming it before any output is written (it failed at the
    first evaluation, after an epoch of training); with --skip-bad it is left out and listed; --test-split picks the
    split when both val/ and test/ exist."""
    from common import ImageReadError

    root = tmp_path / "data"
    make_imagefolder(root / "train", TINY_CLASSES, 4, seed=0)
    make_imagefolder(root / "val", TINY_CLASSES, 2, seed=1)
    make_imagefolder(root / "test", TINY_CLASSES, 3, seed=2)
    bad = root / "val" / "red_circle" / "red_circle_001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    args = TINY + ["--dataset", "imagefolder", "--data-root", str(root), "--epochs", "1", "--test-split", "val"]
    with pytest.raises(ImageReadError, match="red_circle_001.png"):
        train_cls.main(args + ["--output-dir", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()
    train_cls.main(args + ["--output-dir", str(tmp_path / "b"), "--skip-bad"])
    test_split = json.loads((tmp_path / "b" / "manifest.json").read_text())["inputs"]["test_split"]
    assert test_split["split"] == "val" and test_split["images"] == 5
    assert list(test_split["skipped_bad"]) == ["red_circle/red_circle_001.png"]
    train_cls.main(args[:-1] + ["test", "--output-dir", str(tmp_path / "c")])  # the other split: nothing bad
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["inputs"]["test_split"]["images"] == 9


def test_a_class_missing_from_the_held_out_split_names_that_split(tmp_path):
    root = tmp_path / "data"
    make_imagefolder(root / "train", TINY_CLASSES, 2, seed=0)
    make_imagefolder(root / "val", TINY_CLASSES[:2], 2, seed=1)
    args = TINY + ["--dataset", "imagefolder", "--data-root", str(root), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=rf"imagefolder val split: not in val \['{TINY_CLASSES[2]}'\]"):
        train_cls.main(args)


def test_the_data_root_comes_from_the_environment_or_paths_yaml_as_in_every_stage(monkeypatch, tmp_path):
    """train_cls demanded --data-root although its --help (and every other stage) takes $IMAGENET_ROOT & co."""
    import common

    make_imagefolder(tmp_path / "data" / "train", TINY_CLASSES, 2, seed=0)
    make_imagefolder(tmp_path / "data" / "test", TINY_CLASSES, 2, seed=1)
    monkeypatch.setitem(common.ROOT_KEYS, "demo", "demo_root")  # the demo has no variable of its own: lend it one
    monkeypatch.setenv("DEMO_ROOT", str(tmp_path / "data"))
    args = TINY + ["--epochs", "1", "--output-dir", str(tmp_path / "run")]
    train_cls.main(args)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["inputs"]["real"]["images"] == 6 and manifest["inputs"]["test_split"]["images"] == 6
    monkeypatch.delenv("DEMO_ROOT")
    with pytest.raises(ValueError, match="set DEMO_ROOT"):
        train_cls.main(TINY + ["--epochs", "1", "--output-dir", str(tmp_path / "other")])


def test_accuracy_is_a_whole_count_of_images_for_any_batching(tmp_path):
    """timm's accuracy is a float32 percentage per batch; turned back into counts, 1 hit of every 3 images must sum
    to exactly 100·hits/n in any batch size (unrounded, a batch of 15 with 5 hits counted 4.9999995)."""
    import torchvision.transforms as T
    from accelerate import Accelerator

    classes = ["a", "b", "c"]
    make_imagefolder(tmp_path / "data", classes, 5, size=8)
    index = common.read_imagefolder(tmp_path / "data")

    class FirstClass(torch.nn.Module):  # always class 0: right for a third of the images
        def forward(self, x):
            return torch.tensor([[3.0, 2.0, 1.0]]).expand(len(x), -1)

    for batch in (3, 5, 15):
        args = train_cls.get_parser().parse_args(f"--max-device-batch {batch} --workers 0 --no-channels-last".split())
        figures = train_cls.evaluate(FirstClass(), index, T.ToTensor(), Accelerator(cpu=True), args)
        assert figures == {"top1": 100.0 * 5 / 15, "top5": 100.0}, batch


def test_a_training_set_moved_or_spelled_otherwise_is_the_same_run(tmp_path, tiny_dataset, monkeypatch):
    """The sets' files are the identity, not their paths: a runs folder moved (make RUNS=...) or a set named by its
    absolute path instead of a relative one was a config mismatch 'train_dirs', said as a changed fingerprint of the
    data, and OVERWRITE=1 trained the classifier again. A run made while the paths were hashed is adopted."""
    synthetic = make_synthetic(tmp_path / "runs" / "syn", TINY_CLASSES, 2, seed=5)
    argv = TINY + ["--data-root", str(tiny_dataset), "--epochs", "1", "--output-dir", str(tmp_path / "cls")]
    monkeypatch.chdir(tmp_path)
    first = train_cls.main(argv + ["--train-dirs", "real", "runs/syn"])
    assert train_cls.main(argv + ["--train-dirs", "real", str(synthetic)]) == first
    (tmp_path / "runs").rename(tmp_path / "moved")
    assert train_cls.main(argv + ["--train-dirs", "real", "moved/syn"]) == first
    fingerprints = json.loads((tmp_path / "cls" / "manifest.json").read_text())["config"]["train_fingerprints"]
    paths = {"real": fingerprints[0], "runs/syn": fingerprints[1]}
    as_made_before(tmp_path / "cls", train_dirs=["real", "runs/syn"], train_fingerprints=paths)
    assert train_cls.main(argv + ["--train-dirs", "real", "moved/syn"]) == first
    with pytest.raises(ConfigMismatchError, match="train_fingerprints") as reordered:  # another order is another run
        train_cls.main(argv + ["--train-dirs", "moved/syn", "real"])
    assert "another order" in str(reordered.value) and "cp -a" not in str(reordered.value)  # no data changed
    # The data moved too (copied with its times, as cp -a): its files are the identity, not where they are mounted.
    weights = (tmp_path / "cls" / "model.safetensors").stat().st_mtime_ns
    argv[argv.index(str(tiny_dataset))] = str(shutil.copytree(tiny_dataset, tmp_path / "data_moved"))
    assert train_cls.main(argv + ["--train-dirs", "real", "moved/syn"]) == first
    assert (tmp_path / "cls" / "model.safetensors").stat().st_mtime_ns == weights  # not trained again
