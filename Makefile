# mmalign: the pipeline as one readable script. `make help` prints the stage graph.
#
# Every stage writes runs/$(RUN)/<stage>/ atomically and finishes with a marker file (manifest.json,
# build.json or the exported model's config.json). Make skips a stage whose marker is newer than its
# inputs; the stage scripts themselves also compare the input hashes in their manifest.

SHELL := /bin/bash
# SCALE=quick (default): `make demo` in ~28 minutes on 2 CPU cores at ~140 GFLOP/s (shorter reward-model
# and alignment trainings, 150 sampled prompts, 100 held-out scenes; vision, SFT and judge keep their
# steps: 10 of those minutes are vision + SFT, 4 the judge). SCALE=full: the configs' own step
# counts, 500 prompts, all 500 held-out scenes (about an hour; the README's result tables), in
# runs/demo-full. Any variable below can still be set on the command line.
SCALE ?= quick
ifeq ($(SCALE),quick)
RUN ?= $(if $(MODEL),$(MODEL),demo)
RM_STEPS ?= 60
ALIGN_STEPS ?= 60
EVAL_LIMIT ?= 100
SAMPLE_PROMPTS ?= 150
REFINE_OPTS ?= --limit 50 --turns 2
else ifeq ($(SCALE),full)
RUN ?= $(if $(MODEL),$(MODEL),demo-full)
else
$(error SCALE=$(SCALE): use quick or full)
endif
RUN ?= $(if $(MODEL),$(MODEL),demo)
OUT := runs/$(RUN)
SEED ?= 0
# A real checkpoint instead of the tiny model (`make pipeline MODEL=<name> BASE=<checkpoint folder>`):
# configs/models/<MODEL>/common.yaml is layered over every training config (policy, precision,
# batch sizes), then configs/models/<MODEL>/<stage>.yaml where one exists (learning rates).
MODEL ?=
BASE ?=
MODEL_DIR = configs/models/$(MODEL)
# (ablations share their method's file: fgaif-seq and fgaif-oracle use fgaif.yaml, realign-text realign.yaml)
OVERLAY_FILE = $(MODEL_DIR)/$(patsubst fgaif-%,fgaif,$(patsubst realign-text,realign,$(1))).yaml
OVERLAY = $(if $(MODEL),--config $(MODEL_DIR)/common.yaml $(if $(wildcard $(OVERLAY_FILE)),--config $(OVERLAY_FILE)))
# Every stage command runs through mmalign.timed: one line per run in $(OUT)/timings.jsonl (wall
# time including interpreter start and imports), read by the report.
TIMED = $(PY) -m mmalign.timed --log $(OUT)/timings.jsonl --target $@ --root $(OUT) --
# RANKS=n runs the generation-heavy stages (sample, feedback, eval) as n processes under torchrun
# (one per GPU where there are GPUs); batch b runs on rank b % n, and the merged output is the
# same as RANKS=1's (mmalign/shard.py).
RANKS ?= 1
RUN_PY = $(if $(filter-out 1,$(RANKS)),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(RANKS),$(PY))
VENV ?= .venv
# The project's Python: .venv if `make venv` made one, else the active environment.
PY = $(shell [ -x $(VENV)/bin/python ] && echo $(VENV)/bin/python || echo python3)
# `torch==2.13.0` is the CPU wheel on the CI machine. Elsewhere PyPI's Linux wheel is a
# multi-GB CUDA build: pass TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU one.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
FIT = $(TIMED) $(PY) -m mmalign.cli fit

.PHONY: help install venv deps data vision tiny-model sft eval-sft eval eval-compare sample judge feedback prefs mmrlhf-import \
  rm rm-score ref-logps dpo mmdpo sft-continued eval-mmrlhf index realign-data realign realign-text eval-realign \
  sample-val feedback-val fg-rm fg-rm-eval fgaif fgaif-seq fgaif-oracle eval-fgaif \
  nlf dress-import dress eval-dress bench bench-dpo bench-index demo demo-full ablations report pipeline test test-slow clean

