# mmalign: the pipeline as one readable script. `make help` prints the targets (from the `## `
# comment on each target's line), the stage graph below (the `#|` lines) and the variables with
# their values (from the `## ` line above each `?=`), so the help is read from the rules themselves.
#
# Every stage writes runs/$(RUN)/<stage>/ atomically and finishes with a marker file (manifest.json,
# build.json or the exported model's config.json). Make skips a stage whose marker is newer than its
# inputs; the stage scripts themselves also compare the input hashes in their manifest.
#
#| data -> vision -> tiny-model -> sft       (MODEL=...: sft starts from BASE; no vision, no tiny-model)
#|                                  |
#|              +-------------------+
#| baseline     +-> sft-continued
#| feedback     +-> sample -+-> feedback/judge <- judge <- judge-base (sft + the final vision tower)
#|              |           \-> feedback/oracle             (the scene-graph oracle's labels: control, FEEDBACK=oracle)
#| MM-RLHF      +-> feedback/$FB -> prefs -+-> rm -> rm-score ---------+   ($FB = FEEDBACK: judge, or oracle)
#|              |                          \-> ref-logps -+-> dpo      |
#|              |                                         \-> mmdpo <--+  (the RM's margins, by pair id)
#| Re-Align     +-> index -> realign-data -> realign, realign-text   (realign-data re-fills with sft)
#| FGAIF        +-> sample-val -> feedback-val -+
#|              |   feedback/$FB ---------------+-> fg-rm -+-> fg-rm-eval
#|              |                                          \-> fgaif, fgaif-seq
#|              +-> fgaif-oracle                (the oracle's labels as rewards: no reward model)
#|              +-> fgaif-judge                 (the judge's verdicts as rewards, online: no reward model)
#| DRESS        +-> feedback/$FB -> nlf -> dress  (nlf's revisions judged by the same source)
#|              +-> feedback/$FB -> nlf-uncond -> dress-uncond   (the same records without conditions: ablation)
#| evaluation   \-> eval/<run> for sft and every trained run (+ refine/<run>: sft, sft-continued, dress -> refine/compare)
#|                  -> eval-mmrlhf, eval-realign, eval-fgaif, eval-dress (side by side) -> report

SHELL := /bin/bash
# SCALE=quick (default): `make demo` in ~28 minutes on 2 CPU cores at ~140 GFLOP/s (shorter reward-model
# and alignment trainings, 150 sampled prompts, 100 held-out scenes; vision, SFT and judge keep their
# steps: 10 of those minutes are vision + SFT, 4 the judge). SCALE=full: the configs' own step
# counts (each method's val-chosen point), 500 prompts, all 500 held-out scenes (with the ablations
# 45 min at 190 GFLOP/s; the result table of docs/RESULTS.md), in runs/demo-full. Any variable below
# can still be set on the command line.
## quick (the demo: short reward-model and alignment trainings) or full (the configs' own step counts)
SCALE ?= quick
# Per-scale defaults: one block per SCALE, each read by the one `?=` line of its variable below (a
# value set on the command line or in the environment wins). Empty = the configs' own value / all.
SCALES := quick full
quick.RUN            := demo
quick.RM_STEPS       := 60
quick.ALIGN_STEPS    := 60
quick.EVAL_LIMIT     := 100
quick.SAMPLE_PROMPTS := 150
quick.REFINE_OPTS    := --limit 50 --turns 2
quick.REALIGN_LIMIT  := 600
full.RUN             := demo-full
full.RM_STEPS        :=
full.ALIGN_STEPS     :=
full.EVAL_LIMIT      :=
full.SAMPLE_PROMPTS  := 500
full.REFINE_OPTS     := --limit 200 --turns 2
full.REALIGN_LIMIT   :=
ifneq ($(words $(SCALE))$(filter $(SCALE),$(SCALES)),1$(SCALE))
$(error SCALE=$(SCALE): use quick or full)
endif
## the run folder under runs/ (per SCALE: demo, demo-full; with MODEL: the model's name)
RUN ?= $(if $(MODEL),$(MODEL),$($(SCALE).RUN))
## steps of every reward-model training (per SCALE; empty: the configs' own)
RM_STEPS ?= $($(SCALE).RM_STEPS)
## steps of every alignment training (per SCALE; empty: the configs' own)
ALIGN_STEPS ?= $($(SCALE).ALIGN_STEPS)
## evaluate the first n held-out scenes only (per SCALE; empty: all 500)
EVAL_LIMIT ?= $($(SCALE).EVAL_LIMIT)
## train prompts sampled (K responses each; per SCALE)
SAMPLE_PROMPTS ?= $($(SCALE).SAMPLE_PROMPTS)
## refinement benchmark options: scenes and turns (per SCALE)
REFINE_OPTS ?= $($(SCALE).REFINE_OPTS)
OUT := runs/$(RUN)
## the seed of the world and of every trainer
SEED ?= 0
# A real checkpoint instead of the tiny model (`make pipeline MODEL=<name> BASE=<checkpoint folder>`):
# configs/models/<MODEL>/common.yaml is layered over every training config (policy, precision,
# batch sizes), then configs/models/<MODEL>/<stage>.yaml where one exists (learning rates).
## a model profile of configs/models/ (empty: the tiny model)
MODEL ?=
## the checkpoint folder SFT starts from when MODEL is set
BASE ?=
MODEL_DIR = configs/models/$(MODEL)
# (ablations share their method's file: fgaif-seq, fgaif-oracle and fgaif-judge use fgaif.yaml, realign-text realign.yaml,
# dress-uncond dress.yaml)
OVERLAY_FILE = $(MODEL_DIR)/$(patsubst dress-%,dress,$(patsubst fgaif-%,fgaif,$(patsubst realign-text,realign,$(1)))).yaml
OVERLAY = $(if $(MODEL),--config $(MODEL_DIR)/common.yaml $(if $(wildcard $(OVERLAY_FILE)),--config $(OVERLAY_FILE)))
# Every stage command runs through mmalign.timed: one line per run in $(OUT)/timings.jsonl (wall
# time including interpreter start and imports), read by the report.
TIMED = $(PY) -m mmalign.timed --log $(OUT)/timings.jsonl --target $@ --root $(OUT) --
# RANKS=n runs the generation-heavy stages (sample, feedback, eval) as n processes under torchrun
# (one per GPU where there are GPUs); batch b runs on rank b % n, and the merged output is the
# same as RANKS=1's (mmalign/shard.py).
## processes for sample / feedback / eval (torchrun); the output equals RANKS=1's
RANKS ?= 1
RUN_PY = $(if $(filter-out 1,$(RANKS)),$(PY) -m torch.distributed.run --standalone --nproc_per_node $(RANKS),$(PY))
## the virtualenv `make venv` makes (used by every target once it exists)
VENV ?= .venv
# The project's Python: .venv if `make venv` made one, else the active environment.
PY = $(shell [ -x $(VENV)/bin/python ] && echo $(VENV)/bin/python || echo python3)
# `torch==2.13.0` is the CPU wheel on the CI machine. Elsewhere PyPI's Linux wheel is a
# multi-GB CUDA build: pass TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU one.
## the torch `make install` installs when none imports
TORCH_SPEC ?= torch==2.13.0
## pip index for that torch (e.g. https://download.pytorch.org/whl/cpu)
TORCH_INDEX ?=
FIT = $(TIMED) $(PY) -m mmalign.cli fit

