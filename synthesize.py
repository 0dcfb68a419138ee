"""Synthesize a training set with the latent prior (paper §3.3, App. E Tab. 6): img2img from every real image.

Each real training image is resized (aspect-preserving, center crop), VAE-encoded and partly noised (`--strength`);
Stable Diffusion 1.5 with the finetuned LoRA fused in then denoises it with UniPC and classifier-free guidance,
conditioned on "photo of {class}, {caption}" plus the class visual-guidance token (conditional branch only).
`--scale N` makes N outputs per real image; output k of source s has seed item_seed(seed, s, k), so any image can be
regenerated alone and which images the set holds does not depend on GPU count, batch size or order (their pixels
are equal up to float rounding; README, Synthesis).

Inputs:  --dataset/--data-root (the real train split), --pretrained-model (hub id or diffusers dir), --lora-dir (a
         finetune.py output: pytorch_lora_weights.safetensors + visual_guidance.{safetensors,json}), --captions.
Outputs: <output-dir>/<class id>/<source stem>_<k>.jpg (--output-format wds: shards/NNNNNN.tar + .json index
         instead), classes.json, manifest.jsonl (one row per image), bad_sources.<job>-r<process>.json (the sources
         --skip-bad skipped), run_config.json, log.txt, manifest.json (written last, when every image of every shard
         is on disk).

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

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from diffusers import StableDiffusionImg2ImgPipeline, UniPCMultistepScheduler
from PIL import Image
from safetensors.torch import load_file

import common

SD_LAYOUT = "a Stable Diffusion pipeline (diffusers layout: model_index.json, unet/, vae/, text_encoder/, ...)"


def auto_on_off(value) -> str:
    """auto / on / off; YAML's booleans (`compile: true`, and `on`/`off`, which YAML reads as booleans) map too."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return {"true": "on", "false": "off"}.get(str(value).lower(), str(value).lower())


def none_or_path(value: str) -> str | None:
    return None if value in ("", "none") else value


def get_parser() -> common.StageParser:
    p = common.StageParser(__doc__)
    seed_help = "image seeds derive from it"
    common.add_run_options(p, "synth_x<scale>", seed_help=seed_help, data_fingerprinted=True)
    a = p.group("sources").add_argument
    a("--split", default="train", help="the real split whose images are the latent priors")
    a("--subset-mask", default=None, help=".npy bool array over the train split (LiRA shadows)")
    a = (generator := p.group("generator (paper App. E Tab. 6; the LoRA scale from the release)")).add_argument
    a("--pretrained-model", default=common.PAPER_SD, help="hub id or diffusers dir")
    a("--revision", default=None, help="hub revision of --pretrained-model")
    lora_help = "finetune.py output; none: the plain model (ablation); its files' hash is the identity, not the path"
    a("--lora-dir", default=None, type=none_or_path, help=lora_help)
    p.not_hashed("lora_dir")
    a("--lora-scale", type=float, default=0.5, help="release: cross_attention_scale 0.5 (fused)")
    a("--vg-mode", choices=("auto", "none"), default="auto", help="auto: --lora-dir's visual tokens; none: text only")
    a("--steps", type=int, default=30, help="UniPC steps (paper: 30; with strength 0.75, 22 run)")
    a("--strength", type=float, default=0.75, help="latent-prior noise level (paper: 0.75); 1.0 = text-to-image")
    a("--guidance-scale", type=float, default=2.0, help="CFG scale (paper: 2.0)")
    a("--resolution", type=int, default=512, help="paper: 512")
    common.add_dtype(generator)
    a = p.group("prompts (paper §3.2; common.build_prompt / negative_prompt)").add_argument
    a("--captions", default=None, help="captions.jsonl from caption.py (ImageNet sets); its hash is the identity")
    p.not_hashed("captions")
    a("--allow-missing-captions", action="store_true", help="prompt uncaptioned images without one")
    a("--prompt-style", choices=common.PROMPT_STYLES, default="paper", help="release: ', best quality', 2 negatives")
    a = p.group("output set (README: Synthesis, Storage)").add_argument
    a("--scale", type=float, default=1.0, help="outputs per real image; fractional: a seeded subset gets one more")
    a("--output-format", choices=("folder", "wds"), default="folder", help="files in class folders, or tar shards")
    a("--shard-samples", type=common.positive_int, default=5000, help="wds: images per shard (~0.5 GB at 512 px q95)")
    a("--image-format", choices=("jpg", "png"), default="jpg", help="file format of the stored images")
    a("--jpeg-quality", type=int, default=95, help="release: PIL's default 75")
    a("--save-size", type=common.positive_int, default=None, help="store at this short side (256 for 224 px crops)")
    a("--output-mode", choices=("source", "RGB"), default="source", help="source: grayscale sources, grayscale out")
    a = p.speed_group("re-runs and checks (not part of the run's identity)").add_argument
    a("--verify-existing", choices=("quick", "full"), default="quick", help="re-run check: file trailer, or decode")
    a("--reuse-from", nargs="*", default=[], metavar="DIR", help="runs of this config at another scale or format")
    a("--plan", action="store_true", help="print images, files, TB and GPU-hours of the chain, and exit")
    common.add_skip_bad(p, "the manifest (no output is made from them)")
    a = p.speed_group().add_argument  # never change an image beyond float noise
    a("--batch-size", type=common.positive_int, default=32, help="images per pipeline call, classes mixed")
    a("--decode-batch", type=common.positive_int, default=16, help="VAE encode/decode chunk (bounds memory)")
    a("--write-workers", type=int, default=4, help="threads encoding and writing outputs")
    a("--compile", nargs="?", const="on", default="auto", choices=("auto", "on", "off"), type=auto_on_off, help=COMPILE)
    a("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile's mode (only default measured)")
    a("--shard", type=common.parse_shard, default="0/1", help="i/n: this job's part (job arrays)")
    return p


