"""Synthesize a training set with the latent prior (paper §3.3, App. E Tab. 6): img2img from every real image.

Each real training image is resized (aspect-preserving, center crop), VAE-encoded and noised to `--strength` 0.75;
Stable Diffusion 1.5 + the finetuned LoRA (fused at scale 0.5) then denoises it with UniPC (30 steps, so 22 run) and
CFG 2.0, conditioned on "photo of {class}, {caption}" plus the class visual-guidance token (conditional branch only).
`--scale N` makes N outputs per real image; output k of source s has seed item_seed(seed, s, k), so any image can be
regenerated alone and the set does not depend on GPU count, batch size or order.

Inputs:  --dataset/--data-root (the real train split), --pretrained-model (hub id or diffusers dir), --lora-dir (a
         finetune.py output: pytorch_lora_weights.safetensors + visual_guidance.{safetensors,json}), --captions.
Outputs: <output-dir>/<class id>/<source stem>_<k>.jpg, classes.json, manifest.jsonl (one row per image), log.txt,
         manifest.json (written last, when every image of every shard is on disk).

Commands (in10; the defaults are the paper's settings):
  one GPU:     python synthesize.py --config configs/in10.yaml --lora-dir runs/in10/finetune --scale 1
  all GPUs:    accelerate launch synthesize.py --config configs/in10.yaml --lora-dir runs/in10/finetune --scale 10
  job array:   python synthesize.py ... --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT   (each job may itself
               be an `accelerate launch`; the last shard to finish writes manifest.jsonl / manifest.json)
  CPU (demo):  python synthesize.py --config configs/demo.yaml      (several CPU processes: torchrun --nproc_per_node 2)
  benchmark:   python bench.py synth --config configs/demo.yaml --steps 30 --images 48 --compile on   (bench.py
               times this script's loop against a release-style baseline; `make bench-synth`, `make bench-gpu`)

Safe to kill at any time: every image is written atomically and a re-run skips the valid ones. A different config in
the same output dir is an error (use --overwrite to move the old run aside).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import (
    DATASETS,
    PROMPT_STYLES,
    HelpFormatter,
    ImageReadError,
    RunDir,
    add_visual_tokens,
    atomic_path,
    build_prompt,
    captions_for,
    check_pretrained,
    config_dict,
    encode_latent_prior,
    fingerprint,
    get_logger,
    hash_file,
    item_seed,
    load_captions,
    load_dataset,
    load_image,
    load_init_image,
    local_items,
    negative_prompt,
    parse_args,
    parse_shard,
    positive_int,
    progress,
    read_json,
    check_images,
    describe_images,
    fragmented_class_names,
    note_unusual_images,
    save_image,
    split_fingerprint,
    write_json,
    write_jsonl,
)

SD_LAYOUT = "a Stable Diffusion pipeline (diffusers layout: model_index.json, unet/, vae/, text_encoder/, ...)"
# Flags that change speed or bookkeeping, never an image: left out of the run's config so a resume may change them.
SPEED_ONLY = (
    "batch_size",
    "decode_batch",
    "num_workers",
    "write_workers",
    "compile",
    "compile_mode",
    "shard",
    "skip_bad",
    "verify_existing",
    "reuse_from",
    "output_dir",
    "data_root",
    "runs_dir",
)


def auto_on_off(value) -> str:
    """auto / on / off; YAML's booleans (`compile: true`, and `on`/`off`, which YAML reads as booleans) map too."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return {"true": "on", "false": "off"}.get(str(value).lower(), str(value).lower())


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (configs/<dataset>.yaml); CLI flags override")
    p.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="train", help="the real split whose images are the latent priors")
    p.add_argument("--subset-mask", default=None, help=".npy bool array over the train split (LiRA shadows)")
    p.add_argument("--seed", type=int, default=42, help="global seed (release: 42); image seeds derive from it")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--output-dir", default=None, help="default <runs-dir>/<dataset>/synth_x<scale>")
    p.add_argument("--overwrite", action="store_true", help="move an output dir with another config aside")
    # Generator (paper App. E Tab. 6; LoRA scale from the release, the paper is silent).
    p.add_argument("--pretrained-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    p.add_argument("--revision", default=None)
    p.add_argument(
        "--lora-dir",
        default=None,
        type=lambda v: None if v in ("", "none") else v,
        help="finetune.py output dir; absent or 'none' = the plain pretrained model (ablation)",
    )
    p.add_argument("--lora-scale", type=float, default=0.5, help="release: cross_attention_scale 0.5 (fused)")
    p.add_argument(
        "--vg-mode",
        choices=("auto", "none"),
        default="auto",
        help="auto: the visual-guidance tokens of --lora-dir as trained; none: text only (ablation)",
    )
    p.add_argument("--steps", type=int, default=30, help="UniPC steps (paper: 30; with strength 0.75, 22 run)")
    p.add_argument(
        "--strength",
        type=float,
        default=0.75,
        help="latent-prior noise level (paper: 0.75); 1.0 = text-to-image, sources are not read",
    )
    p.add_argument("--guidance-scale", type=float, default=2.0, help="CFG scale (paper: 2.0)")
    p.add_argument("--resolution", type=int, default=512, help="paper: 512")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="auto: fp16 on GPU (release), fp32 on CPU",
    )
    # Prompts (paper §3.2; release form as an option).
    p.add_argument("--captions", default=None, help="captions.jsonl from caption.py (ImageNet sets)")
    p.add_argument("--allow-missing-captions", action="store_true", help="prompt uncaptioned images without one")
    p.add_argument(
        "--prompt-style",
        choices=PROMPT_STYLES,
        default="paper",
        help="paper: 'photo of {c}, {caption}', negative 'distorted, unrealistic, blurry, out of frame';\n"
        "release: adds ', best quality' and the negative words 'cropped, deformed'",
    )
    # Output set.
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="outputs per real image; fractional: a seeded subset gets one more (e.g. 2.5)",
    )
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    p.add_argument(
        "--output-mode",
        choices=("source", "RGB"),
        default="source",
        help="source: grayscale datasets get grayscale images (the generator draws RGB), else RGB; RGB: always",
    )
    p.add_argument("--jpeg-quality", type=int, default=95, help="release: PIL default 75")
    p.add_argument(
        "--save-size",
        type=positive_int,
        default=None,
        help="store images resized to this short side after generation (e.g. 256 for a 224 px classifier)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable source images (counted in the manifest) instead of failing",
    )
    p.add_argument(
        "--verify-existing",
        choices=("quick", "full"),
        default="quick",
        help="how a re-run checks images already on disk: quick = complete file (JPEG/PNG trailer + "
        "header), full = decode every pixel",
    )
    # Speed only (never change an image beyond float noise).
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per pipeline call, classes mixed")
    p.add_argument("--decode-batch", type=positive_int, default=16, help="VAE encode/decode chunk (bounds memory)")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers reading and resizing sources")
    p.add_argument("--write-workers", type=int, default=4, help="threads encoding and writing outputs")
    p.add_argument(
        "--compile",
        nargs="?",
        const="on",
        default="auto",
        choices=("auto", "on", "off"),
        type=auto_on_off,
        help="torch.compile the UNet and the VAE decoder and encoder; auto = on a GPU only (H100, SD1.5 "
        "shapes, UNet + decoder compiled: 6.1 -> 8.4 img/s after ~1 min of compiling; on the demo's "
        "CPU model ~1.3x steady state, but ~100 s of compiling, more than the demo's whole synthesis)",
    )
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
        help="torch.compile's mode when compiling (default: the one measured above; the others autotune "
        "kernels or capture CUDA graphs: longer compiles, not measured here)",
    )
    p.add_argument(
        "--reuse-from",
        nargs="*",
        default=[],
        metavar="DIR",
        help="other synthesize.py outputs of the same config at another --scale: their images of the same "
        "(source, copy) are identical by construction (same seed), so they are hard-linked, not redone",
    )
    p.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: this job's part, for job arrays")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# The plan: which images exist is a pure function of the dataset, the seed and the scale.


