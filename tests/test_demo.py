"""demo.py: deterministic procedural data, the tiny generator's pretraining and round trip, the report."""

import argparse
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import demo
import demo_report

TINY_DATA = "--train-per-class 2 --test-per-class 2 --ood-per-class 1".split()
TINY_GENERATOR = (
    "--pretrain-images 16 --held-out-images 10 --vae-steps 2 --vae-batch-size 4 "
    "--unet-steps 2 --unet-batch-size 4 --clip-steps 2 --grid-per-class 1 "
    "--measure-per-class 1 --measure-steps 4 --cls-epochs 1"
).split()


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_data")
    demo.main(["data", "--output-dir", str(root), *TINY_DATA])
    return root


def test_data_layout_and_determinism(demo_data, tmp_path):
    for split, per_class in (("train", 2), ("test", 2), ("sketch", 1), ("rendition", 1)):
        index = common.load_dataset("demo", demo_data, split)
        assert index.classes == list(demo.CLASSES) and index.class_names == list(demo.CLASSES)
        assert [s.label for s in index.samples] == [c for c in range(10) for _ in range(per_class)]
        assert all(common.load_image(index.abspath(i)).size == (32, 32) for i in range(len(index)))
    # Same seed -> identical bytes, written in another folder; another seed -> other images.
    demo.main(["data", "--output-dir", str(tmp_path / "again"), *TINY_DATA])
    assert files(tmp_path / "again") == files(demo_data)
    demo.main(["data", "--output-dir", str(tmp_path / "seed1"), "--seed", "1", *TINY_DATA])
    other = files(tmp_path / "seed1")
    assert other.keys() == files(demo_data).keys()
    assert all(other[k] != v for k, v in files(demo_data).items())
    # Splits are different draws: no test image equals a train image.
    train = {v for k, v in files(demo_data).items() if k.startswith("train/")}
    assert not train & {v for k, v in files(demo_data).items() if not k.startswith("train/")}


def test_data_rerun_is_a_noop_and_changed_config_fails(demo_data):
    before = (demo_data / "manifest.json").stat().st_mtime_ns
    demo.main(["data", "--output-dir", str(demo_data), *TINY_DATA])
    assert (demo_data / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(common.ConfigMismatchError, match="train_per_class"):
        demo.main(
            [
                "data",
                "--output-dir",
                str(demo_data),
                *"--train-per-class 3 --test-per-class 2 --ood-per-class 1".split(),
            ]
        )


def test_image_depends_only_on_its_ids():
    a = demo.demo_image(0, "train", 3, 7)
    assert a.tobytes() == demo.demo_image(0, "train", 3, 7).tobytes()
    assert a.tobytes() != demo.demo_image(0, "train", 3, 8).tobytes()
    # A sketch is dark ink on light paper: grey, and mostly light.
    sketch = torch.tensor(np.asarray(demo.demo_image(0, "sketch", 0, 0)), dtype=torch.float32).reshape(-1, 3)
    assert (sketch[:, 0] == sketch[:, 1]).all() and sketch.mean() > 150


def test_tokenizer_gives_one_token_per_class_word(tmp_path):
    tokenizer = demo.save_tokenizer(tmp_path, demo.CLASSES + demo.PROMPT_WORDS)
    for name in demo.CLASSES:
        ids = tokenizer(common.build_prompt(name)).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [
            "<|startoftext|>",
            "photo</w>",
            "of</w>",
            f"{name}</w>",
            "<|endoftext|>",
        ]
    # A word outside the vocabulary still tokenizes, character by character.
    assert len(tokenizer("zebra").input_ids) > 3


def test_skeleton_is_an_untrained_loadable_pipeline_and_cached(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    out = tmp_path / "skeleton"
    assert demo.main(["skeleton", "--output-dir", str(out)])["trained"] is False
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    ids = pipe.tokenizer(common.build_prompt(demo.CLASSES[0])).input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(ids)[2:4] == ["of</w>", f"{demo.CLASSES[0]}</w>"]
    assert list(pipe.unet.config.block_out_channels) == [32, 64] and not (out / "phases.json").exists()
    stamp = (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    demo.main(["skeleton", "--output-dir", str(out)])  # complete with the same settings: nothing is rebuilt
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_runs_dir_is_the_root_of_every_stage_here_too(tmp_path):
    """A config's runs_dir reaches every stage, which writes <runs-dir>/<dataset>/...: demo.py and demo_report.py
    took it as the demo's own folder, so they wrote and read beside the stages' runs, not among them."""
    config = tmp_path / "my.yaml"
    config.write_text(f"dataset: demo\nruns_dir: {tmp_path / 'runs'}\n")
    demo.main(["skeleton", "--config", str(config)])
    assert (tmp_path / "runs" / "demo" / "skeleton" / "manifest.json").is_file()  # the stages' folder for the demo
    assert demo_report.main(["report", "--config", str(config)])["runs_dir"] == str(tmp_path / "runs" / "demo")


def test_psnr_matches_its_definition():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.1)
    assert demo.psnr(a, b) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.01)).item(), rel=1e-5)


