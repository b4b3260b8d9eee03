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
    make = ["make", "-C", str(ROOT), "demo", f"RUN={run}", f"PY={sys.executable}"]
    subprocess.run(make, check=True, env=env)
    out = ROOT / "runs" / run
    m = json.loads((out / "eval/sft/metrics.json").read_text())
    assert m["captions"] == 200 and m["yesno_questions"] > 500
    # The SFT model reads the image: it counts objects far above chance (1 in 4) and names
    # fewer absent objects than an image-blind caption would (see docs/ARCHITECTURE.md).
    assert m["count_accuracy"] > 0.5
    assert m["object_hallucination_rate"] < 0.8
    # Unchanged inputs: a second `make demo` redoes nothing.
    again = subprocess.run(make, check=True, env=env, capture_output=True, text=True)
    assert "mmalign.cli fit" not in again.stdout and "data_pipelines.scenes" not in again.stdout