# auto = GPU only: on the demo's CPU model compiling gains ~1.3x at steady state but takes ~100 s, more than the
# demo's whole synthesis.
COMPILE = "torch.compile UNet + VAE; auto = on a GPU only (H100: 6.1 -> 8.4 img/s; README Benchmarks)"
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


# ----------------------------------------------------------------------------------------------------------------------
# The plan: which images exist is a pure function of the dataset, the seed and the scale.


def copy_counts(n: int, scale: float) -> tuple[int, int]:
    """(copies of every source, sources that get one more) for --scale over n sources: an exact count, so x2.5 is two
    copies each and a third for round(0.5·n) of them."""
    full = math.floor(scale)
    return int(full), round((scale - full) * n)


class Plan:
    """Every output image as a job id j = k·n + s (copy k of source s), copy-major so a stopped run holds whole
    copies; prompts, seeds, visual tokens (with their `placement` in the prompt) and file names are computed from
    (s, k) on demand. `model_hash` and `lora_hash`, the weights every manifest row names, are set when the run
    begins (a finished run never hashes a local model's files)."""

    def __init__(self, args, index, captions, tokens, placement: str = "append"):
        self.args, self.index, self.tokens, self.placement = args, index, tokens, placement
        self.model_hash: str | None = None
        self.lora_hash: str | None = None
        n = len(index)
        self.prompts = [
            common.build_prompt(index.class_names[smp.label], cap, args.prompt_style)
            for smp, cap in zip(index.samples, captions)
        ]
        full, more = copy_counts(n, args.scale)
        # The extra copies go to the sources with the smallest seeded hash.
        by_hash = sorted(range(n), key=lambda s: common.item_seed(args.seed, "extra-copy", index.image_id(s)))
        extra = np.array(sorted(by_hash[:more]), dtype=np.int64)
        self.jobs = np.concatenate([np.arange(full * n, dtype=np.int64), full * n + extra])
        self.stems = [Path(smp.path).stem for smp in index.samples]
        self.refuse_collisions(self.stems, "share a file stem: their outputs <class>/<stem>_<k> would collide")
        if args.output_format == "wds":
            keys = [stem.replace(".", "_") for stem in self.stems]
            self.refuse_collisions(keys, "differ only by '.' vs '_': their shard keys would collide")

    def refuse_collisions(self, stems: list[str], problem: str) -> None:
        """An error naming the source images of one class whose output names (from `stems`) would be the same."""
        by_name: dict[tuple, list[str]] = {}
        for smp, stem in zip(self.index.samples, stems):
            by_name.setdefault((smp.label, stem), []).append(smp.path)
        if clashes := [paths for paths in by_name.values() if len(paths) > 1]:
            raise ValueError(f"source images of one class {problem}; rename them: {clashes[:5]}")

    def shards(self) -> list[np.ndarray]:
        """--output-format wds: the jobs of each tar shard, in stored order. A seeded permutation of all jobs cut into
        --shard-samples pieces: every shard mixes classes and copies (so a streaming reader's shuffle buffer needs
        no more), and shard b holds the same images whatever the number of processes or jobs."""
        order = np.random.default_rng(common.item_seed(self.args.seed, "shard-order")).permutation(self.jobs)
        size = self.args.shard_samples
        return [order[i : i + size] for i in range(0, len(order), size)]

    def key(self, job: int) -> str:
        """A sample's WebDataset key: its folder-layout name without the extension. A key ends at the first dot of
        its base name, so dots in a source's stem become '_' (a collision is an error when the plan is built)."""
        s, k = self.source_copy(job)
        return f"{self.index.classes[self.index.samples[s].label]}/{self.stems[s].replace('.', '_')}_{k}"

    def source_copy(self, job: int) -> tuple[int, int]:
        n = len(self.index)
        return int(job) % n, int(job) // n

    def seed(self, job: int) -> int:
        s, k = self.source_copy(job)
        return common.item_seed(self.args.seed, self.index.image_id(s), k)

    def conditions(self, jobs) -> tuple[list[str], torch.Tensor | None]:
        """The prompts and visual tokens (None without them) of a batch of jobs."""
        rows = [self.source_copy(j)[0] for j in jobs]
        tokens = self.tokens[torch.tensor(rows)] if self.tokens is not None else None
        return [self.prompts[s] for s in rows], tokens

    def file(self, job: int) -> str:
        s, k = self.source_copy(job)
        return f"{self.index.classes[self.index.samples[s].label]}/{self.stems[s]}_{k}.{self.args.image_format}"

    def row(self, job: int) -> dict:
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
            "model_hash": self.model_hash,
            "lora_hash": self.lora_hash,
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
    meta = common.read_json(meta_path)
    if meta["mode"] == "none":
        return None, meta.get("placement", "append")

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


def load_pipeline(args, device, dtype, fuse: bool = True):
    """SD img2img + UniPC + the LoRA, fused unless `fuse=False` (the benchmark's baseline, as the release)."""
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
        cond = common.add_visual_tokens(cond, tokens.to(device), placement)
    if cond.shape[1] > neg.shape[1]:
        neg = torch.nn.functional.pad(neg, (0, 0, 0, cond.shape[1] - neg.shape[1]))
    return cond, neg.contiguous()


