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
# SKIP_BAD=1: leave unreadable images out (and list them), instead of failing, in the chain's stages that read the real
# images (caption, finetune, synthesize, train_cls, eval_gap, eval_ood; not make mia's shadows).
SKIP_BAD ?=
# TEST_SPLIT=NAME: the real held-out split of the stages that read it (train_cls, also LiRA's shadows; eval_gap;
# eval_ood, where --sets names held-out); default: val/ or test/, whichever exists.
TEST_SPLIT ?=
ARGS    ?=
PLAN    ?=
# Synthetic-set layout: folder (one file per image) or wds (tar shards, for cluster file systems; README, Storage).
FORMAT  ?=

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
FORMAT_FLAG := $(if $(FORMAT),--output-format $(FORMAT),)
SKIP_FLAG := $(if $(SKIP_BAD),--skip-bad,)
TEST_FLAG := $(if $(TEST_SPLIT),--test-split $(TEST_SPLIT),)
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
	@echo "  make demo-ablation        paper Tab. 2 / Fig. 2 analogues on the demo (ABL_SEEDS=\"0 1 2 3 4\")"
	@echo "  make demo-generator       rebuild the shipped demo generator from scratch (about 95 min on a CPU)"
	@echo "  make test                 test suite (offline, CPU)"
	@echo "  make lint                 ruff format --check + ruff check (ruff.toml)"
	@echo "  make bench                all benchmarks (bench-finetune, bench-synth, bench-train)"
	@echo "  make bench-gpu            the three at paper scale on a GPU (SD1.5-shaped random weights, ResNet-50)"
	@echo "                            (bench-synth / bench-gpu: ARGS=\"...\" adds bench.py synth flags, e.g. --compile off)"
	@echo "  make <dataset>            caption -> finetune -> synthesize xSCALE -> train_cls (MODE) -> eval"
	@echo "                            datasets: in10 in100 in1k cub cars pets eurosat"
	@echo "  make <dataset>-all        the same for MODE=real, synth and mix"
	@echo "  make imagefolder DATA=DIR your own ImageFolder: the -all chain + report in runs/<DIR name>/"
	@echo "                            (NAME=..., PRESET=cpu: demo generator | paper: SD 1.5, configs/imagefolder_paper.yaml)"
	@echo "  make gap DATASET=in10 SCALE=1      distribution gap of synth_x<SCALE> vs real (eval_gap.py; FEATURES=...)"
	@echo "  make mia DATASET=in10 SHADOWS=16   LiRA membership inference (both arms)"
	@echo "  make sscd DATASET=in10    SSCD copy detection, synthetic vs real"
	@echo "  make venv                 create .venv and install requirements.txt (every target does it when needed)"
	@echo "Variables"
	@echo "  SCALE=1   synthetic images per real image (fractional allowed)   SCALES=\"1 2 5 10\" sweeps"
	@echo "  MODE=synth|real|mix       classifier training data (paper Tab. 1)"
	@echo "  LAUNCH=python|accelerate  GPUS=1|8 picks configs/accelerate/<GPUS>gpu.yaml"
	@echo "  OVERWRITE=1               re-run a stage whose config changed (old run is moved aside)"
	@echo "  FORMAT=wds                synthetic sets as tar shards (default: folder, one file per image)"
	@echo "  SKIP_BAD=1                the chain leaves unreadable real images out (listed in manifests), not failing"
	@echo "  TEST_SPLIT=NAME           the real held-out split (default: val/ or test/, whichever exists)"
	@echo "  PLAN=1                    print images, files, TB and GPU-hours of the chain, run nothing"
	@echo "  ARGS='--flag v'           extra flags for every stage of the chain"
	@echo "Data locations: configs/paths.yaml or environment variables (IMAGENET_ROOT, CUB_ROOT, ...)."

# ------------------------------------------------------------------------------------------------------- set-up
# Up to date means installed after requirements.txt changed: `make -B` (README) then reinstalls nothing.
$(STAMP): requirements.txt
	@if [ -f $@ ] && ! [ requirements.txt -nt $@ ]; then exit 0; fi; set -e; \
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV); \
	echo "installing requirements.txt into $(VENV)"; \
	$(PY) -m pip install --quiet --upgrade pip; \
	$(PY) -m pip install --quiet -r requirements.txt; \
	touch $@

