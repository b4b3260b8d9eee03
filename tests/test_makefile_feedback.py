"""The Makefile's feedback switch: FEEDBACK=judge (default) feeds every consumer the judge's feedback,
FEEDBACK=oracle the oracle's, and a changed make variable redoes the stages that read it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def dry_run(*args: str, run: str = "pytest-feedback-switch") -> str:
    """`make -n` of the real Makefile: the commands it would run, as text."""
    proc = subprocess.run(["make", "--no-print-directory", "-n", f"RUN={run}", f"PY={sys.executable}", *args],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def command(out: str, module: str) -> str:
    """The (continued) command line that runs ``python -m <module>``."""
    joined = out.replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if f"-m {module} " in line]
    assert len(lines) == 1, (module, lines)
    return lines[0]


@pytest.mark.parametrize("module,target", [("data_pipelines.prefs", "prefs"), ("data_pipelines.nlf", "nlf")])
def test_default_feeds_the_judge_and_oracle_switches_every_consumer(module, target):
    run = "runs/pytest-feedback-switch"
    judge = command(dry_run(target), module)
    assert f"--feedback {run}/feedback/judge " in judge and f"--judge {run}/judge/model --judge-questions caption" in judge
    oracle = command(dry_run(target, "FEEDBACK=oracle"), module)
    assert f"--feedback {run}/feedback/oracle " in oracle and "--judge" not in oracle


def test_fine_grained_reward_models_learn_the_chosen_sources_labels():
    run = "runs/pytest-feedback-switch"
    for fb in ("judge", "oracle"):
        out = dry_run("fg-rm", f"FEEDBACK={fb}").replace("\\\n", " ")
        fits = [line for line in out.splitlines() if "configs/fg_rm/tiny.yaml" in line]
        assert len(fits) == 3 and all(f"--data.init_args.train_file {run}/feedback/{fb}/feedback.jsonl" in f
                                      for f in fits)
        # held-out quality is always measured against the oracle
        assert all(f"--data.init_args.val_file {run}/feedback-val/oracle/feedback.jsonl" in f for f in fits)


def test_one_consumer_can_still_be_switched_alone():
    out = dry_run("prefs", "nlf", "PREFS_SOURCE=oracle")
    assert "--judge" not in command(out, "data_pipelines.prefs")
    assert "--judge " in command(out, "data_pipelines.nlf")


def test_a_bad_feedback_value_is_refused_in_one_line():
    proc = subprocess.run(["make", "-n", "prefs", "FEEDBACK=human", f"PY={sys.executable}"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "FEEDBACK=human: use judge or oracle" in proc.stderr


def test_a_changed_variable_redoes_the_stage_an_unchanged_one_does_not(tmp_path):
    """The stamp rule itself ($(OUT)/.vars/NAME), run for real: a new stamp is dated 1970 (records
    the value, forces nothing); a changed value rewrites it (newer than the stage); the same value
    leaves it alone."""
    run = f"pytest-vars-{tmp_path.name}"
    stamp = ROOT / "runs" / run / ".vars" / "PREFS_SOURCE"
    try:
        def make_stamp(value: str) -> None:
            subprocess.run(["make", "--no-print-directory", f"RUN={run}", f"PREFS_SOURCE={value}", str(stamp.relative_to(ROOT))],
                           cwd=ROOT, check=True, capture_output=True)

        make_stamp("judge")
        assert stamp.read_text() == "judge" and stamp.stat().st_mtime == 0
        make_stamp("judge")
        assert stamp.stat().st_mtime == 0
        make_stamp("oracle")
        assert stamp.read_text() == "oracle" and stamp.stat().st_mtime > 1e9
        before = stamp.stat().st_mtime_ns
        make_stamp("oracle")
        assert stamp.stat().st_mtime_ns == before
        # prefs depends on the stamp, so make would redo it after a switch
        assert str(stamp.relative_to(ROOT)) in subprocess.run(
            ["make", "-pn", f"RUN={run}", f"PY={sys.executable}", "prefs"], cwd=ROOT, capture_output=True,
            text=True).stdout.split(f"runs/{run}/prefs/manifest.json:", 1)[1].splitlines()[0]
    finally:
        shutil.rmtree(ROOT / "runs" / run, ignore_errors=True)
