"""FGAIF's fine-grained reward models at use time: the head, the rows they read, loading, scoring.

A fine-grained reward model is the vision-language model with one 3-class head per hallucination
type (:data:`mmalign.rewards.CLASSES`) that reads the last layer's hidden state at the *last
token of every sub-sentence segment* of a response (FGAIF, Jing & Du 2024, arXiv:2404.05046; the
training objective and what was checked in the released code are in
:mod:`mmalign.methods.fg_reward`).

The rows it reads (:func:`encode_segments`, the same for training and scoring, so the two can
never disagree) are the layout of a PPO rollout: the prompt rendered by
:class:`VisionChatCollator` in generate mode (left-padded, images -> ``pixel_values`` ...), then
the response tokenised on its own (fast tokenizer, offsets) plus the end-of-sequence token,
right-padded. :func:`segment_logits` scores them through :meth:`Policy.response_forward`, the
one forward over prompt + response that the policy and the value model use too (positions follow
the attention mask; multimodal-RoPE families compute their own there).

Export format (written by ``FGRewardModule``'s ``export.dir``): the policy in Hugging Face format,
``fg_reward_head.safetensors`` (one ``<type>.weight`` / ``<type>.bias`` per head) and
``fg_reward_config.json`` (types, classes, values, hidden size, policy class, format version, and
the ``segmentation`` its training labels were cut with: :mod:`mmalign.segments`; an export without
it predates the key and used ``"fine"``). A model scores the segments of the segmentation it was
trained on (:attr:`FGRewardModel.segmentation`); a consumer that cuts another way is refused
(:func:`mmalign.segments.check_same_segmentation`).
:func:`load_fg_reward_model` reads it back; :meth:`FGRewardModel.segment_probs` /
:meth:`FGRewardModel.segment_rewards` score responses (what the PPO stage calls every rollout),
and :func:`fg_segment_probs` / :func:`fg_segment_rewards` do it for a set of models, one forward
per batch per distinct model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from mmalign.collators import VisionChatCollator, to_device
from mmalign.ops import IGNORE_INDEX
from mmalign.policy import Policy
from mmalign.records import AnnotatedResponse, RecordError, load_image
from mmalign.records import where as record_where
from mmalign.rewards import (
    CLASSES,
    RewardForm,
    SegmentItem,
    check_types,
    rewards_from_probs,
)
from mmalign.segments import (
    DEFAULT_SEGMENTATION,
    Segment,
    char_to_token_end,
    check_same_segmentation,
    check_segmentation,
    recorded_segmentation,
    split_segments,
)

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "HEAD_FILE",
    "SCORE_POSITION",
    "FGRewardModel",
    "check_fg_record",
    "confusion",
    "encode_segments",
    "fg_segment_probs",
    "fg_segment_rewards",
    "hallucinated_prf",
    "load_fg_reward_model",
    "make_head",
    "segment_logits",
    "segment_token_ends",
]

HEAD_FILE = "fg_reward_head.safetensors"
CONFIG_FILE = "fg_reward_config.json"
FORMAT_VERSION = 1
#: The score position, as recorded in the export.
SCORE_POSITION = ("last token of each segment (mmalign.segments.split_segments with the config's segmentation) in the "
                  "response's own tokenisation")


# ---------------------------------------------------------------------------------------------
# the rows a reward model reads


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


def segment_token_ends(tokenizer: Any, text: str, segments: Sequence[Any], where: str,
                       strict: bool = True) -> tuple[list[int], list[int]]:
    """``text`` tokenised on its own (``add_special_tokens=False``) and the index of each
    segment's last token in it; the errors of :func:`_segment_ends`, naming ``where``."""
    ids, offsets = _tokenize_response(tokenizer, text, where)
    return ids, _segment_ends(offsets, segments, where, strict)


