"""bench.py: the synthesis, finetune and train benchmarks run the stages' own code and report what they measured."""

import pytest
import torch
from conftest import args_for

import bench
import common
import synthesize


def test_synth_reports_both_loops(tiny_sd, tiny_dataset, tiny_lora, tmp_path):
    m = bench.main(
        [
            "synth",
            *args_for(
                tiny_sd,
                tiny_dataset,
                tmp_path,
                "--lora-dir",
                tiny_lora,
                "--images",
                6,
                "--batch-size",
                6,
                "--baseline-batch",
                6,
                "--rounds",
                2,
            ),
        ]
    )
    assert m["images"] == 6 and m["rounds"] == 2 and m["ours_images_per_s"] > 0 and m["baseline_images_per_s"] > 0
    assert 0 < m["ours_unet_share"] <= 1 and 0 < m["baseline_unet_share"] <= 1
    assert m["speedup"] == pytest.approx(m["ours_images_per_s"] / m["baseline_images_per_s"])
    # The overall ratio is of the totals, so it lies between the rounds' own ratios.
    assert len(m["round_speedups"]) == 2
    assert min(m["round_speedups"]) - 1e-9 <= m["speedup"] <= max(m["round_speedups"]) + 1e-9
    assert len(list((tmp_path / "ours").rglob("*.jpg"))) == 6
    assert len(list((tmp_path / "baseline").rglob("*.jpg"))) == 6
    assert common.read_json(tmp_path / "benchmark.json")["speedup"] == m["speedup"]


def test_sd15_random_has_sd15_shapes():
    """Parameter counts of SD 1.5's UNet, VAE and CLIP ViT-L/14 text tower (built on the meta device: no memory)."""
    with torch.device("meta"):
        unet, vae, text_encoder = bench.sd15_random()
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    assert text_encoder.config.hidden_act == "quick_gelu" and unet.config.cross_attention_dim == 768


def test_synth_random_weights_time_one_model_fused_and_unfused(tiny_sd, tiny_dataset, tmp_path, monkeypatch):
    """--weights sd15-random rebuilds the pipeline around new random models with a LoRA; the baseline keeps it
    unfused (applied at --lora-scale per call), ours fuses it: the same function either way. SD1.5's shapes are
    swapped for the tiny pipeline's so this runs on a CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    def tiny_random(tokenizer=None):
        torch.manual_seed(3)
        return (
            UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_sd, subfolder="unet")),
            AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_sd, subfolder="vae")),
            CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"),
        )

    monkeypatch.setattr(bench, "sd15_random", tiny_random)
    args = common.parse_args(
        bench.synth_parser(),
        args_for(tiny_sd, tiny_dataset, tmp_path, *"--weights sd15-random --vg-mode none".split()),
        "synthesize",
    )
    args.lora = True
    plan = synthesize.prepare(args)
    baseline, ours = bench.synth_pipelines(args, plan, torch.device("cpu"))
    assert baseline.unet is not ours.unet and any("lora" in n for n, _ in baseline.unet.named_parameters())
    assert not any("lora" in n for n, _ in ours.unet.named_parameters())
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor(300), torch.randn(1, 77, 64)
    with torch.no_grad():
        fused = ours.unet(x, t, ctx).sample
        unfused = baseline.unet(x, t, ctx, cross_attention_kwargs={"scale": args.lora_scale}).sample
        without = baseline.unet(x, t, ctx, cross_attention_kwargs={"scale": 0.0}).sample
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)
    assert (fused - without).abs().max() > 1e-3  # the random LoRA is not a no-op, so the check above means something


def test_finetune_reports_throughput(tiny_sd):
    result = bench.main(
        [
            "finetune",
            "--pretrained-model",
            str(tiny_sd),
            *("--resolution 32 --train-batch-size 2 --steps 1 --vg-encoder unused --gradient-checkpointing").split(),
        ]
    )
    assert result["samples_per_s"] > 0 and result["peak_memory_gb"] > 0 and result["gradient_checkpointing"]
    assert result["batch_size"] == 2 and result["model"] == str(tiny_sd)


def test_unknown_benchmark_names_the_choices():
    with pytest.raises(SystemExit, match="synth,finetune"):
        bench.main(["synthesize"])


def test_train_reports_speed_of_train_cls_step_on_fake_data(tmp_path):
    """bench.py train times train_cls.py's own step (moved out of the stage; was train_cls.py --benchmark)."""
    argv = "train --fake-data 24 --fake-size 40 --model test_resnet --input-size 32 --batch-size 4 --workers 0"
    argv = argv.split() + "--amp no --steps 3 --warmup 1 --output-dir".split() + [str(tmp_path)]
    result = bench.main(argv)
    assert result["img_per_s"] > 0 and 0 < result["data_wait_frac"] < 1 and result["model"] == "test_resnet"
    assert common.read_json(tmp_path / "benchmark.json")["img_per_s"] == result["img_per_s"]
    with pytest.raises(ValueError, match="--fake-data"):
        bench.main(argv[:2] + ["8"] + argv[3:])
