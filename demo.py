"""The embedded demo: a procedural labelled image dataset and a tiny Stable-Diffusion-architecture generator.

Not a paper stage: the documented home of what stands in for the downloads an offline CPU machine cannot make
(ImageNet, SD 1.5, CLIP). The generator is built from configs with SD's own classes (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel + CLIPTokenizer, CLIPVisionModelWithProjection), saved in the diffusers / transformers
layouts, so every stage loads it with the same `from_pretrained` calls it uses for SD 1.5 from the hub.

The generator is shipped, pretrained, in demo_generator/ (sd/ and clip_vision/ in fp16, manifest.json with the
recipe, code version, file hashes and quality figures): the demo starts from it as SD 1.5 users start from the hub.
`make demo-generator` rebuilds it from scratch with the same recipe (configs/demo.yaml + the defaults below).

Commands (each cached through common.RunDir: a second call with the same settings is a no-op):

    python demo.py data --config configs/demo.yaml          # -> runs/demo/data/{train,test,sketch,rendition}/
    python demo.py generator --config configs/demo.yaml     # -> runs/demo/generator/ (about 95 min on a CPU)
    python demo.py skeleton --config configs/demo.yaml      # -> runs/demo/skeleton/ (untrained, in seconds)

* data: ten shape classes (CLASSES, one word each) at 32 px: random colour, size, position, rotation and stretch
  on a textured background with small distractors ("photo" style: train/, test/), plus two shifted test sets with
  the same classes: sketch/ (dark outline on paper) and rendition/ (textured shape, cartoon outline, flat
  background). ImageFolder splits with classes.txt and class_names.txt; common.load_dataset("demo", root, split).
  Every image is a pure function of (seed, split, class, index).
* generator: builds the tiny pipeline and pretrains it on procedurally drawn "web" images (own seeds, wider ranges,
  some sketches and renditions: never a demo train/test image), SD's recipe at toy scale: the VAE to reconstruct
  (scaling_factor then set for unit-variance latents), the UNet + text encoder to denoise text-conditioned on
  "photo of <class>" with 10% prompt dropout (to "", or a negative prompt, so CFG has an unconditional branch),
  min-SNR weighting, half the timesteps drawn from the noisier 80% of the schedule, EMA, and a 20-token context;
  then the CLIP image encoder contrastively against the class prompts (its projected embedding is finetune.py's
  visual-guidance token). The tokenizer keeps whole every word of the demo, of the ImageNet class names and a few
  more (vocabulary_words). The UNet phase checkpoints every 500 steps, so an interrupted build resumes. Weights are
  then stored in fp16 and measured as stored, on the demo test split (generator/manifest.json): VAE PSNR and colour
  shift, the prompt's effect on the noise prediction, a diffusion classifier, a judge (small CNN on the real train
  split) on text-to-image and img2img samples at synthesize.py's settings, the image encoder's nearest-class-mean
  accuracy, and a small CNN trained on real images vs on their img2img versions.
* skeleton: the generator's pipeline as built, untrained (random weights, real tokenizer and scheduler configs).
  What the GPU benchmarks need (`make bench-gpu`: they swap in SD1.5-shaped random weights and keep the tokenizer
  and scheduler), without the generator's CPU pretraining.
The reports (the paper's tables in miniature, the ablation) are demo_report.py.

CPU only (there is nothing here a GPU would change the demo's numbers by); on a CPU shared with other jobs, set
OMP_NUM_THREADS=1: two OpenMP threads on an oversubscribed machine ran the UNet 4x slower than one.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import re
import shutil
import string
import sys
import time
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from PIL import Image, ImageDraw
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

import common

# The tiny generator's shape. Latents are 4 x (size/2) x (size/2) (one VAE downsampling), cross-attention width 64.
TEXT_WIDTH = 64
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the best-ranked adjacent pair (all its occurrences)."""
    while len(pieces) > 1:
        rank, first, second = min((ranks.get(pair, math.inf), *pair) for pair in zip(pieces, pieces[1:]))
        if rank == math.inf:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def build_bpe_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format BPE vocabulary made offline: every character (so any text tokenizes), and one whole-word token
    for each of `words` (the class-name and prompt words).

    Each word gets merges appended until BPE, run with all merges so far, ends in one token. Merges are ranked, so a
    naive chain per word breaks when words share pairs (the 'q u' of "quality" pre-empts the 's q' of "square");
    new merges rank last, so they never change how an earlier word tokenizes."""
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words if w}):
        while len(pieces := apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab, merges


def save_tokenizer(out_dir: Path, words: Iterable[str], max_length: int = 77):

    vocab, merges = build_bpe_vocab(words)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


class PipelineShape(NamedTuple):
    """The tiny pipeline's shape: PIPELINE_KEYS less the seed. The defaults (SD's 77-token context, cross-attention
    only) are the tests' pipeline; the demo's recipe is get_parser's.
    `vae_channels` and `unet_channels` set the widths per level (one more VAE level = one more 2x downsampling).
    `text_time_embedding` adds diffusers' `addition_embed_type="text"`: the attention-pooled condition (text tokens
    and, when appended, the visual token) is added to the timestep embedding of every ResNet block, besides
    cross-attention."""

    image_size: int = 32
    unet_channels: Iterable[int] = (32, 64)
    vae_channels: Iterable[int] = (32, 64)
    text_time_embedding: bool = False
    context_length: int = 77


def tiny_text_encoder(tokenizer: CLIPTokenizer, context_length: int) -> CLIPTextModel:
    """A 2-layer CLIP text encoder TEXT_WIDTH wide, with unit-variance word embeddings."""
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=context_length,
            projection_dim=TEXT_WIDTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # CLIP initialises word embeddings with std 0.02, as small as the position embeddings: the encoded prompts of the
    # ten classes then differed by ~3% of their norm, even after joint pretraining, and the UNet could not tell the
    # classes apart. Unit-variance word embeddings make the class word dominate the condition from the start.
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
    return text_encoder


def tiny_vae(shape: PipelineShape) -> AutoencoderKL:
    # Two levels = one downsampling: 32 px images -> 16 x 16 x 4 latents (SD's VAE downsamples 8x; at 32 px that
    # would leave 4 x 4 latents, too coarse for shapes).
    vae_channels = tuple(shape.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=shape.image_size,
        norm_num_groups=8,
        block_out_channels=vae_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
    )


def tiny_unet(shape: PipelineShape) -> UNet2DConditionModel:
    # Cross-attention at every resolution: a prototype with attention only at the lowest one never learned the
    # class conditioning (issue #2).
    # (32, 64) channels: 1.1M parameters, ~4x cheaper than (64, 128) on a CPU, the difference between a pretraining
    # that fits the demo's budget and one that does not.
    unet_channels = tuple(shape.unet_channels)
    return UNet2DConditionModel(
        sample_size=shape.image_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * len(unet_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(unet_channels),
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=8,
        # diffusers reads `attention_head_dim` as the number of heads: 16-wide heads; 4-wide ones ran 2x slower on CPU
        attention_head_dim=tuple(max(1, c // 16) for c in unet_channels),
        # A global condition path: with cross-attention alone, 600 steps x 64 images (10 CPU-minutes) left the noise
        # prediction blind to the prompt (|ε(c) − ε(∅)| / |ε(∅)| = 0.014, diffusion-classifier accuracy at chance).
        **(dict(addition_embed_type="text", addition_embed_type_num_heads=4) if shape.text_time_embedding else {}),
    )


def build_generator(out_dir: str | Path, words: Iterable[str], shape: PipelineShape = PipelineShape(), seed: int = 0):
    """Build an untrained tiny SD-1.x pipeline of `shape` and save it in the diffusers layout (model_index.json,
    unet/, vae/, text_encoder/, tokenizer/, scheduler/). Returns the StableDiffusionImg2ImgPipeline."""

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(out_dir / "tokenizer", words, shape.context_length)
    # One statement each: the weights are drawn from the seed in this order.
    text_encoder = tiny_text_encoder(tokenizer, shape.context_length)
    vae = tiny_vae(shape)
    unet = tiny_unet(shape)
    # SD 1.5's noise schedule and default scheduler, so the stage scripts see the same configs as on the hub model.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    common.make_readable(out_dir)
    return pipe


def build_image_encoder(out_dir: str | Path, projection_dim: int = TEXT_WIDTH, image_size: int = 32, seed: int = 0):
    """A tiny CLIPVisionModelWithProjection + CLIPImageProcessor in the transformers layout: the stand-in for
    `openai/clip-vit-large-patch14` (whose 768-d projection equals SD 1.5's cross-attention width)."""

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            projection_dim=projection_dim,
        )
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    common.make_readable(out_dir)
    return model, processor


