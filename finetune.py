"""LoRA-finetune a Stable Diffusion 1.x UNet with the distribution-matching (MMD) term and the visual-guidance token.

Paper §3.1 (Eq. 5-7: diffusion loss + λ · linear-kernel MMD between clean latents z0 and predicted clean latents ẑ0)
and §3.2 (prompt "photo of {classname}, {caption}" plus one CLIP image-embedding token: the mean embedding of K random
training images of the class, appended after the 77 text tokens); the option defaults cite App. E Tab. 7 and the
release. Where the authors' release differs, the paper is the default and the release an option:

  paper (default)                                   release option
  MMD on z0 vs ẑ0, batch means, λ = 0.01 (below)    --mmd-form release  (min-SNR-weighted batch sum of ε residuals,
                                                                         λ = 0.003)
  class-mean visual token, appended (78 tokens)     --vg-mode per-image --vg-placement replace-last
  the whole training set                            --subset-mask FILE  (the release always used a random half)

Default λ for the paper form: the release's term is λ_r (1/D)‖Σ_i w_i r_i‖² (r = ε̂ − ε, w = min-SNR weight), ours is
λ (1/D)‖mean_i r_i/√SNR_i‖². For independent residuals of equal variance their expected sizes are λ_r·B·E[w²] and
λ·E[1/SNR]/B, so λ = λ_r·B²·E[w²]/E[1/SNR] = 0.003·64·0.893/20.3 ≈ 0.0084 at the release's B = 8 with SD's
schedule (t uniform on 0..999); we round to 0.01. Note the paper term is dominated by noisy timesteps (1/SNR ≤ 213).
The batch of the MMD is the release's per-GPU one (per process), as the paper does not say; `--mmd-batch global`
takes each micro-batch over all processes instead (accumulated micro-batches are never pooled), whose expected size
then falls as 1/B with the global B (64 on the paper's 8 GPUs), so the conversion above, made at B = 8, would call for
a λ about 8x larger there.

Inputs:  a dataset (`--dataset`, `--data-root`), optional captions.jsonl (`--captions`, from caption.py), an SD 1.x
         pipeline in the diffusers layout (`--pretrained-model` hub id or local dir), a CLIP image encoder
         (`--vg-encoder`), optional `--subset-mask FILE` (.npy bool per training image, for LiRA shadows).
Outputs (`--output-dir`, default runs/<dataset>/finetune/):
  pytorch_lora_weights.safetensors   diffusers LoRA format (`pipe.load_lora_weights(dir)`)
  visual_guidance.safetensors/.json  the tokens synthesis must use ([C, D] class-mean or [N, D] per-image, already in
                                     the UNet's cross-attention width), vg_projection.safetensors if one was trained
  vg_embeddings.safetensors/.json    the CLIP image embeddings the tokens come from (unless --vg-mode none)
  checkpoints/checkpoint-<step>/     accelerate state every --checkpointing-steps (last --checkpoints-total-limit kept)
  cache/                             with --cache-latents: the encoded latents and prompts
  run_config.json, metrics.jsonl, log.txt, manifest.json (written last)
A re-run of a complete run is a no-op; an interrupted run resumes from its latest checkpoint. Attention runs through
PyTorch SDPA (diffusers' default processor).

Commands:
  one GPU:     python finetune.py --config configs/in10.yaml --data-root /data/imagenet \\
                   --captions runs/in10/captions/captions.jsonl
  multi-GPU:   accelerate launch --num_processes 8 finetune.py --config configs/in10.yaml --data-root ... --captions ...
  4 GPUs:      accelerate launch --num_processes 4 finetune.py ... --gradient-accumulation-steps 2 (paper's 64 per step)
  multi-node:  accelerate launch --num_machines 2 --machine_rank $RANK --main_process_ip $HOST --num_processes 16 \\
                   finetune.py ...
  CPU (demo):  python finetune.py --config configs/demo.yaml
  benchmark:   python bench.py finetune [--pretrained-model DIR | --weights sd15-random]   (samples/s, peak memory)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

import common

PAPER_ENCODER = "openai/clip-vit-large-patch14"  # release extract_feature.py: projected 768-d image embedding
LORA_TARGETS = "to_q,to_k,to_v,to_out.0"  # release: LoRA on every UNet attention's four projections
MMD_WEIGHTS = {"paper": 0.01, "release": 0.003}  # paper form: converted from the release's 0.003 (docstring)
AUTOCAST_ON_GPU = "fp16"  # --mixed-precision auto on a GPU: paper App. E Tab. 7 and the release train in fp16


def get_parser() -> common.StageParser:
    p = common.StageParser(__doc__)
    seed_help = "seeds data order, crops and noise"
    common.add_run_options(p, "finetune", seed_help=seed_help, resume=True, data_fingerprinted=True)
    a = p.group("data and prompts (paper §3.2)").add_argument
    a("--captions", default=None, help="caption.py's captions.jsonl, its hash the identity; unset: 'photo of {class}'")
    p.not_hashed("captions")
    a("--allow-missing-captions", action="store_true", help="prompt images without a caption by class name only")
    a("--subset-mask", default=None, help=".npy bool array, one entry per training image: train on that part only")
    a("--resolution", type=int, default=512, help="release: Resize(512) + RandomCrop(512)")
    a("--random-flip", action=argparse.BooleanOptionalAction, default=True, help="release: random horizontal flip")
    common.add_skip_bad(p, "the manifest")
    a = p.group("model and LoRA (paper App. E Tab. 7)").add_argument
    a("--pretrained-model", default=common.PAPER_SD, help="SD 1.x pipeline: hub id or local diffusers directory")
    a("--revision", default=None, help="hub revision of --pretrained-model")
    a("--lora-rank", type=int, default=4, help="release --rank 4 (alpha = rank, i.e. scale 1, as released)")
    a("--lora-targets", default=LORA_TARGETS, help="comma-separated UNet module names that get LoRA")
    a = p.group("optimisation (paper App. E Tab. 7; release train_lora.sh)").add_argument
    a("--learning-rate", type=float, default=1e-4, help="constant, no scaling by batch size")
    a("--adam-weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    a("--adam-beta1", type=float, default=0.9, help="AdamW β1")
    a("--adam-beta2", type=float, default=0.999, help="AdamW β2")
    a("--adam-epsilon", type=float, default=1e-8, help="AdamW ε")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    a("--train-batch-size", type=common.positive_int, default=8, help="per process (paper: 8 per GPU x 8 GPUs)")
    a("--gradient-accumulation-steps", type=common.positive_int, default=1, help="micro-batches per step (README)")
    a("--num-train-epochs", type=int, default=100, help="release: 100 (the paper's table cell is garbled)")
    a("--max-train-steps", type=int, default=None, help="stop after this many steps (overrides the epoch count)")
    a("--snr-gamma", type=float, default=5.0, help="min-SNR-γ weighting (release: 5); 0 = plain ε-MSE")
    a = p.group("distribution matching (paper §3.1; the docstring derives λ)").add_argument
    a("--mmd-form", default="paper", choices=["paper", "release"], help="paper: Eq. 7 on z0, ẑ0; release: on ε")
    a("--mmd-batch", default="process", choices=["process", "global"], help="per process (release), or all processes")
    mmd_help = f"λ: {MMD_WEIGHTS['paper']} (paper form) or {MMD_WEIGHTS['release']} (release form); 0 = off"
    a("--mmd-weight", type=float, default=None, help=mmd_help)
    a = p.group("visual guidance (paper §3.2)").add_argument
    a("--vg-mode", default="class-mean", choices=["class-mean", "per-image", "none"], help="per-image: release")
    a("--vg-placement", default="append", choices=list(common.VG_PLACEMENTS), help="replace-last: release")
    a("--vg-encoder", default=PAPER_ENCODER, help="CLIP image encoder (hub id or local dir)")
    # The paper samples "random" images, count not given; 64 keeps the mean's standard error at 1/8 of the spread.
    a("--vg-images-per-class", type=int, default=64, help="K random training images per class for the class mean")
    engineering = p.group("engineering")
    common.add_mixed_precision(engineering, AUTOCAST_ON_GPU, " (release)")
    a = engineering.add_argument
    a("--gradient-checkpointing", action="store_true", help="recompute UNet activations in backward (less memory)")
    a("--cache-latents", action="store_true", help="encode latents + text once, center crop (README: Finetuning)")
    a("--allow-tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on Ampere+ GPUs")
    a = p.speed_group().add_argument
    a("--checkpointing-steps", type=common.positive_int, default=500, help="release: 500")
    a("--checkpoints-total-limit", type=common.positive_int, default=3, help="keep the last K (release: all)")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# Data: one seeded random crop + flip per (seed, epoch, image), and a seeded order per epoch, so a resumed run sees
# exactly the batches an uninterrupted one would have seen.


def resize_crop(img, size: int, rng: np.random.Generator | None, flip: bool) -> torch.Tensor:
    """The training view: short side to `size` bilinear (as released), random or center crop, flip; [-1, 1]."""
    return common.resize_crop(img, size, Image.BILINEAR, rng, flip)


class TrainImages(torch.utils.data.Dataset):
    """Item = (row, flip, pixels); pixels is an empty tensor when latents are cached (nothing to decode)."""

    def __init__(self, index, args, epoch: int, cached: bool):
        self.index, self.args, self.epoch, self.cached = index, args, epoch, cached

    def __len__(self):
        return len(self.index)

    def __getitem__(self, row: int):
        seed = common.item_seed(self.args.seed, "finetune-aug", self.epoch, self.index.image_id(row))
        rng = np.random.default_rng(seed)
        flip = bool(self.args.random_flip and rng.random() < 0.5)
        if self.cached:
            return row, flip, torch.empty(0)
        return row, flip, resize_crop(common.load_image(self.index.abspath(row)), self.args.resolution, rng, flip)


def epoch_batches(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This process's batches of one epoch: a seeded permutation, padded to a multiple of the world size (as
    DistributedSampler does), cut into global batches of batch_size x world, each split over the processes."""
    perm = common.epoch_order(n, seed, "finetune-order", epoch).tolist()
    perm += perm[: (-n) % world]
    step = batch_size * world
    return [perm[s : s + step][rank::world] for s in range(0, len(perm), step)]