def test_pretraining_reduces_the_losses(tmp_path):
    """A few steps of each pretraining phase lower its loss on a fixed batch (same noise, same timesteps)."""
    from diffusers import DDPMScheduler

    pipe = demo.build_generator(tmp_path / "sd", demo.CLASSES + demo.PROMPT_WORDS)
    images, labels = demo.pretraining_images(0, 16)
    x = demo.to_unit(images)

    def vae_loss():
        with torch.no_grad():
            return (pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample - x).pow(2).mean().item()

    before = vae_loss()
    vae_hp = argparse.Namespace(vae_steps=12, vae_batch_size=8, vae_lr=2e-3, kl_weight=1e-6, seed=0)
    demo.train_vae(pipe.vae, images, vae_hp)
    assert vae_loss() < 0.8 * before

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = demo.prompt_table(pipe.tokenizer, [""])
    mean, std = demo.encode_all(pipe.vae, images)
    gen = torch.Generator().manual_seed(1)
    t, noise = torch.randint(0, 1000, (16,), generator=gen), torch.randn(mean.shape, generator=gen)

    def unet_loss():
        with torch.no_grad():
            cond = pipe.text_encoder(ids)[0][labels]
            return demo.diffusion_loss(pipe.unet, scheduler, mean, cond, t, noise, None).mean().item()

    before = unet_loss()
    hp = argparse.Namespace(
        unet_steps=12,
        unet_batch_size=8,
        unet_lr=2e-3,
        text_lr=1e-3,
        p_uncond=0.1,
        high_t_fraction=0.5,
        snr_gamma=5.0,
        ema_decay=0.0,
        seed=0,
    )
    demo.train_unet(pipe.unet, pipe.text_encoder, scheduler, demo.CachedLatents(mean, std, 1.0, labels), ids, hp)
    assert unet_loss() < 0.9 * before


