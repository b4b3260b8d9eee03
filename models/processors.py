"""Processor loading that works without torchvision.

Why this file exists: in transformers 5.x every video processor needs torchvision, and
``Qwen2VLProcessor`` insists on one, so on a machine without torchvision (this project's CPU
default: PyPI's torchvision does not import beside the CPU torch wheel) neither
``Qwen2VLProcessor(...)`` nor ``AutoProcessor.from_pretrained(<a Qwen2-VL dir>)`` works — real
checkpoints included. ``load_processor`` is ``AutoProcessor.from_pretrained`` with that one
exception handled; every stage and the policy adapter load processors through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, ProcessorMixin, Qwen2VLProcessor
from transformers.utils import is_torchvision_available

QWEN_IMAGE_PAD, QWEN_VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images and text, without the video processor.

    Why it exists: in transformers 5.x every video processor needs torchvision, and
    ``Qwen2VLProcessor`` insists on one, so without torchvision neither ``Qwen2VLProcessor(...)``
    nor ``AutoProcessor.from_pretrained(<any Qwen2-VL dir>)`` works. Text and image processing
    are the stock ``Qwen2VLProcessor`` code, unchanged.

    It saves the *stock* layout: ``processor_class`` is ``Qwen2VLProcessor`` and
    ``processor_config.json`` carries a ``video_processor`` entry matching the image settings, so
    where torchvision is installed ``AutoProcessor.from_pretrained`` returns the stock class.
    Where it is not, ``load_processor`` loads this class instead.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or QWEN_IMAGE_PAD
        self.video_token = getattr(tokenizer, "video_token", None) or QWEN_VIDEO_PAD
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = "Qwen2VLProcessor"
        image = self.image_processor
        out["video_processor"] = {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "size": dict(image.size),
            "patch_size": image.patch_size,
            "temporal_patch_size": image.temporal_patch_size,
            "merge_size": image.merge_size,
            "image_mean": list(image.image_mean),
            "image_std": list(image.image_std),
            "do_convert_rgb": True,
        }
        return out


def load_processor(path: str | os.PathLike, trust_remote_code: bool = False) -> ProcessorMixin:
    """``AutoProcessor.from_pretrained(path)``, torchvision or not.

    The one exception: a Qwen2-VL-family processor (``Qwen2VLProcessor``) cannot be loaded by
    ``AutoProcessor`` without torchvision (its video processor needs it), so there it is loaded
    as ``Qwen2VLImageTextProcessor`` (same image/text processing, no video).
    """
    config_file = Path(path) / "processor_config.json"
    processor_class = None
    if config_file.is_file():
        processor_class = json.loads(config_file.read_text()).get("processor_class")
    if processor_class == "Qwen2VLProcessor" and not is_torchvision_available():
        return Qwen2VLImageTextProcessor.from_pretrained(path)
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