def collate(items):
    rows, flips, pixels = zip(*items)
    return list(rows), list(flips), torch.stack(pixels)


# ----------------------------------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass
class SDModels:
    """The SD components a training step uses; `projection` maps visual tokens to the UNet's width (or None)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any
    unet: torch.nn.Module
    projection: torch.nn.Module | None = None

    @property
    def trained(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.projection) if m is not None]


@dataclasses.dataclass
class VisualGuidance:
    """The visual-guidance embeddings (per class or per image, None with --vg-mode none), the trainable projection to
    the UNet's width (None when the widths agree) and their description for visual_guidance.json."""

    embeds: torch.Tensor | None
    projection: torch.nn.Module | None
    info: dict


@dataclasses.dataclass
class Optimization:
    """The prepared optimizer, the number of parameters it trains, the optimizer steps in all and the one to start
    from, with the loss logs of the last epoch's micro-batches before it (a resumed run's checkpoint)."""

    optimizer: Any
    trainable: int
    total: int
    start: int
    history: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TrainingData:
    """What a step reads besides the images: prompts and labels per training image, the visual tokens (per class or
    per image, or None) and the latent / text cache (or None: encoded on the fly)."""

    prompts: list[str]
    labels: list[int]
    tokens: torch.Tensor | None
    cache: dict | None