def test_generator_round_trip_and_cache(demo_data, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from transformers import CLIPVisionModelWithProjection

    out = tmp_path / "generator"
    metrics = demo.main(["generator", "--data-root", str(demo_data), "--output-dir", str(out), *TINY_GENERATOR])
    for key in ("vae_psnr_db", "cond_uncond_rel_diff", "denoise_class_acc"):
        assert isinstance(metrics[key], float)
    assert set(metrics["img2img_classifier"]) >= {"real_top1", "synth_top1", "synth_over_real", "judge_test_top1"}
    for key in ("t2i_class_acc", "img2img_class_acc", "image_encoder_ncm_acc", "denoise_class_acc_per_t"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["vae_colour_shift"] >= 0 and metrics["quality_images"] == "demo test split"
    weights = list(out.rglob("*.safetensors"))  # written by save_pretrained (safetensors: 0600 unless fixed)
    assert len(weights) >= 4 and all(w.stat().st_mode & 0o777 == common.file_mode(out) for w in weights)
    for png in ("samples_text2image.png", "samples_img2img.png", "vae_reconstructions.png"):
        assert common.load_image(out / png).size[0] > 0

    # The stages load it exactly as they load SD 1.5: from_pretrained on the directory.
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(out / "sd", safety_checker=None)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained VAE's latent spread
    image = common.load_image(next((demo_data / "train" / "circle").glob("*.png")))
    result = pipe(
        "photo of circle",
        image=image,
        strength=0.75,
        num_inference_steps=4,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert result.shape == (1, 32, 32, 3)
    vision = CLIPVisionModelWithProjection.from_pretrained(out / "clip_vision")
    width = pipe.unet.config.cross_attention_dim  # the visual-guidance token needs no projection
    assert vision(pixel_values=torch.zeros(1, 3, 32, 32)).image_embeds.shape == (1, width)

    # Cached: a second call with the same settings trains nothing and returns the recorded metrics.
    before = (out / "manifest.json").stat().st_mtime_ns
    again = demo.main(["generator", "--data-root", str(demo_data), "--output-dir", str(out), *TINY_GENERATOR])
    assert again["vae_psnr_db"] == metrics["vae_psnr_db"]
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_report_skips_missing_stages(demo_data, tmp_path):
    runs = tmp_path / "runs"
    common.RunDir(runs / "cls_real", {"model": "x"}).start()
    common.RunDir(runs / "cls_real", {"model": "x"}).finish({"top1": 0.5, "top5": 0.9, "elapsed_s": 12.0})
    synth = runs / "synth_x1"
    train = common.load_dataset("demo", demo_data, "train")
    rows = []
    for i, sample in enumerate(train.samples):  # a fake synthesize.py output: copies of the real images
        file = f"{train.classes[sample.label]}/{Path(sample.path).stem}_0.png"
        common.save_image(common.load_image(train.abspath(i)), synth / file)
        rows.append({"file": file, "label": sample.label, "source": sample.path, "copy": 0})  # as synthesize writes
    common.write_jsonl(synth / "manifest.jsonl", rows)
    common.write_json(synth / "classes.json", {"classes": train.classes, "class_names": train.class_names})
    common.RunDir(synth, {"scale": 1}).start()
    common.RunDir(synth, {"scale": 1}).finish({"images": len(rows)})

    summary = demo_report.main(["report", "--output-dir", str(runs), "--data-root", str(demo_data)])
    assert summary["headline"]["cls_real.top1"] == 0.5
    assert summary["stages"]["cls_real"]["elapsed_s"] == 12.0
    assert {"finetune", "eval_ood", "mia_lira", "generator"} <= set(summary["missing_stages"])
    assert summary["total_elapsed_s"] == 12.0 + summary["stages"]["synth_x1"]["elapsed_s"]
    assert json.loads((runs / "summary.json").read_text())["headline"] == summary["headline"]
    report = (runs / "report.md").read_text()
    assert "cls_real" in report and "synth_x1" in report
    grid = common.load_image(runs / "real_vs_synthetic.png")
    assert grid.size == (32 * 3 * 4, 32 * 3 * 10)  # 2 real + 2 synthetic per class at 3x, one row per class


def test_report_does_not_count_the_shipped_generators_build_time(demo_data, tmp_path):
    """The shipped generator (a --pretrained-model outside the runs folder) shows its figures but was built once,
    not by this chain: its 95 min entered the chain's total time (make imagefolder's report too)."""
    runs, shipped = tmp_path / "runs", tmp_path / "demo_generator"
    common.RunDir(runs / "cls_real", {"model": "x"}).finish({"top1": 0.5, "top5": 0.9, "elapsed_s": 12.0})
    common.RunDir(shipped, {"recipe": "x"}).finish({"vae_psnr_db": 29.0, "elapsed_s": 5700.0})
    args = [
        "report",
        "--output-dir",
        str(runs),
        "--data-root",
        str(demo_data),
        "--pretrained-model",
        str(shipped / "p"),
    ]
    summary = demo_report.main(args)
    assert summary["stages"]["generator"]["metrics"]["vae_psnr_db"] == 29.0
    assert summary["stages"]["generator"]["shipped"] and summary["total_elapsed_s"] == 12.0
    assert (
        "| generator | generator | shipped (built once in 5700.0 s; not counted) |" in (runs / "report.md").read_text()
    )
    assert summary["headline"]["generator.vae_psnr_db"] == 29.0 and "data" in summary["missing_stages"]
    user = demo_report.main([*args, "--dataset", "imagefolder"])  # make imagefolder's report: the figures of the
    assert "generator.vae_psnr_db" not in user["headline"] and "data" not in user["missing_stages"]  # demo data aside


def test_paper_tables_from_stage_manifests(tmp_path):
    """Tab. 1 / Tab. 4 rows come from the classifier and eval manifests; privacy rows from mia_lira's."""

    def manifest(name, metrics):
        common.write_json(tmp_path / name / "manifest.json", {"metrics": metrics})

    manifest("cls_real", {"top1": 40.0, "top5": 80.0})
    manifest("ood_cls_real", {"test/top1": 40.0, "sketch/top1": 20.5, "rendition/top1": 30.0})
    manifest("cls_synth_x1", {"top1": 25.0, "top5": 60.0})  # its eval has not run: shifted cells stay empty
    attack = {"auc": 0.7, "balanced_accuracy": 0.6, "tpr_at_0.01_fpr": 0.05, "num_nonmembers": 100}
    manifest("mia_lira", {"real": {"online": attack}, "synthetic": {"online": {**attack, "auc": 0.55}}})
    lines, tables = demo_report.paper_tables(tmp_path)
    text = "\n".join(lines)
    assert "| real | 40.0 | 80.0 | 30.0 | 20.5 |" in text  # sets sorted: rendition, sketch
    assert "| synthetic x1 | 25.0 | 60.0 | – | – |" in text
    assert "real + synthetic" not in text
    assert tables["classifiers"]["real"]["sketch_top1"] == 20.5
    assert tables["lira_auc"] == {"real": {"online": 0.7}, "synthetic": {"online": 0.55}}

    # A user's ImageFolder tested on val/: its eval_ood figure is the test column, not a shifted set.
    common.write_json(
        tmp_path / "cls_real" / "manifest.json",
        {"metrics": {"top1": 40.0, "top5": 80.0}, "inputs": {"test_split": {"split": "val"}}},
    )
    manifest("ood_cls_real", {"val/top1": 40.0, "val/top5": 80.0, "sketch/top1": 20.5})
    text = "\n".join(demo_report.paper_tables(tmp_path)[0])
    assert "val top-1" not in text and "| real | 40.0 | 80.0 | 20.5 |" in text
    manifest("ood_cls_real", {"val/top1": 40.0, "val/top5": 80.0})  # no shifted set: a 3-column table, as markdown
    lines = demo_report.paper_tables(tmp_path)[0]  # needs one cell per column in every row (a 4th empty one broke it)
    table = lines[lines.index("| training data | test top-1 | test top-5 |") :][:4]  # header, delimiter, 2 rows
    assert [line.count("|") for line in table] == [4] * 4
    assert "shifted" not in "\n".join(lines)


def test_ablation_report_means_spreads_and_unresolved_differences(tmp_path):
    """Tab. 2 / Fig. 2 rows are mean ± sample std over the seeds found; a difference no larger than the seed spread
    is reported as not resolved; unfinished classifiers are ignored; the plot is written."""
    abl = tmp_path / "demo" / "ablation"  # under --runs-dir, the demo's folder: <runs-dir>/<dataset>

    def classifier(prefix, seed, top1):
        common.write_json(abl / f"{prefix}_s{seed}" / "manifest.json", {"metrics": {"top1": top1, "top5": 99.0}})

    for seed, top1 in enumerate([30.0, 32.0, 34.0]):
        classifier("cls_all", seed, top1)  # mean 32, std 2
    for seed, top1 in enumerate([10.0, 11.0, 12.0]):
        classifier("cls_none", seed, top1)  # -22: resolved
    for seed, top1 in enumerate([31.0, 33.0]):
        classifier("cls_no_mmd", seed, top1)  # 0 difference: not resolved
    for seed, top1 in enumerate([29.0, 29.5, 30.5]):
        classifier("cls_no_vg", seed, top1)  # -2.3: above the larger std (2.0) but not twice its stderr (2.47)
    classifier("cls_lp", 0, 20.0)  # one seed: never resolved
    for seed, top1 in enumerate([40.0, 41.0, 42.0]):
        classifier("cls_real", seed, top1)
        classifier("cls_x2", seed, top1 - 5)
    (abl / "cls_x4_s0").mkdir(parents=True)  # started, no manifest: not a result yet
    gaps = {"all": 10.0, "none": 50.0, "no_mmd": 12.0, "no_vg": 11.0}  # eval_gap FIDs of four rows' sets
    for row, fid in gaps.items():
        common.write_json(abl / f"gap_{row}" / "manifest.json", {"metrics": {"fid": fid}})

    tables = demo_report.main(["ablation-report", "--runs-dir", str(tmp_path)])
    report = (abl / "report.md").read_text()
    assert tables["tab2"]["all three"]["mean"] == 32.0 and tables["tab2"]["all three"]["std"] == 2.0
    assert "| none | 11.0 ± 1.0 (n=3) | 10.0, 11.0, 12.0 | -21.0 |" in report
    assert (
        "| latent prior + visual guidance (no MMD) | 32.0 ± 1.4 (n=2) | 31.0, 33.0 | +0.0 (within seed spread" in report
    )
    assert "| latent prior only | 20.0 ± 0.0 (n=1) | 20.0 | -12.0 (within seed spread: not resolved) |" in report
    assert (
        "| latent prior + MMD (no visual guidance) | 29.7 ± 0.8 (n=3) | 29.0, 29.5, 30.5 | -2.3 (within seed "
        "spread: not resolved) |" in report
    )
    assert "no latent prior" not in report  # rows without any finished classifier are left out
    assert (
        "| 10.0, 11.0, 12.0 | -21.0 | 50 |" in report
        and "| 20.0 | -12.0 (within seed spread: not resolved) | – |" in report
    )
    from scipy.stats import spearmanr

    rho = spearmanr([10.0, 50.0, 12.0, 11.0], [32.0, 11.0, 32.0, (29.0 + 29.5 + 30.5) / 3]).statistic
    assert f"Spearman ρ = {rho:.2f} (n = 4 rows" in report and rho < 0
    assert set(tables["fig2"]["synthetic"]) == {1, 2} and tables["fig2"]["real"]["mean"] == 41.0
    assert "Largest synthetic set (x2) vs real: -5.0." in report  # 36 ± 1 vs 41 ± 1: resolved
    assert "x1 -> x2: +4.0." in report and "| real (the line) | 41.0 ± 1.0 (n=3) |" in report
    assert json.loads((abl / "ablation.json").read_text())["tab2"]["none"]["n"] == 3
    assert common.load_image(abl / "scaling.png").size[0] > 100


class _OracleUNet(torch.nn.Module):
    """Predicts the noise exactly when the prompt names the latent's true class (class c's latent is the constant c),
    else as if the latent were the named class's: the ideal class-conditional denoiser."""

    def __init__(self, scheduler, ignore_prompt=False):
        super().__init__()
        self.alphas, self.ignore = scheduler.alphas_cumprod, ignore_prompt

    def forward(self, noisy, t, cond):
        c = torch.zeros(len(noisy)) if self.ignore else cond[:, 0, 0]
        a = self.alphas[t].view(-1, 1, 1, 1)
        return types.SimpleNamespace(sample=(noisy - a.sqrt() * c.view(-1, 1, 1, 1)) / (1 - a).sqrt())


def test_diffusion_classifier_finds_the_class_only_when_the_prompt_is_used():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    k = len(demo.CLASSES)
    table = torch.arange(k + 1, dtype=torch.float).view(-1, 1, 1).expand(-1, 3, 4)  # row c: the constant c
    text_encoder = lambda ids: (table,)  # noqa: E731
    labels = torch.arange(k).repeat(3)
    latents = labels.float().view(-1, 1, 1, 1).expand(-1, 4, 2, 2).clone()
    oracle = demo.conditioning_check(_OracleUNet(scheduler), text_encoder, scheduler, latents, labels, None, seed=0)
    assert oracle["denoise_class_acc"] == 1.0 and oracle["denoise_class_acc_per_t"] == 1.0
    blind = demo.conditioning_check(
        _OracleUNet(scheduler, True), text_encoder, scheduler, latents, labels, None, seed=0
    )
    assert blind["denoise_class_acc"] == pytest.approx(1 / k) and blind["cond_uncond_rel_diff"] == 0.0


def test_mean_colour_shift_sees_a_cast_in_one_channel():
    images = torch.randint(0, 200, (8, 3, 4, 4), dtype=torch.uint8)
    cast = images.clone()
    cast[:, 1] += 30
    assert demo.mean_colour_shift(images, images) == 0.0
    assert demo.mean_colour_shift(cast, images) == pytest.approx(30.0)


def test_pretraining_images_are_not_demo_images():
    """The generator's "web" images have their own seeds: none equals a demo train or test image."""
    web = demo.pretraining_images(0, 200)[0]
    demo_images = {
        np.asarray(demo.demo_image(0, split, label, i)).tobytes()
        for split in ("train", "test")
        for label in range(len(demo.CLASSES))
        for i in range(20)
    }
    assert not any(im.permute(1, 2, 0).numpy().tobytes() in demo_images for im in web)
