"""common.py: config precedence, run directories, atomic writes, seeds/sharding, dataset readers, method pieces."""

import argparse
import ast
import fcntl
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_imagefolder, writer_elsewhere
from PIL import Image
from safetensors.torch import save_file

import common

STAGES = ["caption", "finetune", "synthesize", "train_cls", "eval_ood", "mia_lira", "sscd_sim", "eval_gap"]

# ---------------------------------------------------------------------------------------------------------- config


def stage_parser():
    p = common.StageParser()
    p.add_argument("--config")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--milestones", type=int, nargs="+", default=[50, 100, 150])
    p.add_argument("--amp", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dataset", default="in10")
    return p


def write_yaml(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_config_precedence_defaults_yaml_cli(tmp_path):
    cfg = write_yaml(
        tmp_path,
        "seed: 7\nunused_by_this_stage: 1\ntrain_cls:\n  lr: 1e-4\n  epochs: 3\n  amp: true\n"
        "finetune:\n  other_stage_key: 5\n".replace("unused_by_this_stage: 1\n", ""),
    )
    args = common.parse_args(stage_parser(), ["--config", cfg, "--epochs", "9"], "train_cls")
    assert args.lr == pytest.approx(1e-4) and isinstance(args.lr, float)  # YAML '1e-4' is a string: converted
    assert args.epochs == 9  # CLI beats YAML
    assert args.seed == 7  # shared key applied
    assert args.amp is True
    assert args.milestones == [50, 100, 150]  # untouched default
    assert common.parse_args(stage_parser(), [], "train_cls").lr == 0.1


def test_an_empty_yaml_key_leaves_the_option_at_its_default(tmp_path):
    """`seed:` with no value read as None: a None seed, flag or split (test_split: None broke three stages)."""
    cfg = write_yaml(tmp_path, "seed:\ntrain_cls:\n  amp:\n  epochs:\n")
    args = common.parse_args(stage_parser(), ["--config", cfg], "train_cls")
    assert (args.seed, args.amp, args.epochs) == (42, False, 200)


def test_config_list_values_are_converted(tmp_path):
    cfg = write_yaml(tmp_path, "train_cls:\n  milestones: ['10', 20]\n")
    assert common.parse_args(stage_parser(), ["--config", cfg], "train_cls").milestones == [10, 20]


@pytest.mark.parametrize(
    "line,match",
    [
        ("epochs: 2.5", "epochs.*2.5"),  # was 2 epochs without a word, where --epochs 2.5 is an error
        ("seed: true", "seed.*True"),  # was seed 1
        ("scale: 0.7", r"takes 2 values"),  # was an IndexError inside timm
        ("model_kwargs: {output_stride: 8}", "KEY=VALUE"),  # was AttributeError: 'dict' object has no attribute 'split'
        ("lr: [0.1, 0.2]", "takes a value"),
    ],
)
def test_config_values_of_the_wrong_shape_are_errors_naming_the_key(tmp_path, line, match):
    import train_cls

    cfg = write_yaml(tmp_path, f"train_cls:\n  {line}\n")
    with pytest.raises(common.ConfigError, match=match):
        common.parse_args(train_cls.get_parser(), ["--config", cfg], "train_cls")
    right = write_yaml(tmp_path, "train_cls:\n  epochs: 3\n  lr: 1\n  scale: [0.5, 1]\n  mixed_precision: bf16\n")
    args = common.parse_args(train_cls.get_parser(), ["--config", right], "train_cls")
    assert (args.epochs, args.lr, args.scale, args.mixed_precision) == (3, 1.0, [0.5, 1.0], "bf16")


def test_config_numbers_are_read_as_written(tmp_path):
    """YAML read `epochs: 010` as octal 8 and `revision: 0123456` as 42798: a flag would have been 10 and the digits."""
    import synthesize

    cfg = write_yaml(tmp_path, "synthesize:\n  steps: 010\n  revision: 0123456\n  strength: .5\n")
    args = common.parse_args(synthesize.get_parser(), ["--config", cfg], "synthesize")
    assert (args.steps, args.revision, args.strength) == (10, "0123456", 0.5)


def test_config_unknown_stage_key_names_key_and_file(tmp_path):
    cfg = write_yaml(tmp_path, "train_cls:\n  learning_rate: 0.1\n")
    with pytest.raises(common.ConfigError, match=r"learning_rate.*") as err:
        common.parse_args(stage_parser(), ["--config", cfg], "train_cls")
    assert "cfg.yaml" in str(err.value)


@pytest.mark.parametrize("key", ["help: true", "h: true", "config: other.yaml", "command: report"])
def test_a_config_cannot_set_help_config_or_a_positional(tmp_path, key):
    """They were accepted and ignored; `help: true` even entered the run's identity."""
    parser = stage_parser()
    parser.add_argument("command", nargs="?")
    with pytest.raises(common.ConfigError, match=key.split(":")[0]):
        common.parse_args(parser, ["--config", write_yaml(tmp_path, f"train_cls:\n  {key}\n")], "train_cls")


def test_a_top_level_revision_pins_the_generator_not_blip2(tmp_path):
    """revision is shared for pretrained_model (finetune and synthesize must load one SD); caption's --revision is
    BLIP-2's, and the top-level key reached it too: caption.py asked the hub for BLIP-2 at SD's revision."""
    caption, finetune = importlib.import_module("caption"), importlib.import_module("finetune")
    cfg = write_yaml(tmp_path, "revision: abc123\n")
    assert common.parse_args(finetune.get_parser(), ["--config", cfg], "finetune").revision == "abc123"
    assert common.parse_args(caption.get_parser(), ["--config", cfg], "caption").revision is None
    cfg = write_yaml(tmp_path, "revision: abc123\ncaption:\n  revision: def456\n")  # its own section still sets it
    assert common.parse_args(caption.get_parser(), ["--config", cfg], "caption").revision == "def456"


def test_config_unknown_top_level_key_and_missing_file(tmp_path):
    cfg = write_yaml(tmp_path, "sead: 3\n")
    with pytest.raises(common.ConfigError, match="sead"):
        common.parse_args(stage_parser(), ["--config", cfg], "train_cls")
    with pytest.raises(common.ConfigError, match="does not exist"):
        common.parse_args(stage_parser(), ["--config", str(tmp_path / "nope.yaml")], "train_cls")


def test_config_bad_value_is_an_error(tmp_path):
    cfg = write_yaml(tmp_path, "train_cls:\n  epochs: many\n")
    with pytest.raises(common.ConfigError, match="epochs"):
        common.parse_args(stage_parser(), ["--config", cfg], "train_cls")


def test_config_value_outside_choices_is_an_error(tmp_path):
    """argparse checks choices on the command line only; a YAML value is checked too, with a hint for YAML's
    yes/no/on/off booleans."""
    parser = stage_parser()
    parser.add_argument("--precision", choices=["auto", "no", "fp16"], default="auto")
    ok = write_yaml(tmp_path, "train_cls:\n  precision: fp16\n")
    assert common.parse_args(parser, ["--config", ok], "train_cls").precision == "fp16"
    for text, match in (("precision: fp8", "one of"), ("precision: no", "quote the value")):
        with pytest.raises(common.ConfigError, match=match):
            common.parse_args(parser, ["--config", write_yaml(tmp_path, f"train_cls:\n  {text}\n")], "train_cls")


def test_counts_must_be_positive_on_the_command_line_and_in_yaml(tmp_path):
    parser = stage_parser()
    parser.add_argument("--rounds", type=common.positive_int, default=3)
    assert common.parse_args(parser, ["--rounds", "2"], "train_cls").rounds == 2
    with pytest.raises(SystemExit):  # argparse: "invalid positive_int value: '0'"
        common.parse_args(parser, ["--rounds", "0"], "train_cls")
    for text in ("rounds: 0", "rounds: -2", "rounds: two"):
        with pytest.raises(common.ConfigError, match="rounds"):
            common.parse_args(parser, ["--config", write_yaml(tmp_path, f"train_cls:\n  {text}\n")], "train_cls")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_refuses_a_batch_size_below_one(stage, capsys):
    """One type for one option: caption, eval_gap, eval_ood, mia_lira and sscd_sim took --batch-size 0 as an int and
    failed in the DataLoader, after loading their models."""
    flag = "--train-batch-size" if stage == "finetune" else "--batch-size"
    with pytest.raises(SystemExit):
        importlib.import_module(stage).get_parser().parse_args([flag, "0"])
    assert f"argument {flag}: invalid positive_int value: '0'" in capsys.readouterr().err


def test_shipped_configs_parse():
    for path in sorted(Path(common.PROJECT_DIR / "configs").glob("*.yaml")):
        if path.name == "paths.yaml":  # data locations, not a stage config
            continue
        for stage in ("finetune", "train_cls"):
            common.load_yaml_section(path, stage)  # raises on unknown top-level keys


# ---------------------------------------------------------------------------------------------------------- run dirs


def test_rundir_fresh_done_resume_mismatch_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = {"lr": 0.1, "epochs": 2}
    run = common.RunDir(out, cfg)
    assert run.start() == "fresh"
    assert common.RunDir(out, cfg).start() == "resume"  # started, never finished
    run.finish({"top1": 0.5})
    assert common.RunDir(out, cfg).start() == "done"
    assert common.RunDir(out, cfg).manifest()["metrics"]["top1"] == 0.5
    assert common.RunDir(out, cfg).begin() == "done"
    assert "already finished" in capsys.readouterr().out  # said for every stage
    with pytest.raises(common.ConfigMismatchError, match=r"lr: 0\.1 -> 0\.2"):
        common.RunDir(out, {"lr": 0.2, "epochs": 2}).start()
    (out / "weights.bin").write_text("old")
    assert common.RunDir(out, {"lr": 0.2, "epochs": 2}, overwrite=True).start() == "fresh"
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and (moved[0] / "weights.bin").read_text() == "old"  # moved aside, never deleted
    for lr, weights in ((0.1, "a"), (0.2, "b")):  # back and forth: the second 0.1 run goes aside beside the first
        (out / "weights.bin").write_text(weights)
        common.RunDir(out, {"lr": lr, "epochs": 2}, overwrite=True).start()
    kept = {p.name: (p / "weights.bin").read_text() for p in tmp_path.glob("run.old-*")}
    first = f"run.old-{common.config_hash(cfg)}"
    assert kept == {first: "old", f"{first}-2": "b", f"run.old-{common.config_hash({'lr': 0.2, 'epochs': 2})}": "a"}


def test_rundir_stops_a_process_whose_directory_was_moved_aside_or_deleted(tmp_path):
    """Old jobs still running when a corrected command moves their run aside (--overwrite) must not write on into
    the new run under its config."""
    old = common.RunDir(tmp_path / "r", {"a": 1})
    old.start()
    old.check_in_place()  # nothing moved: goes on
    (tmp_path / "r" / "checkpoint-1").mkdir()
    common.RunDir(tmp_path / "r", {"a": 2}, overwrite=True).start()
    with pytest.raises(common.RunMovedError, match=r"moved aside.*r\.old-"):
        old.check_in_place()
    with pytest.raises(common.RunMovedError):
        old.finish({"top1": 0.5})
    assert common.read_json(tmp_path / "r" / "run_config.json")["config"] == {"a": 2}
    assert not (tmp_path / "r" / "manifest.json").exists()
    again = common.RunDir(tmp_path / "r", {"a": 2})
    again.start()  # the new run resumed by another process: the same directory, so it goes on
    again.check_in_place()
    shutil.rmtree(tmp_path / "r")
    with pytest.raises(common.RunMovedError):
        again.check_in_place()


def test_a_finished_run_written_again_stops_if_its_directory_was_moved_aside(tmp_path):
    """A finished run is written again by some stages (eval_ood scores a set added since, train_cls tests a changed
    split again): a move aside meanwhile must stop those writes too, not only a fresh or resumed run's."""
    first = common.RunDir(tmp_path / "r", {"a": 1})
    first.start()
    first.finish({"top1": 0.5})
    done = common.RunDir(tmp_path / "r", {"a": 1})
    assert done.start() == "done"
    done.check_in_place()  # nothing moved: goes on
    common.RunDir(tmp_path / "r", {"a": 2}, overwrite=True).start()
    with pytest.raises(common.RunMovedError):
        done.finish({"top1": 0.6})
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_a_changed_data_fingerprint_says_how_a_copy_keeps_it(tmp_path):
    """Staging the data per job with cp -r changes every mtime: the mismatch says so, and how to copy instead."""
    common.RunDir(tmp_path / "r", {"train_fingerprint": "a", "lr": 1}).start()
    (tmp_path / "r" / "checkpoint-1").mkdir()
    with pytest.raises(common.ConfigMismatchError, match="train_fingerprint.*cp -a or rsync -a"):
        common.RunDir(tmp_path / "r", {"train_fingerprint": "b", "lr": 1}).start()
    with pytest.raises(common.ConfigMismatchError) as err:
        common.RunDir(tmp_path / "r", {"train_fingerprint": "a", "lr": 2}).start()
    assert "rsync" not in str(err.value)
    # a model's files are hashed by content: copying keeps its fingerprint, and the hint would mislead
    common.RunDir(tmp_path / "m", {"model_fingerprint": "a"}).start()
    (tmp_path / "m" / "matches.jsonl").touch()
    with pytest.raises(common.ConfigMismatchError) as err:
        common.RunDir(tmp_path / "m", {"model_fingerprint": "b"}).start()
    assert "model_fingerprint" in str(err.value) and "rsync" not in str(err.value)


def test_a_synthetic_set_made_from_other_data_is_named(tmp_path):
    """A set made from another dataset with the same class names trained and was compared without a word."""
    set_dir = tmp_path / "syn"
    set_dir.mkdir()
    assert common.warn_if_made_from_other_data(set_dir, "abc") is None  # no synthesize.py manifest: nothing to compare
    common.write_json(set_dir / "manifest.json", {"config": {"source_fingerprint": "abc"}})
    assert common.warn_if_made_from_other_data(set_dir, "abc") is None
    assert "(abc) is not this one's (xyz)" in common.warn_if_made_from_other_data(set_dir, "xyz")
    # A set made from a --subset-mask selection has that selection's fingerprint: no sign of other data or changed
    # files, which the warning said of it whatever split it was compared with.
    common.write_json(set_dir / "manifest.json", {"config": {"source_fingerprint": "abc", "subset_mask": "m.npy"}})
    said = common.warn_if_made_from_other_data(set_dir, "xyz")
    assert "--subset-mask selection (m.npy)" in said and "another dataset" not in said


def _start_when_all_ready(path, barrier, identities, part):
    barrier.wait()
    run = common.RunDir(path, {"steps": 8}, part=part)
    run.start()
    identities.put(run.identity)


def test_jobs_starting_at_once_over_a_failed_start_agree_on_one_directory(tmp_path):
    """A job array resubmitted over a failed start: unserialised, one job's start-over moved a sibling's fresh
    directory (RunMovedError later) or its run config's temp file away (FileNotFoundError), 2 times in 15."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for trial in range(8):
        path = tmp_path / f"r{trial}"
        common.RunDir(path, {"steps": 4}).start()  # the failed start: its run config only
        barrier, identities = ctx.Barrier(4), ctx.Queue()
        jobs = [ctx.Process(target=_start_when_all_ready, args=(path, barrier, identities, (i, 4))) for i in range(4)]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(60)
        assert [job.exitcode for job in jobs] == [0, 0, 0, 0]
        seen = {identities.get(timeout=5) for _ in jobs}
        assert seen == {common._dir_identity(path)}  # one directory, the one now there
        assert sorted(p.name for p in tmp_path.glob(f"r{trial}*")) == [f"r{trial}"]


def test_a_start_goes_on_where_no_lock_file_can_be_made(tmp_path):
    """A run dir made by hand in a read-only parent takes no lock file beside it: the start goes on unserialised
    (here the lock's name is taken by a folder, which open() refuses as a read-only parent would)."""
    (tmp_path / ".r.lock").mkdir()
    assert common.RunDir(tmp_path / "r", {"a": 1}).start() == "fresh"


def started_with_a_checkpoint(run_dir: Path, part: tuple[int, int] | None = None) -> None:
    """Run `run_dir` ({'a': 1}, this part) started, one checkpoint written, as its writer left it so far: its lock
    let go here, for writer_elsewhere to hold."""
    run = common.RunDir(run_dir, {"a": 1}, part=part)
    run.start()
    (run_dir / "checkpoint-1").mkdir()
    common._release_writer_lock(run.lock_path)


def test_a_run_part_written_by_a_live_process_is_not_started_again(tmp_path):
    """One job submitted twice wrote one run from two processes at once: the compute spent twice, rows appended
    twice. The second start stops and names the first; the other parts of a job array, a run moved aside with
    --overwrite, and the run after its writer ended are not held up."""
    for run in "rs":
        started_with_a_checkpoint(tmp_path / run, (0, 2))
    run_config = (tmp_path / "r" / "run_config.json").stat()
    with writer_elsewhere(tmp_path / "r", (0, 2)) as pid:
        with pytest.raises(common.RunBusyError, match=rf"r is being written by another process \(pid {pid} on "):
            common.RunDir(tmp_path / "r", {"a": 1}, part=(0, 2)).start()
        assert (tmp_path / "r" / "run_config.json").stat().st_ino == run_config.st_ino  # the refused start wrote none
        assert common.RunDir(tmp_path / "r", {"a": 1}, part=(1, 2)).start() == "resume"
    assert common.RunDir(tmp_path / "r", {"a": 1}, part=(0, 2)).start() == "resume"  # a dead writer holds nothing
    with writer_elsewhere(tmp_path / "s", (0, 2)):
        assert common.RunDir(tmp_path / "s", {"a": 2}, overwrite=True, part=(0, 2)).start() == "fresh"


def test_a_part_of_another_shard_count_sharing_items_with_a_live_one_is_not_started(tmp_path):
    """Parts are strided, so 0/4 and 2/4 are half of 0/2, and the whole set is all of it: a run without --shard
    beside a job array, or an array resubmitted with more jobs while the old ones ran, made every shared item twice.
    The parts that share none (1/4, 3/4) still run beside it."""
    started_with_a_checkpoint(tmp_path / "r", (0, 2))
    with writer_elsewhere(tmp_path / "r", (0, 2)) as pid:
        for part, this in (((0, 4), "this one's --shard 0/4"), ((2, 4), "--shard 2/4"), (None, "whole set")):
            with pytest.raises(common.RunBusyError, match=rf"\(pid {pid} on .*--shard 0/2, .*{this}"):
                common.RunDir(tmp_path / "r", {"a": 1}, part=part).start()
        assert not common._held_here(tmp_path / "r" / ".writer-0of4.lock")  # a refused start lets go of its part
        for part in ((1, 4), (3, 4), (1, 2)):
            assert common.RunDir(tmp_path / "r", {"a": 1}, part=part).start() == "resume"
    assert common.RunDir(tmp_path / "r", {"a": 1}, part=(0, 4)).start() == "resume"


def test_a_run_finished_as_its_re_run_starts_is_done_not_busy(tmp_path, monkeypatch):
    """A start that found the run unfinished and then met its writer still holding the lock just after writing
    manifest.json (finish lets go last) was told the run is busy, though it is finished."""
    started_with_a_checkpoint(tmp_path / "r")
    hold = common._hold_writer_lock

    def writer_finishes_first(lock_path, advice=""):
        common.write_json(tmp_path / "r" / "manifest.json", {"config": {"a": 1}, "metrics": {}})
        hold(lock_path, advice)

    monkeypatch.setattr(common, "_hold_writer_lock", writer_finishes_first)
    with writer_elsewhere(tmp_path / "r"):
        assert common.RunDir(tmp_path / "r", {"a": 1}).start() == "done"
    (tmp_path / "r" / "manifest.json").unlink()  # an unfinished run's writer still holds it: busy
    monkeypatch.setattr(common, "_hold_writer_lock", hold)
    with writer_elsewhere(tmp_path / "r"), pytest.raises(common.RunBusyError):
        common.RunDir(tmp_path / "r", {"a": 1}).start()


def test_a_lock_held_by_a_killed_writers_forked_workers_says_its_writer_has_ended(tmp_path):
    """A killed writer's data-loader workers hold its lock for seconds after it: a start then was told the run was
    being written by a pid that no longer existed, with nothing to say why or what to do."""
    script = (
        "import common, os, sys, time; common.RunDir(sys.argv[1], {'a': 1}).start(); child = os.fork()\n"
        "if child == 0: time.sleep(60); os._exit(0)\n"
        "print(child, flush=True); os._exit(0)"  # the writer ends at once (as if killed); its fork holds the lock
    )
    command = [sys.executable, "-c", script, str(tmp_path / "r")]
    writer = subprocess.Popen(command, cwd=common.PROJECT_DIR, stdout=subprocess.PIPE, text=True)
    child = int(writer.stdout.readline())
    try:
        writer.wait()
        with pytest.raises(common.RunBusyError, match=rf"\(pid {writer.pid} on .*Process {writer.pid} has ended"):
            common.RunDir(tmp_path / "r", {"a": 1}).start()
    finally:
        os.kill(child, signal.SIGKILL)
        writer.stdout.close()
    started_with_a_checkpoint(tmp_path / "s")
    with writer_elsewhere(tmp_path / "s"):  # a live writer: no such note
        with pytest.raises(common.RunBusyError) as busy:
            common.RunDir(tmp_path / "s", {"a": 1}).start()
    assert "has ended" not in str(busy.value)


def test_a_busy_run_suggests_shards_only_to_a_stage_that_has_them(tmp_path):
    """The second start of train_cls (no --shard) was told to make a job array with --shard i/n, an option it lacks.
    A stage with --shard (synthesize, eval_gap, caption, mia_lira) hears of it, with the part it was given."""
    for part, told in ((None, None), ((0, 2), "--shard 0/2")):
        started_with_a_checkpoint(tmp_path / str(part), part)
        with writer_elsewhere(tmp_path / str(part), part or (0, 1)) as pid:
            with pytest.raises(common.RunBusyError, match=f"pid {pid} on ") as busy:
                common.RunDir(tmp_path / str(part), {"a": 1}, **({"part": part} if part else {})).start()
        message = str(busy.value)
        assert "another --output-dir" in message
        assert (told in message) if told else ("--shard" not in message)


def test_a_run_still_loading_is_no_failed_start_to_replace(tmp_path):
    """A run that has written nothing yet but whose process still runs (loading its model, in its first epoch) was
    taken for a failed start: another config replaced it without --overwrite, and the live run died at its first
    checkpoint with its work lost. It is a run: a mismatch, and --overwrite moves it aside whole."""
    loading = common.RunDir(tmp_path / "r", {"a": 1})
    loading.start()
    common._release_writer_lock(loading.lock_path)  # its lock is held by another process instead:
    with writer_elsewhere(tmp_path / "r"):
        with pytest.raises(common.ConfigMismatchError, match="a: 1 -> 2"):
            common.RunDir(tmp_path / "r", {"a": 2}).start()
        assert common.RunDir(tmp_path / "r", {"a": 2}, overwrite=True).start() == "fresh"
        assert [p.name for p in tmp_path.glob("r.old-*")] == [f"r.old-{common.config_hash({'a': 1})}"]
    common.RunDir(tmp_path / "s", {"a": 1}).start()  # the failed start of a process of this one
    assert common.RunDir(tmp_path / "s", {"a": 2}).start() == "fresh"  # its writer gone (here: ours): replaced


def test_a_finished_run_lets_go_of_its_writer_lock(tmp_path):
    run = common.RunDir(tmp_path / "r", {"a": 1})
    run.start()
    assert run.start() == "resume"  # started again in the same process (demo.py, tests): its own lock
    run.finish({"top1": 0.5})
    other = os.open(run.lock_path, os.O_RDWR)  # another open file, as another process's would be
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the run holds it
    finally:
        os.close(other)


def test_a_run_finished_between_a_starts_decision_and_its_lock_is_done(tmp_path, monkeypatch):
    """The writer's finish() landed after another start decided "resume" and before that start took the lock: the
    start went on to resume a finished run (train_cls: evaluate and write it again, or retrain it from scratch where
    its checkpoints were pruned) and held its lock."""
    writer = common.RunDir(tmp_path / "r", {"a": 1})
    writer.start()
    hold = common._hold_writer_lock

    def finished_meanwhile(lock_path, *advice):
        writer.finish({"top1": 0.5})
        hold(lock_path, *advice)

    monkeypatch.setattr(common, "_hold_writer_lock", finished_meanwhile)
    late = common.RunDir(tmp_path / "r", {"a": 1})
    assert late.start() == "done"
    other = os.open(late.lock_path, os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a finished run holds no lock
    finally:
        os.close(other)


def test_rundir_interrupted_with_other_config_is_caught(tmp_path):
    common.RunDir(tmp_path / "r", {"a": 1}).start()
    (tmp_path / "r" / "checkpoint-1").mkdir()  # it got somewhere
    with pytest.raises(common.ConfigMismatchError, match="a"):
        common.RunDir(tmp_path / "r", {"a": 2}).start()


def test_rundir_that_produced_nothing_gives_way_to_a_corrected_command(tmp_path):
    """A run that failed on a bad input left its run config and log only: the corrected command just starts."""
    typo = common.RunDir(tmp_path / "r", {"data": "typo"})
    typo.start()
    (tmp_path / "r" / common.LOG_FILE).write_text("FileNotFoundError: typo\n")
    assert common.RunDir(tmp_path / "r", {"data": "right"}).start() == "fresh"
    assert common.read_json(tmp_path / "r" / "run_config.json")["config"] == {"data": "right"}
    assert (tmp_path / "r" / common.LOG_FILE).read_text() == "FileNotFoundError: typo\n"  # the log is kept
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["r"]  # .r.lock: see below
    with pytest.raises(common.RunMovedError):  # had that start been still loading, it would stop at its first output
        typo.check_in_place()


def test_rundir_reads_an_old_run_under_renamed_keys(tmp_path):
    """A classifier finished when precision was stored as `amp` is the same run under `mixed_precision`: done, not
    a mismatch; a changed value under the old name still is one."""
    old = common.RunDir(tmp_path / "r", {"lr": 0.1, "amp": "bf16"})
    old.start()
    old.finish({"top1": 0.5})
    assert common.RunDir(tmp_path / "r", {"lr": 0.1, "mixed_precision": "bf16"}).start() == "done"
    with pytest.raises(common.ConfigMismatchError, match="mixed_precision: 'bf16' -> 'no'"):
        common.RunDir(tmp_path / "r", {"lr": 0.1, "mixed_precision": "no"}).start()


def test_rundir_ignores_a_retired_key_only_where_it_left_the_identity(tmp_path):
    """finetune made under a hashed data_root (now fingerprinted instead) is the same run; where data_root is still
    hashed, a changed value is still a mismatch."""
    old = common.RunDir(tmp_path / "r", {"lr": 0.1, "data_root": "/old/mount"})
    old.start()
    old.finish({"top1": 0.5})
    assert common.RunDir(tmp_path / "r", {"lr": 0.1}).start() == "done"
    # where the key is still hashed, the same value is the same run and another value a mismatch naming both values
    assert common.RunDir(tmp_path / "r", {"lr": 0.1, "data_root": "/old/mount"}).start() == "done"
    with pytest.raises(common.ConfigMismatchError, match="data_root: '/old/mount' -> '/new/mount'"):
        common.RunDir(tmp_path / "r", {"lr": 0.1, "data_root": "/new/mount"}).start()


def test_data_fingerprinted_stages_leave_data_root_out_of_the_hash():
    def config(data_fingerprinted, *argv):
        p = common.StageParser()
        common.add_run_options(p, "out", data_fingerprinted=data_fingerprinted)
        return common.config_dict(p.parse_args(argv))

    assert config(False, "--data-root", "/a") != config(False, "--data-root", "/b")
    assert config(True, "--data-root", "/a") == config(True, "--data-root", "/b")
    assert config(True, "--seed", "1") != config(True, "--seed", "2")


def test_config_dict_drops_flags_and_hash_is_stable():
    ns = argparse.Namespace(lr=0.1, overwrite=True, out=Path("/a"), unhashed_options=("overwrite",))
    d = common.config_dict(ns)
    assert d == {"lr": 0.1, "out": "/a"}
    assert common.config_hash(d) == common.config_hash(dict(reversed(list(d.items()))))


def test_not_hashed_groups_leave_the_run_identity_alone():
    p = common.StageParser()
    common.add_run_options(p, "out")
    p.add_argument("--lr", type=float, default=0.1)
    p.speed_group().add_argument("--batch-size", type=int, default=8)

    def hash_of(*argv):
        return common.config_hash(common.config_dict(p.parse_args(argv)))

    base = hash_of()
    # where it writes, how many workers, how big a batch: the same run
    assert hash_of("--batch-size", "64", "--workers", "3", "--output-dir", "/x", "--runs-dir", "/r") == base
    assert hash_of("--lr", "0.2") != base and hash_of("--seed", "1") != base and hash_of("--data-root", "/d") != base
    assert set(common.config_dict(p.parse_args([]))) == {"lr", "dataset", "data_root", "seed"}


def test_yaml_keys_reach_options_by_every_name_and_only_through_stage_parser_groups(tmp_path):
    p = common.StageParser()
    common.add_run_options(p, "out")
    p.group("method").add_argument("--lr", type=float, default=0.1)
    cfg = write_yaml(tmp_path, "train_cls:\n  num-workers: 3\n  lr: '1e-3'\n")
    args = common.parse_args(p, ["--config", cfg], "train_cls")
    assert (args.workers, args.lr) == (3, 1e-3)  # an alias as a key, a YAML string through the option's type
    p.add_argument_group("raw").add_argument("--hidden", default=1)  # argparse's own group: no config key reaches it
    with pytest.raises(TypeError, match="hidden"):
        common.parse_args(p, [], "train_cls")


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_option_has_help_so_help_shows_its_default(stage):
    options = {id(a): a for a in importlib.import_module(stage).get_parser().options.values()}.values()
    assert not [a.option_strings for a in options if a.option_strings and not a.help]


def test_shared_options_have_one_default_in_every_stage():
    """--seed, --dataset and the run-file options are declared once (add_run_options): a stage run without a config
    gets the same seed as any other, so a chain's stages agree."""
    shared = ("seed", "dataset", "data_root", "runs_dir", "config", "overwrite")
    defaults = {s: {k: importlib.import_module(s).get_parser().get_default(k) for k in shared} for s in STAGES}
    assert all(d == defaults["synthesize"] for d in defaults.values()), defaults
    assert defaults["synthesize"]["seed"] == 42
    # --workers: one default, and the two stages that feed a ResNet on a GPU more (add_run_options says why); eval_gap
    # had 0, a single process decoding every image for a GPU
    workers = {s: importlib.import_module(s).get_parser().get_default("workers") for s in STAGES}
    assert workers == {s: 8 if s in ("train_cls", "eval_ood") else 4 for s in STAGES}


@pytest.mark.parametrize("script", sorted(p.name for p in common.PROJECT_DIR.glob("*.py")))
def test_help_shows_each_docstring_line_as_written(script):
    """A lone backslash at a line's end inside a docstring joins two lines: a command meant to wrap shows in --help as
    one line with a run of spaces. Multi-line commands end their lines with a doubled backslash."""
    node = ast.parse((common.PROJECT_DIR / script).read_text()).body[0]
    assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), f"{script} has no module docstring"
    assert node.value.value.count("\n") == node.end_lineno - node.lineno


@pytest.mark.parametrize("stage", ["caption", "finetune", "synthesize", "mia_lira", "sscd_sim"])
def test_a_stage_without_dataset_says_so_before_it_builds_a_path(stage, tmp_path):
    """The default output dir is <runs-dir>/<dataset>/...: without --dataset it was a TypeError on None."""
    with pytest.raises(ValueError, match="no dataset given: pass --dataset"):
        importlib.import_module(stage).main(["--data-root", str(tmp_path)])
    assert common.output_dir(argparse.Namespace(output_dir=tmp_path, dataset=None), "x") == tmp_path


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_hashes_its_method_options_and_not_its_speed_options(stage):
    module = importlib.import_module(stage)
    argv = ["--config", str(common.PROJECT_DIR / "configs/demo.yaml")]
    config = common.config_dict(common.parse_args(module.get_parser(), argv, stage))
    assert "seed" in config and "dataset" in config
    assert not {"workers", "output_dir", "runs_dir", "overwrite", "config", common.UNHASHED} & set(config)
    assert "shard" not in config  # a job's part of the work
    assert "skip_bad" not in config  # without it a bad image stops the stage: for given images, one result only
    assert "batch_size" not in config or stage == "train_cls"  # train_cls's is the global batch: it changes results


# ---------------------------------------------------------------------------------------------------------- files


def test_atomic_write_leaves_no_partial_file_on_crash(tmp_path):
    target = tmp_path / "out.json"
    common.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with common.atomic_write(target) as f:
            f.write('{"v": 2, "trunc')
            raise RuntimeError("simulated crash")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # temp file cleaned up


def test_atomic_path_and_save_image(tmp_path):
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    common.save_image(img, tmp_path / "a.jpg", quality=95)
    assert common.load_image(tmp_path / "a.jpg").getpixel((4, 4)) == pytest.approx((10, 20, 30), abs=2)
    with pytest.raises(ValueError):
        with common.atomic_path(tmp_path / "b.png"):
            raise ValueError("crash before rename")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask):
    """Outputs must be as readable as any file the user creates (a synthetic set shared on a cluster)."""
    old = os.umask(umask)
    try:
        common.write_json(tmp_path / "m.json", {"a": 1})
        common.save_image(Image.new("RGB", (4, 4)), tmp_path / "x.jpg")
        with common.atomic_path(tmp_path / "w.bin") as tmp:
            tmp.write_bytes(b"weights")
        with common.atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors replaces the file with a 0o600 one
        (tmp_path / "plain.txt").write_text("made by open()")
        probed = common.file_mode(tmp_path)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected  # what the umask gives a plain file
    assert probed == expected
    for name in ("m.json", "x.jpg", "w.bin", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_load_image_errors_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16)).save(good)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:40])
    for bad in (truncated, tmp_path / "missing.png"):
        with pytest.raises(common.ImageReadError, match=bad.name):
            common.load_image(bad)


