"""FGAIF's fine-grained reward models: object existence, attribute and relation hallucination.

FGAIF (Jing & Du 2024, "FGAIF: Aligning Large Vision-Language Models with Fine-grained AI
Feedback", arXiv:2404.05046) trains three reward models, one per hallucination type. Each is the
vision-language model with a token-classification head that reads the last layer's hidden state
at the *last token of every sub-sentence* (segment) of the response and classifies the segment
into three classes; the classes' reward values are summed into PPO's dense reward. Training is
cross-entropy on the per-segment labels that the feedback stage wrote
(``data_pipelines.feedback``: ``annotations.segments[k].labels[type]``).

Here:

* classes :data:`CLASSES` = ("hallucinated", "correct", "n/a") (the feedback stage's labels, in
  :data:`mmalign.feedback.LABELS`' order), reward values :data:`VALUES` = hallucinated -1,
  n/a 0, correct +1;
* one entry in ``types`` = one of FGAIF's separate models (the default; ``make fg-rm`` trains
  three); several entries = one shared backbone with one 3-class head per type (an option FGAIF
  does not have: one forward scores all types);
* the score position of segment ``k`` is its last token in the response's own tokenisation
  (:func:`mmalign.segments.char_to_token_end`), i.e. the token holding the segment's final
  character (its "," / "." for most segments), as in Fine-Grained RLHF (Wu et al. 2023), which
  rewards each sub-sentence at its final token.

What was checked in the released FGAIF code (github.com/LiqiangJing/FGAIF, as stored in the search
corpus):

* ``RLHF/models/fine_reward_model.py``: ``RewardModel`` puts ``reward_head = nn.Linear(hidden, 3)``
  (``num_labels = 3``, bias zero-initialised, weight at PyTorch's default init) on
  ``outputs.hidden_states[-1]`` at every position; ``RewardModelTrainer.compute_loss`` is
  ``F.cross_entropy(rewards.view(-1, 3), labels.view(-1), ignore_index=-100)``, i.e. the mean over
  every labelled position of the batch. One model is trained per type (``train_reward_object.sh``,
  ``..._attribute.sh``, ``..._relation.sh``; ``reward_type`` picks the label column).
* ``RLHF/data_utils/data_utils_fine_rm.py`` / ``common_utils_fine.py``: the row is
  ``"Prompt: Describe this image in detail. \\n"`` followed by the sub-sentences, each followed by
  ``</s>``; the labels are ``IGNORE_INDEX`` except at those ``</s>`` tokens, which get the
  annotated value of the type plus one (``labels[i][reward_type] + 1``, values in {-1, 0, 1}).
  **Our reading** of those codes: -1 = the sub-sentence holds a hallucination of the type, +1 =
  it holds only correct claims of the type, 0 = no claim of the type; FGAIF does not name them
  in the code. Their class indices are therefore (-1, 0, +1) + 1 = (hallucinated, n/a, correct);
  ours follow :data:`CLASSES` instead, and rewards are always read through :data:`VALUES`, so
  the order does not matter.
* Two deliberate differences: we do not insert an end-of-sequence token after each segment (the
  PPO policy generates plain text, and the reward model reads the text as it is: the segment's
  own last token), and the prompt is the chat-template rendering of the record's prompt with its
  image, not FGAIF's fixed "Describe this image in detail" string.

The row a reward model reads (:func:`encode_for_segments`, the same for training and scoring, so
the two can never disagree): the prompt rendered by :class:`VisionChatCollator` in generate mode
(left-padded, images -> ``pixel_values`` ...), then the response tokenised on its own (fast
tokenizer, offsets) plus the end-of-sequence token, right-padded; ``position_ids`` follow the
attention mask (``cumsum - 1``), so left padding does not shift positions. This is the layout of
a PPO rollout (left-padded prompts + generated tokens).

Loss: for each type, cross-entropy over the batch's valid segments (mean over segments; with
``class_weights="balanced"`` the weighted mean, PyTorch's ``weight=``), then the mean over types.
``"balanced"`` weighs class ``c`` of type ``t`` by ``n_t / (3 * n_{t,c})`` from the training
labels (scikit-learn's "balanced"): relation labels are ~99 % "n/a" in the demo world, and an
unweighted head learns to say "n/a" always.

Export (``export_dir``): the policy in Hugging Face format, ``fg_reward_head.safetensors`` (one
``<type>.weight`` / ``<type>.bias`` per head) and ``fg_reward_config.json`` (types, classes,
values, hidden size, policy class, format version), in one atomic stage output.
:func:`load_fg_reward_model` reads it back; :meth:`FGRewardModel.segment_probs` /
:meth:`FGRewardModel.segment_rewards` score responses (what the PPO stage calls every rollout),
and :func:`fg_segment_probs` / :func:`fg_segment_rewards` do it for a set of models, one forward
per batch per distinct model.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from mmalign.collators import VisionChatCollator, to_device
from mmalign.data import Loaders
from mmalign.feedback import HALLUCINATION_TYPES
from mmalign.methods.base import PolicyModule, export_policy, global_denominator
from mmalign.ops import IGNORE_INDEX
from mmalign.policy import Policy
from mmalign.records import (
    AnnotatedResponse,
    ReadReport,
    RecordError,
    load_image,
    read_records,
)
from mmalign.segments import Segment, char_to_token_end, split_segments

log = logging.getLogger(__name__)

__all__ = [
    "CLASSES",
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "HEAD_FILE",
    "TYPES",
    "VALUES",
    "FGItem",
    "FGRewardCollator",
    "FGRewardDataModule",
    "FGRewardDataset",
    "FGRewardModel",
    "FGRewardModule",
    "balanced_class_weights",
    "check_fg_record",
    "check_types",
    "encode_for_segments",
    "export_fg_reward_model",
    "fg_loss",
    "fg_segment_probs",
    "fg_segment_rewards",
    "hallucinated_prf",
    "load_fg_reward_model",
    "make_head",
    "rewards_from_probs",
    "segment_logits",
]

#: The classes of every head, in index order (the feedback stage's labels).
CLASSES: tuple[str, ...] = ("hallucinated", "correct", "n/a")
#: The reward of each class: FGAIF's -1 / 0 / +1 (the mapping of its codes to names is our reading).
VALUES: dict[str, float] = {"hallucinated": -1.0, "n/a": 0.0, "correct": 1.0}
#: The hallucination types, one reward model (or head) each.
TYPES: tuple[str, ...] = HALLUCINATION_TYPES
HEAD_FILE = "fg_reward_head.safetensors"
CONFIG_FILE = "fg_reward_config.json"
FORMAT_VERSION = 1
#: The score position, as recorded in the export.
SCORE_POSITION = "last token of each segment (mmalign.segments.split_segments) in the response's own tokenisation"

ClassWeights = Literal["none", "balanced"]


def check_types(types: Sequence[str]) -> list[str]:
    """``types`` as a list if it is a non-empty subset of :data:`TYPES` without repeats; a
    ValueError otherwise."""
    if isinstance(types, str):
        types = [types]
    types = list(types)
    bad = [t for t in types if t not in TYPES]
    if not types or bad or len(set(types)) != len(types):
        raise ValueError(f"types must be a non-empty list of distinct entries of {list(TYPES)}, got {types}")
    return types


def _value_vector(device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor([VALUES[c] for c in CLASSES], dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------
# the row a reward model reads


def _where(ex: Mapping[str, Any]) -> str:
    meta = ex.get("meta") or {}
    src, rid = meta.get("source"), meta.get("id")
    if src and rid and str(rid) not in str(src):
        return f"{src} id={rid}"
    return str(src or rid or "<example>")


def _bounds(seg: Any) -> tuple[int, int]:
    if isinstance(seg, Mapping):
        return int(seg["start"]), int(seg["end"])
    return int(seg.start), int(seg.end)


def _tokenize_response(tok: Any, text: str, where: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tok, "is_fast", False):
        raise TypeError(f"{type(tok).__name__} is not a fast tokenizer: segment end tokens are found from the "
                        "tokenizer's character offsets (return_offsets_mapping), which only fast tokenizers give")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc.get("offset_mapping")
    if offsets is None:
        raise TypeError(f"{where}: the tokenizer returned no offset_mapping; segment end tokens cannot be located")
    return list(enc["input_ids"]), [tuple(o) for o in offsets]


def _segment_ends(offsets: Sequence[tuple[int, int]], segments: Sequence[Any], where: str,
                  strict: bool = True) -> list[int]:
    """The token index of each segment's end; a RecordError naming ``where`` when a segment has no
    token of its own (two segments ending in one token, or a span no token covers). With
    ``strict=False`` (scoring a policy's free text, where one odd merge must not stop a PPO run)
    such a segment is read at the token that ends the previous one instead."""
    ends: list[int] = []
    for k, seg in enumerate(segments):
        start, end = _bounds(seg)
        try:
            i = char_to_token_end(offsets, end)
        except ValueError as e:
            raise RecordError(f"{where}: segment {k} [{start}, {end}) cannot be located in the tokens: {e}") from None
        if offsets[i][1] <= start or (ends and i <= ends[-1]):
            if not strict:
                ends.append(max(i, ends[-1]) if ends else i)
                continue
            raise RecordError(f"{where}: segment {k} [{start}, {end}) has no token of its own (its end falls in the "
                              "token that ends the previous segment); the tokenizer merges across the boundary")
        ends.append(i)
    return ends


def encode_for_segments(processor: Any, examples: Sequence[Mapping[str, Any]],
                        max_response_tokens: int | None = None, strict: bool = True) -> dict[str, Any]:
    """Encode (prompt, response) rows and the token position of every response segment.

    Each example is ``{"images": [PIL], "prompt": [messages], "response": str, "meta": {...}}``
    with optionally ``"segments"`` (``Segment`` s or dicts with ``start`` / ``end``; default
    :func:`split_segments` of the response) and ``"labels"`` (per segment, a list of ``K`` class
    indices into :data:`CLASSES`, one per reward type; training).

    Row ``i`` = the prompt's ids (:class:`VisionChatCollator`, generate mode: chat template with
    the generation prompt, images expanded, **left**-padded) followed by the response's ids
    (tokenised on its own, ``add_special_tokens=False``) and the tokenizer's eos id,
    **right**-padded. ``attention_mask`` is the two masks side by side and ``position_ids =
    (attention_mask.cumsum(-1) - 1).clamp(min=0)``. Other per-token tensors of the processor
    (e.g. Qwen2-VL's ``mm_token_type_ids``) are extended with zeros (text). A response longer
    than ``max_response_tokens`` (eos included; None = no limit) is cut there; its segments that
    end past the cut become invalid and are counted in ``segments_cut``.

    Returns the model inputs plus ``segment_index`` ``(N, S)`` long (the segment's last token,
    prompt width included; 0 in padding slots), ``segment_valid`` ``(N, S)`` bool, with labels
    ``segment_labels`` ``(N, S, K)`` long (``-100`` where ignored), ``prompt_width`` (int),
    ``segments_cut`` (int) and ``meta``. An empty response, or (``strict``, training data) a
    segment that no token of its own ends, is a :class:`RecordError` naming the record
    (``meta['source']`` / ``id``); ``strict=False`` reads such a segment at the previous
    segment's end token.
    """
    if not examples:
        raise ValueError("encode_for_segments() needs at least one example")
    tok = processor.tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"{type(tok).__name__} has no eos token: a response row ends with it")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if max_response_tokens is not None and max_response_tokens < 1:
        raise ValueError(f"max_response_tokens must be >= 1 or None, got {max_response_tokens}")

    rows: list[list[int]] = []
    seg_ends: list[list[int]] = []
    seg_ok: list[list[bool]] = []
    labels: list[list[list[int]] | None] = []
    cut = 0
    for ex in examples:
        where = _where(ex)
        text = ex["response"]
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{where}: empty response; it has no segment to score")
        segs = ex.get("segments")
        if segs is None:
            segs = split_segments(text)
        if not segs:
            raise RecordError(f"{where}: the response has no segment")
        ids, offsets = _tokenize_response(tok, text, where)
        ends = _segment_ends(offsets, segs, where, strict)
        ids = ids + [eos]
        if max_response_tokens is not None and len(ids) > max_response_tokens:
            ids = ids[:max_response_tokens]
        ok = [e < len(ids) for e in ends]
        cut += ok.count(False)
        lab = ex.get("labels")
        if lab is not None:
            if len(lab) != len(segs):
                raise RecordError(f"{where}: {len(lab)} label rows for {len(segs)} segments")
            labels.append([list(map(int, row)) for row in lab])
        else:
            labels.append(None)
        rows.append(ids)
        seg_ends.append(ends)
        seg_ok.append(ok)
    if any(lab is None for lab in labels) and not all(lab is None for lab in labels):
        raise ValueError("either every example has 'labels' or none has")

    gen = VisionChatCollator(processor, max_length=1 << 30, mode="generate", on_overlength="error")
    batch = gen([{"images": ex.get("images") or [], "messages": ex["prompt"], "meta": dict(ex.get("meta") or {})}
                 for ex in examples])
    p_ids, p_mask = batch["input_ids"], batch["attention_mask"]
    n, width = p_ids.shape
    r_len = max(len(r) for r in rows)
    r_ids = torch.full((n, r_len), pad, dtype=p_ids.dtype)
    r_mask = torch.zeros((n, r_len), dtype=p_mask.dtype)
    for i, r in enumerate(rows):
        r_ids[i, :len(r)] = torch.tensor(r, dtype=p_ids.dtype)
        r_mask[i, :len(r)] = 1
    for k, v in list(batch.items()):
        if k in ("input_ids", "attention_mask") or not isinstance(v, torch.Tensor) or v.shape != p_ids.shape:
            continue
        batch[k] = torch.cat([v, torch.zeros((n, r_len), dtype=v.dtype)], dim=1)  # e.g. token types: text
    batch["input_ids"] = torch.cat([p_ids, r_ids], dim=1)
    batch["attention_mask"] = mask = torch.cat([p_mask, r_mask], dim=1)
    batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)

    s_max = max(len(e) for e in seg_ends)
    index = torch.zeros((n, s_max), dtype=torch.long)
    valid = torch.zeros((n, s_max), dtype=torch.bool)
    for i, (ends, ok) in enumerate(zip(seg_ends, seg_ok)):
        for k, (e, good) in enumerate(zip(ends, ok)):
            if good:
                index[i, k] = width + e
                valid[i, k] = True
    batch["segment_index"], batch["segment_valid"] = index, valid
    if labels[0] is not None:
        n_types = {len(row) for lab in labels for row in lab}
        if len(n_types) != 1:
            raise ValueError(f"every label row must have one entry per type; got lengths {sorted(n_types)}")
        k_types = n_types.pop()
        lab_t = torch.full((n, s_max, k_types), IGNORE_INDEX, dtype=torch.long)
        for i, lab in enumerate(labels):
            for k, row in enumerate(lab):
                if valid[i, k]:
                    if any(not 0 <= c < len(CLASSES) for c in row):
                        raise RecordError(f"{_where(examples[i])}: segment {k}: class index out of range in {row}")
                    lab_t[i, k] = torch.tensor(row, dtype=torch.long)
        batch["segment_labels"] = lab_t
    batch["prompt_width"] = width
    batch["segments_cut"] = cut
    return batch


@dataclass
class FGRewardCollator:
    """DataLoader ``collate_fn``: :func:`encode_for_segments` with labels, counting (and warning
    about) segments cut off by ``max_response_tokens``."""

    processor: Any
    max_response_tokens: int | None = 128
    segments_cut: int = field(default=0, init=False)

    def __call__(self, examples: list[dict]) -> dict:
        batch = encode_for_segments(self.processor, examples, self.max_response_tokens)
        if batch["segments_cut"]:
            self.segments_cut += batch["segments_cut"]
            log.warning("%d segment(s) past max_response_tokens=%d were not scored (%d so far)",
                        batch["segments_cut"], self.max_response_tokens, self.segments_cut)
        return batch


# ---------------------------------------------------------------------------------------------
# heads, forward, loss


def make_head(hidden_size: int) -> nn.Linear:
    """FGAIF's head: ``Linear(H, 3)``, default weight init, zero bias."""
    head = nn.Linear(hidden_size, len(CLASSES))
    nn.init.zeros_(head.bias)
    return head


def _multimodal_rope(policy: Policy) -> bool:
    """Whether the policy's model computes its own (3-D, image-aware) rotary positions, as
    Qwen2-VL does; then 1-D ``position_ids`` must not be passed (they would replace them)."""
    model = getattr(policy, "model", None)
    if model is None:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base, "get_rope_index") or hasattr(getattr(base, "model", None), "get_rope_index")


