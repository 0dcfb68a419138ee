"""Speed benchmarks of synthesis, finetuning, classifier training and its data loader: figures printed and saved,
never asserted (`make bench`).

  synth     images/s of synthesize.py's generation loop and, on the same model and inputs, of a baseline loop that
            does what the authors' release does minus its bugs (one pipeline call per class group, batch 24, the LoRA
            unfused, init images squash-resized with PIL in the main process, images saved one by one), their ratio,
            and the share of wall time spent inside UNet forward calls. Both pipelines stay loaded and the two loops
            alternate over --rounds rounds, so load that comes and goes on a shared machine falls on both alike.
            Output: <output-dir>/benchmark.json (default runs/<dataset>/bench_synth) and one JSON line on stdout.
  finetune  training samples/s and peak memory of finetune.py's training step on random data (one JSON line).
  train     images/s and the share of step time spent waiting for data of train_cls.py's training step (its own model,
            augmentation, optimizer, loader) on random in-memory JPEGs; <output-dir>/benchmark.json, one JSON line.
  loader    images/s of a classifier's data loader (decode + random crop, seeded shuffled order) over one set of
            photo-like JPEGs stored by synthesize.py's own writers as files and as tar shards, passes alternating.
            Output: <output-dir>/benchmark.json (default runs/bench_loader) and one JSON line on stdout.

synth and finetune: `--weights sd15-random` swaps in SD1.5-shaped UNet / VAE / text encoder with random weights built
from config (no download), for GPU figures at the paper's scale; `pretrained` (default) times --pretrained-model's own
weights.

Unlike the stage scripts, this file imports three of them: it times their own functions, so the figures are those of
the code that runs. The stage scripts never import it.

Commands:
  CPU (make bench-synth):    python bench.py synth --config configs/demo.yaml --steps 30 --images 48 --rounds 5 \\
                                 --compile on
  GPU (make bench-gpu):      python bench.py synth --config configs/demo.yaml --weights sd15-random --resolution 512 \\
                                 --pretrained-model runs/demo/skeleton --images 128 --rounds 2
  CPU (make bench-finetune): python bench.py finetune --pretrained-model demo_generator/sd --resolution 32 \\
                                 --train-batch-size 16 --steps 10
  GPU:                       python bench.py finetune --weights sd15-random --resolution 512 --train-batch-size 8
  CPU (make bench-train):    python bench.py train --fake-data 640 --fake-size 48 --model test_resnet --input-size 32 \\
                                 --batch-size 32 --max-device-batch 32 --steps 15
                             python bench.py loader --images 2000 --size 256 --workers 2
Each benchmark also takes every flag of the stage it times (synthesize.py, finetune.py, train_cls.py): see
`python bench.py synth --help`.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from torchvision import transforms
from transformers import CLIPTextConfig, CLIPTextModel

import common
import finetune
import synthesize
import train_cls

WEIGHTS = ("pretrained", "sd15-random")


def sd15_random(tokenizer=None):
    """UNet, VAE and text encoder shaped like Stable Diffusion 1.5's, with random weights (fp32, CPU).

    The token ids come from `tokenizer` when given (the synthesis benchmark keeps the pipeline's tokenizer)."""

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the other defaults are SD 1.x's blocks
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )
    ids = {}
    if tokenizer is not None:
        ids = {
            "vocab_size": max(49408, len(tokenizer)),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    text_encoder = CLIPTextModel(
        CLIPTextConfig(  # CLIP ViT-L/14's text tower
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
            **ids,
        )
    )
    return unet, vae, text_encoder


# ----------------------------------------------------------------------------------------------------------------------
# synth


def synth_parser() -> common.StageParser:
    p = synthesize.get_parser()
    p.prog, p.description = "bench.py synth", "Time synthesize.py's loop against a release-style baseline loop."
    g = p.group("benchmark")
    g.add_argument("--images", type=common.positive_int, default=48, help="images per loop and round")
    g.add_argument("--rounds", type=common.positive_int, default=3, help="timed rounds per loop, the loops alternating")
    g.add_argument(
        "--baseline-batch",
        type=common.positive_int,
        default=24,
        help="the baseline's batch size (release: %(default)s)",
    )
    g.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="pretrained",
        help="sd15-random: SD1.5-shaped random weights with a random rank-4 LoRA (keeps --pretrained-"
        "model's tokenizer and scheduler)",
    )
    return p


