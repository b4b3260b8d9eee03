"""Shared fixtures: a small scene world and tiny models built by the real stage code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A small data stage output (40/8/8 scenes), written by the real `data` stage."""
    from data_pipelines.scenes import main

    out = tmp_path_factory.mktemp("world") / "data"
    assert main(["--out", str(out), "--seed", "1", "--n-train", "40", "--n-val", "8", "--n-test", "8",
                 "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def model_dirs(world, tmp_path_factory) -> dict[str, Path]:
    """Tiny LLaVA and Qwen2-VL checkpoints built from the small world by `models.tiny`."""
    from models.tiny import build_from_data

    root = tmp_path_factory.mktemp("models")
    out = {}
    for family in ("llava", "qwen2_vl"):
        build_from_data(world, root / family, family=family, vocab_size=400)
        out[family] = root / family
    return out