def segment_logits(policy: Policy, heads: nn.ModuleDict, batch: Mapping[str, Any],
                   types: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """One forward of ``policy``; per type the head's logits ``(N, S, 3)`` at ``segment_index``.

    Padding slots (``segment_valid`` False) read position 0: mask them."""
    types = list(heads.keys()) if types is None else list(types)
    inputs = {k: v for k, v in batch.items() if not k.startswith("segment_")}
    if _multimodal_rope(policy):
        inputs.pop("position_ids", None)  # the model derives its 3-D positions from the attention mask
    _, hidden = policy.forward_hidden(inputs)                                   # (N, T, H)
    index = batch["segment_index"].to(hidden.device)                            # (N, S)
    h = torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (N, S, H)
    h = h.to(next(heads.parameters()).dtype)
    return {t: heads[t](h) for t in types}


def fg_loss(logits: Mapping[str, torch.Tensor], labels: torch.Tensor, types: Sequence[str],
            class_weight: torch.Tensor | None = None,
            denominator: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Mean over types of the cross-entropy over each type's labelled segments.

    Args:
        logits: per type ``(N, S, 3)``.
        labels: ``(N, S, K)`` class indices, ``-100`` where ignored; column ``k`` is ``types[k]``.
        types: the label columns' types.
        class_weight: ``(K, 3)`` per-class weights (PyTorch's ``weight=``: the loss is then the
            weighted mean over segments), or None.
        denominator: maps the ``(K,)`` per-type totals the means divide by (labelled segments,
            or their summed class weights) to the ones to use; data parallelism passes
            :func:`mmalign.methods.base.global_denominator` so each rank's summed loss is its
            share of the global batch's mean (the ranks hold different numbers of labelled
            segments). None = this batch's own totals.

    Returns ``(loss, per_type)`` with ``per_type[t] = {"loss", "accuracy", "n"}`` (accuracy and
    n detached; a type without any labelled segment in the batch adds 0 to the loss and has
    NaN loss / accuracy).
    """
    if labels.ndim != 3 or labels.shape[-1] != len(types):
        raise ValueError(f"labels must be (N, S, {len(types)}), got {tuple(labels.shape)}")
    sums, totals, per = [], [], {}
    for k, t in enumerate(types):
        lg = logits[t].float().reshape(-1, len(CLASSES))
        y = labels[..., k].reshape(-1).to(lg.device)
        keep = y != IGNORE_INDEX
        w = (torch.ones(len(CLASSES), device=lg.device) if class_weight is None
             else class_weight[k].to(lg.device, torch.float32))
        # sum_i w_{y_i} ce_i and sum_i w_{y_i}: F.cross_entropy(weight=w)'s mean is their ratio
        ce = F.cross_entropy(lg[keep], y[keep], weight=w, reduction="sum") if keep.any() else lg.sum() * 0.0
        sums.append(ce)
        totals.append(w[y[keep]].sum())
        n = int(keep.sum())
        if n == 0:
            nan = torch.tensor(float("nan"), device=lg.device)
            per[t] = {"loss": nan, "accuracy": nan, "n": torch.tensor(0)}
        else:
            with torch.no_grad():
                acc = (lg[keep].argmax(-1) == y[keep]).float().mean()
            per[t] = {"loss": (ce / totals[-1]).detach(), "accuracy": acc, "n": torch.tensor(n)}
    total = torch.stack(totals)                                                   # (K,)
    # Called for every type even without labelled segments: under data parallelism it is a
    # collective that every rank must join.
    denom = total.clamp(min=1e-12) if denominator is None else denominator(total)
    loss = sum(s / d.clamp(min=1e-12) for s, d in zip(sums, denom))
    return loss / len(types), per


def balanced_class_weights(counts: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """``(K, 3)`` class counts -> scikit-learn's "balanced" weights ``n_k / (3 * n_{k,c})``.

    A class that never occurs gets weight 0 (it is never a target, so its weight is unused)."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    if c.ndim != 2 or c.shape[1] != len(CLASSES) or (c < 0).any():
        raise ValueError(f"counts must be (K, {len(CLASSES)}) non-negative, got {tuple(c.shape)}")
    total = c.sum(dim=1, keepdim=True)
    w = torch.where(c > 0, total / (len(CLASSES) * c.clamp(min=1)), torch.zeros_like(c))
    return w.float()


def rewards_from_probs(probs: torch.Tensor, mode: Literal["label", "expected"] = "label") -> torch.Tensor:
    """Class probabilities ``(..., 3)`` -> segment rewards ``(...)``.

    ``"label"``: the :data:`VALUES` entry of the most probable class (FGAIF's discrete reward);
    ``"expected"``: ``sum_c p_c * VALUES[c]``."""
    if probs.shape[-1] != len(CLASSES):
        raise ValueError(f"probabilities must end in {len(CLASSES)} classes, got {tuple(probs.shape)}")
    values = _value_vector(probs.device)
    if mode == "label":
        return values[probs.argmax(-1)]
    if mode == "expected":
        return probs.float() @ values
    raise ValueError(f"mode must be 'label' or 'expected', not {mode!r}")


def _confusion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(3, 3)`` counts, rows = label, columns = prediction, over labelled segments."""
    y = labels.reshape(-1).to(logits.device)
    keep = y != IGNORE_INDEX
    pred = logits.reshape(-1, len(CLASSES)).argmax(-1)[keep]
    k = len(CLASSES)
    return torch.bincount(y[keep] * k + pred, minlength=k * k).reshape(k, k)


def hallucinated_prf(confusion: torch.Tensor) -> dict[str, float]:
    """Precision, recall and F1 of "hallucinated" (class 0) from a ``(3, 3)`` confusion matrix
    (rows = label), with accuracy; 0/0 is NaN (undefined)."""
    c = confusion.double()
    tp, fp, fn = c[0, 0], c[1:, 0].sum(), c[0, 1:].sum()

    def div(a, b):
        return float(a / b) if float(b) else float("nan")

    return {"precision": div(tp, tp + fp), "recall": div(tp, tp + fn), "f1": div(2 * tp, 2 * tp + fp + fn),
            "accuracy": div(c.diag().sum(), c.sum()), "support": float(c[0].sum())}


# ---------------------------------------------------------------------------------------------
# the LightningModule


class FGRewardModule(PolicyModule):
    """Train FGAIF fine-grained reward model(s) on per-segment labels (module docstring).

    Args:
        types: hallucination types, a subset of object / attribute / relation. One entry = one of
            FGAIF's separate reward models (the default, ``make fg-rm`` trains three); several =
            one shared backbone with one 3-class head per type (loss = mean over types).
        class_weights: "none" (FGAIF: plain cross-entropy) or "balanced": weigh each class by its
            inverse frequency in the training labels, ``n / (3 * n_c)`` per type, because most
            labels are "n/a" (relation: ~99 % in the demo world) and an unweighted head learns
            to predict the majority class.
        head_lr: learning rate of the heads, which start from scratch; None = ``lr``.

    The other options are :class:`PolicyModule`'s (lr, weight_decay, warmup_steps, min_lr_ratio,
    export_dir, merge_lora); ``export_dir`` also receives the heads and ``fg_reward_config.json``.
    Logged: ``{train,val}/loss`` and per type ``{train,val}/<type>/loss`` and ``/accuracy``; at
    the end of each validation, per type ``val/<type>/precision``, ``/recall``, ``/f1`` of
    "hallucinated" from the epoch's confusion counts (not batch means).
    """

    def __init__(self, policy: Policy, types: list[str] = ["object"], class_weights: ClassWeights = "none",  # noqa: B006
                 head_lr: float | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 20, min_lr_ratio: float = 0.1,
                 export_dir: str | None = None, merge_lora: bool = True):
        types = check_types(types)
        if class_weights not in ("none", "balanced"):
            raise ValueError(f"class_weights must be 'none' or 'balanced', not {class_weights!r}")
        if head_lr is not None and not (math.isfinite(head_lr) and head_lr > 0):
            raise ValueError(f"head_lr must be a finite number > 0, got {head_lr}")
        super().__init__(policy, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, export_dir=export_dir, merge_lora=merge_lora)
        hidden = getattr(policy, "hidden_size", None)
        if not isinstance(hidden, int):
            raise TypeError(f"{type(policy).__name__} has no integer `hidden_size`: the heads need the width of the "
                            "hidden states that forward_hidden returns")
        self.types = types
        self.heads = nn.ModuleDict({t: make_head(hidden) for t in types})
        # (K, 3); ones = unweighted. Set from the training labels in setup() for "balanced".
        self.register_buffer("class_weight", torch.ones(len(types), len(CLASSES)))
        self._weights_from_data = False
        self._val_confusion: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return next(iter(self.heads.values())).in_features

    def set_class_weights(self, weights: torch.Tensor) -> None:
        """Set the ``(K, 3)`` class weights (columns in :data:`CLASSES` order, rows in ``types``)."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != self.class_weight.shape or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"class weights must be finite, >= 0 and {tuple(self.class_weight.shape)}, got {w}")
        self.class_weight.copy_(w.to(self.class_weight.device))
        self._weights_from_data = True

    def setup(self, stage: str) -> None:
        super().setup(stage)   # refuses an export the strategy cannot give
        if stage != "fit" or self.hparams.class_weights != "balanced" or self._weights_from_data:
            return
        counts = getattr(self.trainer.datamodule, "train_class_counts", None) if self.trainer else None
        if counts is None:
            raise ValueError("class_weights='balanced' needs the training labels' class counts: use "
                             "FGRewardDataModule (train_class_counts), or call set_class_weights()")
        self.set_class_weights(balanced_class_weights(counts))
        log.info("balanced class weights (%s; columns %s): %s", self.types, CLASSES, self.class_weight.tolist())

    # -- optimisation --------------------------------------------------------------------------

    def extra_parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        # the heads start from scratch: their own learning rate
        hp = self.hparams
        return [(list(self.heads.parameters()), hp.head_lr if hp.head_lr is not None else hp.lr)]

    # -- steps ---------------------------------------------------------------------------------

    def _weights(self) -> torch.Tensor | None:
        return self.class_weight if self.hparams.class_weights == "balanced" else None

    def _step(self, batch: dict, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = segment_logits(self.policy, self.heads, batch, self.types)
        labels = batch["segment_labels"]
        # global_denominator: each type's mean is over the labelled segments of the global batch,
        # not of this rank's (the ranks hold different numbers of them)
        loss, per = fg_loss(logits, labels, self.types, self._weights(), denominator=global_denominator)
        n_rows = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n_rows, sync_dist=True)
        for t, m in per.items():
            n = int(m["n"])
            if n:
                self.log(f"{stage}/{t}/loss", m["loss"], batch_size=n)
                self.log(f"{stage}/{t}/accuracy", m["accuracy"], batch_size=n, prog_bar=len(self.types) == 1)
        return loss, logits

    def training_step(self, batch: dict, batch_idx: int):
        return self._step(batch, "train")[0]

    def on_validation_epoch_start(self) -> None:
        self._val_confusion = torch.zeros(len(self.types), len(CLASSES), len(CLASSES), dtype=torch.long)

    def validation_step(self, batch: dict, batch_idx: int):
        loss, logits = self._step(batch, "val")
        with torch.no_grad():
            for k, t in enumerate(self.types):
                self._val_confusion[k] += _confusion(logits[t], batch["segment_labels"][..., k]).cpu()
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._val_confusion is None:
            return
        for k, t in enumerate(self.types):
            m = hallucinated_prf(self._val_confusion[k])
            for name in ("precision", "recall", "f1"):
                if math.isfinite(m[name]):
                    self.log(f"val/{t}/{name}", m[name])
            self.log(f"val/{t}/support_hallucinated", m["support"])

    # -- export --------------------------------------------------------------------------------

    def fg_reward_config(self) -> dict:
        """What ``fg_reward_config.json`` holds."""
        return {"format_version": FORMAT_VERSION, "types": list(self.types), "classes": list(CLASSES),
                "values": dict(VALUES), "hidden_size": self.hidden_size,
                "policy_class": f"{type(self.policy).__module__}.{type(self.policy).__qualname__}",
                "class_weights": self.hparams.class_weights, "class_weight": self.class_weight.tolist(),
                "score_position": SCORE_POSITION}

    def export(self, out_dir: str) -> None:
        export_fg_reward_model(self.policy, self.heads, self.fg_reward_config(), out_dir, self.hparams.merge_lora)


