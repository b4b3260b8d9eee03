"""One builder for tiny and real-shaped vision-language models (torchtune style).

The embedded default run has no model hub, so it trains models *built from config* on the
synthetic scene world. ``build_tiny_vlm`` builds a stock Hugging Face VLM -- LLaVA
(``LlavaForConditionalGeneration``: CLIP vision tower + projector + Llama decoder) or Qwen2-VL
(``Qwen2VLForConditionalGeneration``) -- with a tokenizer trained locally by ``tokenizers`` and the
family's own processor. Sizes are arguments; the "tiny" defaults are just small arguments.
``save_tiny_vlm`` writes it with ``save_pretrained`` so everything downstream loads it through
``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained`` -- the same path a real
checkpoint takes, no ``trust_remote_code``.

Build a model from the world's SFT text (one ``make`` stage)::

    python -m models.tiny --data runs/demo/data --out runs/demo/tiny-model --family llava

Token budget of the default llava at 64 px: (64 / 8)^2 = 64 image tokens + ~40 text tokens
~= 110 tokens per example, ~1M parameters (see ``build.json`` for the exact count).

Chat format (both families; only the image placeholder differs)::

    <|bos|><|user|><image>Describe the image in detail.<|end|><|assistant|>There are ...<|end|>

Every role marker and ``<|end|>`` is a single special token and the generation prompt ends with
the special token ``<|assistant|>``, so the prompt is a string *and* token prefix of the full
conversation (BPE never merges across a special token). Every turn ends with ``<|end|>``, which is
the tokenizer's eos and the generation config's eos, so ``generate`` stops at the end of the turn.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from models.processors import QWEN_IMAGE_PAD, QWEN_VIDEO_PAD, Qwen2VLImageTextProcessor

FAMILIES = ("llava", "qwen2_vl")

# Special tokens shared by both families. Ids are assigned in this order (pad = 0).
PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
# What an ``{"type": "image"}`` content part renders to, and the family's vision special tokens.
LLAVA_IMAGE = "<image>"
QWEN_VISION_START, QWEN_VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PLACEHOLDER = {
    "llava": LLAVA_IMAGE,
    # Qwen2VLProcessor expands <|image_pad|> to one token per merged patch.
    "qwen2_vl": QWEN_VISION_START + QWEN_IMAGE_PAD + QWEN_VISION_END,
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def chat_template(family: str = "llava", question_first: bool = False) -> str:
    """The Jinja chat template for ``family``.

    ``question_first``: a user turn renders its text parts before its image parts, so the
    model reads the question before it looks (every image token can attend to the question, as
    InstructBLIP's Q-Former reads the instruction). Records keep LLaVA's image-then-text order;
    only this model's template differs. Why: docs/TESTBED.md (yes/no questions).

    Renders TRL/HF conversational messages whose ``content`` is a string or a list of
    ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts, roles system/user/assistant.
    No whitespace is added anywhere: role markers and ``<|end|>`` are special tokens, so the text
    of a turn is tokenised on its own and rendering the conversation up to the last user turn with
    ``add_generation_prompt=True`` is an exact string- and token-prefix of the full rendering.
    """
    _check_family(family)
    in_order = f"""
        {{%- for part in message['content'] -%}}
            {{%- if part['type'] == 'image' -%}} {IMAGE_PLACEHOLDER[family]}
            {{%- elif part['type'] == 'text' -%}} {{{{- part['text'] -}}}}
            {{%- endif -%}}
        {{%- endfor -%}}"""
    text_then_image = f"""
        {{%- for part in message['content'] if part['type'] == 'text' -%}} {{{{- part['text'] -}}}} {{%- endfor -%}}
        {{%- for part in message['content'] if part['type'] == 'image' -%}} {IMAGE_PLACEHOLDER[family]} {{%- endfor -%}}"""
    parts = text_then_image if question_first else in_order
    # Every tag trims the whitespace around it ({%- -%}), so the newlines below are not rendered.
    return f"""\
{{{{- bos_token -}}}}
{{%- for message in messages -%}}
    {{%- if message['role'] == 'system' -%}} {ROLE_TOKENS['system']}
    {{%- elif message['role'] == 'user' -%}} {ROLE_TOKENS['user']}
    {{%- elif message['role'] == 'assistant' -%}} {ROLE_TOKENS['assistant']}
    {{%- else -%}} {{{{- raise_exception('unknown role: ' ~ message['role']) -}}}}
    {{%- endif -%}}
    {{%- if message['content'] is string -%}} {{{{- message['content'] -}}}}
    {{%- else -%}}{parts}
    {{%- endif -%}}
    {END}
{{%- endfor -%}}
{{%- if add_generation_prompt -%}} {ROLE_TOKENS['assistant']} {{%- endif -%}}
"""


def _family_special_tokens(family: str) -> dict[str, str]:
    """Named model-specific tokens, stored on the tokenizer (``tokenizer.image_token`` ...)."""
    if family == "llava":
        return {"image_token": LLAVA_IMAGE}
    return {
        "image_token": QWEN_IMAGE_PAD,
        "video_token": QWEN_VIDEO_PAD,
        "vision_start_token": QWEN_VISION_START,
        "vision_end_token": QWEN_VISION_END,
    }


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, family: str = "llava"
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Byte level, so any string encodes (unseen characters fall back to byte tokens) and decodes
    back exactly. Special tokens come first (``<|pad|>`` = 0, ``<|bos|>``, ``<|end|>`` = eos /
    end of turn, the role markers, then the family's vision tokens). The tokenizer adds no
    special tokens itself: the chat template writes ``<|bos|>``, so ``apply_chat_template`` then
    ``tokenizer(text)`` gives the same ids as tokenising inside the template.

    Args:
        texts: the corpus (e.g. every message text of the SFT records).
        vocab_size: total vocabulary including the 256 byte tokens and the special tokens.
        family: ``"llava"`` (image token ``<image>``) or ``"qwen2_vl"`` (``<|vision_start|>``,
            ``<|image_pad|>``, ``<|video_pad|>``, ``<|vision_end|>``).
    """
    _check_family(family)
    named = _family_special_tokens(family)
    specials = [PAD, BOS, END, *ROLE_TOKENS.values(), *named.values()]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(specials)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=END,
        extra_special_tokens=named,
        chat_template=chat_template(family),
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_vlm(
    tokenizer: PreTrainedTokenizerFast,
    family: str = "llava",
    image_size: int = 64,
    patch_size: int | None = None,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    vision_intermediate: int | None = None,
    spatial_merge_size: int = 2,
    text_hidden: int = 128,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int | None = None,
    text_intermediate: int | None = None,
    max_position_embeddings: int = 2048,
    text_init_std: float = 0.02,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    vision_tower: str | None = None,
    question_first: bool = False,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a LLaVA or Qwen2-VL model and its processor from sizes (randomly initialised).

    The same builder serves a 1M-parameter test model and a real-shaped one: only the arguments
    change. The vocabulary and special-token ids come from ``tokenizer`` (see
    ``train_tokenizer``; it must have been trained for the same ``family``).

    Args:
        tokenizer: byte-level tokenizer from ``train_tokenizer(..., family=family)``.
        family: ``"llava"`` or ``"qwen2_vl"``.
        image_size: square input resolution in pixels; the processor resizes every image to it
            (llava) or to that many pixels in total (qwen2_vl, aspect ratio kept).
        patch_size: vision patch size; ``None`` = 8 for llava (64 px -> 8x8 = 64 image tokens) and
            4 for qwen2_vl (16x16 patches, merged 2x2 -> 8x8 = 64 image tokens).
        vision_hidden: vision tower width (CLIP ``hidden_size`` / Qwen2-VL ``embed_dim``).
        vision_layers: vision transformer layers.
        vision_heads: vision attention heads.
        vision_intermediate: vision MLP width; ``None`` = 4 x ``vision_hidden`` (qwen2_vl: a
            multiple of ``vision_hidden``, stored as its integer ``mlp_ratio``).
        spatial_merge_size: qwen2_vl only: patches merged per side into one LLM token.
        text_hidden: decoder width.
        text_layers: decoder layers.
        text_heads: decoder attention heads.
        text_kv_heads: key/value heads (GQA); ``None`` = ``text_heads``.
        text_intermediate: decoder MLP width; ``None`` = 2 x ``text_hidden``.
        max_position_embeddings: decoder context length.
        text_init_std: std of the normal init of the decoder and the projector
            (``initializer_range``; the vision tower keeps CLIP's own init). 0.02 is transformers'
            default; 0.08 (~1/sqrt(128)) was measured on the demo world and is no clear gain
            (2000 SFT steps: exact captions 1.0 vs 0.5 percent, object hallucination 77.7 vs 78.0
            percent; see the tiny.yaml notes).
        tie_word_embeddings: share the input embedding and the LM head.
        seed: torch seed for the random initialisation (same seed -> same weights).
        vision_tower: llava only: folder of a pretrained ``CLIPVisionModel`` (the ``vision``
            stage's ``model/``) whose weights and sizes become the vision tower, as LLaVA builds
            on a pretrained CLIP; the ``vision_*`` size arguments and ``image_size`` /
            ``patch_size`` are then read from it. None = a randomly initialised tower.
        question_first: the chat template renders a user turn's text before its image (see
            ``chat_template``); the tokenizer and the processor both get it.

    Returns:
        ``(model, processor)``; ``model`` is in eval mode with a ``generation_config`` whose eos
        is ``<|end|>`` and pad is ``<|pad|>``.
    """
    _check_family(family)
    tokenizer.chat_template = chat_template(family, question_first)
    for name, tok in _family_special_tokens(family).items():
        if tok not in tokenizer.get_vocab():
            raise ValueError(f"tokenizer lacks {name} {tok!r}: train it with family={family!r}")
    pretrained = None
    if vision_tower is not None:
        if family != "llava":
            raise ValueError("vision_tower (a pretrained CLIP tower) is supported for family='llava'")
        from transformers import CLIPVisionModel

        pretrained = CLIPVisionModel.from_pretrained(vision_tower, use_safetensors=True)
        vc = pretrained.config
        image_size, patch_size = vc.image_size, vc.patch_size
        vision_hidden, vision_layers = vc.hidden_size, vc.num_hidden_layers
        vision_heads, vision_intermediate = vc.num_attention_heads, vc.intermediate_size
    if patch_size is None:
        patch_size = 8 if family == "llava" else 4
    vision_intermediate = vision_intermediate or 4 * vision_hidden
    text_intermediate = text_intermediate or 2 * text_hidden
    text_kv_heads = text_kv_heads or text_heads
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    text_kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=text_init_std,
        tie_word_embeddings=tie_word_embeddings,
        **ids,
    )
    if family == "llava":
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=vision_hidden,
                intermediate_size=vision_intermediate,
                num_hidden_layers=vision_layers,
                num_attention_heads=vision_heads,
                image_size=image_size,
                patch_size=patch_size,
                projection_dim=vision_hidden,
            ),
            text_config=LlamaConfig(**text_kwargs),
            image_token_index=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE),
            image_seq_length=(image_size // patch_size) ** 2,
            # Drop CLS ("default"), read the last layer: with 2 layers, LLaVA-1.5's -2 would leave
            # the last vision layer without gradients.
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            tie_word_embeddings=tie_word_embeddings,
            **ids,
        )
        image_processor = CLIPImageProcessorPil(
            size={"height": image_size, "width": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=False,  # resize straight to image_size x image_size: nothing cropped
            do_convert_rgb=True,
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, removed again by "default"
            chat_template=chat_template(family, question_first),
            image_token=LLAVA_IMAGE,
        )
        model_cls = LlavaForConditionalGeneration
    else:
        factor = patch_size * spatial_merge_size
        if vision_intermediate % vision_hidden:
            raise ValueError("qwen2_vl: vision_intermediate must be a multiple of vision_hidden (mlp_ratio)")
        if image_size % factor:
            raise ValueError(f"image_size {image_size} is not a multiple of {factor}")
        head_dim = text_hidden // text_heads
        if head_dim % 2:
            raise ValueError("text_hidden / text_heads must be even for rotary embeddings")
        # M-RoPE splits the head_dim/2 rotary frequencies into (temporal, height, width);
        # Qwen2-VL uses [16, 24, 24] for head_dim 128, i.e. 1/4, 3/8, 3/8.
        half = head_dim // 2
        temporal = half // 4
        height = (half - temporal) // 2
        mrope = [temporal, height, half - temporal - height]
        vocab = tokenizer.get_vocab()
        config = Qwen2VLConfig(
            vision_config=dict(
                depth=vision_layers,
                embed_dim=vision_hidden,
                hidden_size=text_hidden,  # merger output = decoder width
                num_heads=vision_heads,
                mlp_ratio=vision_intermediate // vision_hidden,
                patch_size=patch_size,
                spatial_merge_size=spatial_merge_size,
                temporal_patch_size=2,
            ),
            text_config=dict(
                **text_kwargs,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            ),
            image_token_id=vocab[QWEN_IMAGE_PAD],
            video_token_id=vocab[QWEN_VIDEO_PAD],
            vision_start_token_id=vocab[QWEN_VISION_START],
            vision_end_token_id=vocab[QWEN_VISION_END],
            tie_word_embeddings=tie_word_embeddings,
            **ids,
        )
        pixels = image_size * image_size
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": pixels, "longest_edge": pixels},
            patch_size=patch_size,
            temporal_patch_size=2,
            merge_size=spatial_merge_size,
            do_convert_rgb=True,
        )
        processor = Qwen2VLImageTextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template(family, question_first),
        )
        model_cls = Qwen2VLForConditionalGeneration

    config._attn_implementation = "sdpa"  # works on CPU for both families, saved in config.json
    tokenizer.model_max_length = max_position_embeddings
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    if pretrained is not None:
        # strict: a tower whose layout differs from the config just built is an error, not a partial load
        model.model.vision_tower.load_state_dict(pretrained.state_dict(), strict=True)
    # Greedy by default; eos = <|end|> stops generation at the end of the assistant turn.
    model.generation_config = GenerationConfig(**ids, do_sample=False, max_new_tokens=128)
    model.eval()
    return model, processor


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def image_tokens_per_image(processor: ProcessorMixin, image_size: int = 64) -> int:
    """How many image tokens the processor expands one ``image_size``-px square image into
    (measured by running the processor on a blank image)."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}], tokenize=False
    )
    batch = processor(text=text, images=Image.new("RGB", (image_size, image_size)), return_tensors="pt")
    return int((batch["input_ids"] == processor.image_token_id).sum())


def save_tiny_vlm(model: PreTrainedModel, processor: ProcessorMixin, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` model (safetensors) and processor into ``out_dir``.

    Load it back with ``AutoProcessor.from_pretrained(out_dir)`` and
    ``AutoModelForImageTextToText.from_pretrained(out_dir)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)  # never a pickle (pytorch_model.bin)
    processor.save_pretrained(out)
    return out


def _tmp_dir(out: Path) -> Path:
    """A fresh ``<out>.tmp-<pid>`` sibling to build into."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Move an existing ``out`` aside to a trash name, ``os.replace`` ``tmp`` in, drop the trash:
    a killed build never leaves a half-written model."""
    if out.exists():
        trash = out.with_name(f"{out.name}.trash-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)


def swap_vision_tower(model_dir: str | os.PathLike, tower_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A LLaVA checkpoint with its vision tower replaced by another pretrained tower of the same
    shape (e.g. a later snapshot of the same pretraining run), written atomically to ``out``.

    The demo's judge is the SFT policy given the final (stronger) tower and then trained on: a
    judge that sees better than the policy it judges, for the cost of a fine-tune instead of a
    second SFT from scratch.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel

    model = AutoModelForImageTextToText.from_pretrained(model_dir, use_safetensors=True)
    tower = CLIPVisionModel.from_pretrained(tower_dir, use_safetensors=True)
    if not hasattr(getattr(model, "model", None), "vision_tower"):
        raise ValueError(f"{model_dir}: not a LLaVA-style checkpoint (no model.vision_tower)")
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    processor = AutoProcessor.from_pretrained(model_dir)
    out = Path(out)
    tmp = _tmp_dir(out)
    save_tiny_vlm(model, processor, tmp)
    (tmp / "build.json").write_text(json.dumps({"from": str(model_dir), "vision_tower": str(tower_dir)}, indent=2) + "\n")
    _swap_into_place(tmp, out)
    return out


# ----------------------------------------------------------------------------- CLI


def iter_record_texts(path: str | os.PathLike) -> Iterator[str]:
    """Every message text of a JSONL file of TRL conversational records."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            for message in json.loads(line).get("messages", []):
                content = message["content"]
                if isinstance(content, str):
                    yield content
                else:
                    for part in content:
                        if part.get("type") == "text":
                            yield part["text"]


_BUILD_ARGS = [
    name
    for name, p in inspect.signature(build_tiny_vlm).parameters.items()
    if name not in ("tokenizer", "family", "vision_tower", "question_first")
]


def _arg_help() -> dict[str, str]:
    """Per-argument help, parsed from ``build_tiny_vlm``'s docstring ``Args:`` section."""
    doc = inspect.getdoc(build_tiny_vlm) or ""
    help_, current = {}, None
    for line in doc.split("Args:")[1].split("Returns:")[0].splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        head, _, rest = stripped.partition(": ")
        if line.startswith("    ") and not line.startswith("        ") and rest:
            current = head
            help_[current] = rest
        elif current:
            help_[current] += " " + stripped
    return help_


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.tiny",
        description=(
            "Train a byte-level BPE tokenizer on <data>/train/sft.jsonl, build a tiny VLM "
            "from config and save it (save_pretrained) with its processor and build.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="data dir holding train/sft.jsonl")
    parser.add_argument("--out", required=True, help="output model dir (replaced atomically)")
    parser.add_argument("--family", default="llava", choices=FAMILIES, help="model family")
    parser.add_argument("--vocab-size", type=int, default=512, help="tokenizer vocabulary size")
    parser.add_argument("--vision-tower", default=None, help=_arg_help().get("vision_tower"))
    parser.add_argument("--question-first", action="store_true", help=_arg_help().get("question_first"))
    helps = _arg_help()
    sig = inspect.signature(build_tiny_vlm)
    for name in _BUILD_ARGS:
        default = sig.parameters[name].default
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=helps.get(name))
        else:
            parser.add_argument(flag, type=float if isinstance(default, float) else int, default=default,
                                help=helps.get(name))
    return parser


def build_from_data(data: str | os.PathLike, out: str | os.PathLike, family: str = "llava",
                    vocab_size: int = 512, **sizes: Any) -> dict[str, Any]:
    """Tokenizer + model from ``<data>/train/sft.jsonl``, written atomically to ``out``.

    Builds into ``<out>.tmp-<pid>``, moves an existing ``out`` aside to a trash name, then
    ``os.replace``s the new dir in, so a killed build never leaves a half-written model.
    Returns the ``build.json`` contents.
    """
    sft = Path(data) / "train" / "sft.jsonl"
    if not sft.is_file():
        raise FileNotFoundError(f"{sft} not found (run the data stage first)")
    tokenizer = train_tokenizer(iter_record_texts(sft), vocab_size=vocab_size, family=family)
    model, processor = build_tiny_vlm(tokenizer, family=family, **sizes)
    image_size = (model.config.vision_config.image_size if family == "llava"
                  else sizes.get("image_size", inspect.signature(build_tiny_vlm).parameters["image_size"].default))
    out = Path(out)
    tmp = _tmp_dir(out)
    save_tiny_vlm(model, processor, tmp)
    args = {"vocab_size": vocab_size, **sizes}
    if sizes.get("vision_tower"):  # the tower's own sizes were used; the vision_* arguments were not
        args = {k: v for k, v in args.items() if not k.startswith("vision_") or k == "vision_tower"}
        vc = model.config.vision_config
        args["vision_tower_config"] = {"hidden": vc.hidden_size, "layers": vc.num_hidden_layers,
                                       "heads": vc.num_attention_heads, "patch_size": vc.patch_size,
                                       "image_size": vc.image_size}
    info = {
        "family": family,
        "args": args,
        "num_parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "image_size": image_size,
        "image_tokens_per_image": image_tokens_per_image(processor, image_size),
        "sft_file": str(sft),
        "model_class": type(model).__name__,
        # what AutoProcessor resolves (the in-memory class may be Qwen2VLImageTextProcessor)
        "processor_class": json.loads((tmp / "processor_config.json").read_text())["processor_class"],
    }
    (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    _swap_into_place(tmp, out)
    return info


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["swap-tower"]:
        ap = argparse.ArgumentParser(prog="python -m models.tiny swap-tower",
                                     description=swap_vision_tower.__doc__.split("\n\n")[0])
        ap.add_argument("--model", required=True, help="LLaVA checkpoint folder (e.g. runs/demo/sft/model)")
        ap.add_argument("--vision-tower", required=True, help="pretrained CLIPVisionModel folder of the same shape")
        ap.add_argument("--out", required=True, help="output checkpoint folder (replaced atomically)")
        a = ap.parse_args(argv[1:])
        print(f"wrote {swap_vision_tower(a.model, a.vision_tower, a.out)}")
        return 0
    args = build_parser().parse_args(argv)
    sizes = {name: getattr(args, name) for name in _BUILD_ARGS}
    info = build_from_data(args.data, args.out, family=args.family, vocab_size=args.vocab_size,
                           vision_tower=args.vision_tower, question_first=args.question_first, **sizes)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
