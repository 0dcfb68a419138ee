"""synthesize.py on the tiny generator: paper settings, per-image reproducibility, sharding, resume, bad inputs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import args_for
from PIL import Image

import common
import synthesize
from common import (
    ConfigMismatchError,
    ImageReadError,
    add_visual_tokens,
    item_seed,
    load_synthetic,
    parse_args,
    read_jsonl,
)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_paper_defaults_and_22_steps(tiny_sd, tiny_dataset, tiny_lora, tmp_path, monkeypatch):
    """30 UniPC steps at strength 0.75 run 22 UNet calls, each on the CFG pair (2 x batch); manifest rows complete."""
    defaults = synthesize.get_parser().parse_args([])
    assert (
        defaults.steps,
        defaults.strength,
        defaults.guidance_scale,
        defaults.lora_scale,
        defaults.resolution,
        defaults.jpeg_quality,
    ) == (30, 0.75, 2.0, 0.5, 512, 95)
    calls = []
    real = synthesize.load_pipeline

    def spy(*a, **k):
        pipe = real(*a, **k)
        pipe.unet.register_forward_pre_hook(lambda m, inp: calls.append(inp[0].shape[0]))
        assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
        return pipe

    monkeypatch.setattr(synthesize, "load_pipeline", spy)
    # the LoRA's token is appended: the zero-padded negative branch needs the mask (see the test below) on every
    # cross-attention of the UNet the loop runs, and on no self-attention
    cross_attention = []
    real_generate = synthesize.generate

    def generate(pipe, *a, **k):
        procs = pipe.unet.attn_processors
        cross_attention.append({type(p).__name__ for n, p in procs.items() if ".attn2." in n})
        assert not any(isinstance(p, synthesize.IgnoreZeroTokens) for n, p in procs.items() if ".attn2." not in n)
        return real_generate(pipe, *a, **k)

    monkeypatch.setattr(synthesize, "generate", generate)
    subset = tmp_path / "mask.npy"
    np.save(subset, np.array([True, False, False, False] * 3))  # one source per class
    out = tmp_path / "syn"
    metrics = synthesize.main(
        args_for(
            tiny_sd, tiny_dataset, out, *"--steps 30 --strength 0.75 --subset-mask".split(), subset, lora=tiny_lora
        )
    )
    assert calls == [6] * 22  # one call: 3 mixed-class images, cond + uncond
    assert cross_attention == [{"IgnoreZeroTokens"}]
    assert metrics["complete"] and metrics["images"] == 3
    rows = read_jsonl(out / "manifest.jsonl")
    assert {r["class_id"] for r in rows} == {"red_circle", "green_square", "blue_triangle"}
    row = rows[0]
    assert row["prompt"] == f"photo of {row['class_name']}" and row["steps"] == 30 and row["strength"] == 0.75
    assert row["seed"] == item_seed(0, str(Path(row["source"]).with_suffix("")), 0)
    assert row["lora_scale"] == 0.5 and row["lora_hash"] and row["model_hash"]
    assert row["file"] == f"{row['class_id']}/{Path(row['source']).stem}_0.jpg"
    ds = load_synthetic(out)
    assert len(ds) == 3 and Image.open(ds.abspath(0)).size == (32, 32)


def test_same_image_alone_batched_or_sharded(tiny_sd, tiny_dataset, tiny_lora, tmp_path, monkeypatch):
    """An image's initial noise is bit-identical and its pixels within 2/255 whatever the batch or shard."""
    noises = {}
    real_generate = synthesize.generate

    def recording(pipe, plan, jobs, *a, **k):
        seeds = [plan.seed(j) for j in jobs]

        def add_noise(original, noise, t, _orig=type(pipe.scheduler).add_noise):
            for s, n in zip(seeds, noise):
                noises.setdefault(s, []).append(n.clone())
            return _orig(pipe.scheduler, original, noise, t)

        pipe.scheduler.add_noise = add_noise
        return real_generate(pipe, plan, jobs, *a, **k)

    monkeypatch.setattr(synthesize, "generate", recording)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # on a GPU: full-precision convolutions too
    # fp32 pins the check to what the issue promises (CPU, or a GPU in full precision): in fp16 (or with TF32
    # convolutions) on a GPU the kernels chosen per batch size differ by more than 2/255 after 22 steps.
    runs = {
        "alone": "--batch-size 1 --dtype fp32".split(),
        "batch8": "--batch-size 8 --dtype fp32".split(),
        "shard": "--shard 2/3 --dtype fp32".split(),
    }
    for name, extra in runs.items():
        synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / name, *extra, lora=tiny_lora))
    shard_files = sorted(p.relative_to(tmp_path / "shard") for p in (tmp_path / "shard").rglob("*.jpg"))
    assert len(shard_files) == 4  # 12 sources, strided shard 2 of 3
    assert not (tmp_path / "shard" / "manifest.json").exists()  # other shards missing: not complete
    for rel in shard_files:
        a, b, c = (pixels(tmp_path / name / rel) for name in runs)
        assert np.abs(a - b).max() <= 2 and np.abs(a - c).max() <= 2
    assert all(len(v) == 3 and all(torch.equal(v[0], x) for x in v) for k, v in noises.items() if len(v) == 3)
    assert sum(len(v) == 3 for v in noises.values()) == 4
    (tmp_path / "same_lora").symlink_to(tiny_lora)  # the LoRA's files are the identity, not the path it is reached by
    again = synthesize.main(
        args_for(tiny_sd, tiny_dataset, tmp_path / "alone", *runs["alone"], lora=tmp_path / "same_lora")
    )
    assert again["complete"] and again["generated"] == 0