def load_components(args, device, weight_dtype) -> SDModels:
    """Tokenizer, frozen text encoder and VAE, noise scheduler, and the UNet with peft LoRA adapters (fp32)."""
    src, rev = args.pretrained_model, args.revision
    try:
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", revision=rev)
        # Loaded in their dtype rather than cast with .to(dtype), which diffusers warns about on every run.
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", revision=rev, dtype=weight_dtype)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", revision=rev, torch_dtype=weight_dtype)
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", revision=rev, torch_dtype=weight_dtype)
        scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", revision=rev)
    except (OSError, ValueError) as err:
        raise OSError(
            f"cannot load an SD 1.x pipeline from '{src}': {err}. Pass --pretrained-model with a hub id "
            f"(cached when HF_HUB_OFFLINE=1) or a directory in the diffusers layout (model_index.json, "
            f"unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        ) from err
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(
            f"{src} predicts {scheduler.config.prediction_type}; the MMD term (ẑ0 from ε̂) needs an "
            f"ε-prediction model such as SD 1.5"
        )
    for model in (text_encoder, vae):
        model.requires_grad_(False).to(device)
    return SDModels(tokenizer, text_encoder.eval(), vae.eval(), scheduler, add_lora(unet, args, device))


def add_lora(unet, args, device):
    """Freeze the UNet and add peft LoRA adapters (Gaussian init of A, zero B: the model starts unchanged)."""
    unet.requires_grad_(False).to(device)
    unet.add_adapter(
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=args.lora_targets.split(","),
        )
    )
    cast_training_params(unet, torch.float32)  # trainable LoRA weights in fp32 under fp16/bf16 autocast
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def encode_text(models: SDModels, prompts: list[str]) -> torch.Tensor:
    tokenizer = models.tokenizer
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return models.text_encoder(ids.to(models.text_encoder.device))[0]