def test_16_bit_images_are_read_by_their_top_byte_not_clipped_white(tmp_path):
    values = np.array([[0, 3000, 20000, 65535]], np.uint16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(common.load_image(tmp_path / "deep.png"))
    assert rgb.shape == (4, 4, 3) and (rgb[0, :, 0] == values[0] >> 8).all()


def test_image_check_names_cut_jpegs_and_dangling_links_even_on_header_checks(tmp_path, monkeypatch):
    # 64 px: a 32 px JPEG cut at 70% loses part of its header, which verify() catches without the end-marker check
    make_imagefolder(tmp_path / "train", ["a", "b"], 3, ext=".jpg", size=64)
    whole = (tmp_path / "train/a/a_000.jpg").read_bytes()
    (tmp_path / "train/a/cut.jpg").write_bytes(whole[: len(whole) * 7 // 10])
    with Image.open(tmp_path / "train/a/cut.jpg") as cut:
        cut.verify()  # PIL's header check passes it: only the end marker tells
    (tmp_path / "train/a/tail.jpg").write_bytes(whole + b"\0" * 20)  # bytes after the end marker: a good image
    (tmp_path / "train/b/gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    monkeypatch.setattr(common, "FULL_DECODE_LIMIT", 0)  # the header check of large splits
    index = common.load_dataset("imagefolder", tmp_path, "train")
    kept, bad, _ = common.check_images(index, skip_bad=True, cache_dir=tmp_path / "cache")
    assert sorted(bad) == ["a/cut.jpg", "b/gone.jpg"] and len(kept) == len(index) - 2
    with pytest.raises(common.ImageReadError, match=r"2 unreadable image\(s\) in imagefolder train") as err:
        common.check_images(index, cache_dir=tmp_path / "cache")  # without skip_bad: an error naming each file
    assert str(tmp_path / "train/a/cut.jpg") in str(err.value) and str(tmp_path / "train/b/gone.jpg") in str(err.value)


def test_imagefolder_reads_subfolders_skips_hidden_ones_and_checks_its_class_files(tmp_path):
    root = make_imagefolder(tmp_path / "train", ["cat", "dog"], 2)
    (root / "cat" / "more").mkdir()
    (root / "cat" / "more" / "deep.png").write_bytes((root / "cat" / "cat_000.png").read_bytes())
    (root / "cat" / ".thumbs").mkdir()
    (root / "cat" / ".thumbs" / "t.png").write_bytes(b"")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "classes.txt").unlink()  # class order from the folders: a hidden one is no class
    index = common.load_dataset("imagefolder", tmp_path, "train")
    assert index.classes == ["cat", "dog"] and "cat/more/deep.png" in {s.path for s in index.samples}
    assert len(index) == 5
    (root / "class_names.txt").write_text("cat\n")
    with pytest.raises(ValueError, match="1 class names for 2 classes"):
        common.load_dataset("imagefolder", tmp_path, "train")
    (root / "class_names.txt").unlink()
    (root / "classes.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"listed twice.*\['cat'\]"):
        common.load_dataset("imagefolder", tmp_path, "train")
    (root / "classes.txt").write_text("dog\n")  # its images vanished from every stage without a word
    with pytest.raises(ValueError, match=r"not in classes.txt: \['cat'\]"):
        common.load_dataset("imagefolder", tmp_path, "train")
    (root / "classes.txt").write_text("dog\ncat/more\n")  # a nested class id ('Ram C/V ...') covers its top folder
    assert common.load_dataset("imagefolder", tmp_path, "train").classes == ["dog", "cat/more"]


def test_imagefolder_refuses_folder_links_that_would_list_images_twice_or_loop(tmp_path):
    root = make_imagefolder(tmp_path / "train", ["cat", "dog"], 2)
    (root / "cat" / "more").mkdir()
    (root / "cat" / "more" / "deep.png").write_bytes((root / "cat" / "cat_000.png").read_bytes())
    elsewhere = make_imagefolder(tmp_path / "other", ["bird"], 2) / "bird"
    (root / "cat" / "linked").symlink_to(elsewhere)  # a linked folder of other images is followed
    assert len(common.load_dataset("imagefolder", tmp_path, "train")) == 7
    for target, problem in ((".", "a loop"), ("more", "are one folder"), ("..", "a loop")):
        (root / "cat" / "again").symlink_to(target)  # '.': every cat image some 40 times; '..': dogs as cats, ELOOP
        with pytest.raises(ValueError, match=problem):
            common.load_dataset("imagefolder", tmp_path, "train")
        (root / "cat" / "again").unlink()


def test_read_jsonl_drops_truncated_tail_only(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert common.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\nbroken\n{"a": 3}\n')
    with pytest.raises(ValueError, match=":2"):
        common.read_jsonl(path)


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"abc")
    first = common.fingerprint(tmp_path / "m")
    (tmp_path / "m" / "w.bin").write_bytes(b"abd")
    assert common.fingerprint(tmp_path / "m") != first
    assert common.fingerprint("org/model", "v1") == "org/model@v1"


# ---------------------------------------------------------------------------------------------------------- seeds


def test_item_seed_pure_and_distinct():
    assert common.item_seed(42, "n01/img_1", 0) == common.item_seed(42, "n01/img_1", 0)
    seeds = {common.item_seed(42, f"img{i}", k) for i in range(200) for k in range(5)}
    assert len(seeds) == 1000
    assert common.item_seed(42, "a", 1) != common.item_seed(43, "a", 1)
    assert 0 <= common.item_seed("x") < 2**63


def test_item_seed_keeps_its_ids_apart():
    """Ids joined without a separator read as one string: copy 10 of image img_1 would take the seed of copy 0 of
    img_11 (at --scale 11 and more), and seed 4 of image '2/a' that of seed 42 of image '/a'."""
    assert common.item_seed(42, "cls/img_1", 10) != common.item_seed(42, "cls/img_11", 0)
    assert common.item_seed(4, "2/a", 0) != common.item_seed(42, "/a", 0)
    assert common.item_seed("a", "b") != common.item_seed("ab") != common.item_seed("a", "", "b")
    # image ids are paths: a separator they may hold ('/', '_', '-', ' ') would make them ambiguous too
    for sep in "/_- ":
        assert common.item_seed(f"a{sep}b", "c") != common.item_seed("a", f"b{sep}c"), sep


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("jobs", [1, 3])
def test_sharding_union_is_full_set_without_duplicates(world, jobs):
    items = list(range(101))
    parts = [common.local_items(items, (j, jobs), r, world) for j in range(jobs) for r in range(world)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == items and len(flat) == len(set(flat))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # balanced


def test_parse_shard():
    assert common.parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "a/b", "3"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.parse_shard(bad)


def test_logger_writes_log_txt_on_main_only(tmp_path, capsys):
    common.get_logger(tmp_path / "main", is_main=True).info("hello")
    other = common.get_logger(tmp_path / "other", is_main=False)
    other.info("hidden")
    other.warning("the same warning as the main process's")  # said once per launch, not once per GPU
    other.error("this rank's own failure")
    assert "hello" in (tmp_path / "main" / "log.txt").read_text()
    assert not (tmp_path / "other" / "log.txt").exists()
    said = capsys.readouterr().out
    assert "hidden" not in said and "same warning" not in said and "own failure" in said


# ---------------------------------------------------------------------------------------------------------- datasets


def jpeg(path: Path, color=(120, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def test_imagenet_subset_reader_uses_wnid_order_and_names(tmp_path):
    wnids = common.read_lines(common.DATA_DIR / "imagenette_wnids.txt")
    for split, n in (("train", 2), ("val", 1)):
        for w in reversed(wnids):  # creation order must not matter
            for i in range(n):
                jpeg(tmp_path / split / w / f"{w}_{i}.JPEG")
    train = common.load_dataset("in10", tmp_path, "train")
    val = common.load_dataset("in10", tmp_path, "val")
    assert train.classes == wnids and len(train) == 20 and len(val) == 10
    assert train.class_names[0] == common.imagenet_class_names()[wnids[0]]
    assert train.samples[2].label == 1 and train.samples[2].path.startswith(wnids[1])
    (tmp_path / "train" / wnids[3]).rename(tmp_path / "train" / "gone")
    with pytest.raises(FileNotFoundError, match=wnids[3]):
        common.load_dataset("in10", tmp_path, "train")


def test_cub_reader(tmp_path):
    base = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    images = [(1, f"{classes[0]}/a.jpg", 1, 1), (2, f"{classes[0]}/b.jpg", 1, 0), (3, f"{classes[1]}/c.jpg", 2, 1)]
    for _, rel, _, _ in images:
        jpeg(base / "images" / rel)
    (base / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in images))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in images))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in images))
    (base / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    train, test = common.load_dataset("cub", tmp_path, "train"), common.load_dataset("cub", tmp_path, "test")
    assert [(s.path, s.label) for s in train.samples] == [
        (f"images/{classes[0]}/a.jpg", 0),
        (f"images/{classes[1]}/c.jpg", 1),
    ]
    assert [s.label for s in test.samples] == [0]
    assert train.class_names == ["Black footed Albatross", "Laysan Albatross"]
    assert train.abspath(0).is_file()


def test_stanford_cars_reader(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    splits = (("train", [("00001.jpg", 2), ("00002.jpg", 1)]), ("test", [("00001.jpg", 1), ("00002.jpg", 2)]))
    for split, files in splits:
        for f, _ in files:
            jpeg(base / f"cars_{split}" / f)
        annos = np.array([(f, c) for f, c in files], dtype=[("fname", "O"), ("class", "O")])
        mat = base / "devkit" / "cars_train_annos.mat" if split == "train" else base / "cars_test_annos_withlabels.mat"
        mat.parent.mkdir(parents=True, exist_ok=True)
        savemat(mat, {"annotations": annos})
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    train = common.load_dataset("cars", tmp_path, "train")
    assert train.classes == names
    assert [(s.path, s.label) for s in train.samples] == [
        ("stanford_cars/cars_train/00001.jpg", 1),
        ("stanford_cars/cars_train/00002.jpg", 0),
    ]
    assert [s.label for s in common.load_dataset("cars", tmp_path, "test").samples] == [0, 1]


def test_oxford_pets_reader(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    rows = {"trainval": [("Abyssinian_1", 1, 1), ("american_bulldog_2", 2, 2)], "test": [("Abyssinian_5", 1, 1)]}
    (base / "annotations").mkdir(parents=True)
    for split, items in rows.items():
        for name, _, _ in items:
            jpeg(base / "images" / f"{name}.jpg")
        (base / "annotations" / f"{split}.txt").write_text("".join(f"{n} {c} {s} 1\n" for n, c, s in items))
    train = common.load_dataset("pets", tmp_path, "train")
    assert train.classes == ["Abyssinian", "American Bulldog"]
    assert [(s.path, s.label) for s in train.samples] == [
        ("oxford-iiit-pet/images/Abyssinian_1.jpg", 0),
        ("oxford-iiit-pet/images/american_bulldog_2.jpg", 1),
    ]
    assert [s.label for s in common.load_dataset("pets", tmp_path, "test").samples] == [0]


def test_eurosat_seeded_split_is_disjoint_complete_and_about_80_20(tmp_path):
    base = tmp_path / "eurosat" / "2750"
    for c in ("AnnualCrop", "Forest"):
        for i in range(100):
            jpeg(base / c / f"{c}_{i}.jpg")
    train = common.load_dataset("eurosat", tmp_path, "train")
    test = common.load_dataset("eurosat", tmp_path, "test")
    assert {s.path for s in train.samples}.isdisjoint({s.path for s in test.samples})
    assert len(train) + len(test) == 200 and 25 <= len(test) <= 55
    # the split belongs to the dataset, not to a run's seed: LiRA shadows with other seeds see the same split
    assert [s.path for s in common.read_eurosat(tmp_path, "test").samples] == [s.path for s in test.samples]
    assert {s.path for s in common.read_eurosat(tmp_path, "test", seed=1).samples} != {s.path for s in test.samples}


def test_imagefolder_and_demo_readers(tmp_path):
    make_imagefolder(tmp_path / "train", ["zeta", "alpha"], 2)  # classes.txt gives the order, not sorting
    index = common.load_dataset("demo", tmp_path, "train")
    assert index.classes == ["zeta", "alpha"] and index.samples[0].label == 0 and "zeta" in index.samples[0].path
    assert index.image_id(0) == "zeta/zeta_000"
    assert len(index.subset([True, False, False, True])) == 2
    with pytest.raises(ValueError, match="subset mask"):
        index.subset([True])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common.load_dataset("imagefolder", tmp_path, "nosuchsplit")
    with pytest.raises(ValueError, match="unknown dataset"):
        common.load_dataset("mnist", tmp_path)


def test_load_synthetic_reads_labels_from_manifest(tmp_path):
    common.write_json(tmp_path / "classes.json", {"classes": ["b", "a"], "class_names": ["B", "A"]})
    common.write_jsonl(
        tmp_path / "manifest.jsonl", [{"file": "a/x_0.jpg", "label": 1}, {"file": "b/y_0.jpg", "label": 0}]
    )
    index = common.load_synthetic(tmp_path)
    assert index.classes == ["b", "a"] and [s.label for s in index.samples] == [1, 0]
    with pytest.raises(FileNotFoundError, match="synthesize.py"):
        common.load_synthetic(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------- prompts


def test_prompts_and_captions(tmp_path):
    assert common.build_prompt("tench", "a fish on grass") == "photo of tench, a fish on grass"
    assert common.build_prompt("tench") == "photo of tench"
    assert common.build_prompt("tench", None, "release") == "photo of tench, best quality"
    assert common.negative_prompt() == "distorted, unrealistic, blurry, out of frame"
    assert common.negative_prompt("release").endswith("cropped, deformed")
    index = common.DatasetIndex(
        "x", tmp_path, "train", [common.Sample("a/1.jpg", 0), common.Sample("a/2.jpg", 0)], ["a"], ["a"]
    )
    common.write_jsonl(tmp_path / "c.jsonl", [{"path": "a/1.jpg", "caption": "one"}])
    caps = common.load_captions(tmp_path / "c.jsonl")
    with pytest.raises(KeyError, match="a/2.jpg"):
        common.captions_for(index, caps)
    assert common.captions_for(index, caps, allow_missing=True) == ["one", None]
    assert common.captions_for(index, {}) == [None, None]


# ---------------------------------------------------------------------------------------------------------- method


def test_mmd_matches_its_definition_and_eps_identity():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, 4, 8, 8, generator=g)
    eps = torch.randn(6, 4, 8, 8, generator=g)
    eps_hat = eps + 0.1 * torch.randn(6, 4, 8, 8, generator=g)
    abar = torch.rand(6, generator=g) * 0.9 + 0.05
    zt = abar.sqrt().view(-1, 1, 1, 1) * z0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps
    z0_hat = common.predicted_clean_latents(zt, eps_hat, abar)
    # independent computation: squared distance of the mean embeddings, averaged over dimensions
    expected = np.mean((z0.numpy().mean(0) - z0_hat.numpy().mean(0)) ** 2)
    assert common.mmd_loss(z0, z0_hat).item() == pytest.approx(expected, rel=1e-5)
    # z0 - ẑ0 = (ε̂ - ε) / √SNR
    snr = abar / (1 - abar)
    assert torch.allclose(z0 - z0_hat, (eps_hat - eps) / snr.sqrt().view(-1, 1, 1, 1), atol=1e-4)
    assert common.mmd_loss(z0, z0).item() == 0.0


def _global_mmd_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One DDP-like process: its rows of the batch, the global MMD, backward, then DDP's gradient average."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z0, x, theta = _global_mmd_problem()
    rows = [slice(0, 3), slice(3, 7)][rank]  # unequal shares: the count is all-reduced too
    loss = common.mmd_loss(z0[rows], x[rows] * theta.view(1, -1, 1, 1), across_processes=True)
    loss.backward()
    grad = theta.grad.clone()
    torch.distributed.all_reduce(grad)
    torch.save({"loss": loss.detach(), "grad": grad / world}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.barrier()  # neither process tears gloo down while the other still talks to it
    torch.distributed.destroy_process_group()


def _global_mmd_problem():
    g = torch.Generator().manual_seed(3)
    z0, x = torch.randn(7, 4, 5, 5, generator=g), torch.randn(7, 4, 5, 5, generator=g)
    return z0, x, torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 1.5]))


def test_mmd_across_processes_equals_one_batch(tmp_path):
    """Two gloo processes holding 3 and 4 rows: each gets the full batch's MMD, and its gradient, once averaged over
    processes as DDP does, is the full batch's gradient."""
    torch.multiprocessing.spawn(_global_mmd_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    z0, x, theta = _global_mmd_problem()
    full = common.mmd_loss(z0, x * theta.view(1, -1, 1, 1))
    full.backward()
    assert common.mmd_loss(z0, x * theta.view(1, -1, 1, 1), across_processes=True).item() == full.item()  # 1 proc
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], full.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(got["grad"], theta.grad, rtol=1e-5, atol=1e-7)
    per_process = common.mmd_loss(z0[:3], x[:3] * theta.view(1, -1, 1, 1))
    assert abs(per_process.item() - full.item()) > 1e-3  # the two batches' terms differ, so the check above bites


def test_mmd_release_form_is_weighted_batch_sum():
    eps, eps_hat = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    w = torch.tensor([1.0, 0.5, 0.2, 1.0])
    manual = sum(w[i] * (eps_hat[i] - eps[i]) for i in range(4)).pow(2).mean()
    assert common.mmd_loss_release(eps_hat, eps, w).item() == pytest.approx(manual.item(), rel=1e-5)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    assert torch.allclose(common.min_snr_weights(snr, 5.0), torch.tensor([1.0, 1.0, 0.1]))
    abar = torch.tensor([0.5, 0.8])
    assert torch.allclose(common.snr_from_alphas(abar, torch.tensor([1, 0])), torch.tensor([4.0, 1.0]))


def test_visual_tokens_append_and_replace():
    text, tok = torch.randn(2, 77, 8), torch.randn(2, 8)
    appended = common.add_visual_tokens(text, tok, "append")
    assert appended.shape == (2, 78, 8) and torch.equal(appended[:, 77], tok) and torch.equal(appended[:, :77], text)
    replaced = common.add_visual_tokens(text, tok, "replace-last")
    assert (
        replaced.shape == (2, 77, 8)
        and torch.equal(replaced[:, 76], tok)
        and torch.equal(replaced[:, :76], text[:, :76])
    )
    with pytest.raises(ValueError, match="width"):
        common.add_visual_tokens(text, torch.randn(2, 4))


def test_init_image_preserves_aspect_ratio(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)  # wide image: left/right quarters red, middle white
    img[:, 20:60] = 255
    img[:, :20, 0] = img[:, 60:, 0] = 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    x = common.load_init_image(tmp_path / "wide.png", 20)
    assert x.shape == (3, 20, 20) and x.min() >= -1 and x.max() <= 1
    # center crop keeps only the white middle; a squash resize would have kept the red sides
    assert x[:, :, 1:-1].min() > 0.9


def test_encode_latent_prior_is_per_image_deterministic(tiny_sd):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    batch = common.encode_latent_prior(vae, pixels, gens())
    single = common.encode_latent_prior(vae, pixels[1:2], [torch.Generator().manual_seed(6)])
    assert batch.shape == (3, 4, 16, 16)
    assert torch.allclose(batch[1:2], single, atol=1e-5)
    assert not torch.allclose(
        batch, common.encode_latent_prior(vae, pixels, [torch.Generator().manual_seed(s) for s in (8, 9, 10)])
    )


def test_dataset_root_from_env_then_paths_file(tmp_path, monkeypatch):
    paths = tmp_path / "paths.yaml"
    paths.write_text("cub_root: /from/file\n")
    monkeypatch.delenv("CUB_ROOT", raising=False)
    assert common.data_location("cub_root", paths) == "/from/file"
    monkeypatch.setenv("CUB_ROOT", "/from/env")
    assert common.data_location("cub_root", paths) == "/from/env"
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    monkeypatch.setattr(common, "data_location", lambda key: None)
    with pytest.raises(ValueError, match="IMAGENET_ROOT") as missing:
        common.load_dataset("in10", None)
    # the file where it is read, beside common.py: a stage copied elsewhere and run from another folder does not
    # read a configs/paths.yaml of the current directory
    assert f"'imagenet_root' in {common.PROJECT_DIR / 'configs' / 'paths.yaml'}," in str(missing.value)


def test_latest_checkpoint_is_numeric_and_ignores_partial_saves(tmp_path):
    assert common.latest_checkpoint(tmp_path / "none") == (None, 0)
    for name in ("checkpoint-9", "checkpoint-10", ".tmp-checkpoint-11", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert common.latest_checkpoint(tmp_path) == (tmp_path / "checkpoint-10", 10)  # not the string-sorted "9"


def test_help_shows_defaults_and_the_docstring_as_written(monkeypatch):
    import synthesize

    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps to the terminal width
    lines = synthesize.get_parser().format_help().splitlines()
    assert any(line.strip() == "images per pipeline call, classes mixed (default: 32)" for line in lines)
    # the module docstring, with its commands, as written
    assert (
        "  one GPU:     python synthesize.py --config configs/in10.yaml --lora-dir runs/in10/finetune --scale 1"
        in lines
    )


def test_check_pretrained_names_a_missing_local_directory(tmp_path, monkeypatch):
    """A relative path that does not exist from here says so; the hub client would call it a malformed repo id."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"'runs/demo/generator/sd' does not exist .*{tmp_path}"):
        common.check_pretrained(lambda *a, **k: None, "runs/demo/generator/sd", what="the generator")
    assert common.looks_like_local_path("./sd") and common.looks_like_local_path("/abs/sd")
    assert not common.looks_like_local_path("runwayml/stable-diffusion-v1-5")
    (tmp_path / "runs/demo/generator/sd").mkdir(parents=True)
    common.check_pretrained(lambda *a, **k: None, "runs/demo/generator/sd")  # exists: the library's reader decides

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    # 'demo_generator/sd' reads as a hub id too: the hub's error, plus that no such directory exists here either
    with pytest.raises(OSError, match=f"no directory 'demo_generator/sd' under {tmp_path}.*couldn't connect"):
        common.check_pretrained(offline, "demo_generator/sd")


def test_held_out_split_is_val_or_test_whichever_exists(tmp_path):
    from conftest import make_imagefolder

    root = tmp_path / "ds"
    make_imagefolder(root / "train", ["a", "b"], 1)
    with pytest.raises(FileNotFoundError, match="neither exist .*'train'"):
        common.held_out_split("imagefolder", root)
    make_imagefolder(root / "val", ["a", "b"], 1)
    assert common.resolve_split("imagefolder", root, common.HELD_OUT) == "val"
    assert common.resolve_split("imagefolder", root, "train") == "train"
    make_imagefolder(root / "test", ["a", "b"], 1)
    with pytest.raises(FileNotFoundError, match="both exist"):
        common.held_out_split("imagefolder", root)
    assert common.held_out_split("in10", None) == "val" and common.held_out_split("cub", None) == "test"


def test_an_empty_training_class_folder_is_an_error_at_load(tmp_path):
    """Every stage loads the train split through the reader, so the first one run (train_cls real, in make
    imagefolder) stops at once; it was caught by finetune only, after the real classifier had trained."""
    root = tmp_path / "ds"
    make_imagefolder(root / "train", ["a", "b", "c_empty"], 1)
    make_imagefolder(root / "val", ["a", "b", "c_empty"], 1)
    for split in ("train", "val"):
        (root / split / "c_empty" / "c_empty_000.png").unlink()
    with pytest.raises(ValueError, match=r"no images under .*'c_empty'"):
        common.load_dataset("imagefolder", root, "train")
    assert len(common.load_dataset("imagefolder", root, "val").classes) == 3  # a held-out split may lack a class


def test_class_files_at_the_dataset_root_or_in_the_split(tmp_path):
    from conftest import make_imagefolder

    root = tmp_path / "ds"
    make_imagefolder(root / "train", ["b_cls", "a_cls"], 1)
    for name in ("classes.txt", "class_names.txt"):
        (root / "train" / name).replace(root / name)  # only at the root now
    (root / "class_names.txt").write_text("bee\nant\n")
    index = common.load_dataset("imagefolder", root, "train")
    assert index.classes == ["b_cls", "a_cls"] and index.class_names == ["bee", "ant"]  # the file's order, not sorted
    (root / "train" / "class_names.txt").write_text("bee\nant\n")  # the same in both: fine
    assert common.load_dataset("imagefolder", root, "train").class_names == ["bee", "ant"]
    (root / "train" / "class_names.txt").write_text("wasp\nant\n")
    with pytest.raises(ValueError, match="disagree"):
        common.load_dataset("imagefolder", root, "train")


def test_run_begin_lets_the_main_process_move_an_old_run_aside_before_the_others_read(tmp_path):
    """With --overwrite and another config, a non-main process that read first would see the old run and raise;
    begin() runs the main process's start (move aside, write the new config) before the barrier, the rest after."""
    old = common.RunDir(tmp_path / "run", {"lr": 1})
    old.start()
    old.finish({"top1": 1.0})
    order = []
    main = common.RunDir(tmp_path / "run", {"lr": 2}, overwrite=True, is_main=True)
    other = common.RunDir(tmp_path / "run", {"lr": 2}, overwrite=True, is_main=False)
    assert main.begin(lambda: order.append("barrier")) == "fresh"
    assert other.begin(lambda: order.append("barrier")) == "resume"  # the new run's config, not the old manifest
    assert order == ["barrier", "barrier"] and (tmp_path / f"run.old-{common.config_hash({'lr': 1})}").is_dir()


def test_a_copied_common_records_its_code_by_content_and_no_git_state(tmp_path, monkeypatch):
    """A stage copied into a folder without git recorded git_dirty: false (clean!) and nothing of its code."""
    (tmp_path / "common.py").write_bytes(Path(common.__file__).read_bytes())
    spec = importlib.util.spec_from_file_location("copied_common", tmp_path / "common.py")
    copied = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "copied_common", copied)  # dataclasses look their module up while it loads
    spec.loader.exec_module(copied)
    info = copied.environment_info()
    assert info["git_commit"] is None and info["git_dirty"] is None
    assert info["code_sha256"]["common.py"] == common.hash_file(common.__file__)


def test_a_stage_copied_into_another_repository_uncommitted_is_recorded_as_dirty(tmp_path, monkeypatch):
    """A stage copied into a user's own git project and run before it was committed recorded that project's HEAD with
    git_dirty: false, as if the commit held the code that ran; it holds none of it."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "README").write_text("their project\n")
    subprocess.run([*git, "-C", str(tmp_path), "add", "README"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-qm", "theirs"], check=True)
    (tmp_path / "common.py").write_bytes(Path(common.__file__).read_bytes())
    (tmp_path / "stage.py").write_text("import common\n")
    spec = importlib.util.spec_from_file_location("copied_common", tmp_path / "common.py")
    copied = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "copied_common", copied)
    spec.loader.exec_module(copied)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "stage.py")])
    info = copied.environment_info()
    assert info["git_commit"] and info["git_dirty"] is True
    subprocess.run([*git, "-C", str(tmp_path), "add", "common.py", "stage.py"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-qm", "the stage"], check=True)
    assert copied.environment_info()["git_dirty"] is False  # committed: that commit is the code


def test_a_copied_stage_without_data_is_told_where_the_class_lists_go(tmp_path, monkeypatch):
    """A stage copied with common.py but not data/ died on a bare FileNotFoundError of a wnid list."""
    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="copy the project's data/ folder beside common.py"):
        common.load_dataset("in10", tmp_path, "train")


def test_images_are_read_as_stored_and_floats_are_bad_inputs_not_black(tmp_path):
    """16-bit gray by its top byte (convert clipped it white); a float TIFF (convert clipped it black, as 0 or 1)
    is an unreadable image with the fix, in the up-front check and when read."""
    Image.fromarray(np.full((4, 6), 0x8040, dtype=np.uint16)).save(tmp_path / "wide.png")
    assert np.asarray(common.load_image(tmp_path / "wide.png")).max() == 0x80
    Image.fromarray(np.full((4, 6), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    for full in (True, False):
        assert "float" in common.image_problem(tmp_path / "float.tif", full)
    with pytest.raises(common.ImageReadError, match="8- or 16-bit"):
        common.load_image(tmp_path / "float.tif")


def test_rotated_and_transparent_images_are_named_in_a_warning(tmp_path):
    """Every stage reads an image as stored (as timm and torchvision do); one a viewer shows otherwise, upright by
    its EXIF orientation or with transparency, is counted and the user told how to change the files."""
    root = make_imagefolder(tmp_path / "train", ["cat", "dog"], 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° to view
    Image.new("RGB", (32, 16), "red").save(root / "cat" / "phone.jpg", exif=exif)
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(root / "dog" / "cutout.png")
    index = common.load_dataset("imagefolder", tmp_path, "train")
    description = common.describe_images(index, 16)
    assert (description["rotated"], description["transparent"]) == (1, 1)
    assert np.asarray(common.load_image(root / "cat" / "phone.jpg")).shape == (16, 32, 3)  # as stored
    said = []
    log = SimpleNamespace(info=said.append, warning=said.append)
    common.note_unusual_images(description, 16, log)
    assert any("EXIF rotation" in line and "auto-orient" in line for line in said)
    assert any("transparency" in line and "flatten" in line for line in said)
    said.clear()
    for added in (root / "cat" / "phone.jpg", root / "dog" / "cutout.png"):
        added.unlink()
    common.note_unusual_images(
        common.describe_images(common.load_dataset("imagefolder", tmp_path, "train"), 32), 32, log
    )
    assert said == []  # RGB at the size: nothing to say


def test_a_class_folder_in_another_unicode_form_than_classes_txt_is_named_so(tmp_path):
    """'dög' copied from macOS is d-o-combining-diaeresis-g (NFD); classes.txt typed elsewhere holds the NFC form. The
    error said the folder was not in classes.txt, which visibly held it."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "dög")
    root = make_imagefolder(tmp_path / "train", ["cat", nfd], 2)
    (root / "classes.txt").write_text("cat\ndög\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Unicode form"):
        common.load_dataset("imagefolder", tmp_path, "train")
    (root / "classes.txt").write_text(f"cat\n{nfd}\n", encoding="utf-8")
    assert common.load_dataset("imagefolder", tmp_path, "train").classes == ["cat", nfd]
    for image in (root / nfd).iterdir():  # the folder holds no image: its class is "missing", and why is said too
        image.unlink()
    (root / "classes.txt").write_text("cat\ndög\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="missing.*Unicode form"):
        common.load_dataset("imagefolder", tmp_path, "train")


def test_images_of_a_format_no_stage_reads_are_named_not_dropped_silently(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "train", ["cat", "dog"], 2)
    Image.new("RGB", (8, 8)).save(root / "cat" / "animated.gif")
    (root / "dog" / "IMG_0001.HEIC").write_bytes(b"not decoded here")
    said = []  # the stage's logger, whatever handlers an earlier get_logger left on it
    monkeypatch.setattr(logging.getLogger("realfake"), "warning", said.append)
    assert len(common.load_dataset("imagefolder", tmp_path, "train")) == 4
    assert len(said) == 1 and "2 image(s) in a format no stage reads left out (.gif, .heic)" in said[0]


def test_images_of_unread_formats_are_said_once_per_launch_and_hidden_files_are_none(tmp_path, monkeypatch):
    """Said before the stage has its logger, by every process of a launch: under torchrun each process has its RANK,
    and only the first speaks (not once per GPU). macOS '._' files beside the images are no images of any format."""
    root = make_imagefolder(tmp_path / "train", ["cat", "dog"], 2)
    Image.new("RGB", (8, 8)).save(root / "cat" / "animated.gif")
    (root / "cat" / "._animated.gif").write_bytes(b"AppleDouble metadata")
    said = []
    monkeypatch.setattr(logging.getLogger("realfake"), "warning", said.append)
    for rank in ("1", "3"):
        monkeypatch.setenv("RANK", rank)
        assert len(common.load_dataset("imagefolder", tmp_path, "train")) == 4
    assert said == []
    monkeypatch.setenv("RANK", "0")
    common.load_dataset("imagefolder", tmp_path, "train")
    assert len(said) == 1 and "1 image(s) in a format no stage reads left out (.gif)" in said[0]


def test_describing_pngs_reads_their_headers_not_their_pixels(tmp_path, monkeypatch):
    """describe_images runs on every process of finetune and synthesize over 256 sampled images: a PNG's EXIF
    rotation is looked for in the chunks before its pixels (PIL's getexif decodes the whole image for it)."""
    from PIL import PngImagePlugin

    root = make_imagefolder(tmp_path / "train", ["cat", "dog"], 2)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (16, 8), "red").save(root / "cat" / "rotated.png", exif=exif)
    decoded = []
    load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: decoded.append(1) or load(self))
    description = common.describe_images(common.load_dataset("imagefolder", tmp_path, "train"), 32)
    assert description["rotated"] == 1 and description["sampled"] == 5
    assert decoded == []


def test_a_link_into_another_class_is_refused_and_links_into_a_store_are_not(tmp_path):
    """`ln -s ../dog cat/more` gave every dog image the label cat too, silently. Class folders that link into one
    shared store, or hold links to distinct folders of it, are a layout of their own and stay accepted."""
    root = make_imagefolder(tmp_path / "train", ["cat", "dog"], 2)
    (root / "cat" / "more").symlink_to("../dog")
    with pytest.raises(ValueError, match="more and .*dog are one folder"):
        common.load_dataset("imagefolder", tmp_path, "train")
    (root / "cat" / "more").unlink()
    (root / "bird").symlink_to("dog")  # two classes, one folder
    (root / "classes.txt").write_text("cat\ndog\nbird\n")
    (root / "class_names.txt").unlink()
    with pytest.raises(ValueError, match="bird and .*dog are one folder"):
        common.load_dataset("imagefolder", tmp_path, "train")
    (root / "bird").unlink()
    store = make_imagefolder(tmp_path / "store", ["cats", "more_cats", "dogs"], 2)
    (root / "cat" / "more").symlink_to(store / "more_cats")
    (root / "bird").symlink_to(store / "cats")
    assert len(common.load_dataset("imagefolder", tmp_path, "train")) == 8  # cat 2 + its linked 2, dog 2, bird 2


def test_warnings_said_before_the_logger_reach_the_runs_log(tmp_path, monkeypatch):
    """The --skip-bad, unread-format and other-data warnings come before a stage opens its log.txt: they were on the
    terminal only, so the run's own record lacked them."""
    monkeypatch.setenv("RANK", "0")
    common.early_warning("--skip-bad: leaving out 3 unreadable train image(s)")
    common.get_logger(tmp_path / "run").info("started")
    said = (tmp_path / "run" / "log.txt").read_text()
    assert said.index("leaving out 3") < said.index("started")
    common.get_logger(tmp_path / "next").info("started")
    assert "leaving out" not in (tmp_path / "next" / "log.txt").read_text()  # said once, into one run's log


def test_processes_checking_one_split_at_once_check_it_once(tmp_path, monkeypatch):
    """The processes of a launch all check the split at start (after a new CHECK_VERSION, IN-1K's headers take
    minutes): each read every file. One now checks while the others wait, then read its result."""
    import threading
    import time

    make_imagefolder(tmp_path / "train", ["cat", "dog"], 3)
    index = common.load_dataset("imagefolder", tmp_path, "train")
    checked, problem = [], common.image_problem

    def slow_problem(path, full):
        checked.append(path)
        time.sleep(0.02)  # the others start meanwhile
        return problem(path, full)

    monkeypatch.setattr(common, "image_problem", slow_problem)
    results = []
    jobs = [
        threading.Thread(target=lambda: results.append(common.check_images(index, cache_dir=tmp_path / "c")))
        for _ in range(2)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert len(results) == 2 and results[0][1:] == results[1][1:] == ({}, results[0][2])
    assert len(checked) == len(index)  # once, not once per process