def test_a_start_killed_while_loading_gives_way_to_a_corrected_command(tiny_sd, tiny_dataset, tmp_path, monkeypatch):
    """classes.json, written at start, made a run killed while loading its pipeline a real run: the corrected
    command then needed --overwrite. It is written with the manifest now."""

    def killed_while_loading(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthesize, "ready_pipeline", killed_while_loading)
    with pytest.raises(KeyboardInterrupt):
        synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "out", "--steps", "6"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".writer-0of1.lock", "log.txt", "run_config.json"]
    monkeypatch.undo()
    done = synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "out"))
    assert done["complete"] and (tmp_path / "out" / "classes.json").is_file()


def test_a_set_without_a_lora_says_it_is_the_plain_model(tiny_sd, tiny_dataset, tiny_lora, tmp_path, monkeypatch):
    """Without a config (a stage copied into another project) a forgotten --lora-dir silently made the paper's
    no-finetuning ablation in the method's default folder (synth_x1); the log says so now, and not with a LoRA."""

    def stop_before_loading(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthesize, "ready_pipeline", stop_before_loading)
    for name, lora in (("plain", None), ("finetuned", tiny_lora)):
        with pytest.raises(KeyboardInterrupt):
            synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / name, lora=lora))
    assert "no --lora-dir: the plain pretrained model" in (tmp_path / "plain" / "log.txt").read_text()
    assert "no --lora-dir" not in (tmp_path / "finetuned" / "log.txt").read_text()


@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_a_run_moved_aside_mid_way_writes_nothing_into_its_successor(tiny_sd, tiny_dataset, tmp_path, monkeypatch, fmt):
    """Another command moves this run aside (--overwrite) before its first image is written: the old process stops,
    and the new run's directory holds no image of the old config (its re-run would have taken them as its own)."""
    out = tmp_path / "out"
    real_generate = synthesize.generate

    def overwritten_meanwhile(*a, **k):
        images = real_generate(*a, **k)
        if not list(tmp_path.glob("out.old-*")):
            common.RunDir(out, {"another": "config"}, overwrite=True).start()
        return images

    monkeypatch.setattr(synthesize, "generate", overwritten_meanwhile)
    argv = args_for(tiny_sd, tiny_dataset, out, "--output-format", fmt, "--shard-samples", "4", "--batch-size", "4")
    with pytest.raises(common.RunMovedError, match="moved aside"):
        synthesize.main(argv)
    assert not [p for p in out.rglob("*") if p.suffix in (".jpg", ".tar") or p.name.startswith("manifest")]
    assert common.read_json(out / "run_config.json")["config"] == {"another": "config"}