help:
	@echo "mmalign stages (make <target> [RUN=name] [SEED=n]); outputs under runs/<RUN>/"
	@echo ""
	@echo "  data        synthetic scenes -> $(OUT)/data/{train,val,test}/sft.jsonl + images + manifest.json"
	@echo "    |"
	@echo "  vision      tiny CLIP-style tower pretrained with dense per-patch labels on fresh scenes -> $(OUT)/vision/model"
	@echo "    |"
	@echo "  tiny-model  tokenizer trained on the world's text + tiny LLaVA built around the pretrained tower -> $(OUT)/tiny-model"
	@echo "    |"
	@echo "  sft         visual instruction tuning, tower frozen (mmalign fit, configs/sft/tiny.yaml) -> $(OUT)/sft/model"
	@echo "    |"
	@echo "  eval-sft    hallucination evaluation on 500 held-out scenes: CHAIR, AMBER-style per type,"
	@echo "              POPE-style yes/no splits, 95% intervals -> $(OUT)/eval/sft/{report.md,metrics.json,chart.png}"
	@echo ""
	@echo "    |"
	@echo "  sample      K=$(K) responses per train prompt from the SFT policy -> $(OUT)/sample/responses.jsonl"
	@echo "    |         judge: the SFT model trained longer on content questions ('What color is the star?') -> $(OUT)/judge/model"
	@echo "  feedback    segments + object/attribute/relation labels, scores, critique, refinement from"
	@echo "              SOURCE=$(SOURCE) (oracle|judge|detector), agreement with the oracle -> $(OUT)/feedback/$(SOURCE)"
	@echo ""
	@echo "  MM-RLHF (issue 5):"
	@echo "  prefs       ranked responses per prompt (samples + injected hallucinations, scored and critiqued by"
	@echo "              PREFS_SOURCE=$(PREFS_SOURCE)) and every strict pair -> $(OUT)/prefs/{ranked.jsonl,train,val}"
	@echo "    |"
	@echo "  rm          critique reward model + scalar Bradley-Terry baseline -> $(OUT)/rm/{critique,scalar}/model"
	@echo "  rm-score    ranking accuracy + critique quality on val; reward margins on every pair -> $(OUT)/rm/scored"
	@echo "  ref-logps   the SFT model's log-probs of every pair, one pass -> $(OUT)/ref/{train,val}/pairs.jsonl"
	@echo "    |"
	@echo "  sft-continued / dpo / mmdpo   SFT 400 more steps, plain DPO, MM-DPO (Dynamic Reward Scaling)"
	@echo "  eval-mmrlhf the three and SFT on the held-out scenes, side by side -> $(OUT)/eval/compare-mmrlhf"
	@echo "  mmrlhf-import MMRLHF=<folder>   the published MM-RLHF data -> $(OUT)/mmrlhf/import"
	@echo "  Re-Align (issue 6):"
	@echo "  index       train images embedded by the SFT policy's vision tower -> FAISS index $(OUT)/index"
	@echo "  realign-data  injected rejected answer + retrieved rejected image per caption -> $(OUT)/realign-data"
	@echo "  realign / realign-text   rDPO, and its text-only ablation (DPO on the same pairs)"
	@echo "  eval-realign  SFT, SFT-continued, text-only DPO, rDPO side by side -> $(OUT)/eval/compare-realign"
	@echo "  FGAIF (issue 7):"
	@echo "  sample-val / feedback-val   SFT samples on the val scenes, labelled by the oracle (held-out RM test)"
	@echo "  fg-rm       object / attribute / relation reward models (3-class head at every segment end), trained"
	@echo "              on FG_SOURCE=$(FG_SOURCE) labels -> $(OUT)/fg-rm/$(FG_SOURCE)/<type>/model (FG_RM_SHARED=1: one model)"
	@echo "  fg-rm-eval  precision / recall / F1 of 'hallucinated' per type on the held-out responses"
	@echo "  fgaif / fgaif-seq   PPO with dense segment rewards, and the sequence-level-reward ablation"
	@echo "  fgaif-oracle  control: the same PPO with the oracle's segment labels as rewards (perfect reward models)"
	@echo "  eval-fgaif  SFT, SFT-continued, sequence-reward PPO, FGAIF, oracle-reward PPO -> $(OUT)/eval/compare-fgaif"
	@echo "  DRESS (issue 8):"
	@echo "  nlf         critique examples + refinement episodes (SFT revisions judged by the oracle) with conditions -> $(OUT)/nlf"
	@echo "  dress       conditional RL from SFT (configs/dress/tiny.yaml); dress-import DRESS=<LVLM_NLF folder>"
	@echo "  eval-dress  SFT, SFT-continued, DRESS (asked with its best condition) + the refinement benchmark"
	@echo "              (answer, oracle refinement, answer again; 2 turns) -> $(OUT)/eval/compare-dress, $(OUT)/refine/compare"
	@echo "  bench       bench-dpo (DPO pairs/s and peak memory vs TRL's DPOTrainer) and bench-index"
	@echo "              (FAISS IVF / HNSW recall@10 and latency vs exact and NumPy) -> benchmarks/results/"
	@echo ""
	@echo "  eval CKPT=path [NAME=x]     evaluate any checkpoint the same way -> $(OUT)/eval/<NAME>"
	@echo "  eval-compare RUNS=\"a b\"    side-by-side table + chart, paired differences vs the first -> $(OUT)/eval/compare"
	@echo ""
	@echo "  report      every method vs SFT and SFT-continued (95% intervals), refinement benchmark, wall time"
	@echo "              per stage, plots -> $(OUT)/report.md"
	@echo "  demo        every stage of the core pipeline, then the report (SCALE=quick ~28 min; SCALE=full ~1 h)"
	@echo "  ablations   plain DPO, text-only rDPO, sequence-reward PPO, oracle-reward PPO (+ evaluations, report)"
	@echo "  demo-full   SCALE=full demo + ablations -> runs/demo-full"
	@echo "  pipeline MODEL=<$(notdir $(wildcard configs/models/*))> BASE=<checkpoint> [DRY_RUN=1]"
	@echo "              the same stages on a real checkpoint; DRY_RUN=1 checks every config and prints the plan"
	@echo "  RANKS=n     sample / feedback / eval on n processes (torchrun); the output equals RANKS=1's"
	@echo "  test        the test suite (fast tests; 'make test-slow' for the slow ones)"
	@echo "  install     pip install into the active Python ($(PY)); 'make venv' makes and fills $(VENV)/"

# --- environment --------------------------------------------------------------------------------

install:
	@$(PY) -c "import torch" 2>/dev/null || { echo "no torch: installing $(TORCH_SPEC) (CPU)"; \
	  $(PY) -m pip install $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); }
	$(PY) -m pip install -e ".[dev,bench]"

venv:
	python3 -m venv $(VENV)
	$(MAKE) install PY=$(VENV)/bin/python

