"""Shared fixtures: tiny models built offline from configs and saved in the real library layouts, and tiny data.

The suite never touches the network: HF_HUB_OFFLINE is set before any Hugging Face library is imported.
"""

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("REALFAKE_CACHE", tempfile.mkdtemp(prefix="realfake-cache-"))  # image checks: not in ~/.cache
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402
import demo  # noqa: E402

TINY_CLASSES = ["red_circle", "green_square", "blue_triangle"]


def make_imagefolder(root: Path, classes, per_class: int, size: int = 32, seed: int = 0, ext: str = ".png") -> Path:
    """An ImageFolder split whose classes differ in colour, so tiny models can tell them apart."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.float32)
            base[..., label % 3] = 200
            noisy = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / name / f"{name}_{i:03d}{ext}")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "class_names.txt").write_text("\n".join(c.replace("_", " ") for c in classes) + "\n")
    return root


def moved_aside_before(monkeypatch, module, name: str, run_dir: Path) -> None:
    """`module.name` first moves the run in `run_dir` aside, as --overwrite from another command would (a new run in
    its place), then does its work: the stage running it must write nothing more into `run_dir`."""
    work = getattr(module, name)

    def moved_meanwhile(*args, **kwargs):
        common.RunDir(run_dir, {"another": "config"}, overwrite=True).start()
        return work(*args, **kwargs)

    monkeypatch.setattr(module, name, moved_meanwhile)


def as_made_before(run_dir: Path, **config) -> None:
    """Rewrite a run's saved config (manifest.json and run_config.json) as an older version made it: `config`'s keys
    set, a value None left unset."""
    for name in ("manifest.json", "run_config.json"):
        saved = json.loads((run_dir / name).read_text())
        saved["config"].update(config)
        (run_dir / name).write_text(json.dumps(saved))


@contextlib.contextmanager
def writer_elsewhere(run_dir: Path, part: tuple[int, int] = (0, 1)):
    """Another live process holding the writer lock of part i/n of `run_dir` (0/1: a re-run of the same command), as
    a writer takes it, until the block ends; yields its pid."""
    script = "import common, sys; common._hold_writer_lock(common.Path(sys.argv[1])); print('holding', flush=True)"
    lock = run_dir / f".writer-{part[0]}of{part[1]}.lock"
    command = [sys.executable, "-c", script + "; sys.stdin.read()", str(lock)]
    holder = subprocess.Popen(command, cwd=common.PROJECT_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        yield holder.pid
    finally:
        holder.communicate("")  # its stdin closed: it ends, and the kernel drops its lock
    assert holder.returncode == 0


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each stage runs in its own process in real use; here many share one, and accelerate keeps its state (mixed
    precision, device) per process. Resetting it lets a test pick its own precision (on a GPU, `auto` differs)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A demo-layout dataset root: train/ (3 classes x 4 images) and test/ (3 x 2), 32 px PNGs."""
    root = tmp_path_factory.mktemp("tiny_data")
    make_imagefolder(root / "train", TINY_CLASSES, 4, seed=0)
    make_imagefolder(root / "test", TINY_CLASSES, 2, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """An untrained tiny SD-1.x pipeline in the diffusers layout (from_pretrained(dir) works)."""
    out = tmp_path_factory.mktemp("tiny_sd")
    words = ["photo", "of"] + [w for c in TINY_CLASSES for w in c.split("_")]
    demo.build_generator(out, words)
    return out


@pytest.fixture(scope="session")
def tiny_clip_vision(tmp_path_factory) -> Path:
    """A tiny CLIPVisionModelWithProjection (+ processor) whose projection width equals tiny_sd's text width."""
    out = tmp_path_factory.mktemp("tiny_clip_vision")
    demo.build_image_encoder(out)
    return out


@pytest.fixture(scope="session")
def tiny_lora(tiny_sd, tmp_path_factory) -> Path:
    """A finetune.py-like output: a peft LoRA with non-zero weights in the diffusers format + class-mean tokens."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("tiny_lora")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    torch.manual_seed(1)  # peft draws lora_A from the global generator: seed first, or the weights depend on test order
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in unet.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (a no-op LoRA); make it matter
            param.data.normal_(0, 0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    save_file({"tokens": torch.randn(3, 64)}, str(out / "visual_guidance.safetensors"))
    (out / "visual_guidance.json").write_text(
        json.dumps(
            {
                "mode": "class-mean",
                "placement": "append",
                "classes": ["red_circle", "green_square", "blue_triangle"],
                "encoder": "tiny",
                "images_per_class": 4,
            }
        )
    )
    return out


# synthesize.py / bench.py synth arguments for the tiny pipeline. --compile off: on a GPU, auto would compile the
# tiny UNet again in every test for no gain.
FAST = "--steps 4 --strength 0.5 --num-workers 0 --write-workers 2 --resolution 32 --compile off".split()


def args_for(tiny_sd, tiny_dataset, out, *extra, lora=None) -> list[str]:
    base = ["--dataset", "demo", "--data-root", str(tiny_dataset), "--pretrained-model", str(tiny_sd)]
    base += ["--output-dir", str(out), "--seed", "0", *FAST]
    return base + (["--lora-dir", str(lora)] if lora else []) + [str(e) for e in extra]