def test_shards_union_fractional_scale_and_resume(tiny_sd, tiny_dataset, tmp_path):
    """Scale 1.5: 18 images; three shards make exactly the set of one clean run; the last shard writes the manifest;
    a killed run (some outputs deleted, one truncated, one temp file left) resumes to the same set."""
    clean = tmp_path / "clean"
    m = synthesize.main(
        args_for(tiny_sd, tiny_dataset, clean, *"--scale 1.5 --image-format png --batch-size 5".split())
    )
    assert m["images"] == 18 and m["complete"]
    files = sorted(str(p.relative_to(clean)) for p in clean.rglob("*.png"))
    assert len(files) == 18 and sum(f.endswith("_1.png") for f in files) == 6
    # each copy of a source has its own seed, item_seed(seed, image id, copy), and so its own image
    rows = read_jsonl(clean / "manifest.jsonl")
    assert all(r["seed"] == item_seed(0, str(Path(r["source"]).with_suffix("")), r["copy"]) for r in rows)
    assert len({r["seed"] for r in rows}) == 18
    for second in (f for f in files if f.endswith("_1.png")):
        assert np.abs(pixels(clean / second) - pixels(clean / second.replace("_1.png", "_0.png"))).max() > 8
    sharded = tmp_path / "sharded"
    for i in range(3):
        m = synthesize.main(
            args_for(tiny_sd, tiny_dataset, sharded, *"--scale 1.5 --image-format png --shard".split(), f"{i}/3")
        )
        assert m["complete"] == (i == 2)
    assert sorted(str(p.relative_to(sharded)) for p in sharded.rglob("*.png")) == files
    assert read_jsonl(sharded / "manifest.jsonl") == read_jsonl(clean / "manifest.jsonl")
    # Kill damage: two images gone, one truncated, a writer's temp file left behind.
    for f in files[:2]:
        os.remove(sharded / f)
    data = (sharded / files[5]).read_bytes()
    (sharded / files[5]).write_bytes(data[: len(data) // 2])
    (sharded / files[6]).with_name(".x.png.tmp.png").write_bytes(b"junk")
    os.remove(sharded / "manifest.json")
    (sharded / ".manifest.jsonl.0123456789ab.tmp").write_bytes(b"a finalize killed mid-write (GBs at IN-1K x10)")
    m = synthesize.main(args_for(tiny_sd, tiny_dataset, sharded, *"--scale 1.5 --image-format png".split()))
    assert m["generated"] == 3 and m["complete"]
    assert sorted(str(p.relative_to(sharded)) for p in sharded.rglob("*.png")) == files
    assert not list(sharded.glob("*/.*")) and not list(sharded.glob(".manifest*"))
    for f in files:
        assert np.abs(pixels(sharded / f) - pixels(clean / f)).max() <= 2
    # Complete + same config: a no-op; another config: refused.
    assert (
        synthesize.main(args_for(tiny_sd, tiny_dataset, sharded, *"--scale 1.5 --image-format png".split()))["images"]
        == 18
    )
    with pytest.raises(ConfigMismatchError, match="guidance_scale"):
        synthesize.main(
            args_for(tiny_sd, tiny_dataset, sharded, *"--scale 1.5 --image-format png --guidance-scale 3".split())
        )


def test_visual_token_in_conditional_branch_only(tiny_sd, tiny_lora):
    """The token is appended to the conditional embeddings; the zero-padded negative branch, with the mask, gives
    exactly the UNet output of the plain 77-token negative embeddings."""
    from types import SimpleNamespace

    args = SimpleNamespace(pretrained_model=str(tiny_sd), revision=None, lora_dir=None, lora_scale=0.5)
    pipe = synthesize.load_pipeline(args, torch.device("cpu"), torch.float32)
    tokens = torch.randn(2, 64)
    cond, neg = synthesize.condition(pipe, ["photo of red circle"] * 2, tokens, "append", "blurry", "cpu")
    plain = pipe.encode_prompt(["blurry"], "cpu", 1, False)[0]
    assert cond.shape == (2, 78, 64) and neg.shape == (2, 78, 64)
    assert torch.equal(cond[:, 77], tokens) and torch.equal(neg[:, :77], plain.expand(2, -1, -1))
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor(500)
    with torch.no_grad():
        ref = pipe.unet(latents, t, encoder_hidden_states=plain.expand(2, -1, -1)).sample
        unmasked = pipe.unet(latents, t, encoder_hidden_states=neg).sample
        synthesize.install_token_mask(pipe, "append", True)
        masked = pipe.unet(latents, t, encoder_hidden_states=neg).sample
        with_token = pipe.unet(latents, t, encoder_hidden_states=cond).sample
        no_token = pipe.unet(latents, t, encoder_hidden_states=cond[:, :77]).sample
    torch.testing.assert_close(masked, ref, atol=1e-5, rtol=1e-5)
    assert (unmasked - ref).abs().max() > 1e-4  # the padding would leak without the mask
    assert (with_token - no_token).abs().max() > 1e-4  # the token reaches the conditional branch
    replaced = add_visual_tokens(cond[:, :77], tokens, "replace-last")
    assert replaced.shape == (2, 77, 64) and torch.equal(replaced[:, 76], tokens)


def test_lora_fused_at_scale(tiny_sd, tiny_lora):
    """Fusing at --lora-scale 0.5 equals the unfused LoRA at cross-attention scale 0.5, and differs from scale 1."""
    from types import SimpleNamespace

    args = SimpleNamespace(pretrained_model=str(tiny_sd), revision=None, lora_dir=str(tiny_lora), lora_scale=0.5)
    fused = synthesize.load_pipeline(args, torch.device("cpu"), torch.float32)
    unfused = synthesize.load_pipeline(args, torch.device("cpu"), torch.float32, fuse=False)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor(300), torch.randn(1, 77, 64)
    with torch.no_grad():
        a = fused.unet(x, t, ctx).sample
        b = unfused.unet(x, t, ctx, cross_attention_kwargs={"scale": 0.5}).sample
        c = unfused.unet(x, t, ctx, cross_attention_kwargs={"scale": 1.0}).sample
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - c).abs().max() > 1e-3


def test_bad_source_and_missing_caption(tiny_sd, tiny_dataset, tmp_path):
    """An unreadable source fails naming the file, or is skipped and counted with --skip-bad; a missing caption fails
    unless --allow-missing-captions, and so does a wrong model path, both before the output dir is made; text-to-image
    (strength 1) never reads the sources."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    bad = root / "train" / "green_square" / "green_square_001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="green_square_001.png"):
        synthesize.main(args_for(tiny_sd, root, tmp_path / "a"))
    m = synthesize.main(args_for(tiny_sd, root, tmp_path / "b", "--skip-bad"))
    assert m["complete"] and m["images"] == 11 and m["bad_sources"] == 1
    assert (
        "green_square/green_square_001.png"
        in json.loads((tmp_path / "b" / "manifest.json").read_text())["inputs"]["bad_sources"]
    )
    # Read back as an ImageFolder split, the output has the dataset's classes and nothing more.
    folders = {p.name for p in (tmp_path / "b").iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert folders <= set(json.loads((tmp_path / "b" / "classes.json").read_text())["classes"])
    train = common.load_dataset("demo", root, "train")  # what train_cls, eval_gap and sscd_sim compare it with
    assert common.warn_if_made_from_other_data(tmp_path / "b", common.check_images(train, skip_bad=True)[2]) is None
    # The skipped source needs no caption (caption.py cannot read it either); every other one still does.
    rows = [
        {"path": p.relative_to(root / "train").as_posix(), "caption": "a shape"}
        for p in (root / "train").rglob("*.png")
    ]
    every_readable = tmp_path / "captions_readable.jsonl"
    every_readable.write_text(
        "".join(json.dumps(r) + "\n" for r in rows if r["path"] != "green_square/green_square_001.png")
    )
    m = synthesize.main(args_for(tiny_sd, root, tmp_path / "b2", "--skip-bad", "--captions", every_readable))
    assert m["images"] == 11
    one_short = tmp_path / "captions_short.jsonl"
    one_short.write_text("".join(json.dumps(r) + "\n" for r in rows if r["path"] != "red_circle/red_circle_001.png"))
    with pytest.raises(KeyError, match="red_circle_001"):
        synthesize.main(args_for(tiny_sd, root, tmp_path / "b3", "--skip-bad", "--captions", one_short))
    m = synthesize.main(args_for(tiny_sd, root, tmp_path / "c", "--strength", "1.0"))
    assert m["images"] == 12
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"path": "red_circle/red_circle_000.png", "caption": "a red disk"}) + "\n")
    with pytest.raises(KeyError, match="caption"):
        synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "d", "--captions", captions))
    with pytest.raises(OSError, match="cannot load a Stable Diffusion pipeline .*'.*nope' does not exist"):
        synthesize.main(args_for(tmp_path / "nope", tiny_dataset, tmp_path / "d", "--captions", captions))
    assert not (tmp_path / "d").exists()  # inputs are checked before the run dir: the corrected command starts clean
    for scale in ("inf", "nan", "0"):
        with pytest.raises(ValueError, match="--scale must be a finite number > 0"):
            synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "d", "--scale", scale))
    synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "d", "--captions", captions, "--allow-missing-captions"))
    prompts = {r["source"]: r["prompt"] for r in read_jsonl(tmp_path / "d" / "manifest.jsonl")}
    assert prompts["red_circle/red_circle_000.png"] == "photo of red circle, a red disk"
    assert prompts["red_circle/red_circle_001.png"] == "photo of red circle"


def test_edited_captions_are_another_run_and_a_moved_file_the_same(tiny_sd, tiny_dataset, tmp_path):
    """A run killed, its captions edited, then resumed made half its images from the old prompts and named the new
    ones in every row: the captions' contents, not their path, are the identity."""
    index = common.load_dataset("demo", tiny_dataset, "train")
    captions, elsewhere = tmp_path / "captions.jsonl", tmp_path / "copy" / "captions.jsonl"
    common.write_jsonl(captions, [{"path": s.path, "caption": "on a plain background"} for s in index.samples])
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(captions.read_bytes())
    synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "out", "--captions", captions))
    again = synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "out", "--captions", elsewhere))
    assert again["complete"] and again["generated"] == 0
    common.write_jsonl(captions, [{"path": s.path, "caption": "underwater, at night"} for s in index.samples])
    with pytest.raises(ConfigMismatchError, match="captions_hash"):
        synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "out", "--captions", captions))