def export_fg_reward_model(policy: Policy, heads: nn.ModuleDict, config: dict, out_dir: str,
                           merge_lora: bool = True) -> None:
    """Write the policy (Hugging Face format), ``fg_reward_head.safetensors`` and
    ``fg_reward_config.json`` to ``out_dir`` as one stage output (manifest last, swapped in whole)."""
    export_policy(policy, out_dir, merge_lora, heads=heads, head_file=HEAD_FILE, config_file=CONFIG_FILE,
                  config=config, what="fg_reward")


# ---------------------------------------------------------------------------------------------
# data


def check_fg_record(rec: AnnotatedResponse, types: Sequence[str]) -> tuple[list[Segment], list[list[int]]]:
    """The record's segments and, per segment, the class index of each of ``types``.

    ``annotations.segments`` must be the feedback stage's list of ``{index, start, end, text,
    labels}`` and tile the response exactly as :func:`split_segments` cuts it; anything else is a
    :class:`RecordError` naming the record's ``file:line``."""
    where = f"{rec.meta.get('source', '<record>')} id={rec.id}"
    segs = rec.annotations.get("segments")
    if not isinstance(segs, list) or not segs:
        raise RecordError(f"{where}: no annotations.segments (a non-empty list); is this the feedback stage's "
                          "feedback.jsonl?")
    expected = split_segments(rec.response)
    if len(segs) != len(expected):
        raise RecordError(f"{where}: {len(segs)} annotated segment(s) but split_segments(response) gives "
                          f"{len(expected)}: the segments must tile the response as mmalign.segments cuts it")
    labels = []
    for k, (s, e) in enumerate(zip(segs, expected)):
        if not isinstance(s, dict):
            raise RecordError(f"{where}: segment {k} is a {type(s).__name__}, not an object")
        got = (s.get("index"), s.get("start"), s.get("end"), s.get("text"))
        if got != (e.index, e.start, e.end, e.text):
            raise RecordError(f"{where}: segment {k} is (index, start, end, text) = {got!r}, but the response's "
                              f"segment {k} is {(e.index, e.start, e.end, e.text)!r}")
        lab = s.get("labels")
        if not isinstance(lab, dict):
            raise RecordError(f"{where}: segment {k} has no 'labels' object")
        row = []
        for t in types:
            if lab.get(t) not in CLASSES:
                raise RecordError(f"{where}: segment {k}: {t} label {lab.get(t)!r} is not one of {CLASSES}")
            row.append(CLASSES.index(lab[t]))
        labels.append(row)
    return expected, labels


