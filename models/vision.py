"""The ``vision`` stage: pretrain the tiny CLIP-style vision tower before any language model sees it.

    python -m models.vision --config configs/vision/tiny.yaml --data runs/demo/data --out runs/demo/vision

Why this stage exists: every real VLM starts from a pretrained vision tower (LLaVA: a frozen CLIP,
then projector alignment, then instruction tuning). A tiny tower trained only through the
language-model loss on this world turned out image-blind: it learns colour (linear in the pixels,
free for a patch embedding) but not shape, size or position (spread non-linearly over several
8x8 patches), so the decoder answered every yes/no question from the text prior. A contrastive
tiny CLIP on the same tower learns colour but not shape (CLIP's bag-of-attributes). What teaches
shape is dense supervision ("token labelling"): every patch predicts the shape, colour and size of
the object under it, whether the object's centre is in this patch, and where that centre is.
The labels come from replaying the renderer's own geometry (:func:`mmalign.render.patch_labels`)
on freshly sampled scenes from the training distribution (the world prior included); graphs of
the data stage's val and test scenes are never drawn.

The linear heads are thrown away; the output is a stock ``CLIPVisionModel`` checkpoint
(``save_pretrained``, safetensors) and its image processor, which ``models.tiny`` builds the tiny
LLaVA around, and which also serves as the "CLIP-style model by path" for Re-Align's index.

The number of steps is the knob for how much the policy built on it still hallucinates (measured:
docs/TESTBED.md); fixed step counts, not wall-clock budgets, so runs are reproducible.

Outputs (``--out``, replaced atomically, manifest last)::

    model/           CLIPVisionModel + CLIPImageProcessor (config.json, model.safetensors, ...)
    metrics.json     held-out per-patch accuracy of each head ("probes"), loss curve, wall time
    manifest.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

from mmalign.render import LABEL_CLASSES, patch_labels, render_scene
from mmalign.stage import StageOutput, is_up_to_date, read_jsonl
from mmalign.world import Scene, sample_scene

STAGE = "vision"
FORMAT_VERSION = 1
HEADS = ("shape", "color", "size")


@dataclass
class VisionPretrainConfig:
    """Everything that determines the pretrained tower (the YAML keys; each is also a flag).

    Attributes:
        seed: scene sampling, rendering jitter, initialisation and batch order.
        image_size: input side in pixels (the data stage's images).
        patch_size: ViT patch side; (image_size / patch_size)^2 image tokens.
        hidden: tower width.
        layers: transformer layers.
        heads: attention heads.
        scenes: freshly sampled training scenes rendered once (the pool the steps draw from).
        heldout_scenes: further fresh scenes for the probe accuracies.
        steps: optimiser steps (the strength knob: fewer steps leave the policy more to hallucinate).
        batch_size: images per step.
        lr: AdamW peak learning rate (linear warm-up, cosine to 10%).
        warmup_steps: warm-up steps.
        weight_decay: AdamW weight decay.
        center_weight: weight of the "object centre in this patch" loss.
        offset_weight: weight of the centre-offset regression (smooth L1, object patches only).
        min_objects: fewest objects per scene.
        max_objects: most objects per scene.
        snapshots: also save the tower after these steps (``model-step<N>/``): an earlier, weaker
            tower of the same run. The demo builds the policy on one and the judge on the final
            tower, so the judge sees better than the policy it judges.
    """

    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    scenes: int = 6000
    heldout_scenes: int = 300
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    center_weight: float = 1.0
    offset_weight: float = 1.0
    min_objects: int = 1
    max_objects: int = 4
    snapshots: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [n for n in self.snapshots if not 0 < n < self.steps]
        if bad:
            raise ValueError(f"snapshots {bad} must lie strictly between 0 and steps={self.steps}")


def tower_config(cfg: VisionPretrainConfig) -> CLIPVisionConfig:
    """The CLIP vision config of the tower (the shape ``models.tiny`` reads back from it)."""
    return CLIPVisionConfig(
        hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.hidden, attn_implementation="sdpa",
    )


def image_processor(image_size: int) -> CLIPImageProcessorPil:
    """The processor the tiny LLaVA uses too: resize to ``image_size`` square, CLIP's mean/std."""
    return CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=False, do_convert_rgb=True,
    )


def fresh_scenes(n: int, seed: int, stream: str, exclude: set[str], min_objects: int, max_objects: int) -> list[Scene]:
    """``n`` scenes from the world prior whose graphs are not in ``exclude`` (held-out graphs)."""
    rng = random.Random(f"{seed}:{stream}")
    out: list[Scene] = []
    while len(out) < n:
        s = sample_scene(rng, f"vision-{stream}-{len(out)}", min_objects=min_objects, max_objects=max_objects)
        if s.graph_hash() not in exclude:
            out.append(s)
    return out


