"""What the Real-Fake stage scripts share: first the paper's method pieces that several stages must compute the same
way (prompts, min-SNR weights, the MMD loss, the visual-guidance token, the latent prior), then the plumbing every
stage runs on (config, atomic files, run directories, seeds and sharding, logging, dataset readers with one uniform
index, checkpoints, classifier loading). A few helpers serve one stage only because they belong with those that
serve several (e.g. a dataset reader).

diffusers, transformers and peft are imported by the stage scripts, never here, and timm and scipy only inside the
functions that use them: importing this module costs torch (which imports tqdm) + numpy + PIL + yaml + safetensors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tqdm.auto import tqdm

PAPER_SD = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # paper App. E: the generator finetune and synthesize load
PROJECT_DIR = Path(__file__).resolve().parent
DATA_DIR = PROJECT_DIR / "data"  # ImageNet class lists, beside this file (README, Layout: data/)
PATHS_FILE = PROJECT_DIR / "configs" / "paths.yaml"  # data locations, beside this file too: not the caller's cwd

# ----------------------------------------------------------------------------------------------------------------------
# Prompts and captions (paper §3.2, App. E)

PAPER_NEGATIVE_PROMPT = "distorted, unrealistic, blurry, out of frame"
RELEASE_NEGATIVE_PROMPT = "distorted, unrealistic, blurry, out of frame, cropped, deformed"
PROMPT_STYLES = ("paper", "release")


def build_prompt(class_name: str, caption: str | None = None, style: str = "paper") -> str:
    """`photo of {class}, {caption}` (paper); the release appends `, best quality`."""
    prompt = f"photo of {class_name}, {caption.strip()}" if caption else f"photo of {class_name}"
    return prompt + ", best quality" if style == "release" else prompt


def negative_prompt(style: str = "paper") -> str:
    return RELEASE_NEGATIVE_PROMPT if style == "release" else PAPER_NEGATIVE_PROMPT


def load_captions(path: str | os.PathLike | None) -> dict[str, str]:
    """captions.jsonl (from caption.py) -> {path relative to the dataset root: caption}."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"captions file {path} does not exist (run caption.py, or pass no --captions)")
    return {row["path"]: row["caption"] for row in read_jsonl(path)}


def captions_for(index: DatasetIndex, captions: dict[str, str], allow_missing: bool = False) -> list[str | None]:
    """One caption per image of `index` (None without captions); a missing one is an error naming the images."""
    if not captions:
        return [None] * len(index)
    found = [captions.get(s.path) for s in index.samples]
    missing = [s.path for s, c in zip(index.samples, found) if c is None]
    if missing and not allow_missing:
        raise KeyError(
            f"{len(missing)} image(s) have no caption, e.g. {missing[:3]}; re-run caption.py "
            f"(it resumes) or pass --allow-missing-captions to prompt them without one"
        )
    return found


def fragmented_class_names(tokenizer, class_names: Sequence[str], max_pieces_per_word: int = 2) -> dict[str, list]:
    """Class names the tokenizer splits into more than `max_pieces_per_word` pieces per word ("giraffe" -> 7 letters
    in a tokenizer that never saw it): prompts the generator has no whole word for. {name: pieces}."""
    found = {}
    for name in class_names:
        pieces = tokenizer.tokenize(name)
        if len(pieces) > max_pieces_per_word * max(1, len(name.split())):
            found[name] = pieces
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Method: min-SNR weights, distribution matching (MMD, paper §3.1 Eq. 5-7), visual guidance (§3.2), latent prior (§3.3)


def snr_from_alphas(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023): w = min(SNR, γ) / SNR."""
    return torch.clamp(snr, max=gamma) / snr


def predicted_clean_latents(
    noisy: torch.Tensor, eps_pred: torch.Tensor, alphas_cumprod_t: torch.Tensor
) -> torch.Tensor:
    """ẑ0 = (z_t − √(1−ᾱ_t) ε̂) / √ᾱ_t, the clean latent implied by an ε prediction."""
    a = alphas_cumprod_t.float().view(-1, *([1] * (noisy.dim() - 1)))
    return (noisy.float() - (1 - a).sqrt() * eps_pred.float()) / a.sqrt()


class SumOverProcesses(torch.autograd.Function):
    """all_reduce(SUM) that autograd can differentiate: every process's loss depends on every process's input, so the
    gradient that reaches each input is the sum of all processes' gradients of the result (torch.distributed.nn's
    all_reduce did this, and is deprecated)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


def mmd_loss(z0: torch.Tensor, z0_pred: torch.Tensor, across_processes: bool = False) -> torch.Tensor:
    """Linear-kernel MMD² between the batch of clean latents and the batch of predicted clean latents (paper Eq. 5-7).

    With the identity feature map φ(z) = z, MMD²(P, Q) = ‖E_P[z] − E_Q[z]‖² (App. C, Eq. 17-20), estimated on the
    batch as ‖mean_i z0_i − mean_i ẑ0_i‖², here averaged over the D latent dimensions so its scale does not depend on
    the resolution. Since z0 − ẑ0 = √((1−ᾱ)/ᾱ) (ε̂ − ε) = (ε̂ − ε)/√SNR_t, this is the batch-mean residual weighted by
    1/√SNR_t; unlike the per-sample diffusion loss, it only penalises errors that do not cancel across the batch.

    across_processes: the batch is every process's batch together. The residual sums are all-reduced with autograd
    (SumOverProcesses), so every process holds the same loss; its backward sums the world's identical gradients,
    which DDP's gradient averaging then divides back: the parameters get exactly the gradient of the global term.
    """
    residual_sum, count = (z0.float() - z0_pred.float()).sum(dim=0), z0.shape[0]
    if across_processes and torch.distributed.is_available() and torch.distributed.is_initialized():
        residual_sum = SumOverProcesses.apply(residual_sum)
        count = torch.tensor(float(count), device=residual_sum.device)
        torch.distributed.all_reduce(count)  # a tensor, not .item(): no host sync in the training step
    return (residual_sum / count).pow(2).mean()


def mmd_loss_release(eps_pred: torch.Tensor, eps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The authors' release: (1/D) ‖Σ_i w_i (ε̂_i − ε_i)‖² with min-SNR weights w_i, a batch *sum* (B² × a mean)."""
    w = weights.float().view(-1, *([1] * (eps.dim() - 1)))
    return ((eps_pred.float() * w).sum(0) - (eps.float() * w).sum(0)).pow(2).mean()


VG_PLACEMENTS = ("append", "replace-last")


def add_visual_tokens(text_embeds: torch.Tensor, tokens: torch.Tensor, placement: str = "append") -> torch.Tensor:
    """Put one visual-guidance token per sample into the text condition [B, 77, D] -> [B, 78, D] (paper: appended as
    an extra token) or [B, 77, D] with the last slot overwritten (release)."""
    tokens = tokens.to(text_embeds.dtype).unsqueeze(1)
    if tokens.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"visual token width {tokens.shape[-1]} != text embedding width {text_embeds.shape[-1]}; "
            f"the finetune output must include the projection for this encoder"
        )
    if placement == "append":
        return torch.cat([text_embeds, tokens], dim=1)
    if placement == "replace-last":
        return torch.cat([text_embeds[:, :-1], tokens], dim=1)
    raise ValueError(f"unknown visual-token placement {placement!r}; choose one of {VG_PLACEMENTS}")


def resize_crop(img: Image.Image, size: int, resample, rng: np.random.Generator | None = None, flip: bool = False):
    """Resize the short side to `size` (aspect kept), crop size x size (random with `rng`, else center), flip;
    as a [3, size, size] tensor in [-1, 1]."""
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), resample)
    left, top = (
        (int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1)))
        if rng is not None
        else ((w - size) // 2, (h - size) // 2)
    )
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return x.flip(-1) if flip else x


def load_init_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Latent-prior input: bicubic resize of the short side to `size`, center crop (the release squash-resizes to a
    square, which distorts every non-square ImageNet photo)."""
    return resize_crop(load_image(path), size, Image.BICUBIC)


@torch.no_grad()
def encode_latent_prior(vae, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """VAE-encode init images ([B,3,H,W] in [-1,1]) into scaled latents, one seeded posterior sample per image.

    The img2img pipeline then noises these latents to the requested strength with the same per-image generators,
    so an image's result depends only on its own seed (paper §3.3: the real image is the latent prior).
    """
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.stack(
        [torch.randn(posterior.mean.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
    ).to(posterior.mean.device, posterior.mean.dtype)
    latents = posterior.mean + posterior.std * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


# ----------------------------------------------------------------------------------------------------------------------
# Config: argparse defaults (the paper's values) < configs/<dataset>.yaml (shared keys, then the stage's section) < CLI

# Top-level YAML keys that every stage may read. A stage applies those its parser knows and ignores the rest, so one
# file can drive the whole pipeline; any other top-level key must be a stage section. revision: pretrained_model's.
SHARED_KEYS = {"dataset", "data_root", "seed", "captions", "pretrained_model", "revision", "runs_dir", "test_split"}
STAGES = {"caption", "finetune", "synthesize", "train_cls", "eval_ood", "eval_gap", "mia_lira", "sscd_sim", "demo"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` shows the module docstring as written and every option's default."""


class ConfigError(ValueError):
    """A config file or key that does not exist or does not fit the stage."""


