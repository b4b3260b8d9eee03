"""The vision pretraining stage (models/vision.py) and the tiny LLaVA built around its tower."""

from __future__ import annotations

import json

import pytest
import torch

from models import vision as V

TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--scenes", "24", "--heldout-scenes", "8",
        "--steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--snapshots", "2"]


@pytest.fixture(scope="module")
def tower(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("vision") / "vision"
    assert V.main(["--data", str(world), "--out", str(out), *TINY]) == 0
    return out


def test_stage_writes_a_stock_clip_tower_with_manifest_and_probes(tower, world, capsys):
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(tower / "model", use_safetensors=True)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert (tower / "model" / "model.safetensors").is_file()
    assert CLIPImageProcessorPil.from_pretrained(tower / "model").size == {"height": 64, "width": 64}
    manifest = json.loads((tower / "manifest.json").read_text())
    assert manifest["stage"] == "vision" and manifest["counts"]["steps"] == 3
    assert {i["path"] for i in manifest["inputs"]} == {str(world / "val" / "scenes.jsonl"), str(world / "test" / "scenes.jsonl")}
    metrics = json.loads((tower / "metrics.json").read_text())
    assert set(metrics["probes"]) == {"shape_accuracy", "color_accuracy", "size_accuracy", "center_f1", "offset_mae_patches"}
    assert metrics["heldout_graphs_excluded"] == 16
    # the snapshot is the tower after step 2: a valid checkpoint that differs from the final one
    snap = CLIPVisionModel.from_pretrained(tower / "model-step2", use_safetensors=True)
    assert set(metrics["snapshot_probes"]) == {"model-step2"}
    assert any(not torch.equal(a, b) for a, b in zip(snap.state_dict().values(), model.state_dict().values()))
    # the same options again: up to date, nothing retrained
    assert V.main(["--data", str(world), "--out", str(tower), *TINY]) == 0
    assert "up to date" in capsys.readouterr().out


def test_pretraining_scenes_never_use_held_out_graphs(world):
    held = V.heldout_graphs(world)
    scenes = V.fresh_scenes(300, 0, "train", held, 1, 4)
    assert held and not {s.graph_hash() for s in scenes} & held
    one = {s.graph_hash() for s in V.fresh_scenes(300, 0, "train", set(), 1, 1)}
    assert not {s.graph_hash() for s in V.fresh_scenes(300, 0, "train", one, 1, 1)} & one


def test_losses_by_hand():
    """Uniform logits: each class head's CE is ln(classes); centre BCE at logit 0 is ln 2;
    offset smooth-L1 over object patches only (|d| < 1: 0.5 d^2)."""
    cfg = V.VisionPretrainConfig()
    B, P = 1, 4
    out = {k: torch.zeros(B, P, len(V.LABEL_CLASSES[k])) for k in V.HEADS}
    out["center"] = torch.zeros(B, P)
    out["offset"] = torch.zeros(B, P, 2)
    batch = {"shape": torch.tensor([[0, 1, 2, 0]]), "color": torch.tensor([[0, 3, 3, 0]]),
             "size": torch.tensor([[0, 1, 2, 0]]), "center": torch.tensor([[0, 1, 0, 0]]),
             "offset": torch.tensor([[[9.0, 9.0], [0.2, -0.4], [0.0, 0.6], [9.0, 9.0]]])}
    t = V.losses(out, batch, cfg)
    import math

    assert t["shape"] == pytest.approx(math.log(7)) and t["size"] == pytest.approx(math.log(3))
    assert t["center"] == pytest.approx(math.log(2))
    assert t["offset"] == pytest.approx(0.5 * (0.04 + 0.16 + 0.0 + 0.36) / 4)  # 9s are background: ignored
    assert t["loss"] == pytest.approx(math.log(7) * 2 + math.log(3) + math.log(2) + t["offset"].item())


def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "v.yaml"
    cfg_file.write_text("steps: 7\nhidden: 64\n")
    cfg = V.load_config(cfg_file, {"steps": 9, "lr": None})
    assert cfg.steps == 9 and cfg.hidden == 64 and cfg.lr == V.VisionPretrainConfig.lr
    cfg_file.write_text("stepz: 7\n")
    with pytest.raises(ValueError, match="unknown keys.*stepz"):
        V.load_config(cfg_file, {})
    with pytest.raises(ValueError, match="multiple"):
        V.load_config(None, {"patch_size": 7})
    with pytest.raises(ValueError, match="snapshots"):
        V.load_config(None, {"snapshots": [0, 5], "steps": 5})


def test_tiny_llava_is_built_around_the_pretrained_tower(tower, world, tmp_path):
    from transformers import AutoModelForImageTextToText, CLIPVisionModel

    from models.tiny import build_from_data

    info = build_from_data(world, tmp_path / "m", vocab_size=400, vision_tower=str(tower / "model"))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m", use_safetensors=True)
    pre = CLIPVisionModel.from_pretrained(tower / "model", use_safetensors=True).state_dict()
    got = model.model.vision_tower.state_dict()
    assert set(got) == set(pre) and all(torch.equal(got[k], pre[k]) for k in pre)
    assert model.config.vision_config.hidden_size == 32 and info["image_tokens_per_image"] == 64
    assert info["args"]["vision_tower_config"]["hidden"] == 32 and "vision_hidden" not in info["args"]
    with pytest.raises(ValueError, match="llava"):
        build_from_data(world, tmp_path / "q", family="qwen2_vl", vocab_size=400, vision_tower=str(tower / "model"))


def test_the_shipped_config_loads():
    from pathlib import Path

    cfg = V.load_config(Path(__file__).resolve().parents[1] / "configs/vision/tiny.yaml", {})
    assert (cfg.hidden, cfg.layers, cfg.patch_size, cfg.image_size) == (128, 4, 8, 64)