class Plan:
    """Every output image as a job id j = k·n + s (copy k of source s), copy-major so a stopped run holds whole
    copies; prompts, seeds, tokens and file names are computed from (s, k) on demand."""

    def __init__(self, args, index, captions, tokens):
        self.args, self.index, self.tokens = args, index, tokens
        n = len(index)
        self.prompts = [
            build_prompt(index.class_names[smp.label], cap, args.prompt_style)
            for smp, cap in zip(index.samples, captions)
        ]
        full, frac = int(math.floor(args.scale)), args.scale - math.floor(args.scale)
        # Fractional scale: the round(frac·n) sources with the smallest seeded hash get one more copy (exact count).
        extra = sorted(range(n), key=lambda s: item_seed(args.seed, "extra-copy", index.image_id(s)))[: round(frac * n)]
        self.jobs = np.concatenate(
            [np.arange(full * n, dtype=np.int64), full * n + np.array(sorted(extra), dtype=np.int64)]
        )
        self.stems = [Path(smp.path).stem for smp in index.samples]
        names = {(smp.label, stem) for smp, stem in zip(index.samples, self.stems)}
        if len(names) != n:
            raise ValueError(
                "two source images of one class share a file stem, so their outputs would collide; "
                "rename them (outputs are <class>/<stem>_<k>)"
            )

    def source_copy(self, job: int) -> tuple[int, int]:
        n = len(self.index)
        return int(job) % n, int(job) // n

    def seed(self, job: int) -> int:
        s, k = self.source_copy(job)
        return item_seed(self.args.seed, self.index.image_id(s), k)

    def file(self, job: int) -> str:
        s, k = self.source_copy(job)
        return f"{self.index.classes[self.index.samples[s].label]}/{self.stems[s]}_{k}.{self.args.image_format}"

    def row(self, job: int, model_hash: str | None, lora_hash: str | None) -> dict:
        s, k = self.source_copy(job)
        a, label = self.args, self.index.samples[s].label
        return {
            "file": self.file(job),
            "label": label,
            "class_id": self.index.classes[label],
            "class_name": self.index.class_names[label],
            "source": self.index.samples[s].path,
            "copy": k,
            "prompt": self.prompts[s],
            "seed": self.seed(job),
            "strength": a.strength,
            "steps": a.steps,
            "guidance": a.guidance_scale,
            "lora_scale": a.lora_scale if a.lora_dir else None,
            "resolution": a.resolution,
            "model": a.pretrained_model,
            "model_hash": model_hash,
            "lora_hash": lora_hash,
        }


