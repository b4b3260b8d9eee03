"""The demo report (data_pipelines.report): the one table every method against SFT and
SFT-continued, the wall time per stage, the training curves, and clear errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from data_pipelines import report as REP
from mmalign.eval.cli import main as eval_main

FAST = ["--n-boot", "50", "--max-new-tokens", "12", "--yesno-max-new-tokens", "3", "--no-progress", "--batch-size", "8"]
RUNS = ["sft", "sft-continued", "mmdpo", "realign", "fgaif", "dress"]


@pytest.fixture(scope="module")
def run_dir(world, model_dirs, tmp_path_factory) -> Path:
    """A run folder with real `mmalign eval` outputs: the tiny LLaVA plays SFT (and, copied,
    MM-DPO and FGAIF), the tiny Qwen2-VL plays SFT-continued (copied: rDPO, DRESS)."""
    root = tmp_path_factory.mktemp("report") / "demo"
    for name, family in (("sft", "llava"), ("sft-continued", "qwen2_vl")):
        assert eval_main(["--model", str(model_dirs[family]), "--data", str(world), "--out",
                          str(root / "eval" / name), *FAST]) == 0
    for name, src in (("mmdpo", "sft"), ("fgaif", "sft"), ("realign", "sft-continued"), ("dress", "sft-continued")):
        shutil.copytree(root / "eval" / src, root / "eval" / name)
    return root


def _value(run_dir: Path, run: str, section: str, key: str) -> float:
    return json.loads((run_dir / "eval" / run / "metrics.json").read_text())["sections"][section]["metrics"][key]["value"]


def test_the_table_has_every_method_with_paired_differences(run_dir):
    md, doc = REP.build(run_dir, RUNS, ["dpo"], [], "quick", n_boot=50)
    rows = {line.split("|")[1].strip(" *"): line for line in md.splitlines() if line.startswith("| **")}
    assert list(rows) == [REP.NAMES[r] for r in RUNS]  # the ablation was not evaluated: not listed
    assert "Δ SFT" not in rows["SFT"] and "Δ cont." not in rows["SFT-continued"]
    # The untrained tiny models leave some rates undefined (no object named: CHAIR_i is 0/0);
    # check every column defined for both.
    defined = [(s, k) for s, k, _ in REP.COLUMNS
               if all(math.isfinite(_value(run_dir, r, s, k)) for r in ("sft", "sft-continued"))]
    assert len(defined) >= 2, defined
    for section, key in defined:
        # A copy of SFT differs from SFT by exactly 0 on the same scenes ...
        assert doc["vs_sft"]["mmdpo"][f"{section}:{key}"]["value"] == 0.0
        # ... and a copy of SFT-continued by SFT-continued's difference, computed here by hand
        # from the two metrics.json files.
        want = _value(run_dir, "sft-continued", section, key) - _value(run_dir, "sft", section, key)
        got = doc["vs_sft"]["realign"][f"{section}:{key}"]
        assert got["value"] == pytest.approx(want, abs=1e-12)
        assert got["low"] <= got["value"] <= got["high"]
        assert doc["vs_sft_continued"]["realign"][f"{section}:{key}"]["value"] == 0.0
    section, key = defined[0]
    col = [(s, k) for s, k, _ in REP.COLUMNS].index((section, key))
    cell = rows["rDPO (Re-Align)"].split("|")[2 + col]
    assert f"{100 * _value(run_dir, 'realign', section, key):.1f}%" in cell and "Δ SFT" in cell
    assert "Δ cont. +0.0" in cell
    for header in ("CHAIR_i", "CHAIR_s", "POPE F1 random", "POPE F1 popular", "POPE F1 adversarial",
                   "attribute errors", "relation errors", "helpfulness"):
        assert header in md


def test_main_writes_report_timings_and_plots(run_dir, capsys):
    (run_dir / "timings.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"stage": "data", "seconds": 3.0, "rc": 0, "started": "a"},
        {"stage": "sft", "seconds": 250.0, "rc": 0, "started": "b"},
        {"stage": "sft", "seconds": 7.0, "rc": 1, "started": "c"},      # failed: not the output in place
        {"stage": "data", "seconds": 4.5, "rc": 0, "started": "d"},     # re-run: the latest counts
        {"stage": "report", "seconds": 9.0, "rc": 0, "started": "e"},   # the report does not time itself
    )) + "\n")
    log = run_dir / "mmdpo" / "logs"
    log.mkdir(parents=True)
    with open(log / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "train/reward_accuracy"])
        for s in range(0, 60, 10):
            w.writerow([0, s, 0.69 - s / 200, 0.5 + s / 200])
        w.writerow([0, 61, "nan", ""])  # non-finite values are skipped, not plotted
    assert REP.main(["--run", str(run_dir), "--runs", *RUNS, "--n-boot", "50", "--refine"]) == 0
    md = (run_dir / "report.md").read_text()
    assert "| sft | 4 min 10 s | b |" in md and "| data | 4 s | d |" in md
    assert "**4 min 14 s**" in md  # 250 + 4.5, the failed run and the report's own line left out
    assert "![training curves](report-training.png)" in md
    for png in ("report-metrics.png", "report-training.png"):
        assert (run_dir / png).stat().st_size > 10_000
    doc = json.loads((run_dir / "report.json").read_text())
    assert doc["total_seconds"] == 254.5 and doc["runs"] == RUNS


def test_missing_evaluations_and_bad_timing_lines_are_named(run_dir, tmp_path, capsys):
    empty = tmp_path / "run"
    (empty / "eval").mkdir(parents=True)
    assert REP.main(["--run", str(empty)]) == 2
    assert "no evaluation for sft, sft-continued" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "eval", copy / "eval")
    (copy / "timings.jsonl").write_text('{"stage": "data", "seconds": 1}\nnot json\n')
    assert REP.main(["--run", str(copy), "--runs", *RUNS, "--n-boot", "20", "--refine"]) == 2
    assert f"{copy / 'timings.jsonl'}:2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must start with sft"):
        REP.build(run_dir, ["mmdpo", "sft"], [], [], "quick")


def test_curves_and_smoothing():
    assert REP._ema([1.0, 1.0, 1.0]) == [1.0, 1.0, 1.0]
    short = REP._ema([0.0, 1.0])
    assert short == [0.0, 0.5]  # few points: alpha 0.5, so the curve follows them


def _refine_run(folder: Path, false_at: list[tuple[int, int]], model: str) -> None:
    """A refinement-benchmark output (metrics.json, generations.jsonl, manifest) of scenes whose
    false object claims at turn 0 and turn 1 are ``false_at``, made with the benchmark's own
    row and summary functions."""
    from data_pipelines import refine_bench as RB
    from mmalign.eval.refine_metrics import TYPES
    from mmalign.stage import StageOutput, atomic_write_jsonl, atomic_write_text

    def judgement(n_false: int) -> dict:
        return {"false_claims": [{"type": "object", "key": f"object: s{i}", "text": "x"} for i in range(n_false)],
                "claims": {t: 3 for t in TYPES}, "checked": {t: 3 for t in TYPES}, "coverage": 0.5,
                "words": 9, "refinement": "Fix." if n_false else RB.NO_CHANGE}

    recs = []
    for k, (a, b) in enumerate(false_at):
        j0, j1 = judgement(a), judgement(b)
        recs.append({"id": f"scene{k}", "turns": [{"turn": 0, "refined": True, "row": RB.turn_row(j0)},
                                                  {"turn": 1, "refined": True, "row": RB.turn_row(j1, j0, True)}]})
    doc = {"stage": RB.STAGE, "model": model, "scenes": len(recs), "settings": {"model": model, "condition": ""},
           "turns": RB.summarize_records(recs, 1, n_boot=50, seed=0)}
    with StageOutput(folder, stage=RB.STAGE, config={"model": model}) as st:
        atomic_write_jsonl(st.path / "generations.jsonl", recs)
        atomic_write_text(st.path / "metrics.json", json.dumps(doc) + "\n")


def test_refinement_table_is_read_from_the_benchmarks_comparison(run_dir, tmp_path, capsys):
    from data_pipelines import refine_bench as RB

    run = tmp_path / "run"
    shutil.copytree(run_dir / "eval", run / "eval")
    refine = ["sft", "sft-continued", "dress"]
    for name, false_at in (("sft", [(2, 2), (1, 1), (0, 0)]), ("sft-continued", [(2, 1), (1, 1), (0, 0)]),
                           ("dress", [(2, 0), (1, 0), (0, 1)])):
        _refine_run(run / "refine" / name, false_at, name)
    # not compared yet: the report says so, with the command, and leaves the table out
    md, doc = REP.build(run, RUNS, [], refine, "quick", n_boot=50)
    err = capsys.readouterr().err
    assert "## Refinement benchmark" in md and "Not shown:" in md and "| false claims per caption" not in md
    assert f"{run / 'refine' / 'compare' / 'compare.json'}: missing" in err
    assert "refine_bench compare" in err and "--names sft sft-continued dress" in err
    assert doc["refine"] is None and "missing" in doc["refine_missing"]
    # compared: the table comes from compare.json
    assert RB.main(["compare", *(str(run / "refine" / r) for r in refine), "--names", *refine,
                    "--out", str(run / "refine" / "compare"), "--n-boot", "50"]) == 0
    md, doc = REP.build(run, RUNS, [], refine, "quick", n_boot=50)
    cmp = json.loads((run / "refine" / "compare" / "compare.json").read_text())
    assert doc["refine"] == cmp["diffs"] and "refine_missing" not in doc
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "turn" in line}
    assert "Not shown" not in md
    cell = rows["false claims per caption, turn 0"].split("|")[2]
    assert cell.startswith(" 1.0 [") and "%" not in cell  # 3 false claims over 3 scenes: a count, not a share
    assert "Δ SFT" in rows["turn-0 false claims fixed after turn 1"]
    # a benchmark run made again after the comparison: the comparison is older, and not used
    capsys.readouterr()
    _refine_run(run / "refine" / "dress", [(2, 0), (1, 0), (0, 0)], "dress")
    md, doc = REP.build(run, RUNS, [], refine, "quick", n_boot=50)
    assert "not made from the refinement runs now in place" in capsys.readouterr().err
    assert doc["refine"] is None and "| false claims per caption" not in md