# The sources of each training, a prerequisite of its model: the method's module, the module base
# class and the losses (and reward-model code) it uses, besides the config each rule names. The
# wildcards keep files that may be absent in a checkout out of the graph rather than failing it.
TRAIN_BASE  := mmalign/methods/base.py
SFT_SRC     := $(TRAIN_BASE) mmalign/methods/sft.py $(wildcard mmalign/losses/sft.py)
DPO_SRC     := $(TRAIN_BASE) mmalign/methods/dpo.py mmalign/losses/dpo.py
REALIGN_SRC := $(DPO_SRC) mmalign/methods/realign.py mmalign/losses/rdpo.py
RM_SRC      := $(TRAIN_BASE) mmalign/methods/reward.py mmalign/losses/reward.py \
  $(wildcard mmalign/losses/sft.py mmalign/rewards/*.py)
FG_RM_SRC   := $(TRAIN_BASE) mmalign/methods/fg_reward.py $(wildcard mmalign/losses/fg.py mmalign/rewards/*.py)
FGAIF_SRC   := $(TRAIN_BASE) mmalign/methods/fgaif.py mmalign/losses/ppo.py $(wildcard mmalign/rewards/*.py)
DRESS_SRC   := $(SFT_SRC) mmalign/methods/dress.py $(wildcard mmalign/losses/dress.py)

.PHONY: help install venv deps data vision tiny-model sft eval-sft eval eval-compare sample judge feedback prefs mmrlhf-import mmrlhf-import-pairs \
  rm rm-score ref-logps dpo mmdpo sft-continued eval-mmrlhf index realign-data realign realign-text eval-realign \
  sample-val feedback-val fg-rm fg-rm-eval fgaif fgaif-seq fgaif-oracle fgaif-judge eval-fgaif oracle-fed \
  nlf dress-import dress eval-dress nlf-uncond dress-uncond eval-dress-uncond refine-compare sweep bench bench-dpo bench-index demo demo-full ablations report pipeline test test-slow clean

# `make help`: the usage line, the stage graph (`#|` lines), every target with a `## ` comment on its
# line under its section (`# --- ` lines), then every variable with a `## ` line above its `?=`, with
# its value in this invocation (`make help SCALE=full` shows full's).
THIS_MAKEFILE := $(lastword $(MAKEFILE_LIST))
HELP_VARS = $(shell awk '/^## /{d=1; next} d && /^[A-Za-z_]+ \?=/{print $$1} {d=0}' $(THIS_MAKEFILE))
shell_quote = '$(subst ','\'',$(1))'
define HELP_PROGRAM
NR == FNR { i = index($$0, "="); val[substr($$0, 1, i - 1)] = substr($$0, i + 1); next }
/^#\|/ { graph = graph "  " substr($$0, 3) "\n"; next }
/^# --- / { s = $$0; sub(/^# --- /, "", s); sub(/ -+$$/, "", s); targets = targets "\n  " s "\n"; next }
/^[A-Za-z0-9_%.-]+:.*## / { t = $$0; sub(/:.*/, "", t); targets = targets sprintf("    %-15s %s\n", t, substr($$0, index($$0, "## ") + 3)); next }
/^## / { doc = substr($$0, 4); next }
doc != "" && /^[A-Za-z_]+ \?=/ { v = $$1; x = (v in val) ? val[v] : ""; if (x == "") x = "(empty)";
  vars = vars sprintf("  %-15s %-24s %s\n", v, x, doc) }
{ doc = "" }
END { printf "mmalign: make <target> [VAR=value ...]; every output goes under runs/<RUN>/\n\n"
      printf "Stage graph (each name a target or a folder under runs/<RUN>/):\n%s", graph
      printf "\nTargets:\n%s", targets
      printf "\nVariables (name, value in this call, meaning):\n%s", vars }
endef
help: export HELP_AWK = $(HELP_PROGRAM)
help: ## this list: targets, the stage graph, the variables and their values
	@printf '%s\n' $(foreach v,$(HELP_VARS),$(call shell_quote,$(v)=$($(v)))) | awk "$$HELP_AWK" - $(THIS_MAKEFILE)

# --- environment --------------------------------------------------------------------------------

install: ## pip install -e ".[dev,bench]" (and torch when none imports) into the active Python
	@$(PY) -c "import torch" 2>/dev/null || { echo "no torch: installing $(TORCH_SPEC) (CPU)"; \
	  $(PY) -m pip install $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); }
	$(PY) -m pip install -e ".[dev,bench]"

venv: ## make .venv/ and install there (every target then uses it)
	python3 -m venv $(VENV)
	$(MAKE) install PY=$(VENV)/bin/python

# Fresh machine: if the active Python cannot import the stack, make a .venv and install there.
deps: ## make .venv/ when the active Python cannot import the stack
	@$(PY) -c "import mmalign, torch, transformers, lightning, faiss, peft, hypothesis, trl" 2>/dev/null || $(MAKE) venv

# --- stages ---------------------------------------------------------------------------------------

# YES_NO_ANSWERS=explained: yes/no answers go on to say what the image shows ("No, it is small.");
# short: "Yes." / "No." (docs/TESTBED.md: why the explained form is the one the tiny model learns).
## yes/no answers of the data: explained ("No, it is small.") or short ("No.")
YES_NO_ANSWERS ?= explained
data: deps $(OUT)/data/manifest.json ## synthetic scenes -> runs/<RUN>/data/{train,val,test}/sft.jsonl, images/
$(OUT)/data/manifest.json: data_pipelines/scenes.py mmalign/world.py
	$(TIMED) $(PY) -m data_pipelines.scenes --out $(OUT)/data --seed $(SEED) --yes-no-answers $(YES_NO_ANSWERS)

# The vision tower pretrained before any language model sees it (LLaVA starts from a pretrained
# CLIP): dense per-patch labels on fresh scenes -> a stock CLIPVisionModel in $(OUT)/vision/model.
# VISION_STEPS=n overrides the config's steps (the knob for how much the policy still hallucinates).
## vision pretraining steps (empty: the config's)
VISION_STEPS ?=
vision: deps $(OUT)/vision/manifest.json ## CLIP-style tower pretrained with dense per-patch labels -> runs/<RUN>/vision
$(OUT)/vision/manifest.json: $(OUT)/data/manifest.json models/vision.py mmalign/render.py configs/vision/tiny.yaml
	$(TIMED) $(PY) -m models.vision --config configs/vision/tiny.yaml --data $(OUT)/data --out $(OUT)/vision \
	  $(if $(VISION_STEPS),--steps $(VISION_STEPS))

# The tiny LLaVA built around the pretrained tower (its sizes and weights), decoder and projector new.
# The policy gets the vision run's earlier snapshot (POLICY_TOWER), the judge its final tower.
## the vision snapshot the policy is built around (the judge gets the final tower)
POLICY_TOWER ?= model-step400
tiny-model: deps $(OUT)/tiny-model/build.json ## tokenizer + tiny LLaVA around the POLICY_TOWER snapshot -> runs/<RUN>/tiny-model
$(OUT)/tiny-model/build.json: $(OUT)/data/manifest.json $(OUT)/vision/manifest.json models/tiny.py
	$(TIMED) $(PY) -m models.tiny --data $(OUT)/data --out $(OUT)/tiny-model --vision-tower $(OUT)/vision/$(POLICY_TOWER) --seed $(SEED)

# The policy SFT starts from: the tiny model built above, or BASE (a real checkpoint, `make pipeline`).
SFT_BASE = $(if $(MODEL),$(BASE),$(OUT)/tiny-model)
sft: deps $(OUT)/sft/model/config.json ## visual instruction tuning, tower frozen (configs/sft/tiny.yaml) -> runs/<RUN>/sft/model
$(OUT)/sft/model/config.json: $(if $(MODEL),$(OUT)/data/manifest.json,$(OUT)/tiny-model/build.json) configs/sft/tiny.yaml \
    $(SFT_SRC)
	$(FIT) --config configs/sft/tiny.yaml $(call OVERLAY,sft) --seed_everything $(SEED) \
	  --trainer.default_root_dir $(OUT)/sft \
	  --model.init_args.policy.init_args.path $(SFT_BASE) \
	  --model.init_args.export.dir $(OUT)/sft/model \
	  --data.init_args.train_file $(OUT)/data/train/sft.jsonl \
	  --data.init_args.val_file $(OUT)/data/val/sft.jsonl \
	  --data.init_args.data_root $(OUT)/data

