"""finetune.py on the tiny SD pipeline and CLIP encoder: outputs, LoRA loading, visual tokens, resume, options."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common
import demo
import finetune

ROOT = Path(__file__).resolve().parents[1]


def base_args(tiny_dataset, tiny_sd, tiny_clip_vision, out, *extra):
    return [
        "--dataset",
        "demo",
        "--data-root",
        str(tiny_dataset),
        "--pretrained-model",
        str(tiny_sd),
        "--vg-encoder",
        str(tiny_clip_vision),
        "--output-dir",
        str(out),
        *(
            "--resolution 32 --train-batch-size 4 --num-workers 0 --vg-images-per-class 2 "
            "--seed 0 --mixed-precision no --no-allow-tf32"
        ).split(),
        *extra,
    ]  # on a GPU too: the checks recompute in fp32


def unet_output(pipe):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    cond = torch.randn(1, 78, 64, generator=gen)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), cond).sample


def test_outputs_lora_loads_and_class_tokens(tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    out = tmp_path / "ft"
    metrics = finetune.main(
        base_args(tiny_dataset, tiny_sd, tiny_clip_vision, out, *"--max-train-steps 3 --learning-rate 1e-2".split())
    )
    assert metrics["steps"] == 3 and metrics["train_images"] == 12 and metrics["final_mmd"] > 0
    manifest = common.read_json(out / "manifest.json")
    assert manifest["config"]["mmd_weight"] == 0.01 and manifest["config"]["vg_mode"] == "class-mean"
    written = [out / n for n in ("pytorch_lora_weights.safetensors", "visual_guidance.safetensors", "manifest.json")]
    written += [f for f in (out / "checkpoints").rglob("*") if f.is_file()]  # accelerate's save_state, safetensors
    assert len(written) > 3 and all(f.stat().st_mode & 0o777 == common.file_mode(out) for f in written)  # umask's mode

    # the LoRA loads with the standard diffusers API and changes the UNet
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd)
    before = unet_output(pipe)
    pipe.load_lora_weights(out)
    assert not torch.allclose(before, unet_output(pipe), atol=1e-6)

    # class-mean tokens: the mean projected CLIP embedding of K=2 sampled images of each class (independent recompute)
    info = common.read_json(out / "visual_guidance.json")
    tokens = load_file(out / "visual_guidance.safetensors")["tokens"]
    index = common.load_dataset("demo", tiny_dataset, "train")
    assert info["mode"] == "class-mean" and info["placement"] == "append" and info["classes"] == index.classes
    assert tokens.shape == (3, 64) and not info["projection"]
    sampled = common.read_json(out / "vg_embeddings.json")["sampled_paths"]
    model = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_vision).eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_clip_vision)
    for label, paths in enumerate(sampled):
        assert len(paths) == 2 and all(p.startswith(index.classes[label] + "/") for p in paths)
        pixels = processor(
            images=[common.load_image(tiny_dataset / "train" / p) for p in paths], return_tensors="pt"
        ).pixel_values
        with torch.no_grad():
            expected = model(pixel_values=pixels).image_embeds.mean(0)
        torch.testing.assert_close(tokens[label], expected, rtol=1e-4, atol=1e-5)
    rows = common.read_jsonl(out / "metrics.jsonl")
    assert rows and all(np.isfinite(r["loss"]) for r in rows)


def test_resume_matches_uninterrupted_run_and_rerun_is_noop(tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path):
    out = tmp_path / "ft"
    args = base_args(
        tiny_dataset,
        tiny_sd,
        tiny_clip_vision,
        out,
        *"--max-train-steps 4 --checkpointing-steps 2 --learning-rate 1e-2".split(),
    )
    finetune.main(args)
    straight = load_file(out / "pytorch_lora_weights.safetensors")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    # a complete run is a no-op
    mtime = (out / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    finetune.main(args)
    assert (out / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == mtime

    # simulate an interruption right after step 2: resume from checkpoint-2 and train steps 3-4 again
    for name in ("manifest.json", "pytorch_lora_weights.safetensors"):
        (out / name).unlink()
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    metrics = finetune.main(args)
    assert metrics["steps"] == 4
    resumed = load_file(out / "pytorch_lora_weights.safetensors")
    assert straight.keys() == resumed.keys() and len(straight) > 0
    # Bitwise on the CPU; CUDA's atomics-based kernels are not bitwise deterministic, so a GPU gets a tolerance.
    tol = {"rtol": 0, "atol": 0} if not torch.cuda.is_available() else {"rtol": 1e-3, "atol": 1e-5}
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], **tol)
    # the resumed run rewrote the metrics rows after its checkpoint instead of appending a second copy
    epochs = [row["epoch"] for row in common.read_jsonl(out / "metrics.jsonl")]
    assert epochs and epochs == sorted(set(epochs))
    # and it did change from the start: 2 steps alone give other weights
    two = load_file(out / "checkpoints" / "checkpoint-2" / "lora_peft.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in two.items())

    with pytest.raises(common.ConfigMismatchError, match="learning_rate"):
        finetune.main(args + ["--learning-rate", "1e-3"])


@pytest.mark.parametrize("every,killed_after", [(3, 3), (1, 2)])  # at an epoch's end (3 micro-batches); mid-epoch
def test_a_kill_after_a_checkpoint_changes_no_metrics_row_or_final_loss(
    tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path, monkeypatch, every, killed_after
):
    """A kill right after the epoch-end checkpoint lost that epoch's row for good, and a resumed run's final loss
    averaged only the micro-batches it ran itself (None when it resumed at the end)."""
    steps = f"--max-train-steps 4 --checkpointing-steps {every} --learning-rate 1e-2".split()
    straight = finetune.main(base_args(tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path / "a", *steps))
    real_save = common.save_checkpoint

    def killed(accelerator, run, n, *rest):
        real_save(accelerator, run, n, *rest)
        if n == killed_after:
            raise KeyboardInterrupt  # kill -9 right after the checkpoint

    argv = base_args(tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path / "b", *steps)
    monkeypatch.setattr(common, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(argv)
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    resumed = finetune.main(argv)
    rows = [common.read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("a", "b")]
    assert [r["epoch"] for r in rows[0]] == [0, 1] and rows[1] == rows[0]
    assert (resumed["final_loss"], resumed["final_mmd"]) == (straight["final_loss"], straight["final_mmd"])


@pytest.mark.parametrize("moved_during", ["visual_guidance", "training_step"])
def test_a_run_moved_aside_writes_nothing_into_its_successor(
    tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path, monkeypatch, moved_during
):
    """A corrected command moves the run aside while it computes its visual tokens, or trains: the old process
    wrote its tokens (which the new run then reused) and epoch rows into the new run's directory."""
    out = tmp_path / "ft"
    real = getattr(finetune, moved_during)

    def overwritten_meanwhile(*a, **k):
        if not list(tmp_path.glob("ft.*")):
            (out / "checkpoint-0").mkdir(exist_ok=True)  # the old run holds an output: moved aside, not started over
            common.RunDir(out, {"another": "config"}, overwrite=True).start()
        return real(*a, **k)

    monkeypatch.setattr(finetune, moved_during, overwritten_meanwhile)
    with pytest.raises(common.RunMovedError):
        finetune.main(base_args(tiny_dataset, tiny_sd, tiny_clip_vision, out, "--max-train-steps", "2"))
    assert sorted(p.name for p in out.iterdir()) == [".writer-0of1.lock", "run_config.json"]  # the new run's


