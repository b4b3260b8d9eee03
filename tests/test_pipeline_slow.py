"""The README's first command, for real: `make demo` on a fresh run folder (minutes; CI only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_demo_end_to_end():
    run = "ci-demo"
    shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Shorter reward-model, preference and PPO trainings than the demo's and 100 of the 500
    # held-out scenes per evaluation (same code and configs): the whole pipeline has to fit CI's
    # budget.
    make = ["make", "-C", str(ROOT), "demo", f"RUN={run}", f"PY={sys.executable}", "RM_STEPS=100", "ALIGN_STEPS=60",
            "EVAL_LIMIT=100", "REFINE_OPTS=--limit 50 --turns 2"]
    subprocess.run(make, check=True, env=env)
    out = ROOT / "runs" / run
    doc = json.loads((out / "eval/sft/metrics.json").read_text())
    caps = doc["sections"]["captions"]
    assert caps["n"] == 100, "EVAL_LIMIT=100 evaluates the first 100 held-out scenes"
    assert {f"{k}/{s}" for k in ("existence", "attribute", "relation") for s in ("random", "popular", "adversarial")} \
        <= set(doc["sections"])
    for key, v in caps["metrics"].items():
        assert v["low"] <= v["value"] <= v["high"] or v["value"] != v["value"], key  # NaN only when undefined
    # The SFT model reads the image: it states the object count far above chance (1 in 4)
    # and names fewer absent shapes than an image-blind caption would (see docs/EVALUATION.md).
    assert caps["metrics"]["count_accuracy"]["value"] > 0.5
    assert caps["metrics"]["chair_i"]["value"] < 0.6
    for name in ("report.md", "chart.png", "generations.jsonl"):
        assert (out / "eval/sft" / name).stat().st_size > 0
    # sample -> feedback with the judge source, measured against the oracle.
    sampled = json.loads((out / "sample/manifest.json").read_text())["counts"]
    assert sampled["prompts"] == 500 and sampled["responses"] + sampled.get("rejected_empty", 0) == 2000
    fb = json.loads((out / "feedback/judge/report.json").read_text())
    assert fb["source"] == "judge" and fb["counts"]["responses"] == sampled["responses"]
    assert set(fb["agreement_with_oracle"]) == {"object", "attribute", "relation"}
    assert fb["agreement_with_oracle"]["object"]["n"] > 1000
    # MM-RLHF: preferences, both reward models scored on held-out pairs, MM-DPO's reward margins,
    # reference log-probs, and the four policies side by side.
    prefs = json.loads((out / "prefs/report.json").read_text())
    assert prefs["pairs"]["train"] > 1000 and prefs["pairs"]["val"] > 50
    for rm in ("rm/scored/val", "rm/scalar/scored-val"):
        value, low, high = json.loads((out / rm / "report.json").read_text())["ranking"]["accuracy"]
        assert 0.0 <= low <= value <= high <= 1.0, rm
    first = json.loads((out / "ref/train/pairs.jsonl").open().readline())
    assert {"reward_margin", "ref_chosen_logp", "ref_rejected_logp", "ref_model"} <= set(first)
    compare = (out / "eval/compare-mmrlhf/compare.md").read_text()
    for name in ("sft", "sft-continued", "dpo", "mmdpo"):
        assert name in compare
    with open(out / "mmdpo/logs/metrics.csv") as f:
        header = f.readline()
    assert "probe/distinct2" in header and "train/beta" in header
    # Re-Align: the index, dual preferences with retrieved images, rDPO and its text-only ablation.
    rd = json.loads((out / "realign-data/report.json").read_text())
    assert rd["pairs"]["train"] > 1000
    compare = (out / "eval/compare-realign/compare.md").read_text()
    for name in ("sft-continued", "realign-text", "realign"):
        assert name in compare
    with open(out / "realign/logs/metrics.csv") as f:
        assert "train/visual_loss" in f.readline()
    # FGAIF: three fine-grained reward models measured on held-out responses, PPO with dense
    # segment rewards, the sequence-reward ablation and the oracle-reward control side by side.
    fg = json.loads((out / "fg-rm/oracle/eval/metrics.json").read_text())
    assert set(fg["types"]) == {"object", "attribute", "relation"} and fg["responses"] == 800
    for t, m in fg["types"].items():
        assert m["support"]["hallucinated"] > 0, t
    compare = (out / "eval/compare-fgaif/compare.md").read_text()
    for name in ("sft-continued", "fgaif-seq", "fgaif", "fgaif-oracle"):
        assert f"| {name} |" in compare, name
    with open(out / "fgaif/logs/metrics.csv") as f:
        header = f.readline()
    for key in ("train/reward/object", "train/kl", "train/clip_fraction", "train/time/generation_s",
                "train/time/scoring_s", "train/time/training_s", "train/rollout_tokens_per_s"):
        assert key in header, key
    # DRESS: feedback records with conditions, conditional RL, the conditioned evaluation and the
    # refinement benchmark turn by turn for SFT, SFT-continued and DRESS.
    nlf = json.loads((out / "nlf/report.json").read_text())
    assert nlf["records"]["critique"]["total"] > 1000 and nlf["records"]["refinement"]["total"] > 1000
    dress = json.loads((out / "eval/dress/metrics.json").read_text())
    assert dress["settings"]["condition"] == "Answer quality: good."
    refine = (out / "refine/compare/compare.md").read_text()
    for name in ("sft", "sft-continued", "dress"):
        assert f"| {name} |" in refine or f"- {name}:" in refine, name
    assert "## turn 2" in refine
    # Unchanged inputs: a second `make demo` redoes nothing.
    again = subprocess.run(make, check=True, env=env, capture_output=True, text=True)
    for stage in ("mmalign.cli fit", "data_pipelines.scenes", "data_pipelines.sample", "data_pipelines.feedback",
                  "data_pipelines.prefs", "data_pipelines.score_rm", "data_pipelines.ref_logps", "mmalign.cli eval --model",
                  "data_pipelines.index", "data_pipelines.realign_data", "data_pipelines.fg_rm_eval",
                  "data_pipelines.nlf", "data_pipelines.refine_bench --model"):
        assert stage not in again.stdout, stage