eval-sft: deps $(OUT)/eval/sft/metrics.json ## the SFT model on the held-out scenes: CHAIR, AMBER, POPE, 95% intervals -> runs/<RUN>/eval/sft
EVAL = $(TIMED) $(RUN_PY) -m mmalign.cli eval
# compare reads finished evaluations: one process
EVAL_COMPARE = $(TIMED) $(PY) -m mmalign.cli eval compare
# EVAL_LIMIT=n evaluates the first n held-out scenes only (declared with the per-scale defaults above).
EVAL_OPTS = $(if $(EVAL_LIMIT),--limit $(EVAL_LIMIT))
$(OUT)/eval/sft/metrics.json: $(OUT)/sft/model/config.json $(wildcard mmalign/eval/*.py)
	$(EVAL) --model $(OUT)/sft/model --data $(OUT)/data --split test $(EVAL_OPTS) --out $(OUT)/eval/sft
	@cat $(OUT)/eval/sft/report.md

# Any checkpoint on the same held-out benchmark: make eval CKPT=runs/demo/sft/model NAME=sft-again
## eval: the checkpoint folder to evaluate
CKPT ?=
## eval: the name of its evaluation folder (default: CKPT's folder name)
NAME ?= $(notdir $(patsubst %/,%,$(CKPT)))
eval: deps ## any checkpoint on the same benchmark: CKPT=<folder> [NAME=x] -> runs/<RUN>/eval/<NAME>
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=<checkpoint folder> [NAME=<name>] [RUN=$(RUN)]"; exit 2; }
	$(EVAL) --model $(CKPT) --data $(OUT)/data --split test $(EVAL_OPTS) --out $(OUT)/eval/$(NAME)

# make eval-compare RUNS="runs/demo/eval/sft runs/demo/eval/other"  (the first is the baseline)
## eval-compare: the evaluation folders, the baseline first
RUNS ?=
eval-compare: deps ## side by side, paired differences vs the first: RUNS="a b" -> runs/<RUN>/eval/compare
	@test -n "$(RUNS)" || { echo "usage: make eval-compare RUNS=\"<eval folder> <eval folder> ...\""; exit 2; }
	$(EVAL_COMPARE) $(RUNS) --out $(OUT)/eval/compare

# --- sampling and AI feedback --------------------------------------------------------------------

## responses sampled per prompt
K ?= 4
# SAMPLE_PROMPTS (how many train prompts) is declared with the per-scale defaults above.
sample: deps $(OUT)/sample/manifest.json ## K responses per train prompt from the SFT model -> runs/<RUN>/sample
$(OUT)/sample/manifest.json: $(OUT)/sft/model/config.json data_pipelines/sample.py
	$(TIMED) $(RUN_PY) -m data_pipelines.sample --model $(OUT)/sft/model --data $(OUT)/data --split train \
	  --limit $(SAMPLE_PROMPTS) --k $(K) --seed $(SEED) --out $(OUT)/sample

# The judge starts as the SFT model given the final, stronger tower (judge-base), then trains on
# descriptions: it sees better and has trained longer than the policy it judges. A real checkpoint
# (MODEL=...) has no tower of ours to swap in: its judge starts from its SFT model.
JUDGE_BASE = $(if $(MODEL),$(OUT)/sft/model,$(OUT)/judge-base)
## judge training steps (empty: the config's)
JUDGE_STEPS ?=
$(OUT)/judge-base/build.json: $(OUT)/sft/model/config.json $(OUT)/vision/manifest.json models/tiny.py
	$(TIMED) $(PY) -m models.tiny swap-tower --model $(OUT)/sft/model --vision-tower $(OUT)/vision/model --out $(OUT)/judge-base
judge: deps $(OUT)/judge/model/config.json ## the SFT model with the final tower, trained on descriptions -> runs/<RUN>/judge/model
$(OUT)/judge/model/config.json: $(OUT)/sft/model/config.json $(if $(MODEL),,$(OUT)/judge-base/build.json) configs/judge/tiny.yaml \
    $(SFT_SRC)
	$(FIT) --config configs/judge/tiny.yaml $(call OVERLAY,judge) --seed_everything $(SEED) \
	  --trainer.default_root_dir $(OUT)/judge $(if $(JUDGE_STEPS),--trainer.max_steps $(JUDGE_STEPS)) \
	  --model.init_args.policy.init_args.path $(JUDGE_BASE) \
	  --model.init_args.export.dir $(OUT)/judge/model \
	  --data.init_args.train_file $(OUT)/data/train/sft.jsonl \
	  --data.init_args.val_file $(OUT)/data/val/sft.jsonl \
	  --data.init_args.data_root $(OUT)/data

## the source of `make feedback`: judge, oracle or detector
SOURCE ?= judge
## SOURCE=detector: the detector's checkpoint folder (OWL-ViT, OWLv2, Grounding-DINO)
DETECTOR ?=
## how the judge verifies a claim: caption (against its own description), lookup, yesno (docs/TESTBED.md)
JUDGE_QUESTIONS ?= caption
# FGAIF's unit of reward. Feedback records, the fine-grained reward models' exports, fg-rm-eval and PPO
# each record or check it, so a reward model trained on one segmentation is refused by the other.
## FGAIF segments: released (Fine-Grained RLHF's splitter, as FGAIF's release), released:<spaCy pipeline>, fine
SEGMENTATION ?= released
# One rule for every source (the folder name is the source), so the judge's and the oracle's
# feedback can both exist.
#
# FEEDBACK picks whose feedback every consumer reads: MM-RLHF's ranking and critiques (prefs, and the
# injected answers' scores), FGAIF's segment labels (fg-rm), DRESS's critiques, refinements and the
# judging of its revisions (nlf). `judge` is AI feedback, as in the papers (FGAIF's LVLM verification,
# DRESS's GPT-4 critiques, MM-RLHF's annotation); `oracle` (the scene graphs) is the control, and
# `make oracle-fed` runs every method on it beside this run. Re-Align's re-fill rule needs no feedback
# (a sentence-similarity threshold). Evaluation and fg-rm-eval always score against the oracle.
## whose feedback every consumer reads (prefs, fg-rm, nlf): judge (AI feedback) or oracle (the control)
FEEDBACK ?= judge
ifneq ($(filter-out judge oracle,$(FEEDBACK))$(words $(FEEDBACK)),1)
$(error FEEDBACK=$(FEEDBACK): use judge or oracle)
endif
JUDGE_MODEL = $(OUT)/judge/model
# A make variable that chooses what a stage reads is not a file, so make would keep a stage made under
# another value: $(OUT)/.vars/NAME holds the variable's value and is rewritten (and so newer than the
# stage) only when the value changes. Depending on $(call VAR,NAME) redoes the stage then. A new stamp
# is dated 1970: it records the value without forcing anything (a run made before the stamps existed
# keeps its stages until a value changes).
VAR = $(OUT)/.vars/$(1)
$(OUT)/.vars/%: FORCE
	@mkdir -p $(@D); if [ ! -f $@ ]; then printf '%s' '$($*)' > $@ && touch -d @0 $@; \
	  elif [ "$$(cat $@)" != '$($*)' ]; then printf '%s' '$($*)' > $@; fi
.PHONY: FORCE
FORCE:
# the judge's options of a consumer whose source is $(1): its checkpoint and its way of asking
JUDGE_ARGS = $(if $(filter judge,$(1)),--judge $(JUDGE_MODEL) --judge-questions $(JUDGE_QUESTIONS))
JUDGE_DEP = $(if $(filter judge,$(1)),$(JUDGE_MODEL)/config.json)
.SECONDEXPANSION:
feedback: deps $(OUT)/feedback/$(SOURCE)/manifest.json ## segment labels, scores, critique, refinement by SOURCE -> runs/<RUN>/feedback/<SOURCE>
$(OUT)/feedback/%/manifest.json: $(OUT)/sample/manifest.json data_pipelines/feedback.py mmalign/segments.py \
    $$(if $$(filter judge,$$*),$(OUT)/judge/model/config.json)
	$(TIMED) $(RUN_PY) -m data_pipelines.feedback --responses $(OUT)/sample --data $(OUT)/data --source $* \
	  $(if $(filter judge,$*),--judge $(OUT)/judge/model --judge-questions $(JUDGE_QUESTIONS),$(if $(filter detector,$*),--detector $(DETECTOR))) \
	  --segmentation $(SEGMENTATION) --out $(OUT)/feedback/$*

# --- MM-RLHF: ranked preferences, reward models, MM-DPO ----------------------------------------

# MM-RLHF's rankings are annotations; here the judge annotates (FEEDBACK=oracle: the scene-graph
# oracle, the control; docs/TESTBED.md). The injected answers are scored by the same source.
## whose scores rank the responses (default FEEDBACK): judge or oracle
PREFS_SOURCE ?= $(FEEDBACK)
## hallucination-injected answers added per prompt
INJECT ?= 2
prefs: deps $(OUT)/prefs/manifest.json ## MM-RLHF: ranked responses per prompt and every strict pair -> runs/<RUN>/prefs
$(OUT)/prefs/manifest.json: $(OUT)/feedback/$(PREFS_SOURCE)/manifest.json data_pipelines/prefs.py mmalign/inject.py mmalign/oracle.py \
    $(call JUDGE_DEP,$(PREFS_SOURCE)) $(call VAR,PREFS_SOURCE)
	$(TIMED) $(PY) -m data_pipelines.prefs --feedback $(OUT)/feedback/$(PREFS_SOURCE) --data $(OUT)/data \
	  --inject-per-prompt $(INJECT) --seed $(SEED) --out $(OUT)/prefs $(call JUDGE_ARGS,$(PREFS_SOURCE))

# The published MM-RLHF data (unzipped yifanzhang114/MM-RLHF: data.jsonl + short/ long/ mcq/ safety/).
## mmrlhf-import: the unzipped published MM-RLHF data
MMRLHF ?= data/MM-RLHF
mmrlhf-import: deps ## the published MM-RLHF data (MMRLHF=<folder>) -> runs/<RUN>/mmrlhf/import
	$(TIMED) $(PY) -m data_pipelines.import_mmrlhf --input $(MMRLHF)/data.jsonl --images $(MMRLHF) \
	  --out $(OUT)/mmrlhf/import --val-fraction 0.05 --on-error skip
mmrlhf-import-pairs: deps ## the authors' dpo_pairs.jsonl (critiques for the RM, tie flags; MMRLHF=<folder>) -> runs/<RUN>/mmrlhf/import-pairs
	$(TIMED) $(PY) -m data_pipelines.import_mmrlhf --input $(MMRLHF)/dpo_pairs.jsonl --images $(MMRLHF) \
	  --format pairs --out $(OUT)/mmrlhf/import-pairs --val-fraction 0.05 --on-error skip

# Reward models on the prefs pairs: MM-RLHF's critique RM (writes a critique, then scores) and the
# scalar Bradley-Terry baseline (configs/rm/). `rm-score` scores the val pairs with both (ranking
# accuracy, critique quality vs the oracle's) and the train pairs with the critique RM: its margin
# is MM-DPO's delta (reward_margin in runs/<RUN>/rm/scored/{train,val}/pairs.jsonl, joined to the
# pairs by id when MM-DPO loads them). RM_STEPS / ALIGN_STEPS=n shorten the reward-model and the
# alignment trainings (per-scale defaults above; empty: the configs' step counts hold).
rm: deps $(OUT)/rm/critique/model/reward_config.json $(OUT)/rm/scalar/model/reward_config.json ## critique reward model + scalar Bradley-Terry baseline -> runs/<RUN>/rm
$(OUT)/rm/%/model/reward_config.json: $(OUT)/prefs/manifest.json $(OUT)/sft/model/config.json configs/rm/%.yaml $(RM_SRC)
	$(FIT) --config configs/rm/$*.yaml $(call OVERLAY,rm) --seed_everything $(SEED) \
	  --trainer.default_root_dir $(OUT)/rm/$* \
	  --model.init_args.policy.init_args.path $(OUT)/sft/model \
	  --model.init_args.export.dir $(OUT)/rm/$*/model $(if $(RM_STEPS),--trainer.max_steps $(RM_STEPS)) \
	  --data.init_args.train_file $(OUT)/prefs/train/pairs.jsonl \
	  --data.init_args.val_file $(OUT)/prefs/val/pairs.jsonl \
	  --data.init_args.data_root $(OUT)/data
RM_MARGINS = $(OUT)/rm/scored/train/manifest.json $(OUT)/rm/scored/val/manifest.json
rm-score: deps $(RM_MARGINS) $(OUT)/rm/scalar/scored-val/manifest.json ## ranking accuracy, critique quality; every pair's RM margin -> runs/<RUN>/rm/scored
	@cat $(OUT)/rm/scored/val/report.md | head -8; cat $(OUT)/rm/scalar/scored-val/report.md | head -6
$(OUT)/rm/scored/%/manifest.json: $(OUT)/rm/critique/model/reward_config.json data_pipelines/score_rm.py
	$(TIMED) $(PY) -m data_pipelines.score_rm --rm $(OUT)/rm/critique/model --pairs $(OUT)/prefs/$*/pairs.jsonl \
	  --data-root $(OUT)/data --out $(OUT)/rm/scored/$* $(if $(filter val,$*),--with-reference-critique)
$(OUT)/rm/scalar/scored-val/manifest.json: $(OUT)/rm/scalar/model/reward_config.json data_pipelines/score_rm.py
	$(TIMED) $(PY) -m data_pipelines.score_rm --rm $(OUT)/rm/scalar/model --pairs $(OUT)/prefs/val/pairs.jsonl \
	  --data-root $(OUT)/data --out $(OUT)/rm/scalar/scored-val

# Reference log-probs of every prefs pair under the SFT model, in one pass (DPO configs: reference:
# precomputed). They read the prefs pairs themselves, so plain DPO needs no reward model.
REF_PAIRS = $(OUT)/ref/train/manifest.json $(OUT)/ref/val/manifest.json
ref-logps: deps $(REF_PAIRS) ## the SFT model's log-probs of every prefs pair, one pass -> runs/<RUN>/ref
$(OUT)/ref/%/manifest.json: $(OUT)/prefs/manifest.json $(OUT)/sft/model/config.json data_pipelines/ref_logps.py
	$(TIMED) $(PY) -m data_pipelines.ref_logps --model $(OUT)/sft/model --pairs $(OUT)/prefs/$*/pairs.jsonl \
	  --data-root $(OUT)/data --max-length 256 --out $(OUT)/ref/$*

# A policy trained from the SFT model: $(1) = target and run folder, $(2) = config, $(3) = its other
# prerequisites (data and sources), $(4) = its extra arguments. `make help` reads the `<target>: ## ...`
# line written before each call.
define fit_policy
SWEEP_ARGS.$(1) = --config $(2) $$(call OVERLAY,$(1)) --model.init_args.policy.init_args.path $$(OUT)/sft/model $(4)
SWEEP_DEPS.$(1) = $(OUT)/sft/model/config.json $(3) $(2)
$(1): deps $(OUT)/$(1)/model/config.json
$(OUT)/$(1)/model/config.json: $(OUT)/sft/model/config.json $(3) $(2)
	$$(FIT) --config $(2) $$(call OVERLAY,$(1)) --seed_everything $$(SEED) \
	  --trainer.default_root_dir $$(OUT)/$(1) \
	  --model.init_args.policy.init_args.path $$(OUT)/sft/model \
	  --model.init_args.export.dir $$(OUT)/$(1)/model $$(if $$(ALIGN_STEPS),--trainer.max_steps $$(ALIGN_STEPS)) $(4)
endef
PREF_DATA = --data.init_args.train_file $(OUT)/ref/train/pairs.jsonl --data.init_args.val_file $(OUT)/ref/val/pairs.jsonl \
  --data.init_args.data_root $(OUT)/data --model.init_args.probe_file $(OUT)/data/val/sft.jsonl
# MM-DPO joins the critique RM's margins (rm-score) to the pairs by pair id as it loads them.
MMDPO_MARGINS = --data.init_args.train_margins $(OUT)/rm/scored/train/pairs.jsonl \
  --data.init_args.val_margins $(OUT)/rm/scored/val/pairs.jsonl
dpo: ## plain DPO on the prefs pairs, no reward model (ablation) -> runs/<RUN>/dpo/model
$(eval $(call fit_policy,dpo,configs/dpo/dpo.yaml,$(REF_PAIRS) $(DPO_SRC),$(PREF_DATA)))
mmdpo: ## MM-DPO: DPO with Dynamic Reward Scaling by the critique RM's margins -> runs/<RUN>/mmdpo/model
$(eval $(call fit_policy,mmdpo,configs/dpo/mmdpo.yaml,$(REF_PAIRS) $(RM_MARGINS) $(DPO_SRC),$(PREF_DATA) $(MMDPO_MARGINS)))
sft-continued: ## the SFT baseline trained further (configs/sft/continue.yaml) -> runs/<RUN>/sft-continued/model
$(eval $(call fit_policy,sft-continued,configs/sft/continue.yaml,$(SFT_SRC),\
  --data.init_args.train_file $(OUT)/data/train/sft.jsonl --data.init_args.val_file $(OUT)/data/val/sft.jsonl \
  --data.init_args.data_root $(OUT)/data))

# Held-out evaluation of each, and the side-by-side table with paired differences vs SFT.
$(OUT)/eval/%/metrics.json: $(OUT)/%/model/config.json $(wildcard mmalign/eval/*.py)
	$(EVAL) --model $(OUT)/$*/model --data $(OUT)/data --split test $(EVAL_OPTS) --out $(OUT)/eval/$*
eval-mmrlhf: ## SFT, SFT-continued, DPO, MM-DPO on the held-out scenes, side by side -> runs/<RUN>/eval/compare-mmrlhf
eval-mmrlhf: deps $(foreach r,sft sft-continued dpo mmdpo,$(OUT)/eval/$(r)/metrics.json)
	$(EVAL_COMPARE) $(foreach r,sft sft-continued dpo mmdpo,$(OUT)/eval/$(r)) --out $(OUT)/eval/compare-mmrlhf
	@cat $(OUT)/eval/compare-mmrlhf/compare.md

# --- Re-Align -------------------------------------------------------------------------------------

# Train images embedded by the SFT policy's vision tower (what Re-Align's paper uses: the VLM's own
# encoder) into a FAISS index; INDEX_KIND=flat (exact cosine) | ivf | hnsw.
## FAISS index kind: flat (exact cosine), ivf or hnsw
INDEX_KIND ?= flat
index: deps $(OUT)/index/manifest.json ## Re-Align: train images embedded by the SFT vision tower -> FAISS index runs/<RUN>/index
$(OUT)/index/manifest.json: $(OUT)/data/manifest.json $(OUT)/sft/model/config.json data_pipelines/index.py mmalign/retrieval.py models/embedders.py
	$(TIMED) $(PY) -m data_pipelines.index --data $(OUT)/data --splits train --embedder policy --model $(OUT)/sft/model \
	  --kind $(INDEX_KIND) --out $(OUT)/index

# Dual preferences (Re-Align's rule): per train caption, its object / attribute / relation words are
# masked and the SFT policy re-fills them while looking at each of the 10 nearest train images in rank
# order; the first re-fill whose sentence-embedding cosine to the caption is below 0.95 (packaged
# all-MiniLM-L6-v2) is the rejected answer, its image the rejected image. REALIGN_REJECTED=injection:
# the earlier rule-based way (one injected hallucination + the nearest image that makes the caption
# wrong; switching redoes the stage). The re-fill decodes with the policy (~0.33 s per
# caption on 2 cores), so the quick demo re-fills the first REALIGN_LIMIT captions only.
## realign-data: how the rejected answer is made: refill (Re-Align's rule) or injection
REALIGN_REJECTED ?= refill
## realign-data: use the first n train captions (per SCALE; empty: all)
REALIGN_LIMIT ?= $($(SCALE).REALIGN_LIMIT)
realign-data: deps $(OUT)/realign-data/manifest.json ## caption re-filled by the SFT policy under a retrieved image (Re-Align's rule) -> runs/<RUN>/realign-data
$(OUT)/realign-data/manifest.json: $(OUT)/data/manifest.json $(OUT)/index/manifest.json $(OUT)/sft/model/config.json \
    data_pipelines/realign_data.py mmalign/refill.py mmalign/textsim.py mmalign/inject.py mmalign/oracle.py mmalign/retrieval.py \
    $(call VAR,REALIGN_REJECTED) $(call VAR,REALIGN_LIMIT)
	$(TIMED) $(PY) -m data_pipelines.realign_data --data $(OUT)/data --index $(OUT)/index --split train \
	  --tasks detailed_caption --k 10 --seed $(SEED) --rejected $(REALIGN_REJECTED) --model $(OUT)/sft/model \
	  $(if $(REALIGN_LIMIT),--limit $(REALIGN_LIMIT)) --out $(OUT)/realign-data

# rDPO (text + visual term) and its text-only ablation (plain DPO on the same pairs), then SFT,
# SFT-continued, text-only DPO and rDPO side by side on the held-out scenes.
REALIGN_DATA = --data.init_args.train_file $(OUT)/realign-data/train/pairs.jsonl \
  --data.init_args.val_file $(OUT)/realign-data/val/pairs.jsonl --data.init_args.data_root $(OUT)/data \
  --model.init_args.probe_file $(OUT)/data/val/sft.jsonl
realign: ## rDPO: text + visual DPO terms -> runs/<RUN>/realign/model
$(eval $(call fit_policy,realign,configs/realign/tiny.yaml,$(OUT)/realign-data/manifest.json $(REALIGN_SRC),$(REALIGN_DATA)))
realign-text: ## rDPO's text-only ablation (visual_weight 0: plain DPO on the same pairs)
$(eval $(call fit_policy,realign-text,configs/realign/tiny.yaml,$(OUT)/realign-data/manifest.json $(REALIGN_SRC),$(REALIGN_DATA) --model.init_args.visual_weight 0))
eval-realign: ## SFT, SFT-continued, text-only DPO, rDPO side by side -> runs/<RUN>/eval/compare-realign
eval-realign: deps $(foreach r,sft sft-continued realign-text realign,$(OUT)/eval/$(r)/metrics.json)
	$(EVAL_COMPARE) $(foreach r,sft sft-continued realign-text realign,$(OUT)/eval/$(r)) --out $(OUT)/eval/compare-realign
	@head -12 $(OUT)/eval/compare-realign/compare.md

# --- FGAIF ---------------------------------------------------------------------------------------

# Held-out responses for the fine-grained reward models' precision / recall: the SFT policy's samples
# on the val scenes, labelled by the oracle.
sample-val: deps $(OUT)/sample-val/manifest.json ## SFT samples on the val scenes (the fine-grained RMs' held-out test) -> runs/<RUN>/sample-val
$(OUT)/sample-val/manifest.json: $(OUT)/sft/model/config.json data_pipelines/sample.py
	$(TIMED) $(RUN_PY) -m data_pipelines.sample --model $(OUT)/sft/model --data $(OUT)/data --split val \
	  --k $(K) --seed $(SEED) --out $(OUT)/sample-val
feedback-val: deps $(OUT)/feedback-val/oracle/manifest.json ## the oracle's labels of those samples -> runs/<RUN>/feedback-val/oracle
$(OUT)/feedback-val/oracle/manifest.json: $(OUT)/sample-val/manifest.json data_pipelines/feedback.py mmalign/segments.py
	$(TIMED) $(RUN_PY) -m data_pipelines.feedback --responses $(OUT)/sample-val --data $(OUT)/data --source oracle \
	  --segmentation $(SEGMENTATION) --out $(OUT)/feedback-val/oracle

# Three fine-grained reward models (object existence, attribute, relation), each the SFT model with a
# 3-class head read at every segment's last token, trained on FG_SOURCE's segment labels of the SFT
# model's train samples, into runs/<RUN>/fg-rm/<FG_SOURCE>/<type>. FG_SOURCE=judge trains on the
# judge's labels (the stage refuses labels with no hallucinated segment of a type: a reward model
# trained on those would be a constant). FG_RM_SHARED=1 trains one model with three heads
# (.../shared) instead. FG_RM_STEPS (default RM_STEPS) shortens the trainings.
comma := ,
## whose segment labels the fine-grained reward models learn (default FEEDBACK): judge or oracle
FG_SOURCE ?= $(FEEDBACK)
## 1: one fine-grained reward model with three heads instead of three models
FG_RM_SHARED ?=
## fine-grained reward-model training steps (default: RM_STEPS)
FG_RM_STEPS ?= $(RM_STEPS)
FG_TYPES := object attribute relation
FG_RM := $(OUT)/fg-rm/$(FG_SOURCE)
FG_RM_MODELS := $(if $(FG_RM_SHARED),shared,$(FG_TYPES))
FG_RM_PATH = $(FG_RM)/$(if $(FG_RM_SHARED),shared,$(1))/model
FG_RM_DEPS = $(foreach m,$(FG_RM_MODELS),$(FG_RM)/$(m)/model/fg_reward_config.json)
fg-rm: deps $(FG_RM_DEPS) ## FGAIF: object / attribute / relation reward models on FG_SOURCE's labels -> runs/<RUN>/fg-rm
$(FG_RM)/%/model/fg_reward_config.json: $(OUT)/feedback/$(FG_SOURCE)/manifest.json $(OUT)/feedback-val/oracle/manifest.json \
    $(OUT)/sft/model/config.json configs/fg_rm/tiny.yaml $(FG_RM_SRC)
	$(FIT) --config configs/fg_rm/tiny.yaml $(call OVERLAY,fg-rm) --seed_everything $(SEED) \
	  --trainer.default_root_dir $(FG_RM)/$* $(if $(FG_RM_STEPS),--trainer.max_steps $(FG_RM_STEPS)) \
	  --model.init_args.policy.init_args.path $(OUT)/sft/model \
	  --model.init_args.types '$(if $(filter shared,$*),[object$(comma) attribute$(comma) relation],[$*])' \
	  --model.init_args.export.dir $(FG_RM)/$*/model \
	  --data.init_args.train_file $(OUT)/feedback/$(FG_SOURCE)/feedback.jsonl \
	  --data.init_args.val_file $(OUT)/feedback-val/oracle/feedback.jsonl \
	  --data.init_args.data_root $(OUT)/data --model.init_args.segmentation $(SEGMENTATION)
# Precision / recall / F1 of "hallucinated" per type on the held-out (val-scene) responses vs the oracle.
FG_RM_EVAL := $(FG_RM)/eval$(if $(FG_RM_SHARED),-shared)
fg-rm-eval: deps $(FG_RM_EVAL)/manifest.json ## precision / recall / F1 of "hallucinated" per type on the held-out responses
	@head -12 $(FG_RM_EVAL)/report.md
$(FG_RM_EVAL)/manifest.json: $(FG_RM_DEPS) $(OUT)/feedback-val/oracle/manifest.json data_pipelines/fg_rm_eval.py
	$(TIMED) $(PY) -m data_pipelines.fg_rm_eval --models $(foreach t,$(FG_TYPES),$(t)=$(call FG_RM_PATH,$(t))) \
	  --feedback $(OUT)/feedback-val/oracle --data-root $(OUT)/data --out $(FG_RM_EVAL)

# PPO with the dense segment rewards (FGAIF) and the sequence-level ablation (same reward models,
# same total reward on the last token), then SFT, SFT-continued, the ablation and FGAIF side by side.
## fgaif, fgaif-seq: the value model starts from the policy or (as released) the object reward model's backbone
FGAIF_VALUE_INIT ?= policy
FGAIF_ARGS = --data.init_args.train_file $(OUT)/data/train/sft.jsonl --data.init_args.data_root $(OUT)/data \
  --model.init_args.segmentation $(SEGMENTATION) --model.init_args.value_init $(FGAIF_VALUE_INIT) \
  --model.init_args.reward_models '{"object": "$(call FG_RM_PATH,object)", "attribute": "$(call FG_RM_PATH,attribute)", \
  "relation": "$(call FG_RM_PATH,relation)"}'
fgaif: ## PPO with dense segment rewards from the three reward models -> runs/<RUN>/fgaif/model
$(eval $(call fit_policy,fgaif,configs/fgaif/tiny.yaml,$(FG_RM_DEPS) $(FGAIF_SRC),$(FGAIF_ARGS)))
fgaif-seq: ## the sequence-level-reward ablation (the same total reward on the last token)
$(eval $(call fit_policy,fgaif-seq,configs/fgaif/tiny.yaml,$(FG_RM_DEPS) $(FGAIF_SRC),$(FGAIF_ARGS) --model.init_args.reward_placement sequence))
# Control: the same PPO with the oracle's segment labels as rewards (perfect reward models).
fgaif-oracle: ## control: the same PPO with the oracle's segment labels as rewards (perfect reward models)
$(eval $(call fit_policy,fgaif-oracle,configs/fgaif/tiny.yaml,$(OUT)/data/manifest.json $(FGAIF_SRC),\
  --data.init_args.train_file $(OUT)/data/train/sft.jsonl --data.init_args.data_root $(OUT)/data \
  --model.init_args.segmentation $(SEGMENTATION) \
  --model.init_args.reward_models '{"object": "oracle"$(comma) "attribute": "oracle"$(comma) "relation": "oracle"}'))
# Control: the same PPO with the judge's own verdicts as rewards, scored online on every rollout (the
# AI feedback without a reward model in between: the judge verifies by describing the image, which the
# fine-grained reward models do not learn on the tiny model; docs/RESULTS.md). Its lr, 2e-5, is the
# point its own val sweep chose (6e-5, FGAIF's, lengthened its captions and raised CHAIR_i).
fgaif-judge: ## control: the same PPO with the judge's verdicts as rewards, online (no reward model)
$(eval $(call fit_policy,fgaif-judge,configs/fgaif/tiny.yaml,$(OUT)/data/manifest.json $(JUDGE_MODEL)/config.json $(FGAIF_SRC),\
  --data.init_args.train_file $(OUT)/data/train/sft.jsonl --data.init_args.data_root $(OUT)/data --model.init_args.optim.lr 2.0e-5 \
  --model.init_args.segmentation $(SEGMENTATION) \
  --model.init_args.reward_models '{"object": "judge:$(JUDGE_MODEL)"$(comma) "attribute": "judge:$(JUDGE_MODEL)"$(comma) "relation": "judge:$(JUDGE_MODEL)"}'))
FGAIF_RUNS = sft sft-continued fgaif-seq fgaif fgaif-oracle fgaif-judge
eval-fgaif: ## SFT, SFT-continued, sequence-reward PPO, FGAIF, oracle- and judge-reward PPO side by side -> runs/<RUN>/eval/compare-fgaif
eval-fgaif: deps $(foreach r,$(FGAIF_RUNS),$(OUT)/eval/$(r)/metrics.json)
	$(EVAL_COMPARE) $(foreach r,$(FGAIF_RUNS),$(OUT)/eval/$(r)) --out $(OUT)/eval/compare-fgaif
	@head -12 $(OUT)/eval/compare-fgaif/compare.md

# --- DRESS ---------------------------------------------------------------------------------------

# Natural-language feedback records for conditional RL: a critique example per sampled response
# (its critique text, or its rating level with DRESS_CONDITION=rating, + question -> response) and a refinement episode per response with
# something to fix (response, NLF_SOURCE's refinement, the SFT policy's revision judged again by the
# same source; every revision kept with its own condition). Score = mean of the source's faithfulness
# and helpfulness (the judge's: coverage of its own description), so a revision that drops
# everything does not pass as "good".
## whose feedback nlf turns into records and judges the revisions with (default FEEDBACK): judge or oracle
NLF_SOURCE ?= $(FEEDBACK)
## SFT revisions per refinement episode
NLF_REVISIONS ?= 1
## the score that splits "Answer quality: bad." from "good." (nlf and dress; rating condition only)
NLF_THRESHOLD ?= 0.6
## DRESS condition: feedback (the critique text, the paper's reading) or rating (its rating level)
DRESS_CONDITION ?= feedback
# The nlf stage into $(OUT)/$(1) with --condition $(2); $(3): its other prerequisites (the stamp of
# the variable that sets $(2)). nlf and its unconditioned ablation nlf-uncond are this one rule.
define nlf_stage
$(OUT)/$(1)/manifest.json: $(OUT)/feedback/$(NLF_SOURCE)/manifest.json $(OUT)/sft/model/config.json \
    $(OUT)/data/manifest.json data_pipelines/nlf.py mmalign/conditions.py mmalign/nlf_records.py mmalign/oracle.py \
    $(call JUDGE_DEP,$(NLF_SOURCE)) $(call VAR,NLF_SOURCE) $(3)
	$$(TIMED) $$(PY) -m data_pipelines.nlf --feedback $$(OUT)/feedback/$$(NLF_SOURCE) --data $$(OUT)/data $$(call JUDGE_ARGS,$$(NLF_SOURCE)) \
	  --model $$(OUT)/sft/model --out $$(OUT)/$(1) --revisions $$(NLF_REVISIONS) --seed $$(SEED) \
	  --score-weights faithfulness=1,helpfulness=1 --thresholds $$(NLF_THRESHOLD) --condition $(2)
endef
nlf: deps $(OUT)/nlf/manifest.json ## DRESS: critique examples + refinement episodes with conditions -> runs/<RUN>/nlf
$(eval $(call nlf_stage,nlf,$$(DRESS_CONDITION),$(call VAR,DRESS_CONDITION)))

# DRESS's released NLF data (unzipped YangyiYY/LVLM_NLF) + COCO train2017 images.
## dress-import: the unzipped LVLM_NLF folder
DRESS ?= data/LVLM_NLF
## dress-import: the COCO train2017 images
COCO_TRAIN ?= $(DRESS)/train2017
dress-import: deps ## DRESS's released NLF data (DRESS=<folder>) -> runs/<RUN>/dress/import
	$(TIMED) $(PY) -m data_pipelines.import_dress --input $(DRESS) --images $(COCO_TRAIN) \
	  --out $(OUT)/dress/import --val-fraction 0.05 --on-error skip --condition $(DRESS_CONDITION)

# Conditional RL from the SFT model (configs/dress/tiny.yaml; the condition scheme must match nlf's).
dress: ## conditional RL from the SFT model (configs/dress/tiny.yaml) -> runs/<RUN>/dress/model
$(eval $(call fit_policy,dress,configs/dress/tiny.yaml,$(OUT)/nlf/manifest.json $(DRESS_SRC),\
  --data.init_args.train_file $(OUT)/nlf/train/sft.jsonl --data.init_args.val_file $(OUT)/nlf/val/sft.jsonl \
  --data.init_args.data_root $(OUT)/data --model.init_args.condition $(DRESS_CONDITION) \
  --model.init_args.condition_thresholds '[$(NLF_THRESHOLD)]'))

# The unconditioned ablation of DRESS: the same records with no condition text (nlf --condition none,
# the same seed, model and judge as nlf), fitted with the same loss and config (condition: none) and
# exported without dress_condition.json, so evaluation asks it plainly. eval-dress-uncond's paired
# difference of dress against it is what the condition adds (DRESS's claim).
nlf-uncond: deps $(OUT)/nlf-uncond/manifest.json ## DRESS ablation: nlf's records without conditions -> runs/<RUN>/nlf-uncond
$(eval $(call nlf_stage,nlf-uncond,none,))
dress-uncond: ## DRESS ablation: the same training without conditions (condition: none) -> runs/<RUN>/dress-uncond/model
$(eval $(call fit_policy,dress-uncond,configs/dress/tiny.yaml,$(OUT)/nlf-uncond/manifest.json $(DRESS_SRC),\
  --data.init_args.train_file $(OUT)/nlf-uncond/train/sft.jsonl --data.init_args.val_file $(OUT)/nlf-uncond/val/sft.jsonl \
  --data.init_args.data_root $(OUT)/data --model.init_args.condition none))

# Held-out evaluation (a DRESS model is asked with its best condition, read from its folder, before the
# caption prompts: its feedback is written on captions), and the
# refinement benchmark: answer, get the oracle's refinement, answer again (REFINE_OPTS, per scale
# above: 2 turns on 50 test scenes at SCALE=quick, 200 at full).
REFINE = $(TIMED) $(PY) -m data_pipelines.refine_bench
$(OUT)/refine/%/manifest.json: $(OUT)/%/model/config.json $(OUT)/data/manifest.json data_pipelines/refine_bench.py \
    mmalign/oracle.py mmalign/conditions.py
	$(REFINE) --model $(OUT)/$*/model --data $(OUT)/data --split test $(REFINE_OPTS) --out $(OUT)/refine/$*
refine-bench-%: deps $(OUT)/refine/%/manifest.json ## the refinement benchmark of one run: make refine-bench-<run>
	@cat $(OUT)/refine/$*/report.md
DRESS_RUNS = sft sft-continued dress
eval-dress: ## SFT, SFT-continued, DRESS (its best condition) + the refinement benchmark, side by side
eval-dress: deps $(foreach r,$(DRESS_RUNS),$(OUT)/eval/$(r)/metrics.json $(OUT)/refine/$(r)/manifest.json)
	$(EVAL_COMPARE) $(foreach r,$(DRESS_RUNS),$(OUT)/eval/$(r)) --out $(OUT)/eval/compare-dress
	$(REFINE) compare $(foreach r,$(DRESS_RUNS),$(OUT)/refine/$(r)) --names $(DRESS_RUNS) --out $(OUT)/refine/compare
	@head -12 $(OUT)/eval/compare-dress/compare.md; cat $(OUT)/refine/compare/compare.md
DRESS_UNCOND_RUNS = dress-uncond dress
eval-dress-uncond: ## DRESS against its unconditioned ablation (the difference is the condition's), + refinement benchmark
eval-dress-uncond: deps $(foreach r,$(DRESS_UNCOND_RUNS),$(OUT)/eval/$(r)/metrics.json $(OUT)/refine/$(r)/manifest.json)
	$(EVAL_COMPARE) $(foreach r,$(DRESS_UNCOND_RUNS),$(OUT)/eval/$(r)) --out $(OUT)/eval/compare-dress-uncond
	$(REFINE) compare $(foreach r,$(DRESS_UNCOND_RUNS),$(OUT)/refine/$(r)) --names $(DRESS_UNCOND_RUNS) \
	  --out $(OUT)/refine/compare-dress-uncond
	@head -12 $(OUT)/eval/compare-dress-uncond/compare.md; cat $(OUT)/refine/compare-dress-uncond/compare.md

# --- tuning on the validation scenes ---------------------------------------------------------------

# Hyperparameters are chosen on the val scenes; the test scenes only report. `make sweep METHOD=mmdpo
# GRID="model.init_args.optim.lr=5e-7,1e-6 model.init_args.beta=0.1,0.3"` trains every grid point with
# the method's own arguments (those of its make rule; ALIGN_STEPS unless the grid sets
# trainer.max_steps), evaluates each on the first SWEEP_LIMIT val scenes and picks the lowest CHAIR_i
# among the points whose object coverage is at most 5 points below SFT's on the same scenes
# (data_pipelines/sweep.py). The same GRID size for every method keeps the sweep budgets equal.
## sweep: the training target to tune (mmdpo, dpo, realign, realign-text, fgaif, fgaif-seq, dress, sft-continued)
METHOD ?=
## sweep: the grid, space-separated KEY=V1,V2 axes (`mmalign fit` options without their dashes)
GRID ?=
## sweep: the val scenes each point (and the SFT baseline) is evaluated on
SWEEP_LIMIT ?= 100
$(OUT)/eval-val/sft/metrics.json: $(OUT)/sft/model/config.json $(wildcard mmalign/eval/*.py)
	$(EVAL) --model $(OUT)/sft/model --data $(OUT)/data --split val --limit $(SWEEP_LIMIT) --out $(OUT)/eval-val/sft
sweep: deps ## tune METHOD over GRID on the val scenes -> runs/<RUN>/sweep/<METHOD>/sweep.md, best.json
	@test -n "$(METHOD)" -a -n "$(SWEEP_ARGS.$(METHOD))" -a -n "$(GRID)" || { echo "usage: make sweep"\
	  "METHOD=<training target> GRID=\"model.init_args.optim.lr=1e-6,2e-6 ...\""; exit 2; }
	@$(MAKE) --no-print-directory $(SWEEP_DEPS.$(METHOD)) $(OUT)/eval-val/sft/metrics.json
	$(TIMED) $(PY) -m data_pipelines.sweep --out $(OUT)/sweep/$(METHOD) --data $(OUT)/data --limit $(SWEEP_LIMIT) \
	  $(foreach g,$(GRID),--grid '$(g)') --baseline $(OUT)/eval-val/sft --guard object_cover=-0.05 --seed $(SEED) \
	  -- $(SWEEP_ARGS.$(METHOD)) $(if $(ALIGN_STEPS),--trainer.max_steps $(ALIGN_STEPS))

# --- benchmarks ----------------------------------------------------------------------------------

# Retrieval recall@10 and latency of IVF and HNSW against exact flat search and NumPy brute force,
# 100k x 128 vectors (~70 s on 2 cores) -> benchmarks/results/index-<date>.{md,json}
bench-index: deps ## FAISS IVF / HNSW recall@10 and latency vs exact and NumPy -> benchmarks/results/
	$(PY) benchmarks/bench_index.py

# DPO training throughput and peak memory, mmalign vs TRL's DPOTrainer on the same tiny LLaVA, data
# and batch, each variant in its own process; loss agreement checked to 1e-4 (trl comes with
# `make install`, the "bench" extra). Writes benchmarks/results/dpo-<date>.{md,json} with the machine and the date.
bench: bench-dpo bench-index ## both benchmarks
bench-dpo: ## DPO pairs/s and peak memory vs TRL's DPOTrainer -> benchmarks/results/
bench-dpo: deps $(OUT)/sft/model/config.json $(OUT)/sample/manifest.json
	$(PY) benchmarks/bench_dpo.py --model $(OUT)/sft/model --responses $(OUT)/sample/responses.jsonl --data-root $(OUT)/data

# --- the whole pipeline ---------------------------------------------------------------------------

# Every method against SFT and SFT-continued on the same held-out scenes: the report's runs.
CORE_RUNS = sft sft-continued mmdpo realign fgaif dress
# Ablations and controls (`make ablations`): plain DPO, text-only rDPO, sequence-reward PPO,
# oracle-reward PPO. The report adds whichever of them have been evaluated.
ABLATION_RUNS = dpo realign-text fgaif-seq fgaif-oracle dress-uncond
REFINE_RUNS = sft sft-continued dress
STAGES = data $(if $(MODEL),,vision tiny-model) sft judge sample feedback prefs index rm rm-score ref-logps \
  sft-continued mmdpo realign-data realign sample-val feedback-val fg-rm fg-rm-eval fgaif nlf dress
demo: $(STAGES) report ## every stage of the core pipeline, then the report (SCALE=quick ~28 min on 2 cores; full ~1 h)
	@echo "demo done ($(SCALE) scale): $(OUT)/report.md (report-metrics.png, report-training.png beside it)"

ablations: ## plain DPO, text-only rDPO, sequence-reward PPO, oracle-reward PPO, unconditioned DRESS (+ evaluations, report)
ablations: deps $(foreach r,$(ABLATION_RUNS),$(OUT)/eval/$(r)/metrics.json)
	@# a fresh make sees the new evaluations and adds them to the report
	@$(MAKE) --no-print-directory report

# The SCALE=full demo plus the ablations: the numbers of docs/RESULTS.md's method sections.
demo-full: ## SCALE=full demo + ablations -> runs/demo-full
	$(MAKE) demo ablations SCALE=full

# The control of FEEDBACK=judge: every method again on the oracle's feedback, in runs/<RUN>-oracle.
# The stages that read no feedback (data to SFT, the judge, samples, the index, Re-Align, SFT-continued
# and their evaluations) are copied from this run with their times, not redone (copies, not hard
# links: Lightning rewrites checkpoints and logs in place); then `make demo FEEDBACK=oracle` runs the
# rest there, and eval/compare-feedback puts each method on the judge's feedback beside the same method on
# the oracle's (paired on the same test scenes; first column SFT).
## oracle-fed: the run folder of the oracle-fed control (default <RUN>-oracle)
ORACLE_RUN ?= $(RUN)-oracle
FEEDBACK_FREE = data vision tiny-model sft judge-base judge sample feedback/judge index realign-data realign \
  sft-continued sample-val feedback-val eval/sft eval/sft-continued eval/realign refine/sft refine/sft-continued
FED_RUNS = mmdpo fgaif dress
oracle-fed: ## control: MM-DPO, FGAIF and DRESS on the oracle's feedback beside this run's -> runs/<RUN>-oracle, eval/compare-feedback
oracle-fed: deps $(STAGES) $(foreach r,$(FED_RUNS),$(OUT)/eval/$(r)/metrics.json)
	@test "$(FEEDBACK)" = judge || { echo "oracle-fed: this run's FEEDBACK is $(FEEDBACK); the control is of FEEDBACK=judge"; exit 2; }
	@mkdir -p runs/$(ORACLE_RUN); for d in $(FEEDBACK_FREE); do \
	  if [ -e $(OUT)/$$d ] && [ ! -e runs/$(ORACLE_RUN)/$$d ]; then \
	    mkdir -p runs/$(ORACLE_RUN)/$$(dirname $$d) && cp -a $(OUT)/$$d runs/$(ORACLE_RUN)/$$d; fi; done
	@[ -e runs/$(ORACLE_RUN)/timings.jsonl ] || cp $(OUT)/timings.jsonl runs/$(ORACLE_RUN)/timings.jsonl
	$(MAKE) --no-print-directory demo RUN=$(ORACLE_RUN) FEEDBACK=oracle
	$(EVAL_COMPARE) $(OUT)/eval/sft $(foreach r,$(FED_RUNS),$(OUT)/eval/$(r) runs/$(ORACLE_RUN)/eval/$(r)) \
	  --names sft $(foreach r,$(FED_RUNS),$(r) $(r)-oracle-fed) --out $(OUT)/eval/compare-feedback

# The refinement comparison the report prints: the REFINE_RUNS side by side, each with its paired
# difference from sft (refine_bench compare, as eval-dress runs it), into refine/compare/compare.json,
# where data_pipelines.report looks by default (--refine-compare).
refine-compare: deps $(OUT)/refine/compare/manifest.json ## the refinement benchmarks of the report's runs (REFINE_RUNS) side by side -> runs/<RUN>/refine/compare
$(OUT)/refine/compare/manifest.json: $(foreach r,$(REFINE_RUNS),$(OUT)/refine/$(r)/manifest.json)
	$(REFINE) compare $(foreach r,$(REFINE_RUNS),$(OUT)/refine/$(r)) --names $(REFINE_RUNS) --out $(OUT)/refine/compare

# One report: the table (every method vs SFT and SFT-continued, 95% intervals), the refinement
# benchmark, wall time per stage (timings.jsonl), plots of the metrics and the training curves.
report: deps $(OUT)/report.md ## every method vs SFT and SFT-continued, refinement, reward models, wall times -> runs/<RUN>/report.md
	@sed -n '1,/^## /p' $(OUT)/report.md | head -40
$(OUT)/report.md: $(foreach r,$(CORE_RUNS),$(OUT)/eval/$(r)/metrics.json) \
    $(foreach r,$(REFINE_RUNS),$(OUT)/refine/$(r)/manifest.json) $(OUT)/refine/compare/manifest.json \
    $(OUT)/fg-rm/$(FG_SOURCE)/eval/manifest.json \
    $(wildcard $(foreach r,$(ABLATION_RUNS),$(OUT)/eval/$(r)/metrics.json)) data_pipelines/report.py
	$(TIMED) $(PY) -m data_pipelines.report --run $(OUT) --scale $(SCALE) --runs $(CORE_RUNS) \
	  --ablations $(ABLATION_RUNS) --refine $(REFINE_RUNS)

# The same stages on a real checkpoint: make pipeline MODEL=llava-1.5-7b-qlora BASE=<checkpoint folder>
# (configs/models/<MODEL>/; a CUDA GPU). DRY_RUN=1 checks the configs and prints the stage plan.
## pipeline: 1 = check every config and print the stage plan, run nothing
DRY_RUN ?=
# A GPU run takes the configs' own step counts unless SCALE is given.
PIPELINE_SCALE = $(if $(filter command line,$(origin SCALE)),$(SCALE),full)
pipeline: ## the same stages on a real checkpoint: MODEL=<profile> BASE=<folder> [DRY_RUN=1]
	@test -n "$(MODEL)" || { echo "usage: make pipeline MODEL=<$(notdir $(wildcard configs/models/*))> BASE=<checkpoint> [DRY_RUN=1]"; exit 2; }
	@test -f $(MODEL_DIR)/common.yaml || { echo "no configs/models/$(MODEL)/common.yaml (have: $(notdir $(wildcard configs/models/*)))"; exit 2; }
	$(PY) -m mmalign.plan --model $(MODEL) --base "$(BASE)" --run $(OUT) $(if $(DRY_RUN),--dry-run) \
	  -- $(MAKE) --no-print-directory demo MODEL=$(MODEL) BASE=$(BASE) SCALE=$(PIPELINE_SCALE) RUN=$(RUN)

# --- tests ----------------------------------------------------------------------------------------

test: deps ## the fast test suite
	$(PY) -m pytest -q

test-slow: deps ## the slow tests (the whole demo + ablations, the pipeline dry runs)
	$(PY) -m pytest -q -m slow

clean: ## delete runs/<RUN>
	rm -rf runs/$(RUN)