def encode_segments(processor: Any, examples: Sequence[Mapping[str, Any]],
                    max_response_tokens: int | None = None, strict: bool = True,
                    segmentation: str = DEFAULT_SEGMENTATION) -> dict[str, Any]:
    """Encode (prompt, response) rows and the token position of every response segment.

    Each example is ``{"images": [PIL], "prompt": [messages], "response": str, "meta": {...}}``
    with optionally ``"segments"`` (``Segment`` s or dicts with ``start`` / ``end``; default
    :func:`split_segments` of the response with ``segmentation``) and ``"labels"`` (per segment, a list of ``K`` class
    indices into :data:`CLASSES`, one per reward type; training).

    Returns ``prompt``: the prompts as :class:`VisionChatCollator` renders them in generate mode
    (chat template with the generation prompt, images expanded, **left**-padded), ready for
    :meth:`Policy.response_forward`; ``response_ids`` / ``response_mask`` ``(N, L)``: each
    response tokenised on its own (``add_special_tokens=False``) plus the tokenizer's eos id,
    **right**-padded (a response longer than ``max_response_tokens``, eos included, None = no
    limit, is cut there; its segments that end past the cut become invalid and are counted in
    ``segments_cut``); ``segment_index`` ``(N, S)`` long (each segment's last token in the
    response row; 0 in padding slots), ``segment_valid`` ``(N, S)`` bool, with labels
    ``segment_labels`` ``(N, S, K)`` long (``-100`` where ignored), ``segments_cut`` (int) and
    ``meta``. An empty response, or (``strict``, training data) a segment that no token of its
    own ends, is a :class:`RecordError` naming the record (``meta['source']`` / ``id``);
    ``strict=False`` reads such a segment at the previous segment's end token.
    """
    if not examples:
        raise ValueError("encode_segments() needs at least one example")
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
        where = record_where(ex.get("meta"), default="<example>")
        text = ex["response"]
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{where}: empty response; it has no segment to score")
        segs = ex.get("segments")
        if segs is None:
            segs = split_segments(text, segmentation)
        if not segs:
            raise RecordError(f"{where}: the response has no segment")
        ids, ends = segment_token_ends(tok, text, segs, where, strict)
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
    prompt = gen([{"images": ex.get("images") or [], "messages": ex["prompt"], "meta": dict(ex.get("meta") or {})}
                  for ex in examples])
    n = len(examples)
    r_len = max(len(r) for r in rows)
    r_ids = torch.full((n, r_len), pad, dtype=prompt["input_ids"].dtype)
    r_mask = torch.zeros((n, r_len), dtype=prompt["attention_mask"].dtype)
    for i, r in enumerate(rows):
        r_ids[i, :len(r)] = torch.tensor(r, dtype=r_ids.dtype)
        r_mask[i, :len(r)] = 1

    s_max = max(len(e) for e in seg_ends)
    index = torch.zeros((n, s_max), dtype=torch.long)
    valid = torch.zeros((n, s_max), dtype=torch.bool)
    for i, (ends, ok) in enumerate(zip(seg_ends, seg_ok)):
        for k, (e, good) in enumerate(zip(ends, ok)):
            if good:
                index[i, k] = e
                valid[i, k] = True
    batch: dict[str, Any] = {"prompt": prompt, "response_ids": r_ids, "response_mask": r_mask,
                             "segment_index": index, "segment_valid": valid, "segments_cut": cut,
                             "meta": prompt["meta"]}
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
                        at = record_where(examples[i].get("meta"), default="<example>")
                        raise RecordError(f"{at}: segment {k}: class index out of range in {row}")
                    lab_t[i, k] = torch.tensor(row, dtype=torch.long)
        batch["segment_labels"] = lab_t
    return batch


def check_fg_record(rec: AnnotatedResponse, types: Sequence[str],
                    segmentation: str = DEFAULT_SEGMENTATION) -> tuple[list[Segment], list[list[int]]]:
    """The record's segments and, per segment, the class index of each of ``types``.

    ``annotations.segments`` must be the feedback stage's list of ``{index, start, end, text,
    labels}``, written with ``segmentation`` (``annotations.segmentation``; a record without it
    predates the key and used ``"fine"``), and tile the response exactly as
    :func:`split_segments` cuts it with ``segmentation``; anything else is a :class:`RecordError`
    naming the record's ``file:line``."""
    where = record_where(rec.meta, rec.id)
    segmentation = check_segmentation(segmentation)
    segs = rec.annotations.get("segments")
    if not isinstance(segs, list) or not segs:
        raise RecordError(f"{where}: no annotations.segments (a non-empty list); is this the feedback stage's "
                          "feedback.jsonl?")
    try:
        got_seg = recorded_segmentation(rec.annotations)
        check_same_segmentation(segmentation, got_seg, f"{where}: the feedback labels")
    except ValueError as e:
        raise RecordError(str(e) + " (the feedback stage's --segmentation)") from None
    expected = split_segments(rec.response, segmentation)
    if len(segs) != len(expected):
        raise RecordError(f"{where}: {len(segs)} annotated segment(s) but split_segments(response, {segmentation!r}) "
                          f"gives {len(expected)}: the segments must tile the response as mmalign.segments cuts it")
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



# ---------------------------------------------------------------------------------------------
# heads and the forward


def make_head(hidden_size: int) -> nn.Linear:
    """FGAIF's head: ``Linear(H, 3)``, default weight init, zero bias."""
    head = nn.Linear(hidden_size, len(CLASSES))
    nn.init.zeros_(head.bias)
    return head