venv: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q tests

# The house style's formatter and linter (ruff.toml); `$(VENV)/bin/ruff format .` applies the formatting.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

.PHONY: help venv test lint bench bench-finetune bench-synth bench-train bench-gpu demo demo-ablation demo-generator gap mia sscd \
        imagefolder in10 in100 in1k cub cars pets eurosat in10-all in100-all in1k-all cub-all cars-all pets-all eurosat-all

# ------------------------------------------------------------------------------------------------------- paper chain
DATASETS := in10 in100 in1k cub cars pets eurosat
$(DATASETS): $(STAMP)
ifeq ($(PLAN),)
	$(MAKE) --no-print-directory pipeline DATASET=$@
else
	$(PY) synthesize.py --config configs/$@.yaml --scale $(SCALE) $(FORMAT_FLAG) --plan $(ARGS)
endif

$(addsuffix -all,$(DATASETS)): $(STAMP)
	for mode in real synth mix; do $(MAKE) --no-print-directory pipeline DATASET=$(@:-all=) MODE=$$mode || exit 1; done

CLS_DIRS := $(if $(filter real,$(MODE)),$(RUNS)/cls_real,$(foreach s,$(SCALES),$(RUNS)/cls_$(MODE)_x$(s)))
# The distribution gap of every synthetic set of the chain (eval_gap.py: minutes, before the classifier's GPU-days).
GAP_MANIFESTS := $(if $(filter real,$(MODE)),,$(foreach s,$(SCALES),$(RUNS)/gap_synth_x$(s)$(GAP_TAG)/manifest.json))
pipeline: $(GAP_MANIFESTS) $(patsubst $(RUNS)/%,$(RUNS)/ood_%/manifest.json,$(CLS_DIRS))

$(RUNS)/captions/manifest.json: $(CONFIG) | $(STAMP)
	$(RUN) caption.py $(STAGE_FLAGS) $(SKIP_FLAG) --output-dir $(@D)

$(RUNS)/finetune/manifest.json: $(CONFIG) $(CAPTIONS_DEP) | $(STAMP)
	$(RUN) finetune.py $(STAGE_FLAGS) $(SKIP_FLAG) $(CAPTIONS_FLAG) --output-dir $(@D)

# Image k of source s has seed item_seed(seed, s, k), so xN is a prefix of xM for N < M: a larger scale hard-links
# the images of every smaller scale already on disk (--reuse-from) and generates only the missing copies. The shell
# globs them when the recipe runs: $(wildcard) reads make's cached folder listing, which misses the sets an earlier
# recipe of the same make (a SCALES sweep) made.
$(RUNS)/synth_x%/manifest.json: $(RUNS)/finetune/manifest.json | $(STAMP)
	$(RUN) synthesize.py $(STAGE_FLAGS) $(SKIP_FLAG) $(CAPTIONS_FLAG) $(FORMAT_FLAG) --lora-dir $(RUNS)/finetune --scale $* \
		--reuse-from $$(shopt -s nullglob; echo $(RUNS)/synth_x*) --output-dir $(@D)

# A classifier stopped by --epochs-per-job (a time-limited job) has no manifest yet: the chain stops there.
CLS_DONE = @test -f $@ || { echo "$(@D): not finished (--epochs-per-job): run the same make again to go on"; exit 3; }

$(RUNS)/cls_real/manifest.json: $(CONFIG) | $(STAMP)
	$(RUN) train_cls.py $(STAGE_FLAGS) $(SKIP_FLAG) $(TEST_FLAG) --train-dirs real --output-dir $(@D)
	$(CLS_DONE)

$(RUNS)/cls_synth_x%/manifest.json: $(RUNS)/synth_x%/manifest.json | $(STAMP)
	$(RUN) train_cls.py $(STAGE_FLAGS) $(SKIP_FLAG) $(TEST_FLAG) --train-dirs $(<D) --output-dir $(@D)
	$(CLS_DONE)

