"""`mmalign eval` end to end with a tiny checkpoint: the world, the published formats, the judge,
`eval compare`, re-runs and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmalign.cli import main as mmalign_main
from mmalign.eval.cli import main
from mmalign.stage import read_jsonl

FIX = Path(__file__).parent / "fixtures" / "real"
FAST = ["--n-boot", "50", "--max-new-tokens", "12", "--yesno-max-new-tokens", "3", "--no-progress", "--batch-size", "8"]


@pytest.fixture(scope="module")
def world_run(world, model_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "llava"
    assert main(["--model", str(model_dirs["llava"]), "--data", str(world), "--out", str(out), *FAST]) == 0
    return out


def test_world_run_writes_everything(world_run, world):
    doc = json.loads((world_run / "metrics.json").read_text())
    assert doc["benchmark"] == "world" and doc["settings"]["decoding"] == "greedy"
    assert doc["settings"]["max_new_tokens"] == 12 and doc["machine"] and doc["date"]
    sections = doc["sections"]
    assert sections["captions"]["n"] == 8  # the fixture world has 8 test scenes
    assert set(sections) == {"captions"} | {f"{k}/{s}" for k in ("existence", "attribute", "relation")
                                            for s in ("random", "popular", "adversarial")}
    for name, sec in sections.items():
        for key, v in sec["metrics"].items():
            assert set(v) == {"value", "low", "high", "n"}, (name, key)
            if v["value"] == v["value"] and v["low"] == v["low"]:  # not NaN
                assert v["low"] - 1e-9 <= v["value"] <= v["high"] + 1e-9, (name, key, v)
    for key in ("chair_i", "chair_s", "object_cover", "attribute_error_rate", "relation_error_rate", "distinct_2",
                "mean_words", "loop_rate"):
        assert key in sections["captions"]["metrics"]
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed_rate"):
        assert key in sections["existence/adversarial"]["metrics"]
    assert doc["throughput"]["caption"]["prompts"] == 8 and doc["throughput"]["yesno"]["per_second"] > 0
    rows = read_jsonl(world_run / "generations.jsonl")
    assert len(rows) == sum(s["n"] for s in sections.values())
    assert all(r["image"].startswith(str(world.resolve())) for r in rows)
    cap = next(r for r in rows if r["section"] == "captions")
    assert {"prompt", "generation", "reference", "obj_mentions", "words"} <= set(cap)
    report = (world_run / "report.md").read_text()
    assert "| object (CHAIR_i / CHAIR_s) |" in report and "| existence/adversarial |" in report
    assert (world_run / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((world_run / "manifest.json").read_text())["stage"] == "eval"


def test_rerun_skips_and_compare_same_model_is_zero(world_run, world, model_dirs, tmp_path, capsys):
    args = ["--model", str(model_dirs["llava"]), "--data", str(world), "--out", str(world_run), *FAST]
    assert main(args) == 0
    assert "up to date, skipping" in capsys.readouterr().out
    # A second copy of the same evaluation: every paired difference is exactly 0.
    copy = tmp_path / "copy"
    shutil.copytree(world_run, copy)
    with pytest.raises(SystemExit) as e:  # through the top-level `mmalign` entry point
        mmalign_main(["eval", "compare", str(world_run), str(copy), "--names", "a", "b", "--out", str(tmp_path / "cmp"),
                      "--n-boot", "50"])
    assert e.value.code == 0
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    diffs = cmp["diffs"][str(copy)]
    assert all(v["value"] == 0 for sec in diffs.values() for v in sec.values() if v["value"] == v["value"])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| captions | a | b | Δ vs a |" in md and "| CHAIR_i | " in md
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000


def test_compare_needs_shared_items(world_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(world_run, other)
    rows = read_jsonl(other / "generations.jsonl")
    (other / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    assert main(["compare", str(world_run), str(other)]) == 2
    assert "not evaluated on the same items" in capsys.readouterr().err
    assert main(["compare", str(world_run), str(tmp_path / "missing")]) == 2


def test_published_formats_and_judge(model_dirs, tmp_path):
    out = tmp_path / "real"
    args = ["--model", str(model_dirs["llava"]), "--images", str(FIX / "images"),
            "--pope", str(FIX / "pope" / "coco_pope_random.json"),
            "--coco-instances", str(FIX / "coco" / "instances_val2014.json"),
            "--amber-queries", str(FIX / "amber" / "query_all.json"),
            "--amber-annotations", str(FIX / "amber" / "annotations.json"),
            "--judge", str(model_dirs["llava"]), "--out", str(out), *FAST]
    assert main(args) == 0
    doc = json.loads((out / "metrics.json").read_text())
    secs = doc["sections"]
    assert secs["coco_pope_random"]["n"] == 8 and secs["coco_pope_random"]["metric_set"] == "yesno"
    assert secs["chair"]["n"] == 4 and "chair_i" in secs["chair"]["metrics"]
    assert secs["amber_generative"]["metric_set"] == "amber_caption" and "object_cog" in secs["amber_generative"]["metrics"]
    assert {"amber_existence", "amber_attribute", "amber_relation"} <= set(secs)
    assert "f1_no" in secs["amber_existence"]["metrics"]
    judged = secs["chair"]["metrics"]["judge_score"]
    assert 0 <= judged["value"] <= 6
    rows = [r for r in read_jsonl(out / "generations.jsonl") if r["section"] == "chair"]
    assert all(r["judge_rating"] in range(7) for r in rows)


def test_bad_inputs_are_clear(model_dirs, world, tmp_path, capsys):
    bad = tmp_path / "pope.json"
    lines = (FIX / "pope" / "coco_pope_random.json").read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"question_id": 99, "image": "x.jpg"'] + lines[2:]) + "\n")
    base = ["--model", str(model_dirs["llava"]), "--out", str(tmp_path / "o"), *FAST]
    assert main([*base, "--images", str(FIX / "images"), "--pope", str(bad)]) == 2
    assert f"{bad}:3:" in capsys.readouterr().err
    # An image the question file names but the folder lacks: named with the question id.
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"question_id": 7, "image": "nope.jpg", "text": "Is there a cat?", "label": "no"}) + "\n")
    assert main([*base, "--images", str(FIX / "images"), "--pope", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "nope.jpg" in err and str(missing) in err
    # Paths may not leave the image folder.
    escape = tmp_path / "escape.json"
    escape.write_text(json.dumps({"question_id": 1, "image": "../../etc/passwd", "text": "?", "label": "no"}) + "\n")
    assert main([*base, "--images", str(FIX / "images"), "--pope", str(escape)]) == 2
    assert "escapes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base)  # no benchmark named
    assert "name a benchmark" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--pope", str(bad)])  # no --images
    assert main([*base, "--data", str(tmp_path)]) == 2  # not a data stage folder
    assert "make data" in capsys.readouterr().err