# Fresh machine: if the active Python cannot import the stack, make a .venv and install there.
deps:
	@$(PY) -c "import mmalign, torch, transformers, lightning, faiss, peft, hypothesis, trl" 2>/dev/null || $(MAKE) venv

# --- stages ---------------------------------------------------------------------------------------

# YES_NO_ANSWERS=explained: yes/no answers go on to say what the image shows ("No, it is small.");
# short: "Yes." / "No." (docs/TESTBED.md: why the explained form is the one the tiny model learns).
YES_NO_ANSWERS ?= explained
data: deps $(OUT)/data/manifest.json
$(OUT)/data/manifest.json: data_pipelines/scenes.py mmalign/world.py
	$(TIMED) $(PY) -m data_pipelines.scenes --out $(OUT)/data --seed $(SEED) --yes-no-answers $(YES_NO_ANSWERS)

# The vision tower pretrained before any language model sees it (LLaVA starts from a pretrained
# CLIP): dense per-patch labels on fresh scenes -> a stock CLIPVisionModel in $(OUT)/vision/model.
# VISION_STEPS=n overrides the config's steps (the knob for how much the policy still hallucinates).
VISION_STEPS ?=
vision: deps $(OUT)/vision/manifest.json
$(OUT)/vision/manifest.json: $(OUT)/data/manifest.json models/vision.py mmalign/render.py configs/vision/tiny.yaml
	$(TIMED) $(PY) -m models.vision --config configs/vision/tiny.yaml --data $(OUT)/data --out $(OUT)/vision \
	  $(if $(VISION_STEPS),--steps $(VISION_STEPS))

# The tiny LLaVA built around the pretrained tower (its sizes and weights), decoder and projector new.
# The policy gets the vision run's earlier snapshot (POLICY_TOWER), the judge its final tower.
POLICY_TOWER ?= model-step400
tiny-model: deps $(OUT)/tiny-model/build.json
$(OUT)/tiny-model/build.json: $(OUT)/data/manifest.json $(OUT)/vision/manifest.json models/tiny.py
	$(TIMED) $(PY) -m models.tiny --data $(OUT)/data --out $(OUT)/tiny-model --vision-tower $(OUT)/vision/$(POLICY_TOWER) --seed $(SEED)

# The policy SFT starts from: the tiny model built above, or BASE (a real checkpoint, `make pipeline`).
SFT_BASE = $(if $(MODEL),$(BASE),$(OUT)/tiny-model)
sft: deps $(OUT)/sft/model/config.json
$(OUT)/sft/model/config.json: $(if $(MODEL),$(OUT)/data/manifest.json,$(OUT)/tiny-model/build.json) configs/sft/tiny.yaml
	$(FIT) --config configs/sft/tiny.yaml $(call OVERLAY,sft) --seed_everything $(SEED) \
	  --trainer.default_root_dir $(OUT)/sft \
	  --model.init_args.policy.init_args.path $(SFT_BASE) \
	  --model.init_args.export_dir $(OUT)/sft/model \
	  --data.init_args.train_file $(OUT)/data/train/sft.jsonl \
	  --data.init_args.val_file $(OUT)/data/val/sft.jsonl \
	  --data.init_args.data_root $(OUT)/data

