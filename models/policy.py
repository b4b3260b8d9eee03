"""The policy adapter: any Hugging Face image-text-to-text checkpoint as an ``mmalign`` Policy.

This is the one place that knows model families. Everything above it (collators, losses,
LightningModules) sees batches and logits only.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmalign.ops import gather_logprobs, token_logprobs
from mmalign.policy import Policy, split_concat

log = logging.getLogger(__name__)

# Where each family keeps its vision tower and projector (attribute paths under the model).
# Only used for freezing; a family missing here gets a clear error naming what was looked for.
VISION_TOWER_NAMES = ("model.vision_tower", "model.visual", "vision_tower", "visual")
PROJECTOR_NAMES = ("model.multi_modal_projector", "model.visual.merger", "multi_modal_projector", "visual.merger")
# The decoder's linear layers: LoRA goes there by default, not into the vision tower.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraOptions:
    """LoRA on the language model (peft).

    Attributes:
        r: rank of the update.
        alpha: scaling numerator (update scale = alpha / r).
        dropout: dropout on the LoRA input.
        target_modules: regex over module names, or a list of names; default: the decoder's
            attention and MLP projections.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = DEFAULT_LORA_TARGETS
    modules_to_save: list[str] = field(default_factory=list)


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _freeze(model: nn.Module, names: tuple[str, ...], what: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for n in names:
        m = _get(base, n)
        if m is not None:
            m.requires_grad_(False)
            return
    raise ValueError(f"cannot freeze the {what}: none of {names} exists in {type(base).__name__}")


class HFPolicy(Policy):
    """A vision-language policy loaded by path (local folder or hub name).

    Args:
        path: checkpoint folder or hub id; a folder holding ``adapter_config.json`` is loaded as
            a peft adapter on its base model.
        dtype: weights dtype ("float32" on CPU; "bfloat16" on recent GPUs).
        lora: LoRA options; None trains all (unfrozen) weights.
        quantization: "4bit" (QLoRA, NF4) or "8bit" via bitsandbytes; needs a CUDA GPU.
        gradient_checkpointing: trade compute for activation memory.
        freeze_vision_tower: keep the vision encoder fixed (LLaVA recipe).
        freeze_projector: keep the vision-language projector fixed.
        trust_remote_code: run custom model code from the checkpoint (off: safe default).
        attn_implementation: e.g. "sdpa", "eager", "flash_attention_2"; None = transformers' choice.
    """

    def __init__(
        self,
        path: str,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lora: LoraOptions | None = None,
        quantization: Literal["4bit", "8bit"] | None = None,
        gradient_checkpointing: bool = False,
        freeze_vision_tower: bool = False,
        freeze_projector: bool = False,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ):
        super().__init__()
        from transformers import AutoModelForImageTextToText

        from models.processors import load_processor

        if quantization and lora is None and not (Path(path) / "adapter_config.json").is_file():
            raise ValueError("quantized weights cannot be trained directly: set `lora` (QLoRA) with quantization")
        self.path = path
        kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code, "use_safetensors": True}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if quantization:
            kwargs["quantization_config"] = _bnb_config(quantization, DTYPES[dtype])
        adapter_cfg = Path(path) / "adapter_config.json"
        if adapter_cfg.is_file():
            from peft import PeftModel

            base_path = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
            base = AutoModelForImageTextToText.from_pretrained(base_path, **kwargs)
            self.model = PeftModel.from_pretrained(base, path, is_trainable=lora is not None)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
            if quantization:
                from peft import prepare_model_for_kbit_training

                self.model = prepare_model_for_kbit_training(self.model, use_gradient_checkpointing=gradient_checkpointing)
            if lora is not None:
                from peft import LoraConfig, get_peft_model

                self.model = get_peft_model(self.model, LoraConfig(
                    r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                    target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None))
        self.processor = load_processor(path, trust_remote_code=trust_remote_code)
        self.is_lora = hasattr(self.model, "disable_adapter")
        self.quantization = quantization
        # from_pretrained returns eval mode; training (dropout) is the module's job to switch off.
        self.model.train()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.is_lora:
                self.model.enable_input_require_grads()
        if freeze_vision_tower:
            _freeze(self.model, VISION_TOWER_NAMES, "vision tower")
        if freeze_projector:
            _freeze(self.model, PROJECTOR_NAMES, "projector")
        # The frozen reference copy is kept outside the module tree: not in state_dict, not in
        # the optimizer, not moved twice. Taken on the first reference() call.
        self.__dict__["_ref_model"] = None

    # -- Policy API ----------------------------------------------------------------------------

    def forward(self, batch: dict) -> torch.Tensor:
        return self._logits(self.model, batch)

    def completion_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs(self.forward(batch), batch["labels"])

    def pair_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return pair_logprobs(self.model, batch)

    def forward_hidden(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(**Policy.model_inputs(batch), use_cache=False, output_hidden_states=True)
        return out.logits, out.hidden_states[-1]

    @property
    def hidden_size(self) -> int:
        """Width of the decoder's hidden states (what a score or value head reads)."""
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg).hidden_size

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1) -> list[str]:
        return _generate(self.model, self.processor, batch, max_new_tokens, do_sample, temperature, top_p,
                         num_return_sequences)

    @torch.no_grad()
    def generate_ids(self, batch: dict, max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0, num_return_sequences: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return _generate_ids(self.model, self.processor, batch, max_new_tokens, do_sample, temperature, top_p,
                             num_return_sequences)

    def response_forward(self, prompt: dict, response_ids: torch.Tensor, response_mask: torch.Tensor,
                         hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return response_forward(self.model, prompt, response_ids, response_mask, hidden)

    def snapshot_reference(self) -> None:
        """Take the frozen reference copy now (no-op under LoRA, whose reference is the base
        with the adapter off). Call before a checkpoint is restored: a copy taken lazily after
        resuming would be the half-trained policy, not the starting one."""
        if not self.is_lora and self.__dict__["_ref_model"] is None:
            with self.reference():
                pass

    @contextlib.contextmanager
    def reference(self) -> Iterator[ReferenceView]:
        if self.is_lora:
            with self.model.disable_adapter():
                yield ReferenceView(self.model, self.processor)
            return
        ref = self.__dict__["_ref_model"]
        if ref is None:
            if self.quantization:
                raise ValueError("a quantized policy needs LoRA for its reference (adapter disabled)")
            ref = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.__dict__["_ref_model"] = ref
        device = next(self.model.parameters()).device
        if next(ref.parameters()).device != device:
            ref.to(device)
        yield ReferenceView(ref, self.processor)

    def save_pretrained(self, out_dir: str, merge_lora: bool = True) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        if self.is_lora and merge_lora:
            if self.quantization:
                raise ValueError("cannot merge LoRA into quantized weights; export with merge_lora=False (adapter)")
            # Merge a copy: merge_and_unload() rewrites the modules in place, and training may go on.
            model = copy.deepcopy(self.model).merge_and_unload()
        model.save_pretrained(out, safe_serialization=True)
        self.processor.save_pretrained(out)

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**Policy.model_inputs(batch), use_cache=False).logits


class ReferenceView:
    """The reference model behind the same forward / log-prob / generate calls as the policy."""

    def __init__(self, model: nn.Module, processor: Any):
        self.model, self.processor = model, processor

    def forward(self, batch: dict) -> torch.Tensor:
        return HFPolicy._logits(self.model, batch)

    __call__ = forward

    def completion_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs(self.forward(batch), batch["labels"])

    def pair_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return pair_logprobs(self.model, batch)

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, num_return_sequences: int = 1) -> list[str]:
        return _generate(self.model, self.processor, batch, max_new_tokens, do_sample, temperature, top_p,
                         num_return_sequences)

    def response_forward(self, prompt: dict, response_ids: torch.Tensor, response_mask: torch.Tensor,
                         hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return response_forward(self.model, prompt, response_ids, response_mask, hidden)


def _uses_mrope(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base, "get_rope_index") or hasattr(getattr(base, "model", None), "get_rope_index")


def response_forward(model: nn.Module, prompt: dict, response_ids: torch.Tensor, response_mask: torch.Tensor,
                     hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``(B, L, V)`` predicting each response token (and hidden states ``(B, L, H)`` at
    the response tokens with ``hidden``) from one forward over ``prompt`` (left-padded, as
    generation saw it) + ``response_ids`` (right-padded). Positions follow the attention mask, as
    in generation, so the log-probs are the ones the tokens were sampled with (up to float
    rounding); multimodal-RoPE models (Qwen2-VL) compute their own from the mask."""
    inputs = Policy.model_inputs(prompt)
    p_ids, p_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    if p_mask[:, -1].min() == 0:
        raise ValueError("response_forward needs a left-padded prompt batch (VisionChatCollator(mode='generate'))")
    if response_ids.shape[0] != p_ids.shape[0]:
        raise ValueError(f"{response_ids.shape[0]} responses for {p_ids.shape[0]} prompts: repeat the prompt rows "
                         "per sample first (mmalign.collators.select_rows)")
    ids = torch.cat([p_ids, response_ids], dim=1)
    attn = torch.cat([p_mask, response_mask.to(p_mask.dtype)], dim=1)
    for key, v in list(inputs.items()):
        # per-token side inputs (Qwen2-VL's mm_token_type_ids): response tokens are text, type 0
        if v.shape[:2] == p_ids.shape:
            inputs[key] = torch.cat([v, v.new_zeros((v.shape[0], response_ids.shape[1]) + v.shape[2:])], dim=1)
    if not _uses_mrope(model):
        inputs["position_ids"] = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, use_cache=False, output_hidden_states=hidden, **inputs)
    p, n = p_ids.shape[1], response_ids.shape[1]
    # position p - 1 + j predicts response token j
    logits = out.logits[:, p - 1:p - 1 + n]
    return logits, (out.hidden_states[-1][:, p:p + n] if hidden else None)


def pair_logprobs(model: nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
    """Per-token log-probs of the chosen and rejected completions of a preference batch
    (:class:`mmalign.collators.PreferenceCollator`), ``(chosen_logps, chosen_mask,
    rejected_logps, rejected_mask)``, each ``(B, T)``, plus ``(visual_logps, visual_mask)`` (the
    chosen answer under the rejected images) for a visual batch.

    ``"concat"``: one forward over the full rows. ``"shared_prompt"``: one forward over the
    left-padded prompts (images encoded once) that fills the KV cache, the cache rows gathered
    for the completions (``completion_owner``: two per original prompt, one per rejected-image
    prompt), then one forward over the completions on it. Gradients flow through the cache into
    the prompt pass. Positions follow the attention mask (``cumsum - 1``), so a left-padded prompt
    gets the positions it has unpadded, exactly as in the concat rows: the two layouts give the
    same log-probs up to float rounding.
    """
    visual = bool(batch.get("visual"))
    if batch.get("layout") == "concat":
        return split_concat(*token_logprobs(HFPolicy._logits(model, batch), batch["labels"]), visual=visual)
    if batch.get("layout") != "shared_prompt":
        raise ValueError(f"unknown pair layout {batch.get('layout')!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "get_rope_index") or hasattr(getattr(base, "model", None), "get_rope_index"):
        # Qwen2-VL style multimodal RoPE: positions are 3-D and depend on the image grid; a cache
        # continuation would need them recomputed. The concat layout is exact for these.
        raise ValueError(f"{type(base).__name__} uses multimodal rotary positions; use the 'concat' pair layout "
                         "(data.init_args.layout: concat)")
    prompt = Policy.model_inputs(batch["prompt"])
    p_mask = prompt["attention_mask"]
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(**prompt, position_ids=p_pos, use_cache=True)
    # transformers 5 renamed past_key_values to cache (argument and output); accept both.
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        # transformers turns the cache off under gradient checkpointing in training mode.
        raise ValueError("the 'shared_prompt' pair layout needs the model's KV cache, and this model returned none "
                         "(gradient checkpointing disables it): use data.init_args.layout: concat")
    ids, c_mask = batch["completion_ids"], batch["completion_mask"]    # (N, C)
    owner = batch.get("completion_owner")                              # (N,) prompt row of each completion
    if owner is None:
        owner = torch.arange(p_mask.shape[0], device=ids.device).repeat_interleave(2)
    cache.batch_select_indices(owner)                                  # rows: c0, r0, c1, r1, ... [, v0, v1, ...]
    c_pos = p_pos[owner, -1:] + 1 + torch.arange(ids.shape[1], device=ids.device)
    attn = torch.cat([p_mask[owner], c_mask], dim=1)
    out2 = model(input_ids=ids, attention_mask=attn, position_ids=c_pos, use_cache=True,
                 **{cache_kw: cache})
    # The prompt's last logits predict each completion's first token; completion logits [:-1] the rest.
    logits = torch.cat([out.logits[owner, -1:], out2.logits[:, :-1]], dim=1)
    logps = gather_logprobs(logits, ids)
    mask = c_mask.to(logps.dtype)
    logps = logps * mask
    b = len(batch["meta"])
    pairs = (logps[: 2 * b: 2], mask[: 2 * b: 2], logps[1: 2 * b: 2], mask[1: 2 * b: 2])
    return pairs + (logps[2 * b:], mask[2 * b:]) if visual else pairs


def _generate(model, processor, batch, max_new_tokens, do_sample, temperature, top_p, num_return_sequences):
    ids, _ = _generate_ids(model, processor, batch, max_new_tokens, do_sample, temperature, top_p, num_return_sequences)
    return [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _generate_ids(model, processor, batch, max_new_tokens, do_sample, temperature, top_p, num_return_sequences):
    inputs = Policy.model_inputs(batch)
    if inputs["attention_mask"][:, -1].min() == 0:
        raise ValueError("generation batches must be left-padded (VisionChatCollator(mode='generate'))")
    tok = processor.tokenizer
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_return_sequences": num_return_sequences,
              "pad_token_id": tok.pad_token_id}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**inputs, **kwargs)
    finally:
        model.train(was_training)
    new = out[:, inputs["input_ids"].shape[1]:]
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = tok.eos_token_id if eos is None else eos
    eos_ids = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=new.device)
    is_eos = torch.isin(new, eos_ids)
    # keep every token up to and including the first end-of-sequence; what follows is padding
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return new.masked_fill(after, tok.pad_token_id), (~after).long()


def _bnb_config(quantization: str, compute_dtype: torch.dtype):
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{quantization} quantization needs bitsandbytes' CUDA backend and this machine has no CUDA GPU. "
            "Remove `quantization` from the policy config (train in float32/bfloat16, optionally with LoRA), "
            "or run on a GPU.")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