@torch.no_grad()
def generate(pipe, plan: Plan, jobs, pixels, device) -> torch.Tensor:
    """One pipeline call for a batch of jobs of mixed classes -> uint8 images [B, H, W, 3], still on `device`.

    Seeded CPU generators make the initial noise identical on any hardware and in any batch; the latent prior is
    encoded here in chunks (the pipeline would encode one image at a time) and handed to the pipeline as latents.
    """
    args, seeds = plan.args, [plan.seed(j) for j in jobs]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    vae, chunk = pipe.vae, args.decode_batch
    if args.strength >= 1.0:  # text-to-image: no latent prior, the start is pure seeded noise
        size = args.resolution // pipe.vae_scale_factor
        init = torch.zeros(len(seeds), vae.config.latent_channels, size, size, device=device, dtype=pipe.unet.dtype)
    else:
        init = torch.cat(
            [
                common.encode_latent_prior(vae, pixels[i : i + chunk], generators[i : i + chunk])
                for i in range(0, len(seeds), chunk)
            ]
        )
    prompts, tokens = plan.conditions(jobs)
    cond, neg = condition(pipe, prompts, tokens, plan.placement, common.negative_prompt(args.prompt_style), device)
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


def encode_when_ready(
    ready, image: torch.Tensor, fmt: str, mode: str = "RGB", save_size: int | None = None, **save_kwargs
) -> bytes:
    """One generated image as the bytes of its file (JPEG or PNG): the same bytes for a folder and a shard."""
    if ready is not None:
        ready.synchronize()
    img = Image.fromarray(image.numpy()).convert(mode)
    if save_size and min(img.size) > save_size:  # stored smaller than generated: the classifier reads 224 px
        scale = save_size / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "png": "PNG"}[fmt], **save_kwargs)
    return buf.getvalue()


def write_bytes(path: Path, data: bytes) -> None:
    with common.atomic_write(path, "wb") as f:
        f.write(data)


def never_moved() -> None:
    """A sink's check before each write outside a run (bench.py): there is no run directory to lose."""


class FolderSink:
    """--output-format folder: each image to <class>/<stem>_<k>.<ext>, encoded and written by a writer thread;
    `in_place` (RunDir.check_in_place) runs before each write."""

    def __init__(self, plan: Plan, out_dir: Path, in_place=never_moved):
        self.plan, self.out_dir, self.in_place = plan, out_dir, in_place

    def submit(self, writer, job: int, ready, image, save_kwargs: dict):
        return writer.submit(self._write, self.out_dir / self.plan.file(job), ready, image, save_kwargs)

    def _write(self, path: Path, ready, image, save_kwargs: dict) -> None:
        data = encode_when_ready(ready, image, self.plan.args.image_format, **save_kwargs)
        self.in_place()
        write_bytes(path, data)

    def skip(self, job: int, record: dict) -> None:
        pass  # recorded in the process's bad_sources file; a re-run reads the source again


class ShardSink:
    """--output-format wds: images are held per shard (writer threads encode them) and the shard is written, tar
    then index, as soon as its last image, or the bad source standing for one, comes in. Generation runs shard
    after shard, so about one shard is held in memory per process. `in_place` runs before each shard is written."""

    def __init__(self, plan: Plan, out_dir: Path, shard_jobs: dict, in_place=never_moved):
        self.plan, self.out_dir, self.shard_jobs, self.in_place = plan, out_dir, shard_jobs, in_place
        self.shard_of = {int(j): b for b, jobs in shard_jobs.items() for j in jobs}
        self.held = {b: {} for b in shard_jobs}
        self.skipped = {b: [] for b in shard_jobs}

    def submit(self, writer, job: int, ready, image, save_kwargs: dict):
        future = writer.submit(encode_when_ready, ready, image, self.plan.args.image_format, **save_kwargs)
        self.put(job, future.result)
        return future

    def put(self, job: int, read_bytes) -> None:
        """`read_bytes`: a callable giving the image's bytes when the shard is written (None: a bad source)."""
        b = self.shard_of[job]
        self.held[b][job] = read_bytes
        if len(self.held[b]) == len(self.shard_jobs[b]):
            held = self.held.pop(b)
            samples = [(j, held[j]) for j in map(int, self.shard_jobs[b]) if held[j] is not None]
            self.in_place()
            write_shard(self.out_dir, b, self.plan, samples, self.skipped.pop(b))

    def skip(self, job: int, record: dict) -> None:
        """A bad source's job: recorded in its shard's index, as a complete shard is never read again."""
        self.skipped[self.shard_of[job]].append(record)
        self.put(job, None)


def shard_name(b: int) -> str:
    return f"shards/{b:06d}.tar"


