"""Sub-sentence segments of a response, with character offsets, and where each ends in tokens.

Why: FGAIF (Jing & Du 2024, "FGAIF: Aligning Large Vision-Language Models with Fine-grained AI
Feedback", arXiv:2404.05046) follows Fine-Grained RLHF (Wu et al. 2023, "Fine-Grained Human
Feedback Gives Better Rewards for Language Model Training"): a response is cut into
sub-sentences, each sub-sentence gets its own label per hallucination type (object existence,
attribute, relation), and a reward model scores each sub-sentence at its last token, so PPO gets
a dense reward. This module does the cutting (:func:`split_segments`) and maps a segment's end
to its last token (:func:`char_to_token_end`); :mod:`mmalign.oracle` does the labelling.

The segmentation rule (deterministic, pure Python):

1. **Sentences** end after a run of ``. ! ? ;`` (the whole run: "?!", "...") and at a line break.
   A ``.`` between two digits ("3.5") ends nothing. Text after the last terminator is a
   sentence too (a trailing clause without a full stop is kept).
2. **Within a sentence** a segment boundary is put

   * after a ``:`` followed by white space ("There are two objects:" | "a red circle ...");
   * after a ``,`` when the next word -- or, for ", and" / ", but", the word after the
     connective -- *starts a new unit* (see below), and the piece before the comma is at least
     two words ("Yes, there is ..." stays one segment: "Yes," alone says nothing checkable);
   * before `` and `` / `` but `` (no comma) when the word after the connective starts a new
     unit.

   A word *starts a new unit* when it opens a new object phrase (a determiner or number:
   "a", "the", "two", "no", ...), a clause (a pronoun or subordinator: "it", "there",
   "which", ...), or a predicate or relation continuing the subject ("is", "are", "left",
   "above", "to", "on", ...: "A is above B | and left of C"). Any other word does not:
   "red and blue circles", "a large, red circle" stay whole. So "a red circle, a blue square
   and a star" gives three segments, one per object phrase.
3. **Segments tile the text**: the connective opens the next segment ("and a star."), commas,
   colons and the sentence's end punctuation close the segment before them, and a piece
   holding no letter or digit is merged into the segment before it. Every non-blank character
   lies in exactly one segment, and ``segment.text == text[segment.start:segment.end]`` with no
   white space at either end. Empty or blank text gives ``[]``.

Ending on the punctuation means a segment's reward sits on its "," or "." token, as in
Fine-Grained RLHF, which rewards each sub-sentence at its final token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Segment", "split_segments", "char_to_token_end", "UNIT_STARTERS"]


@dataclass(frozen=True)
class Segment:
    """One sub-sentence: ``text == response[start:end]`` (no surrounding white space)."""

    index: int
    start: int
    end: int
    text: str


#: Words that open a new unit after a comma or "and"/"but" (see the module docstring).
UNIT_STARTERS: frozenset[str] = frozenset(
    # determiners, quantifiers and numbers: a new object phrase
    "a an the another some no each every both all its their his her this that these those".split()
    + "one two three four five six seven eight nine ten".split()
    # pronouns and subordinators: a new clause
    + "it they there here he she we i you which who where while whereas so then also".split()
    # predicates and relation words: a clause whose subject is the sentence's subject
    + "is are was were has have sits lies appears appear left right above below under beneath underneath over "
      "to on next near behind".split()
)

_WORD = re.compile(r"[A-Za-z]+|\d+")
_SENT_END = re.compile(r"[.!?;]+|\n")
_CONNECTIVES = ("and", "but")


def _words(text: str) -> list[re.Match[str]]:
    return list(_WORD.finditer(text))


def _starts_unit(word: str | None) -> bool:
    return word is not None and (word.lower() in UNIT_STARTERS or word.isdigit())


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence, end just after its terminator run (rule 1)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENT_END.finditer(text):
        if m.group() == "." and 0 < m.start() and m.end() < len(text) \
                and text[m.start() - 1].isdigit() and text[m.end()].isdigit():
            continue  # a decimal point
        spans.append((start, m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _cuts(text: str, s: int, e: int) -> list[int]:
    """Soft boundaries inside the sentence text[s:e] (rule 2), as absolute offsets."""
    words = [m for m in _WORD.finditer(text, s, e)]
    cuts: list[int] = []
    last_cut = s
    for k, w in enumerate(words):
        nxt = words[k + 1].group() if k + 1 < len(words) else None
        # gap between this word and the next one (or the sentence end)
        gap_end = words[k + 1].start() if k + 1 < len(words) else e
        gap = text[w.end():gap_end]
        if w.group().lower() in _CONNECTIVES and k > 0:
            # " and X" without a comma right before: cut before the connective
            before = text[words[k - 1].end():w.start()]
            if "," not in before and ":" not in before and before.strip() == "" and _starts_unit(nxt):
                cuts.append(w.start())
                last_cut = w.start()
            continue
        if nxt is None:
            continue
        stripped = gap.strip()
        if stripped.endswith(":") and gap[-1:].isspace():
            cut = w.end() + gap.index(":") + 1
            cuts.append(cut)
            last_cut = cut
        elif stripped == ",":
            after = nxt
            if nxt.lower() in _CONNECTIVES:
                after = words[k + 2].group() if k + 2 < len(words) else None
            n_before = len(_words(text[last_cut:w.end()]))
            if _starts_unit(after) and n_before >= 2:
                cut = w.end() + gap.index(",") + 1
                cuts.append(cut)
                last_cut = cut
    return cuts


def split_segments(text: str) -> list[Segment]:
    """Cut ``text`` into sub-sentence segments by the rule in the module docstring.

    >>> [s.text for s in split_segments("There are two objects: a red circle, a blue square and a star. It is")]
    ['There are two objects:', 'a red circle,', 'a blue square', 'and a star.', 'It is']
    """
    if not isinstance(text, str):
        raise TypeError(f"split_segments() needs a string, got {type(text).__name__}")
    pieces: list[tuple[int, int]] = []
    for s, e in _sentence_spans(text):
        bounds = [s, *_cuts(text, s, e), e]
        pieces.extend(zip(bounds, bounds[1:]))
    spans: list[list[int]] = []
    for a, b in pieces:
        chunk = text[a:b]
        if not chunk.strip():
            continue
        lo = a + (len(chunk) - len(chunk.lstrip()))
        hi = b - (len(chunk) - len(chunk.rstrip()))
        if not _WORD.search(text, lo, hi):
            if spans:  # punctuation only: belongs to the segment before
                spans[-1][1] = hi
                continue
        elif spans and not _WORD.search(text, spans[-1][0], spans[-1][1]):
            spans[-1][1] = hi  # the text began with punctuation: join it to this piece
            continue
        spans.append([lo, hi])
    return [Segment(i, a, b, text[a:b]) for i, (a, b) in enumerate(spans)]


def char_to_token_end(offsets: Sequence[tuple[int, int]], char_end: int) -> int:
    """Index of the token holding the last character before ``char_end``.

    ``offsets`` is a tokenizer's offset mapping (``return_offsets_mapping=True``): per token its
    ``(start, end)`` character span in the same string the segment offsets index (for a prompt +
    response encoding, add the response's start to ``char_end``). FGAIF / Fine-Grained RLHF put a
    segment's reward on its last token; that is the last token that starts before ``char_end``.
    Tokens with an empty span (special tokens, padding: ``(0, 0)``) are skipped. A token that
    carries a leading space (" and", byte-level BPE without trimmed offsets) starts at the space,
    i.e. at or after the previous segment's end, so it is not counted for that segment.

    Raises ValueError when no token starts before ``char_end``.
    """
    best = -1
    for i, (a, b) in enumerate(offsets):
        if b > a and a < char_end:
            best = i
    if best < 0:
        raise ValueError(f"no token starts before character {char_end} "
                         f"(offset mapping of {len(offsets)} tokens)")
    return best
