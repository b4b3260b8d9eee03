"""Re-Align's rejected answer: mask the chosen answer's content words, let the VLM re-fill them
while it looks at a *retrieved* image.

Re-Align (Xing et al. 2025, "Re-Align: Aligning Vision Language Models via Retrieval-Augmented
Direct Preference Optimization"; data figure ``asset/pics/reject-response.png``) builds the
rejected answer of a (image, question, chosen answer) in four steps: mask the chosen answer's
object / attribute / relation words; retrieve the top-k most similar training images; for each
retrieved image in rank order, have the VLM fill the masked answer *while looking at that image*;
accept the first completion whose sentence-embedding cosine to the chosen answer is below 0.95
(:mod:`mmalign.textsim`). The completion is the rejected answer, its image the rejected image.
This module does the masking (:func:`mask_answer`) and the filling (:class:`ConstrainedInfiller`,
:class:`PromptInfiller`); the stage ``data_pipelines/realign_data.py`` does retrieval and acceptance.

Masking
-------
:func:`mask_answer` is one function for both sources of "which words":

* with ``claims`` (the synthetic world: :func:`mmalign.oracle.world_claims` of the answer), a word
  is masked when it lies inside a claim's span and is that claim's kind of word: the shape word
  of an ``object`` claim, the colour / size / number words of an ``attribute`` claim, the relation
  phrase ("left of", "above", "on top of", ...) of a ``relation`` claim outside its two mentions.
  Determiners and everything outside the claims stay;
* without claims (free text, no scene graph), the same word classes are found by vocabulary:
  objects are the world's shape words and the COCO categories of an
  :class:`mmalign.eval.vocab.ObjectVocabulary` (multi-word forms included), attributes are colour
  and size words (a number word only directly before another masked word: "two dogs", not "two
  of them"), relations the spatial phrases of :data:`RELATION_PHRASES`.

Adjacent masked words (only whitespace between them) form one *slot*: "a [small red circle] and
a [large blue square]. The [red circle] is [left of] the [blue square]." Each slot's leading
whitespace belongs to the slot, so the fixed text before it ends on a word ("... and a"), which
is how byte-level BPE tokenisers saw the words in training (" small", not " " + "small").

Constrained infilling (the default; :class:`ConstrainedInfiller`)
-----------------------------------------------------------------
A tiny policy cannot follow a "fill in the blanks" instruction, so the fill is decoded under
constraints. The answer is built left to right as the policy's own response to the question
about the retrieved image: the fixed (unmasked) text is *forced* (appended verbatim, never
decoded), and each slot is decoded token by token from the policy's next-token distribution
given the retrieved image, the question and everything before it. Greedy by default (the
highest-scoring allowed token); with ``temperature > 0`` tokens are ranked by Gumbel-perturbed
log-probs, i.e. sampled (seeded). Within a slot:

* the first token must be a *word* piece (letters, digits, ``'`` or ``-``), with the slot's
  leading whitespace if it has one, and must not begin the following fixed text (a slot is
  never left empty);
* after that, the slot ends when the best token begins the following fixed text at a word
  boundary (the policy wants to go on with what is forced next: " and" before " and a"), is not a
  word piece (punctuation), is the end of sequence or another special token, or would start a
  word beyond ``len(masked words) + extra_words``; ``max_slot_tokens`` caps a slot in tokens.

Then the slot's decoded text (stripped, with the slot's leading whitespace) and the next fixed
text are appended, and the text so far is re-tokenised for the next slot. So the result is
always ``fixed[0] + fill[0] + fixed[1] + ... + fixed[n]``: only the masked words change. Requests
are batched by answer length, and all requests of a batch advance together: one forward pass
(:meth:`mmalign.policy.Policy.response_forward`) per step over every unfinished request, prompt +
response so far. The image and prompt are encoded again at every step because the Policy protocol
has no KV-cache step; that is most of the cost (on 2 CPU cores the tiny policy re-fills ~4 answers/s,
2,000 demo captions in ~11 min), and a cached step would cut it about 3x.

Prompt mode (:class:`PromptInfiller`)
-------------------------------------
For instruction-following VLMs: the policy is shown the retrieved image and
:data:`REFILL_PROMPT` (the question and the answer with one ``[MASK]`` per slot) and its greedy
answer is the re-fill. Nothing is forced; a result that still contains ``[MASK]`` or is empty
fails, and whether the fixed text survived is recorded (``kept_fixed``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign import world as W
from mmalign.collators import VisionChatCollator, select_rows, to_device
from mmalign.eval.vocab import ObjectVocabulary
from mmalign.feedback import Claim
from mmalign.records import load_image, message_text

__all__ = [
    "MASK",
    "MASK_KINDS",
    "REFILL_MODES",
    "REFILL_PROMPT",
    "RELATION_PHRASES",
    "ConstrainedInfiller",
    "MaskedAnswer",
    "MaskedSpan",
    "PromptInfiller",
    "RefillRequest",
    "RefillResult",
    "mask_answer",
]

MASK = "[MASK]"
MASK_KINDS: tuple[str, ...] = ("object", "attribute", "relation")
REFILL_MODES: tuple[str, ...] = ("infill", "prompt")

#: Spatial relation phrases (lower-case word tuples), longest first so "on top of" wins over
#: nothing shorter. The world parser's phrases plus common free-text ones.
RELATION_PHRASES: tuple[tuple[str, ...], ...] = tuple(sorted({
    ("left", "of"), ("right", "of"), ("above",), ("over",), ("below",), ("under",), ("underneath",),
    ("beneath",), ("on", "top", "of"), ("in", "front", "of"), ("next", "to"), ("behind",), ("beside",),
    ("near",), ("inside",), ("across", "from"),
}, key=lambda p: (-len(p), p)))

#: Attribute words: the world's colours and sizes plus common free-text colours and sizes.
COLOR_WORDS = frozenset(W.COLOR_WORDS) | {"silver", "gold", "golden", "beige", "tan", "navy", "turquoise"}
SIZE_WORDS = frozenset(W.SIZE_WORDS) | {"tall", "short", "long", "giant", "enormous", "massive"}
COUNT_WORDS = frozenset(W.NUMBER_WORDS[2:]) | {"several", "many", "few"}

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+")
_WORD_PIECE = re.compile(r"\s?[A-Za-z0-9'\-]+")


# ---------------------------------------------------------------------------------------------
# masking


@dataclass(frozen=True)
class MaskedSpan:
    """One slot: ``text[start:end]`` (words only, no surrounding whitespace) and the kinds of its words."""

    start: int
    end: int
    kinds: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class MaskedAnswer:
    """An answer with slots. ``fixed`` has one more entry than ``spans``; ``leads[i]`` is the
    whitespace before slot ``i`` (it belongs to the slot: ``fixed[i]`` ends on a word)."""

    text: str
    spans: tuple[MaskedSpan, ...]

    @property
    def fixed(self) -> tuple[str, ...]:
        out, pos = [], 0
        for s in self.spans:
            out.append(self.text[pos:s.start].rstrip())
            pos = s.end
        out.append(self.text[pos:])
        return tuple(out)

    @property
    def leads(self) -> tuple[str, ...]:
        out, pos = [], 0
        for s in self.spans:
            before = self.text[pos:s.start]
            out.append(before[len(before.rstrip()):])
            pos = s.end
        return tuple(out)

    def fill(self, fills: Sequence[str]) -> str:
        """The answer with slot ``i`` replaced by ``fills[i]`` (stripped; the slot's whitespace kept)."""
        if len(fills) != len(self.spans):
            raise ValueError(f"{len(fills)} fills for {len(self.spans)} slots")
        fixed, leads = self.fixed, self.leads
        parts = [fixed[0]]
        for i, f in enumerate(fills):
            parts += [leads[i], f.strip(), fixed[i + 1]]
        return "".join(parts)

    def masked(self, token: str = MASK) -> str:
        """The answer with one ``token`` per slot."""
        return self.fill([token] * len(self.spans))

    @property
    def n_words(self) -> list[int]:
        """Masked words per slot."""
        return [len(_WORD.findall(s.text)) for s in self.spans]


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]


