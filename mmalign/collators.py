"""Collators: chat records -> padded, masked model batches.

The collator owns padding and masking, and passes model-specific keys (``pixel_values``,
``image_grid_thw``, ``image_sizes`` …) through untouched, so method code never special-cases a
model family (TRL's ``DataCollatorForVisionPreference`` does the same). Everything family-specific
is done by the Hugging Face processor: it renders the chat template and expands image
placeholders into the right number of image tokens.

Label masking: only assistant turns carry loss. The token span of an assistant turn is found by
rendering the conversation up to that turn and tokenising the *text after* the images (assistant
turns and later user turns hold no images), then checking that those tokens really are the tail
of the full sequence — so a chat template whose tokenisation is not prefix-stable is an error,
never a silent mislabel.

Truncation never cuts image tokens: a training sequence longer than ``max_length`` is cut at the
end only when all its image tokens and some labelled tokens survive; otherwise the example is
dropped with a warning naming its record (or raises, with ``on_overlength="error"``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mmalign.ops import IGNORE_INDEX
from mmalign.records import RecordError, where

log = logging.getLogger(__name__)


class OverlengthError(RecordError):
    """An example cannot fit ``max_length`` without cutting image tokens or all of its labels."""


def to_device(batch: dict, device: torch.device | str) -> dict:
    """``batch`` with its tensors on ``device``, nested dicts included (``meta`` and other
    non-tensors untouched)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else to_device(v, device) if isinstance(v, dict) else v)
            for k, v in batch.items()}


def select_rows(batch: dict, index: torch.Tensor | list[int]) -> dict:
    """The rows ``index`` of a batch (repeats allowed, in that order): every tensor whose first
    dimension is the batch is indexed, ``meta`` too; other entries are kept. A tensor with another
    first dimension (patches of several images flattened together, as some families do) cannot be
    split per row: a ValueError names it."""
    b = len(batch["meta"]) if "meta" in batch else batch["input_ids"].shape[0]
    idx = torch.as_tensor(index, dtype=torch.long)
    out = {}
    for key, v in batch.items():
        if isinstance(v, torch.Tensor):
            if v.shape[0] != b:
                raise ValueError(f"cannot select rows of {key!r} (shape {tuple(v.shape)}): its first dimension is not "
                                 f"the batch ({b})")
            out[key] = v[idx.to(v.device)]
        elif key == "meta":
            out[key] = [v[i] for i in idx.tolist()]
        else:
            out[key] = v
    return out


def render(processor: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def image_token_id(processor: Any) -> int | None:
    tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None):
        tid = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return tid


def _has_image(messages: list[dict]) -> bool:
    return any(isinstance(m["content"], list) and any(p["type"] == "image" for p in m["content"]) for m in messages)


def _where(example: dict) -> str:
    return where(example.get("meta"), default="<example>")


