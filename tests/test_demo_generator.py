"""The shipped demo generator (demo_generator/): what `make demo` starts from is the generator that was measured, and
`make demo-generator` rebuilds it with the recorded recipe."""

import json

import torch

import common
import demo

SHIPPED = common.PROJECT_DIR / "demo_generator"


def test_shipped_generator_is_the_measured_one_and_loads_as_sd15_does():
    """demo_generator/ (what `make demo` starts from): every file the stages load is the one its manifest hashed,
    the weights are fp16 and within the 16 MiB budget, and plain from_pretrained gives fp32 models."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from transformers import CLIPVisionModelWithProjection

    manifest = common.read_json(SHIPPED / "manifest.json")
    on_disk = sorted(str(p.relative_to(SHIPPED)) for sub in ("sd", "clip_vision") for p in (SHIPPED / sub).rglob("*"))
    on_disk = [rel for rel in on_disk if (SHIPPED / rel).is_file()]
    assert sorted(manifest["files"]) == on_disk
    for rel, digest in manifest["files"].items():
        assert common.hash_file(SHIPPED / rel) == digest, f"{rel} is not the file the manifest measured"
    weights = [SHIPPED / rel for rel in on_disk if rel.endswith(".safetensors")]
    assert len(weights) == 4 and sum(w.stat().st_size for w in weights) <= 16 * 2**20
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float16 for w in weights for t in load_file(w).values())
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(SHIPPED / "sd", safety_checker=None)
    vision = CLIPVisionModelWithProjection.from_pretrained(SHIPPED / "clip_vision")
    for model in (pipe.unet, pipe.vae, pipe.text_encoder, vision):
        assert model.dtype == torch.float32
    for key in ("t2i_class_acc", "img2img_class_acc", "denoise_class_acc", "image_encoder_ncm_acc"):
        assert 0.0 <= manifest["metrics"][key] <= 1.0


def test_shipped_generator_recipe_is_what_make_demo_generator_runs():
    """The recorded config equals the one `demo.py generator --config configs/demo.yaml` builds from today's code, so
    `make demo-generator` rebuilds the shipped generator's recipe (a drift here needs a rebuild or a config entry)."""
    args = common.parse_args(demo.get_parser(), ["generator", "--config", "configs/demo.yaml"], "demo")
    recorded = common.read_json(SHIPPED / "manifest.json")["config"]
    assert recorded == json.loads(json.dumps({k: getattr(args, k) for k in demo.GENERATOR_KEYS}))


def test_all_tracked_weights_fit_the_budget():
    """At most 16 MiB of weight files in the repository, all of them together (git keeps every copy forever)."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("git") is None or not (common.PROJECT_DIR / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt"],
        cwd=common.PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sum((common.PROJECT_DIR / f).stat().st_size for f in tracked) <= 16 * 2**20
