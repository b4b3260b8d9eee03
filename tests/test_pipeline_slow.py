"""The README's first command, for real: `make demo` (and `make ablations`) on a fresh run folder (minutes; CI only)."""

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
    # The README's `make demo` at its default (quick) scale, plus the ablations, into its own run
    # folder: the report must hold every method and every ablation.
    make = ["make", "-C", str(ROOT), "demo", "ablations", f"RUN={run}", f"PY={sys.executable}"]
    subprocess.run(make, check=True, env=env)
    out = ROOT / "runs" / run
    # One report: the table (every method vs SFT and SFT-continued), the refinement benchmark,
    # the reward models, the wall time of every stage, two plots.
    report = (out / "report.md").read_text()
    table = report.split("## Every method vs SFT and SFT-continued", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| **")]
    for name in ("SFT", "SFT-continued", "MM-DPO", "rDPO", "FGAIF-PPO", "DRESS", "DPO (ablation)",
                 "text-only DPO", "PPO sequence reward", "PPO oracle rewards", "DRESS unconditioned"):
        assert any(name in r for r in rows), name
    assert all(r.count("Δ SFT") == 8 for r in rows[1:]) and all(r.count("Δ cont.") == 8 for r in rows[2:])
    for section in ("## Refinement benchmark", "## Reward models", "## Training curves", "## Wall time per stage"):
        assert section in report, section
    stages = {json.loads(x)["stage"] for x in (out / "timings.jsonl").read_text().splitlines()}
    assert {"data", "tiny-model", "sft", "judge", "sample", "feedback/judge", "prefs", "index", "rm/critique",
            "mmdpo", "realign", "fg-rm/judge/object", "fgaif", "nlf", "dress", "eval/dress", "refine/dress",
            "report"} <= stages
    for png in ("report-metrics.png", "report-training.png"):
        assert (out / png).stat().st_size > 20_000, png
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
    assert sampled["prompts"] == 150 and sampled["responses"] + sampled.get("rejected_empty", 0) == 600
    fb = json.loads((out / "feedback/judge/report.json").read_text())
    assert fb["source"] == "judge" and fb["counts"]["responses"] == sampled["responses"]
    assert set(fb["agreement_with_oracle"]) == {"object", "attribute", "relation"}
    assert fb["agreement_with_oracle"]["object"]["n"] > 500
    # MM-RLHF: preferences, both reward models scored on held-out pairs, MM-DPO's reward margins,
    # reference log-probs, and the four policies side by side.
    prefs = json.loads((out / "prefs/report.json").read_text())
    assert prefs["pairs"]["train"] > 500 and prefs["pairs"]["val"] > 50
    for rm in ("rm/scored/val", "rm/scalar/scored-val"):
        value, low, high = json.loads((out / rm / "report.json").read_text())["ranking"]["accuracy"]
        assert 0.0 <= low <= value <= high <= 1.0, rm
    first = json.loads((out / "ref/train/pairs.jsonl").open().readline())
    assert {"ref_chosen_logp", "ref_rejected_logp", "ref_model"} <= set(first)
    # the margins stay with the scored pairs; MM-DPO joins them by pair id as it loads its data
    assert "reward_margin" in json.loads((out / "rm/scored/train/pairs.jsonl").open().readline())
    with open(out / "mmdpo/logs/metrics.csv") as f:
        header = f.readline()
    assert "probe/distinct2" in header and "train/beta" in header
    # Re-Align: the index, dual preferences with retrieved images, rDPO and its text-only ablation.
    rd = json.loads((out / "realign-data/report.json").read_text())
    # the paper's rule on the quick demo's first 600 captions (REALIGN_LIMIT): policy re-fills accepted
    # below the 0.95 cosine, almost all of them wrong for the original image
    assert rd["rejected"] == "refill" and rd["pairs"]["train"] > 400
    assert rd["refill"]["acceptance"]["rate"] > 0.9 and rd["refill"]["oracle"]["wrong_on_original"] > 0.8
    with open(out / "realign/logs/metrics.csv") as f:
        assert "train/visual_loss" in f.readline()
    # FGAIF: three fine-grained reward models measured on held-out responses, PPO with dense
    # segment rewards, the sequence-reward ablation and the oracle-reward control side by side.
    fg = json.loads((out / "fg-rm/judge/eval/metrics.json").read_text())
    assert set(fg["types"]) == {"object", "attribute", "relation"} and fg["responses"] == 800
    for t, m in fg["types"].items():
        assert m["support"]["hallucinated"] > 0, t
    with open(out / "fgaif/logs/metrics.csv") as f:
        header = f.readline()
    for key in ("train/reward/object", "train/kl", "train/clip_fraction", "train/time/generation_s",
                "train/time/scoring_s", "train/time/training_s", "train/rollout_tokens_per_s"):
        assert key in header, key
    # DRESS: feedback records with conditions, conditional RL, the conditioned evaluation and the
    # refinement benchmark turn by turn for SFT, SFT-continued and DRESS.
    nlf = json.loads((out / "nlf/report.json").read_text())
    # a critique example per kept sample; a refinement episode per sample with something to fix
    assert nlf["records"]["critique"]["total"] == sampled["responses"] and nlf["records"]["refinement"]["total"] > 300
    dress = json.loads((out / "eval/dress/metrics.json").read_text())
    # conditioned on the feedback text (the default): asked with the good feedback derived from the
    # oracle's top-rated critiques, its verdict for an answer without a false claim
    assert nlf["condition"]["mode"] == "feedback"
    assert dress["settings"]["condition"] == "Feedback: There is no hallucination in the answer."
    # the unconditioned ablation: the same records without condition text, asked plainly
    assert json.loads((out / "nlf-uncond/report.json").read_text())["condition"]["mode"] == "none"
    assert not json.loads((out / "eval/dress-uncond/metrics.json").read_text())["settings"].get("condition")
    refine = json.loads((out / "refine/dress/metrics.json").read_text())
    assert len(refine["turns"]) == 3 and refine["scenes"] == 50
    # Unchanged inputs: a second `make demo` redoes nothing.
    again = subprocess.run(make, check=True, env=env, capture_output=True, text=True)
    for stage in ("mmalign.cli fit", "data_pipelines.scenes", "data_pipelines.sample", "data_pipelines.feedback",
                  "data_pipelines.prefs", "data_pipelines.score_rm", "data_pipelines.ref_logps", "mmalign.cli eval --model",
                  "data_pipelines.index", "data_pipelines.realign_data", "data_pipelines.fg_rm_eval",
                  "data_pipelines.nlf", "data_pipelines.refine_bench --model", "data_pipelines.report"):
        assert stage not in again.stdout, stage
