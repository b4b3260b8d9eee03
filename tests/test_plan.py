"""`make pipeline MODEL=...` (mmalign.plan) and the per-stage timing wrapper (mmalign.timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmalign import plan as P
from mmalign import timed as T

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.name for p in (ROOT / "configs" / "models").iterdir() if p.is_dir())


@pytest.mark.parametrize("target,name", [
    ("runs/demo/rm/scored/train/manifest.json", "rm/scored/train"),
    ("runs/demo/sft/model/config.json", "sft"),
    ("runs/demo/fg-rm/oracle/object/model/fg_reward_config.json", "fg-rm/oracle/object"),
    ("runs/demo/report.md", "report"),
    ("eval-mmrlhf", "eval-mmrlhf"),
])
def test_stage_names_from_make_targets(target, name):
    assert T.stage_name(target, "runs/demo") == name


def test_timed_records_the_run_and_passes_the_exit_status_through(tmp_path):
    log = tmp_path / "t" / "timings.jsonl"
    ok = [sys.executable, "-m", "mmalign.timed", "--log", str(log), "--target", "runs/x/sample/manifest.json",
          "--root", "runs/x", "--", sys.executable, "-c", "import time; time.sleep(0.2)"]
    assert subprocess.run(ok, check=False, cwd=ROOT).returncode == 0
    bad = [sys.executable, "-m", "mmalign.timed", "--log", str(log), "--stage", "boom", "--",
           sys.executable, "-c", "raise SystemExit(3)"]
    assert subprocess.run(bad, check=False, cwd=ROOT).returncode == 3  # make must see the stage's failure
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["stage"], r["rc"]) for r in lines] == [("sample", 0), ("boom", 3)]
    assert lines[0]["seconds"] >= 0.2 and "time.sleep" in lines[0]["command"]
    missing = [sys.executable, "-m", "mmalign.timed", "--log", str(log), "--stage", "x", "--", "no-such-program-xyz"]
    proc = subprocess.run(missing, check=False, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 127 and "no-such-program-xyz" in proc.stderr and "stage x" in proc.stderr


MAKE_N = """\
/py -m mmalign.timed --log runs/m/timings.jsonl --target runs/m/data/manifest.json --root runs/m -- /py -m data_pipelines.scenes --out runs/m/data --seed 0
/py -m mmalign.timed --log runs/m/timings.jsonl --target runs/m/sft/model/config.json --root runs/m -- /py -m mmalign.cli fit --config configs/sft/tiny.yaml \\
  --config configs/models/x/common.yaml --seed_everything 0 \\
  --model.init_args.policy.init_args.path 'base dir'
echo "not a stage"
/py -m mmalign.timed --log runs/m/timings.jsonl --target runs/m/data/manifest.json --root runs/m -- /py -m data_pipelines.scenes --out runs/m/data --seed 0
"""


def test_plan_reads_the_stage_commands_from_make_output():
    steps = P.parse_steps(MAKE_N)
    assert [s.stage for s in steps] == ["data", "sft"]  # once each, in order; other lines ignored
    assert steps[1].command[-1] == "base dir"  # continuation lines joined, shell quoting honoured
    assert steps[1].command[steps[1].command.index("fit") + 2] == "configs/sft/tiny.yaml"


def test_fit_problem_catches_a_bad_overlay(tmp_path):
    good = ["python", "-m", "mmalign.cli", "fit", "--config", str(ROOT / "configs/sft/tiny.yaml")]
    assert P.fit_problem(good) == ""
    (tmp_path / "bad.yaml").write_text("data:\n  init_args:\n    no_such_option: 3\n")
    problem = P.fit_problem([*good, "--config", str(tmp_path / "bad.yaml")])
    assert "no_such_option" in problem


# One profile in the fast suite (a dry run costs two `make -n` passes and a dozen config parses);
# the others with the slow tests.
@pytest.mark.parametrize("profile", [PROFILES[0], *(pytest.param(p, marks=pytest.mark.slow) for p in PROFILES[1:])])
def test_pipeline_dry_run_parses_every_training_config(profile, tmp_path):
    """The real Makefile: `make pipeline MODEL=<profile> DRY_RUN=1` lists every stage of the demo
    and type-checks each training command with the model's overlays layered in."""
    run = f"pytest-plan-{profile}"
    proc = subprocess.run(["make", "--no-print-directory", "pipeline", f"MODEL={profile}", f"BASE={tmp_path}/none",
                           "DRY_RUN=1", f"PY={sys.executable}", f"RUN={run}"],
                          check=False, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("data", "sft", "judge", "sample", "feedback/judge", "prefs", "index", "rm/critique", "mmdpo",
                  "realign", "fg-rm/judge/object", "fgaif", "nlf", "dress", "eval/dress", "refine/dress", "report"):
        assert f" {stage} " in out, stage
    assert "tiny-model" not in out  # SFT starts from BASE, not from the tiny model
    assert out.count("config ok") == 12 and "config ERROR" not in out
    assert f"configs/models/{profile}/common.yaml" in out and "dry run: nothing was run" in out
    assert "no config.json there" in out  # BASE is checked, and only noted in a dry run
    assert not (ROOT / "runs" / run).exists()


def test_pipeline_without_a_base_checkpoint_refuses_to_start(tmp_path):
    proc = subprocess.run(["make", "--no-print-directory", "pipeline", f"MODEL={PROFILES[0]}",
                           f"PY={sys.executable}", "RUN=pytest-plan-nobase"],
                          check=False, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "BASE is unset" in proc.stderr
    proc = subprocess.run(["make", "--no-print-directory", "pipeline", "MODEL=no-such-model", f"PY={sys.executable}"],
                          check=False, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "no configs/models/no-such-model/common.yaml" in proc.stdout