class FGRewardDataset(Dataset):
    """Annotated responses with their per-segment class indices, as :func:`encode_for_segments`
    examples; images are decoded lazily, with the record's ``file:line`` in any error."""

    def __init__(self, records: list[AnnotatedResponse], segments: list[list[Segment]], labels: list[list[list[int]]]):
        self.records, self.segments, self.labels = records, segments, labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        where = r.meta.get("source", r.id)
        return {"images": [load_image(p, where) for p in r.images], "prompt": r.prompt, "response": r.response,
                "segments": self.segments[i], "labels": self.labels[i], "meta": {"id": r.id, "source": where}}


class FGRewardDataModule(Loaders, L.LightningDataModule):
    """Per-segment labels for fine-grained reward models, from the feedback stage's
    ``feedback.jsonl`` (annotated-response records).

    Args:
        train_file: feedback JSONL to train on.
        val_file: optional held-out feedback JSONL (e.g. the oracle's labels of val-split samples).
        data_root: folder image paths are relative to, and must stay inside (default: each
            file's folder).
        limit: use at most this many training responses (0 = all).
        val_limit: use at most this many validation responses (0 = all).
        batch_size: responses per step.
        num_workers: DataLoader worker processes (0 is fastest on 2 cores with 64 px images).
        max_response_tokens: longest response in tokens (eos included); segments past the cut are
            not scored (a warning with a count).
        check_images: "exists", "decode" (find corrupt images up front) or "none".
        on_error: "raise" at the first malformed record (bad JSON or schema, missing images,
            segments that do not tile the response or that share their last token), or "skip"
            it (counted in ``skipped``, with a warning; read errors also go to
            ``<file>.rejects.jsonl``). Either way this happens in ``setup``, never mid-training.

    The types come from the trainer's :class:`FGRewardModule` (``trainer.lightning_module``), with
    its processor, so data and model never disagree; outside a trainer call :meth:`configure`.
    A training file in which a type has no segment labelled "hallucinated" is an error: the head
    would learn a constant.
    """

    def __init__(self, train_file: str, val_file: str | None = None, data_root: str | None = None, limit: int = 0,
                 val_limit: int = 0, batch_size: int = 8, num_workers: int = 0, max_response_tokens: int = 128,
                 check_images: Literal["none", "exists", "decode"] = "exists",
                 on_error: Literal["raise", "skip"] = "raise"):
        super().__init__()
        self.save_hyperparameters()
        self.processor: Any = None
        self.types: list[str] | None = None
        self.collator: FGRewardCollator | None = None
        self.train_set: FGRewardDataset | None = None
        self.val_set: FGRewardDataset | None = None
        #: ``(K, 3)`` training label counts (rows = types, columns = CLASSES), set by setup().
        self.train_class_counts: torch.Tensor | None = None
        self.skipped: dict[str, int] = {}

    def configure(self, processor: Any, types: Sequence[str]) -> None:
        """Set what normally comes from the trainer's FGRewardModule."""
        self.processor, self.types = processor, check_types(types)

    def _read(self, path: str, limit: int, train: bool) -> FGRewardDataset:
        hp = self.hparams
        rep = ReadReport(path)
        recs = read_records(path, "annotated", data_root=hp.data_root, check_images=hp.check_images,
                            on_error=hp.on_error, report=rep)
        skipped = rep.rejected
        if rep.rejected:
            log.warning("%s: %d malformed record(s) skipped, see %s", path, rep.rejected, rep.rejects_path)
        if limit:
            recs = recs[:limit]
        kept, segments, labels = [], [], []
        tok = self.processor.tokenizer
        for r in recs:
            try:
                s, lab = check_fg_record(r, self.types)
                # every segment must have a token of its own: found here, not mid-training
                where = f"{r.meta.get('source', '<record>')} id={r.id}"
                _segment_ends(_tokenize_response(tok, r.response, where)[1], s, where)
            except RecordError as e:
                if hp.on_error == "raise":
                    raise
                skipped += 1
                log.warning("skipped: %s", e)
                continue
            kept.append(r)
            segments.append(s)
            labels.append(lab)
        self.skipped[path] = skipped
        if not kept:
            raise ValueError(f"{path}: no usable annotated responses")
        if train:
            counts = torch.zeros(len(self.types), len(CLASSES), dtype=torch.long)
            for lab in labels:
                counts += torch.nn.functional.one_hot(torch.tensor(lab), len(CLASSES)).sum(0)
            for k, t in enumerate(self.types):
                if counts[k, 0] == 0:
                    sources = sorted({str(r.annotations.get("source", "unknown")) for r in kept})
                    raise ValueError(f"{path}: no segment is labelled hallucinated for {t} (source "
                                     f"{', '.join(sources)}): a reward model trained on it would learn a constant")
            self.train_class_counts = counts
            log.info("%s: %d responses; label counts per type (%s): %s", path, len(kept), CLASSES,
                     {t: counts[k].tolist() for k, t in enumerate(self.types)})
        return FGRewardDataset(kept, segments, labels)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.processor is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not isinstance(module, FGRewardModule):
                raise ValueError("FGRewardDataModule needs an FGRewardModule in its trainer (for the processor and "
                                 "the types), or a call to configure()")
            self.configure(module.policy.processor, module.types)
        if self.collator is None:
            self.collator = FGRewardCollator(self.processor, hp.max_response_tokens)
        if self.train_set is None:
            self.train_set = self._read(hp.train_file, hp.limit, train=True)
        if self.val_set is None and hp.val_file:
            self.val_set = self._read(hp.val_file, hp.val_limit, train=False)



