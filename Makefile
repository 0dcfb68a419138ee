# Real-Fake: the paper's experiments as file targets. Each stage's target is its manifest.json, written last by the
# stage, so a re-run does only what is missing; a stage whose config changed stops and names the changed keys
# (re-run with OVERWRITE=1 to move the old run aside). `make help` lists everything.

SHELL := /bin/bash
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
# Manifests are the chain's file targets: never delete them as intermediates.
.SECONDARY:

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed

DATASET ?= in10
SCALE   ?= 1
SCALES  ?= $(SCALE)
MODE    ?= synth
SHADOWS ?= 16
LAUNCH  ?= python
GPUS    ?= 1
OVERWRITE ?=
ARGS    ?=

CONFIG  := configs/$(DATASET).yaml
RUNS    := runs/$(DATASET)
# How a stage is launched: plain python (CPU or one GPU) or accelerate (multi-GPU / multi-node; see README).
ifeq ($(LAUNCH),python)
RUN := $(PY)
else ifeq ($(LAUNCH),accelerate)
RUN := $(VENV)/bin/accelerate launch --config_file configs/accelerate/$(GPUS)gpu.yaml
else
RUN := $(LAUNCH)
endif
OVERWRITE_FLAG := $(if $(OVERWRITE),--overwrite,)
STAGE_FLAGS = --config $(CONFIG) $(OVERWRITE_FLAG) $(ARGS)

# Captions only for the ImageNet sets (paper App. E); the fine-grained sets prompt with the class name alone.
CAPTIONED := in10 in100 in1k
CAPTIONS_FILE := $(if $(filter $(DATASET),$(CAPTIONED)),$(RUNS)/captions/captions.jsonl,)
CAPTIONS_DEP  := $(if $(CAPTIONS_FILE),$(RUNS)/captions/manifest.json,)
CAPTIONS_FLAG := $(if $(CAPTIONS_FILE),--captions $(CAPTIONS_FILE),)
# Out-of-distribution sets for the ImageNet datasets, evaluated only when their paths are configured.
OOD_SETS := $(if $(filter $(DATASET),$(CAPTIONED)),val imagenet-v2 imagenet-sketch imagenet-r imagenet-a,test)

help:
	@echo "Targets"
	@echo "  make demo                 whole pipeline on the embedded demo (offline, CPU, minutes)"
	@echo "  make demo-ablation        demo + paper Tab. 2 / Fig. 2 analogues"
	@echo "  make test                 test suite (offline, CPU)"
	@echo "  make bench                all benchmarks (bench-finetune, bench-synth, bench-train)"
	@echo "  make <dataset>            caption -> finetune -> synthesize xSCALE -> train_cls (MODE) -> eval"
	@echo "                            datasets: in10 in100 in1k cub cars pets eurosat"
	@echo "  make <dataset>-all        the same for MODE=real, synth and mix"
	@echo "  make mia DATASET=in10 SHADOWS=16   LiRA membership inference (both arms)"
	@echo "  make sscd DATASET=in10    SSCD copy detection, synthetic vs real"
	@echo "  make venv                 create .venv and install requirements.txt (every target does it when needed)"
	@echo "Variables"
	@echo "  SCALE=1   synthetic images per real image (fractional allowed)   SCALES=\"1 2 5 10\" sweeps"
	@echo "  MODE=synth|real|mix       classifier training data (paper Tab. 1)"
	@echo "  LAUNCH=python|accelerate  GPUS=1|8 picks configs/accelerate/<GPUS>gpu.yaml"
	@echo "  OVERWRITE=1               re-run a stage whose config changed (old run is moved aside)"
	@echo "  ARGS='--flag v'           extra flags for every stage of the chain"
	@echo "Data locations: configs/paths.yaml or environment variables (IMAGENET_ROOT, CUB_ROOT, ...)."

# ------------------------------------------------------------------------------------------------------- set-up
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

venv: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q tests

.PHONY: help venv test bench bench-finetune bench-synth bench-train demo demo-ablation mia sscd \
        in10 in100 in1k cub cars pets eurosat in10-all in100-all in1k-all cub-all cars-all pets-all eurosat-all

# ------------------------------------------------------------------------------------------------------- paper chain
DATASETS := in10 in100 in1k cub cars pets eurosat
$(DATASETS): $(STAMP)
	$(MAKE) --no-print-directory pipeline DATASET=$@

$(addsuffix -all,$(DATASETS)): $(STAMP)
	for mode in real synth mix; do $(MAKE) --no-print-directory pipeline DATASET=$(@:-all=) MODE=$$mode || exit 1; done

CLS_DIRS := $(if $(filter real,$(MODE)),$(RUNS)/cls_real,$(foreach s,$(SCALES),$(RUNS)/cls_$(MODE)_x$(s)))
pipeline: $(patsubst $(RUNS)/%,$(RUNS)/eval/%/manifest.json,$(CLS_DIRS))

$(RUNS)/captions/manifest.json: $(CONFIG) | $(STAMP)
	$(RUN) caption.py $(STAGE_FLAGS) --output-dir $(@D)

$(RUNS)/finetune/manifest.json: $(CONFIG) $(CAPTIONS_DEP) | $(STAMP)
	$(RUN) finetune.py $(STAGE_FLAGS) $(CAPTIONS_FLAG) --output-dir $(@D)

# One synthesis directory serves every scale: image k of source s has seed item_seed(seed, s, k), so xN is a prefix
# of xM for N < M and a sweep only adds the missing copies.
$(RUNS)/synth/manifest_x%.json: $(RUNS)/finetune/manifest.json | $(STAMP)
	$(RUN) synthesize.py $(STAGE_FLAGS) $(CAPTIONS_FLAG) --lora-dir $(RUNS)/finetune --scale $* --output-dir $(@D)

$(RUNS)/cls_real/manifest.json: $(CONFIG) | $(STAMP)
	$(RUN) train_cls.py $(STAGE_FLAGS) --train-data real --output-dir $(@D)

$(RUNS)/cls_synth_x%/manifest.json: $(RUNS)/synth/manifest_x%.json | $(STAMP)
	$(RUN) train_cls.py $(STAGE_FLAGS) --train-data $(RUNS)/synth --synthetic-scale $* --output-dir $(@D)

$(RUNS)/cls_mix_x%/manifest.json: $(RUNS)/synth/manifest_x%.json | $(STAMP)
	$(RUN) train_cls.py $(STAGE_FLAGS) --train-data real $(RUNS)/synth --synthetic-scale $* --output-dir $(@D)

$(RUNS)/eval/%/manifest.json: $(RUNS)/%/manifest.json | $(STAMP)
	$(RUN) eval_ood.py $(STAGE_FLAGS) --run-dir $(RUNS)/$* --sets $(OOD_SETS) --output-dir $(@D)

mia: $(STAMP)
	$(PY) mia_lira.py --config $(CONFIG) --shadows $(SHADOWS) $(OVERWRITE_FLAG) $(ARGS) --output-dir $(RUNS)/mia

sscd: $(RUNS)/synth/manifest_x$(SCALE).json
	$(PY) sscd_sim.py --config $(CONFIG) --synthetic-dir $(RUNS)/synth $(OVERWRITE_FLAG) $(ARGS) --output-dir $(RUNS)/sscd