def test_to_host_hands_over_the_same_pixels(tmp_path):
    """The writer gets exactly the generated pixels: at once on the CPU; on a GPU after the queued copy has landed."""
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    host, ready = synthesize.to_host(images)
    assert host is images and ready is None
    (tmp_path / "a.png").write_bytes(synthesize.encode_when_ready(ready, host[1], "png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), images[1].numpy())
    if torch.cuda.is_available():
        host, ready = synthesize.to_host(images.cuda())
        assert host.device.type == "cpu" and host.is_pinned() and ready is not None
        (tmp_path / "b.png").write_bytes(synthesize.encode_when_ready(ready, host[2], "png"))
        assert torch.equal(host, images)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), images[2].numpy())


@pytest.mark.parametrize("name", ["in10", "in100", "in1k", "cub", "cars", "pets", "eurosat", "demo"])
def test_config_sections_parse(name):
    """Every shipped config's synthesize section names real options; the real sets keep the paper's settings."""
    from common import PROJECT_DIR, parse_args

    args = parse_args(
        synthesize.get_parser(), ["--config", str(PROJECT_DIR / "configs" / f"{name}.yaml")], "synthesize"
    )
    assert args.dataset == name and args.lora_dir == f"runs/{name}/finetune"
    if name != "demo":
        assert (args.steps, args.strength, args.guidance_scale, args.resolution) == (30, 0.75, 2.0, 512)