$(RUNS)/cls_mix_x%/manifest.json: $(RUNS)/synth_x%/manifest.json | $(STAMP)
	$(RUN) train_cls.py $(STAGE_FLAGS) $(SKIP_FLAG) $(TEST_FLAG) --train-dirs real $(<D) --output-dir $(@D)
	$(CLS_DONE)

# The eval sets come from the config's eval_ood section; an OOD set whose path is not configured is skipped.
$(RUNS)/ood_%/manifest.json: $(RUNS)/%/manifest.json | $(STAMP)
	$(RUN) eval_ood.py $(STAGE_FLAGS) $(SKIP_FLAG) $(TEST_FLAG) --classifier $(<D) --output-dir $(@D)

# Bring your own dataset: the chain for MODE=real, synth and mix, then a report, on DIR/train + DIR/val (or test).
# PRESET=cpu (configs/imagefolder.yaml, the shipped demo generator) or paper (configs/imagefolder_paper.yaml, SD 1.5).
PRESET ?= cpu
NAME   ?= $(notdir $(abspath $(DATA)))
IMAGEFOLDER_CFG := configs/imagefolder$(if $(filter paper,$(PRESET)),_paper,).yaml
# All three training modes, unless MODE=... is given on the command line (then that one, as for the paper datasets).
IMAGEFOLDER_MODES := $(if $(filter command line,$(origin MODE)),$(MODE),real synth mix)
# What make (a space: it splits the value there) or the recipes' shell would misread in DATA.
SHELL_SYNTAX := ' " ( ) & ; | < > * ? `
DATA_SYNTAX = $(strip $(if $(word 2,$(DATA)),space) $(foreach c,$(SHELL_SYNTAX),$(findstring $(c),$(DATA))))
imagefolder: $(STAMP)
	@test -n "$(DATA)" || { echo "usage: make imagefolder DATA=DIR [NAME=name] [PRESET=cpu|paper] [SCALE=1]"; exit 2; }
	$(if $(DATA_SYNTAX),$(error DATA has characters make or the shell would misread: $(DATA_SYNTAX); use a plain \
	path, a symlink will do))
	@test -d "$(DATA)/train" || { echo "$(DATA)/train does not exist: the layout is DIR/train/<class>/<images> and \
	DIR/val/ (or DIR/test/) with the same class folders (README, Bring your own dataset)"; exit 2; }
ifeq ($(PLAN),)
	@mkdir -p runs/$(NAME); f=runs/$(NAME)/data_root.txt; if [ -f $$f ] && [ "$$(cat $$f)" != "$(abspath $(DATA))" ]; \
	then echo "runs/$(NAME) holds the chain of $$(cat $$f), not of $(abspath $(DATA)): pass NAME=<another name>"; \
	exit 2; fi; echo "$(abspath $(DATA))" > $$f
	for mode in $(IMAGEFOLDER_MODES); do $(MAKE) --no-print-directory pipeline DATASET=imagefolder MODE=$$mode \
		CONFIG=$(IMAGEFOLDER_CFG) RUNS=runs/$(NAME) ARGS="--data-root $(abspath $(DATA)) $(ARGS)" || exit 1; done
	$(PY) demo_report.py report --config $(IMAGEFOLDER_CFG) --output-dir runs/$(NAME) --data-root $(abspath $(DATA))
	@echo "done: runs/$(NAME)/report.md, runs/$(NAME)/summary.json"
else
	$(PY) synthesize.py --config $(IMAGEFOLDER_CFG) --data-root $(abspath $(DATA)) --scale $(SCALE) $(FORMAT_FLAG) \
		--plan $(ARGS)
endif

# The distribution gap of a synthetic set before any classifier trains on it (eval_gap.py; FEATURES=clip|inception|...).
# Features other than the default get a run dir of their own, gap_synth_x<N>_<features>.
FEATURES ?=
GAP_TAG = $(if $(FEATURES),_$(subst /,_,$(subst :,_,$(FEATURES))))
gap: $(RUNS)/gap_synth_x$(SCALE)$(GAP_TAG)/manifest.json