def write_shard(out_dir: Path, b: int, plan: Plan, samples, bad: list[dict]) -> None:
    """Shard b as a WebDataset tar (per sample: <key>.<ext>, <key>.cls with the label, <key>.json with the manifest
    row), then its index (each image's offset and size in the tar, and the `bad` sources its missing images stand
    for): the index, written last, marks it complete."""
    ext, rows = plan.args.image_format, []
    (out_dir / shard_index_name(b)).unlink(missing_ok=True)  # a stale index never vouches for a new tar
    with common.atomic_write(out_dir / shard_name(b), "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for job, read_bytes in samples:
                image = read_bytes()
                row = plan.row(job)
                key = plan.key(job)
                meta = json.dumps(row, sort_keys=True).encode()
                for suffix, payload in ((ext, image), ("cls", str(row["label"]).encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mode = len(payload), 0o644
                    tar.addfile(info, io.BytesIO(payload))
                    if suffix == ext:  # the data of a member ends where tar.offset is now, padded to 512 bytes
                        offset = tar.offset - -(-len(payload) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                rows.append({**row, "shard": shard_name(b), "key": key, "offset": offset, "size": len(image)})
        size = f.tell()
    index = {"shard": shard_name(b), "bytes": size, "samples": rows, "bad_sources": bad}
    common.write_json(out_dir / shard_index_name(b), index)


def shard_index_name(b: int) -> str:
    return f"shards/{b:06d}.json"


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
            return i, common.load_init_image(self.paths[i], self.size), ""
        except common.ImageReadError as err:
            return i, torch.zeros(3, self.size, self.size), str(err)


def complete_on_disk(path: Path, mode: str) -> bool:
    """An image written by this script is complete: atomic writes leave either nothing or a whole file. The quick
    check (header and end marker) still catches truncation and garbage without decoding 12.8 M images on a re-run."""
    return common.image_problem(path, full_decode=mode == "full") is None


def existing_files(out_dir: Path, classes) -> set[str]:
    """Relative paths of the non-hidden files in the class folders (one listing per class, not a stat per image)."""
    found = set()
    for c in classes:
        with contextlib.suppress(FileNotFoundError), os.scandir(out_dir / c) as it:
            found.update(f"{c}/{e.name}" for e in it if not e.name.startswith("."))
    return found


# Config keys that change how a set is stored or how many images it has, never an image.
LAYOUT_KEYS = ("scale", "output_format", "shard_samples")


def same_images(config: dict, other_dir: Path) -> bool:
    """Another output dir whose images equal ours for equal (source, copy): same config but for LAYOUT_KEYS."""
    for name in ("manifest.json", "run_config.json"):
        if (other_dir / name).is_file():
            theirs = common.read_json(other_dir / name)["config"]
            ours = {k: v for k, v in config.items() if k not in LAYOUT_KEYS}
            return {k: v for k, v in theirs.items() if k not in LAYOUT_KEYS} == ours
    return False


def complete_shard_index(out_dir: Path, b: int, mode: str) -> dict | None:
    """Shard b's index if the shard is on disk whole: its index (written after the tar) exists and the tar has the
    size it records; `full` also decodes every image. None if not."""
    try:
        index = common.read_json(out_dir / shard_index_name(b))
        if (out_dir / shard_name(b)).stat().st_size != index["bytes"]:
            return None
    except (OSError, ValueError, KeyError):
        return None
    if mode == "full":
        try:
            for r in index["samples"]:
                common.load_image(common.ShardMember(out_dir / r["shard"], r["offset"], r["size"], r["file"]))
        except common.ImageReadError:
            return None
    return index


def stored_images(run_dir: Path, classes) -> dict:
    """A synthesize.py output's images (files, or members of complete shards) by folder-layout name."""
    if not (run_dir / "shards").is_dir():
        return {name: run_dir / name for name in existing_files(run_dir, classes)}
    found = {}
    for index_file in sorted((run_dir / "shards").glob("*.json")):
        if (index := complete_shard_index(run_dir, int(index_file.stem), "quick")) is not None:
            for r in index["samples"]:
                found[r["file"]] = common.ShardMember(run_dir / r["shard"], r["offset"], r["size"], r["file"])
    return found


def reusable_images(plan: Plan, out_dir: Path, config: dict, dirs, log) -> dict:
    """Images that other runs of this config (another --scale or --output-format) already made, by name."""
    found = {}
    for other in (Path(d) for d in dirs):
        if other.resolve() == out_dir.resolve():
            continue
        if not same_images(config, other):
            log.warning(f"--reuse-from {other}: skipped (not a synthesize.py run whose images equal this config's)")
            continue
        for name, where in stored_images(other, plan.index.classes).items():
            found.setdefault(name, where)
    return found


def usable(where, mode: str) -> bool:
    return isinstance(where, common.ShardMember) or complete_on_disk(where, mode)


def reuse_into_folder(plan: Plan, jobs, out_dir: Path, found: dict, mode: str) -> int:
    """Hard-link (or copy, across file systems; or unpack, from shards) the images of `jobs` found elsewhere."""
    linked = 0
    present = existing_files(out_dir, plan.index.classes)
    for j in jobs:
        name = plan.file(j)
        where = found.get(name)
        if name in present or where is None or not usable(where, mode):
            continue
        if isinstance(where, common.ShardMember):
            write_bytes(out_dir / name, where.read_bytes())
        else:
            with common.atomic_path(out_dir / name) as tmp:
                tmp.unlink()
                try:
                    os.link(where, tmp)
                except OSError:
                    shutil.copyfile(where, tmp)
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


def run_loop(pipe, plan: Plan, jobs, out_dir: Path, device, is_main: bool = True, sink=None) -> dict:
    """Generate `jobs` into out_dir through `sink` (a FolderSink or ShardSink; default: files, unguarded): workers read
    sources while the model runs, a thread pool encodes and writes the results."""
    sink, args, index = sink or FolderSink(plan, out_dir), plan.args, plan.index
    paths = [index.abspath(plan.source_copy(j)[0]) for j in jobs]
    loader = torch.utils.data.DataLoader(
        Sources(paths, args.resolution, args.strength < 1.0),
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    save_kwargs = {"quality": args.jpeg_quality} if args.image_format == "jpg" else {}
    save_kwargs.update(mode=args.resolved_output_mode, save_size=args.save_size)
    bad, pending, done, start = [], [], 0, time.perf_counter()
    bar = common.progress(total=len(jobs), is_main=is_main, unit="img", desc="synthesize")
    with ThreadPoolExecutor(max(1, args.write_workers)) as writer:
        for idx, pixels, errors in loader:
            keep = [n for n, err in enumerate(errors) if not err]
            for n, err in enumerate(errors):
                if not err:
                    continue
                if not args.skip_bad:
                    raise common.ImageReadError(
                        f"{err} (fix or remove it, or pass --skip-bad, make: SKIP_BAD=1, to skip and count it)"
                    )
                job = jobs[int(idx[n])]
                bad.append({"source": index.samples[plan.source_copy(job)[0]].path, "error": err})
                sink.skip(job, bad[-1])
            batch = [jobs[int(idx[n])] for n in keep]
            if batch:
                pix = pixels if len(keep) == len(errors) else pixels[keep]  # keep pinned memory when all are good
                images, ready = to_host(generate(pipe, plan, batch, pix.to(device, non_blocking=True), device))
                for j, img in zip(batch, images):
                    pending.append(sink.submit(writer, j, ready, img, save_kwargs))
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


def bad_sources(out_dir: Path) -> dict[str, str]:
    """The unreadable sources every process of every shard skipped (--skip-bad), with their errors."""
    return {
        b["source"]: b["error"] for part in sorted(out_dir.glob("bad_sources.*.json")) for b in common.read_json(part)
    }


@dataclasses.dataclass
class StoredSet:
    """A synthetic set as it is on disk: manifest rows in plan order, layout metrics (wds: shards and bytes), and the
    bad sources (--skip-bad) that its missing images stand for."""

    rows: list[dict]
    layout: dict
    bad: dict[str, str]


def stored_set(plan: Plan, out_dir: Path) -> StoredSet | None:
    """The set, or None while an image (or a shard) is missing that no counted bad source explains. The bad sources
    are those the processes recorded and (wds) those the shard indexes hold: a complete shard is never read again."""
    bad = bad_sources(out_dir)
    if plan.args.output_format == "wds":
        indexes = []
        for b in range(len(plan.shards())):
            indexes.append(complete_shard_index(out_dir, b, "quick"))
            if indexes[-1] is None:
                return None
        bad |= {r["source"]: r["error"] for index in indexes for r in index.get("bad_sources", [])}
        stored = {r["file"]: r for index in indexes for r in index["samples"]}
        rows = [stored[name] for name in map(plan.file, plan.jobs) if name in stored]
        total = sum(index["bytes"] for index in indexes)
        layout = {"shards": len(indexes), "bytes": total, "bytes_per_image": round(total / max(1, len(rows)))}
        return StoredSet(rows, layout, bad)
    present = existing_files(out_dir, plan.index.classes)
    on_disk = [plan.file(j) in present for j in plan.jobs]  # one name per job (12.8 M at IN-1K x10), made once
    sources = plan.index.samples
    if any(not ok and sources[plan.source_copy(j)[0]].path not in bad for j, ok in zip(plan.jobs, on_disk)):
        return None
    return StoredSet([plan.row(j) for j, ok in zip(plan.jobs, on_disk) if ok], {}, bad)


def finalize(plan: Plan, out_dir: Path, run: common.RunDir, args) -> dict | None:
    """Write manifest.jsonl + manifest.json once every image of every shard is on disk (or a counted bad source)."""
    run.check_in_place()
    stored = stored_set(plan, out_dir)
    if stored is None:
        return None
    with run.exclusively():  # jobs of an array completing the set at once: one writes it
        if run.manifest_path.is_file():
            return run.manifest()["metrics"]
        return write_stored_set(plan, out_dir, run, args, stored)


def write_stored_set(plan: Plan, out_dir: Path, run: common.RunDir, args, stored: StoredSet) -> dict:
    """finalize's writes, by the one job that completes the set."""
    # Temp files of killed writers (no writer is left once all images exist, and no other job finalizes now): of
    # this step's own files (manifest.jsonl: GBs at IN-1K x10), in each class folder (a class id with a '/', as in
    # Stanford Cars' "Ram C/V ...", is a nested one) and among the shards.
    stale = [p for name in ("classes.json", "manifest.jsonl", "manifest.json") for p in out_dir.glob(f".{name}.*")]
    for folder in {out_dir / "shards", *(out_dir / c for c in plan.index.classes)}:
        stale += folder.glob(".*")
    for path in stale:
        path.unlink(missing_ok=True)
    common.write_json(out_dir / "classes.json", {"classes": plan.index.classes, "class_names": plan.index.class_names})
    common.write_jsonl(out_dir / "manifest.jsonl", stored.rows)
    metrics = {
        "images": len(stored.rows),
        "sources": len(plan.index),
        "scale": args.scale,
        "bad_sources": len(stored.bad),
        "bad_images": len(plan.jobs) - len(stored.rows),
        "source_images": args.source_images,
        "output_mode": args.resolved_output_mode,
        "stored_short_side": args.save_size or args.resolution,
        "output_format": args.output_format,
        **stored.layout,
    }
    inputs = {
        "pretrained_model": plan.model_hash,
        "lora": plan.lora_hash,
        "lora_dir": args.lora_dir,
        "data_root": args.data_root,
        "bad_sources": stored.bad,
    }
    run.finish(metrics, inputs=inputs)
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
    return "-".join(common.hash_file(f)[:8] for f in files if f.is_file())


def prepare(args):
    """Dataset, captions, tokens and plan, shared by the run and the benchmark."""
    if not (args.scale > 0 and math.isfinite(args.scale)):
        raise ValueError(f"--scale must be a finite number > 0 (outputs per real image), got {args.scale}")
    if missing := [d for d in args.reuse_from if not Path(d).is_dir()]:  # a typo would regenerate every image
        raise FileNotFoundError(f"--reuse-from {missing}: no such directory")
    index = common.load_dataset(args.dataset, args.data_root, args.split)
    if args.subset_mask:
        index = index.subset(common.load_subset_mask(args.subset_mask, len(index)))
    if len(index) == 0:
        raise ValueError(f"no images in {args.dataset} {args.split} under {args.data_root}")
    readable = index
    if args.strength < 1.0:  # the latent prior reads every source: all bad ones named now, not the first mid-run
        readable, _, args.source_fingerprint = common.check_images(index, skip_bad=args.skip_bad)
    else:
        args.source_fingerprint = common.split_fingerprint(index)
    # A bad source (--skip-bad) is never generated from, so it needs no caption: caption.py cannot read it either.
    found = common.captions_for(readable, common.load_captions(args.captions), args.allow_missing_captions)
    by_path = {smp.path: caption for smp, caption in zip(readable.samples, found)}
    captions = [by_path.get(smp.path) for smp in index.samples]
    tokens, placement = load_visual_tokens(args.lora_dir, index, args.vg_mode)
    args.source_images = common.describe_images(index, args.resolution)
    grayscale = args.output_mode == "source" and args.source_images["grayscale"]
    args.resolved_output_mode = "L" if grayscale else "RGB"
    return Plan(args, index, captions, tokens, placement)


def run_config(args, lora_hash: str | None) -> dict:
    """The run's identity: every option that changes an image or the set, with the LoRA's hash. Options added
    later enter only at non-default values, so older runs keep their hash."""
    derived = ("output_mode", "source_images", "resolved_output_mode")
    # source_fingerprint (set by prepare) stays in: a changed source split is a config mismatch, not a resume.
    config = {**common.config_dict(args, exclude=derived), "lora_hash": lora_hash}
    if args.captions:  # their contents, not their path: edited captions are other prompts
        config["captions_hash"] = common.fingerprint(args.captions)
    if args.resolved_output_mode != "RGB":
        config["output_mode"] = args.resolved_output_mode
    if config["save_size"] is None:
        del config["save_size"]
    if args.output_format == "folder":
        del config["output_format"], config["shard_samples"]
    return config


def whose(args, state) -> str:
    """'this process', naming its --shard job and process where there are several: a job array's jobs share one
    log.txt, and its lines must say which job is done and which has still to run."""
    (i, n), r, p = args.shard, state.process_index, state.num_processes
    parts = ([f"--shard {i}/{n}"] if n > 1 else []) + ([f"process {r} of {p}"] if p > 1 else [])
    return f"this process ({', '.join(parts)})" if parts else "this process"


def folder_work(plan: Plan, run: common.RunDir, found: dict, state, log) -> tuple[list[int], FolderSink]:
    """--output-format folder: this process's images missing on disk, after taking those found in other runs."""
    args, out_dir = plan.args, run.path
    mine = common.local_items(plan.jobs, args.shard, state.process_index, state.num_processes)
    if found:
        log.info(f"reused {reuse_into_folder(plan, mine, out_dir, found, args.verify_existing)} images")
    todo = todo_jobs(plan, mine, out_dir, args.verify_existing, args.write_workers)
    log.info(
        f"{len(plan.jobs)} images from {len(plan.index)} sources (x{args.scale:g}); {whose(args, state)}: {len(mine)}, "
        f"{len(mine) - len(todo)} already on disk, {len(todo)} to generate"
    )
    return todo, FolderSink(plan, out_dir, run.check_in_place)


def shard_work(plan: Plan, run: common.RunDir, found: dict, state, log) -> tuple[list[int], ShardSink]:
    """--output-format wds: this process's shards that are not complete on disk, their images found in other runs
    handed to the sink at once, and the jobs left to generate."""
    args, shards, out_dir = plan.args, plan.shards(), run.path
    mine = common.local_items(list(range(len(shards))), args.shard, state.process_index, state.num_processes)
    todo_shards = [b for b in mine if complete_shard_index(out_dir, b, args.verify_existing) is None]
    sink = ShardSink(plan, out_dir, {b: shards[b] for b in todo_shards}, run.check_in_place)
    todo, reused = [], 0
    for j in (int(j) for b in todo_shards for j in shards[b]):
        where = found.get(plan.file(j))
        if where is not None and usable(where, args.verify_existing):
            sink.put(j, where.read_bytes)
            reused += 1
        else:
            todo.append(j)
    log.info(
        f"{len(plan.jobs)} images from {len(plan.index)} sources (x{args.scale:g}) in {len(shards)} shards; "
        f"{whose(args, state)}: {len(mine)} shards, {len(mine) - len(todo_shards)} complete on disk, {reused} "
        f"images reused, {len(todo)} to generate"
    )
    return todo, sink


# ----------------------------------------------------------------------------------------------------------------------
# --plan: the chain's size and cost before it runs.

# Mean JPEG bytes of three photos (scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg) center-
# cropped to 512 px and resized as --save-size does: (short side, quality) -> bytes (README, Storage). Other sizes
# scale by pixel count from the nearest measured side at the nearest measured quality.
MEASURED_JPEG_BYTES = {
    (512, 95): 102_334,
    (512, 90): 71_806,
    (320, 95): 44_622,
    (320, 90): 30_861,
    (256, 95): 29_780,
    (256, 90): 20_704,
}
# Per-GPU throughput measured on an H100 80GB at the paper's settings (README, Benchmarks); a `make bench-gpu` run's
# benchmark.json on this machine replaces the synthesis and classifier figures.
H100_SYNTH_IMAGES_PER_S = 8.42  # 512 px, 30 UniPC steps x strength 0.75, CFG 2, batch 32, compiled
H100_FINETUNE_SAMPLES_PER_S = 26.3  # LoRA step, 512 px, batch 8, VAE encode on the fly
H100_RESNET50_IMAGES_PER_S = 3297  # 224 px, bf16, batch 256, 14 loader workers, the IN-1K augmentation
# Train-split sizes of datasets too big to list on a login node (used only when the split cannot be read here).
KNOWN_TRAIN_IMAGES = {"in1k": 1_281_167, "cub": 5_994, "cars": 8_144, "pets": 3_680}
# A shard's .cls and .json members and tar headers per image: 32.8 vs 29.3 kB/image at 256 px (README, Storage).
WDS_BYTES_PER_IMAGE = 3_500


def stored_bytes(side: int, quality: int, image_format: str) -> int:
    if image_format != "jpg":  # PNG of a photo: about 3x the q95 JPEG of the same pixels (not measured here)
        return 3 * stored_bytes(side, 95, "jpg")
    q = min({q for _, q in MEASURED_JPEG_BYTES}, key=lambda m: abs(m - quality))
    near = min({s for s, _ in MEASURED_JPEG_BYTES}, key=lambda m: abs(m - side))
    return round(MEASURED_JPEG_BYTES[(near, q)] * (side / near) ** 2)


def readable_bytes(size: float) -> str:
    """'0.43 TB', '33 kB', '1.6 kB': the unit in which the figure reads best (a demo's set is not '0.00 TB')."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if size >= scale / 10:
            return f"{size / scale:.2f} {unit}"
    return f"{size / 1e3:.2g} kB" if size < 1e4 else f"{size / 1e3:.0f} kB"


def measured_rate(runs_dir, bench: str, key: str, default: float) -> tuple[float, str]:
    """A GPU figure from a `make bench-gpu` benchmark.json when there is one, else the recorded H100 figure."""
    path = Path(runs_dir) / "demo" / bench / "benchmark.json"
    if path.is_file():
        result = common.read_json(path)
        if result.get("device", "cpu") != "cpu" and result.get(key):
            return float(result[key]), f"{path} ({result['device']})"
    return default, "H100 80GB, README Benchmarks"


def plan_sources(args) -> tuple[int, str]:
    """The number of source images the run reads, and where that number comes from: the split, or its known size
    where the split is not readable here; of those, a --subset-mask's selected images only, as the run reads."""
    try:
        n = len(common.load_dataset(args.dataset, args.data_root, args.split))
        where = f"{args.dataset} {args.split} split"
    except (OSError, ValueError) as err:
        if args.dataset not in KNOWN_TRAIN_IMAGES or args.split != "train":
            raise ValueError(f"--plan needs the source split to count its images: {err}") from err
        n = KNOWN_TRAIN_IMAGES[args.dataset]
        where = f"the {args.dataset} train split's size; the split is not readable here"
    if args.subset_mask:
        selected = sum(common.load_subset_mask(args.subset_mask, n))
        return selected, f"{where}, --subset-mask {args.subset_mask} keeps {selected:,} of {n:,}"
    return n, where


def print_plan(args) -> dict:
    """Images, files, bytes and GPU-hours of the chain this config describes; no model is loaded."""
    n, where = plan_sources(args)
    full, more = copy_counts(n, args.scale)
    images = full * n + more
    side = args.save_size or args.resolution
    per_image = stored_bytes(side, args.jpeg_quality, args.image_format)
    per_image += WDS_BYTES_PER_IMAGE if args.output_format == "wds" else 0
    files = math.ceil(images / args.shard_samples) * 2 if args.output_format == "wds" else images
    work = args.steps * min(1.0, args.strength) * (args.resolution / 512) ** 2 / (30 * 0.75)
    synth_rate, synth_src = measured_rate(
        args.runs_dir, "bench_synth_gpu", "ours_images_per_s", H100_SYNTH_IMAGES_PER_S
    )
    cls_rate, cls_src = measured_rate(args.runs_dir, "bench_train_gpu", "img_per_s", H100_RESNET50_IMAGES_PER_S)
    tune = common.load_yaml_section(args.config, "finetune")["merged"] if args.config else {}
    cls = common.load_yaml_section(args.config, "train_cls")["merged"] if args.config else {}
    stages = []
    if "num_train_epochs" in tune:
        note = f"{tune['num_train_epochs']} epochs x {n:,} images at {H100_FINETUNE_SAMPLES_PER_S} samples/s/GPU"
        stages.append(("finetune", tune["num_train_epochs"] * n / H100_FINETUNE_SAMPLES_PER_S, note))
    note = f"{images:,} images at {synth_rate:g} img/s/GPU ({synth_src})"
    stages.append(("synthesize", images * work / synth_rate, note))
    if "epochs" in cls:
        for mode, size in (("real", n), (f"synth_x{args.scale:g}", images), (f"mix_x{args.scale:g}", n + images)):
            note = f"{cls['epochs']} epochs x {size:,} images at {cls_rate:g} img/s/GPU ({cls_src})"
            stages.append((f"train_cls {mode}", cls["epochs"] * size / cls_rate, note))
    print(f"plan: {args.dataset} x{args.scale:g} ({n:,} sources: {where})")
    print(
        f"  synthetic set: {images:,} images, {args.output_format} ({files:,} files), short side {side} px, "
        f"{args.image_format} q{args.jpeg_quality}: about {readable_bytes(per_image)}/image, "
        f"{readable_bytes(images * per_image)}"
    )
    for name, seconds, note in stages:
        print(f"  {name:22s} {seconds / 3600:10,.0f} GPU-hours   {note}")
    total = sum(seconds for _, seconds, _ in stages)
    print(f"  {'total':22s} {total / 3600:10,.0f} GPU-hours   (captioning, evaluation and the gap stage not counted)")
    return {
        "images": images,
        "files": files,
        "bytes": images * per_image,
        "gpu_hours": {k: v / 3600 for k, v, _ in stages},
    }


def ready_pipeline(args, plan: Plan, device, log):
    """The pipeline as the loop runs it: loaded (LoRA fused), token mask installed, compiled where that pays."""
    pipe = load_pipeline(args, device, common.resolve_dtype(args.dtype, device))
    if fragmented := common.fragmented_class_names(pipe.tokenizer, plan.index.class_names):
        log.warning(f"the generator's tokenizer has no whole word for these class names: {fragmented}")
    install_token_mask(pipe, plan.placement, plan.tokens is not None)
    maybe_compile(pipe, args)
    return pipe


def maybe_compile(pipe, args) -> None:
    if args.compile == "on" or (args.compile == "auto" and pipe.device.type == "cuda"):
        mode = None if args.compile_mode == "default" else args.compile_mode
        pipe.unet = torch.compile(pipe.unet, mode=mode)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=mode)
        pipe.vae.encoder = torch.compile(pipe.vae.encoder, mode=mode)  # the latent prior; compiled lazily, if used


def main(argv=None) -> dict:
    args = common.parse_args(get_parser(), argv, "synthesize")
    if args.plan:
        return print_plan(args)

    state = PartialState(cpu=not torch.cuda.is_available())  # cpu: lets torchrun spread CPU processes
    out_dir = common.output_dir(args, f"synth_x{args.scale:g}")
    common.check_pretrained(StableDiffusionImg2ImgPipeline.load_config, args.pretrained_model, args.revision, SD_LAYOUT)
    lora_hash = lora_fingerprint(args.lora_dir)
    plan = prepare(args)
    config = run_config(args, lora_hash)
    run = common.RunDir(out_dir, config, args.overwrite, state.is_main_process, args.shard)
    status = run.begin(state.wait_for_everyone)
    log = common.get_logger(out_dir, state.is_main_process)
    if status == "done":
        return {**run.manifest()["metrics"], "complete": True, "generated": 0}
    common.note_unusual_images(args.source_images, args.resolution, log)
    if args.resolved_output_mode != "RGB":
        log.info("grayscale dataset: synthetic images are written in grayscale (--output-mode RGB keeps colour)")
    if args.lora_dir is None:  # the default without a config: say it
        log.warning(
            "no --lora-dir: the plain pretrained model, no finetuned LoRA and no visual guidance (the paper's "
            "ablation); for the method pass a finetune.py output (--lora-dir DIR)"
        )
    plan.model_hash, plan.lora_hash = common.fingerprint(args.pretrained_model, args.revision), lora_hash
    found = reusable_images(plan, out_dir, config, args.reuse_from, log) if args.reuse_from else {}
    work = shard_work if args.output_format == "wds" else folder_work
    todo, sink = work(plan, run, found, state, log)
    device = state.device
    stats = {"generated": 0, "bad_sources": [], "images_per_s": 0.0, "seconds": 0.0}
    if todo:
        pipe = ready_pipeline(args, plan, device, log)
        stats = run_loop(pipe, plan, todo, out_dir, device, state.is_main_process, sink)
    tag = f"{args.shard[0]}of{args.shard[1]}-r{state.process_index}of{state.num_processes}"
    run.check_in_place()
    # A file, not a folder: beside the class folders a folder would read as one more class.
    common.write_json(out_dir / f"bad_sources.{tag}.json", stats["bad_sources"])
    state.wait_for_everyone()
    metrics = finalize(plan, out_dir, run, args) if state.is_main_process else None
    log.info(
        f"done, {whose(args, state)}: generated {stats['generated']} images in {stats['seconds']:.1f}s "
        f"({stats['images_per_s']:.2f} img/s), {len(stats['bad_sources'])} images skipped for "
        f"{len({b['source'] for b in stats['bad_sources']})} bad sources; "
        + ("set complete: manifest.json written" if metrics else "other shards still running or incomplete")
    )
    return {
        **(metrics or {}),
        "complete": metrics is not None,
        "generated": stats["generated"],
        "images_per_s": stats["images_per_s"],
        "expected": len(plan.jobs),
    }


if __name__ == "__main__":
    main()
