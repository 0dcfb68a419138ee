"""The Makefile as the paper's experiment runner: `make -n` prints the whole chain without running anything."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

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
    assert stages(lines) == ["caption", "finetune", "synthesize", "train_cls", "eval_ood"]
    assert all("--config configs/in1k.yaml" in line for line in lines)
    synth = lines[2]
    assert "--scale 10" in synth and "--output-dir runs/in1k/synth_x10" in synth
    assert "--lora-dir runs/in1k/finetune" in synth
    assert "--captions runs/in1k/captions/captions.jsonl" in lines[1]
    assert "--train-dirs runs/in1k/synth_x10" in lines[3] and "--output-dir runs/in1k/cls_synth_x10" in lines[3]
    assert "--classifier runs/in1k/cls_synth_x10" in lines[4]


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
    sets = dict(job.split(":", 1) for job in re.search(r"for job in (.*?); do", out).group(1).split())
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