$(RUNS)/gap_synth_x%$(GAP_TAG)/manifest.json: $(RUNS)/synth_x%/manifest.json | $(STAMP)
	$(RUN) eval_gap.py $(STAGE_FLAGS) $(SKIP_FLAG) $(TEST_FLAG) --synthetic-dir $(<D) $(if $(FEATURES),--features $(FEATURES),) --output-dir $(@D)

mia: $(STAMP)
	$(PY) mia_lira.py --config $(CONFIG) --num-shadows $(SHADOWS) $(OVERWRITE_FLAG) $(TEST_FLAG) $(ARGS) \
		--output-dir $(RUNS)/mia_lira

# SSCD needs the descriptor file: SSCD_MODEL=/path/sscd_disc_large.torchscript.pt (see README, "Privacy").
SSCD_MODEL ?= sscd_disc_large.torchscript.pt
sscd: $(RUNS)/synth_x$(SCALE)/manifest.json
	$(PY) sscd_sim.py --config $(CONFIG) --model $(SSCD_MODEL) --synthetic-dir $(RUNS)/synth_x$(SCALE) \
		$(OVERWRITE_FLAG) $(ARGS) --output-dir $(RUNS)/sscd_x$(SCALE)

# ------------------------------------------------------------------------------------------------------- demo
# The same scripts on the embedded demo. One OpenMP thread per process (two threads on two shared cores ran the
# tiny UNet several times slower), and independent runs two at a time: LiRA shadows as two --shard jobs. Each stage prints its elapsed time and appends it to runs/demo/timings.tsv.
DEMO    := runs/demo
DEMO_PY := OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY)
DEMO_CFG := --config configs/demo.yaml $(OVERWRITE_FLAG)
# The reports only read the runs: no --overwrite (demo_report.py has no run of its own to move aside).
REPORT_CFG := --config configs/demo.yaml
GPU_PY  := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY)
TIMINGS  = $(DEMO)/timings.tsv
timed = @start=$$(date +%s); $(2) || exit 1; t=$$(( $$(date +%s) - start )); \
	echo "[demo] $(1): $$t s"; printf '%s\t%s\n' "$(1)" "$$t" >> $(TIMINGS)
# Runs the command lines on stdin two at a time (two cores); the first failure stops the rest.
PAR2 := xargs -d '\n' -P 2 -I{} bash -c '{} || exit 255'

demo: $(STAMP)
	@mkdir -p $(DEMO); : > $(DEMO)/timings.tsv
	$(call timed,data,$(DEMO_PY) demo.py data $(DEMO_CFG))
	$(call timed,finetune,$(DEMO_PY) finetune.py $(DEMO_CFG) --output-dir $(DEMO)/finetune)
	$(call timed,synthesize,$(DEMO_PY) synthesize.py $(DEMO_CFG) --output-dir $(DEMO)/synth_x1)
	$(call timed,eval_gap,$(DEMO_PY) eval_gap.py $(DEMO_CFG) --synthetic-dir $(DEMO)/synth_x1 \
		--output-dir $(DEMO)/gap_synth_x1)
	$(call timed,train_cls real + synth,$(DEMO_PY) train_cls.py $(DEMO_CFG) --train-dirs real \
		--output-dir $(DEMO)/cls_real & pid=$$!; $(DEMO_PY) train_cls.py $(DEMO_CFG) --train-dirs $(DEMO)/synth_x1 \
		--output-dir $(DEMO)/cls_synth_x1 && wait $$pid)
	$(call timed,train_cls mix,$(DEMO_PY) train_cls.py $(DEMO_CFG) --train-dirs real $(DEMO)/synth_x1 \
		--output-dir $(DEMO)/cls_mix_x1)
	$(call timed,eval_ood,for r in cls_real cls_synth_x1 cls_mix_x1; do \
		$(DEMO_PY) eval_ood.py $(DEMO_CFG) --classifier $(DEMO)/$$r --output-dir $(DEMO)/ood_$$r || exit 1; done)
	$(call timed,sscd_sim,$(DEMO_PY) sscd_sim.py $(DEMO_CFG) --make-standin $(DEMO)/sscd_standin.torchscript.pt && \
		$(DEMO_PY) sscd_sim.py $(DEMO_CFG) --output-dir $(DEMO)/sscd_synth_x1)
	$(call timed,mia_lira,$(DEMO_PY) mia_lira.py $(DEMO_CFG) --output-dir $(DEMO)/mia_lira --shard 0/2 & pid=$$!; \
		$(DEMO_PY) mia_lira.py $(DEMO_CFG) --output-dir $(DEMO)/mia_lira --shard 1/2 && wait $$pid && \
		$(DEMO_PY) mia_lira.py $(DEMO_CFG) --output-dir $(DEMO)/mia_lira)
	$(call timed,report,$(DEMO_PY) demo_report.py report $(REPORT_CFG))
	@echo "[demo] done: $(DEMO)/report.md, $(DEMO)/summary.json"