def positive_int(text) -> int:
    """argparse type for counts that must be at least 1 (batch sizes, accumulation, rounds); YAML values pass through
    it too (see _coerce), so a 0 in a config is an error naming the key instead of a ZeroDivisionError later."""
    value = int(text)
    if value < 1:
        raise ValueError(f"must be an integer >= 1, got {text!r}")
    return value


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Convert a YAML value as argparse converts a command-line one: its text through the action's `type`, so
    `1e-4` (a string to YAML) becomes a float and `epochs: 2.5` is an error, as `--epochs 2.5` is (not 2 epochs)."""
    if value is None:  # an empty key ('test_split:') leaves the option at its default
        return action.default
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction: a YAML boolean
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    items = value if isinstance(value, list) else [value]
    count = {"+": "one or more values", "*": "a list"}.get(
        action.nargs, f"{action.nargs} values" if many else "a value"
    )
    wrong_count = (isinstance(action.nargs, int) and len(items) != action.nargs) or (action.nargs == "+" and not items)
    if isinstance(value, dict) or (isinstance(value, list) and not many) or wrong_count:
        raise ConfigError(f"{source}: key '{key}' takes {count} ({action.metavar or action.dest}), got {value!r}")
    convert = action.type or str
    try:
        result = [convert(str(v)) for v in items]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{source}: key '{key}' has a bad value {value!r}: {err}") from err
    # argparse checks choices on the command line only; a YAML value would pass unchecked.
    if action.choices is not None and any(v not in action.choices for v in result):
        hint = " (YAML reads yes/no/on/off as booleans: quote the value, e.g. 'no')" if isinstance(value, bool) else ""
        raise ConfigError(f"{source}: key '{key}' must be one of {list(action.choices)}, got {value!r}{hint}")
    return result if many else result[0]


class NumbersAsWritten(yaml.SafeLoader):
    """YAML whose numbers stay the text written, for the option's type to convert as it converts a flag: so
    `epochs: 010` is 10 (as --epochs 010 is; YAML reads octal 8) and `revision: 0123456` keeps its digits."""


NumbersAsWritten.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag.rsplit(":", 1)[-1] not in ("int", "float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml_section(path: str | os.PathLike, stage: str, loader=yaml.SafeLoader) -> dict:
    """Shared keys + the stage's section of a YAML config, after checking that every top-level key is known."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for the shipped ones)")
    data = yaml.load(path.read_text(), Loader=loader) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    unknown = sorted(set(data) - SHARED_KEYS - STAGES)
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key(s) {unknown}; shared keys are {sorted(SHARED_KEYS)} and "
            f"stage sections are {sorted(STAGES)}"
        )
    section = data.get(stage) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: section '{stage}' must be a mapping")
    shared = {k: v for k, v in data.items() if k in SHARED_KEYS}
    return {"section": section, "merged": {**shared, **section}}


# The run's identity (its config hash) is every option except those of a group made with `hashed=False`: options
# that change only how fast a run goes or where it writes, never what it computes. The parser records their names as
# a default, so `config_dict` needs nothing but the parsed arguments.
UNHASHED = "unhashed_options"
SPEED_TITLE = "speed, memory and outputs (not part of the run's identity)"


class StageParser(argparse.ArgumentParser):
    """A stage's command line. `--help` shows the module docstring and every default; options are added in titled
    groups (`group`, `speed_group`), and the parser keeps each option under every name it has, so that YAML keys
    resolve to options (`parse_args`) and the run's identity leaves the speed options out (`config_dict`)."""

    def __init__(self, doc: str | None = None, **kwargs):
        self.options: dict[str, argparse.Action] = {}  # before super(): argparse adds --help in __init__
        self.unshared: set[str] = set()  # options of a shared key's name meaning another thing here: section only
        super().__init__(description=doc, formatter_class=HelpFormatter, **kwargs)

    def add_argument(self, *names, **kwargs) -> argparse.Action:
        return self.remember(super().add_argument(*names, **kwargs))

    def group(self, title: str, hashed: bool = True) -> OptionGroup:
        return OptionGroup(self, self.add_argument_group(title), hashed)

    def speed_group(self, title: str = SPEED_TITLE) -> OptionGroup:
        """A group for options that do not change the stage's results."""
        return self.group(title, hashed=False)

    def not_hashed(self, *dests: str) -> None:
        """Leave options declared elsewhere (e.g. a shared one) out of this stage's config hash."""
        self.set_defaults(**{UNHASHED: tuple(self.get_default(UNHASHED) or ()) + dests})

    def remember(self, action: argparse.Action, hashed: bool = True) -> argparse.Action:
        self.options[action.dest] = action
        for name in action.option_strings:  # an option's other names (--num-workers for --workers) work as keys too
            self.options.setdefault(name.lstrip("-").replace("-", "_"), action)
        if not hashed:
            self.not_hashed(action.dest)
        return action


class OptionGroup:
    """A titled group of a StageParser's options; those of a `hashed=False` group, or added with `hashed=False` (an
    input whose files the stage fingerprints into its identity: their path is not), stay out of the config hash."""

    def __init__(self, parser: StageParser, group, hashed: bool):
        self.parser, self.group, self.hashed = parser, group, hashed

    def add_argument(self, *names, hashed: bool = True, **kwargs) -> argparse.Action:
        return self.parser.remember(self.group.add_argument(*names, **kwargs), self.hashed and hashed)


def add_run_options(
    parser: StageParser,
    output: str,
    *,
    seed_help: str = "global seed",
    workers: int = 4,
    resume: bool = False,
    data_fingerprinted: bool = False,
) -> None:
    """The options every stage shares, each with one name and vocabulary: --config, --dataset, --data-root, --seed,
    --runs-dir, --output-dir (default <runs-dir>/<dataset>/<output>), --overwrite, --workers (alias --num-workers;
    4, or 8 in train_cls and eval_ood, whose ResNet eats images fastest: README, Benchmarks) and for stages with
    checkpoints --resume. Of these only --dataset, --seed and --data-root enter the run's hash; --data-root not in a
    stage that fingerprints every split it reads (split_fingerprint, check_images), in its identity or, for a split
    it only evaluates on, to evaluate again when it changes (`data_fingerprinted`): there the files define the run,
    not where they are mounted."""
    g = parser.group("run")
    g.add_argument("--dataset", default=None, choices=DATASETS, help="the real dataset (a --config sets it)")
    where = "its root (else the environment, e.g. $IMAGENET_ROOT, or configs/paths.yaml beside common.py; README)"
    if data_fingerprinted:
        where += "; not part of the run's identity: its files' fingerprint is"
        parser.not_hashed("data_root")
    g.add_argument("--data-root", default=None, help=where)
    g.add_argument("--seed", type=int, default=42, help=f"{seed_help} (42: the release's train_lora.sh and train.py)")
    h = parser.speed_group("run files (not part of the run's identity)")
    h.add_argument("--config", default=None, help="YAML config (configs/<dataset>.yaml); command-line flags override")
    h.add_argument("--runs-dir", default="runs", help="root of the default output directories")
    h.add_argument("--output-dir", default=None, help=f"default <runs-dir>/<dataset>/{output}")
    h.add_argument("--overwrite", action="store_true", help="move a run with another config aside and start over")
    if resume:
        h.add_argument(
            "--resume",
            choices=("latest", "never"),
            default="latest",
            help="latest: continue from the last checkpoint; never: start over (old checkpoints to checkpoints.old)",
        )
    h.add_argument("--workers", "--num-workers", type=int, default=workers, help="data-loader workers per process")


def add_mixed_precision(group, on_gpu: str, why: str = "") -> None:
    """--mixed-precision, alias --amp: autocast in accelerate's vocabulary plus auto (`on_gpu` on a GPU, see
    resolve_mixed_precision), one option and one config key for every stage that autocasts."""
    text = f"autocast; auto: {on_gpu} on a GPU{why}, none on the CPU"
    group.add_argument("--mixed-precision", "--amp", choices=("auto", "no", "fp16", "bf16"), default="auto", help=text)


def add_skip_bad(parser: StageParser, where: str) -> None:
    """--skip-bad, outside the run's identity in every stage: without it a bad image stops the stage before any
    result, so for given images there is only ever one result, with or without the flag."""
    group = parser.speed_group("bad images (not part of the run's identity: without --skip-bad they stop the stage)")
    group.add_argument("--skip-bad", action="store_true", help=f"leave unreadable images out, listed in {where}")


def add_test_split(group, what: str) -> None:
    """--test-split, one name and default for every stage that reads the real held-out split (train_cls, eval_gap,
    eval_ood), so that one value (`make TEST_SPLIT=...`, or `test_split:` at the top of a config) reaches them all."""
    group.add_argument("--test-split", default=HELD_OUT, help=f"{what}; {HELD_OUT}: val/ or test/, whichever exists")


def resolve_mixed_precision(value: str, on_gpu: str) -> str:
    """A --mixed-precision value for accelerate / autocast: auto is the stage's `on_gpu` choice on a CUDA machine and
    no autocast on the CPU."""
    if value != "auto":
        return value
    return on_gpu if torch.cuda.is_available() else "no"


def parse_args(parser: StageParser, argv: Sequence[str] | None, stage: str) -> argparse.Namespace:
    """Parse `argv` with precedence argparse defaults < YAML (`--config`) < command line.

    Keys in the stage's YAML section must be options of the stage (dashes or underscores); an unknown one is an
    error naming the key and the file. Shared top-level keys the stage does not know are skipped.
    """
    _EARLY_WARNINGS.clear()  # a stage starts: warnings of an earlier one in this process are not its own
    config = getattr(parser.parse_known_args(argv)[0], "config", None)  # add_run_options declares --config
    if config:
        yaml_cfg = load_yaml_section(config, stage, NumbersAsWritten)
        defaults = {}
        for key, value in yaml_cfg["merged"].items():
            action = parser.options.get(key.replace("-", "_"))
            # --help, --config, a positional: no config setting (they were ignored; help entered the run's hash)
            if action is None or action.dest in ("help", "config") or not action.option_strings:
                if key in yaml_cfg["section"]:
                    raise ConfigError(
                        f"{config}: unknown key '{key}' in section '{stage}' "
                        f"(run `python {stage}.py --help` for the options)"
                    )
                continue  # a shared key another stage uses
            if action.dest in parser.unshared and key not in yaml_cfg["section"]:
                continue  # StageParser.unshared
            defaults[action.dest] = _coerce(action, key, value, str(config))
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if unknown := set(vars(args)) - set(parser.options) - {UNHASHED}:  # a config key could not reach them
        raise TypeError(
            f"options {sorted(unknown)} bypass StageParser (argparse's own add_argument_group?): no "
            "config key reaches them; add them with StageParser.group or speed_group"
        )
    return args