def test_gradient_accumulation_resumes_on_micro_batch_boundaries(tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path):
    """2 optimizer steps of 3 micro-batches of 2 images: 6 micro-batches; interrupted after step 1, the resumed run
    continues at micro-batch 3 (data order and noise are indexed by micro-batch) and ends where the straight one did."""
    out = tmp_path / "ft"
    args = base_args(
        tiny_dataset,
        tiny_sd,
        tiny_clip_vision,
        out,
        *(
            "--max-train-steps 2 --checkpointing-steps 1 --learning-rate 1e-2 "
            "--train-batch-size 2 --gradient-accumulation-steps 3"
        ).split(),
    )
    metrics = finetune.main(args)
    assert metrics["steps"] == 2 and metrics["micro_batches"] == 6 and metrics["epochs"] == 1  # 12 images
    assert common.read_json(out / "manifest.json")["config"]["gradient_accumulation_steps"] == 3
    straight = load_file(out / "pytorch_lora_weights.safetensors")
    one = load_file(out / "checkpoints" / "checkpoint-1" / "lora_peft.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in one.items())  # step 1 did update

    for name in ("manifest.json", "pytorch_lora_weights.safetensors"):
        (out / name).unlink()
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    assert finetune.main(args)["micro_batches"] == 6
    resumed = load_file(out / "pytorch_lora_weights.safetensors")
    tol = {"rtol": 0, "atol": 0} if not torch.cuda.is_available() else {"rtol": 1e-3, "atol": 1e-5}
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], **tol)
    # Accumulating is not the same as stepping on each micro-batch.
    plain = finetune.main(
        base_args(
            tiny_dataset,
            tiny_sd,
            tiny_clip_vision,
            tmp_path / "plain",
            *"--max-train-steps 2 --learning-rate 1e-2 --train-batch-size 2".split(),
        )
    )
    assert plain["micro_batches"] == 2
    plain_config = common.read_json(tmp_path / "plain" / "manifest.json")["config"]
    assert "gradient_accumulation_steps" not in plain_config and "mmd_batch" not in plain_config  # later options


