"""The Makefile as the paper's experiment runner: `make -n` prints the whole chain without running anything."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import mia_lira

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(*args: str) -> list[str]:
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.replace("\\\n", " ")  # join continued recipe lines
    return [line for line in out.splitlines() if re.search(r"\b\w+\.py\b", line)]


def stages(lines):
    return [re.search(r"(\w+)\.py", line).group(1) for line in lines]


def test_in1k_scale10_chain_order_and_flags():
    lines = dry_run("in1k", "SCALE=10")
    assert stages(lines) == ["caption", "finetune", "synthesize", "eval_gap", "train_cls", "eval_ood"]
    assert all("--config configs/in1k.yaml" in line for line in lines)
    synth = lines[2]
    assert "--scale 10" in synth and "--output-dir runs/in1k/synth_x10" in synth
    assert "--lora-dir runs/in1k/finetune" in synth
    assert "--captions runs/in1k/captions/captions.jsonl" in lines[1]
    assert "--synthetic-dir runs/in1k/synth_x10" in lines[3] and "--output-dir runs/in1k/gap_synth_x10" in lines[3]
    assert "--train-dirs runs/in1k/synth_x10" in lines[4] and "--output-dir runs/in1k/cls_synth_x10" in lines[4]
    assert "--classifier runs/in1k/cls_synth_x10" in lines[5]


def test_cub_sweep_mix_has_no_captions_and_one_chain_per_scale():
    lines = dry_run("cub", "SCALES=1 2", "MODE=mix")
    assert "caption" not in stages(lines) and not any("--captions" in line for line in lines)
    assert stages(lines).count("finetune") == 1  # one generator serves every scale
    assert [line for line in lines if "synthesize.py" in line and "--scale 2" in line]
    assert any("--train-dirs real runs/cub/synth_x2" in line for line in lines)
    assert any("--output-dir runs/cub/cls_mix_x1" in line for line in lines)


def test_real_mode_skips_the_generator_and_accelerate_launcher():
    lines = dry_run("pets", "MODE=real", "LAUNCH=accelerate", "GPUS=8")
    assert stages(lines) == ["train_cls", "eval_ood"]
    assert all("accelerate launch --config_file configs/accelerate/8gpu.yaml" in line for line in lines)
    assert (ROOT / "configs/accelerate/8gpu.yaml").is_file()


def test_demo_ablation_switches_each_component_and_covers_every_report_row():
    import demo_report

    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "demo-ablation"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.replace("\\\n", " ")
    synth = {
        m.group(1): m.group(0) for m in re.finditer(r'synthesize\.py[^"]*--output-dir runs/demo/ablation/(\w+)', out)
    }
    assert "--lora-dir none --strength 1.0" in synth["synth_none"]  # no finetune, no latent prior
    assert "--lora-dir none" in synth["synth_lp"] and "--strength" not in synth["synth_lp"]
    assert "--lora-dir" not in synth["synth_no_lp"] and "--strength 1.0" in synth["synth_no_lp"]  # config's LoRA
    assert "--lora-dir runs/demo/ablation/ft_no_vg" in synth["synth_no_vg"]
    assert "--lora-dir runs/demo/ablation/ft_no_mmd" in synth["synth_no_mmd"]
    assert "--scale 4 --reuse-from runs/demo/synth_x1 runs/demo/ablation/synth_x2" in synth["synth_x4"]
    assert re.search(r"finetune\.py[^\"]*--vg-mode none --output-dir runs/demo/ablation/ft_no_vg", out)
    assert re.search(r"finetune\.py[^\"]*--mmd-weight 0 --output-dir runs/demo/ablation/ft_no_mmd", out)
    # every row and scale of the report has a classifier set, seeds 0-4 by default
    sets = dict(job.split(":", 1) for job in re.search(r"for job in (.*?); do for seed", out).group(1).split())
    # and every synthetic set (every set but real) gets its eval_gap figure, in the folder the report reads
    gaps = dict(job.split(":", 1) for job in re.search(r"for job in ([^;]*); do [^;]*eval_gap", out).group(1).split())
    assert gaps == {k: v for k, v in sets.items() if k != "real"}
    assert "--output-dir runs/demo/ablation/gap_${job%%:*}" in out
    wanted = {prefix.removeprefix("cls_") for *_, prefix in demo_report.ABLATION_ROWS}
    wanted |= {prefix.removeprefix("cls_") for _, prefix in demo_report.ABLATION_SCALES} | {"real"}
    assert set(sets) == wanted and sets["all"] == "runs/demo/synth_x1" and sets["real"] == "real"
    assert "for seed in 0 1 2 3 4" in out and "--output-dir runs/demo/ablation/cls_${job%%:*}_s$seed" in out


def test_benchmarks_time_what_they_say():
    """bench-synth times ours compiled over alternating rounds (ARGS appended last, so it can switch compile off);
    bench-gpu builds only the untrained skeleton, never the CPU-pretrained demo generator, and points the SD1.5-shaped
    benchmark at it."""
    synth = [line for line in dry_run("bench-synth", "ARGS=--compile off") if "bench.py synth" in line]
    assert (
        len(synth) == 1 and "--rounds" in synth[0] and synth[0].index("--compile on") < synth[0].index("--compile off")
    )
    gpu = dry_run("-o", ".venv/.installed", "bench-gpu")
    assert any("demo.py skeleton" in line for line in gpu) and not any("demo.py generator" in line for line in gpu)
    synth = [line for line in gpu if "bench.py synth" in line]
    assert len(synth) == 1 and "--weights sd15-random" in synth[0]
    assert "--pretrained-model runs/demo/skeleton" in synth[0]
    tunes = [line for line in gpu if "bench.py finetune" in line]
    assert len(tunes) == 2 and all("--weights sd15-random" in line for line in tunes)


def test_imagefolder_runs_the_three_modes_and_the_report_in_its_own_runs_folder(tmp_path):
    data = tmp_path / "flowers"
    (data / "train").mkdir(parents=True)
    lines = dry_run("imagefolder", f"DATA={data}")
    assert all("--config configs/imagefolder.yaml" in line and f"--data-root {data}" in line for line in lines)
    for run in ("cls_real", "cls_synth_x1", "cls_mix_x1"):
        assert any(f"--output-dir runs/flowers/{run}" in line for line in lines)
        assert any(f"--classifier runs/flowers/{run} --output-dir runs/flowers/ood_{run}" in line for line in lines)
    assert "demo_report.py report" in lines[-1] and "--output-dir runs/flowers" in lines[-1]
    only_mix = dry_run("imagefolder", f"DATA={data}", "MODE=mix")
    assert [line for line in only_mix if "train_cls.py" in line] == [
        line for line in lines if "train_cls.py" in line and "cls_mix_x1" in line
    ]
    named = dry_run("imagefolder", f"DATA={data}", "NAME=f2", "PRESET=paper", "SCALE=2")
    assert all("configs/imagefolder_paper.yaml" in line for line in named)
    assert any("--scale 2" in line and "--output-dir runs/f2/synth_x2" in line for line in named)
    for extra, says in (([], "usage: make imagefolder DATA=DIR"), ([f"DATA={tmp_path}"], "train does not exist")):
        # Really run (not -n) to the checks, which stop it before any stage; -o: never (re)install the venv here.
        done = subprocess.run(["make", "-o", ".venv/.installed", "imagefolder", *extra], cwd=ROOT, capture_output=True)
        assert done.returncode != 0 and says in (done.stdout + done.stderr).decode()


def test_imagefolder_plans_refuses_shell_syntax_and_keeps_one_dataset_per_name(tmp_path):
    data = tmp_path / "flowers"
    (data / "train").mkdir(parents=True)
    (plan,) = dry_run("imagefolder", f"DATA={data}", "PLAN=1", "SCALE=10")  # PLAN=1 ran the whole chain
    assert "synthesize.py --config configs/imagefolder.yaml" in plan and "--scale 10" in plan and "--plan" in plan

    def make(*args, cwd=ROOT):  # really run (not -n) to the checks, which stop it before any stage
        done = subprocess.run(["make", "-o", ".venv/.installed", *args], cwd=cwd, capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr

    for odd, named in (("flowers(2)", "( )"), ("my flowers", "space")):
        (tmp_path / odd / "train").mkdir(parents=True)
        code, said = make("imagefolder", f"DATA={tmp_path / odd}")
        assert code == 2 and f"make or the shell would misread: {named};" in said
    shutil.copy(ROOT / "Makefile", tmp_path)  # a runs/ folder of its own
    (tmp_path / "runs" / "flowers").mkdir(parents=True)
    (tmp_path / "runs" / "flowers" / "data_root.txt").write_text("/elsewhere/flowers\n")
    code, said = make("imagefolder", f"DATA={data}", cwd=tmp_path)
    assert code == 2 and "runs/flowers holds the chain of /elsewhere/flowers" in said and "NAME=" in said


def test_test_split_and_skip_bad_reach_every_stage_that_reads_the_real_images():
    lines = dry_run("in10", "MODE=mix", "TEST_SPLIT=val", "SKIP_BAD=1")
    readers = [line for line in lines if re.search(r"(train_cls|eval_gap|eval_ood)\.py", line)]
    assert len(readers) == 3 and all("--test-split val" in line and "--skip-bad" in line for line in readers)
    assert not any("--test-split" in line for line in lines if line not in readers)
    writers = [line for line in lines if re.search(r"(caption|finetune|synthesize)\.py", line)]
    assert stages(writers) == ["caption", "finetune", "synthesize"] and all("--skip-bad" in line for line in writers)
    # make mia's shadows too, whatever ARGS adds (a --train-cls-args in ARGS replaced the one that carried it)
    (mia,) = dry_run("mia", "TEST_SPLIT=val", "ARGS=--train-cls-args '--epochs 1'")
    args = mia_lira.get_parser().parse_args(shlex.split(mia.split("mia_lira.py", 1)[1]))
    assert (args.test_split, args.train_cls_args) == ("val", "--epochs 1")


def test_make_B_reinstalls_nothing_while_the_venv_is_up_to_date(tmp_path):
    """The README's `make -B ...` (after changing images) ran pip four times per chain through the venv's stamp."""
    import os

    for name in ("Makefile", "requirements.txt"):
        shutil.copy(ROOT / name, tmp_path)
    stamp = tmp_path / ".venv" / ".installed"
    stamp.parent.mkdir()
    stamp.touch()
    os.utime(tmp_path / "requirements.txt", (0, 0))  # installed after the last change
    # PYTHON_SYS=false: an install attempt fails at once instead of building a venv; the output of a run that
    # did nothing is empty (the tmp folder's name contains 'reinstalls': no word search on make's chatter)
    make = ["make", "--no-print-directory", "PYTHON_SYS=false"]
    up_to_date = subprocess.run([*make, "-B", "venv"], cwd=tmp_path, capture_output=True)
    assert up_to_date.returncode == 0 and not up_to_date.stdout + up_to_date.stderr  # not a word: nothing ran
    os.utime(tmp_path / "requirements.txt")  # changed since: now it must install
    changed = subprocess.run([*make, "venv"], cwd=tmp_path, capture_output=True)
    assert changed.returncode != 0 and b".venv/.installed" in changed.stderr  # it tried (and had no Python)


def test_a_classifier_stopped_by_epochs_per_job_stops_the_chain(tmp_path):
    """train_cls --epochs-per-job exits 0 without a manifest; make went on to eval_ood, which then failed."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "in10.yaml", tmp_path / "configs")
    # RUN=true: every stage "succeeds" and writes nothing, as a classifier's time-limited job does
    run = ["make", "-o", ".venv/.installed", "pipeline", "DATASET=in10", "MODE=real", "RUN=true"]
    done = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0 and "runs/in10/cls_real: not finished (--epochs-per-job)" in done.stdout
    assert "eval_ood.py" not in done.stdout