def load_visual_tokens(lora_dir, index, vg_mode: str):
    """(tokens per source image [n, D] or None, placement), from finetune.py's visual_guidance files."""
    if lora_dir is None or vg_mode == "none":
        return None, "append"
    meta_path, tensor_path = Path(lora_dir) / "visual_guidance.json", Path(lora_dir) / "visual_guidance.safetensors"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} missing: --lora-dir must be a finetune.py output (or pass --vg-mode none)"
        )
    meta = read_json(meta_path)
    if meta["mode"] == "none":
        return None, meta.get("placement", "append")
    from safetensors.torch import load_file

    table = load_file(str(tensor_path))["tokens"]
    if meta["mode"] == "class-mean":
        if list(meta["classes"]) != list(index.classes):
            raise ValueError(
                f"{meta_path}: classes {meta['classes'][:5]}... differ from the dataset's "
                f"{index.classes[:5]}...; synthesize with the dataset the LoRA was trained on"
            )
        rows = [smp.label for smp in index.samples]
    elif meta["mode"] == "per-image":
        where = {p: i for i, p in enumerate(meta["image_paths"])}
        missing = [smp.path for smp in index.samples if smp.path not in where]
        if missing:
            raise KeyError(
                f"{len(missing)} source image(s) have no per-image token in {tensor_path}, e.g. {missing[:3]}"
            )
        rows = [where[smp.path] for smp in index.samples]
    else:
        raise ValueError(f"{meta_path}: unknown visual-guidance mode {meta['mode']!r}")
    return table[torch.tensor(rows)], meta.get("placement", "append")