def test_per_image_tokens_replace_last(tiny_sd, tiny_dataset, tiny_lora, tmp_path, monkeypatch):
    """The release's per-image mode: each source's own token overwrites text slot 77 (77 tokens in both branches)."""
    import shutil

    from safetensors.torch import save_file

    from common import load_dataset

    lora = tmp_path / "lora"
    shutil.copytree(tiny_lora, lora)
    index = load_dataset("demo", tiny_dataset, "train")
    table = torch.randn(len(index), 64)
    save_file({"tokens": table}, str(lora / "visual_guidance.safetensors"))
    (lora / "visual_guidance.json").write_text(
        json.dumps(
            {
                "mode": "per-image",
                "placement": "replace-last",
                "classes": index.classes,
                "image_paths": [s.path for s in reversed(index.samples)],
                "encoder": "tiny",
                "images_per_class": 1,
            }
        )
    )
    seen = []
    real = synthesize.condition
    monkeypatch.setattr(synthesize, "condition", lambda *a: seen.append((a[2], real(*a))) or seen[-1][1])
    mask = tmp_path / "mask.npy"
    np.save(mask, np.array([i == 5 for i in range(len(index))]))
    synthesize.main(
        args_for(tiny_sd, tiny_dataset, tmp_path / "out", "--subset-mask", mask, "--dtype", "fp32", lora=lora)
    )
    ((tokens, (cond, neg)),) = seen
    assert cond.shape == neg.shape == (1, 77, 64)
    expected = table[len(index) - 1 - 5]
    assert torch.equal(tokens[0].cpu(), expected) and torch.equal(cond[0, 76].cpu(), expected)