def random_sd15_pipeline(pipe, dtype):
    """The same pipeline rebuilt around SD1.5-shaped random models and a rank-4 LoRA on the UNet attention, like a
    finetune.py output. Rebuilt, not patched, so the VAE scale factor and image processor match the new VAE."""

    unet, vae, text_encoder = sd15_random(pipe.tokenizer)
    # init_lora_weights=False: random A and B, so the LoRA changes the output like a trained one (peft's default
    # zero B would make it a no-op).
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=finetune.LORA_TARGETS.split(","))
    )
    return StableDiffusionImg2ImgPipeline(
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        tokenizer=pipe.tokenizer,
        unet=unet.to(dtype),
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class UnetTimer:
    """Wall time inside UNet forward calls (CUDA events on GPU, so the timer itself adds no synchronisation)."""

    def __init__(self, unet, device):
        self.cuda, self.pairs, self.total = device.type == "cuda", [], 0.0
        self.handles = [
            unet.register_forward_pre_hook(lambda *_: self._mark(True)),
            unet.register_forward_hook(lambda *_: self._mark(False)),
        ]

    def _mark(self, begin):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.pairs.append(event)
        elif begin:
            self._t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._t0

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return self.total + sum(a.elapsed_time(b) for a, b in zip(self.pairs[::2], self.pairs[1::2])) / 1000
        return self.total

    def remove(self):
        for h in self.handles:
            h.remove()


def baseline_loop(pipe, plan, jobs, out_dir: Path, args, device, lora: bool) -> int:
    """The release's generation loop without its bugs: batches of 24 in dataset order, split into one pipeline call
    per class, init images opened and squash-resized with PIL in the main process, the LoRA applied unfused via
    cross_attention_kwargs, the pipeline's own VAE encode/decode, images saved one by one."""
    label_of = {j: plan.index.samples[plan.source_copy(j)[0]].label for j in jobs}
    for start in range(0, len(jobs), args.baseline_batch):
        batch = jobs[start : start + args.baseline_batch]
        for label in sorted({label_of[j] for j in batch}):
            group = [j for j in batch if label_of[j] == label]
            rows = [plan.source_copy(j)[0] for j in group]
            images = [common.load_image(plan.index.abspath(s)).resize((args.resolution,) * 2) for s in rows]
            prompts, tokens = plan.conditions(group)
            negative = common.negative_prompt(args.prompt_style)
            cond, neg = synthesize.condition(pipe, prompts, tokens, plan.placement, negative, device)
            out = pipe(
                prompt_embeds=cond,
                negative_prompt_embeds=neg,
                image=images,
                strength=args.strength,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(plan.seed(j)) for j in group],
                cross_attention_kwargs={"scale": args.lora_scale} if lora else None,
            ).images
            for j, img in zip(group, out):
                path = out_dir / plan.file(j)
                path.parent.mkdir(parents=True, exist_ok=True)
                img.save(path, quality=args.jpeg_quality)
    return len(jobs)