# ----------------------------------------------------------------------------------------------------------------------
# Demo data: ten shape classes drawn procedurally. Every image is a pure function of (seed, split, class, index).

# One short word per class, so the word-level vocabulary gives each class exactly one token in "photo of <class>".
CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "arrow", "moon")
# Prompt words the stages use (common.build_prompt / negative_prompt, both styles): whole-word tokens too.
PROMPT_WORDS = (
    "photo",
    "of",
    "best",
    "quality",
    "distorted",
    "unrealistic",
    "blurry",
    "out",
    "frame",
    "cropped",
    "deformed",
)
# Everyday English class names beyond ImageNet's (CIFAR-10, Fashion-MNIST): with the ImageNet names in data/, the
# words the tokenizer keeps whole, so another dataset's class names are one token each, as SD's tokenizer has them.
EXTRA_WORDS = (
    "airplane automobile bird cat deer dog frog horse ship truck t shirt top trouser pullover dress coat sandal "
    "sneaker bag ankle boot zero one two three four five six seven eight nine digit"
).split()


def vocabulary_words() -> list[str]:
    """The demo's class and prompt words, then every word of the ImageNet-1k class names and EXTRA_WORDS."""
    imagenet = (common.DATA_DIR / "imagenet1k_classnames.txt").read_text().lower()
    return [*CLASSES, *PROMPT_WORDS, *re.findall(r"[a-z]+", imagenet), *EXTRA_WORDS]


SPLITS = ("train", "test", "sketch", "rendition")  # sketch and rendition are the demo's OOD sets
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-downsampled: anti-aliased edges