def test_larger_scale_reuses_smaller_scale_images(tiny_sd, tiny_dataset, tmp_path):
    """x1 is a prefix of x2 (same seeds): with --reuse-from, x2 links x1's 12 images and generates only 12 more, and
    the result equals a clean x2 run. A run of another config is not reused."""
    x1, x2, clean = tmp_path / "x1", tmp_path / "x2", tmp_path / "clean"
    synthesize.main(args_for(tiny_sd, tiny_dataset, x1, *"--scale 1 --image-format png".split()))
    m = synthesize.main(args_for(tiny_sd, tiny_dataset, x2, *"--scale 2 --image-format png --reuse-from".split(), x1))
    assert m["generated"] == 12 and m["images"] == 24
    assert os.path.samefile(x1 / "red_circle" / "red_circle_000_0.png", x2 / "red_circle" / "red_circle_000_0.png")
    synthesize.main(args_for(tiny_sd, tiny_dataset, clean, *"--scale 2 --image-format png".split()))
    assert read_jsonl(x2 / "manifest.jsonl") == read_jsonl(clean / "manifest.jsonl")
    for f in (p.relative_to(clean) for p in clean.rglob("*.png")):
        assert np.abs(pixels(x2 / f) - pixels(clean / f)).max() <= 2
    other = tmp_path / "other"
    m = synthesize.main(
        args_for(
            tiny_sd, tiny_dataset, other, *"--scale 2 --image-format png --guidance-scale 3 --reuse-from".split(), x1
        )
    )
    assert m["generated"] == 24
    with pytest.raises(FileNotFoundError, match="--reuse-from .*x_1.*: no such directory"):  # a typo regenerated all
        synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "x3", "--reuse-from", tmp_path / "x_1"))
    assert not (tmp_path / "x3").exists()  # checked before the run starts: the corrected command simply starts