@torch.no_grad()
def clip_embeddings(encoder_id: str, paths: list[Path], device) -> torch.Tensor:
    """Projected (unnormalised) CLIP image embeddings [N, D] (release extract_feature.py: get_image_features)."""
    try:
        processor = CLIPImageProcessor.from_pretrained(encoder_id)
        # fp32 whatever the file stores (transformers would keep fp16 weights in fp16): computed once per run.
        model = CLIPVisionModelWithProjection.from_pretrained(encoder_id, dtype=torch.float32).to(device).eval()
    except OSError as err:
        raise OSError(
            f"cannot load the CLIP image encoder '{encoder_id}': {err}. Pass --vg-encoder (hub id or "
            f"local dir), or --vg-mode none"
        ) from err
    out = []
    for start in common.progress(range(0, len(paths), 32), desc="clip embeddings"):
        images = [common.load_image(p) for p in paths[start : start + 32]]
        pixels = processor(images=images, return_tensors="pt").pixel_values.to(device)
        out.append(model(pixel_values=pixels).image_embeds.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def visual_guidance(index, args, device) -> tuple[torch.Tensor, dict]:
    """Raw encoder embeddings and their description: per class the mean of K seeded random training images (paper
    §3.2), or every image's own embedding (release). Which images are sampled depends only on seed and image ids."""
    info = {
        "mode": args.vg_mode,
        "placement": args.vg_placement,
        "classes": index.classes,
        "encoder": args.vg_encoder,
        "images_per_class": args.vg_images_per_class,
    }
    if args.vg_mode == "per-image":
        info["image_paths"] = [s.path for s in index.samples]
        return clip_embeddings(args.vg_encoder, [index.abspath(i) for i in range(len(index))], device), info
    by_class = [[] for _ in index.classes]  # one pass over the samples, not one per class (1000 x 1.28 M at IN-1K)
    for r, s in enumerate(index.samples):
        by_class[s.label].append(r)
    empty = [cls for cls, rows in zip(index.classes, by_class) if not rows]
    if empty:  # synthesis would mask a zero token out of cross-attention while training attended to it
        raise ValueError(
            f"--vg-mode {args.vg_mode}: no training images for class(es) {', '.join(empty)}, so they have no visual "
            "token. Add images of them, drop them from the dataset, or pass --vg-mode none."
        )
    chosen = []
    for cls, rows in zip(index.classes, by_class):
        rows = sorted(rows, key=index.image_id)
        rng = np.random.default_rng(common.item_seed(args.seed, "visual-guidance", cls))
        picked = sorted(rng.permutation(len(rows))[: args.vg_images_per_class].tolist())
        chosen.append([rows[i] for i in picked])
    embeds = clip_embeddings(args.vg_encoder, [index.abspath(r) for rows in chosen for r in rows], device)
    info["sampled_paths"] = [[index.samples[r].path for r in rows] for rows in chosen]
    return torch.stack([e.mean(0) for e in embeds.split([len(rows) for rows in chosen])]), info


# ----------------------------------------------------------------------------------------------------------------------
# Cached latents and text embeddings (--cache-latents): each process encodes a strided part, all processes load all.


@torch.no_grad()
def build_cache(index, prompts, models: SDModels, args, accelerator, run: common.RunDir) -> dict:
    rank, world, vae, out_dir = accelerator.process_index, accelerator.num_processes, models.vae, run.path
    path = out_dir / "cache" / f"shard-{rank}of{world}.safetensors"

    unique = sorted(set(prompts))
    if not path.is_file():
        rows, texts = list(range(len(index)))[rank::world], unique[rank::world]
        mean, std = [], []
        for start in common.progress(
            range(0, len(rows), args.train_batch_size), accelerator.is_main_process, desc="cache latents"
        ):
            batch = rows[start : start + args.train_batch_size]
            views = [resize_crop(common.load_image(index.abspath(r)), args.resolution, None, False) for r in batch]
            pixels = torch.stack(views + [v.flip(-1) for v in views]).to(vae.device, vae.dtype)
            dist = vae.encode(pixels).latent_dist
            n = len(batch)  # [n, 2 flips, C, h, w]
            mean.append(torch.stack([dist.mean[:n], dist.mean[n:]], 1).half().cpu())
            std.append(torch.stack([dist.std[:n], dist.std[n:]], 1).half().cpu())
        text = [encode_text(models, texts[i : i + 64]).half().cpu() for i in range(0, len(texts), 64)]
        tensors = {"rows": torch.tensor(rows, dtype=torch.long), "mean": torch.cat(mean), "std": torch.cat(std)}
        tensors["text"] = torch.cat(text) if text else torch.zeros(0)
        run.check_in_place()
        with common.atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
    accelerator.wait_for_everyone()
    cache = {}
    for r in range(world):
        part = load_file(str(out_dir / "cache" / f"shard-{r}of{world}.safetensors"))
        if not cache:
            n = len(index)
            cache = {
                "mean": torch.empty(n, *part["mean"].shape[1:], dtype=torch.half),
                "std": torch.empty(n, *part["std"].shape[1:], dtype=torch.half),
                "text": torch.empty(len(unique), *part["text"].shape[1:], dtype=torch.half),
            }
        cache["mean"][part["rows"]], cache["std"][part["rows"]] = part["mean"], part["std"]
        if len(part["text"]):
            cache["text"][r::world] = part["text"]
    cache["prompt_row"] = {p: i for i, p in enumerate(unique)}
    return cache


# ----------------------------------------------------------------------------------------------------------------------
# The objective: min-SNR-weighted ε-MSE + λ · MMD (paper Eq. 7 or the release's variant)


def training_step(batch, models: SDModels, data: TrainingData, args, gen) -> tuple[torch.Tensor, dict]:
    rows, flips, pixels = batch
    vae, scheduler, cache, prompts = models.vae, models.scheduler, data.cache, data.prompts
    device, dtype = vae.device, vae.dtype
    with torch.no_grad():
        if cache is None:
            dist = vae.encode(pixels.to(device, dtype)).latent_dist
            mean, std = dist.mean, dist.std
            text = encode_text(models, [prompts[r] for r in rows])
        else:
            pick = torch.tensor([int(f) for f in flips])
            mean = cache["mean"][rows, pick].to(device, dtype)
            std = cache["std"][rows, pick].to(device, dtype)
            text = cache["text"][[cache["prompt_row"][prompts[r]] for r in rows]].to(device, dtype)
        latents = mean + std * torch.randn(mean.shape, generator=gen, device=device, dtype=dtype)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((latents - shift) * vae.config.scaling_factor).float()
    noise = torch.randn(latents.shape, generator=gen, device=device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=gen, device=device)
    noisy = scheduler.add_noise(latents, noise, t)
    if data.tokens is not None:  # paper §3.2: the visual token joins the text condition (appended, or in slot 77)
        vt = data.tokens[[data.labels[r] for r in rows] if args.vg_mode == "class-mean" else rows].to(device)
        vt = models.projection(vt) if models.projection is not None else vt
        text = common.add_visual_tokens(text.float(), vt.float(), args.vg_placement)
    pred = models.unet(noisy.to(dtype), t, text.to(dtype)).sample.float()

    snr = common.snr_from_alphas(scheduler.alphas_cumprod, t)
    w = common.min_snr_weights(snr, args.snr_gamma) if args.snr_gamma > 0 else torch.ones_like(snr)
    diffusion = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
    mmd = torch.zeros((), device=device)
    if args.mmd_weight > 0:
        if args.mmd_form == "paper":  # Eq. 7: MMD between z0 and ẑ0 = (z_t − √(1−ᾱ) ε̂)/√ᾱ over this batch
            a = scheduler.alphas_cumprod.to(device)[t]
            z0_pred = common.predicted_clean_latents(noisy, pred, a)
            mmd = common.mmd_loss(latents, z0_pred, across_processes=args.mmd_batch == "global")
        else:
            mmd = common.mmd_loss_release(pred, noise, w)
    loss = diffusion + args.mmd_weight * mmd
    return loss, {"loss": loss.detach(), "diffusion": diffusion.detach(), "mmd": mmd.detach()}


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: accelerate state (optimizer, RNG) + only the trainable weights, written to a temp dir then renamed.


def register_checkpoint_hooks(accelerator):
    def save_hook(models, weights, output_dir):
        for model in models:
            model = accelerator.unwrap_model(model)
            if accelerator.is_main_process:
                if isinstance(model, UNet2DConditionModel):
                    save_file(get_peft_model_state_dict(model), os.path.join(output_dir, "lora_peft.safetensors"))
                else:
                    save_file(model.state_dict(), os.path.join(output_dir, "vg_projection.safetensors"))
            if weights:
                weights.pop()  # the frozen UNet is not saved: only the adapters above

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            if isinstance(model, UNet2DConditionModel):
                set_peft_model_state_dict(model, load_file(os.path.join(input_dir, "lora_peft.safetensors")))
            else:
                model.load_state_dict(load_file(os.path.join(input_dir, "vg_projection.safetensors")))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------------------------------------------------


def resolve_args(args):
    if args.mmd_weight is None:
        args.mmd_weight = MMD_WEIGHTS[args.mmd_form]
    args.mixed_precision = common.resolve_mixed_precision(args.mixed_precision, AUTOCAST_ON_GPU)
    if args.mmd_form == "release" and args.mmd_batch == "global":
        raise ValueError("--mmd-batch global is for the paper form: the release's term is a per-GPU batch sum")
    if args.mmd_form == "release" and args.mmd_weight > 0 and args.snr_gamma <= 0:
        raise ValueError("--mmd-form release weights residuals by min-SNR: it needs --snr-gamma > 0 (release: 5)")
    return args


def check_inputs(args) -> None:
    """The pretrained pipeline and the image encoder exist (read their configs only)."""
    layout = "an SD 1.x pipeline (diffusers layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/, ...)"
    common.check_pretrained(DiffusionPipeline.load_config, args.pretrained_model, args.revision, layout)
    if args.vg_mode != "none":
        common.check_pretrained(AutoConfig.from_pretrained, args.vg_encoder, None, "the CLIP image encoder")


def load_training_set(args):
    index = common.load_dataset(args.dataset, args.data_root, "train")
    if args.subset_mask:
        index = index.subset(common.load_subset_mask(args.subset_mask, len(index)))
    index, args.skipped_bad, args.train_fingerprint = common.check_images(index, args.skip_bad)
    if not len(index):
        raise ValueError(f"no training images in {args.dataset} at {args.data_root} (after --subset-mask)")
    captions = common.captions_for(index, common.load_captions(args.captions), args.allow_missing_captions)
    prompts = [common.build_prompt(index.class_names[s.label], c) for s, c in zip(index.samples, captions)]
    return index, prompts


def prepare_visual_guidance(index, args, accelerator, run: common.RunDir, unet) -> VisualGuidance:
    """Embeddings computed once by the main process (saved, so a resumed run reuses the same tokens)."""
    if args.vg_mode == "none":
        return VisualGuidance(None, None, {"mode": "none", "placement": args.vg_placement, "classes": index.classes})
    path, info_path = run.path / "vg_embeddings.safetensors", run.path / "vg_embeddings.json"
    if accelerator.is_main_process and not path.is_file():
        embeds, info = visual_guidance(index, args, accelerator.device)
        run.check_in_place()
        common.write_json(info_path, info)
        with common.atomic_path(path) as tmp:
            save_file({"embeds": embeds.contiguous()}, str(tmp))
    accelerator.wait_for_everyone()
    embeds, info = load_file(str(path))["embeds"], common.read_json(info_path)
    info.pop("sampled_paths", None)  # kept in vg_embeddings.json; the contract file stays small
    projection, width = None, unet.config.cross_attention_dim
    if embeds.shape[-1] != width:  # paper §3.2: a trainable projection when the widths differ (README, Finetuning)
        projection = torch.nn.Linear(embeds.shape[-1], width).to(accelerator.device)
    return VisualGuidance(embeds.to(accelerator.device), projection, info)


def run_config(args, world_size: int) -> dict:
    """The config that identifies the run (bookkeeping flags left out)."""
    # train_fingerprint (set by load_training_set) stays in: a changed training split is a mismatch, not a resume.
    config = common.config_dict(args, exclude=("skipped_bad",))  # in the manifest instead
    if args.captions:  # their contents, not their path: edited captions are other prompts
        config["captions_hash"] = common.fingerprint(args.captions)
    config["world_size"] = world_size  # the per-process batch defines the MMD batch
    # Options added later are left out at their defaults, so runs made before them keep their config.
    for key, default in (("gradient_accumulation_steps", 1), ("mmd_batch", "process")):
        if config[key] == default:
            del config[key]
    return config


def train(
    accelerator, args, index, models: SDModels, data: TrainingData, opt: Optimization, run: common.RunDir
) -> dict:
    """Optimizer steps opt.start..opt.total, each of --gradient-accumulation-steps micro-batches; a checkpoint every
    --checkpointing-steps and one metrics.jsonl row per epoch. Returns what the final metrics need."""
    optimizer, step, total = opt.optimizer, opt.start, opt.total
    world, rank, accum = accelerator.num_processes, accelerator.process_index, args.gradient_accumulation_steps
    micro_per_epoch = len(epoch_batches(len(index), args.train_batch_size, world, rank, args.seed, 0))
    trained = models.trained
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    bar = common.progress(total=total, initial=step, is_main=accelerator.is_main_process, desc="finetune")
    t0, seen, history, micro = time.time(), 0, list(opt.history), step * accum

    def save_checkpoint() -> None:  # with the loss logs the next epoch row and the final loss read
        common.save_checkpoint(
            accelerator, run, step, args.checkpoints_total_limit, {"history": history[-micro_per_epoch:]}
        )

    def write_epoch_row(epoch: int, micro_batches: int) -> None:  # the mean logs of the epoch's micro-batches
        if accelerator.is_main_process:
            run.check_in_place()  # before the epoch's row, as before every output
            recent = history[-micro_batches:]
            row = {"epoch": epoch, "step": step, **{k: float(np.mean([h[k] for h in recent])) for k in recent[0]}}
            # Fewer than the epoch's only after a resume from a checkpoint saved without its loss logs (an older one).
            row["micro_batches"] = len(recent)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    metrics_path = run.path / "metrics.jsonl"
    if accelerator.is_main_process and metrics_path.is_file():  # rows after the resumed checkpoint: rewritten below
        common.write_jsonl(metrics_path, [row for row in common.read_jsonl(metrics_path) if row["step"] <= step])
    while step < total:
        epoch, skip = divmod(micro, micro_per_epoch)
        batches = epoch_batches(len(index), args.train_batch_size, world, rank, args.seed, epoch)[skip:]
        batches = batches[: total * accum - micro]
        loader = torch.utils.data.DataLoader(
            TrainImages(index, args, epoch, data.cache is not None),
            batch_sampler=batches,
            num_workers=args.workers,
            collate_fn=collate,
        )
        for n_batch, batch in enumerate(loader, 1):
            # Per-micro-batch noise from (seed, micro-batch, rank): a resumed run draws what an uninterrupted one would.
            gen = torch.Generator(accelerator.device).manual_seed(
                common.item_seed(args.seed, "finetune-step", micro, rank)
            )
            with accelerator.accumulate(*trained):  # the prepared optimizer steps only on the accum-th micro-batch
                with accelerator.autocast():
                    loss, logs = training_step(batch, models, data, args, gen)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro, seen = micro + 1, seen + len(batch[0]) * world
            history.append({k: v.item() for k, v in accelerator.reduce(logs, reduction="mean").items()})
            if accelerator.sync_gradients:
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if n_batch == len(batches):  # the row before the checkpoint: a kill between them loses no row
                write_epoch_row(epoch, skip + len(batches))
            if accelerator.sync_gradients and (step % args.checkpointing_steps == 0 or step == total):
                save_checkpoint()
        history = history[-micro_per_epoch:]  # what the next row and the final loss read: bounded, as is extra.json
    bar.close()
    last = history[-micro_per_epoch:]
    return {
        "steps": step,
        "micro_batches": micro,
        "epochs": math.ceil(micro / micro_per_epoch),
        "samples_per_s": seen / (time.time() - t0) if seen else None,
        "final_loss": float(np.mean([h["loss"] for h in last])) if last else None,
        "final_mmd": float(np.mean([h["mmd"] for h in last])) if last else None,
    }


def prepare_training(accelerator, args, models: SDModels, n_images: int, run: common.RunDir, log) -> Optimization:
    """AdamW over the LoRA (and projection) weights, prepared with them by accelerate, and the step count: a step is
    `accum` micro-batches; the latest checkpoint is loaded unless --resume never."""
    params = [p for m in models.trained for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    models.unet, optimizer = accelerator.prepare(models.unet, optimizer)
    if models.projection is not None:
        models.projection = accelerator.prepare(models.projection)
    register_checkpoint_hooks(accelerator)
    world, rank, accum = accelerator.num_processes, accelerator.process_index, args.gradient_accumulation_steps
    micro_per_epoch = len(epoch_batches(n_images, args.train_batch_size, world, rank, args.seed, 0))
    total = args.max_train_steps or math.ceil(micro_per_epoch * args.num_train_epochs / accum)
    latest, step = common.starting_checkpoint(run, args.resume)
    if latest is not None:
        accelerator.load_state(str(latest))
        log.info(f"resumed from {latest} (step {step})")
    # Restored, the loss logs make the resumed epoch's row and the final loss those of an uninterrupted run.
    history = common.read_json(latest / "extra.json")["history"] if latest and (latest / "extra.json").is_file() else []
    return Optimization(optimizer, sum(p.numel() for p in params), total, step, history)


def finish(run, accelerator, args, models: SDModels, guidance: VisualGuidance, source_images, metrics: dict) -> None:
    """The LoRA in the diffusers format, the visual tokens in the UNet width (what synthesis must use) and the
    manifest (main process)."""
    out_dir, unet = run.path, accelerator.unwrap_model(models.unet)
    run.check_in_place()
    projection = accelerator.unwrap_model(models.projection) if models.projection is not None else None
    tmp = out_dir / ".tmp-lora"
    shutil.rmtree(tmp, ignore_errors=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
    common.make_readable(tmp)
    os.replace(tmp / "pytorch_lora_weights.safetensors", out_dir / "pytorch_lora_weights.safetensors")
    shutil.rmtree(tmp)
    if guidance.embeds is not None:
        with torch.no_grad():
            tokens = projection(guidance.embeds) if projection is not None else guidance.embeds
        with common.atomic_path(out_dir / "visual_guidance.safetensors") as path:
            save_file({"tokens": tokens.float().contiguous().cpu()}, str(path))
        if projection is not None:
            with common.atomic_path(out_dir / "vg_projection.safetensors") as path:
                save_file({k: v.contiguous().cpu() for k, v in projection.state_dict().items()}, str(path))
    common.write_json(out_dir / "visual_guidance.json", {**guidance.info, "projection": projection is not None})
    inputs = {
        "pretrained_model": common.fingerprint(args.pretrained_model, args.revision),
        "captions": common.fingerprint(args.captions),
        "subset_mask": common.fingerprint(args.subset_mask),
        "skipped_bad": args.skipped_bad,
        "source_images": source_images,
        "vg_encoder": common.fingerprint(args.vg_encoder) if args.vg_mode != "none" else None,
        "lora": common.hash_file(out_dir / "pytorch_lora_weights.safetensors"),
    }
    run.finish(metrics, inputs=inputs)


def main(argv=None) -> dict:
    args = resolve_args(common.parse_args(get_parser(), argv, "finetune"))

    # cpu=True without CUDA: several CPU processes under torchrun then form one gloo group (else each trains alone).
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    out_dir = common.output_dir(args, "finetune")
    index, prompts = load_training_set(args)
    check_inputs(args)
    config = run_config(args, accelerator.num_processes)
    run = common.RunDir(out_dir, config, overwrite=args.overwrite, is_main=accelerator.is_main_process)
    if run.begin(accelerator.wait_for_everyone) == "done":
        return run.manifest()["metrics"]
    log = common.get_logger(out_dir, accelerator.is_main_process)
    if torch.cuda.is_available():  # both ways: PyTorch's default leaves cuDNN convolutions in TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32
    common.seed_everything(args.seed)  # LoRA and projection init

    weight_dtype = common.resolve_dtype(accelerator.mixed_precision, accelerator.device)
    models = load_components(args, accelerator.device, weight_dtype)
    crop = "centre-cropped (--cache-latents)" if args.cache_latents else "randomly cropped (seeded per image and epoch)"
    source_images = common.describe_images(index, args.resolution, crop)
    common.note_unusual_images(source_images, args.resolution, log)
    if fragmented := common.fragmented_class_names(models.tokenizer, index.class_names):
        log.warning(f"the generator's tokenizer has no whole word for these class names: {fragmented}")
    guidance = prepare_visual_guidance(index, args, accelerator, run, models.unet)
    models.projection = guidance.projection
    cache = build_cache(index, prompts, models, args, accelerator, run) if args.cache_latents else None

    opt = prepare_training(accelerator, args, models, len(index), run, log)
    log.info(
        f"{len(index)} images, {len(index.classes)} classes, {accelerator.num_processes} process(es) x batch "
        f"{args.train_batch_size} x {args.gradient_accumulation_steps} accumulated, {opt.total} steps, {opt.trainable} "
        f"trainable parameters, vg={args.vg_mode}, mmd={args.mmd_form} λ={args.mmd_weight}"
    )
    data = TrainingData(prompts, [s.label for s in index.samples], guidance.embeds, cache)
    stats = train(accelerator, args, index, models, data, opt, run)
    accelerator.wait_for_everyone()
    metrics = {**stats, "train_images": len(index), "trainable_params": opt.trainable}
    if accelerator.is_main_process:
        finish(run, accelerator, args, models, guidance, source_images, metrics)
        log.info(f"wrote {run.path}: {metrics}")
    accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    main()
