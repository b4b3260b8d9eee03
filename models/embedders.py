"""Image embedders for the retrieval index (:class:`mmalign.retrieval.ImageEmbedder`).

Two ways to turn an image into a vector:

* :class:`PolicyVisionEmbedder` -- the policy checkpoint's *own* vision tower, as Re-Align does
  ("all images in the training set are embedded using the original vision encoder of the
  pre-trained VLMs"): the patch features the language model is fed (the model's
  ``vision_feature_layer``, CLS dropped under the "default" select strategy), optionally after
  the projector, mean-pooled over patches. Images that look alike *to this model* end up close,
  which is what makes a retrieved image a hard negative for it.
* :class:`CLIPEmbedder` -- any CLIP-style dual encoder with ``get_image_features`` (CLIP, SigLIP,
  ...) loaded by local path: its projected image embedding, the usual off-the-shelf choice.

Both load through ``from_pretrained`` with safetensors only and ``trust_remote_code`` off, run
under ``torch.no_grad`` in eval mode, and batch internally (``batch_size`` images per forward).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from mmalign.stage import checkpoint_id

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _check_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    out = []
    for n, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"image {n} is a {type(im).__name__}, not a PIL image")
        out.append(im if im.mode == "RGB" else im.convert("RGB"))
    return out


class _BatchedEmbedder:
    """``embed`` in batches of ``batch_size`` over a subclass's ``_embed_batch`` (``(n, D)``)."""

    batch_size: int
    dim: int

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``(N, D)`` float32 embeddings of ``images``, in order."""
        images = _check_images(images)
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.concatenate([self._embed_batch(images[i:i + self.batch_size])
                               for i in range(0, len(images), self.batch_size)])


class PolicyVisionEmbedder(_BatchedEmbedder):
    """A policy checkpoint's vision tower (optionally + projector), mean-pooled over patches.

    Args:
        path: the policy checkpoint folder (any ``AutoModelForImageTextToText`` checkpoint, e.g.
            ``runs/demo/sft/model``).
        projector: pool the projector's output (the language model's input embeddings, width
            ``text_config.hidden_size``) instead of the vision tower's features (width
            ``vision_config.hidden_size``). Families whose tower has no separable feature layer
            (Qwen2-VL: the merger is part of ``visual``) need ``projector=True``.
        batch_size: images per forward pass.
        device: "cpu", "cuda" or "auto".
        dtype: weights dtype; the output is float32 either way.

    The whole checkpoint is loaded once (the ``from_pretrained`` path every stage uses), then the
    language model and LM head are released: only the vision side stays in memory.
    """

    def __init__(self, path: str | os.PathLike, projector: bool = False, batch_size: int = 64,
                 device: str = "auto", dtype: Literal["float32", "bfloat16", "float16"] = "float32"):
        from transformers import AutoConfig, AutoModelForImageTextToText

        from models.processors import load_processor

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.projector, self.batch_size = str(path), projector, batch_size
        self.device = _device(device)
        cfg = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        self._feature_layer = getattr(cfg, "vision_feature_layer", None)
        self._strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        if not projector and self._feature_layer is None:
            raise ValueError(f"{cfg.model_type} has no separable vision feature layer (vision_feature_layer); "
                             "embed with projector=True")
        model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=DTYPES[dtype], use_safetensors=True,
                                                            trust_remote_code=False)
        # get_image_features lives on the inner model (LlavaModel, Qwen2VLModel, ...).
        base = model.model if hasattr(getattr(model, "model", None), "get_image_features") else model
        for name in ("language_model", "lm_head"):
            for owner in (base, model):
                if name in owner._modules:  # a submodule, not a property pointing at one
                    setattr(owner, name, torch.nn.Identity())  # free the decoder's weights
        self._base = base.to(self.device).eval().requires_grad_(False)
        self.image_processor = load_processor(self.path).image_processor
        self.dim = int(cfg.text_config.hidden_size if projector else cfg.vision_config.hidden_size)
        self.name = f"policy-vision:{checkpoint_id(self.path)}:{'projector' if projector else 'tower'}:mean"

    @torch.no_grad()
    def _embed_batch(self, images: list[Image.Image]) -> np.ndarray:
        inputs = self.image_processor(images=images, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        kwargs = {}
        if self._feature_layer is not None:
            kwargs = {"vision_feature_layer": self._feature_layer,
                      "vision_feature_select_strategy": self._strategy}
        out = self._base.get_image_features(**inputs, **kwargs)
        if self.projector:
            per_image = out.pooler_output if not isinstance(out, (torch.Tensor, list, tuple)) else out
            pooled = torch.stack([f.reshape(-1, f.shape[-1]).float().mean(0) for f in per_image])
        else:
            # What the projector is fed: the feature layer's patch states, CLS dropped ("default").
            layers = [self._feature_layer] if isinstance(self._feature_layer, int) else list(self._feature_layer)
            feats = torch.cat([out.hidden_states[n] for n in layers], dim=-1)
            if self._strategy == "default":
                feats = feats[:, 1:]
            pooled = feats.float().mean(1)
            if pooled.shape[-1] != self.dim:  # several feature layers concatenated
                self.dim = int(pooled.shape[-1])
        if pooled.shape[0] != len(images):
            raise RuntimeError(f"{len(images)} images gave {pooled.shape[0]} embeddings")
        return pooled.cpu().numpy().astype(np.float32)


class CLIPEmbedder(_BatchedEmbedder):
    """Any CLIP-style model's projected image embedding (``get_image_features``), by local path.

    Args:
        path: a folder with the model (safetensors) and its image processor config, e.g. a saved
            ``openai/clip-vit-large-patch14-336`` (the vision tower LLaVA-1.5 was built on).
        batch_size: images per forward pass.
        device: "cpu", "cuda" or "auto".
        dtype: weights dtype; the output is float32 either way.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int = 64, device: str = "auto",
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32"):
        from transformers import AutoImageProcessor, AutoModel

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such model folder (CLIPEmbedder loads local checkpoints only)")
        self.path, self.batch_size, self.device = str(path), batch_size, _device(device)
        model = AutoModel.from_pretrained(self.path, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=False)
        if not hasattr(model, "get_image_features"):
            raise ValueError(f"{path}: {type(model).__name__} has no get_image_features; not a CLIP-style model")
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.image_processor = AutoImageProcessor.from_pretrained(self.path, trust_remote_code=False)
        cfg = model.config
        dim = getattr(cfg, "projection_dim", None) or getattr(getattr(cfg, "vision_config", cfg), "hidden_size", None)
        self.dim = int(dim)
        self.name = f"clip:{checkpoint_id(self.path)}"

    @torch.no_grad()
    def _embed_batch(self, images: list[Image.Image]) -> np.ndarray:
        inputs = self.image_processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)
        out = self.model.get_image_features(pixel_values=pixel_values)
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers < 5 returned a tensor
        if feats.shape[-1] != self.dim:
            self.dim = int(feats.shape[-1])
        return feats.float().cpu().numpy().astype(np.float32)