def _relation_hits(words: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """Word-index ranges ``[i, j)`` of the relation phrases, left to right, not overlapping."""
    out, i = [], 0
    while i < len(words):
        for p in RELATION_PHRASES:
            if tuple(w for w, _, _ in words[i:i + len(p)]) == p:
                out.append((i, i + len(p)))
                i += len(p)
                break
        else:
            i += 1
    return out


def mask_answer(text: str, claims: Sequence[Claim] | None = None, vocab: ObjectVocabulary | None = None,
                kinds: Sequence[str] = MASK_KINDS) -> MaskedAnswer:
    """The slots of ``text`` (module docstring): from ``claims`` when given (the world's
    :func:`mmalign.oracle.world_claims`), else by vocabulary (``vocab`` adds object categories to
    the world's shapes; None: shapes only). ``kinds`` picks which of object / attribute / relation
    words are masked."""
    bad = [k for k in kinds if k not in MASK_KINDS]
    if bad:
        raise ValueError(f"unknown mask kinds {bad}; choose among {', '.join(MASK_KINDS)}")
    words = _words(text)
    kind_of: dict[int, str] = {}  # word index -> kind

    def index_range(start: int, end: int) -> range:
        ids = [k for k, (_, s, e) in enumerate(words) if s >= start and e <= end]
        return range(ids[0], ids[-1] + 1) if ids else range(0)

    if claims is not None:
        mention_words: set[int] = set()
        for c in claims:
            if c.type in ("object", "attribute"):
                mention_words.update(index_range(c.start, c.end))
        for c in claims:
            if c.type not in kinds:
                continue
            span = index_range(c.start, c.end)
            if c.type == "object":
                kind_of.update({k: "object" for k in span if words[k][0] in W.SHAPE_WORDS})
            elif c.type == "attribute":
                kind_of.update({k: "attribute" for k in span if words[k][0] in COLOR_WORDS
                                or words[k][0] in SIZE_WORDS or words[k][0] in COUNT_WORDS})
            else:  # relation: the phrase between the two mentions
                inner = [words[k] for k in span if k not in mention_words]
                for a, b in _relation_hits(inner):
                    for w in inner[a:b]:
                        kind_of[words.index(w)] = "relation"
    else:
        if "object" in kinds:
            kind_of.update({k: "object" for k, (w, _, _) in enumerate(words) if w in W.SHAPE_WORDS})
            for m in (vocab.extract(text) if vocab is not None else []):
                kind_of.update({k: "object" for k in index_range(m.start, m.end)})
        if "attribute" in kinds:
            for k, (w, _, _) in enumerate(words):
                if k not in kind_of and (w in COLOR_WORDS or w in SIZE_WORDS):
                    kind_of[k] = "attribute"
            # a number word only directly before another masked word ("two dogs")
            for k in range(len(words) - 2, -1, -1):
                if words[k][0] in COUNT_WORDS and k + 1 in kind_of and not text[words[k][2]:words[k + 1][1]].strip():
                    kind_of.setdefault(k, "attribute")
        if "relation" in kinds:
            for a, b in _relation_hits(words):
                if not any(k in kind_of for k in range(a, b)):
                    kind_of.update({k: "relation" for k in range(a, b)})
    spans: list[MaskedSpan] = []
    run: list[int] = []
    for k in sorted(kind_of) + [None]:  # type: ignore[list-item]
        if run and (k is None or k != run[-1] + 1 or text[words[run[-1]][2]:words[k][1]].strip()):
            s, e = words[run[0]][1], words[run[-1]][2]
            spans.append(MaskedSpan(s, e, tuple(dict.fromkeys(kind_of[j] for j in run)), text[s:e]))
            run = []
        if k is not None:
            run.append(k)
    return MaskedAnswer(text, tuple(spans))


# ---------------------------------------------------------------------------------------------
# filling


@dataclass(frozen=True)
class RefillRequest:
    """Fill ``masked`` while looking at ``image`` (a file), asked ``prompt`` (the chat messages
    before the answer, with one image placeholder). ``where`` names the record in errors."""

    image: str | Path
    prompt: list[dict]
    masked: MaskedAnswer
    where: str = "<request>"


@dataclass
class RefillResult:
    """The re-filled answer; ``ok`` False with ``error`` when no answer could be made."""

    text: str
    fills: list[str] | None
    ok: bool = True
    error: str = ""
    stops: list[str] = field(default_factory=list)  # why each slot ended (constrained infill)
    kept_fixed: bool = True  # every fixed piece is in the text, in order (always so when forced)


def _starts_fixed(piece: str, fixed: str) -> bool:
    """``piece`` is how ``fixed`` (the text forced next) begins, ending at a word boundary of it."""
    if not piece or not fixed.startswith(piece):
        return False
    n = len(piece)
    return n == len(fixed) or not (piece[-1].isalnum() and fixed[n].isalnum())


class _Slotted:
    """One request's decoding state (see :class:`ConstrainedInfiller`)."""

    def __init__(self, masked: MaskedAnswer, tok: Any, extra_words: int, max_slot_tokens: int):
        self.masked, self.tok = masked, tok
        self.fixed, self.leads = masked.fixed, masked.leads
        self.limits = [n + extra_words for n in masked.n_words]
        self.max_slot_tokens = max_slot_tokens
        self.text = self.fixed[0]
        self.slot = 0
        self.fills: list[str] = []
        self.stops: list[str] = []
        self.error = ""
        self._start_slot()

    @property
    def done(self) -> bool:
        return bool(self.error) or self.slot >= len(self.fixed) - 1

    def _start_slot(self) -> None:
        self.base = self.tok(self.text, add_special_tokens=False)["input_ids"] if self.text else []
        self.slot_ids: list[int] = []
        self.words = 0
        self.base_text = self.tok.decode(self.base)
        self.cur_text = self.base_text

    def ids(self) -> list[int]:
        return self.base + self.slot_ids

    def _end(self, why: str) -> None:
        fill = self.cur_text[len(self.base_text):].strip() if self.cur_text.startswith(self.base_text) else \
            self.tok.decode(self.slot_ids).strip()
        self.fills.append(fill)
        self.stops.append(why)
        self.text = self.text + self.leads[self.slot] + fill + self.fixed[self.slot + 1]
        self.slot += 1
        if not self.done:
            self._start_slot()

    def step(self, candidates: list[int], special: set[int]) -> None:
        """Advance by one token: the first allowed of ``candidates`` (best first)."""
        nxt = self.fixed[self.slot + 1]
        empty = not self.slot_ids
        for c in candidates:
            if c in special:
                if empty:
                    continue
                return self._end("end")
            text = self.tok.decode(self.base + self.slot_ids + [c])
            piece = text[len(self.cur_text):] if text.startswith(self.cur_text) else ""
            word = bool(_WORD_PIECE.fullmatch(piece))
            if empty:
                lead_ok = piece[:1].isspace() == bool(self.leads[self.slot])
                if word and lead_ok and not _starts_fixed(piece, nxt):
                    self._take(c, text, new_word=True)
                    return None
                continue
            if _starts_fixed(piece, nxt):
                return self._end("fixed")
            if not word:
                return self._end("punctuation")
            new_word = piece[:1].isspace()
            if new_word and self.words >= self.limits[self.slot]:
                return self._end("words")
            self._take(c, text, new_word)
            return None
        self.error = (f"slot {self.slot + 1} ({self.masked.spans[self.slot].text!r}): none of the policy's "
                      f"{len(candidates)} best tokens is a word that can fill it")
        return None

    def _take(self, c: int, text: str, new_word: bool) -> None:
        self.slot_ids.append(c)
        self.cur_text = text
        self.words += int(new_word)
        if len(self.slot_ids) >= self.max_slot_tokens:
            self._end("tokens")


def _example(r: RefillRequest, messages: list[dict] | None = None) -> dict:
    return {"images": [load_image(r.image, r.where)], "messages": messages if messages is not None else r.prompt,
            "meta": {"id": r.where, "source": r.where}}


def _progress(total: int, desc: str, enabled: bool):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ans", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


class ConstrainedInfiller:
    """Fill masked answers by forced fixed text and policy-decoded slots (module docstring).

    Args:
        policy: an :class:`mmalign.policy.Policy` that implements ``response_forward``; put it in
            eval mode first (dropout).
        batch_size: requests decoded together.
        extra_words: a slot may hold this many words more than it masked.
        max_slot_tokens: hard cap on tokens per slot.
        temperature: 0 greedy; > 0 samples (Gumbel-perturbed ranking), seeded by ``seed``.
        candidates: how many of the best tokens are considered at each step.
    """

    mode = "infill"

    def __init__(self, policy: Any, batch_size: int = 32, extra_words: int = 1, max_slot_tokens: int = 16,
                 temperature: float = 0.0, seed: int = 0, candidates: int = 50):
        if batch_size < 1 or extra_words < 0 or max_slot_tokens < 1 or temperature < 0 or candidates < 1:
            raise ValueError("need batch_size >= 1, extra_words >= 0, max_slot_tokens >= 1, temperature >= 0, "
                             "candidates >= 1")
        self.policy, self.batch_size = policy, batch_size
        self.extra_words, self.max_slot_tokens = extra_words, max_slot_tokens
        self.temperature, self.candidates = temperature, candidates
        self.tok = policy.processor.tokenizer
        self.collator = VisionChatCollator(policy.processor, max_length=1 << 16, mode="generate", on_overlength="error")
        self.generator = torch.Generator().manual_seed(seed)
        special = set(self.tok.all_special_ids)
        eos = getattr(getattr(getattr(policy, "model", None), "generation_config", None), "eos_token_id", None)
        special.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.special = special
        if self.tok.pad_token_id is None:
            raise ValueError("the policy's tokenizer has no pad token; constrained infilling pads response rows")

    @torch.no_grad()
    def __call__(self, requests: Sequence[RefillRequest], progress: bool = False,
                 desc: str = "re-filling") -> list[RefillResult]:
        # similar lengths together: less padding, and a batch's rows finish at about the same step
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].masked.text))
        out: list[RefillResult | None] = [None] * len(requests)
        with _progress(len(requests), desc, progress) as bar:
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                for i, res in zip(idx, self._chunk([requests[i] for i in idx])):
                    out[i] = res
                bar.update(len(idx))
        return out  # type: ignore[return-value]

    def _chunk(self, reqs: list[RefillRequest]) -> list[RefillResult]:
        device = next(self.policy.parameters()).device
        examples = [_example(r) for r in reqs]
        prompt = to_device(self.collator(examples), device)
        states = [_Slotted(r.masked, self.tok, self.extra_words, self.max_slot_tokens) for r in reqs]
        pad = self.tok.pad_token_id
        while True:
            active = [i for i, st in enumerate(states) if not st.done]
            if not active:
                break
            if len(active) == len(states):
                sub = prompt
            else:
                try:
                    sub = select_rows(prompt, active)
                except ValueError:  # image features not split per row (Qwen2-VL): collate the rows again
                    sub = to_device(self.collator([examples[i] for i in active]), device)
            rows = [states[i].ids() for i in active]
            lengths = torch.tensor([len(r) for r in rows])
            # one pad column more than the longest row: the logits at index len(row) predict the next token
            ids = torch.full((len(rows), int(lengths.max()) + 1), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[j, :len(r)] = 1
            logits, _ = self.policy.response_forward(sub, ids.to(device), mask.to(device))
            nxt = logits[torch.arange(len(rows), device=logits.device), lengths.to(logits.device)].float()
            scores = torch.log_softmax(nxt, dim=-1).cpu()
            if self.temperature > 0:
                u = torch.rand(scores.shape, generator=self.generator).clamp_(1e-10, 1 - 1e-10)
                scores = scores / self.temperature - torch.log(-torch.log(u))
            top = scores.topk(min(self.candidates, scores.shape[-1]), dim=-1).indices.tolist()
            for i, cands in zip(active, top):
                states[i].step(cands, self.special)
        results = []
        for st in states:
            if st.error:
                results.append(RefillResult(text="", fills=None, ok=False, error=st.error, stops=st.stops))
            else:
                results.append(RefillResult(text=st.text, fills=st.fills, stops=st.stops))
        return results


#: The instruction of prompt mode ({question}: the original question; {masked}: the answer with
#: one [MASK] per slot).
REFILL_PROMPT = ("Here is an answer to the question \"{question}\" in which some words are hidden as [MASK]:\n"
                 "{masked}\n"
                 "Replace every [MASK] with the words that make the answer true for this image. Keep every "
                 "other word exactly as it is and reply with the completed answer only.")


class PromptInfiller:
    """Fill masked answers by asking an instruction-following policy (module docstring).

    Args:
        policy: an :class:`mmalign.policy.Policy`.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: longest answer.
        template: the instruction, with ``{question}`` and ``{masked}``.
    """

    mode = "prompt"

    def __init__(self, policy: Any, batch_size: int = 32, max_new_tokens: int = 256, template: str = REFILL_PROMPT):
        if "{masked}" not in template:
            raise ValueError("the refill prompt template must contain {masked}")
        self.policy, self.batch_size, self.max_new_tokens, self.template = policy, batch_size, max_new_tokens, template
        self.collator = VisionChatCollator(policy.processor, max_length=1 << 16, mode="generate", on_overlength="error")

    def messages(self, r: RefillRequest) -> list[dict]:
        """The one user turn: the image placeholder and the instruction."""
        users = [m for m in r.prompt if m["role"] == "user"]
        question = message_text(users[-1]).strip() if users else ""
        text = self.template.format(question=question, masked=r.masked.masked())
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    @torch.no_grad()
    def __call__(self, requests: Sequence[RefillRequest], progress: bool = False,
                 desc: str = "re-filling") -> list[RefillResult]:
        device = next(self.policy.parameters()).device
        out: list[RefillResult] = []
        with _progress(len(requests), desc, progress) as bar:
            for s in range(0, len(requests), self.batch_size):
                chunk = list(requests[s:s + self.batch_size])
                batch = to_device(self.collator([_example(r, self.messages(r)) for r in chunk]), device)
                texts = self.policy.generate(batch, max_new_tokens=self.max_new_tokens, do_sample=False)
                out += [self._result(r, t) for r, t in zip(chunk, texts)]
                bar.update(len(chunk))
        return out

    @staticmethod
    def _result(r: RefillRequest, text: str) -> RefillResult:
        text = text.strip()
        if not text:
            return RefillResult(text="", fills=None, ok=False, error="the policy's answer is empty")
        if MASK in text:
            return RefillResult(text=text, fills=None, ok=False, error=f"the policy's answer still contains {MASK}")
        fixed = r.masked.fixed
        pattern = "".join(re.escape(f) + (r"\s*(.+?)" if i < len(fixed) - 1 else "") for i, f in enumerate(fixed))
        m = re.fullmatch(pattern, text, flags=re.DOTALL)
        return RefillResult(text=text, fills=[g.strip() for g in m.groups()] if m else None, kept_fixed=m is not None)