def test_compile_auto_is_gpu_only(tiny_sd, tiny_dataset, tmp_path, monkeypatch):
    """--compile auto leaves a CPU pipeline eager; --compile (on) wraps the UNet and the VAE decoder and encoder; a bare
    --compile still means on."""
    parser = synthesize.get_parser()
    assert parser.parse_args([]).compile == "auto" and parser.parse_args(["--compile"]).compile == "on"
    for yaml_value, mode in (("true", "on"), ("off", "off"), ("auto", "auto")):  # YAML reads on/off as booleans
        cfg = tmp_path / f"compile_{yaml_value}.yaml"
        cfg.write_text(f"synthesize:\n  compile: {yaml_value}\n")
        assert parse_args(synthesize.get_parser(), ["--config", str(cfg)], "synthesize").compile == mode
    args = parser.parse_args(args_for(tiny_sd, tiny_dataset, tmp_path))
    pipe = synthesize.load_pipeline(args, torch.device("cpu"), torch.float32)
    synthesize.maybe_compile(pipe, args)
    assert not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    args.compile = "on"
    synthesize.maybe_compile(pipe, args)
    assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(pipe.vae.decoder, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(pipe.vae.encoder, torch._dynamo.eval_frame.OptimizedModule)
    # --compile-mode reaches torch.compile ("default" = torch.compile's own default, mode=None)
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: modes.append(mode) or module)
    for name, expected in (("max-autotune", "max-autotune"), ("default", None)):
        args.compile_mode = name
        synthesize.maybe_compile(pipe, args)
        assert modes[-3:] == [expected] * 3


def test_lora_dir_none_means_the_plain_model():
    """`--lora-dir none` (or empty) overrides a config's LoRA: the ablation rows without finetuning."""
    parser = synthesize.get_parser()
    assert parser.parse_args(["--lora-dir", "none"]).lora_dir is None
    assert parser.parse_args(["--lora-dir", ""]).lora_dir is None
    assert parser.parse_args(["--lora-dir", "runs/x/finetune"]).lora_dir == "runs/x/finetune"


def test_grayscale_small_sources_are_said_and_stay_grayscale(tiny_sd, tmp_path):
    """28 px grayscale sources: the manifest and the log say their mode and size and the resize, the outputs are
    grayscale unless --output-mode RGB; a class name the tokenizer splits into letters is named in a warning."""
    from conftest import make_imagefolder
    from PIL import Image

    root = tmp_path / "gray"
    make_imagefolder(root / "train", ["red_circle", "green_square"], 2, size=28)
    for path in (root / "train").rglob("*.png"):
        Image.open(path).convert("L").save(path)
    (root / "train" / "class_names.txt").write_text("red circle\ngiraffe\n")
    m = synthesize.main(args_for(tiny_sd, root, tmp_path / "a"))
    assert m["output_mode"] == "L" and m["source_images"]["modes"] == {"L": 4}
    assert m["source_images"]["sizes"] == {"28x28": 4} and m["source_images"]["grayscale"]
    assert all(Image.open(p).mode == "L" for p in (tmp_path / "a").rglob("*.jpg"))
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "sizes {'28x28': 4}" in log and "resized to 32 px" in log and "'giraffe': [" in log
    m = synthesize.main(args_for(tiny_sd, root, tmp_path / "b", "--output-mode", "RGB"))
    assert m["output_mode"] == "RGB" and all(Image.open(p).mode == "RGB" for p in (tmp_path / "b").rglob("*.jpg"))