def config_dict(args: argparse.Namespace, exclude: Iterable[str] = ()) -> dict:
    """The run's identity: the resolved options as a JSON-able dict, without the speed options
    (`StageParser.speed_group`) and the `exclude`d keys (values a stage derives and stores beside its options)."""
    skip = set(exclude) | set(getattr(args, UNHASHED, ())) | {UNHASHED}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k not in skip}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# Files: every output is written to a temp file in the same directory, then renamed, so a crash never leaves a partial
# file under the final name. Only logs are appended in place (log.txt, metrics.jsonl, caption parts): read_jsonl drops
# the truncated last line a crash can leave.


def new_temp(path: Path, suffix: str) -> tuple[int, Path]:
    """A new, empty hidden file next to `path`, open for writing. Created with mode 0o666 as a plain open() is, so
    the kernel applies the umask (and the directory's default ACL) itself: mkstemp's 0o600 would make synthetic
    images, weights and manifests readable by their owner alone on a shared cluster."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def file_mode(directory: str | os.PathLike) -> int:
    """The mode a new file gets in `directory`, read off a probe file made as new_temp makes its files."""
    fd, probe = new_temp(Path(directory) / "mode-probe", "")
    os.close(fd)
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def make_readable(path: str | os.PathLike) -> None:
    """Give a file, or every file under a directory, the mode a new file gets there: for what libraries write
    themselves (save_pretrained, accelerate's save_state), since safetensors makes its files 0o600."""
    path = Path(path)
    mode = file_mode(path if path.is_dir() else path.parent)
    for f in [path] if path.is_file() else path.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Open a temp file next to `path` for writing; rename it over `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp(path, ".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path for libraries that want a filename (torch.save, safetensors, PIL); rename on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp(path, path.suffix)
    os.close(fd)
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)  # safetensors replaces the file it writes to with a 0o600 one
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, default=str) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a truncated last line (an interrupted append) is dropped, any other bad line is an error."""
    rows, lines = [], Path(path).read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
    return rows


def save_image(image: Image.Image, path: str | os.PathLike, **save_kwargs) -> None:
    """Save a PIL image atomically; the format comes from the final file's extension."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower(), None)
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)


def image_grid(rows: list[list[Image.Image]], scale: int = 2) -> Image.Image:
    """Rows of equal-sized images on a white canvas, enlarged `scale` times (nearest: pixels stay visible)."""
    size = rows[0][0].width
    grid = Image.new("RGB", (size * max(len(r) for r in rows), size * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            grid.paste(img, (x * size, y * size))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


class ImageReadError(OSError):
    """An image that is missing, truncated or not an image."""


def load_image(path: str | os.PathLike | ShardMember) -> Image.Image:
    """Open an image fully (so truncation is caught here, not later in a worker) and convert it to 8-bit RGB, as
    stored: as timm and torchvision read it, with no EXIF rotation and any alpha dropped (note_unusual_images)."""
    try:
        with Image.open(io.BytesIO(path.read_bytes()) if isinstance(path, ShardMember) else path) as img:
            img.load()
            if img.mode in FLOAT_MODES:
                raise ValueError(FLOAT_IMAGE)
            return _eight_bit(img).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err


EXIF_ORIENTATION = 0x0112  # 1: upright as stored
WIDE_INTEGER_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # 16-bit PNGs and TIFFs open in these
# convert("RGB") clips floats to 0 or 1: a TIFF of values in 0-1 read as black. Floats have no one 8-bit reading.
FLOAT_MODES = {"F"}
FLOAT_IMAGE = "a 32-bit float image (mode F) has no standard 8-bit reading; save it as 8- or 16-bit"


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit gray as 8-bit by its top byte (as torchvision's to_dtype(uint8) does): PIL's convert clips such values
    to 255, so a 16-bit PNG came out white."""
    if img.mode not in WIDE_INTEGER_MODES:
        return img
    return Image.fromarray((np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8), "L")


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def looks_like_local_path(source) -> bool:
    """A model source meant as a path, not a hub id: absolute, relative with ./ or ../, or more than one '/'."""
    text = str(source)
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1


def check_pretrained(load_config, source, revision: str | None = None, what: str = "a model", **kwargs) -> None:
    """Fail early, with the fix, when a pretrained model cannot be found. `load_config` is the library's own config
    reader (e.g. `DiffusionPipeline.load_config`, `AutoConfig.from_pretrained`): it reads one small file, from the
    directory or the hub cache."""
    if looks_like_local_path(source) and not Path(source).exists():
        # The hub client would report a malformed repo id, which hides the real mistake.
        raise FileNotFoundError(
            f"cannot load {what}: the directory '{source}' does not exist (resolved from {Path.cwd()}: "
            f"{Path(source).resolve()}). Pass an existing directory saved with save_pretrained, or a hub id."
        )
    try:
        load_config(str(source), revision=revision, **kwargs)
    except (OSError, ValueError) as err:  # a missing file, no network, or a malformed hub id
        # 'org/name' is a hub id and a relative path alike: say that no such directory exists either
        local = "" if Path(source).exists() else f" (and there is no directory '{source}' under {Path.cwd()})"
        raise OSError(
            f"cannot load {what} from '{source}'{local}: {str(err).rstrip('.')}. Pass a hub id (online, or in the HF "
            f"cache when HF_HUB_OFFLINE=1) or a local directory saved with save_pretrained."
        ) from err


def fingerprint(source: str | os.PathLike | None, revision: str | None = None) -> str | None:
    """A short content hash of a file or directory (names + bytes); a hub id is recorded as `id@revision`."""
    if source is None:
        return None
    path = Path(source)
    if path.is_file():
        return hash_file(path)
    if not path.is_dir():
        return f"{source}@{revision or 'main'}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(hash_file(file).encode())
    return digest.hexdigest()[:16]


def environment_info() -> dict:
    """What produced a result: code version (git, and the running script's and common.py's hashes), Python and
    library versions, device."""

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # not installed or no __version__
            return None

    def git(*command) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *command], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=10)

    # The code itself by content: what a copy of a stage in another project (no git, or another repo) records.
    code = [Path(__file__), Path(sys.argv[0])] if sys.argv and sys.argv[0].endswith(".py") else [Path(__file__)]
    code = [path.resolve() for path in code]  # git runs in PROJECT_DIR, not in the caller's directory
    try:
        commit = git("rev-parse", "HEAD").stdout.strip() or None
        # Dirty also when the code that ran is not in that commit: a stage copied, uncommitted, into another project's
        # repository (its HEAD holds none of this code) or a script from outside the repository.
        changed = commit and git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        # the code files tracked, unchanged and inside the repository (git fails on a path outside it)
        ran = git("status", "--porcelain", "--ignored", "--untracked-files=all", "--", *map(str, code))
        dirty = bool(changed or ran.returncode or ran.stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "code_sha256": {path.name: hash_file(path) for path in code if path.is_file()},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **{
            name: version(name)
            for name in ("torch", "torchvision", "diffusers", "transformers", "peft", "timm", "accelerate", "numpy")
        },
    }


# ----------------------------------------------------------------------------------------------------------------------
# Run directories. A stage owns one directory; `manifest.json`, written last, marks it complete.


# Config keys renamed since runs were first made (old name -> new): a run on disk made under an old name is the same
# run, so a rename alone never sends a finished classifier back to be trained again.
RENAMED_KEYS = {"amp": "mixed_precision"}  # train_cls, eval_ood: one name for precision in every stage
# Keys that stages have since left out of a run's identity: an old run's value is ignored where the current config
# no longer has the key (data_root: finetune, train_cls, eval_gap, eval_ood and sscd_sim hash every split they read;
# test_split: eval_gap holds the resolved split's name and fingerprint; skip_bad: finetune and train_cls, see
# add_skip_bad; lora_dir: synthesize holds the LoRA's hash; captions: finetune and synthesize hold the file's hash;
# imagenet_v2 & co.: eval_ood's OOD set roots, as every set it scores is fingerprinted; and the paths of inputs whose
# files the identity holds, so that a moved runs folder or another spelling of a path is the same run: synthetic_dir
# and features (eval_gap: sets, feature_space), synthetic_dir and model (sscd_sim: sets, model_fingerprint),
# classifier (eval_ood: classifier_weights), train_dirs (train_cls: train_fingerprints, see _by_contents)).
RETIRED_KEYS = (
    {"data_root", "test_split", "skip_bad", "lora_dir", "captions"}
    | {f"imagenet_{kind}" for kind in ("v2", "sketch", "val", "r", "a")}
    | {"synthetic_dir", "features", "model", "classifier", "train_dirs"}
)


def _by_contents(config: dict) -> dict:
    """A train_cls config of before its training sets were its identity by their fingerprints alone: it held them
    by the path each --train-dirs entry was spelled as (a moved runs folder was another run); now a list in that
    order, the one the paths' dict stands for."""
    fingerprints, sources = config.get("train_fingerprints"), config.get("train_dirs")
    if isinstance(fingerprints, dict) and isinstance(sources, list):
        return {**config, "train_fingerprints": [fingerprints.get(source) for source in sources]}
    return config


# Said with a mismatch of a data fingerprint (split_fingerprint: path, size and mtime of every file), in the config keys
# that hold them (not model_fingerprint: a model's files are hashed by content).
DATA_FINGERPRINTS = {"train_fingerprint", "train_fingerprints", "source_fingerprint", "sets"}
DATA_CHANGED = (
    " A fingerprint of the data changed: files were added, removed or edited, or the data was copied without its "
    "modification times (cp -r, or a per-job copy to a local disk): copy with cp -a or rsync -a to keep them."
)
DATA_REORDERED = " The same data is given in another order, which is part of the run: give it in the run's order."


def _data_changed_hint(previous: dict, config: dict, changed: list[str]) -> str:
    """What changed data keys tell the user: a list of the same fingerprints in another order (train_cls's
    --train-dirs), or data whose files changed."""
    keys = [key for key in changed if key in DATA_FINGERPRINTS]
    if not keys:
        return ""

    def in_another_order(key: str) -> bool:  # the same fingerprints, listed otherwise
        old, new = previous.get(key), config.get(key)
        return isinstance(old, list) and isinstance(new, list) and sorted(old, key=str) == sorted(new, key=str)

    return DATA_REORDERED if all(in_another_order(key) for key in keys) else DATA_CHANGED


class ConfigMismatchError(RuntimeError):
    """A run directory holds a run with another config; the message names the changed keys."""


def unused_path(path: Path) -> Path:
    """`path` if nothing is there, else the first free of `path-2`, `path-3`, ..."""
    candidates = (path if n == 1 else path.with_name(f"{path.name}-{n}") for n in itertools.count(1))
    return next(candidate for candidate in candidates if not candidate.exists())


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An advisory lock on `lock_path` held while the block runs: jobs of an array that start at once (over a failed
    start, say) decide one after another. None where the file system has no flock (Lustre without -o flock) or the
    folder takes no new file (a run dir made by hand in a read-only parent): the start goes on unserialised."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fcntl.flock(stack.enter_context(open(lock_path, "a")), fcntl.LOCK_EX)
        yield


class RunMovedError(RuntimeError):
    """A run's directory was moved aside or deleted by another command while the run was writing into it."""


class RunBusyError(RuntimeError):
    """Another live process writes the same part of the same run (one job submitted twice, say)."""


# The writer locks this process holds, by lock file: kept until the process ends, when the kernel releases them, so a
# killed run leaves no stale lock. A run started again in the same process (tests, demo.py) reuses its lock.
_WRITER_LOCKS: dict[str, int] = {}


def _held_here(lock_path: Path) -> bool:
    """This process holds the writer lock of the file now at `lock_path`."""
    held = _WRITER_LOCKS.get(str(lock_path))
    try:
        return held is not None and os.path.samestat(os.fstat(held), os.stat(lock_path))
    except OSError:
        return False


def _held_elsewhere(lock_path: Path) -> bool:
    """Another live process holds the writer lock at `lock_path` (probed with a shared lock, let go at once)."""
    if _held_here(lock_path):
        return False
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # no flock here: nothing can be known
        return False
    finally:
        os.close(fd)


def _release_writer_lock(lock_path: Path) -> None:
    if (held := _WRITER_LOCKS.pop(str(lock_path), None)) is not None:
        os.close(held)


def _holder_gone(holder: str) -> str:
    """A note for a lock whose writer, on this host, has ended: the processes it forked (data-loader workers) hold the
    lock they inherited until they notice, within seconds. Without it the message names a pid no one can find."""
    words = holder.split()
    if len(words) < 4 or words[0] != "pid" or not words[1].isdigit() or words[3] != platform.node():
        return ""
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return (
            f" Process {words[1]} has ended (killed, say); the processes it forked (data-loader workers) still hold "
            "its lock and end within seconds: start again in a moment."
        )
    except OSError:  # alive, another user's
        pass
    return ""


def _busy(lock_path: Path, holder: str, advice: str) -> RunBusyError:
    return RunBusyError(
        f"{lock_path.parent} is being written by another process ({holder or 'a process'}). Two writers of one run "
        "waste their compute and can write its rows twice. Wait for that process to end, or stop it (a stopped run "
        f"resumes when started again); to run both, give this one another --output-dir.{advice}{_holder_gone(holder)}"
    )


def _hold_writer_lock(lock_path: Path, advice: str = "") -> None:
    """Hold an advisory lock on `lock_path` until this process ends, or raise RunBusyError naming its holder, which
    the file says, with `advice`. Unlocked where the file system has no flock (Lustre without -o flock), as in
    _exclusive."""
    if _held_here(lock_path):
        return
    _release_writer_lock(lock_path)  # held on a run moved aside or started over since: it guards nothing now
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip()
        os.close(fd)
        raise _busy(lock_path, holder, advice) from None
    except OSError:
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _WRITER_LOCKS[str(lock_path)] = fd


def _parts_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Strided parts i/n and j/m (shard_items) share items iff i = j modulo gcd(n, m): 0/2 holds 0/4's, 1/1 all."""
    return (a[0] - b[0]) % math.gcd(a[1], b[1]) == 0


def _dir_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class RunDir:
    """A stage's output directory with skip / resume / overwrite semantics.

    `start()` returns "done" (complete with the same config: the caller should return the manifest and do nothing),
    "resume" (an interrupted run with the same config) or "fresh". A different config raises ConfigMismatchError
    naming the changed keys, unless `overwrite=True`, in which case the old run is moved aside as `<dir>.old-<hash>`
    (never deleted: nothing is lost by a mistyped flag). A run that wrote nothing but its run config and log (it
    failed on a bad input, and its process is gone) is no run: any config starts over it, so a stage may check its
    inputs before or after.
    A process still running in a directory that another command moved aside stops at its next `check_in_place()`.
    """

    def __init__(self, path, config: dict, overwrite: bool = False, is_main: bool = True, part=None):
        self.path = Path(path)
        # One writer per part (a job array's --shard i/n; None: a stage without --shard) of a run at a time; the lock
        # moves with the run, so a run moved aside by --overwrite does not hold up the one started in its place.
        self.part = part
        part = part or (0, 1)
        self.lock_path = self.path / f".writer-{part[0]}of{part[1]}.lock"
        self.config = config
        self.hash = config_hash(config)
        self.overwrite = overwrite
        self.is_main = is_main
        self.manifest_path = self.path / "manifest.json"
        self.started_path = self.path / "run_config.json"  # written at start so an interrupted run knows its config
        self.identity: tuple[int, int] | None = None  # the directory this run started in (device, inode)

    def _previous_config(self) -> dict | None:
        """The config of the run on disk, its keys under their current names (RENAMED_KEYS) and values in their
        current form (_by_contents), without the keys that have left this run's identity (RETIRED_KEYS)."""
        for candidate in (self.manifest_path, self.started_path):
            if candidate.is_file():
                config = _by_contents({RENAMED_KEYS.get(k, k): v for k, v in read_json(candidate)["config"].items()})
                return {k: v for k, v in config.items() if k in self.config or k not in RETIRED_KEYS}
        return None

    def _aside(self, name: str) -> Path:
        """A free name for the old run (A -> B -> A -> B sets one aside twice)."""
        return unused_path(self.path.with_name(name))

    def _produced_nothing(self) -> bool:
        """Only the run config, log and writer locks: a run that stopped before its first output (a bad input)."""
        kept = (self.started_path.name, LOG_FILE)
        return all(p.name in kept or p.name.startswith(".writer-") for p in self.path.iterdir())

    def _written_elsewhere(self) -> bool:
        """A live process holds a writer lock of this run: no failed start but a run still loading or in its first
        epoch, which only --overwrite moves aside."""
        return any(_held_elsewhere(lock) for lock in self.path.glob(".writer-*.lock"))

    def _start_over(self) -> None:
        """A new directory in place of one holding only a failed start's run config and log (a copy of the log is
        kept). Should a process of that start still run unseen (no flock to tell), it stops at its first
        check_in_place, as the directory changed, and its further log lines go to the old file, not the new run's."""
        aside = self._aside(f"{self.path.name}.failed-start")
        os.replace(self.path, aside)
        self.path.mkdir()
        if (aside / LOG_FILE).is_file():
            shutil.copyfile(aside / LOG_FILE, self.path / LOG_FILE)
        shutil.rmtree(aside)

    def start(self) -> str:
        if not self.is_main:  # the other processes of a launch only read what their main process decided
            return self._decide()
        with self.exclusively():
            status = self._decide()
            if status == "done":  # a finished run re-run takes no lock, unless it writes again (write_again)
                return status
            try:
                self._take_writer_lock()
            except RunBusyError:
                if not self.manifest_path.is_file():  # a start refused here has written nothing
                    raise
            # Its writer finished between the decision and the lock (or still holds it, letting go): done.
            if self.manifest_path.is_file():
                _release_writer_lock(self.lock_path)
                return self._decide()
            write_json(self.started_path, {"config": self.config, "config_hash": self.hash})
            return status

    def exclusively(self):
        """The run's start lock, for other steps its jobs must take one at a time (a job array completing its set)."""
        return _exclusive(self.path.with_name(f".{self.path.name}.lock"))

    def _decide(self) -> str:
        previous = self._previous_config()
        changed = previous is not None and config_hash(previous) != self.hash
        if changed and self._produced_nothing() and not self._written_elsewhere():
            if self.is_main:  # nothing to lose or resume: a corrected command simply starts
                self._start_over()
            previous = None
        elif changed:
            changed = sorted(k for k in set(previous) | set(self.config) if previous.get(k) != self.config.get(k))
            if not self.overwrite:
                details = ", ".join(f"{k}: {previous.get(k)!r} -> {self.config.get(k)!r}" for k in changed[:8])
                raise ConfigMismatchError(
                    f"{self.path} holds a run with a different config (changed: {details}). "
                    "Use another output directory, or --overwrite (make: -B ... OVERWRITE=1) to move the old run "
                    f"aside.{_data_changed_hint(previous, self.config, changed)}"
                )
            if self.is_main:
                os.replace(self.path, self._aside(f"{self.path.name}.old-{config_hash(previous)}"))
            previous = None
        if previous is not None and self.manifest_path.is_file():
            if self.is_main:  # said here for every stage: a re-run of a finished chain reports each skip
                print(f"{self.path}: already finished with this config (manifest.json)")
            # A finished run may be written again (eval_ood scores a set added since, train_cls tests a changed
            # split again): check_in_place guards those writes too, and write_again() takes the writer lock.
            self.identity = _dir_identity(self.path)
            return "done"
        if self.is_main:  # start() writes the run config once this process holds the run's writer lock
            self.path.mkdir(parents=True, exist_ok=True)
        self.identity = _dir_identity(self.path)
        return "resume" if previous is not None else "fresh"

    def write_again(self) -> None:
        """A finished run ("done") about to be written again (eval_ood scores a set added since, train_cls tests a
        changed split again): the writer lock a start takes, so two re-runs of it do not write it at once. finish()
        lets it go."""
        if self.is_main:
            self._take_writer_lock()

    def _take_writer_lock(self) -> None:
        """_hold_writer_lock for this run; a stage with --shard also hears of job arrays, with the part it is."""
        i, n = self.part or (0, 1)
        advice = f" A job array gives each job its own --shard i/n: this one is --shard {i}/{n}." if self.part else ""
        _hold_writer_lock(self.lock_path, advice)
        # Another shard count's part sharing this one's items (a whole-set run beside an array, an array resubmitted
        # as 0/4..3/4 while 0/2 still runs) makes them too. Held under the start lock, so no two starts miss it.
        for lock in self.path.glob(".writer-*of*.lock"):
            found = re.fullmatch(r"\.writer-(\d+)of(\d+)\.lock", lock.name)
            if lock != self.lock_path and found and _parts_overlap((i, n), (int(found[1]), int(found[2]))):
                if _held_elsewhere(lock):
                    _release_writer_lock(self.lock_path)
                    holder = lock.read_text(errors="replace").strip()
                    this = f"this one's --shard {i}/{n}" if self.part else "this one's whole set"
                    other = f" It writes --shard {found[1]}/{found[2]}, which shares items with {this}."
                    raise _busy(lock, holder, other + advice)

    def check_in_place(self) -> None:
        """Stop if the run's directory is no longer the one it started in: another command moved it aside
        (--overwrite, e.g. from a corrected job array while old jobs still run) or deleted it. Whatever this process
        wrote next would land in the run now there, under that run's config. Stages call it before each output."""
        if self.identity is not None and _dir_identity(self.path) != self.identity:
            raise RunMovedError(
                f"{self.path} was moved aside (--overwrite) or deleted by another command while this run wrote into "
                "it; stopping so that this run's outputs do not mix into the run now there (what this run wrote so "
                f"far is in {self.path.name}.old-{self.hash}, if it was moved aside)"
            )

    def begin(self, wait_for_everyone=None) -> str:
        """start() for every process of a launch: the main process first (it may move an old run aside and writes
        the run config), then, after the barrier `wait_for_everyone`, the others, which only read."""
        status = self.start() if self.is_main else None
        if wait_for_everyone is not None:
            wait_for_everyone()
        return status or self.start()

    def finish(self, metrics: dict, inputs: dict | None = None, extra: dict | None = None) -> dict:
        self.check_in_place()
        manifest = {
            "config": self.config,
            "config_hash": self.hash,
            "inputs": inputs or {},
            "environment": environment_info(),
            "metrics": metrics,
            **(extra or {}),
        }
        if self.is_main:
            write_json(self.manifest_path, manifest)
            _release_writer_lock(self.lock_path)
        return manifest

    def manifest(self) -> dict:
        return read_json(self.manifest_path)


# ----------------------------------------------------------------------------------------------------------------------
# Seeds and sharding. Anything that defines data is a pure function of the global seed and item ids.


def item_seed(*ids: Any) -> int:
    """A 63-bit seed from any ids (global seed, image id, copy index, ...): independent of order, batch, world size."""
    digest = hashlib.sha256("\x1f".join(map(str, ids)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_order(n: int, *ids: Any) -> torch.Tensor:
    """A seeded permutation of range(n) per `ids` (seed, stage tag, epoch): every process and every resume draws the
    same order; how a stage cuts it into batches is the stage's. A tensor: IN-1K x10's 12.8 M items are 0.1 GB,
    where a Python list of them is 0.5 GB per process and takes 9 s to build (measured on the CPU)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(item_seed(*ids)))


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_dtype(group) -> None:
    """--dtype, the weights' dtype of the inference-only stages (caption, synthesize); resolve_dtype reads it."""
    help = "auto: fp16 on a GPU (as released), fp32 on the CPU (half precision is slow or unsupported there)"
    group.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help=help)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A --dtype value (auto | fp32 | fp16 | bf16, or accelerate's mixed_precision 'no'): auto is fp16 on a GPU (the
    release's inference dtype), fp32 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES.get(name, torch.float32)


def load_subset_mask(path: str | os.PathLike, n: int) -> list[bool]:
    """A --subset-mask file (LiRA shadows): a 1-D bool .npy with one entry per image of the train split."""
    mask = np.load(path)
    if mask.dtype != bool or mask.ndim != 1 or len(mask) != n:
        raise ValueError(
            f"--subset-mask {path}: need a 1-D bool array with one entry per train image ({n}), got "
            f"dtype {mask.dtype}, shape {mask.shape}"
        )
    return mask.tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0-based i) -> (i, n), for job arrays: `--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--shard must look like 'i/n' (e.g. 0/4), got {text!r}") from err
    if not (count >= 1 and 0 <= index < count):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return index, count


def shard_items(items: Sequence, index: int, count: int) -> list:
    """Strided shard `index` of `count`: the union over all shards is `items`, each item exactly once."""
    return list(items[index::count])


def local_items(
    items: Sequence, job_shard: tuple[int, int] = (0, 1), process_index: int = 0, num_processes: int = 1
) -> list:
    """This process's items: first the job's shard (`--shard i/n`), then this process's part of it."""
    return shard_items(shard_items(items, *job_shard), process_index, num_processes)


# ----------------------------------------------------------------------------------------------------------------------
# Logging: rank 0 writes to stdout and <out>/log.txt; other ranks say only errors. Every warning a stage gives (odd
# images, class names the tokenizer splits, a set skipped) is the same on each rank: said once, not once per GPU.


LOG_FILE = "log.txt"


_EARLY_WARNINGS: list[str] = []  # said by this stage before its log.txt was open (parse_args starts a stage afresh)


def get_logger(out_dir: str | os.PathLike | None, is_main: bool = True, name: str = "realfake") -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if is_main and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(out_dir) / LOG_FILE)
        file.setFormatter(fmt)
        logger.addHandler(file)
        for message in _EARLY_WARNINGS:  # already on the terminal: into the log only
            file.handle(logger.makeRecord(name, logging.WARNING, __file__, 0, message, None, None))
        _EARLY_WARNINGS.clear()
    return logger