def segment_logits(policy: Policy, heads: nn.ModuleDict, batch: Mapping[str, Any],
                   types: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """One forward of ``policy`` over an :func:`encode_segments` batch (prompt + response, through
    :meth:`Policy.response_forward`); per type the head's logits ``(N, S, 3)`` at
    ``segment_index``. Padding slots (``segment_valid`` False) read position 0: mask them."""
    types = list(heads.keys()) if types is None else list(types)
    _, hidden = policy.response_forward(batch["prompt"], batch["response_ids"], batch["response_mask"],
                                        hidden=True)                            # (N, L, H)
    index = batch["segment_index"].to(hidden.device)                            # (N, S)
    h = torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (N, S, H)
    h = h.to(next(heads.parameters()).dtype)
    return {t: heads[t](h) for t in types}


def confusion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
# inference


class FGRewardModel(nn.Module):
    """A trained fine-grained reward model: the policy and one 3-class head per type.

    Attributes:
        policy: the vision-language model (any :class:`Policy` with ``response_forward``).
        heads: ``nn.ModuleDict`` type -> ``Linear(H, 3)``.
        types: the types it scores (one for FGAIF's separate models, several for a shared one).
        config: ``fg_reward_config.json`` as read.
        segmentation: how it cuts responses into the segments it scores: the argument if given,
            else the config's ``segmentation`` (``"fine"`` for an export config that predates the
            key), else (no config: a model built in code) :data:`mmalign.segments.DEFAULT_SEGMENTATION`.
    """

    def __init__(self, policy: Policy, heads: nn.ModuleDict, types: Sequence[str] | None = None,
                 config: dict | None = None, segmentation: str | None = None):
        super().__init__()
        self.policy, self.heads = policy, heads
        self.types = check_types(list(heads.keys()) if types is None else types)
        missing = [t for t in self.types if t not in heads]
        if missing:
            raise ValueError(f"no head for type(s) {missing}")
        self.config = dict(config or {})
        if segmentation is not None:
            self.segmentation = check_segmentation(segmentation)
        elif config is not None:
            self.segmentation = recorded_segmentation(self.config)
        else:
            self.segmentation = DEFAULT_SEGMENTATION

    @property
    def processor(self) -> Any:
        return self.policy.processor

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device

    def forward(self, batch: Mapping[str, Any], types: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Per type the logits ``(N, S, 3)`` of an :func:`encode_segments` batch."""
        return segment_logits(self.policy, self.heads, batch, self.types if types is None else types)

    @staticmethod
    def _images(it: SegmentItem) -> list[Image.Image]:
        return [im if isinstance(im, Image.Image) else load_image(im, it.id) for im in it.images]

    @torch.no_grad()
    def segment_probs(self, items: Sequence[SegmentItem], batch_size: int = 16, types: Sequence[str] | None = None,
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
        segs = [split_segments(it.response, self.segmentation) for it in items]
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
                batch = to_device(encode_segments(self.processor, exs, strict=False, segmentation=self.segmentation),
                                  self.device)
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

    def segment_rewards(self, items: Sequence[SegmentItem], mode: RewardForm = "label",
                        batch_size: int = 16, types: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """Per item and type the segment rewards ``(S_i,)``: ``"label"`` = :data:`mmalign.rewards.VALUES` of the
        most probable class (FGAIF), ``"expected"`` = ``sum_c p_c * VALUES[c]``."""
        if mode not in ("label", "expected"):
            raise ValueError(f"mode must be 'label' or 'expected', not {mode!r}")
        return [{t: rewards_from_probs(p, mode) for t, p in d.items()}
                for d in self.segment_probs(items, batch_size, types)]


def load_fg_reward_model(path: str | Path, device: str | torch.device = "cpu", policy_class: str | None = None,
                         **policy_kwargs: Any) -> FGRewardModel:
    """Load an exported fine-grained reward model (``FGRewardModule``'s ``export.dir``) in eval
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
                                    "(FGRewardModule export.dir)?")
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
        recorded_segmentation(cfg)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None
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
    # one response's types must be scored over the same segments (PPO sums them per segment)
    segs = {t: getattr(m, "segmentation", DEFAULT_SEGMENTATION) for t, m in models.items()}
    if len(set(segs.values())) > 1:
        raise ValueError(f"the fine-grained reward models were trained on different segmentations {segs}; "
                         "retrain them on feedback cut one way (mmalign.segments)")
    return list(groups.values())


def fg_segment_probs(models: Mapping[str, FGRewardModel], items: Sequence[SegmentItem], batch_size: int = 16,
                     progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """:meth:`FGRewardModel.segment_probs` for ``type -> model`` (FGAIF's three models, or one
    shared model under several types): one pass over the items per distinct model."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in items]
    for model, types in _by_model(models):
        for d, p in zip(out, model.segment_probs(items, batch_size, types, progress=progress)):
            d.update(p)
    return out


def fg_segment_rewards(models: Mapping[str, FGRewardModel], items: Sequence[SegmentItem],
                       mode: RewardForm = "label", batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Per item and type the segment rewards ``(S_i,)`` from ``type -> model`` (see
    :func:`rewards_from_probs`)."""
    if mode not in ("label", "expected"):
        raise ValueError(f"mode must be 'label' or 'expected', not {mode!r}")
    return [{t: rewards_from_probs(p, mode) for t, p in d.items()} for d in fg_segment_probs(models, items, batch_size)]