# ----------------------------------------------------------------------------------------------------------------------
# The generator.


class IgnoreZeroTokens:
    """Cross-attention that gives all-zero condition tokens no attention weight.

    The paper appends the visual token as a 78th token, but CFG runs both branches in one UNet batch, so the
    77-token negative embeddings are zero-padded to 78. Masking that slot makes the negative branch exactly its plain
    text embeddings (a real CLIP or visual token is never exactly zero). Wraps diffusers' own SDPA processor.
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None and attention_mask is None:
            pad = (encoder_hidden_states == 0).all(dim=-1, keepdim=True).transpose(1, 2)  # [B, 1, L]
            attention_mask = torch.zeros(pad.shape, dtype=hidden_states.dtype, device=hidden_states.device)
            attention_mask = attention_mask.masked_fill(pad, torch.finfo(hidden_states.dtype).min)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def load_pipeline(args, device, dtype, fuse: bool = True):
    """SD img2img + UniPC + the LoRA, fused unless `fuse=False` (the benchmark's baseline, as the release)."""
    from diffusers import StableDiffusionImg2ImgPipeline, UniPCMultistepScheduler

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        args.pretrained_model,
        revision=args.revision,
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)  # release: UniPC with defaults
    if args.lora_dir:
        # Into the UNet only: finetune.py trains no text-encoder LoRA, and load_lora_weights warns on every run
        # that it found none.
        state_dict, alphas = pipe.lora_state_dict(args.lora_dir, weight_name="pytorch_lora_weights.safetensors")
        pipe.load_lora_into_unet(state_dict, alphas, unet=pipe.unet, adapter_name="realfake", _pipeline=pipe)
        if fuse:
            fuse_lora(pipe, args.lora_scale)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)  # all modules resident: never CPU offload (the release offloads on every call)
    # No channels_last: on an H100 it made the eager SD1.5 UNet 12% slower and the compiled one no faster.
    return pipe


def fuse_lora(pipe, scale: float) -> None:
    """Fold the LoRA into the UNet weights at --lora-scale: plain Linear layers again, no per-step LoRA matmuls."""
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go


def install_token_mask(pipe, placement: str, uses_tokens: bool) -> None:
    if not (uses_tokens and placement == "append"):
        return
    processors = {
        name: IgnoreZeroTokens(proc) if ".attn2." in name else proc for name, proc in pipe.unet.attn_processors.items()
    }
    pipe.unet.set_attn_processor(processors)


def condition(pipe, prompts, tokens, placement, neg_text, device):
    """(prompt_embeds, negative_prompt_embeds) for one batch: the visual token goes into the conditional branch only;
    the negative branch keeps the plain negative-prompt embeddings (zero-padded when the token is appended)."""
    cond = pipe.encode_prompt(prompts, device, 1, False)[0]
    neg = pipe.encode_prompt([neg_text], device, 1, False)[0].expand(len(prompts), -1, -1)
    if tokens is not None:
        cond = add_visual_tokens(cond, tokens.to(device), placement)
    if cond.shape[1] > neg.shape[1]:
        neg = torch.nn.functional.pad(neg, (0, 0, 0, cond.shape[1] - neg.shape[1]))
    return cond, neg.contiguous()