# The shipped generator (demo_generator/, which `make demo` starts from) rebuilt from scratch with its recorded
# recipe (configs/demo.yaml + demo.py's defaults) into GENERATOR_OUT; copy that folder over demo_generator/ to ship it.
GENERATOR_OUT ?= $(DEMO)/generator
demo-generator: $(STAMP)
	$(DEMO_PY) demo.py data $(DEMO_CFG)
	$(DEMO_PY) demo.py generator $(DEMO_CFG) --output-dir $(GENERATOR_OUT)

# Paper Tab. 2 and Fig. 2 in miniature: the demo chain with latent prior (strength 0.75 vs 1.0 = text-to-image),
# visual guidance (--vg-mode none) and MMD (--mmd-weight 0) switched off in turn, and synthetic sets at x2 and x4
# (extending the demo's x1: same seeds); every classifier trained with each seed of ABL_SEEDS. Stages already
# complete are no-ops, so an interrupted run resumes. Report: runs/demo/ablation/report.md and scaling.png.
ABL       := $(DEMO)/ablation
ABL_SEEDS ?= 0 1 2 3 4
ABL_SYN   := $(DEMO_PY) synthesize.py $(DEMO_CFG)
# <row>:<training data> for every classifier, largest sets first so the two parallel slots finish together.
ABL_SETS  := x4:$(ABL)/synth_x4 x2:$(ABL)/synth_x2 none:$(ABL)/synth_none lp:$(ABL)/synth_lp \
             no_lp:$(ABL)/synth_no_lp no_vg:$(ABL)/synth_no_vg no_mmd:$(ABL)/synth_no_mmd all:$(DEMO)/synth_x1 real:real