def render_pool(scenes: Sequence[Scene], cfg: VisionPretrainConfig, desc: str) -> dict[str, torch.Tensor]:
    """Images (uint8 ``[N, S, S, 3]``) and dense patch labels of ``scenes``."""
    images = np.zeros((len(scenes), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    labels: dict[str, list[np.ndarray]] = {k: [] for k in (*HEADS, "center", "offset")}
    for i, s in enumerate(tqdm(scenes, desc=desc, unit="scene", file=sys.stderr, mininterval=2.0)):
        images[i] = np.asarray(render_scene(s, cfg.image_size, cfg.seed))
        for k, v in patch_labels(s, cfg.image_size, cfg.patch_size, cfg.seed).items():
            labels[k].append(v)
    out = {"images": torch.from_numpy(images)}
    out.update({k: torch.from_numpy(np.stack(v)) for k, v in labels.items()})
    return out


class TokenLabeller(nn.Module):
    """The tower plus throw-away linear heads on its patch tokens (CLS dropped)."""

    def __init__(self, cfg: VisionPretrainConfig):
        super().__init__()
        self.tower = CLIPVisionModel(tower_config(cfg))
        h = cfg.hidden
        self.heads = nn.ModuleDict({k: nn.Linear(h, len(LABEL_CLASSES[k])) for k in HEADS})
        self.center = nn.Linear(h, 1)
        self.offset = nn.Linear(h, 2)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # [B, P, H]
        out = {k: head(tokens) for k, head in self.heads.items()}
        out["center"] = self.center(tokens).squeeze(-1)
        out["offset"] = self.offset(tokens)
        return out


def normalise(images: torch.Tensor, processor: CLIPImageProcessorPil) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` -> the processor's ``pixel_values`` ``[B, 3, S, S]`` (images are
    already at the processor's size, so its resize is the identity)."""
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def losses(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], cfg: VisionPretrainConfig) -> dict[str, torch.Tensor]:
    """Per-patch cross-entropy of each class head, BCE of the centre flag, smooth L1 of the centre
    offset on object patches. All are means over patches (offset: over object patches)."""
    terms = {k: nn.functional.cross_entropy(out[k].flatten(0, 1), batch[k].flatten()) for k in HEADS}
    terms["center"] = nn.functional.binary_cross_entropy_with_logits(out["center"], batch["center"].float())
    on = batch["shape"] > 0
    terms["offset"] = (nn.functional.smooth_l1_loss(out["offset"][on], batch["offset"][on])
                       if on.any() else out["offset"].sum() * 0)
    terms["loss"] = (sum(terms[k] for k in HEADS) + cfg.center_weight * terms["center"]
                     + cfg.offset_weight * terms["offset"])
    return terms


@torch.no_grad()
def probe_accuracy(model: TokenLabeller, pool: dict[str, torch.Tensor], processor: CLIPImageProcessorPil,
                   batch_size: int = 128) -> dict[str, float]:
    """Held-out accuracy of each linear head on the patches that hold an object (the "probe"),
    centre-patch F1, and mean absolute centre-offset error in patches."""
    model.eval()
    hits = {k: 0 for k in HEADS}
    n_obj = 0
    tp = fp = fn = 0
    off_err = 0.0
    for i in range(0, len(pool["images"]), batch_size):
        sl = slice(i, i + batch_size)
        out = model(normalise(pool["images"][sl], processor))
        on = pool["shape"][sl] > 0
        n_obj += int(on.sum())
        for k in HEADS:
            hits[k] += int((out[k].argmax(-1)[on] == pool[k][sl][on]).sum())
        pred = out["center"] > 0
        gold = pool["center"][sl].bool()
        tp += int((pred & gold).sum())
        fp += int((pred & ~gold).sum())
        fn += int((~pred & gold).sum())
        off_err += float((out["offset"][on] - pool["offset"][sl][on]).abs().sum())
    model.train()
    res = {f"{k}_accuracy": hits[k] / max(n_obj, 1) for k in HEADS}
    res["center_f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
    res["offset_mae_patches"] = off_err / max(2 * n_obj, 1)
    return res


def stage_inputs(data: Path | None) -> list[Path]:
    """The files the stage reads (hashed into its manifest): the data stage's val/test scenes."""
    return [data / s / "scenes.jsonl" for s in ("val", "test") if data and (data / s / "scenes.jsonl").is_file()]


def heldout_graphs(data: Path | None) -> set[str]:
    """Graph hashes of the data stage's val and test scenes (never drawn for pretraining)."""
    return {r["graph_hash"] for path in stage_inputs(data) for r in read_jsonl(path)}


def pretrain(cfg: VisionPretrainConfig, out: Path, data: Path | None = None) -> dict[str, Any]:
    """Render the pools, train, write the tower; returns metrics.json's contents."""
    inputs = stage_inputs(data)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    exclude = heldout_graphs(data)
    train = render_pool(fresh_scenes(cfg.scenes, cfg.seed, "train", exclude, cfg.min_objects, cfg.max_objects),
                        cfg, "vision: rendering")
    held = render_pool(fresh_scenes(cfg.heldout_scenes, cfg.seed, "heldout", exclude, cfg.min_objects,
                                    cfg.max_objects), cfg, "vision: held-out")
    t_render = time.perf_counter() - t_start
    processor = image_processor(cfg.image_size)
    model = TokenLabeller(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps, min_lr_rate=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    curve: list[dict[str, float]] = []
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="vision: pretraining", unit="step", file=sys.stderr, mininterval=2.0)
    for step in bar:
        idx = torch.randint(0, len(train["images"]), (cfg.batch_size,), generator=gen)
        batch = {k: v[idx] for k, v in train.items()}
        terms = losses(model(normalise(batch["images"], processor)), batch, cfg)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            curve.append({"step": step, **{k: round(float(v.detach()), 5) for k, v in terms.items()}})
        if (step + 1) % 200 == 0 and step + 1 < cfg.steps:  # how perception grows with the budget
            curve.append({"step": step + 1, "probes": probe_accuracy(model, held, processor)})
        if step + 1 in cfg.snapshots:
            snapshots[step + 1] = {k: v.detach().clone() for k, v in model.tower.state_dict().items()}
            curve.append({"step": step + 1, "snapshot": f"model-step{step + 1}",
                          "probes": probe_accuracy(model, held, processor)})
            bar.set_postfix(loss=f"{float(terms['loss']):.3f}")
    t_train = time.perf_counter() - t0
    probes = probe_accuracy(model, held, processor)
    metrics = {"probes": probes, "snapshot_probes": {f"model-step{c['step']}": c["probes"] for c in curve if "snapshot" in c}, "render_seconds": round(t_render, 1), "train_seconds": round(t_train, 1),
               "seconds": round(time.perf_counter() - t_start, 1), "curve": curve,
               "num_parameters": sum(p.numel() for p in model.tower.parameters()),
               "heldout_graphs_excluded": len(exclude)}
    with StageOutput(out, stage=STAGE, config=_stage_config(cfg), inputs=inputs) as st:
        model.tower.save_pretrained(st.path / "model", safe_serialization=True)
        processor.save_pretrained(st.path / "model")
        for n, state in snapshots.items():
            snap = CLIPVisionModel(tower_config(cfg))
            snap.load_state_dict(state)
            snap.save_pretrained(st.path / f"model-step{n}", safe_serialization=True)
            processor.save_pretrained(st.path / f"model-step{n}")
        (st.path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        st.info.update({"probes": probes, "seconds": metrics["seconds"]})
        st.count("scenes", cfg.scenes)
        st.count("steps", cfg.steps)
    return metrics


def _stage_config(cfg: VisionPretrainConfig) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, **asdict(cfg)}


def load_config(path: Path | None, overrides: dict[str, Any]) -> VisionPretrainConfig:
    """YAML file (keys = :class:`VisionPretrainConfig` fields), then flags given on the command line."""
    values: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of VisionPretrainConfig fields, got {type(raw).__name__}")
        known = {f.name for f in fields(VisionPretrainConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        values.update(raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = VisionPretrainConfig(**values)
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.hidden % cfg.heads:
        raise ValueError(f"hidden {cfg.hidden} is not a multiple of heads {cfg.heads}")
    return cfg


def _field_help() -> dict[str, str]:
    doc = VisionPretrainConfig.__doc__ or ""
    out: dict[str, str] = {}
    for line in doc.split("Attributes:")[1].splitlines():
        name, _, text = line.strip().partition(": ")
        if text:
            out[name] = text
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.vision",
        description="Vision pretraining stage: train the tiny CLIP-style tower with dense per-patch labels "
                    "(shape, colour, size, object centre) on fresh scenes, and save it as a stock CLIPVisionModel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML with VisionPretrainConfig fields (configs/vision/tiny.yaml)")
    p.add_argument("--data", type=Path, help="data stage folder: its val/test graphs are excluded")
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    p.add_argument("--force", action="store_true", help="retrain even if --out is up to date")
    helps = _field_help()
    for f in fields(VisionPretrainConfig):
        if f.name == "snapshots":
            p.add_argument("--snapshots", type=int, nargs="*", default=None, help=helps.get(f.name, ""))
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                       help=f"{helps.get(f.name, '')} (default {f.default})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(VisionPretrainConfig)}
    cfg = load_config(args.config, overrides)
    if not args.force and is_up_to_date(args.out, _stage_config(cfg), stage_inputs(args.data)):
        print(f"{STAGE}: {args.out} up to date, skipping (use --force to retrain)")
        return 0
    metrics = pretrain(cfg, args.out, args.data)
    p = metrics["probes"]
    print(f"{STAGE}: wrote {args.out}/model ({metrics['num_parameters']:,} parameters) in {metrics['seconds']:.0f}s "
          f"(render {metrics['render_seconds']:.0f}s, train {metrics['train_seconds']:.0f}s); held-out probes: "
          + ", ".join(f"{k} {v:.3f}" for k, v in p.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