def test_a_sweep_reuses_the_smaller_scales_made_earlier_in_the_same_make(tmp_path):
    """`make in100 SCALES="1 2 5 10"` (README): x2 hard-links the x1 images made a moment before by the same make.
    $(wildcard) saw none of them: make caches a folder's listing, so every scale of a fresh sweep generated all."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "cub.yaml", tmp_path / "configs")
    (tmp_path / "runs" / "cub").mkdir(parents=True)  # a folder make has listed before any synthesis ran
    stage = tmp_path / "stage.sh"  # every stage "succeeds", writing the manifest make waits for
    stage.write_text(
        '#!/bin/bash\necho "STAGE $*"\nwhile [ $# -gt 0 ]; do [ "$1" = --output-dir ] && out=$2; shift; done\n'
        'mkdir -p "$out" && touch "$out/manifest.json"\n'
    )
    stage.chmod(0o755)
    run = ["make", "-o", ".venv/.installed", "pipeline", "DATASET=cub", "SCALES=1 2 5", f"RUN={stage}"]
    done = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    synth = {}
    for line in done.stdout.splitlines():
        if line.startswith("STAGE synthesize.py"):
            args = shlex.split(line)
            synth[args[args.index("--scale") + 1]] = args[args.index("--reuse-from") + 1 : args.index("--output-dir")]
    assert synth == {"1": [], "2": ["runs/cub/synth_x1"], "5": ["runs/cub/synth_x1", "runs/cub/synth_x2"]}


def test_overwrite_reaches_the_demo_stages_and_leaves_the_reports_runnable():
    """README: re-run with OVERWRITE=1. The demo's report commands got --overwrite too, which demo_report.py does not
    take: `make demo OVERWRITE=1` ran every stage, then failed at the report (unrecognized arguments)."""
    import demo_report

    for target, command in (("demo", "report"), ("demo-ablation", "ablation-report")):
        lines = dry_run(target, "OVERWRITE=1")
        assert any("finetune.py" in line and "--overwrite" in line for line in lines)
        (report,) = [line for line in lines if "demo_report.py" in line]
        argv = shlex.split(report.split("demo_report.py", 1)[1].split("||", 1)[0])
        assert argv[0] == command and demo_report.get_parser().parse_args(argv).config == "configs/demo.yaml"


@pytest.mark.parametrize("target", ["demo", "demo-ablation", "in10", "bench-gpu", "bench-train", "bench-synth"])
def test_recipes_spell_every_option_by_its_one_name(target):
    """--num-workers and --amp are aliases kept for configs and old command lines; the Makefile, which people copy
    commands from, used them beside --workers and --mixed-precision."""
    from test_docs import FLAG, parser_for

    aliased = []
    for line in dry_run(target):
        for script, tail in re.findall(r"(\w+)\.py\b((?:(?!\w+\.py\b).)*)", line):
            known = getattr(parser_for(script, tail), "_option_string_actions", {})
            flags = FLAG.findall(re.sub(r"\"[^\"]*\"|'[^']*'", "", tail))  # a quoted value holds another script's flags
            aliased += [f"{script}.py {f}" for f in flags if f in known and known[f].option_strings[0] != f]
    assert not aliased, aliased
