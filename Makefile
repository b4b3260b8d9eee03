# mmalign: the pipeline as one readable script. `make help` prints the stage graph.
#
# Every stage writes runs/$(RUN)/<stage>/ atomically and finishes with a marker file (manifest.json,
# build.json or the exported model's config.json). Make skips a stage whose marker is newer than its
# inputs; the stage scripts themselves also compare the input hashes in their manifest.

SHELL := /bin/bash
RUN ?= demo
OUT := runs/$(RUN)
SEED ?= 0
VENV ?= .venv
# The project's Python: .venv if `make venv` made one, else the active environment.
PY = $(shell [ -x $(VENV)/bin/python ] && echo $(VENV)/bin/python || echo python3)
# `torch==2.13.0` is the CPU wheel on the CI machine. Elsewhere PyPI's Linux wheel is a
# multi-GB CUDA build: pass TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU one.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
FIT = $(PY) -m mmalign.cli fit

.PHONY: help install venv deps data tiny-model sft eval-sft eval eval-compare sample judge feedback demo test test-slow clean

help:
	@echo "mmalign stages (make <target> [RUN=name] [SEED=n]); outputs under runs/<RUN>/"
	@echo ""
	@echo "  data        synthetic scenes -> $(OUT)/data/{train,val,test}/sft.jsonl + images + manifest.json"
	@echo "    |"
	@echo "  tiny-model  tokenizer trained on the world's text + tiny LLaVA built from config -> $(OUT)/tiny-model"
	@echo "    |"
	@echo "  sft         visual instruction tuning (mmalign fit, configs/sft/tiny.yaml) -> $(OUT)/sft/model"
	@echo "    |"
	@echo "  eval-sft    hallucination evaluation on 500 held-out scenes: CHAIR, AMBER-style per type,"
	@echo "              POPE-style yes/no splits, 95% intervals -> $(OUT)/eval/sft/{report.md,metrics.json,chart.png}"
	@echo ""
	@echo "    |"
	@echo "  sample      K=$(K) responses per train prompt from the SFT policy -> $(OUT)/sample/responses.jsonl"
	@echo "    |         judge: the SFT model fine-tuned on yes/no questions only -> $(OUT)/judge/model"
	@echo "  feedback    segments + object/attribute/relation labels, scores, critique, refinement from"
	@echo "              SOURCE=$(SOURCE) (oracle|judge|detector), agreement with the oracle -> $(OUT)/feedback/$(SOURCE)"
	@echo ""
	@echo "  eval CKPT=path [NAME=x]     evaluate any checkpoint the same way -> $(OUT)/eval/<NAME>"
	@echo "  eval-compare RUNS=\"a b\"    side-by-side table + chart, paired differences vs the first -> $(OUT)/eval/compare"
	@echo ""
	@echo "  demo        all of the above, in order"
	@echo "  test        the test suite (fast tests; 'make test-slow' for the slow ones)"
	@echo "  install     pip install into the active Python ($(PY)); 'make venv' makes and fills $(VENV)/"

# --- environment --------------------------------------------------------------------------------

install:
	@$(PY) -c "import torch" 2>/dev/null || { echo "no torch: installing $(TORCH_SPEC) (CPU)"; \
	  $(PY) -m pip install $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); }
	$(PY) -m pip install -e ".[dev]"

venv:
	python3 -m venv $(VENV)
	$(MAKE) install PY=$(VENV)/bin/python

# Fresh machine: if the active Python cannot import the stack, make a .venv and install there.
deps:
	@$(PY) -c "import mmalign, torch, transformers, lightning, faiss, peft, hypothesis" 2>/dev/null || $(MAKE) venv

# --- stages ---------------------------------------------------------------------------------------

data: deps $(OUT)/data/manifest.json
$(OUT)/data/manifest.json: data_pipelines/scenes.py mmalign/world.py
	$(PY) -m data_pipelines.scenes --out $(OUT)/data --seed $(SEED)

tiny-model: deps $(OUT)/tiny-model/build.json
$(OUT)/tiny-model/build.json: $(OUT)/data/manifest.json models/tiny.py
	$(PY) -m models.tiny --data $(OUT)/data --out $(OUT)/tiny-model --seed $(SEED)

