"""Every shipped config parses for every stage: no unknown key, every value of the right type."""

import importlib
from pathlib import Path

import pytest

import common

CONFIGS = sorted(p for p in (common.PROJECT_DIR / "configs").glob("*.yaml") if p.name != "paths.yaml")
STAGES = ["caption", "finetune", "synthesize", "train_cls", "eval_ood", "eval_gap", "mia_lira", "sscd_sim", "demo"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_section_parses(config: Path, stage: str):
    module = importlib.import_module(stage)
    command = ["data"] if stage == "demo" else []  # demo.py's one positional argument
    args = common.parse_args(module.get_parser(), [*command, "--config", str(config)], stage)
    assert args.dataset == config.stem.removesuffix("_paper")  # the shared key reached the stage


def test_every_paper_dataset_has_a_config():
    assert {p.stem for p in CONFIGS} == {
        *("in10", "in100", "in1k", "cub", "cars", "pets", "eurosat", "demo"),
        *("imagefolder", "imagefolder_paper"),  # make imagefolder PRESET=cpu | paper
    }
