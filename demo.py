"""The embedded demo: a procedural labelled image dataset and a tiny Stable-Diffusion-architecture generator.

Everything here stands in for what cannot be downloaded on an offline CPU machine (ImageNet, SD 1.5, CLIP), built
from configs with the same classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer,
CLIPVisionModelWithProjection) and saved in the standard diffusers / transformers layouts, so every stage script
loads it with the same `from_pretrained` calls it uses for SD 1.5 from the hub.

This section holds the offline builders; the demo data, the generator's pretraining and the report are below.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Iterable

import torch

# The tiny generator's shape. Latents are 4 x (size/2) x (size/2) (one VAE downsampling), cross-attention width 64.
TEXT_WIDTH = 64
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def build_bpe_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-format BPE vocabulary made offline: every character (so any text tokenizes), and one whole-word token
    for each of `words` (the class-name and prompt words), reached through a chain of merges."""
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if w}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in vocab:
                merges.append((left, right))
                vocab[merged] = len(vocab)
            left = merged
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab, merges


def save_tokenizer(out_dir: Path, words: Iterable[str]):
    from transformers import CLIPTokenizer

    vocab, merges = build_bpe_vocab(words)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_generator(out_dir: str | Path, words: Iterable[str], image_size: int = 32, seed: int = 0):
    """Build an untrained tiny SD-1.x pipeline and save it in the diffusers layout (model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/). Returns the StableDiffusionImg2ImgPipeline."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(out_dir / "tokenizer", words)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size, norm_num_groups=16,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    # Cross-attention at every resolution: a prototype with attention only at the lowest one never learned the
    # class conditioning (issue #2).
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=16, norm_num_groups=16)
    # SD 1.5's noise schedule and default scheduler, so the stage scripts see the same configs as on the hub model.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return pipe


def build_image_encoder(out_dir: str | Path, projection_dim: int = TEXT_WIDTH, image_size: int = 32, seed: int = 0):
    """A tiny CLIPVisionModelWithProjection + CLIPImageProcessor in the transformers layout: the stand-in for
    `openai/clip-vit-large-patch14` (whose 768-d projection equals SD 1.5's cross-attention width)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
        patch_size=8, projection_dim=projection_dim))
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                                  "width": image_size})
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model, processor