eval-sft: deps $(OUT)/eval/sft/metrics.json
EVAL = $(TIMED) $(RUN_PY) -m mmalign.cli eval
# compare reads finished evaluations: one process
EVAL_COMPARE = $(TIMED) $(PY) -m mmalign.cli eval compare
# EVAL_LIMIT=n evaluates the first n held-out scenes only (SCALE=quick sets 100; unset: all 500).
EVAL_LIMIT ?=
EVAL_OPTS = $(if $(EVAL_LIMIT),--limit $(EVAL_LIMIT))
$(OUT)/eval/sft/metrics.json: $(OUT)/sft/model/config.json $(wildcard mmalign/eval/*.py)
	$(EVAL) --model $(OUT)/sft/model --data $(OUT)/data --split test $(EVAL_OPTS) --out $(OUT)/eval/sft
	@cat $(OUT)/eval/sft/report.md

# Any checkpoint on the same held-out benchmark: make eval CKPT=runs/demo/sft/model NAME=sft-again
CKPT ?=
NAME ?= $(notdir $(patsubst %/,%,$(CKPT)))
eval: deps
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=<checkpoint folder> [NAME=<name>] [RUN=$(RUN)]"; exit 2; }
	$(EVAL) --model $(CKPT) --data $(OUT)/data --split test $(EVAL_OPTS) --out $(OUT)/eval/$(NAME)

# make eval-compare RUNS="runs/demo/eval/sft runs/demo/eval/other"  (the first is the baseline)
RUNS ?=
eval-compare: deps
	@test -n "$(RUNS)" || { echo "usage: make eval-compare RUNS=\"<eval folder> <eval folder> ...\""; exit 2; }
	$(EVAL_COMPARE) $(RUNS) --out $(OUT)/eval/compare

# --- sampling and AI feedback --------------------------------------------------------------------

K ?= 4
SAMPLE_PROMPTS ?= 500
sample: deps $(OUT)/sample/manifest.json
$(OUT)/sample/manifest.json: $(OUT)/sft/model/config.json data_pipelines/sample.py
	$(TIMED) $(RUN_PY) -m data_pipelines.sample --model $(OUT)/sft/model --data $(OUT)/data --split train \
	  --limit $(SAMPLE_PROMPTS) --k $(K) --seed $(SEED) --out $(OUT)/sample

# The judge starts as the SFT model given the final, stronger tower (judge-base), then trains on
# descriptions: it sees better and has trained longer than the policy it judges. A real checkpoint
# (MODEL=...) has no tower of ours to swap in: its judge starts from its SFT model.
JUDGE_BASE = $(if $(MODEL),$(OUT)/sft/model,$(OUT)/judge-base)
$(OUT)/judge-base/build.json: $(OUT)/sft/model/config.json $(OUT)/vision/manifest.json models/tiny.py
	$(TIMED) $(PY) -m models.tiny swap-tower --model $(OUT)/sft/model --vision-tower $(OUT)/vision/model --out $(OUT)/judge-base
judge: deps $(OUT)/judge/model/config.json
$(OUT)/judge/model/config.json: $(OUT)/sft/model/config.json $(if $(MODEL),,$(OUT)/judge-base/build.json) configs/judge/tiny.yaml
	$(FIT) --config configs/judge/tiny.yaml $(call OVERLAY,judge) --seed_everything $(SEED) \
	  --trainer.default_root_dir $(OUT)/judge $(if $(JUDGE_STEPS),--trainer.max_steps $(JUDGE_STEPS)) \
	  --model.init_args.policy.init_args.path $(JUDGE_BASE) \
	  --model.init_args.export_dir $(OUT)/judge/model \
	  --data.init_args.train_file $(OUT)/data/train/sft.jsonl \
	  --data.init_args.val_file $(OUT)/data/val/sft.jsonl \
	  --data.init_args.data_root $(OUT)/data

SOURCE ?= judge
DETECTOR ?=
# How the judge verifies a claim: caption (against its own description), lookup, yesno (docs/TESTBED.md).
JUDGE_QUESTIONS ?= caption
# One rule for every source (the folder name is the source), so the judge's and the oracle's
# feedback can both exist: the demo reports the judge's, MM-RLHF's preferences use the oracle's.
.SECONDEXPANSION:
feedback: deps $(OUT)/feedback/$(SOURCE)/manifest.json
$(OUT)/feedback/%/manifest.json: $(OUT)/sample/manifest.json data_pipelines/feedback.py \
    $$(if $$(filter judge,$$*),$(OUT)/judge/model/config.json)
	$(TIMED) $(RUN_PY) -m data_pipelines.feedback --responses $(OUT)/sample --data $(OUT)/data --source $* \
	  $(if $(filter judge,$*),--judge $(OUT)/judge/model --judge-questions $(JUDGE_QUESTIONS),$(if $(filter detector,$*),--detector $(DETECTOR))) \
	  --out $(OUT)/feedback/$*

# --- MM-RLHF: ranked preferences, reward models, MM-DPO ----------------------------------------

# MM-RLHF's rankings are human annotations; in the synthetic world the scene-graph oracle plays the
# annotator (PREFS_SOURCE=judge ranks by the judge's verdicts instead; docs/TESTBED.md).
PREFS_SOURCE ?= oracle
INJECT ?= 2
prefs: deps $(OUT)/prefs/manifest.json
$(OUT)/prefs/manifest.json: $(OUT)/feedback/$(PREFS_SOURCE)/manifest.json data_pipelines/prefs.py mmalign/inject.py mmalign/oracle.py
	$(TIMED) $(PY) -m data_pipelines.prefs --feedback $(OUT)/feedback/$(PREFS_SOURCE) --data $(OUT)/data \
	  --inject-per-prompt $(INJECT) --seed $(SEED) --out $(OUT)/prefs \
	  $(if $(filter oracle,$(PREFS_SOURCE)),,--weights faithfulness=1)

# The published MM-RLHF data (unzipped yifanzhang114/MM-RLHF: data.jsonl + short/ long/ mcq/ safety/).
MMRLHF ?= data/MM-RLHF
mmrlhf-import: deps
	$(TIMED) $(PY) -m data_pipelines.import_mmrlhf --input $(MMRLHF)/data.jsonl --images $(MMRLHF) \
	  --out $(OUT)/mmrlhf/import --val-fraction 0.05 --on-error skip

# Reward models on the prefs pairs: MM-RLHF's critique RM (writes a critique, then scores) and the
# scalar Bradley-Terry baseline (configs/rm/). `rm-score` scores the val pairs with both (ranking
# accuracy, critique quality vs the oracle's) and the train pairs with the critique RM: its margin
# is MM-DPO's delta (reward_margin in runs/<RUN>/rm/scored/{train,val}/pairs.jsonl).
# RM_STEPS / ALIGN_STEPS=n shorten the reward-model and the alignment trainings (SCALE=quick sets
# 60 and 60); unset, the configs' step counts hold.
RM_STEPS ?=
ALIGN_STEPS ?=
rm: deps $(OUT)/rm/critique/model/reward_config.json $(OUT)/rm/scalar/model/reward_config.json
$(OUT)/rm/%/model/reward_config.json: $(OUT)/prefs/manifest.json $(OUT)/sft/model/config.json configs/rm/%.yaml mmalign/methods/reward.py
	$(FIT) --config configs/rm/$*.yaml $(call OVERLAY,rm) --seed_everything $(SEED) \
	  --trainer.default_root_dir $(OUT)/rm/$* \
	  --model.init_args.policy.init_args.path $(OUT)/sft/model \
	  --model.init_args.export_dir $(OUT)/rm/$*/model $(if $(RM_STEPS),--trainer.max_steps $(RM_STEPS)) \
	  --data.init_args.train_file $(OUT)/prefs/train/pairs.jsonl \
	  --data.init_args.val_file $(OUT)/prefs/val/pairs.jsonl \
	  --data.init_args.data_root $(OUT)/data
rm-score: deps $(OUT)/rm/scored/train/manifest.json $(OUT)/rm/scored/val/manifest.json $(OUT)/rm/scalar/scored-val/manifest.json
	@cat $(OUT)/rm/scored/val/report.md | head -8; cat $(OUT)/rm/scalar/scored-val/report.md | head -6
$(OUT)/rm/scored/%/manifest.json: $(OUT)/rm/critique/model/reward_config.json data_pipelines/score_rm.py
	$(TIMED) $(PY) -m data_pipelines.score_rm --rm $(OUT)/rm/critique/model --pairs $(OUT)/prefs/$*/pairs.jsonl \
	  --data-root $(OUT)/data --out $(OUT)/rm/scored/$* $(if $(filter val,$*),--with-reference-critique)
$(OUT)/rm/scalar/scored-val/manifest.json: $(OUT)/rm/scalar/model/reward_config.json data_pipelines/score_rm.py
	$(TIMED) $(PY) -m data_pipelines.score_rm --rm $(OUT)/rm/scalar/model --pairs $(OUT)/prefs/val/pairs.jsonl \
	  --data-root $(OUT)/data --out $(OUT)/rm/scalar/scored-val

# Reference log-probs of every pair under the SFT model, in one pass (DPO configs: reference: precomputed).
ref-logps: deps $(OUT)/ref/train/manifest.json $(OUT)/ref/val/manifest.json
$(OUT)/ref/%/manifest.json: $(OUT)/rm/scored/%/manifest.json $(OUT)/sft/model/config.json data_pipelines/ref_logps.py
	$(TIMED) $(PY) -m data_pipelines.ref_logps --model $(OUT)/sft/model --pairs $(OUT)/rm/scored/$*/pairs.jsonl \
	  --data-root $(OUT)/data --max-length 256 --out $(OUT)/ref/$*

# $(1) = target and run folder, $(2) = config
define fit_policy
$(1): deps $(OUT)/$(1)/model/config.json
$(OUT)/$(1)/model/config.json: $(3) $(2)
	$$(FIT) --config $(2) $$(call OVERLAY,$(1)) --seed_everything $$(SEED) \
	  --trainer.default_root_dir $$(OUT)/$(1) \
	  --model.init_args.policy.init_args.path $$(OUT)/sft/model \
	  --model.init_args.export_dir $$(OUT)/$(1)/model $$(if $$(ALIGN_STEPS),--trainer.max_steps $$(ALIGN_STEPS)) $(4)
endef
PREF_DATA = --data.init_args.train_file $(OUT)/ref/train/pairs.jsonl --data.init_args.val_file $(OUT)/ref/val/pairs.jsonl \
  --data.init_args.data_root $(OUT)/data --model.init_args.probe_file $(OUT)/data/val/sft.jsonl
$(eval $(call fit_policy,dpo,configs/dpo/dpo.yaml,$(OUT)/ref/train/manifest.json $(OUT)/ref/val/manifest.json,$(PREF_DATA)))
$(eval $(call fit_policy,mmdpo,configs/dpo/mmdpo.yaml,$(OUT)/ref/train/manifest.json $(OUT)/ref/val/manifest.json,$(PREF_DATA)))
$(eval $(call fit_policy,sft-continued,configs/sft/continue.yaml,$(OUT)/sft/model/config.json,\
  --data.init_args.train_file $(OUT)/data/train/sft.jsonl --data.init_args.val_file $(OUT)/data/val/sft.jsonl \
  --data.init_args.data_root $(OUT)/data))

# Held-out evaluation of each, and the side-by-side table with paired differences vs SFT.
$(OUT)/eval/%/metrics.json: $(OUT)/%/model/config.json $(wildcard mmalign/eval/*.py)
	$(EVAL) --model $(OUT)/$*/model --data $(OUT)/data --split test $(EVAL_OPTS) --out $(OUT)/eval/$*
eval-mmrlhf: deps $(foreach r,sft sft-continued dpo mmdpo,$(OUT)/eval/$(r)/metrics.json)
	$(EVAL_COMPARE) $(foreach r,sft sft-continued dpo mmdpo,$(OUT)/eval/$(r)) --out $(OUT)/eval/compare-mmrlhf
	@cat $(OUT)/eval/compare-mmrlhf/compare.md

# --- Re-Align -------------------------------------------------------------------------------------

# Train images embedded by the SFT policy's vision tower (what Re-Align's paper uses: the VLM's own
# encoder) into a FAISS index; INDEX_KIND=flat (exact cosine) | ivf | hnsw.
INDEX_KIND ?= flat
index: deps $(OUT)/index/manifest.json
$(OUT)/index/manifest.json: $(OUT)/data/manifest.json $(OUT)/sft/model/config.json data_pipelines/index.py mmalign/retrieval.py models/embedders.py
	$(TIMED) $(PY) -m data_pipelines.index --data $(OUT)/data --splits train --embedder policy --model $(OUT)/sft/model \
	  --kind $(INDEX_KIND) --out $(OUT)/index

# Dual preferences (Re-Align): per train caption, a hallucination-injected rejected answer and, as the
# rejected image, the nearest train image whose scene makes the caption wrong.
realign-data: deps $(OUT)/realign-data/manifest.json
$(OUT)/realign-data/manifest.json: $(OUT)/data/manifest.json $(OUT)/index/manifest.json data_pipelines/realign_data.py mmalign/inject.py mmalign/oracle.py mmalign/retrieval.py
	$(TIMED) $(PY) -m data_pipelines.realign_data --data $(OUT)/data --index $(OUT)/index --split train \
	  --tasks detailed_caption --k 10 --seed $(SEED) --out $(OUT)/realign-data

# rDPO (text + visual term) and its text-only ablation (plain DPO on the same pairs), then SFT,
# SFT-continued, text-only DPO and rDPO side by side on the held-out scenes.
REALIGN_DATA = --data.init_args.train_file $(OUT)/realign-data/train/pairs.jsonl \
  --data.init_args.val_file $(OUT)/realign-data/val/pairs.jsonl --data.init_args.data_root $(OUT)/data \
  --model.init_args.probe_file $(OUT)/data/val/sft.jsonl
$(eval $(call fit_policy,realign,configs/realign/tiny.yaml,$(OUT)/realign-data/manifest.json,$(REALIGN_DATA)))
$(eval $(call fit_policy,realign-text,configs/realign/tiny.yaml,$(OUT)/realign-data/manifest.json,$(REALIGN_DATA) --model.init_args.visual_weight 0))
eval-realign: deps $(foreach r,sft sft-continued realign-text realign,$(OUT)/eval/$(r)/metrics.json)
	$(EVAL_COMPARE) $(foreach r,sft sft-continued realign-text realign,$(OUT)/eval/$(r)) --out $(OUT)/eval/compare-realign
	@head -12 $(OUT)/eval/compare-realign/compare.md

# --- FGAIF ---------------------------------------------------------------------------------------

# Held-out responses for the fine-grained reward models' precision / recall: the SFT policy's samples
# on the val scenes, labelled by the oracle.
sample-val: deps $(OUT)/sample-val/manifest.json
$(OUT)/sample-val/manifest.json: $(OUT)/sft/model/config.json data_pipelines/sample.py
	$(TIMED) $(RUN_PY) -m data_pipelines.sample --model $(OUT)/sft/model --data $(OUT)/data --split val \
	  --k $(K) --seed $(SEED) --out $(OUT)/sample-val
feedback-val: deps $(OUT)/feedback-val/oracle/manifest.json
$(OUT)/feedback-val/oracle/manifest.json: $(OUT)/sample-val/manifest.json data_pipelines/feedback.py
	$(TIMED) $(RUN_PY) -m data_pipelines.feedback --responses $(OUT)/sample-val --data $(OUT)/data --source oracle \
	  --out $(OUT)/feedback-val/oracle

# Three fine-grained reward models (object existence, attribute, relation), each the SFT model with a
# 3-class head read at every segment's last token, trained on FG_SOURCE's segment labels of the SFT
# model's train samples, into runs/<RUN>/fg-rm/<FG_SOURCE>/<type>. FG_SOURCE=judge trains on the
# judge's labels (the stage refuses labels with no hallucinated segment of a type: a reward model
# trained on those would be a constant). FG_RM_SHARED=1 trains one model with three heads
# (.../shared) instead. FG_RM_STEPS (default RM_STEPS) shortens the trainings.
comma := ,
FG_SOURCE ?= oracle
FG_RM_SHARED ?=
FG_RM_STEPS ?= $(RM_STEPS)
FG_TYPES := object attribute relation
FG_RM := $(OUT)/fg-rm/$(FG_SOURCE)
FG_RM_MODELS := $(if $(FG_RM_SHARED),shared,$(FG_TYPES))
FG_RM_PATH = $(FG_RM)/$(if $(FG_RM_SHARED),shared,$(1))/model
FG_RM_DEPS = $(foreach m,$(FG_RM_MODELS),$(FG_RM)/$(m)/model/fg_reward_config.json)
fg-rm: deps $(FG_RM_DEPS)
$(FG_RM)/%/model/fg_reward_config.json: $(OUT)/feedback/$(FG_SOURCE)/manifest.json $(OUT)/feedback-val/oracle/manifest.json \
    $(OUT)/sft/model/config.json configs/fg_rm/tiny.yaml mmalign/methods/fg_reward.py
	$(FIT) --config configs/fg_rm/tiny.yaml $(call OVERLAY,fg-rm) --seed_everything $(SEED) \
	  --trainer.default_root_dir $(FG_RM)/$* $(if $(FG_RM_STEPS),--trainer.max_steps $(FG_RM_STEPS)) \
	  --model.init_args.policy.init_args.path $(OUT)/sft/model \
	  --model.init_args.types '$(if $(filter shared,$*),[object$(comma) attribute$(comma) relation],[$*])' \
	  --model.init_args.export_dir $(FG_RM)/$*/model \
	  --data.init_args.train_file $(OUT)/feedback/$(FG_SOURCE)/feedback.jsonl \
	  --data.init_args.val_file $(OUT)/feedback-val/oracle/feedback.jsonl \
	  --data.init_args.data_root $(OUT)/data
# Precision / recall / F1 of "hallucinated" per type on the held-out (val-scene) responses vs the oracle.
FG_RM_EVAL := $(FG_RM)/eval$(if $(FG_RM_SHARED),-shared)
fg-rm-eval: deps $(FG_RM_EVAL)/manifest.json
	@head -12 $(FG_RM_EVAL)/report.md
$(FG_RM_EVAL)/manifest.json: $(FG_RM_DEPS) $(OUT)/feedback-val/oracle/manifest.json data_pipelines/fg_rm_eval.py
	$(TIMED) $(PY) -m data_pipelines.fg_rm_eval --models $(foreach t,$(FG_TYPES),$(t)=$(call FG_RM_PATH,$(t))) \
	  --feedback $(OUT)/feedback-val/oracle --data-root $(OUT)/data --out $(FG_RM_EVAL)

# PPO with the dense segment rewards (FGAIF) and the sequence-level ablation (same reward models,
# same total reward on the last token), then SFT, SFT-continued, the ablation and FGAIF side by side.
FGAIF_ARGS = --data.init_args.train_file $(OUT)/data/train/sft.jsonl --data.init_args.data_root $(OUT)/data \
  --model.init_args.reward_models '{"object": "$(call FG_RM_PATH,object)", "attribute": "$(call FG_RM_PATH,attribute)", \
  "relation": "$(call FG_RM_PATH,relation)"}'
$(eval $(call fit_policy,fgaif,configs/fgaif/tiny.yaml,$(FG_RM_DEPS) mmalign/methods/fgaif.py mmalign/losses/ppo.py,$(FGAIF_ARGS)))
$(eval $(call fit_policy,fgaif-seq,configs/fgaif/tiny.yaml,$(FG_RM_DEPS) mmalign/methods/fgaif.py mmalign/losses/ppo.py,$(FGAIF_ARGS) --model.init_args.reward_placement sequence))
# Control: the same PPO with the oracle's segment labels as rewards (perfect reward models).
$(eval $(call fit_policy,fgaif-oracle,configs/fgaif/tiny.yaml,$(OUT)/data/manifest.json mmalign/methods/fgaif.py mmalign/losses/ppo.py,\
  --data.init_args.train_file $(OUT)/data/train/sft.jsonl --data.init_args.data_root $(OUT)/data \
  --model.init_args.reward_models '{"object": "oracle"$(comma) "attribute": "oracle"$(comma) "relation": "oracle"}'))
FGAIF_RUNS = sft sft-continued fgaif-seq fgaif fgaif-oracle
eval-fgaif: deps $(foreach r,$(FGAIF_RUNS),$(OUT)/eval/$(r)/metrics.json)
	$(EVAL_COMPARE) $(foreach r,$(FGAIF_RUNS),$(OUT)/eval/$(r)) --out $(OUT)/eval/compare-fgaif
	@head -12 $(OUT)/eval/compare-fgaif/compare.md

# --- DRESS ---------------------------------------------------------------------------------------

# Natural-language feedback records for conditional RL: a critique example per sampled response
# (its rating's condition + question -> response) and a refinement episode per response with
# something to fix (response, the oracle's refinement, the SFT policy's revision judged again; every
# revision kept with its own condition). Score = mean of the oracle's faithfulness and helpfulness,
# so a revision that drops everything does not pass as "good".
NLF_SOURCE ?= oracle
NLF_REVISIONS ?= 1
NLF_THRESHOLD ?= 0.6
nlf: deps $(OUT)/nlf/manifest.json
$(OUT)/nlf/manifest.json: $(OUT)/feedback/$(NLF_SOURCE)/manifest.json $(OUT)/sft/model/config.json \
    $(OUT)/data/manifest.json data_pipelines/nlf.py mmalign/conditions.py mmalign/oracle.py
	$(TIMED) $(PY) -m data_pipelines.nlf --feedback $(OUT)/feedback/$(NLF_SOURCE) --data $(OUT)/data \
	  --model $(OUT)/sft/model --out $(OUT)/nlf --revisions $(NLF_REVISIONS) --seed $(SEED) \
	  --score-weights faithfulness=1,helpfulness=1 --thresholds $(NLF_THRESHOLD)

# DRESS's released NLF data (unzipped YangyiYY/LVLM_NLF) + COCO train2017 images.
DRESS ?= data/LVLM_NLF
COCO_TRAIN ?= $(DRESS)/train2017
dress-import: deps
	$(TIMED) $(PY) -m data_pipelines.import_dress --input $(DRESS) --images $(COCO_TRAIN) \
	  --out $(OUT)/dress/import --val-fraction 0.05 --on-error skip

# Conditional RL from the SFT model (configs/dress/tiny.yaml; the condition scheme must match nlf's).
$(eval $(call fit_policy,dress,configs/dress/tiny.yaml,$(OUT)/nlf/manifest.json mmalign/methods/dress.py,\
  --data.init_args.train_file $(OUT)/nlf/train/sft.jsonl --data.init_args.val_file $(OUT)/nlf/val/sft.jsonl \
  --data.init_args.data_root $(OUT)/data --model.init_args.condition_thresholds '[$(NLF_THRESHOLD)]'))

# Held-out evaluation (a DRESS model is asked with its best condition, read from its folder), and the
# refinement benchmark: answer, get the oracle's refinement, answer again (2 turns, 200 test scenes).
REFINE = $(TIMED) $(PY) -m data_pipelines.refine_bench
REFINE_OPTS ?= --limit 200 --turns 2
$(OUT)/refine/%/manifest.json: $(OUT)/%/model/config.json $(OUT)/data/manifest.json data_pipelines/refine_bench.py \
    mmalign/oracle.py mmalign/conditions.py
	$(REFINE) --model $(OUT)/$*/model --data $(OUT)/data --split test $(REFINE_OPTS) --out $(OUT)/refine/$*
refine-bench-%: deps $(OUT)/refine/%/manifest.json
	@cat $(OUT)/refine/$*/report.md
DRESS_RUNS = sft sft-continued dress
eval-dress: deps $(foreach r,$(DRESS_RUNS),$(OUT)/eval/$(r)/metrics.json $(OUT)/refine/$(r)/manifest.json)
	$(EVAL_COMPARE) $(foreach r,$(DRESS_RUNS),$(OUT)/eval/$(r)) --out $(OUT)/eval/compare-dress
	$(REFINE) compare $(foreach r,$(DRESS_RUNS),$(OUT)/refine/$(r)) --names $(DRESS_RUNS) --out $(OUT)/refine/compare
	@head -12 $(OUT)/eval/compare-dress/compare.md; cat $(OUT)/refine/compare/compare.md

# --- benchmarks ----------------------------------------------------------------------------------

# Retrieval recall@10 and latency of IVF and HNSW against exact flat search and NumPy brute force,
# 100k x 128 vectors (~70 s on 2 cores) -> benchmarks/results/index-<date>.{md,json}
bench-index: deps
	$(PY) benchmarks/bench_index.py

# DPO training throughput and peak memory, mmalign vs TRL's DPOTrainer on the same tiny LLaVA, data
# and batch, each variant in its own process; loss agreement checked to 1e-4 (trl comes with
# `make install`, the "bench" extra). Writes benchmarks/results/dpo-<date>.{md,json} with the machine and the date.
bench: bench-dpo bench-index
bench-dpo: deps $(OUT)/sft/model/config.json $(OUT)/sample/manifest.json
	$(PY) benchmarks/bench_dpo.py --model $(OUT)/sft/model --responses $(OUT)/sample/responses.jsonl --data-root $(OUT)/data

# --- the whole pipeline ---------------------------------------------------------------------------

# Every method against SFT and SFT-continued on the same held-out scenes: the report's runs.
CORE_RUNS = sft sft-continued mmdpo realign fgaif dress
# Ablations and controls (`make ablations`): plain DPO, text-only rDPO, sequence-reward PPO,
# oracle-reward PPO. The report adds whichever of them have been evaluated.
ABLATION_RUNS = dpo realign-text fgaif-seq fgaif-oracle
REFINE_RUNS = sft sft-continued dress
STAGES = data $(if $(MODEL),,vision tiny-model) sft judge sample feedback prefs index rm rm-score ref-logps \
  sft-continued mmdpo realign-data realign sample-val feedback-val fg-rm fg-rm-eval fgaif nlf dress
demo: $(STAGES) report
	@echo "demo done ($(SCALE) scale): $(OUT)/report.md (report-metrics.png, report-training.png beside it)"

ablations: deps $(foreach r,$(ABLATION_RUNS),$(OUT)/eval/$(r)/metrics.json)
	@# a fresh make sees the new evaluations and adds them to the report
	@$(MAKE) --no-print-directory report

# The SCALE=full demo plus the ablations: the numbers in the README's method sections.
demo-full:
	$(MAKE) demo ablations SCALE=full

# One report: the table (every method vs SFT and SFT-continued, 95% intervals), the refinement
# benchmark, wall time per stage (timings.jsonl), plots of the metrics and the training curves.
report: deps $(OUT)/report.md
	@sed -n '1,/^## /p' $(OUT)/report.md | head -40
$(OUT)/report.md: $(foreach r,$(CORE_RUNS),$(OUT)/eval/$(r)/metrics.json) \
    $(foreach r,$(REFINE_RUNS),$(OUT)/refine/$(r)/manifest.json) $(OUT)/fg-rm/$(FG_SOURCE)/eval/manifest.json \
    $(wildcard $(foreach r,$(ABLATION_RUNS),$(OUT)/eval/$(r)/metrics.json)) data_pipelines/report.py
	$(TIMED) $(PY) -m data_pipelines.report --run $(OUT) --scale $(SCALE) --runs $(CORE_RUNS) \
	  --ablations $(ABLATION_RUNS) --refine $(REFINE_RUNS)

# The same stages on a real checkpoint: make pipeline MODEL=llava-1.5-7b-qlora BASE=<checkpoint folder>
# (configs/models/<MODEL>/; a CUDA GPU). DRY_RUN=1 checks the configs and prints the stage plan.
DRY_RUN ?=
# A GPU run takes the configs' own step counts unless SCALE is given.
PIPELINE_SCALE = $(if $(filter command line,$(origin SCALE)),$(SCALE),full)
pipeline:
	@test -n "$(MODEL)" || { echo "usage: make pipeline MODEL=<$(notdir $(wildcard configs/models/*))> BASE=<checkpoint> [DRY_RUN=1]"; exit 2; }
	@test -f $(MODEL_DIR)/common.yaml || { echo "no configs/models/$(MODEL)/common.yaml (have: $(notdir $(wildcard configs/models/*)))"; exit 2; }
	$(PY) -m mmalign.plan --model $(MODEL) --base "$(BASE)" --run $(OUT) $(if $(DRY_RUN),--dry-run) \
	  -- $(MAKE) --no-print-directory demo MODEL=$(MODEL) BASE=$(BASE) SCALE=$(PIPELINE_SCALE) RUN=$(RUN)

# --- tests ----------------------------------------------------------------------------------------

test: deps
	$(PY) -m pytest -q

test-slow: deps
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs/$(RUN)