demo-ablation: TIMINGS = $(ABL)/timings.tsv
demo-ablation: $(STAMP)
	@mkdir -p $(ABL); : > $(ABL)/timings.tsv
	$(call timed,demo data + finetune + synth x1,$(DEMO_PY) demo.py data $(DEMO_CFG) && \
		$(DEMO_PY) finetune.py $(DEMO_CFG) --output-dir $(DEMO)/finetune && \
		$(ABL_SYN) --output-dir $(DEMO)/synth_x1)
	$(call timed,finetune without VG / without MMD,printf '%s\n' \
		"$(DEMO_PY) finetune.py $(DEMO_CFG) --vg-mode none --output-dir $(ABL)/ft_no_vg" \
		"$(DEMO_PY) finetune.py $(DEMO_CFG) --mmd-weight 0 --output-dir $(ABL)/ft_no_mmd" | $(PAR2))
	$(call timed,synthesize rows and scales,printf '%s\n' \
		"$(ABL_SYN) --scale 2 --reuse-from $(DEMO)/synth_x1 --output-dir $(ABL)/synth_x2" \
		"$(ABL_SYN) --lora-dir none --strength 1.0 --output-dir $(ABL)/synth_none" \
		"$(ABL_SYN) --scale 4 --reuse-from $(DEMO)/synth_x1 $(ABL)/synth_x2 --output-dir $(ABL)/synth_x4" \
		"$(ABL_SYN) --lora-dir none --output-dir $(ABL)/synth_lp" \
		"$(ABL_SYN) --strength 1.0 --output-dir $(ABL)/synth_no_lp" \
		"$(ABL_SYN) --lora-dir $(ABL)/ft_no_vg --output-dir $(ABL)/synth_no_vg" \
		"$(ABL_SYN) --lora-dir $(ABL)/ft_no_mmd --output-dir $(ABL)/synth_no_mmd" | $(PAR2))
	$(call timed,gap of each synthetic set,for job in $(filter-out real:real,$(ABL_SETS)); do \
		$(DEMO_PY) eval_gap.py $(DEMO_CFG) --synthetic-dir $${job#*:} --output-dir $(ABL)/gap_$${job%%:*} || exit 1; done)
	$(call timed,classifiers ($(words $(ABL_SETS)) sets x $(words $(ABL_SEEDS)) seeds),\
		for job in $(ABL_SETS); do for seed in $(ABL_SEEDS); do \
		echo "$(DEMO_PY) train_cls.py $(DEMO_CFG) --seed $$seed --train-dirs $${job#*:} \
		--output-dir $(ABL)/cls_$${job%%:*}_s$$seed"; done; done | $(PAR2))
	$(call timed,report,$(DEMO_PY) demo_report.py ablation-report $(REPORT_CFG))
	@echo "[demo] done: $(ABL)/report.md, $(ABL)/scaling.png"

# ------------------------------------------------------------------------------------------------------- benchmarks
bench: bench-finetune bench-synth bench-train

bench-finetune: $(STAMP)
	$(DEMO_PY) demo.py data $(DEMO_CFG)
	$(DEMO_PY) bench.py finetune --pretrained-model demo_generator/sd --resolution 32 --train-batch-size 16 \
		--steps 10

# Steady-state throughput of a long run, so ours is compiled (as on a GPU by default; on the CPU `--compile auto`
# leaves it off because a ~100 s cold compile costs more than the demo's whole synthesis); the warm-up, compilation
# included, is untimed and printed. ARGS="--compile off" times the eager loop.
bench-synth: $(STAMP)
	$(DEMO_PY) demo.py data $(DEMO_CFG)
	$(DEMO_PY) finetune.py $(DEMO_CFG) --output-dir $(DEMO)/finetune
	$(DEMO_PY) bench.py synth --config configs/demo.yaml --steps 30 --images 48 --rounds 5 --compile on \
		--output-dir $(DEMO)/bench_synth $(ARGS)

# On a GPU node: the same three benchmarks at paper scale (SD1.5-shaped random weights, 512 px; ResNet-50 at 224 px
# on in-memory 400 px JPEGs with the IN-1K augmentation). Nothing is downloaded; the demo data (source images) and
# the untrained demo pipeline (tokenizer, scheduler config) are made in seconds. Figures go to the log and to each
# run's benchmark.json.
bench-gpu: $(STAMP)
	$(DEMO_PY) demo.py data $(DEMO_CFG) && $(DEMO_PY) demo.py skeleton $(DEMO_CFG)
	$(GPU_PY) bench.py synth --config configs/demo.yaml --weights sd15-random --resolution 512 --steps 30 \
		--pretrained-model $(DEMO)/skeleton --images 128 --rounds 2 --batch-size 32 --decode-batch 16 \
		--workers 8 --write-workers 8 --output-dir $(DEMO)/bench_synth_gpu $(ARGS)
	$(GPU_PY) bench.py finetune --weights sd15-random --resolution 512 --train-batch-size 8 --steps 20
	$(GPU_PY) bench.py finetune --weights sd15-random --resolution 512 --train-batch-size 32 --steps 10
	$(GPU_PY) bench.py train --model resnet50 --fake-data 12288 --fake-size 400 --input-size 224 \
		--batch-size 256 --max-device-batch 256 --workers 14 --aa rand-m7-mstd0.5 --mixup 0.2 --cutmix 1.0 \
		--bce-loss --steps 40 --output-dir $(DEMO)/bench_train_gpu

bench-train: $(STAMP)
	$(DEMO_PY) bench.py train --fake-data 640 --fake-size 48 --model test_resnet --input-size 32 \
		--batch-size 32 --max-device-batch 32 --workers 1 --mixed-precision no --steps 15
	$(DEMO_PY) bench.py loader --images 2000 --size 256 --input-size 224 --workers 2 --output-dir $(DEMO)/bench_loader