def timed(fn, unet, device) -> tuple[float, float]:
    """(wall seconds, seconds inside the UNet) of one call of fn."""
    timer = UnetTimer(unet, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    unet_s = timer.seconds()
    timer.remove()
    return wall, unet_s


def synth_pipelines(args, plan, device):
    """(baseline, ours) from one load: the baseline keeps the LoRA unfused, as the release; ours fuses it and maybe
    compiles. One a copy of the other, so both time the same weights."""
    dtype = common.resolve_dtype(args.dtype, device)
    baseline = synthesize.load_pipeline(args, device, dtype, fuse=False)
    if args.weights == "sd15-random":
        baseline = random_sd15_pipeline(baseline, dtype).to(device)
    ours = copy.deepcopy(baseline)
    if args.lora:
        synthesize.fuse_lora(ours, args.lora_scale)
    for pipe in (baseline, ours):
        pipe.set_progress_bar_config(disable=True)
        synthesize.install_token_mask(pipe, plan.placement, plan.tokens is not None)
    synthesize.maybe_compile(ours, args)
    return baseline, ours


def bench_synth(argv) -> dict:
    """Images/s of both loops on the first --images jobs, their ratio and the UNet share of wall time (totals over the
    rounds; baseline first in even rounds, ours first in odd ones). One untimed warm-up batch each first (allocation,
    lazy init, compilation: its time is reported)."""

    args = common.parse_args(synth_parser(), argv, "synthesize")
    device = PartialState(cpu=not torch.cuda.is_available()).device
    out_dir = common.output_dir(args, "bench_synth")
    if args.weights == "sd15-random":
        args.lora_dir = None  # the random model brings its own LoRA; a demo LoRA and its tokens have another width
    args.lora = bool(args.lora_dir) or args.weights == "sd15-random"
    plan = synthesize.prepare(args)
    if args.weights == "sd15-random" and args.vg_mode != "none":
        # Random per-image visual tokens of SD1.5's width: the real path (appended token + masked cross-attention).
        plan.tokens = torch.randn(len(plan.index), 768, generator=torch.Generator().manual_seed(args.seed))
    jobs = [int(j) for j in plan.jobs[: args.images]]
    log = common.get_logger(out_dir)
    pipes = dict(zip(("baseline", "ours"), synth_pipelines(args, plan, device)))
    loops = {
        "baseline": lambda js, d: baseline_loop(pipes["baseline"], plan, js, d, args, device, args.lora),
        "ours": lambda js, d: synthesize.run_loop(pipes["ours"], plan, js, d, device, False),
    }
    warmup_s = {}
    for name, loop in loops.items():
        start = time.perf_counter()
        loop(jobs[: args.batch_size if name == "ours" else args.baseline_batch], out_dir / f"warmup_{name}")
        warmup_s[name] = time.perf_counter() - start
    totals = {name: {"wall_s": 0.0, "unet_s": 0.0} for name in loops}
    round_speedups = []
    for r in range(args.rounds):
        walls = {}
        for name in ("baseline", "ours") if r % 2 == 0 else ("ours", "baseline"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
            walls[name], unet_s = timed(lambda: loops[name](jobs, out_dir / name), pipes[name].unet, device)
            totals[name]["wall_s"] += walls[name]
            totals[name]["unet_s"] += unet_s
        round_speedups.append(walls["baseline"] / walls["ours"])
        log.info(
            f"round {r + 1}/{args.rounds}: baseline {len(jobs) / walls['baseline']:.3f} img/s, "
            f"ours {len(jobs) / walls['ours']:.3f} img/s ({round_speedups[-1]:.2f}x)"
        )
    return report_synth(
        args, totals, warmup_s, round_speedups, n_jobs=len(jobs), device=device, out_dir=out_dir, log=log
    )


def report_synth(
    args, totals: dict, warmup_s: dict, round_speedups: list, *, n_jobs: int, device, out_dir, log
) -> dict:
    """Log and save (benchmark.json) bench_synth's figures: per-loop totals over the rounds, warm-up seconds and the
    per-round speed-ups."""
    images = n_jobs * args.rounds
    results = {
        name: {"images_per_s": images / t["wall_s"], "unet_share": t["unet_s"] / t["wall_s"]}
        for name, t in totals.items()
    }
    for name, res in results.items():
        log.info(
            f"{name:8s}: {images} images in {totals[name]['wall_s']:.2f}s = {res['images_per_s']:.3f} img/s, "
            f"UNet {100 * res['unet_share']:.1f}% of wall time (warm-up {warmup_s[name]:.1f}s, untimed)"
        )
    ratio = results["ours"]["images_per_s"] / results["baseline"]["images_per_s"]
    log.info(
        f"speed-up ours / baseline: {ratio:.2f}x (rounds {min(round_speedups):.2f}-{max(round_speedups):.2f}x) "
        f"on {device} ({args.weights}, {args.resolution}px, {args.steps} steps x strength {args.strength}, "
        f"batch {args.batch_size} vs {args.baseline_batch}, compile {args.compile})"
    )
    metrics = {
        "ours_images_per_s": results["ours"]["images_per_s"],
        "baseline_images_per_s": results["baseline"]["images_per_s"],
        "speedup": ratio,
        "round_speedups": round_speedups,
        "ours_unet_share": results["ours"]["unet_share"],
        "baseline_unet_share": results["baseline"]["unet_share"],
        "warmup_s": warmup_s,
        "images": n_jobs,
        "rounds": args.rounds,
        "device": str(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"),
        "config": {k: v for k, v in vars(args).items() if k not in ("shard", common.UNHASHED)},  # speed ones too
    }
    common.write_json(out_dir / "benchmark.json", metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}))
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# finetune


def finetune_parser() -> common.StageParser:
    p = finetune.get_parser()
    p.prog, p.description = "bench.py finetune", "Time finetune.py's training step on random data."
    g = p.group("benchmark")
    g.add_argument("--steps", type=common.positive_int, default=5, help="timed steps, after 2 warm-up steps")
    g.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="pretrained",
        help="sd15-random: SD1.5-shaped random weights (no download; random token ids)",
    )
    return p


class RandomTokenizer:
    """Stands in for CLIP's tokenizer when the random SD1.5 text encoder has no vocabulary files."""

    model_max_length = 77

    def __call__(self, prompts, **_):
        return argparse.Namespace(input_ids=torch.randint(0, 49408, (len(prompts), self.model_max_length)))


