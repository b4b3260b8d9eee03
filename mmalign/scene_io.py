"""Scene graphs of a data-stage folder, for the stages that judge responses against them."""

from __future__ import annotations

from pathlib import Path

from mmalign.oracle import load_world_scenes
from mmalign.world import Scene


def load_scenes(data: Path) -> dict[str, Scene]:
    """Absolute image path -> scene graph, over every split of the data stage ({} when the folder
    has no scene graphs, e.g. real data)."""
    return load_world_scenes(data) if any(Path(data).glob("*/scenes.jsonl")) else {}