def _circle(n: int = 48, cx: float = 0.0, cy: float = 0.0, r: float = 1.0, a0: float = 0.0, a1: float = 2 * np.pi):
    t = np.linspace(a0, a1, n, endpoint=a1 - a0 < 2 * np.pi - 1e-6)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _regular(k: int, inner: float | None = None) -> np.ndarray:
    n = 2 * k if inner else k
    t = np.arange(n) * 2 * np.pi / n - np.pi / 2
    r = np.where(np.arange(n) % 2 == 1, inner, 1.0) if inner else np.ones(n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _moon() -> np.ndarray:
    """A crescent: the unit circle minus a circle of radius 0.85 centred at (0.5, 0), as one polygon."""
    outer = _circle(40, a0=np.radians(58), a1=np.radians(302))
    inner = _circle(30, cx=0.5, r=0.85, a0=np.radians(268), a1=np.radians(92))
    return np.concatenate([outer, inner])


def shape_polygons(name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(filled polygons, holes) in unit coordinates (radius ~1, centred at 0)."""
    arm = 0.33
    polys = {
        "circle": [_circle()],
        "square": [_regular(4)],
        "triangle": [_regular(3)],
        "star": [_regular(5, 0.45)],
        "cross": [
            np.array(
                [
                    (-arm, -1),
                    (arm, -1),
                    (arm, -arm),
                    (1, -arm),
                    (1, arm),
                    (arm, arm),
                    (arm, 1),
                    (-arm, 1),
                    (-arm, arm),
                    (-1, arm),
                    (-1, -arm),
                    (-arm, -arm),
                ],
                float,
            )
            * 0.9
        ],
        "ring": [_circle()],
        "diamond": [np.array([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)], float)],
        "hexagon": [_regular(6)],
        "moon": [_moon()],
        "arrow": [
            np.array([(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)], float)
        ],
    }[name]
    holes = [_circle(r=0.55)] if name == "ring" else []
    return polys, holes


def _random_colour(rng: np.random.Generator, sat=(0.3, 1.0), val=(0.25, 1.0)) -> np.ndarray:

    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))) * 255


def _texture(rng: np.random.Generator, size: int, kind: str | None = None, freqs=(3, 8)) -> np.ndarray:
    """A [size, size, 3] texture of two random colours: flat, gradient, stripes, checker or blobs."""
    kind = kind or rng.choice(["flat", "gradient", "stripes", "checker", "blobs"])
    c1, c2 = _random_colour(rng), _random_colour(rng)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "flat":
        mix = np.zeros((size, size))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        mix = np.cos(angle) * xx + np.sin(angle) * yy
        mix = (mix - mix.min()) / (np.ptp(mix) + 1e-6)
    elif kind == "stripes":
        angle, freq = rng.uniform(0, np.pi), rng.uniform(*freqs)
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6))
    elif kind == "checker":
        cells = rng.integers(3, 8)
        mix = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(float)
    else:  # blobs: a few Gaussian bumps
        mix = np.zeros((size, size))
        for _ in range(rng.integers(3, 7)):
            cx, cy, s = rng.random(), rng.random(), rng.uniform(0.08, 0.25)
            mix += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        mix = np.clip(mix, 0, 1)
    return c1 * (1 - mix[..., None]) + c2 * mix[..., None]


def _shape_mask(
    rng: np.random.Generator,
    name: str,
    size: int,
    scale: tuple[float, float],
    outline: float = 0.0,
    max_turn: float = 25.0,
):
    """Rasterise a randomly scaled, stretched, rotated and placed shape into an anti-aliased [size, size] alpha."""

    big = size * SUPERSAMPLE
    radius = rng.uniform(*scale) * size
    # Upright +- max_turn degrees: with any rotation a small CNN needs far more than 40 images per class.
    angle, stretch = np.radians(rng.uniform(-max_turn, max_turn)), rng.uniform(0.85, 1.15)
    margin = radius * 0.8
    centre = rng.uniform(margin, size - margin, 2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def to_px(p):
        return [tuple(v) for v in ((p * [stretch, 1 / stretch]) @ rot.T * radius + centre) * SUPERSAMPLE]

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    polys, holes = shape_polygons(name)
    width = max(1, round(outline * SUPERSAMPLE))
    for poly in polys:
        draw.polygon(to_px(poly), fill=None if outline else 255, outline=255 if outline else None, width=width)
    for hole in holes:
        draw.polygon(to_px(hole), fill=None if outline else 0, outline=255 if outline else None, width=width)
    return np.asarray(mask.resize((size, size), Image.BOX), np.float32) / 255


def _distractors(rng: np.random.Generator, img: np.ndarray, count: int) -> np.ndarray:
    """Small lines and dots in random colours: clutter the classifier must learn to ignore."""

    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    size = img.shape[0]
    for _ in range(count):
        colour = tuple(int(c) for c in _random_colour(rng))
        x, y = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            dx, dy = rng.uniform(-6, 6, 2)
            draw.line([(x, y), (x + dx, y + dy)], fill=colour, width=1)
        else:
            r = rng.uniform(0.8, 2.0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return np.asarray(pil, np.float32)


def draw_shape(rng: np.random.Generator, name: str, style: str, size: int = 32) -> Image.Image:
    """One image of class `name` in a style: 'photo' (train/test), 'sketch', 'rendition' or 'web' (pretraining)."""
    if style == "web":  # the generator's broad "web-scale" draw: mostly photos, wider ranges, some other styles
        style = rng.choice(["photo", "photo", "photo", "photo", "photo", "photo", "sketch", "rendition"])
        scale = (0.25, 0.46)
    else:
        scale = (0.28, 0.44)
    if style == "photo":
        # Smooth backgrounds only (a checker or fine stripes at 32 px hide the shape from a small CNN trained on a
        # few hundred images: it stayed at chance in a first version).
        alpha = _shape_mask(rng, name, size, scale)
        fg = _random_colour(rng)
        bg = _texture(rng, size, rng.choice(["flat", "gradient", "blobs", "stripes"]), freqs=(1, 2.5))
        for _ in range(10):  # keep the shape visible: resample a colour too close to the background's mean
            if np.abs(fg - bg.mean((0, 1))).sum() > 150:
                break
            fg = _random_colour(rng)
        img = bg * (1 - alpha[..., None]) + fg * alpha[..., None]
        img = _distractors(rng, img, int(rng.integers(0, 3)))
        img = img + rng.normal(0, 4, img.shape)
    elif style == "sketch":  # dark outline on paper: no colour, no texture
        alpha = _shape_mask(rng, name, size, scale, outline=rng.uniform(0.8, 1.5))
        paper, ink = rng.uniform(215, 255), rng.uniform(0, 90)
        img = paper * (1 - alpha[..., None]) + ink * alpha[..., None] + rng.normal(0, 4, (size, size, 1))
        img = np.repeat(img, 3, axis=2)
    elif style == "rendition":  # a textured shape with a black cartoon outline on a flat saturated background
        alpha = _shape_mask(rng, name, size, scale)
        fill = _texture(rng, size, rng.choice(["stripes", "checker"]))
        bg = np.broadcast_to(_random_colour(rng, sat=(0.6, 1.0), val=(0.6, 1.0)), (size, size, 3))
        edge = np.clip(alpha * (1 - alpha) * 4, 0, 1)[..., None]  # the anti-aliased rim as a dark outline
        img = (bg * (1 - alpha[..., None]) + fill * alpha[..., None]) * (1 - edge)
    else:
        raise ValueError(f"unknown demo image style {style!r}")
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))


def split_style(split: str) -> str:
    return {"train": "photo", "val": "photo", "test": "photo"}.get(split, split)


def demo_image(seed: int, split: str, label: int, index: int, size: int = 32) -> Image.Image:
    """The `index`-th image of class `label` in `split`: depends on nothing else (any image can be redrawn alone)."""
    rng = np.random.default_rng(common.item_seed(seed, "demo-data", split, label, index))
    return draw_shape(rng, CLASSES[label], split_style(split), size)


def make_split(root: Path, seed: int, split: str, per_class: int, size: int) -> int:
    """Write `root/<split>/<class>/<class>_<i>.png` + classes.txt + class_names.txt; returns the image count."""
    out = root / split
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            path = out / name / f"{name}_{i:04d}.png"
            if not path.is_file():  # resume an interrupted run image by image
                common.save_image(demo_image(seed, split, label, i, size), path)
    with common.atomic_write(out / "classes.txt") as f:
        f.write("\n".join(CLASSES) + "\n")
    with common.atomic_write(out / "class_names.txt") as f:
        f.write("\n".join(CLASSES) + "\n")
    return per_class * len(CLASSES)


def pretraining_images(seed: int, count: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's pretraining set ("web" style, its own seeds: never a demo train/test image), in memory:
    uint8 [count, 3, size, size] and labels [count], classes in turn."""
    images = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        rng = np.random.default_rng(common.item_seed(seed, "demo-pretrain", i))
        images[i] = np.asarray(draw_shape(rng, CLASSES[i % len(CLASSES)], "web", size))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.arange(count) % len(CLASSES)


# ----------------------------------------------------------------------------------------------------------------------
# Generator pretraining: the demo's stand-in for SD 1.5's web-scale training (and CLIP's), done once and cached.


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [-1, 1], the range the VAE works in."""
    return images.float() / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean().item()
    return 10 * math.log10(4 / max(mse, 1e-12))


def batches(count: int, batch_size: int, steps: int, seed: int):
    """`steps` random minibatch index tensors (a seeded permutation per epoch)."""
    gen = torch.Generator().manual_seed(seed)
    perm, at = torch.randperm(count, generator=gen), 0
    for _ in range(steps):
        if at + batch_size > count:
            perm, at = torch.randperm(count, generator=gen), 0
        yield perm[at : at + batch_size]
        at += batch_size


def cosine_lr(optimizer, steps: int, warmup: int):

    return get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=min(warmup, steps // 5), num_training_steps=steps
    )


def train_vae(vae, images: torch.Tensor, hp: argparse.Namespace, log=None) -> list[float]:
    """Reconstruction (MSE) + a small KL term, as SD's VAE minus the perceptual and GAN losses a CPU cannot afford.
    `hp`: vae_steps, vae_batch_size, vae_lr, kl_weight, seed."""
    steps = hp.vae_steps
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=hp.vae_lr, weight_decay=0.0)
    sched, losses = cosine_lr(opt, steps, 50), []
    draws = batches(len(images), hp.vae_batch_size, steps, hp.seed)
    for step, idx in enumerate(common.progress(draws, total=steps, desc="vae")):
        x = to_unit(images[idx])
        post = vae.encode(x).latent_dist
        loss = (vae.decode(post.sample()).sample - x).pow(2).mean() + hp.kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log.info(f"vae step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled): the UNet then trains on cached latents, far cheaper."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        post = vae.encode(to_unit(images[i : i + batch_size])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def prompt_table(tokenizer, uncond_prompts: list[str]) -> torch.Tensor:
    """Token ids of the len(CLASSES) class prompts ("photo of <class>", common.build_prompt), then the unconditional
    ones: the table every phase indexes by that layout."""
    prompts = [common.build_prompt(name) for name in CLASSES] + uncond_prompts
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids


def pick_prompts(labels: torch.Tensor, n_uncond: int, p_uncond: float, gen: torch.Generator) -> torch.Tensor:
    """Row of the prompt table per sample: its class prompt, or with probability p_uncond one of the unconditional
    prompts (empty, or a negative prompt), so classifier-free guidance has an unconditional branch to subtract."""
    drop = torch.rand(len(labels), generator=gen) < p_uncond
    uncond = len(CLASSES) + torch.randint(0, n_uncond, (len(labels),), generator=gen)
    return torch.where(drop, uncond, labels)


def diffusion_loss(unet, scheduler, latents, cond, timesteps, noise, snr_gamma: float | None) -> torch.Tensor:
    """ε-prediction MSE, min-SNR-γ weighted (as finetune.py trains): the per-sample loss, [B]."""

    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, cond).sample
    loss = (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma:
        loss = loss * common.min_snr_weights(common.snr_from_alphas(scheduler.alphas_cumprod, timesteps), snr_gamma)
    return loss


def sample_timesteps(n: int, high_t_fraction: float, gen: torch.Generator, num_train: int = 1000) -> torch.Tensor:
    """Uniform timesteps, except that a `high_t_fraction` of the batch is drawn from the noisier 80% of the schedule
    (t >= 200), where the prompt decides what the image shows: the tiny UNet then learns the class sooner."""
    uniform = torch.randint(0, num_train, (n,), generator=gen)
    noisy = torch.randint(num_train // 5, num_train, (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < high_t_fraction, noisy, uniform)


class CachedLatents(NamedTuple):
    """The UNet's training set, encoded once: posterior mean and std per image (unscaled), the VAE's scaling factor,
    and the class labels."""

    mean: torch.Tensor
    std: torch.Tensor
    scale: float
    labels: torch.Tensor


class UNetOptimisation:
    """What the UNet phase updates and checkpoints: UNet + text encoder (jointly: text_lr 0 leaves it out), AdamW, a
    constant learning rate after a warm-up, the EMA weights, the noise generator, the step reached and the losses."""

    def __init__(self, unet, text_encoder, hp: argparse.Namespace):
        self.unet, self.text_encoder = unet, text_encoder
        self.groups = [{"params": list(unet.parameters()), "lr": hp.unet_lr}]
        if hp.text_lr > 0:
            self.groups.append({"params": list(text_encoder.parameters()), "lr": hp.text_lr})
        self.opt = torch.optim.AdamW(self.groups, weight_decay=1e-2)
        self.sched = get_constant_schedule_with_warmup(self.opt, num_warmup_steps=min(100, hp.unet_steps // 5))
        self.ema = EMAModel(unet.parameters(), decay=hp.ema_decay) if hp.ema_decay else None
        self.gen, self.losses, self.first = torch.Generator().manual_seed(hp.seed), [], 0

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.groups for p in g["params"]], 1.0)
        self.opt.step()
        self.sched.step()
        if self.ema:
            self.ema.step(self.unet.parameters())
        self.losses.append(loss.item())

    def save(self, checkpoint: Path, step: int) -> None:
        state = {"unet": self.unet.state_dict(), "text_encoder": self.text_encoder.state_dict()}
        state.update(opt=self.opt.state_dict(), sched=self.sched.state_dict(), gen=self.gen.get_state())
        state.update(step=step, losses=self.losses)
        if self.ema:
            state["ema"] = self.ema.state_dict()
        with common.atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)

    def resume(self, checkpoint: Path) -> None:
        """Continue from a saved state: the next step is `self.first`."""
        state = torch.load(checkpoint, weights_only=False)
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.gen.set_state(state["gen"])
        self.first, self.losses = state["step"], state["losses"]


def train_unet(
    unet, text_encoder, scheduler, data: CachedLatents, token_ids, hp: argparse.Namespace, *, checkpoint=None, log=None
) -> list[float]:
    """Text-conditioned denoising on cached latents, UNet and text encoder jointly (the text encoder is frozen in
    every later stage, as SD's is). Prompts are encoded once per step as a table (`token_ids`: prompt_table's) and
    gathered per sample. `hp`: unet_steps, unet_batch_size, unet_lr, text_lr, p_uncond, high_t_fraction, snr_gamma,
    ema_decay, seed. EMA weights at the end. With `checkpoint`, the whole state is saved every 500 steps and a rerun
    continues from it, drawing the batches an uninterrupted run would."""

    n_uncond = len(token_ids) - len(CLASSES)  # the table's rows after the class prompts
    unet.train()
    text_encoder.train()
    run = UNetOptimisation(unet, text_encoder, hp)
    if checkpoint and checkpoint.is_file():
        run.resume(checkpoint)
        if log:
            log.info(f"unet: resumed from {checkpoint} at step {run.first}")
    gen, mean, std = run.gen, data.mean, data.std
    steps = batches(len(mean), hp.unet_batch_size, hp.unet_steps, hp.seed)
    for step, idx in enumerate(common.progress(steps, total=hp.unet_steps, desc="unet")):
        if step < run.first:
            continue
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * data.scale
        with torch.set_grad_enabled(hp.text_lr > 0):
            table = text_encoder(token_ids)[0]
        cond = table[pick_prompts(data.labels[idx], n_uncond, hp.p_uncond, gen)]
        t = sample_timesteps(len(idx), hp.high_t_fraction, gen, scheduler.config.num_train_timesteps)
        noise = torch.randn(z.shape, generator=gen)
        run.update(diffusion_loss(unet, scheduler, z, cond, t, noise, hp.snr_gamma).mean())
        if log and (step + 1) % max(1, hp.unet_steps // 20) == 0:
            log.info(f"unet step {step + 1}/{hp.unet_steps} loss {np.mean(run.losses[-200:]):.4f}")
        if checkpoint and (step + 1) % 500 == 0 and step + 1 < hp.unet_steps:
            run.save(checkpoint, step + 1)
    if run.ema:
        run.ema.copy_to(unet.parameters())
    unet.eval()
    text_encoder.eval()
    return run.losses


@torch.no_grad()
def class_prompt_targets(text_encoder, token_ids) -> torch.Tensor:
    """The image encoder's contrastive targets: the class prompts' pooled text embeddings, centred across classes and
    unit-norm, [classes, width]."""
    # Centred: the class prompts share "photo of", and their raw pooled embeddings were so alike that the contrastive
    # loss stayed at ln(10) (uniform) in a first run.
    pooled = text_encoder(token_ids[: len(CLASSES)]).pooler_output
    return torch.nn.functional.normalize(pooled - pooled.mean(0), dim=-1)


def train_image_encoder(
    vision, processor, text: torch.Tensor, images, labels, hp: argparse.Namespace, *, batch_size: int = 64, log=None
) -> list[float]:
    """CLIP's contrastive objective against the (now frozen) text encoder's class-prompt embeddings `text`
    (class_prompt_targets), so the projected image embedding (the visual-guidance token) carries what the image
    shows. `hp`: clip_steps, clip_lr, seed."""
    steps = hp.clip_steps
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    vision.train()
    opt = torch.optim.AdamW(vision.parameters(), lr=hp.clip_lr, weight_decay=1e-2)
    sched, losses = cosine_lr(opt, steps, 20), []
    for idx in common.progress(batches(len(images), batch_size, steps, hp.seed), total=steps, desc="clip vision"):
        pixels = (images[idx].float() / 255 - mean) / std
        emb = torch.nn.functional.normalize(vision(pixel_values=pixels).image_embeds, dim=-1)
        loss = torch.nn.functional.cross_entropy(emb @ text.T * 20.0, labels[idx])  # CLIP's learned scale ends ~100
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    if log:
        log.info(f"clip vision loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}")
    vision.eval()
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# Making the generator's quality visible: PSNR, does the text condition matter, samples, and what a classifier learns.


@torch.no_grad()
def conditioning_check(
    unet, text_encoder, scheduler, latents, labels, token_ids, *, seed: int, timesteps=tuple(range(100, 1000, 100))
) -> dict:
    """How much the prompt changes the noise prediction, and whether the model knows which prompt fits an image.

    rel_diff = mean |ε(right prompt) − ε(empty prompt)| / mean |ε(empty)| (0: the UNet ignores the text).
    denoise_class_acc: the diffusion classifier (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot
    Classifier"): the class whose prompt gives the smallest ε-error summed over `timesteps`, the same noise for every
    class (chance 10%); denoise_class_acc_per_t: the same decision from one timestep at a time, averaged."""
    table = text_encoder(token_ids)[0]
    gen = torch.Generator().manual_seed(seed)
    n, k = len(labels), len(CLASSES)
    diffs, wrong_diffs, per_t, total = [], [], [], torch.zeros(n, k)
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=gen)
        for sl in [slice(i, i + 250) for i in range(0, n, 250)]:
            m = len(latents[sl])
            tt = torch.full((m,), t)
            noisy = scheduler.add_noise(latents[sl], noise[sl], tt)
            uncond = unet(noisy, tt, table[k].expand(m, -1, -1)).sample
            preds = torch.stack([unet(noisy, tt, table[c].expand(m, -1, -1)).sample for c in range(k)], 1)
            errors = (preds - noise[sl, None]).pow(2).mean(dim=(2, 3, 4))
            total[sl] += errors
            per_t.append((errors.argmin(1) == labels[sl]).float())
            rows = torch.arange(m)
            right, wrong = preds[rows, labels[sl]], preds[rows, (labels[sl] + 1) % k]
            diffs.append(((right - uncond).abs().mean() / uncond.abs().mean()).item())
            wrong_diffs.append(((right - wrong).abs().mean() / uncond.abs().mean()).item())
    return {
        "cond_uncond_rel_diff": float(np.mean(diffs)),
        "cond_wrong_rel_diff": float(np.mean(wrong_diffs)),
        "denoise_class_acc": (total.argmin(1) == labels).float().mean().item(),
        "denoise_class_acc_per_t": torch.cat(per_t).mean().item(),
    }


def load_sampler(sd_dir: Path, kind: str = "img2img"):
    """The pipeline synthesize.py uses: SD img2img (or text-to-image for the grid) with UniPC."""

    cls = StableDiffusionImg2ImgPipeline if kind == "img2img" else StableDiffusionPipeline
    pipe = cls.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False, dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_to_image_samples(sd_dir: Path, per_class: int, steps: int, guidance: float, seed: int) -> list[list]:
    """`per_class` text-to-image samples ("photo of <class>") per class, one list per class: what the pretrained
    model draws from the prompt alone."""
    pipe = load_sampler(sd_dir, "text2image")
    rows = []
    for label, name in enumerate(CLASSES):
        gens = [torch.Generator().manual_seed(common.item_seed(seed, "demo-t2i", label, k)) for k in range(per_class)]
        out = pipe(
            [common.build_prompt(name)] * per_class,
            negative_prompt=[common.negative_prompt()] * per_class,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
        ).images
        rows.append(out)
    return rows


def sample_img2img(pipe, sources: DemoSplit, hp: argparse.Namespace, batch_size: int = 50) -> list[Image.Image]:
    """Latent-prior synthesis as synthesize.py does it: each real image, noised to `strength`, seeds its own sample.
    `hp`: measure_strength, measure_steps, measure_guidance, seed."""
    out, labels = [], sources.y.tolist()
    for i in common.progress(range(0, len(sources.pil), batch_size), desc="img2img"):
        sl = slice(i, i + batch_size)
        gens = [torch.Generator().manual_seed(common.item_seed(hp.seed, "demo-measure", j)) for j in sources.ids[sl]]
        out += pipe(
            [common.build_prompt(CLASSES[y]) for y in labels[sl]],
            image=sources.pil[sl],
            strength=hp.measure_strength,
            num_inference_steps=hp.measure_steps,
            guidance_scale=hp.measure_guidance,
            negative_prompt=[common.negative_prompt()] * len(gens),
            generator=gens,
        ).images
    return out


def small_cnn(num_classes: int) -> torch.nn.Module:
    """A 4-conv classifier for 32 px images: trains in seconds on a CPU."""

    def block(cin, cout):
        return [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]

    layers = block(3, 32) + block(32, 32) + [torch.nn.MaxPool2d(2)] + block(32, 64) + [torch.nn.MaxPool2d(2)]
    layers += block(64, 128) + [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, num_classes)]
    return torch.nn.Sequential(*layers)


def train_small_cnn(train_x: torch.Tensor, train_y: torch.Tensor, epochs: int, seed: int, batch_size: int = 64):
    """small_cnn trained on uint8 images (random shifts + flips), in eval mode."""
    torch.manual_seed(seed)
    model = small_cnn(len(CLASSES))
    steps = epochs * math.ceil(len(train_x) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for idx in batches(len(train_x), min(batch_size, len(train_x)), steps, seed):
        x = torch.nn.functional.pad(to_unit(train_x[idx]), (4, 4, 4, 4), mode="reflect")
        dx, dy = torch.randint(0, 9, (2,), generator=gen).tolist()
        x = x[:, :, dy : dy + train_x.shape[2], dx : dx + train_x.shape[3]]
        if torch.rand(1, generator=gen).item() < 0.5:
            x = x.flip(3)
        loss = torch.nn.functional.cross_entropy(model(x), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict(model, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(to_unit(images[i : i + 256])).argmax(1) for i in range(0, len(images), 256)])


def classifier_accuracy(train_x, train_y, test_x, test_y, epochs: int, seed: int) -> float:
    """Train small_cnn and return its top-1 on (test_x, test_y)."""
    model = train_small_cnn(train_x, train_y, epochs, seed)
    return (predict(model, test_x) == test_y).float().mean().item()


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images])).permute(0, 3, 1, 2).contiguous()


class DemoSplit(NamedTuple):
    """A demo split in memory, read once for every quality check: PIL images, uint8 [N, 3, H, W], labels, ids."""

    pil: list
    x: torch.Tensor
    y: torch.Tensor
    ids: list[str]


def split_tensors(data_root: Path, split: str) -> DemoSplit:
    index = common.load_dataset("demo", data_root, split)
    images = [common.load_image(index.abspath(i)) for i in range(len(index))]
    labels = torch.tensor([s.label for s in index.samples])
    return DemoSplit(images, as_tensor(images), labels, [index.image_id(i) for i in range(len(index))])


def mean_colour_shift(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference between two image sets' per-channel mean colours, in 0-255 units (a colour cast)."""
    return (a.float().mean((0, 2, 3)) - b.float().mean((0, 2, 3))).abs().max().item()


def measure_synthetic(
    sd_dir: Path, train: DemoSplit, test: DemoSplit, args, log
) -> tuple[dict, Image.Image, Image.Image]:
    """Does the pretrained generator (no finetuning yet) draw the class it is asked for?

    A judge (small_cnn on every real demo train image) labels text-to-image samples of each prompted class
    (t2i_class_acc) and img2img versions of `measure_per_class` train images per class at synthesize.py's settings
    (img2img_class_acc: the class kept). Then real-only vs synthetic-only: small_cnn trained on those real images or on
    their img2img versions, tested on the real test split. Returns metrics, the img2img grid and the t2i grid."""
    real, train_x, train_y, ids = train
    test_x, test_y = test.x, test.y
    judge = train_small_cnn(train_x, train_y, args.cls_epochs, args.seed)
    per_class = args.measure_per_class
    picked = [i for label in range(len(CLASSES)) for i in (train_y == label).nonzero().flatten()[:per_class].tolist()]
    sources = DemoSplit([real[i] for i in picked], train_x[picked], train_y[picked], [ids[i] for i in picked])
    labels = sources.y
    synth = sample_img2img(load_sampler(sd_dir), sources, args)
    t2i = text_to_image_samples(sd_dir, per_class, args.measure_steps, args.measure_guidance, args.seed)
    t2i_labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    synth_x, real_x = as_tensor(synth), sources.x
    metrics = {
        "judge_test_top1": (predict(judge, test_x) == test_y).float().mean().item(),
        "t2i_class_acc": (predict(judge, as_tensor([im for row in t2i for im in row])) == t2i_labels)
        .float()
        .mean()
        .item(),
        "img2img_class_acc": (predict(judge, synth_x) == labels).float().mean().item(),
        "img2img_colour_shift": mean_colour_shift(synth_x, real_x),
        "real_top1": classifier_accuracy(real_x, labels, test_x, test_y, args.cls_epochs, args.seed),
        "synth_top1": classifier_accuracy(synth_x, labels, test_x, test_y, args.cls_epochs, args.seed),
        "images_per_class": per_class,
    }
    metrics["synth_over_real"] = metrics["synth_top1"] / max(metrics["real_top1"], 1e-9)
    log.info(
        f"judge (small CNN on {len(train_x)} real train images, test top-1 {metrics['judge_test_top1']:.3f}) finds the "
        f"prompted class in {metrics['t2i_class_acc']:.3f} of text-to-image samples and the source's class in "
        f"{metrics['img2img_class_acc']:.3f} of img2img ones; small CNN on {per_class}/class: real "
        f"{metrics['real_top1']:.3f}, img2img-synthetic {metrics['synth_top1']:.3f} (chance {1 / len(CLASSES):.2f})"
    )
    shown = [range(c * per_class, c * per_class + min(per_class, 4)) for c in range(len(CLASSES))]
    img2img_grid = common.image_grid([[sources.pil[i] for i in cols] + [synth[i] for i in cols] for cols in shown])
    return metrics, img2img_grid, common.image_grid([row[: args.grid_per_class] for row in t2i])


@torch.no_grad()
def image_encoder_ncm(clip_dir: Path, train: DemoSplit, test: DemoSplit) -> float:
    """Nearest-class-mean top-1 on the demo test split with the CLIP image encoder's projected embedding (the
    visual-guidance token), class means from the train split: how much of the class the token carries."""

    vision = CLIPVisionModelWithProjection.from_pretrained(clip_dir, dtype=torch.float32).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)

    def embed(images):
        pixels = processor(images=images, return_tensors="pt").pixel_values
        return torch.nn.functional.normalize(vision(pixel_values=pixels).image_embeds, dim=-1)

    train_e = embed(train.pil)
    means = torch.nn.functional.normalize(
        torch.stack([train_e[train.y == c].mean(0) for c in range(len(CLASSES))]), dim=-1
    )
    return ((embed(test.pil) @ means.T).argmax(1) == test.y).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------------
# The generator command: build, pretrain (phase by phase, resumable), check, cache.

DATA_KEYS = ("seed", "image_size", "train_per_class", "test_per_class", "ood_per_class")
# The untrained pipeline's shape (the skeleton's config); the generator's config adds its pretraining.
PIPELINE_KEYS = ("seed", "image_size", "unet_channels", "text_time_embedding", "vae_channels", "context_length")
GENERATOR_KEYS = (
    *PIPELINE_KEYS,
    "pretrain_images",
    "held_out_images",
    "vae_steps",
    "vae_batch_size",
    "vae_lr",
    "kl_weight",
    "unet_steps",
    "unet_batch_size",
    "unet_lr",
    "text_lr",
    "p_uncond",
    "high_t_fraction",
    "snr_gamma",
    "ema_decay",
    "clip_steps",
    "clip_lr",
    "grid_per_class",
    "measure_per_class",
    "measure_strength",
    "measure_steps",
    "measure_guidance",
    "cls_epochs",
)


def build_demo_pipeline(out_dir: Path, args):
    """The demo's untrained pipeline from the CLI's shape flags (PIPELINE_KEYS): the skeleton, and the generator's
    starting point."""
    shape = PipelineShape(**{key: getattr(args, key) for key in PipelineShape._fields})
    return build_generator(out_dir, vocabulary_words(), shape, args.seed)


def save_component(model, path: Path, load_as_fp32: bool = False) -> None:
    """save_pretrained into a temp folder, then swap it in: a crash never leaves a half-written component.

    `load_as_fp32`: the config of fp16 weights says float32, so a plain from_pretrained loads them in fp32 as it
    loads SD 1.5's hub files (transformers otherwise keeps the stored dtype, diffusers upcasts anyway)."""

    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    config_file = tmp / "config.json"
    if load_as_fp32 and "dtype" in (config := common.read_json(config_file)):
        common.write_json(config_file, {**config, "dtype": "float32"})
    common.make_readable(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def weight_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file the stages load (sd/ and clip_vision/), by path relative to `out`: recorded in the
    manifest, so a test can tell that the shipped generator is the one that was measured."""
    files = sorted(p for sub in ("sd", "clip_vision") for p in (out / sub).rglob("*") if p.is_file())
    return {str(p.relative_to(out)): common.hash_file(p) for p in files}


def run_data(args) -> dict:
    out = Path(args.output_dir or args.data_root)
    run = common.RunDir(out, {k: getattr(args, k) for k in DATA_KEYS}, args.overwrite)
    if run.start() == "done":
        print(f"{out}: demo data already made (manifest.json); nothing to do")
        return run.manifest()["metrics"]
    start = time.time()
    per_split = {
        "train": args.train_per_class,
        "test": args.test_per_class,
        "sketch": args.ood_per_class,
        "rendition": args.ood_per_class,
    }
    counts = {split: make_split(out, args.seed, split, n, args.image_size) for split, n in per_split.items()}
    metrics = {"images": counts, "classes": len(CLASSES), "elapsed_s": round(time.time() - start, 1)}
    run.finish(metrics)
    print(f"demo data in {out}: {counts} ({metrics['elapsed_s']} s)")
    return metrics


def run_skeleton(args) -> dict:
    out = common.output_dir(args, "skeleton")
    run = common.RunDir(out, {k: getattr(args, k) for k in PIPELINE_KEYS}, args.overwrite)
    if run.start() == "done":
        print(f"{out}: untrained demo pipeline already built (manifest.json); nothing to do")
        return run.manifest()["metrics"]
    build_demo_pipeline(out, args)
    metrics = {"pipeline": str(out), "trained": False}
    run.finish(metrics)
    print(f"untrained demo pipeline in {out} (random weights: for benchmarks only)")
    return metrics


def measure_generator(args, out: Path, pipe, token_ids, held, log):
    """(metrics, input fingerprints) of the pretrained generator in `out` (`pipe`: its sd/ as stored), on the demo's
    test images (or, without demo data, the held-out "web" images `held`): VAE PSNR, colour shift and
    reconstructions, the prompt's effect and the diffusion classifier; with demo data also the judge's view of
    text-to-image and img2img samples, the small-CNN check and the image encoder's nearest-class-mean accuracy."""
    sd_dir, clip_dir = out / "sd", out / "clip_vision"
    vae, unet, text_encoder, scale = pipe.vae, pipe.unet, pipe.text_encoder, pipe.vae.config.scaling_factor
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    data_root = Path(args.data_root)
    has_data = bool(args.measure_per_class) and (data_root / "test").is_dir()
    if has_data:
        train, test = split_tensors(data_root, "train"), split_tensors(data_root, "test")
    images, labels = (test.x, test.y) if has_data else held
    with torch.no_grad():  # one encode: the posterior mean is both the reconstruction's input and the latent
        mean = encode_all(vae, images)[0]
        recon = torch.cat([vae.decode(mean[i : i + 250]).sample for i in range(0, len(mean), 250)])
        latents = mean * scale
    to_pil = lambda im: Image.fromarray(((im.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).byte().numpy())  # noqa: E731
    common.save_image(
        common.image_grid([[to_pil(im) for im in pair[:10]] for pair in (to_unit(images), recon)]),
        out / "vae_reconstructions.png",
    )  # top row: originals, bottom: reconstructions
    metrics = {
        "quality_images": "demo test split" if has_data else "held-out pretraining images",
        "vae_psnr_db": psnr(recon, to_unit(images)),
        "vae_colour_shift": mean_colour_shift(((recon.clamp(-1, 1) + 1) * 127.5).round(), images),
        **conditioning_check(unet, text_encoder, scheduler, latents, labels, token_ids, seed=args.seed),
    }
    log.info(
        f"VAE PSNR {metrics['vae_psnr_db']:.2f} dB, colour shift {metrics['vae_colour_shift']:.1f}/255; prompt effect "
        f"|cond-uncond|/|uncond| {metrics['cond_uncond_rel_diff']:.3f}; diffusion classifier "
        f"{metrics['denoise_class_acc']:.3f} (single timestep {metrics['denoise_class_acc_per_t']:.3f})"
    )
    inputs = {}
    if has_data:
        measured, img2img_grid, t2i_grid = measure_synthetic(sd_dir, train, test, args, log)
        metrics["t2i_class_acc"] = measured.pop("t2i_class_acc")
        metrics["img2img_class_acc"] = measured.pop("img2img_class_acc")
        metrics["img2img_classifier"] = measured
        metrics["image_encoder_ncm_acc"] = image_encoder_ncm(clip_dir, train, test)
        log.info(f"image encoder nearest-class-mean top-1 {metrics['image_encoder_ncm_acc']:.3f}")
        common.save_image(img2img_grid, out / "samples_img2img.png")
        common.save_image(t2i_grid, out / "samples_text2image.png")
        inputs["data_root"] = common.fingerprint(data_root / "train")
        inputs["test_split"] = common.fingerprint(data_root / "test")
    elif args.measure_per_class:
        log.info(f"no demo data under {data_root}: skipping the sample checks (run `demo.py data`)")
    return metrics, inputs


class PhaseRecord:
    """phases.json: the generator's phases done so far, each with its time and figures, so a rerun resumes."""

    def __init__(self, path: Path, resume: bool, log):
        self.path, self.log = path, log
        self.done = common.read_json(path) if resume and path.is_file() else {}

    def run(self, name: str, work) -> None:
        """Do `work` (it returns the phase's figures, or None) unless phase `name` is done already."""
        if name in self.done:
            return
        t0 = time.time()
        figures = work() or {}
        self.done[name] = {"elapsed_s": round(time.time() - t0, 1), **figures}
        common.write_json(self.path, self.done)
        self.log.info(f"phase {name} done: {self.done[name]}")


def loss_figures(losses: list[float], n: int) -> dict:
    """A phase's figures in phases.json: the mean loss of its first and of its last `n` steps."""
    return {"loss_first": float(np.mean(losses[:n])), "loss_last": float(np.mean(losses[-n:]))}


def pretraining_split(args, log) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, held) images and labels: the last `held_out_images` are kept out of training, for PSNR and the
    conditioning check."""
    start = time.time()
    images, labels = pretraining_images(args.seed, args.pretrain_images + args.held_out_images, args.image_size)
    train = images[: args.pretrain_images], labels[: args.pretrain_images]
    log.info(f"{len(train[0])} pretraining images drawn in {time.time() - start:.1f} s")
    return train, (images[args.pretrain_images :], labels[args.pretrain_images :])


def build_untrained(sd_dir: Path, clip_dir: Path, args) -> None:
    """The build phase: the untrained pipeline (as the skeleton) and CLIP image encoder."""
    build_demo_pipeline(sd_dir, args)
    build_image_encoder(clip_dir, TEXT_WIDTH, args.image_size, args.seed)


def pretrain_vae(vae, images: torch.Tensor, sd_dir: Path, args, log) -> dict:
    """The VAE phase: train it on `images`, set its scaling_factor from their latents, store it in `sd_dir`."""
    losses = train_vae(vae, images, args, log)
    mean, _ = encode_all(vae, images[:2000])
    vae.register_to_config(scaling_factor=float(1 / mean.std()))  # unit-variance latents, as SD's 0.18215 gives
    save_component(vae, sd_dir / "vae")
    return loss_figures(losses, 10)


def pretrain_unet(pipe, train: tuple[torch.Tensor, torch.Tensor], token_ids, out: Path, args, log) -> dict:
    """UNet + text encoder on the cached latents of `train`, checkpointed in `out` (an interrupted phase resumes)."""
    mean, std = encode_all(pipe.vae, train[0])
    data = CachedLatents(mean, std, pipe.vae.config.scaling_factor, train[1])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # training noise schedule = SD 1.5's
    checkpoint = out / "unet_checkpoint.pt"
    losses = train_unet(pipe.unet, pipe.text_encoder, scheduler, data, token_ids, args, checkpoint=checkpoint, log=log)
    save_component(pipe.unet, out / "sd" / "unet")
    save_component(pipe.text_encoder, out / "sd" / "text_encoder")
    checkpoint.unlink(missing_ok=True)
    return loss_figures(losses, 20)


def pretrain_image_encoder(clip_dir: Path, text_encoder, token_ids, train, args, log) -> dict:
    """The CLIP image encoder in `clip_dir`, trained on `train` against the pretrained text encoder's class prompts."""
    vision = CLIPVisionModelWithProjection.from_pretrained(clip_dir)
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    text = class_prompt_targets(text_encoder, token_ids)
    losses = train_image_encoder(vision, processor, text, *train, args, log=log)
    save_component(vision, clip_dir)
    processor.save_pretrained(clip_dir)
    return loss_figures(losses, 10)


def store_fp16(sd_dir: Path, clip_dir: Path) -> None:
    """Rewrite every component in fp16: what ships (half the bytes), and what the quality checks measure."""
    for name, loader in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        save_component(loader.from_pretrained(sd_dir / name).half(), sd_dir / name, load_as_fp32=True)
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    save_component(CLIPVisionModelWithProjection.from_pretrained(clip_dir).half(), clip_dir, load_as_fp32=True)
    processor.save_pretrained(clip_dir)  # save_component replaced the whole folder


def run_generator(args) -> dict:
    """Build the generator and pretrain it phase by phase (PhaseRecord), store it in fp16, measure it as stored."""
    out = common.output_dir(args, "generator")
    run = common.RunDir(out, {k: getattr(args, k) for k in GENERATOR_KEYS}, args.overwrite)
    state = run.start()
    if state == "done":
        print(f"{out}: demo generator already pretrained (manifest.json); nothing to do")
        return run.manifest()["metrics"]
    log = common.get_logger(out)
    sd_dir, clip_dir = out / "sd", out / "clip_vision"
    phases = PhaseRecord(out / "phases.json", state == "resume", log)
    common.seed_everything(args.seed)
    train, held = pretraining_split(args, log)
    phases.run("build", lambda: build_untrained(sd_dir, clip_dir, args))
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    phases.run("vae", lambda: pretrain_vae(pipe.vae, train[0], sd_dir, args, log))
    uncond = ["", common.negative_prompt("paper"), common.negative_prompt("release")]  # what a dropped prompt becomes
    token_ids = prompt_table(pipe.tokenizer, uncond)
    phases.run("unet", lambda: pretrain_unet(pipe, train, token_ids, out, args, log))
    phases.run("clip_vision", lambda: pretrain_image_encoder(clip_dir, pipe.text_encoder, token_ids, train, args, log))
    phases.run("fp16", lambda: store_fp16(sd_dir, clip_dir))
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        sd_dir, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    t0 = time.time()
    metrics, inputs = measure_generator(args, out, pipe, token_ids, held, log)
    metrics["phases"] = phases.done
    metrics["quality_elapsed_s"] = round(time.time() - t0, 1)
    metrics["elapsed_s"] = round(sum(p["elapsed_s"] for p in phases.done.values()) + metrics["quality_elapsed_s"], 1)
    run.finish(metrics, inputs, extra={"files": weight_hashes(out)})
    log.info(f"generator ready in {sd_dir} (image encoder {clip_dir}); {metrics['elapsed_s']} s of work")
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def get_parser() -> common.StageParser:
    p = common.StageParser(__doc__)
    p.add_argument("command", choices=["data", "generator", "skeleton"], help="what to make (see above)")
    p.add_argument("--config", default=None, help="YAML config (configs/demo.yaml, section `demo`); CLI overrides")
    p.add_argument("--dataset", default="demo", help="always 'demo' (accepted so configs/demo.yaml applies)")
    p.add_argument("--data-root", default="runs/demo/data", help="the demo dataset")
    p.add_argument("--runs-dir", default="runs", help="root of the runs folders, as in every stage (the demo's: demo/)")
    out = "where to write (default: data: --data-root; generator, skeleton: <runs-dir>/demo/<command>)"
    p.add_argument("--output-dir", default=None, help=out)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="move an existing output with another config aside")
    d = p.group("data")
    d.add_argument("--image-size", type=int, default=32)
    d.add_argument("--train-per-class", type=int, default=40)
    d.add_argument("--test-per-class", type=int, default=30)
    d.add_argument("--ood-per-class", type=int, default=20, help="images per class in sketch/ and rendition/")
    g = p.group("generator (sizes and steps measured to fit ~15 min on 2 CPU cores)")
    g.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64])
    g.add_argument(
        "--text-time-embedding",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the pooled condition to the UNet's time embedding (diffusers addition_embed_type='text')",
    )
    g.add_argument("--vae-channels", type=int, nargs="+", default=[32, 64])
    g.add_argument(
        "--context-length",
        type=int,
        default=20,
        help="text tokens per prompt (SD: 77); demo prompts fit in 16, and fewer padding tokens dilute the class less",
    )
    g.add_argument("--pretrain-images", type=int, default=5000, help="procedural 'web' images (own seeds)")
    g.add_argument("--held-out-images", type=int, default=50, help="more 'web' images, for PSNR and checks")
    g.add_argument("--vae-steps", type=int, default=1500)
    g.add_argument("--vae-batch-size", type=int, default=32)
    g.add_argument("--vae-lr", type=float, default=2e-3)
    g.add_argument("--kl-weight", type=float, default=1e-6, help="SD's VAE KL weight")
    g.add_argument("--unet-steps", type=int, default=14000)
    g.add_argument("--unet-batch-size", type=int, default=32)
    g.add_argument("--unet-lr", type=float, default=2e-3)
    g.add_argument("--text-lr", type=float, default=1e-3, help="0 keeps the random text encoder frozen")
    g.add_argument("--p-uncond", type=float, default=0.1, help="prompt dropout for classifier-free guidance")
    g.add_argument("--high-t-fraction", type=float, default=0.5, help="share of timesteps drawn from t >= 200")
    g.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR weighting, as finetune.py")
    g.add_argument("--ema-decay", type=float, default=0.999, help="0 = no EMA of the UNet weights")
    g.add_argument("--clip-steps", type=int, default=2000)
    g.add_argument("--clip-lr", type=float, default=1e-3)
    q = p.group("quality checks (synthesis settings = synthesize.py's defaults)")
    q.add_argument("--grid-per-class", type=int, default=6, help="text-to-image samples per class; 0 = no grid")
    q.add_argument("--measure-per-class", type=int, default=20, help="real vs img2img classifier; 0 = skip")
    q.add_argument("--measure-strength", type=float, default=0.75)
    q.add_argument("--measure-steps", type=int, default=30)
    q.add_argument("--measure-guidance", type=float, default=2.0)
    q.add_argument("--cls-epochs", type=int, default=30)
    return p


def main(argv=None) -> dict:
    args = common.parse_args(get_parser(), argv, "demo")
    if args.dataset != "demo":
        raise SystemExit(f"demo.py makes the demo only (--dataset demo), got --dataset {args.dataset}")
    return {"data": run_data, "generator": run_generator, "skeleton": run_skeleton}[args.command](args)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
