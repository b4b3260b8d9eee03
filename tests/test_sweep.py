"""The sweep stage: the grid, the guards and the choice by hand, then a two-point sweep through the
real `mmalign fit` and `mmalign eval` on the small world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipelines import sweep as S

ROOT = Path(__file__).resolve().parents[1]


def _m(value, low=None, high=None):
    return {"value": value, "low": value if low is None else low, "high": value if high is None else high, "n": 10}


def test_grid_points_and_slugs():
    grid = S.parse_grid(["model.init_args.optim.lr=1e-5, 2e-5", "trainer.max_steps=100,200"])
    assert grid == [("model.init_args.optim.lr", ["1e-5", "2e-5"]), ("trainer.max_steps", ["100", "200"])]
    points = S.grid_points(grid)
    # the first axis varies slowest
    assert points == [{"model.init_args.optim.lr": "1e-5", "trainer.max_steps": "100"},
                      {"model.init_args.optim.lr": "1e-5", "trainer.max_steps": "200"},
                      {"model.init_args.optim.lr": "2e-5", "trainer.max_steps": "100"},
                      {"model.init_args.optim.lr": "2e-5", "trainer.max_steps": "200"}]
    assert S.slug(points[1]) == "lr=1e-5_max_steps=200"
    assert S.slug({"model.init_args.reward_weights": "{a: 1}"}) == "reward_weights=_a__1_"
    assert S.sweep_budget(points, []) == "4 points, trainer.max_steps in {100, 200}"
    assert S.sweep_budget(points[:1], []) == "1 points x 100 steps"
    assert S.sweep_budget([{}], ["--config", "x.yaml", "--trainer.max_steps", "60"]) == "1 points x 60 steps"
    assert S.sweep_budget([{}], ["--config", "x.yaml"]) == "1 points x the config's steps"


@pytest.mark.parametrize("spec, match", [
    ("lr", "expected KEY=V1"), ("=1,2", "expected KEY=V1"), ("--model.init_args.beta=0.1", "without its leading dashes"),
    ("model.init_args.beta=", "no values"),
])
def test_bad_grid_specs_name_themselves(spec, match):
    with pytest.raises(ValueError, match=match):
        S.parse_grid([spec])
    with pytest.raises(ValueError, match="given twice"):
        S.parse_grid(["a=1", "a=2"])
    with pytest.raises(ValueError, match="METRIC=DELTA"):
        S.parse_guards(["object_cover"])


def test_guards_and_choice_by_hand():
    """Baseline coverage 0.76; guard -0.05 admits >= 0.71. Point a (CHAIR_i 0.05) covers 0.60 and
    fails it; b (0.08, cover 0.72) and c (0.08, cover 0.80) keep it and tie on CHAIR_i: the first in
    grid order (b) is chosen. Without a guard-keeping point, the lowest of all (a) is returned, flagged."""
    base = {"chair_i": _m(0.09), "object_cover": _m(0.76)}
    rows = []
    for name, chair, cover in (("a", 0.05, 0.60), ("b", 0.08, 0.72), ("c", 0.08, 0.80)):
        metrics = {"chair_i": _m(chair), "object_cover": _m(cover)}
        rows.append({"slug": name, "overrides": {}, "seconds": 1.0, "metrics": metrics,
                     "guards": S.keeps_guards(metrics, base, {"object_cover": -0.05})})
    assert [r["guards"]["object_cover"] for r in rows] == [False, True, True]
    best, ok = S.choose(rows, "chair_i")
    assert best["slug"] == "b" and ok
    best, ok = S.choose(rows[:1], "chair_i")
    assert best["slug"] == "a" and not ok
    # exactly at the edge (0.76 - 0.05) keeps the guard
    assert S.keeps_guards({"object_cover": _m(0.71)}, base, {"object_cover": -0.05}) == {"object_cover": True}
    # an undefined (NaN) metric never wins; all undefined is an error
    nan = {"slug": "n", "overrides": {}, "seconds": 1.0, "metrics": {"chair_i": _m(float("nan"))}, "guards": {}}
    assert S.choose([nan, rows[1]], "chair_i")[0]["slug"] == "b"
    with pytest.raises(ValueError, match="no point has a defined chair_i"):
        S.choose([nan], "chair_i")
    with pytest.raises(ValueError, match="--baseline"):
        S.keeps_guards({"object_cover": _m(0.71)}, None, {"object_cover": -0.05})
    with pytest.raises(ValueError, match="not a caption metric"):
        S.keeps_guards({"x": _m(1)}, base, {"x": 0.0})
    md = S.report_md(rows, rows[1], True, "chair_i", ["chair_i", "object_cover"], base, "3 points x 10 steps")
    assert "| b **(chosen)** |" in md and "object_cover FAILS" in md and "| baseline |" in md


def test_refuses_test_split_and_points_own_paths(tmp_path, world):
    with pytest.raises(SystemExit):
        S.main(["--out", str(tmp_path), "--data", str(world), "--split", "test", "--", "--config", "x.yaml"])
    with pytest.raises(SystemExit):
        S.main(["--out", str(tmp_path), "--data", str(world), "--", "--config", "x.yaml",
                "--trainer.default_root_dir", "elsewhere"])
    with pytest.raises(SystemExit):  # no fit arguments
        S.main(["--out", str(tmp_path), "--data", str(world)])


def test_two_point_sweep_through_the_real_cli(world, model_dirs, tmp_path, capsys):
    """Two learning rates, 2 SFT steps each, evaluated on 2 val scenes: both points are trained
    and evaluated, the choice is the lower CHAIR_s of the two (the untrained tiny model may name no
    object, leaving CHAIR_i undefined), and a rerun trains nothing."""
    fit = ["--config", str(ROOT / "configs/sft/tiny.yaml"), "--trainer.max_steps", "2",
           "--trainer.callbacks", "[]", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
           "--model.init_args.policy.init_args.path", str(model_dirs["llava"]),
           "--data.init_args.train_file", str(world / "train/sft.jsonl"),
           "--data.init_args.val_file", str(world / "val/sft.jsonl"),
           "--data.init_args.data_root", str(world), "--data.init_args.batch_size", "4"]
    out = tmp_path / "sweep"
    common = ["--out", str(out), "--data", str(world), "--limit", "2", "--select", "chair_s", "--grid", "model.init_args.optim.lr=1e-4,1e-3",
              "--eval-args", "--n-boot 20 --max-new-tokens 8 --yesno-max-new-tokens 2 --kinds existence --splits random"]
    assert S.main([*common, "--", *fit]) == 0
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["overrides"] for r in rows] == [{"model.init_args.optim.lr": "1e-4"}, {"model.init_args.optim.lr": "1e-3"}]
    for r in rows:
        doc = json.loads((out / "points" / r["slug"] / "eval/metrics.json").read_text())
        assert doc["settings"]["split"] == "val" and doc["settings"]["limit"] == 2
        assert r["metrics"]["chair_i"] == doc["sections"]["captions"]["metrics"]["chair_i"]
        assert (out / "points" / r["slug"] / "model/config.json").is_file()
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == min(r["metrics"]["chair_s"]["value"] for r in rows) and best["select"] == "chair_s"
    assert best["budget"] == "2 points x 2 steps" and best["split"] == "val"
    capsys.readouterr()
    assert S.main([*common, "--", *fit]) == 0
    assert capsys.readouterr().err.count("done before") == 2