# ---------------------------------------------------------------------------------------------
# inference


@dataclass
class FGItem:
    """One response to score.

    Attributes:
        images: image paths or decoded PIL images, one per image part of ``prompt``.
        prompt: the prompt messages (TRL format), or the question as a string (then one image
            part per image goes first).
        response: the text; its segments are :func:`split_segments` of it.
        id: for error messages.
    """

    images: list[Any]
    prompt: list[dict] | str
    response: str
    id: str = ""

    def messages(self) -> list[dict]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": [{"type": "image"}] * len(self.images)
                     + [{"type": "text", "text": self.prompt}]}]
        return self.prompt


class FGRewardModel(nn.Module):
    """A trained fine-grained reward model: the policy and one 3-class head per type.

    Attributes:
        policy: the vision-language model (any :class:`Policy` with ``forward_hidden``).
        heads: ``nn.ModuleDict`` type -> ``Linear(H, 3)``.
        types: the types it scores (one for FGAIF's separate models, several for a shared one).
        config: ``fg_reward_config.json`` as read.
    """

    def __init__(self, policy: Policy, heads: nn.ModuleDict, types: Sequence[str] | None = None,
                 config: dict | None = None):
        super().__init__()
        self.policy, self.heads = policy, heads
        self.types = check_types(list(heads.keys()) if types is None else types)
        missing = [t for t in self.types if t not in heads]
        if missing:
            raise ValueError(f"no head for type(s) {missing}")
        self.config = dict(config or {})

    @property
    def processor(self) -> Any:
        return self.policy.processor

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device

    def forward(self, batch: Mapping[str, Any], types: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Per type the logits ``(N, S, 3)`` of an :func:`encode_for_segments` batch."""
        return segment_logits(self.policy, self.heads, batch, self.types if types is None else types)

    @staticmethod
    def _images(it: FGItem) -> list[Image.Image]:
        return [im if isinstance(im, Image.Image) else load_image(im, it.id) for im in it.images]

    @torch.no_grad()
    def segment_probs(self, items: Sequence[FGItem], batch_size: int = 16, types: Sequence[str] | None = None,
                      progress: bool = False) -> list[dict[str, torch.Tensor]]:
        """Per item and type the class probabilities ``(S_i, 3)`` (columns :data:`CLASSES`, float32,
        on the CPU) of the item's segments, in input order.

        Items are batched by response length (less padding) with one forward per batch for all
        ``types`` (default: all of the model's); an empty response gives ``(0, 3)``. Non-finite
        probabilities are an error naming the items."""
        types = self.types if types is None else check_types(types)
        missing = [t for t in types if t not in self.heads]
        if missing:
            raise ValueError(f"this model has no head for {missing}; it scores {self.types}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        segs = [split_segments(it.response) for it in items]
        out: list[dict[str, torch.Tensor]] = [{t: torch.zeros(0, len(CLASSES)) for t in types} for _ in items]
        order = sorted((i for i in range(len(items)) if segs[i]), key=lambda i: len(items[i].response))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        try:
            for idx in tqdm(batches, desc="fg-rm", unit="batch", disable=not progress, file=sys.stderr,
                            dynamic_ncols=True):
                exs = [{"images": self._images(items[i]), "prompt": items[i].messages(), "response": items[i].response,
                        "segments": segs[i], "meta": {"id": items[i].id}} for i in idx]
                batch = to_device(encode_for_segments(self.processor, exs, strict=False), self.device)
                logits = self(batch, types)
                for t in types:
                    probs = logits[t].float().softmax(-1).cpu()                     # (B, S, 3)
                    for row, i in enumerate(idx):
                        out[i][t] = probs[row, :len(segs[i])].clone()
        finally:
            self.train(was_training)
        bad = [items[i].id or str(i) for i in order if any(not torch.isfinite(p).all() for p in out[i].values())]
        if bad:
            raise ValueError(f"the fine-grained reward model gave non-finite probabilities for {len(bad)} item(s), "
                             f"e.g. {bad[:5]}; refusing to pass them on")
        return out

    def segment_rewards(self, items: Sequence[FGItem], mode: Literal["label", "expected"] = "label",
                        batch_size: int = 16, types: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """Per item and type the segment rewards ``(S_i,)``: ``"label"`` = :data:`VALUES` of the
        most probable class (FGAIF), ``"expected"`` = ``sum_c p_c * VALUES[c]``."""
        if mode not in ("label", "expected"):
            raise ValueError(f"mode must be 'label' or 'expected', not {mode!r}")
        return [{t: rewards_from_probs(p, mode) for t, p in d.items()}
                for d in self.segment_probs(items, batch_size, types)]


def load_fg_reward_model(path: str | Path, device: str | torch.device = "cpu", policy_class: str | None = None,
                         **policy_kwargs: Any) -> FGRewardModel:
    """Load an exported fine-grained reward model (``FGRewardModule``'s ``export_dir``) in eval
    mode on ``device``. The policy is built by class path (``policy_class``, default: the one in
    ``fg_reward_config.json``) as ``cls(path=path, **policy_kwargs)``. The format version, the
    hidden size and every head's shape are checked; errors name the file."""
    from safetensors.torch import load_file

    from mmalign.components import load_component

    path = Path(path)
    cfg_file, head_file = path / CONFIG_FILE, path / HEAD_FILE
    for f in (cfg_file, head_file):
        if not f.is_file():
            raise FileNotFoundError(f"{path}: no {f.name}; is this a fine-grained reward model export "
                                    "(FGRewardModule export_dir)?")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format_version") != FORMAT_VERSION:
        got = cfg.get("format_version") if isinstance(cfg, dict) else cfg
        raise ValueError(f"{cfg_file}: format_version {got!r}, expected {FORMAT_VERSION}")
    for key in ("types", "classes", "hidden_size", "policy_class"):
        if key not in cfg:
            raise ValueError(f"{cfg_file}: missing {key!r}")
    if list(cfg["classes"]) != list(CLASSES):
        raise ValueError(f"{cfg_file}: classes {cfg['classes']} differ from this code's {list(CLASSES)}")
    try:
        types = check_types(cfg["types"])
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    hidden = int(cfg["hidden_size"])
    state = load_file(str(head_file))
    want = {f"{t}.{p}": shape for t in types for p, shape in (("weight", (len(CLASSES), hidden)),
                                                              ("bias", (len(CLASSES),)))}
    if set(state) != set(want):
        raise ValueError(f"{head_file}: tensors {sorted(state)} do not match the heads of {types} ({sorted(want)})")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{head_file}: {k} has shape {tuple(state[k].shape)}, expected {shape}")
    policy = load_component(policy_class or cfg["policy_class"], path=str(path), **policy_kwargs)
    got = getattr(policy, "hidden_size", hidden)
    if got != hidden:
        raise ValueError(f"{cfg_file}: the heads read width {hidden} but the model's hidden size is {got}")
    heads = nn.ModuleDict({t: nn.Linear(hidden, len(CLASSES)) for t in types})
    heads.load_state_dict(state)
    return FGRewardModel(policy, heads, types, cfg).eval().to(device)


def _by_model(models: Mapping[str, FGRewardModel]) -> list[tuple[FGRewardModel, list[str]]]:
    groups: dict[int, tuple[FGRewardModel, list[str]]] = {}
    for t, m in models.items():
        check_types([t])
        groups.setdefault(id(m), (m, []))[1].append(t)
    return list(groups.values())


def fg_segment_probs(models: Mapping[str, FGRewardModel], items: Sequence[FGItem], batch_size: int = 16,
                     progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """:meth:`FGRewardModel.segment_probs` for ``type -> model`` (FGAIF's three models, or one
    shared model under several types): one pass over the items per distinct model."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in items]
    for model, types in _by_model(models):
        for d, p in zip(out, model.segment_probs(items, batch_size, types, progress=progress)):
            d.update(p)
    return out


def fg_segment_rewards(models: Mapping[str, FGRewardModel], items: Sequence[FGItem],
                       mode: Literal["label", "expected"] = "label", batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Per item and type the segment rewards ``(S_i,)`` from ``type -> model`` (see
    :func:`rewards_from_probs`)."""
    if mode not in ("label", "expected"):
        raise ValueError(f"mode must be 'label' or 'expected', not {mode!r}")
    return [{t: rewards_from_probs(p, mode) for t, p in d.items()} for d in fg_segment_probs(models, items, batch_size)]