def finetune_models(args, device, dtype):
    """finetune.py's SDModels (tokenizer, text encoder, VAE, scheduler, UNet with LoRA), loaded or SD1.5-shaped
    random."""
    if args.weights == "pretrained":
        return finetune.load_components(args, device, dtype)

    unet, vae, text_encoder = sd15_random()
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SD 1.5's
    for model in (text_encoder, vae):
        model.requires_grad_(False).to(device, dtype)
    unet = (
        unet if unet.dtype == dtype else unet.to(dtype=dtype)
    )  # finetune.add_lora expects the UNet in the weight dtype, as load_components loads it
    return finetune.SDModels(
        RandomTokenizer(), text_encoder.eval(), vae.eval(), scheduler, finetune.add_lora(unet, args, device)
    )


def bench_finetune(argv) -> dict:
    """Training samples/s and peak memory of one process (prints one JSON line); writes nothing."""

    args = finetune.resolve_args(common.parse_args(finetune_parser(), argv, "finetune"))
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    device = accelerator.device
    dtype = common.resolve_dtype(accelerator.mixed_precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32
    common.seed_everything(args.seed)
    models = finetune_models(args, device, dtype)
    width, b = models.unet.config.cross_attention_dim, args.train_batch_size
    tokens = torch.randn(b, width, device=device) if args.vg_mode != "none" else None
    params = [p for p in models.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    models.unet, optimizer = accelerator.prepare(models.unet, optimizer)
    batch = (list(range(b)), [False] * b, torch.randn(b, 3, args.resolution, args.resolution).clamp(-1, 1))
    data = finetune.TrainingData(["photo of a benchmark image"] * b, list(range(b)), tokens, None)
    gen = torch.Generator(device).manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(2 + args.steps):
        if i == 2:  # after warm-up (allocator, kernels, lazy init)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with accelerator.autocast():
            loss, _ = finetune.training_step(batch, models, data, args, gen)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result = {
        "model": args.weights if args.weights == "sd15-random" else str(args.pretrained_model),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "mixed_precision": accelerator.mixed_precision,
        "resolution": args.resolution,
        "batch_size": b,
        "cache_latents": False,
        "gradient_checkpointing": args.gradient_checkpointing,
        "samples_per_s": b * args.steps / elapsed,
        "peak_memory_gb": peak / 2**30,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------------------------------
# loader


def loader_parser() -> common.StageParser:
    p = common.StageParser(
        "Images/s of a classifier's data loader on one synthetic set stored as files and as tar shards.",
        prog="bench.py loader",
    )
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=256, help="stored short side (synthesize.py --save-size)")
    p.add_argument("--input-size", type=int, default=224, help="the classifier's crop")
    p.add_argument("--shard-samples", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="timed passes over each set, alternating layouts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/bench_loader")
    return p


def smooth_jpeg(rng, size: int) -> bytes:
    """A photo-like image (low-frequency colour fields plus a little grain), so JPEG sizes and decode cost are close to
    natural images' rather than to noise's."""

    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((size * 4 // 3, size), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (size, size * 4 // 3, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_sets(args, out: Path) -> dict:
    """The same JPEG bytes as a folder set and as a shard set, written by synthesize.py's own writers."""

    classes = [f"c{k}" for k in range(args.classes)]
    samples = [
        common.Sample(f"{classes[i % args.classes]}/img{i:06d}.jpg", i % args.classes) for i in range(args.images)
    ]
    index = common.DatasetIndex("bench", out / "sources", "train", samples, classes, classes)
    rng = np.random.default_rng(args.seed)
    images = [smooth_jpeg(rng, args.size) for _ in range(args.images)]
    sets = {}
    for layout in ("folder", "wds"):
        opts = synthesize.get_parser().parse_args(
            ["--output-format", layout, "--shard-samples", str(args.shard_samples), "--seed", str(args.seed)]
        )
        plan = synthesize.Plan(opts, index, [None] * len(index), None)
        root = out / layout
        shutil.rmtree(root, ignore_errors=True)
        if layout == "wds":
            shards = plan.shards()
            sink = synthesize.ShardSink(plan, root, dict(enumerate(shards)))
            for j in plan.jobs:
                sink.put(int(j), lambda j=int(j): images[j])
        else:
            for j in plan.jobs:
                synthesize.write_bytes(root / plan.file(int(j)), images[int(j)])
        common.write_jsonl(root / "manifest.jsonl", synthesize.stored_set(plan, root).rows)
        common.write_json(root / "classes.json", {"classes": classes, "class_names": classes})
        sets[layout] = common.load_synthetic(root)
    return sets


def time_pass(index, args, epoch: int) -> float:
    """Seconds for one shuffled pass (seeded per epoch, as train_cls.py's order) through decode + random crop."""

    tf = transforms.Compose(
        [transforms.RandomResizedCrop(args.input_size), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )
    order = np.random.default_rng(common.item_seed(args.seed, "epoch", epoch)).permutation(len(index)).tolist()
    data = common.ImageFiles([index.abspath(i) for i in order], tf)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def bench_loader(argv) -> dict:
    args = loader_parser().parse_args(argv)
    out = Path(args.output_dir)
    sets = make_sets(args, out)
    seconds = {layout: [] for layout in sets}
    for epoch in range(args.epochs):
        for layout in sorted(sets, reverse=epoch % 2 == 1):  # alternate which layout goes first
            seconds[layout].append(time_pass(sets[layout], args, epoch))
    result = {
        layout: {
            "images_per_s": args.images * len(t) / sum(t),
            "pass_images_per_s": [round(args.images / x, 1) for x in t],
            "files": sum(1 for p in (out / layout).rglob("*") if p.is_file()),
            "bytes": sum(p.stat().st_size for p in (out / layout).rglob("*") if p.is_file()),
        }
        for layout, t in seconds.items()
    }
    result["wds_over_folder"] = result["wds"]["images_per_s"] / result["folder"]["images_per_s"]
    result["config"] = vars(args)
    common.write_json(out / "benchmark.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return result


# ----------------------------------------------------------------------------------------------------------------------
# train


def train_parser() -> common.StageParser:
    p = train_cls.get_parser()
    p.prog, p.description = "bench.py train", "Images/s of train_cls.py's training step on random in-memory JPEGs."
    g = p.group("benchmark")
    g.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    g.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    g.add_argument("--fake-data", type=int, default=4096, help="random in-memory JPEGs, 10 classes (no dataset)")
    g.add_argument("--fake-size", type=int, default=400, help="their side")
    return p


def fake_jpegs(n: int, size: int, seed: int) -> list[bytes]:
    """Random JPEGs held in memory: decode + augmentation are measured without a dataset on disk."""

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(min(n, 256)):  # 256 distinct images, reused: encoding thousands would dominate a short benchmark
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def bench_train(argv) -> dict:
    """train_cls.py's own model, transforms, optimizer, loss, loader and step, timed after a few warm-up steps."""
    args = train_cls.parse_args_with_recipe(train_parser(), argv, require_data=False)
    accelerator = train_cls.make_accelerator(args)
    common.seed_everything(args.seed)
    model = train_cls.build_model(args, 10)
    train_tf, _ = train_cls.build_transforms(args, train_cls.eval_transform_cfg(args, model))
    steps_per_epoch = args.fake_data // args.batch_size
    training = train_cls.prepare_training(args, accelerator, model, 10, steps_per_epoch)
    labels = [i % 10 for i in range(args.fake_data)]
    data = train_cls.ImageList(
        [None] * len(labels), labels, train_tf, args.seed, fake_jpegs(len(labels), args.fake_size, args.seed)
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    batches, it = train_cls.epoch_loader(
        data, args, rank, world, training.accum, range(1), max_steps=args.warmup + args.steps
    )
    if batches.steps < args.warmup + args.steps:
        raise ValueError(
            f"{args.warmup + args.steps} steps need {(args.warmup + args.steps) * args.batch_size} images: "
            f"raise --fake-data (now {args.fake_data}) or lower --steps"
        )
    train_cls.train_steps(training, it, args.warmup * training.accum, args, 0, 0)
    stats, _ = train_cls.train_steps(training, it, args.steps * training.accum, args, 0, 0)
    result = {
        "model": args.model,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "processes": world,
        "workers": args.workers,
        "mixed_precision": accelerator.mixed_precision,
        "img_per_s": stats["images"] * world / stats["seconds"],
        "data_wait_frac": stats["data_wait"] / stats["seconds"],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if accelerator.is_main_process:
        out = Path(args.output_dir or Path(args.runs_dir) / "fake" / f"bench_train_{args.model}")
        common.write_json(out / "benchmark.json", result)
        print(json.dumps(result))
    return result


BENCHMARKS = {"synth": bench_synth, "finetune": bench_finetune, "train": bench_train, "loader": bench_loader}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in BENCHMARKS:
        raise SystemExit(
            f"usage: python bench.py {{{','.join(BENCHMARKS)}}} [flags]   "
            f"(python bench.py synth --help lists the flags)\n\n{__doc__}"
        )
    return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