@dataclass
class VisionChatCollator:
    """Collate ``{"images": [PIL...], "messages": [...], "meta": {...}}`` examples.

    Args:
        processor: a Hugging Face processor with a chat template.
        max_length: longest sequence in tokens, image tokens included.
        mode: ``"train"`` builds ``labels`` on assistant turns with right padding; ``"generate"``
            renders every message but the trailing assistant one (if any) with the generation
            prompt and pads on the left, so new tokens follow the prompt directly.
        train_on: ``"all"`` assistant turns or only the ``"last"`` one carry loss.
        on_overlength: ``"drop"`` (warn and count) or ``"error"``.
    """

    processor: Any
    max_length: int = 1024
    mode: Literal["train", "generate"] = "train"
    train_on: Literal["all", "last"] = "all"
    on_overlength: Literal["drop", "error"] = "drop"
    dropped: int = field(default=0, init=False)

    def __call__(self, examples: list[dict]) -> dict | None:
        kept = []
        for ex in examples:
            try:
                kept.append((ex, self._plan(ex)))
            except OverlengthError as e:
                self._drop(e)
        while kept:
            batch = self._encode([ex for ex, _ in kept], [p for _, p in kept])
            bad = batch.pop("_overlength")
            if not bad:
                batch["meta"] = [ex.get("meta", {}) for ex, _ in kept]
                return batch
            for i in sorted(bad, reverse=True):
                self._drop(bad[i])
                del kept[i]
        return None  # every example dropped; Lightning skips a None batch

    def _drop(self, err: OverlengthError) -> None:
        if self.on_overlength == "error":
            raise err
        self.dropped += 1
        log.warning("dropped (%d so far): %s", self.dropped, err)

    # -- text planning ------------------------------------------------------------------------

    def _plan(self, ex: dict) -> dict:
        """Render the texts the example needs; the token spans come after encoding."""
        msgs = ex["messages"]
        if self.mode == "generate":
            prompt_msgs = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
            return {"text": render(self.processor, prompt_msgs, add_generation_prompt=True), "turns": []}
        full = render(self.processor, msgs)
        turn_idx = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
        if self.train_on == "last":
            turn_idx = turn_idx[-1:]
        turns = []
        for k in turn_idx:
            if _has_image(msgs[k:]):
                raise RecordError(f"{_where(ex)}: images after the first assistant turn are not supported")
            prefix = render(self.processor, msgs[:k], add_generation_prompt=True)
            through = render(self.processor, msgs[: k + 1])
            if not (full.startswith(through) and through.startswith(prefix)):
                raise RecordError(f"{_where(ex)}: the chat template does not render turns as prefixes of the conversation")
            turns.append((through[len(prefix):], full[len(through):]))
        return {"text": full, "turns": turns}

    # -- encoding -----------------------------------------------------------------------------

    def _encode(self, examples: list[dict], plans: list[dict]) -> dict:
        tok = self.processor.tokenizer
        images = [ex["images"] for ex in examples]
        side = "left" if self.mode == "generate" else "right"
        batch = dict(self.processor(
            text=[p["text"] for p in plans],
            images=images if any(images) else None,
            return_tensors="pt", padding=True, padding_side=side,
        ))
        ids, attn = batch["input_ids"], batch["attention_mask"]
        lengths = attn.sum(1).tolist()
        overlength: dict[int, OverlengthError] = {}
        img_id = image_token_id(self.processor)

        if self.mode == "generate":
            for i, n in enumerate(lengths):
                if n > self.max_length:
                    overlength[i] = OverlengthError(
                        f"{_where(examples[i])}: prompt is {n} tokens (images included), over max_length={self.max_length}")
            batch["_overlength"] = overlength
            return batch

        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (plan, n) in enumerate(zip(plans, lengths)):
            seq = ids[i, :n].tolist()
            for turn_text, after_text in plan["turns"]:
                turn = tok(turn_text, add_special_tokens=False)["input_ids"]
                after = tok(after_text, add_special_tokens=False)["input_ids"] if after_text else []
                end = n - len(after)
                start = end - len(turn)
                if start < 0 or seq[start:end] != turn or seq[end:] != after:
                    raise RecordError(
                        f"{_where(examples[i])}: assistant turn tokens are not a tail of the sequence; "
                        "the chat template's tokenisation is not prefix-stable")
                labels[i, start:end] = ids[i, start:end]
            if n > self.max_length:
                cut_images = img_id is not None and img_id in seq[self.max_length:]
                if cut_images or not (labels[i, : self.max_length] != IGNORE_INDEX).any():
                    what = "image tokens" if cut_images else "every labelled token"
                    overlength[i] = OverlengthError(
                        f"{_where(examples[i])}: {n} tokens > max_length={self.max_length}, and cutting would drop {what}")
        if max(lengths) > self.max_length:
            # Right padding: cutting every row at max_length cuts only sequence tails.
            for k, v in list(batch.items()):
                if isinstance(v, torch.Tensor) and v.shape == ids.shape:
                    batch[k] = v[:, : self.max_length]
            labels = labels[:, : self.max_length]
        batch["labels"] = labels
        batch["_overlength"] = overlength
        return batch