@torch.no_grad()
def generate(pipe, pixels, seeds, prompts, tokens, args, placement, device) -> torch.Tensor:
    """One pipeline call for a batch of mixed classes -> uint8 images [B, H, W, 3], still on `device`.

    Seeded CPU generators make the initial noise identical on any hardware and in any batch; the latent prior is
    encoded here in chunks (the pipeline would encode one image at a time) and handed to the pipeline as latents.
    """
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    vae, chunk = pipe.vae, args.decode_batch
    if args.strength >= 1.0:  # text-to-image: no latent prior, the start is pure seeded noise
        size = args.resolution // pipe.vae_scale_factor
        init = torch.zeros(len(seeds), vae.config.latent_channels, size, size, device=device, dtype=pipe.unet.dtype)
    else:
        init = torch.cat(
            [
                encode_latent_prior(vae, pixels[i : i + chunk], generators[i : i + chunk])
                for i in range(0, len(seeds), chunk)
            ]
        )
    cond, neg = condition(pipe, prompts, tokens, placement, negative_prompt(args.prompt_style), device)
    latents = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=neg,
        image=init,
        strength=args.strength,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        generator=generators,
        output_type="latent",
        return_dict=False,
    )[0]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = []
    for part in latents.split(chunk):
        decoded = vae.decode(part / vae.config.scaling_factor + shift, return_dict=False)[0]
        images.append(((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(images)


def to_host(images: torch.Tensor):
    """Start the copy of a batch to the CPU without waiting for it: on a GPU the process goes on to queue the next
    batch's inputs while the decode and the copy run, instead of waiting for them. Returns the host tensor and the
    event the writer must wait on before reading it (None on the CPU, where it is ready)."""
    if images.device.type != "cuda":
        return images, None
    host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
    host.copy_(images, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def save_when_ready(
    ready, image: torch.Tensor, path: Path, mode: str = "RGB", save_size: int | None = None, **save_kwargs
) -> None:
    if ready is not None:
        ready.synchronize()
    img = Image.fromarray(image.numpy()).convert(mode)
    if save_size and min(img.size) > save_size:  # stored smaller than generated: the classifier reads 224 px
        scale = save_size / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC, reducing_gap=3.0)
    save_image(img, path, **save_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs, outputs, resume.


class Sources(torch.utils.data.Dataset):
    """Init images for a list of jobs, read and resized in DataLoader workers; a bad file comes back as an error
    string so the main process decides between failing and --skip-bad."""

    def __init__(self, paths, size: int, read: bool):
        self.paths, self.size, self.read = paths, size, read

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if not self.read:
            return i, torch.zeros(3, 1, 1), ""
        try:
            return i, load_init_image(self.paths[i], self.size), ""
        except ImageReadError as err:
            return i, torch.zeros(3, self.size, self.size), str(err)


def complete_on_disk(path: Path, mode: str) -> bool:
    """An image written by this script is complete: atomic writes leave either nothing or a whole file. The quick
    check still catches truncation and garbage (trailer + header) without decoding 12.8 M images on a re-run."""
    if mode == "full":
        try:
            load_image(path)
            return True
        except ImageReadError:
            return False
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - 16))
            tail = f.read()
        ok = tail.endswith(b"\xff\xd9") if path.suffix == ".jpg" else b"IEND" in tail
        with Image.open(path) as img:
            img.verify()
        return ok
    except Exception:  # noqa: BLE001 - any failure to parse means "regenerate it"
        return False


def existing_files(out_dir: Path, classes) -> set[str]:
    """Relative paths of the non-hidden files in the class folders (one listing per class, not a stat per image)."""
    found = set()
    for c in classes:
        with contextlib.suppress(FileNotFoundError), os.scandir(out_dir / c) as it:
            found.update(f"{c}/{e.name}" for e in it if not e.name.startswith("."))
    return found


def same_images(config: dict, other_dir: Path) -> bool:
    """Another output dir whose images equal ours for equal (source, copy): same config but for the scale."""
    for name in ("manifest.json", "run_config.json"):
        if (other_dir / name).is_file():
            other = read_json(other_dir / name)["config"]
            return {k: v for k, v in other.items() if k != "scale"} == {k: v for k, v in config.items() if k != "scale"}
    return False


def reuse_images(plan: Plan, jobs, out_dir: Path, config: dict, dirs, mode: str, log) -> int:
    """Hard-link (or copy, across file systems) the images of `jobs` that another scale's run already made."""
    linked = 0
    present = existing_files(out_dir, plan.index.classes)
    for other in (Path(d) for d in dirs):
        if other.resolve() == out_dir.resolve():
            continue
        if not same_images(config, other):
            log.info(f"--reuse-from {other}: skipped (not a synthesize.py run of this config)")
            continue
        theirs = existing_files(other, plan.index.classes)
        for j in jobs:
            name = plan.file(j)
            if name in present or name not in theirs or not complete_on_disk(other / name, mode):
                continue
            with atomic_path(out_dir / name) as tmp:
                tmp.unlink()
                try:
                    os.link(other / name, tmp)
                except OSError:
                    shutil.copyfile(other / name, tmp)
            present.add(name)
            linked += 1
    return linked


def todo_jobs(plan: Plan, jobs, out_dir: Path, mode: str, threads: int) -> list[int]:
    """The jobs whose image is missing or incomplete on disk (resume)."""
    present = existing_files(out_dir, plan.index.classes)
    on_disk = [j for j in jobs if plan.file(j) in present]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        valid = list(pool.map(lambda j: complete_on_disk(out_dir / plan.file(j), mode), on_disk))
    good = {j for j, ok in zip(on_disk, valid) if ok}
    return [int(j) for j in jobs if j not in good]


def run_loop(pipe, plan: Plan, jobs, out_dir: Path, args, placement, device, is_main: bool = True) -> dict:
    """Generate `jobs` into out_dir: workers read sources while the model runs, a thread pool writes the results."""
    index = plan.index
    paths = [index.abspath(plan.source_copy(j)[0]) for j in jobs]
    loader = torch.utils.data.DataLoader(
        Sources(paths, args.resolution, args.strength < 1.0),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    save_kwargs = {"quality": args.jpeg_quality} if args.image_format == "jpg" else {}
    save_kwargs.update(mode=args.resolved_output_mode, save_size=args.save_size)
    bad, pending, done, start = [], [], 0, time.perf_counter()
    bar = progress(total=len(jobs), is_main=is_main, unit="img", desc="synthesize")
    with ThreadPoolExecutor(max(1, args.write_workers)) as writer:
        for idx, pixels, errors in loader:
            keep = [n for n, err in enumerate(errors) if not err]
            for n, err in enumerate(errors):
                if err and not args.skip_bad:
                    raise ImageReadError(f"{err} (fix or remove it, or pass --skip-bad to skip and count it)")
                if err:
                    bad.append({"source": index.samples[plan.source_copy(jobs[int(idx[n])])[0]].path, "error": err})
            batch = [jobs[int(idx[n])] for n in keep]
            if batch:
                rows = [plan.source_copy(j)[0] for j in batch]
                tokens = plan.tokens[torch.tensor(rows)] if plan.tokens is not None else None
                pix = pixels if len(keep) == len(errors) else pixels[keep]  # keep pinned memory when all are good
                images, ready = to_host(
                    generate(
                        pipe,
                        pix.to(device, non_blocking=True),
                        [plan.seed(j) for j in batch],
                        [plan.prompts[s] for s in rows],
                        tokens,
                        args,
                        placement,
                        device,
                    )
                )
                for j, img in zip(batch, images):
                    pending.append(writer.submit(save_when_ready, ready, img, out_dir / plan.file(j), **save_kwargs))
            # Bound the queue (memory) and surface write errors early.
            while len(pending) > 4 * args.batch_size:
                pending.pop(0).result()
            done += len(batch)
            bar.update(len(idx))
        for fut in pending:
            fut.result()
    bar.close()
    seconds = time.perf_counter() - start
    return {"generated": done, "bad_sources": bad, "seconds": seconds, "images_per_s": done / max(seconds, 1e-9)}


def finalize(plan: Plan, out_dir: Path, run: RunDir, args, lora_hash) -> dict | None:
    """Write manifest.jsonl + manifest.json once every image of every shard is on disk (or a counted bad source)."""
    present = existing_files(out_dir, plan.index.classes)
    bad = {}
    for part in sorted(out_dir.glob("bad_sources.*.json")):
        bad.update({b["source"]: b["error"] for b in read_json(part)})
    missing = [
        j
        for j in plan.jobs
        if plan.file(j) not in present and plan.index.samples[plan.source_copy(j)[0]].path not in bad
    ]
    if missing:
        return None
    model_hash = fingerprint(args.pretrained_model, args.revision)
    kept = [j for j in plan.jobs if plan.file(j) in present]
    write_jsonl(out_dir / "manifest.jsonl", (plan.row(j, model_hash, lora_hash) for j in kept))
    for stale in out_dir.glob("*/.*"):  # temp files of killed writers: no writer is left once all images exist
        stale.unlink(missing_ok=True)
    bad_images = len(plan.jobs) - len(kept)
    metrics = {
        "images": len(kept),
        "sources": len(plan.index),
        "scale": args.scale,
        "bad_sources": len(bad),
        "bad_images": bad_images,
        "source_images": args.source_images,
        "output_mode": args.resolved_output_mode,
        "stored_short_side": args.save_size or args.resolution,
    }
    run.finish(
        metrics,
        inputs={"pretrained_model": model_hash, "lora": lora_hash, "data_root": args.data_root, "bad_sources": bad},
    )
    return metrics


def lora_fingerprint(lora_dir) -> str | None:
    """Hash of the files synthesis uses (not the checkpoints/), so a retrained LoRA is a different config."""
    if lora_dir is None:
        return None
    files = [
        Path(lora_dir) / f
        for f in ("pytorch_lora_weights.safetensors", "visual_guidance.safetensors", "visual_guidance.json")
    ]
    if not files[0].is_file():
        raise FileNotFoundError(f"{files[0]} missing: --lora-dir must be a finetune.py output dir")
    return "-".join(hash_file(f)[:8] for f in files if f.is_file())


def prepare(args):
    """Dataset, captions, tokens and plan, shared by the run and the benchmark."""
    if not (args.scale > 0 and math.isfinite(args.scale)):
        raise ValueError(f"--scale must be a finite number > 0 (outputs per real image), got {args.scale}")
    index = load_dataset(args.dataset, args.data_root, args.split)
    if args.subset_mask:
        index = index.subset(np.load(args.subset_mask).astype(bool).tolist())
    if len(index) == 0:
        raise ValueError(f"no images in {args.dataset} {args.split} under {args.data_root}")
    if args.strength < 1.0:  # the latent prior reads every source: all bad ones named now, not the first mid-run
        args.source_fingerprint = check_images(index, skip_bad=args.skip_bad)[2]
    else:
        args.source_fingerprint = split_fingerprint(index)
    captions = captions_for(index, load_captions(args.captions), args.allow_missing_captions)
    tokens, placement = load_visual_tokens(args.lora_dir, index, args.vg_mode)
    args.source_images = describe_images(index, args.resolution)
    grayscale = args.output_mode == "source" and args.source_images["grayscale"]
    args.resolved_output_mode = "L" if grayscale else "RGB"
    return Plan(args, index, captions, tokens), placement


def main(argv=None) -> dict:
    args = parse_args(get_parser(), argv, "synthesize")
    from accelerate import PartialState
    from diffusers import StableDiffusionImg2ImgPipeline

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu: lets torchrun spread CPU processes
    out_dir = Path(args.output_dir or Path(args.runs_dir) / args.dataset / f"synth_x{args.scale:g}")
    # Bad inputs (model, LoRA, dataset, captions, tokens) fail here, before the run directory is touched: a run config
    # left by a failed start would make the corrected command a config mismatch.
    check_pretrained(StableDiffusionImg2ImgPipeline.load_config, args.pretrained_model, args.revision, SD_LAYOUT)
    lora_hash = lora_fingerprint(args.lora_dir)
    plan, placement = prepare(args)
    derived = ("output_mode", "source_images", "resolved_output_mode")
    # source_fingerprint (set by prepare) stays in: a changed source split is a config mismatch, not a resume.
    config = {**config_dict(args, exclude=SPEED_ONLY + derived), "lora_hash": lora_hash}
    if args.resolved_output_mode != "RGB":  # RGB runs keep the config (and hash) they had before the option
        config["output_mode"] = args.resolved_output_mode
    if config["save_size"] is None:  # likewise for runs stored at the generated size
        del config["save_size"]
    run = RunDir(out_dir, config, args.overwrite, state.is_main_process)
    status = run.start() if state.is_main_process else None
    state.wait_for_everyone()
    status = status or run.start()
    log = get_logger(out_dir, state.is_main_process)
    if status == "done":
        log.info(f"{out_dir} is complete with this config; nothing to do")
        return {**run.manifest()["metrics"], "complete": True, "generated": 0}
    note_unusual_images(args.source_images, args.resolution, log)
    if args.resolved_output_mode != "RGB":
        log.info("grayscale dataset: synthetic images are written in grayscale (--output-mode RGB keeps colour)")
    if state.is_main_process:
        write_json(out_dir / "classes.json", {"classes": plan.index.classes, "class_names": plan.index.class_names})
    mine = local_items(plan.jobs, args.shard, state.process_index, state.num_processes)
    if args.reuse_from:
        log.info(
            f"reused {reuse_images(plan, mine, out_dir, config, args.reuse_from, args.verify_existing, log)} "
            f"images from --reuse-from"
        )
    todo = todo_jobs(plan, mine, out_dir, args.verify_existing, args.write_workers)
    log.info(
        f"{len(plan.jobs)} images from {len(plan.index)} sources (x{args.scale:g}); this process: {len(mine)}, "
        f"{len(mine) - len(todo)} already on disk, {len(todo)} to generate"
    )
    device = state.device
    stats = {"generated": 0, "bad_sources": [], "images_per_s": 0.0, "seconds": 0.0}
    if todo:
        pipe = load_pipeline(args, device, resolve_dtype(args.dtype, device))
        if fragmented := fragmented_class_names(pipe.tokenizer, plan.index.class_names):
            log.warning(f"the generator's tokenizer has no whole word for these class names: {fragmented}")
        install_token_mask(pipe, placement, plan.tokens is not None)
        maybe_compile(pipe, args)
        stats = run_loop(pipe, plan, todo, out_dir, args, placement, device, state.is_main_process)
    tag = f"{args.shard[0]}of{args.shard[1]}-r{state.process_index}of{state.num_processes}"
    # A file, not a folder: beside the class folders a folder would read as one more class.
    write_json(out_dir / f"bad_sources.{tag}.json", stats["bad_sources"])
    state.wait_for_everyone()
    metrics = finalize(plan, out_dir, run, args, lora_hash) if state.is_main_process else None
    log.info(
        f"done: generated {stats['generated']} images in {stats['seconds']:.1f}s "
        f"({stats['images_per_s']:.2f} img/s), {len(stats['bad_sources'])} bad sources; "
        + ("set complete: manifest.json written" if metrics else "other shards still running or incomplete")
    )
    return {
        **(metrics or {}),
        "complete": metrics is not None,
        "generated": stats["generated"],
        "images_per_s": stats["images_per_s"],
        "expected": len(plan.jobs),
    }


def maybe_compile(pipe, args) -> None:
    if args.compile == "on" or (args.compile == "auto" and pipe.device.type == "cuda"):
        mode = None if args.compile_mode == "default" else args.compile_mode
        pipe.unet = torch.compile(pipe.unet, mode=mode)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=mode)
        pipe.vae.encoder = torch.compile(pipe.vae.encoder, mode=mode)  # the latent prior; compiled lazily, if used


if __name__ == "__main__":
    main()