def test_release_options_projection_and_cache(tiny_dataset, tiny_sd, tmp_path):
    """Per-image tokens in slot 77, release MMD, cached latents, and an encoder narrower than the UNet (projection)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    narrow = tmp_path / "clip32"
    demo.build_image_encoder(narrow, projection_dim=32)
    out = tmp_path / "ft"
    metrics = finetune.main(
        base_args(
            tiny_dataset,
            tiny_sd,
            narrow,
            out,
            *(
                "--max-train-steps 2 --vg-mode per-image --vg-placement replace-last --mmd-form release --cache-latents"
            ).split(),
        )
    )
    assert common.read_json(out / "manifest.json")["config"]["mmd_weight"] == 0.003
    assert metrics["final_mmd"] > 0
    info = common.read_json(out / "visual_guidance.json")
    index = common.load_dataset("demo", tiny_dataset, "train")
    assert info["mode"] == "per-image" and info["placement"] == "replace-last" and info["projection"]
    assert info["image_paths"] == [s.path for s in index.samples]
    tokens = load_file(out / "visual_guidance.safetensors")["tokens"]
    proj = load_file(out / "vg_projection.safetensors")
    embeds = load_file(out / "vg_embeddings.safetensors")["embeds"]
    assert tokens.shape == (12, 64) and embeds.shape == (12, 32)
    torch.testing.assert_close(tokens, embeds @ proj["weight"].T + proj["bias"])  # saved after the projection
    assert list((out / "cache").glob("shard-*.safetensors"))
    StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd).load_lora_weights(out)


def test_input_errors_are_clear(tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path):
    index = common.load_dataset("demo", tiny_dataset, "train")
    caps = tmp_path / "captions.jsonl"
    common.write_jsonl(caps, [{"path": s.path, "caption": "a thing"} for s in index.samples[1:]])
    args = base_args(
        tiny_dataset,
        tiny_sd,
        tiny_clip_vision,
        tmp_path / "a",
        "--captions",
        str(caps),
        *"--max-train-steps 1 --vg-mode none --mmd-weight 0".split(),
    )
    with pytest.raises(KeyError, match=index.samples[0].path):
        finetune.main(args)
    # the same run with --allow-missing-captions trains; --mmd-weight 0 leaves the plain min-SNR diffusion loss
    metrics = finetune.main(args + ["--allow-missing-captions"])
    assert metrics["final_mmd"] == 0 and metrics["final_loss"] > 0
    assert common.read_json(tmp_path / "a" / "visual_guidance.json")["mode"] == "none"
    assert not (tmp_path / "a" / "visual_guidance.safetensors").exists()
    # The captions' contents are the identity: the same file elsewhere is the same run, an edited one is not.
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_bytes(caps.read_bytes())
    moved = [str(elsewhere) if a == str(caps) else a for a in args]
    assert finetune.main(moved + ["--allow-missing-captions"]) == metrics
    common.write_jsonl(caps, [{"path": s.path, "caption": "another thing"} for s in index.samples[1:]])
    with pytest.raises(common.ConfigMismatchError, match="captions_hash"):
        finetune.main(args + ["--allow-missing-captions"])
    np.save(tmp_path / "mask.npy", np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match=r"one entry per train image \(12\), got dtype bool, shape \(5,\)"):
        finetune.main(
            base_args(
                tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path / "b", "--subset-mask", str(tmp_path / "mask.npy")
            )
        )
    np.save(tmp_path / "no_class0.npy", np.array([s.label != 0 for s in index.samples]))
    with pytest.raises(ValueError, match=f"no training images for class\\(es\\) {index.classes[0]}"):
        finetune.main(
            base_args(
                tiny_dataset,
                tiny_sd,
                tiny_clip_vision,
                tmp_path / "e",
                "--subset-mask",
                str(tmp_path / "no_class0.npy"),
            )
        )
    with pytest.raises(ValueError, match="--mmd-batch global is for the paper form"):
        finetune.main(
            base_args(
                tiny_dataset,
                tiny_sd,
                tiny_clip_vision,
                tmp_path / "d",
                *"--mmd-form release --mmd-batch global".split(),
            )
        )
    with pytest.raises(OSError, match="diffusers layout"):
        finetune.main(base_args(tiny_dataset, tmp_path / "nope", tiny_clip_vision, tmp_path / "c"))
    with pytest.raises(OSError, match="cannot load the CLIP image encoder"):
        finetune.main(base_args(tiny_dataset, tiny_sd, tmp_path / "nope", tmp_path / "c"))
    assert not (tmp_path / "c").exists()  # both checked before the run dir: the corrected command starts clean


def test_epoch_batches_partition_and_seeded_order():
    for n, b, world in [(12, 4, 1), (10, 3, 2), (7, 2, 3)]:
        per_rank = [finetune.epoch_batches(n, b, world, r, 0, 5) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1  # every process runs the same number of steps
        seen = [i for p in per_rank for batch in p for i in batch]
        assert set(seen) == set(range(n)) and len(seen) == n + (-n) % world  # all images, padding only
    assert finetune.epoch_batches(12, 4, 1, 0, 0, 1) != finetune.epoch_batches(12, 4, 1, 0, 0, 2)  # reshuffled
    assert finetune.epoch_batches(12, 4, 1, 0, 0, 1) == finetune.epoch_batches(12, 4, 1, 0, 0, 1)


def test_accelerate_launch(tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path):
    out = tmp_path / "ft"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *("--num_processes 1 --cpu --num_machines 1 --mixed_precision no --dynamo_backend no").split(),
        str(ROOT / "finetune.py"),
        *base_args(tiny_dataset, tiny_sd, tiny_clip_vision, out, "--max-train-steps", "1"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert common.read_json(out / "manifest.json")["metrics"]["steps"] == 1
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_two_cpu_processes_accumulate_and_resume_as_one_group(tiny_dataset, tiny_sd, tiny_clip_vision, tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP with accumulation (no gradient sync on the first micro-batch), the
    MMD all-reduced over both processes' micro-batches, the per-rank data split, rank-0 checkpoints; resuming from
    step 1 ends bitwise where the uninterrupted run did."""
    out = tmp_path / "ft"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(ROOT / "finetune.py"),
        *base_args(
            tiny_dataset,
            tiny_sd,
            tiny_clip_vision,
            out,
            *(
                "--max-train-steps 2 --checkpointing-steps 1 --learning-rate 1e-2 "
                "--train-batch-size 2 --gradient-accumulation-steps 2 --mmd-batch global"
            ).split(),
        ),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU on a GPU too

    def launch():
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return common.read_json(out / "manifest.json"), load_file(out / "pytorch_lora_weights.safetensors")

    manifest, straight = launch()
    assert manifest["config"]["world_size"] == 2 and manifest["metrics"]["micro_batches"] == 4
    assert manifest["config"]["mmd_batch"] == "global" and manifest["metrics"]["final_mmd"] > 0
    for name in ("manifest.json", "pytorch_lora_weights.safetensors"):
        (out / name).unlink()
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    _, resumed = launch()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_unreadable_training_images_stop_finetune_before_it_starts(tiny_sd, tiny_clip_vision, tmp_path):
    from conftest import TINY_CLASSES, make_imagefolder

    root = tmp_path / "data"
    make_imagefolder(root / "train", TINY_CLASSES, 3)
    (root / "train" / TINY_CLASSES[1] / f"{TINY_CLASSES[1]}_000.png").write_bytes(b"")
    args = base_args(root, tiny_sd, tiny_clip_vision, tmp_path / "ft", "--max-train-steps", "1")
    with pytest.raises(common.ImageReadError, match=f"(?s)1 unreadable .*{TINY_CLASSES[1]}_000.png"):
        finetune.main(args)
    assert not (tmp_path / "ft").exists()
    metrics = finetune.main(args + ["--skip-bad"])
    assert metrics["train_images"] == 8
    skipped = json.loads((tmp_path / "ft" / "manifest.json").read_text())["inputs"]["skipped_bad"]
    assert list(skipped) == [f"{TINY_CLASSES[1]}/{TINY_CLASSES[1]}_000.png"]