def test_save_size_stores_smaller_images_and_is_part_of_the_identity(tiny_sd, tiny_dataset, tmp_path):
    from PIL import Image

    m = synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "a", "--save-size", "16"))
    assert m["stored_short_side"] == 16
    assert {Image.open(p).size for p in (tmp_path / "a").rglob("*.jpg")} == {(16, 16)}
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]["save_size"] == 16
    m = synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "b"))
    assert (
        m["stored_short_side"] == 32
        and "save_size" not in json.loads((tmp_path / "b" / "manifest.json").read_text())["config"]
    )


def test_changed_sources_are_a_config_mismatch_and_bad_ones_are_all_named(tiny_sd, tmp_path):
    import shutil

    from conftest import TINY_CLASSES, make_imagefolder

    from common import ConfigMismatchError, ImageReadError

    root = tmp_path / "data"
    make_imagefolder(root / "train", TINY_CLASSES, 2)
    synthesize.main(args_for(tiny_sd, root, tmp_path / "a"))
    make_imagefolder(root / "train", TINY_CLASSES, 3, seed=4)  # one more image per class
    with pytest.raises(ConfigMismatchError, match="source_fingerprint"):
        synthesize.main(args_for(tiny_sd, root, tmp_path / "a"))
    bad = [root / "train" / c / f"{c}_000.png" for c in TINY_CLASSES[:2]]
    for path in bad:
        path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="2 unreadable") as err:
        synthesize.main(args_for(tiny_sd, root, tmp_path / "b"))
    assert all(str(path) in str(err.value) for path in bad)
    assert not (tmp_path / "b").exists()
    shutil.rmtree(root)


def test_sources_whose_outputs_would_share_a_name_are_named_before_the_run(tiny_sd, tiny_dataset, tmp_path):
    """A class folder's subfolders are read too (as torchvision's ImageFolder), so two sources may share a stem."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    red = root / "train" / "red_circle"
    (red / "more").mkdir()
    shutil.copy(red / "red_circle_000.png", red / "more" / "red_circle_000.png")
    with pytest.raises(ValueError, match=r"share a file stem.*'red_circle/more/red_circle_000.png'"):
        synthesize.main(args_for(tiny_sd, root, tmp_path / "a"))
    shutil.move(red / "more" / "red_circle_000.png", red / "red.circle.png")
    shutil.copy(red / "red.circle.png", red / "red_circle.png")
    synthesize.main(args_for(tiny_sd, root, tmp_path / "b", "--strength", "1.0"))  # as files, both names are fine
    with pytest.raises(ValueError, match=r"'\.' vs '_'.*red\.circle\.png"):
        synthesize.main(args_for(tiny_sd, root, tmp_path / "c", "--output-format", "wds"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_a_class_id_with_a_slash_gets_its_temp_files_cleaned_too(tiny_sd, tiny_dataset, tmp_path):
    """Stanford Cars has "Ram C/V Cargo Van Minivan 2012": its outputs sit two folders deep, where the clean-up of
    killed writers' temp files (one level deep) did not reach."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    (root / "train" / "red").mkdir()
    shutil.move(root / "train" / "red_circle", root / "train" / "red" / "circle")
    (root / "train" / "classes.txt").write_text("red/circle\ngreen_square\nblue_triangle\n")
    (root / "train" / "class_names.txt").unlink()
    out = tmp_path / "out"
    (out / "red" / "circle").mkdir(parents=True)
    (out / "red" / "circle" / ".red_circle_000_0.jpg.1234.tmp").write_bytes(b"a killed writer's")
    m = synthesize.main(args_for(tiny_sd, root, out, "--strength", "1.0"))
    assert m["complete"] and m["images"] == 12 and len(list((out / "red" / "circle").glob("*.jpg"))) == 4
    assert not list((out / "red" / "circle").glob(".*"))