def early_warning(message: str, log: logging.Logger | None = None) -> None:
    """A warning from code a stage runs before it has its logger (listing and checking a split): to `log` if given,
    else on stderr (logging's last resort) from the launch's first process only. torchrun and accelerate launch give
    every process its RANK; each would say the same words again, once per GPU. Kept for the run's log.txt too, which
    get_logger writes them into when it opens it."""
    if log is not None:
        log.warning(message)
    elif os.environ.get("RANK", "0") == "0":
        logging.getLogger("realfake").warning(message)
        _EARLY_WARNINGS.append(message)


def progress(iterable=None, is_main: bool = True, **kwargs):
    """A tqdm bar on the main process only (other ranks would interleave their bars)."""
    return tqdm(iterable, disable=not is_main, dynamic_ncols=True, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Datasets: every reader returns one uniform index of (relative path, label) with the class list in a stated order.

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# Images a user's folder may hold that no stage reads: left out, with a warning that names them.
UNREAD_IMAGE_EXTENSIONS = {".gif", ".heic", ".heif", ".avif", ".jfif", ".ppm", ".pgm", ".jp2"}


@dataclasses.dataclass
class Sample:
    path: str  # relative to the index root (in a tar-shard set: the name the image would have in a folder set)
    label: int
    shard: str | None = None  # tar-shard sets only: the tar (relative to the root) and the image's bytes in it
    offset: int = 0
    size: int = 0


@dataclasses.dataclass(frozen=True)
class ShardMember:
    """One image inside a tar shard (synthesize.py --output-format wds), read at its recorded offset: random access
    without unpacking, so a shard set is indexed, shuffled and split across processes exactly as a folder set is."""

    tar: Path
    offset: int
    size: int
    name: str

    def read_bytes(self) -> bytes:
        data = os.pread(_shard_fd(self.tar), self.size, self.offset)  # pread: no shared file offset across workers
        if len(data) != self.size:
            raise ImageReadError(f"cannot read image {self}: {self.tar} ends before byte {self.offset + self.size}")
        return data

    def __str__(self) -> str:
        return f"{self.tar}#{self.name}"


_SHARD_FDS: dict[Path, int] = {}  # tar -> fd: one open per shard rather than per image (pread is fork-safe)


def _shard_fd(tar: Path) -> int:
    if tar not in _SHARD_FDS and len(_SHARD_FDS) >= 256:
        for fd in _SHARD_FDS.values():
            os.close(fd)
        _SHARD_FDS.clear()
    if tar not in _SHARD_FDS:
        try:
            _SHARD_FDS[tar] = os.open(tar, os.O_RDONLY)
        except OSError as err:
            raise ImageReadError(f"cannot open shard {tar}: {err}") from err
    return _SHARD_FDS[tar]


@dataclasses.dataclass
class DatasetIndex:
    name: str
    root: Path
    split: str
    samples: list[Sample]
    classes: list[str]  # class ids (wnids, folder names) in label order
    class_names: list[str]  # human-readable names for prompts, same order

    def __len__(self) -> int:
        return len(self.samples)

    def abspath(self, i: int) -> Path | ShardMember:
        """Where image i is: a file, or (tar-shard sets) a member of a tar; load_image reads both."""
        sample = self.samples[i]
        if sample.shard is not None:
            return ShardMember(self.root / sample.shard, sample.offset, sample.size, sample.path)
        return self.root / sample.path

    def image_id(self, i: int) -> str:
        """A stable id for seeds and outputs: the path relative to the root, without extension."""
        return str(Path(self.samples[i].path).with_suffix(""))

    def subset(self, keep: Sequence[bool]) -> "DatasetIndex":
        if len(keep) != len(self.samples):
            raise ValueError(f"subset mask has {len(keep)} entries but the {self.split} split has {len(self)} images")
        kept = [s for s, k in zip(self.samples, keep) if k]
        return dataclasses.replace(self, samples=kept)


def split_fingerprint(index: DatasetIndex) -> str:
    """A short hash of a split's files (relative path, size, mtime): cheap (stat only), and it changes when a file is
    added, removed, replaced or edited, so it can be part of a run's identity. A synthesize.py output is identified by
    its manifest, written once the set is complete: no stat of its (up to 12.8 M) files."""
    if index.name == "synthetic":
        return fingerprint(index.root / "manifest.jsonl")
    return files_fingerprint(index.root, [sample.path for sample in index.samples])


def files_fingerprint(root: Path, rel_paths: Iterable[str]) -> str:
    """split_fingerprint of any list of files under `root`."""
    digest = hashlib.sha256()
    for rel in sorted(rel_paths):
        try:
            stat = (root / rel).stat()
        except FileNotFoundError:  # a dangling link: check_images names it
            stat = (root / rel).lstat()
        digest.update(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# Splits up to this many images are fully decoded by check_images (seconds); larger ones get a header check.
FULL_DECODE_LIMIT = 20_000
CHECK_VERSION = 4  # in the cache's file names: a stricter check (3: end markers; 4: float images) redoes the cached
# Found in the last KiB of a whole file. JPEG's coded data never holds FF D9 (an FF there is followed by 00 or a
# restart marker), so a cut file lacks it, and a few bytes some cameras add after it are fine; PNG ends in IEND.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


def image_problem(path: Path, full_decode: bool) -> str | None:
    """What is wrong with an image file, or None. Decoded fully, or (cheap, for millions of files) its header
    verified and its end marker found: PIL's verify() reads the header only, so a cut file passes it."""
    try:
        with Image.open(path) as img:
            if img.mode in FLOAT_MODES:
                return FLOAT_IMAGE
            img.load() if full_decode else img.verify()
            if not full_decode and img.format in END_MARKERS:
                with open(path, "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - 1024))
                    if END_MARKERS[img.format] not in f.read():
                        return f"truncated {img.format}: no end marker"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _image_problems(index: DatasetIndex) -> dict[str, str]:
    """{relative path: problem} of every bad image of a split: decoded fully up to FULL_DECODE_LIMIT images, else
    each header and end marker."""
    full = len(index) <= FULL_DECODE_LIMIT
    desc = f"checking {index.split} images" + ("" if full else " (headers)")
    problems = (
        (s.path, image_problem(index.root / s.path, full)) for s in progress(index.samples, desc=desc, leave=False)
    )
    return {path: problem for path, problem in problems if problem}


def check_images(index: DatasetIndex, skip_bad: bool = False, cache_dir: str | os.PathLike | None = None, log=None):
    """Check every image of a split before a stage's work starts, and return (the index without bad files, the bad
    files as {relative path: problem}, the split's fingerprint). A bad file is an error naming every one of them
    unless `skip_bad`.

    Splits of up to FULL_DECODE_LIMIT images are decoded fully (a truncated JPEG opens fine and fails only when its
    pixels are read); larger ones get PIL's header check. The result is cached per split fingerprint in `cache_dir`
    (default $REALFAKE_CACHE or ~/.cache/realfake), so a re-run or the next stage on the same split checks nothing
    again."""
    fp = split_fingerprint(index)
    cache_dir = (
        Path(cache_dir or os.environ.get("REALFAKE_CACHE", Path.home() / ".cache" / "realfake")) / "image_checks"
    )
    cache = cache_dir / f"{index.name}-{index.split}-{fp}-{CHECK_VERSION}.json"
    if not cache.is_file():
        # The processes of a launch (and jobs sharing the cache) start at once: one checks, the others then read.
        with _exclusive(cache_dir / f".{cache.name}.lock"):
            if not cache.is_file():
                write_json(cache, _image_problems(index))
    bad = read_json(cache)
    if bad and not skip_bad:
        listed = "\n".join(f"  {index.root / path}: {problem}" for path, problem in sorted(bad.items()))
        raise ImageReadError(
            f"{len(bad)} unreadable image(s) in {index.name} {index.split}:\n{listed}\n"
            "Fix or remove them, or pass --skip-bad (make: SKIP_BAD=1) to leave them out (they are listed in the "
            "manifest)."
        )
    if bad:  # a stage without its logger yet warns on stderr (early_warning)
        early_warning(
            f"--skip-bad: leaving out {len(bad)} unreadable {index.split} image(s): {sorted(bad)[:5]} ...", log
        )
    kept = dataclasses.replace(index, samples=[s for s in index.samples if s.path not in bad]) if bad else index
    return kept, bad, fp


GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def describe_images(index: DatasetIndex, size: int, crop: str = "centre-cropped", sample: int = 256) -> dict:
    """Mode and size of (up to `sample` of) a split's images, read from their headers, and what the stage does with
    them: every image is read as RGB, resized to `size` px and cropped as `crop` says. `grayscale` is true when every
    sampled image is; `rotated` and `transparent` count those with an EXIF orientation or transparency."""
    modes, sizes, rotated, transparent = {}, {}, 0, 0
    for s in index.samples[:: max(1, len(index) // sample)][:sample]:
        try:
            with Image.open(index.root / s.path) as img:
                mode, wh = img.mode, f"{img.width}x{img.height}"
                # PIL decodes a whole PNG to look for an eXIf chunk after its pixels (23 ms for 3 MP, 256 times per
                # process): a PNG's orientation is read where the standard puts it, before them, or not at all
                exif = img.getexif() if img.format != "PNG" or "exif" in img.info else {}
                rotated += exif.get(EXIF_ORIENTATION, 1) != 1
                transparent += img.mode in ALPHA_MODES or "transparency" in img.info
        except (OSError, ValueError, SyntaxError):
            continue  # unreadable: the stage's own bad-image rule (an error or --skip-bad) deals with it
        modes[mode], sizes[wh] = modes.get(mode, 0) + 1, sizes.get(wh, 0) + 1
    return {
        "sampled": sum(modes.values()),
        "modes": modes,
        "sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:5]),
        "rotated": rotated,
        "transparent": transparent,
        "grayscale": bool(modes) and set(modes) <= GRAYSCALE_MODES,
        "processed_as": f"RGB, short side resized to {size} px and {crop}",
    }


def note_unusual_images(description: dict, size: int, log) -> None:
    """Say once what happens to images that are not RGB at `size` px (grayscale, smaller or larger), and warn of
    images that a viewer shows otherwise than every stage reads them (an EXIF rotation, transparency)."""
    others = [m for m in description["modes"] if m != "RGB"]
    resized = [wh for wh in description["sizes"] if wh != f"{size}x{size}"]
    if others or resized:
        log.info(
            f"source images: modes {description['modes']}, sizes {description['sizes']} (of {description['sampled']} "
            f"sampled): read as {description['processed_as']}"
        )
    # Not turned upright or flattened here: every stage, and a timm or torchvision reader of the same files, must see
    # one image, and the paper's datasets are read as stored.
    if rotated := description.get("rotated", 0):
        log.warning(
            f"{rotated} of {description['sampled']} sampled images carry an EXIF rotation: read as stored, not upright "
            "(as timm and torchvision read them); rotate the files first if they lie on their side "
            "(e.g. mogrify -auto-orient)"
        )
    if transparent := description.get("transparent", 0):
        log.warning(
            f"{transparent} of {description['sampled']} sampled images have transparency: read with the alpha dropped "
            "(as timm and torchvision read them), so hidden pixels show their stored colour; flatten the files first "
            "if that matters (e.g. mogrify -background white -flatten)"
        )


class ImageFiles(torch.utils.data.Dataset):
    """(position, transformed RGB image) of each path, for the DataLoaders of the scripts that embed or score images;
    an unreadable file raises ImageReadError naming it."""

    def __init__(self, paths: Sequence, transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return i, self.transform(load_image(self.paths[i]))


def read_lines(path: str | os.PathLike) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def data_file(name: str) -> Path:
    """A class list shipped in data/, which must sit beside this file (a stage copied elsewhere needs it too)."""
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: copy the project's data/ folder beside common.py (README, Layout)")
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory {path} does not exist")
    return path


def list_images(
    folder: Path, recursive: bool = True, unread: list | None = None, listed: dict | None = None
) -> list[Path]:
    """The images in `folder` and, as torchvision's ImageFolder, in its subfolders; hidden files and folders skipped,
    images of other formats (UNREAD_IMAGE_EXTENSIONS) added to `unread`. Linked folders are followed, but each folder
    is listed once: a link to `folder` or above it (a loop), or to a folder in `listed` ({real path: how it was
    reached}; read_imagefolder shares one across a split's classes) is an error. Unchecked, `ln -s . again` listed
    every image some 40 times, a link to `..` ended in ELOOP, and `ln -s ../dog cat/more` labelled dogs cats too."""
    top = Path(os.path.realpath(folder))
    listed = {} if listed is None else listed
    listed.setdefault(str(top), folder)
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for d in dirs:
            real = os.path.realpath(os.path.join(parent, d))
            if top.is_relative_to(real):
                raise ValueError(f"{Path(parent, d)} links to {real}, which holds {folder}: a loop; remove the link")
            _list_once(listed, real, Path(parent, d))
        for f in files:  # one suffix per file, by os.path (IN-1K: 1.28 M files, where each pathlib object costs)
            ext = os.path.splitext(f)[1].lower() if f[0] != "." else ""  # hidden: macOS '._x.gif' is no image
            if ext in IMAGE_EXTENSIONS:
                found.append(Path(parent, f))
            elif unread is not None and ext in UNREAD_IMAGE_EXTENSIONS:
                unread.append(Path(parent, f))
    return sorted(found)


def _list_once(listed: dict, real: str, reached: Path) -> None:
    if real in listed:
        raise ValueError(
            f"{reached} and {listed[real]} are one folder (a symbolic link, or one class's folder inside another's): "
            "its images would be listed twice, or under two classes; remove the link or the nesting"
        )
    listed[real] = reached


def imagenet_class_names() -> dict[str, str]:
    """wnid -> name, from the release's edited CLIP list (all 1000 names unique)."""
    wnids, names = (read_lines(data_file(f"imagenet1k_{kind}.txt")) for kind in ("wnids", "classnames"))
    return dict(zip(wnids, names))


def _unicode_twins(names: Sequence[str], others: Iterable[str]) -> str:
    """A hint when some of `names` equal one of `others` but for their Unicode form, else ''."""
    nfc = {unicodedata.normalize("NFC", o) for o in others}
    if not any(unicodedata.normalize("NFC", n) in nfc for n in names):
        return ""
    return (
        ". Some differ from a name on the other side only in their Unicode form (a folder copied from macOS has "
        "decomposed accents, NFD): write classes.txt with the folders' names as they are on disk"
    )


def read_imagefolder(
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    name: str = "imagefolder",
    split: str = "",
) -> DatasetIndex:
    """`root/<class>/<image>`. Class order: `classes` if given (a wnid list), else classes.txt (in the split folder or
    the one above), else sorted folders. Names: `class_names`, else class_names.txt, else the folder names with '_'
    as ' '."""
    root = _require_dir(Path(root), f"{name} {split}".strip())
    if classes is None:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        classes = _class_file(root, "classes.txt") or folders
        listed = {c.split("/")[0] for c in classes}  # a class id with '/' is a nested folder
        if unlisted := [f for f in folders if f not in listed and list_images(root / f)]:
            raise ValueError(
                f"{name} {split}: image folder(s) under {root} not in classes.txt: {unlisted[:5]}; classes.txt "
                "gives the class order, not a selection: add them to it or move them out"
                + _unicode_twins(unlisted, listed)
            )
    if len(set(classes)) < len(classes):
        repeated = sorted({c for i, c in enumerate(classes) if c in classes[:i]})
        raise ValueError(f"{name} {split}: classes listed twice under {root}: {repeated[:5]}; list each class once")
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        folders = [p.name for p in root.iterdir() if p.is_dir()]
        raise FileNotFoundError(
            f"{name} {split}: class folder(s) missing under {root}: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            + _unicode_twins(missing, folders)
        )
    unread, listed = [], {}
    for c in classes:  # every class folder known before any is walked: a link into a later one is caught too
        _list_once(listed, os.path.realpath(root / c), root / c)
    images = [list_images(root / c, unread=unread, listed=listed) for c in classes]
    if unread:  # before a stage has its logger
        early_warning(
            f"{name} {split}: {len(unread)} image(s) in a format no stage reads left out "
            f"({', '.join(sorted({p.suffix.lower() for p in unread}))}), e.g. {[str(p) for p in unread[:3]]}; "
            f"convert them to one of {', '.join(sorted(IMAGE_EXTENSIONS))} to include them"
        )
    if split == "train" and (empty := [c for c, files in zip(classes, images) if not files]):
        # Found at load, by every stage: a class without training images cannot be learned or synthesized.
        raise ValueError(f"{name} train: class folder(s) with no images under {root}: {empty[:5]}; fill or remove them")
    samples = [Sample(str(p.relative_to(root)), label) for label, files in enumerate(images) for p in files]
    if class_names is None:
        class_names = _class_file(root, "class_names.txt") or [c.replace("_", " ") for c in classes]
    if len(class_names) != len(classes):
        raise ValueError(
            f"{name} {split}: {len(class_names)} class names for {len(classes)} classes under {root} "
            "(class_names.txt): give one name per class, in the class order"
        )
    return DatasetIndex(name, root, split, samples, list(classes), list(class_names))


def _class_file(split_dir: Path, filename: str) -> list[str] | None:
    """The lines of `filename` in the split folder or the dataset folder above it (an error if both exist and
    disagree), or None if neither has it."""
    found = {p: read_lines(p) for p in (split_dir / filename, split_dir.parent / filename) if p.is_file()}
    if len({tuple(lines) for lines in found.values()}) > 1:
        raise ValueError(f"{' and '.join(map(str, found))} disagree: keep one, or make them the same")
    return next(iter(found.values()), None)


HELD_OUT = "held-out"  # the split name that stands for a dataset's held-out split (see held_out_split)


def held_out_split(name: str, root: str | os.PathLike | None) -> str:
    """The held-out split of a dataset: 'val' for the ImageNet sets, 'test' for cub / cars / pets / eurosat, and for an
    ImageFolder (imagefolder, demo) whichever of val/ and test/ exists, an error if both or neither do."""
    if name in WNID_LISTS:
        return "val"
    if name not in ("imagefolder", "demo"):
        return "test"
    root = _require_dir(Path(root if root is not None else dataset_root(name)), name)
    found = [split for split in ("val", "test") if (root / split).is_dir()]
    if len(found) != 1:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"{name} at {root}: the held-out split is val/ or test/, and {'both' if found else 'neither'} exist "
            f"(folders there: {folders}). Keep one, or name the split to use (--test-split NAME; make: "
            "TEST_SPLIT=NAME)."
        )
    return found[0]


def resolve_split(name: str, root, split: str) -> str:
    return held_out_split(name, root) if split == HELD_OUT else split


def read_imagenet_subset(root, split: str, wnids_file: str | os.PathLike, name: str) -> DatasetIndex:
    """ImageNet `root/{train,val}/<wnid>/*.JPEG` (val in class folders, as torchvision's ImageNet prepares it)."""
    wnids = read_lines(wnids_file)
    names = imagenet_class_names()
    return read_imagefolder(Path(root) / split, wnids, [names[w] for w in wnids], name, split)


def read_cub(root, split: str) -> DatasetIndex:
    """CUB_200_2011: images.txt, image_class_labels.txt, train_test_split.txt (1 = train), classes.txt."""
    root = Path(root)
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    _require_dir(base / "images", "cub")
    table = lambda f: dict(line.split(" ", 1) for line in read_lines(base / f))  # noqa: E731
    images, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    classes = [v for _, v in sorted(table("classes.txt").items(), key=lambda kv: int(kv[0]))]
    want = "1" if split == "train" else "0"
    samples = [
        Sample(f"images/{images[i]}", int(labels[i]) - 1) for i in sorted(images, key=int) if is_train[i] == want
    ]
    names = [c.split(".", 1)[-1].replace("_", " ") for c in classes]
    return DatasetIndex("cub", base, split, samples, classes, names)


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist (the layout torchvision's download makes, README)")
    return path


def read_cars(root, split: str) -> DatasetIndex:
    """Stanford Cars in torchvision's layout: root/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat,
    cars_train/, cars_test_annos_withlabels.mat, cars_test/}; .mat class ids are 1-based."""
    from scipy.io import loadmat

    base = Path(root) / "stanford_cars"
    annos, folder = (
        (base / "devkit" / "cars_train_annos.mat", "cars_train")
        if split == "train"
        else (base / "cars_test_annos_withlabels.mat", "cars_test")
    )
    classes = loadmat(_require_file(base / "devkit" / "cars_meta.mat", "cars"), squeeze_me=True)["class_names"]
    rows = np.atleast_1d(loadmat(_require_file(annos, "cars"), squeeze_me=True)["annotations"])
    samples = [Sample(f"stanford_cars/{folder}/{r['fname']}", int(r["class"]) - 1) for r in rows]
    return DatasetIndex("cars", Path(root), split, samples, list(classes), list(classes))


def read_pets(root, split: str) -> DatasetIndex:
    """Oxford-IIIT Pet in torchvision's layout: root/oxford-iiit-pet/{images/<id>.jpg, annotations/<split>.txt} with
    rows "<id> <class id, 1-based> <species> <breed id>"; class names from the ids, as torchvision names them."""
    base = Path(root) / "oxford-iiit-pet"
    table = base / "annotations" / ("trainval.txt" if split == "train" else "test.txt")
    rows = [line.split()[:2] for line in read_lines(_require_file(table, "pets"))]
    samples = [Sample(f"oxford-iiit-pet/images/{image_id}.jpg", int(c) - 1) for image_id, c in rows]
    names = {int(c) - 1: " ".join(w.title() for w in i.rsplit("_", 1)[0].split("_")) for i, c in rows}
    classes = [names[k] for k in sorted(names)]
    return DatasetIndex("pets", Path(root), split, samples, classes, classes)


EUROSAT_SPLIT_SEED = 0  # part of the dataset's definition, never a run's --seed (LiRA shadows must share one split)


def read_eurosat(root, split: str, seed: int = EUROSAT_SPLIT_SEED) -> DatasetIndex:
    """EuroSAT RGB (`root/eurosat/2750/<Class>/*.jpg`): a seeded 80/20 split decided per image id."""
    base = Path(root) / "eurosat" / "2750" if (Path(root) / "eurosat" / "2750").is_dir() else Path(root)
    full = read_imagefolder(base, name="eurosat", split=split)
    in_test = [item_seed(seed, "eurosat-split", s.path) % 5 == 0 for s in full.samples]  # 1 in 5 -> test
    keep = [t == (split != "train") for t in in_test]
    return full.subset(keep)


DATASETS = ("in10", "in100", "in1k", "cub", "cars", "pets", "eurosat", "imagefolder", "demo")
FINE_GRAINED_READERS = {"cub": read_cub, "cars": read_cars, "pets": read_pets, "eurosat": read_eurosat}
WNID_LISTS = {"in10": "imagenette_wnids.txt", "in100": "imagenet100_wnids.txt", "in1k": "imagenet1k_wnids.txt"}
ROOT_KEYS = {
    "in10": "imagenet_root",
    "in100": "imagenet_root",
    "in1k": "imagenet_root",
    "cub": "cub_root",
    "cars": "cars_root",
    "pets": "pets_root",
    "eurosat": "eurosat_root",
}


def data_location(key: str, paths_file: str | os.PathLike = PATHS_FILE) -> str | None:
    """A data location by key (e.g. 'imagenet_root'): the environment variable IMAGENET_ROOT, else
    configs/paths.yaml beside this file."""
    if os.environ.get(key.upper()):
        return os.environ[key.upper()]
    paths = yaml.safe_load(Path(paths_file).read_text()) if Path(paths_file).is_file() else None
    return (paths or {}).get(key) or None


def dataset_root(name: str) -> str:
    """Where dataset `name` lives when no --data-root / data_root is given; an error says how to set it."""
    key = ROOT_KEYS.get(name)
    root = data_location(key) if key else None
    if root is None:
        how = f"set {key.upper()} or fill '{key}' in {PATHS_FILE}, " if key else ""  # where it is read, not cwd
        raise ValueError(f"no data root for dataset '{name}': {how}pass --data-root, or set data_root in the config")
    return root


NO_DATASET = f"no dataset given: pass --dataset (one of {DATASETS}) or a --config that sets it"


def default_run_dir(args: argparse.Namespace, leaf: str) -> Path:
    """<runs-dir>/<dataset>/<leaf>: where a stage's run is when no path is given."""
    if args.dataset is None:
        raise ValueError(f"{NO_DATASET} (or the paths it would set)")
    return Path(args.runs_dir) / args.dataset / leaf


def output_dir(args: argparse.Namespace, leaf: str) -> Path:
    """A stage's --output-dir, by default <runs-dir>/<dataset>/<leaf>."""
    return Path(args.output_dir) if args.output_dir else default_run_dir(args, leaf)


def load_dataset(name: str, root: str | os.PathLike | None, split: str = "train") -> DatasetIndex:
    """One reader per dataset; `split` is 'train' or a test split ('val'/'test' for the real ones, any folder for
    imagefolder/demo, e.g. the demo's shifted sets)."""
    if name is None:
        raise ValueError(NO_DATASET)
    root = dataset_root(name) if root is None else root
    if name in WNID_LISTS:
        return read_imagenet_subset(root, "train" if split == "train" else "val", data_file(WNID_LISTS[name]), name)
    if name in FINE_GRAINED_READERS:
        return FINE_GRAINED_READERS[name](root, split)
    if name in ("imagefolder", "demo"):
        return read_imagefolder(Path(root) / split, name=name, split=split)
    raise ValueError(f"unknown dataset '{name}'; choose one of {DATASETS}")


def load_synthetic(root: str | os.PathLike) -> DatasetIndex:
    """A synthesize.py output: classes and labels from its manifest, never from folder sort order."""
    root = Path(root)
    info, rows = root / "classes.json", root / "manifest.jsonl"
    if not info.is_file() or not rows.is_file():
        if (root / "run_config.json").is_file():  # a run still going, killed, or a job array with jobs to go
            raise FileNotFoundError(
                f"{root} is an unfinished synthesize.py output (run_config.json but no manifest.jsonl yet): finish it "
                "(run the same synthesize.py command again, each --shard i/n job of an array: it resumes; the job "
                "that completes the set writes manifest.jsonl), then run this stage"
            )
        raise FileNotFoundError(f"{root} is not a synthesize.py output (classes.json / manifest.jsonl missing)")
    meta = read_json(info)
    samples = [
        Sample(r["file"], int(r["label"]), r.get("shard"), r.get("offset", 0), r.get("size", 0))
        for r in read_jsonl(rows)
    ]
    return DatasetIndex("synthetic", root, "train", samples, meta["classes"], meta["class_names"])


def warn_if_made_from_other_data(set_dir: str | os.PathLike, real_fingerprint: str) -> str | None:
    """Warn (and return the warning) when a synthesize.py output was made from a train split other than the one a
    stage reads with it: another dataset with the same classes, or these files changed, or copied without their
    times, since. A warning, not an error: a copy of the same images is no other dataset."""
    manifest = Path(set_dir) / "manifest.json"
    config = read_json(manifest)["config"] if manifest.is_file() else {}
    made_from = config.get("source_fingerprint")
    if made_from in (None, real_fingerprint):
        return None
    if config.get("subset_mask"):  # its fingerprint is the selection's: it differs from the whole split's anyway
        message = (
            f"{set_dir} was made from a --subset-mask selection ({config['subset_mask']}) of a train split: its "
            f"fingerprint ({made_from}) is that selection's, so whether that split is this one ({real_fingerprint}) "
            "is not checked"
        )
    else:
        message = (
            f"{set_dir} was made from a train split whose fingerprint ({made_from}) is not this one's "
            f"({real_fingerprint}): another dataset, or its files changed (or were copied without their times) since"
        )
    early_warning(message)
    return message


# ----------------------------------------------------------------------------------------------------------------------
# Training checkpoints (finetune.py per N steps, train_cls.py per epoch): accelerate's save_state, made atomic.


def checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The `checkpoint-<n>` directories as (n, path), oldest first (by n, not by name: 9 before 10)."""
    return sorted((int(p.name[11:]), p) for p in Path(ckpt_dir).glob("checkpoint-*") if p.name[11:].isdigit())


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[Path | None, int]:
    """(the newest `checkpoint-<n>` directory, n), or (None, 0) when there is none yet."""
    found = checkpoints(ckpt_dir)
    return (found[-1][1], found[-1][0]) if found else (None, 0)


def starting_checkpoint(run: RunDir, resume: str) -> tuple[Path | None, int]:
    """(the checkpoint to resume from, its step or epoch; None, 0 for none). `--resume latest`: the newest.
    `never`: none, and the run's earlier checkpoints are moved aside (checkpoints.old, -2, ...): saving keeps the
    highest numbers, so the new run's first checkpoints would be pruned at once and a later resume take the old."""
    ckpt_dir = run.path / "checkpoints"
    if resume == "latest":
        return latest_checkpoint(ckpt_dir)
    if run.is_main and checkpoints(ckpt_dir):
        os.replace(ckpt_dir, unused_path(ckpt_dir.with_name("checkpoints.old")))
    return None, 0


def save_checkpoint(accelerator, run: RunDir, n: int, keep: int, extra: dict | None = None) -> None:
    """accelerate state (and `extra`, as extra.json) saved under a temp name and renamed to
    `<run>/checkpoints/checkpoint-<n>` (a crash mid-save never looks like a checkpoint); only the newest `keep` are
    kept. Every process must call it. `extra` is a file of ours, not accelerate's register_for_checkpointing: its
    load_state refuses a checkpoint saved before an object was registered, so older runs could not resume."""
    ckpt_dir = run.path / "checkpoints"
    tmp, final = ckpt_dir / f".tmp-checkpoint-{n}", ckpt_dir / f"checkpoint-{n}"
    run.check_in_place()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.check_in_place()
        if extra is not None:
            write_json(tmp / "extra.json", extra)
        make_readable(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------------
# Classifiers: eval_ood.py, eval_gap.py and mia_lira.py query what train_cls.py trained, rebuilt from its manifest
# alone.


def top_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """How many images have their target among the top-1 and top-5 logits (k capped at the classes): timm's
    accuracy, its float32 percentages turned back into whole counts, so a figure never depends on the batching
    (5 of 15 came back as 4.9999995)."""
    from timm.utils import accuracy

    top1, top5 = accuracy(logits, targets, topk=(1, 5))
    return round(float(top1) * len(targets) / 100), round(float(top5) * len(targets) / 100)


def load_classifier(run_dir: str | os.PathLike, device: torch.device | str = "cpu"):
    """(model in eval mode, its eval transform, the manifest's `classifier` entry) of a complete train_cls.py run.

    eval() matters: BatchNorm must use its running statistics at query time (tensorflow/privacy#427).
    """
    import timm
    from timm.data import create_transform

    manifest_path = Path(run_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a complete train_cls.py run (no manifest.json); finish training")
    info = read_json(manifest_path)["classifier"]
    model = timm.create_model(
        info["model"], num_classes=info["num_classes"], pretrained=False, **info.get("model_kwargs", {})
    )
    model.load_state_dict(load_file(str(Path(run_dir) / info["weights"])))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in info["eval_transform"].items()}
    return model.to(device).eval(), create_transform(**kwargs, is_training=False), info