sft: deps $(OUT)/sft/model/config.json
$(OUT)/sft/model/config.json: $(OUT)/tiny-model/build.json configs/sft/tiny.yaml
	$(FIT) --config configs/sft/tiny.yaml --seed_everything $(SEED) \
	  --trainer.default_root_dir $(OUT)/sft \
	  --model.init_args.policy.init_args.path $(OUT)/tiny-model \
	  --model.init_args.export_dir $(OUT)/sft/model \
	  --data.init_args.train_file $(OUT)/data/train/sft.jsonl \
	  --data.init_args.val_file $(OUT)/data/val/sft.jsonl \
	  --data.init_args.data_root $(OUT)/data

eval-sft: deps $(OUT)/eval/sft/metrics.json
EVAL = $(PY) -m mmalign.cli eval
$(OUT)/eval/sft/metrics.json: $(OUT)/sft/model/config.json $(wildcard mmalign/eval/*.py)
	$(EVAL) --model $(OUT)/sft/model --data $(OUT)/data --split test --out $(OUT)/eval/sft
	@cat $(OUT)/eval/sft/report.md

# Any checkpoint on the same held-out benchmark: make eval CKPT=runs/demo/sft/model NAME=sft-again
CKPT ?=
NAME ?= $(notdir $(patsubst %/,%,$(CKPT)))
eval: deps
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=<checkpoint folder> [NAME=<name>] [RUN=$(RUN)]"; exit 2; }
	$(EVAL) --model $(CKPT) --data $(OUT)/data --split test --out $(OUT)/eval/$(NAME)

# make eval-compare RUNS="runs/demo/eval/sft runs/demo/eval/other"  (the first is the baseline)
RUNS ?=
eval-compare: deps
	@test -n "$(RUNS)" || { echo "usage: make eval-compare RUNS=\"<eval folder> <eval folder> ...\""; exit 2; }
	$(EVAL) compare $(RUNS) --out $(OUT)/eval/compare

# --- sampling and AI feedback --------------------------------------------------------------------

K ?= 4
SAMPLE_PROMPTS ?= 500
sample: deps $(OUT)/sample/manifest.json
$(OUT)/sample/manifest.json: $(OUT)/sft/model/config.json data_pipelines/sample.py
	$(PY) -m data_pipelines.sample --model $(OUT)/sft/model --data $(OUT)/data --split train \
	  --limit $(SAMPLE_PROMPTS) --k $(K) --seed $(SEED) --out $(OUT)/sample

judge: deps $(OUT)/judge/model/config.json
$(OUT)/judge/model/config.json: $(OUT)/sft/model/config.json configs/judge/tiny.yaml
	$(FIT) --config configs/judge/tiny.yaml --seed_everything $(SEED) \
	  --trainer.default_root_dir $(OUT)/judge \
	  --model.init_args.policy.init_args.path $(OUT)/sft/model \
	  --model.init_args.export_dir $(OUT)/judge/model \
	  --data.init_args.train_file $(OUT)/data/train/sft.jsonl \
	  --data.init_args.val_file $(OUT)/data/val/sft.jsonl \
	  --data.init_args.data_root $(OUT)/data

SOURCE ?= judge
DETECTOR ?=
FEEDBACK_MODEL = $(if $(filter judge,$(SOURCE)),--judge $(OUT)/judge/model,$(if $(filter detector,$(SOURCE)),--detector $(DETECTOR)))
feedback: deps $(OUT)/feedback/$(SOURCE)/manifest.json
$(OUT)/feedback/$(SOURCE)/manifest.json: $(OUT)/sample/manifest.json data_pipelines/feedback.py \
    $(if $(filter judge,$(SOURCE)),$(OUT)/judge/model/config.json)
	$(PY) -m data_pipelines.feedback --responses $(OUT)/sample --data $(OUT)/data --source $(SOURCE) \
	  $(FEEDBACK_MODEL) --out $(OUT)/feedback/$(SOURCE)

demo: data tiny-model sft eval-sft sample judge feedback
	@echo "demo done: see $(OUT)/eval/sft/report.md (chart.png, metrics.json, generations.jsonl beside it)"

# --- tests ----------------------------------------------------------------------------------------

test: deps
	$(PY) -m pytest -q

test-slow: deps
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs/$(RUN)