# ------------------------------------------------------------------------------------------------
# preference pairs


PairLayout = Literal["shared_prompt", "concat"]


@dataclass
class PreferenceCollator:
    """Collate preference pairs ``{"images", "prompt": [messages], "chosen": str, "rejected": str,
    "meta"}`` for DPO-style losses, in one of two layouts.

    ``"concat"`` (what TRL's DPOTrainer does): ``2B`` full rows, the ``B`` chosen conversations
    then the ``B`` rejected ones, each with its own copy of the image and prompt; ``labels`` on
    the assistant turn. Any model family works.

    ``"shared_prompt"``: the ``B`` prompts once (left-padded, as for generation; ``batch["prompt"]``
    holds their model inputs, images included) and the ``2B`` completions as token ids
    (``completion_ids`` / ``completion_mask``, ``(2B, C)``, right-padded, rows interleaved
    ``chosen_0, rejected_0, chosen_1, ...``). The policy encodes each image and prompt once and
    runs both completions on the prompt's KV cache (``models.policy.pair_logprobs``): with ~80
    image+prompt tokens and ~40 answer tokens, 160 instead of 240 token positions per pair go
    through the decoder, and half the images through the vision tower. The completion tokens are
    the tokens of the assistant turn exactly as the train-mode collator labels them (the chat
    template's rendering of the turn after the generation prompt), so both layouts score the same
    tokens (tests compare the log-probs).

    Over-long pairs: a sequence is cut at ``max_length`` from the end (the completion), as the
    train collator does; a pair whose prompt alone, images included, does not fit with at least
    one completion token is dropped with a warning naming the record (``on_overlength="drop"``)
    or raises. Both sides of a pair are always kept or dropped together.

    Per-pair ``meta`` (ids, scores, reward margins, precomputed reference log-probs) is passed
    through as ``batch["meta"]``, one dict per kept pair.

    Visual pairs (Re-Align): examples that also carry ``"rejected_images"`` get a third row, the
    chosen answer under the rejected images (``batch["visual"] = True``). ``"concat"``: rows are
    chosen, rejected, chosen-under-rejected-images (``3B``). ``"shared_prompt"``: ``2B`` prompts
    (the original images, then the rejected ones) and ``3B`` completions, ``completion_owner[j]``
    the prompt row completion ``j`` continues: ``chosen_0, rejected_0, ...`` on the original
    prompts, then ``chosen_0, chosen_1, ...`` on the rejected-image prompts.
    """

    processor: Any
    max_length: int = 1024
    layout: PairLayout = "shared_prompt"
    on_overlength: Literal["drop", "error"] = "drop"
    dropped: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.layout not in ("shared_prompt", "concat"):
            raise ValueError(f"layout must be 'shared_prompt' or 'concat', not {self.layout!r}")

    def _drop(self, err: OverlengthError) -> None:
        if self.on_overlength == "error":
            raise err
        self.dropped += 1
        log.warning("dropped pair (%d so far): %s", self.dropped, err)

    def __call__(self, examples: list[dict]) -> dict | None:
        return self._concat(examples) if self.layout == "concat" else self._shared(examples)

    def _concat(self, examples: list[dict]) -> dict | None:
        inner = VisionChatCollator(self.processor, max_length=self.max_length, mode="train", train_on="last",
                                   on_overlength="drop")
        visual = _visual(examples)
        sides = ("chosen", "rejected", "visual") if visual else ("chosen", "rejected")
        while examples:
            # all chosen rows, then all rejected rows (then chosen under the rejected images)
            rows = [{"images": ex["rejected_images"] if side == "visual" else ex["images"],
                     "messages": ex["prompt"] + [_assistant(ex["rejected" if side == "rejected" else "chosen"])],
                     "meta": {"source": _where(ex), "pair": i, "side": side}}
                    for side in sides for i, ex in enumerate(examples)]
            with _quiet(log):
                batch = inner(rows)
            kept = set() if batch is None else {(m["pair"], m["side"]) for m in batch["meta"]}
            complete = {i for i in range(len(examples)) if all((i, side) in kept for side in sides)}
            if batch is not None and len(complete) == len(examples) and len(kept) == len(sides) * len(examples):
                batch["meta"] = [ex.get("meta", {}) for ex in examples]
                batch["layout"] = "concat"
                batch["visual"] = visual
                return batch
            for i, ex in enumerate(examples):
                if i not in complete:
                    self._drop(OverlengthError(f"{_where(ex)}: the pair does not fit max_length={self.max_length} "
                                               "without cutting image tokens or a whole answer"))
            examples = [ex for i, ex in enumerate(examples) if i in complete]
        return None

    def _shared(self, examples: list[dict]) -> dict | None:
        tok = self.processor.tokenizer
        gen = VisionChatCollator(self.processor, max_length=self.max_length, mode="generate", on_overlength="error")
        turns: list[tuple[list[int], list[int]]] = []
        kept = []
        for ex in examples:
            prefix = render(self.processor, ex["prompt"], add_generation_prompt=True)
            ids = []
            for side in ("chosen", "rejected"):
                through = render(self.processor, ex["prompt"] + [_assistant(ex[side])])
                if not through.startswith(prefix):
                    raise RecordError(f"{_where(ex)}: the chat template does not render the answer after the "
                                      "generation prompt; use layout 'concat'")
                ids.append(tok(through[len(prefix):], add_special_tokens=False)["input_ids"])
            kept.append(ex)
            turns.append((ids[0], ids[1]))
        if not kept:
            return None
        visual = _visual(kept)
        image_sets = [ex["images"] for ex in kept] + ([ex["rejected_images"] for ex in kept] if visual else [])
        prompt = gen([{"images": imgs, "messages": ex["prompt"], "meta": ex.get("meta", {})}
                      for imgs, ex in zip(image_sets, kept + kept)])
        prompt_lens = prompt["attention_mask"].sum(1).tolist()
        b = len(kept)
        ok = []
        for i, ex in enumerate(kept):
            n = max(prompt_lens[i], prompt_lens[b + i]) if visual else prompt_lens[i]
            room = self.max_length - n
            if room < 1 or not turns[i][0] or not turns[i][1]:
                self._drop(OverlengthError(f"{_where(ex)}: prompt is {n} tokens (images included); "
                                           f"max_length={self.max_length} leaves no room for the answers"))
            else:
                ok.append(i)
        if len(ok) < len(kept):
            if not ok:
                return None
            return self._shared([kept[i] for i in ok])
        rows, owner = [], []
        for i, (c, r) in enumerate(turns):
            room = self.max_length - prompt_lens[i]
            rows += [c[:room], r[:room]]
            owner += [i, i]
        if visual:
            for i, (c, _) in enumerate(turns):
                rows.append(c[: self.max_length - prompt_lens[b + i]])
                owner.append(b + i)
        width = max(len(x) for x in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        completion_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, x in enumerate(rows):
            completion_ids[j, : len(x)] = torch.tensor(x, dtype=torch.long)
            completion_mask[j, : len(x)] = 1
        meta = prompt.pop("meta")[:b]
        return {"prompt": prompt, "completion_ids": completion_ids, "completion_mask": completion_mask,
                "completion_owner": torch.tensor(owner, dtype=torch.long), "meta": meta,
                "layout": "shared_prompt", "visual": visual}


def _visual(examples: list[dict]) -> bool:
    """Whether the examples carry rejected images (all or none of a batch may)."""
    has = [bool(ex.get("rejected_images")) for ex in examples]
    if any(has) and not all(has):
        missing = next(_where(ex) for ex, h in zip(examples, has) if not h)
        raise RecordError(f"{missing}: no rejected_images, but other pairs of the batch have them (all or none)")
    return bool(has) and all(has)


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


class _quiet:
    """Silence a logger's warnings inside a block (the pair collator reports drops itself, per pair)."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
