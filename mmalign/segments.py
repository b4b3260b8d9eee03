"""Sub-sentence segments of a response, with character offsets, and where each ends in tokens.

Why: FGAIF (Jing & Du 2024, "FGAIF: Aligning Large Vision-Language Models with Fine-grained AI
Feedback", arXiv:2404.05046) follows Fine-Grained RLHF (Wu et al. 2023, "Fine-Grained Human
Feedback Gives Better Rewards for Language Model Training"): a response is cut into
sub-sentences, each sub-sentence gets its own label per hallucination type (object existence,
attribute, relation), and a reward model scores each sub-sentence at its last token, so PPO gets
a dense reward. This module does the cutting (:func:`split_segments`) and maps a segment's end
to its last token (:func:`char_to_token_end`); :mod:`mmalign.oracle` does the labelling.

Two segmentations, named by a *segmentation spec* (:func:`check_segmentation`); every consumer
(the feedback stage's labels, the fine-grained reward models' data and export, PPO's rollouts)
takes the same spec, and a reward model export records the one it was trained on.

``"released"`` (the default): the splitter the released code uses. Fine-Grained RLHF's
``tasks/qa_feedback/reward_modeling/create_rel_fact_rm_files.py`` (``get_subsentence_starts``,
``MIN_SUBSENT_WORDS = 5``; the PPO side's copy is ``split_text_to_subsentences`` in
``tasks/qa_feedback/training/reward.py``), copied by FGAIF in ``RLHF/data_utils/segment.py``
(github.com/allenai/FineGrainedRLHF, github.com/LiqiangJing/FGAIF):

1. **Sentences** come from spaCy (``doc.sents``). The release loads ``en_core_web_sm`` (parser-based
   sentence boundaries); that package is not on PyPI, so the default here is
   ``spacy.blank("en")`` with the rule-based ``sentencizer`` (cuts after ``. ! ?`` and the like,
   not ``;``), which needs no download. ``"released:<pipeline>"`` loads any spaCy pipeline by
   name or folder instead (``"released:en_core_web_sm"`` once it is installed).
2. **Words** are the white-space-separated tokens of a sentence (``str.split``), punctuation
   attached ("circle,").
3. **Within a sentence**, a new sub-sentence may start at word ``j`` (0-based, ``n`` words) when
   word ``j - 1`` ends in ``,`` ``;`` ``!`` or ``?`` and more than five words remain
   (``n - j > 5``, i.e. at least six words from ``j`` on). Then, with ``p`` the start of the
   current sub-sentence: if the piece ``p .. j-1`` has at least five words, cut at ``j``; if it
   is shorter and ``p > 0``, the short piece joins the one before (the cut at ``p`` moves to
   ``j``); if it is shorter and ``p == 0`` (the sentence's first piece), no cut. Never at
   ``:``, never at a bare "and"/"but", never at ``.`` (that is spaCy's job).
4. A segment runs from its first word's first character to its last word's last character.

``"fine"``: this project's earlier object-phrase rule (deterministic, pure Python), finer than
the release's: the world's caption "There are two objects: a red circle, a blue square and a
star." is two ``released`` segments ("... a red circle," | "a blue square and a star.") but four
``fine`` ones, and "The red circle is left of the blue square." is one either way.

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
   holding no letter or digit is merged into the segment before it.

Both: every non-blank character lies in exactly one segment, and
``segment.text == text[segment.start:segment.end]`` with no white space at either end. Empty or
blank text gives ``[]``. Ending on the punctuation means a segment's reward sits on its "," or
"." token, as in Fine-Grained RLHF, which rewards each sub-sentence at its final token.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_SEGMENTATION",
    "LEGACY_SEGMENTATION",
    "MIN_SUBSENT_WORDS",
    "SEGMENTATIONS",
    "UNIT_STARTERS",
    "Segment",
    "char_to_token_end",
    "check_same_segmentation",
    "check_segmentation",
    "recorded_segmentation",
    "released_subsentence_starts",
    "sentence_spans",
    "split_segments",
]

#: The segmentation rules (see the module docstring); ``"released:<spaCy pipeline>"`` is
#: ``"released"`` with another sentence splitter.
SEGMENTATIONS: tuple[str, ...] = ("released", "fine")
#: What every consumer uses unless told otherwise: the released code's splitter.
DEFAULT_SEGMENTATION = "released"
#: What a record or export written before the segmentation was recorded used: the fine rule was
#: the only one then.
LEGACY_SEGMENTATION = "fine"
#: The released splitter's minimum sub-sentence length in words (``MIN_SUBSENT_WORDS``).
MIN_SUBSENT_WORDS = 5
#: The characters a word must end in for the released splitter to cut after it.
_SUBSENT_END = frozenset(",;!?")


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
    ["a", "an", "the", "another", "some", "no", "each", "every", "both", "all", "its", "their", "his", "her", "this", "that", "these", "those"]
    + ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    # pronouns and subordinators: a new clause
    + ["it", "they", "there", "here", "he", "she", "we", "i", "you", "which", "who", "where", "while", "whereas", "so", "then", "also"]
    # predicates and relation words: a clause whose subject is the sentence's subject
    + ["is", "are", "was", "were", "has", "have", "sits", "lies", "appears", "appear", "left", "right", "above", "below", "under", "beneath", "underneath", "over", "to", "on", "next", "near", "behind"]
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


def check_segmentation(spec: Any) -> str:
    """``spec`` if it names a segmentation: ``"released"``, ``"fine"`` or
    ``"released:<spaCy pipeline name or folder>"``; a ValueError saying what is accepted otherwise."""
    if isinstance(spec, str):
        if spec in SEGMENTATIONS:
            return spec
        name, sep, pipeline = spec.partition(":")
        if name == "released" and sep and pipeline.strip():
            return spec
    raise ValueError(f"segmentation must be one of {list(SEGMENTATIONS)} or 'released:<spaCy pipeline name or "
                     f"folder>', got {spec!r}")


def recorded_segmentation(config: Mapping[str, Any] | None) -> str:
    """The segmentation a record's annotations or an export's config says it used (key
    ``"segmentation"``); one written before the key existed used :data:`LEGACY_SEGMENTATION`."""
    got = (config or {}).get("segmentation")
    return LEGACY_SEGMENTATION if got is None else check_segmentation(got)


def check_same_segmentation(expected: str, got: str, what: str, strict: bool = True) -> None:
    """Refuse (``strict``: ValueError) or warn when ``what`` was made with segmentation ``got`` but
    is used with ``expected``: a reward model trained on one segmentation scores the segments of
    another at positions it never saw, and labels cut one way do not tile a response cut the
    other way. Two ``released`` specs that differ only in the spaCy pipeline are always a warning
    (the rule is the same; only a few sentence boundaries may move)."""
    if expected == got:
        return
    msg = (f"{what} used segmentation {got!r} but this run uses {expected!r}; pass the same segmentation "
           "everywhere (mmalign.segments)")
    same_rule = expected.partition(":")[0] == got.partition(":")[0]
    if strict and not same_rule:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=2)


@functools.lru_cache(maxsize=4)
def _spacy_pipeline(pipeline: str | None) -> Any:
    """spaCy: the blank English pipeline with the rule-based sentencizer (None), or
    ``spacy.load(pipeline)``. Cached: loading costs seconds, a call microseconds."""
    try:
        import spacy
    except ImportError as e:  # pragma: no cover - spaCy is a declared dependency
        raise ImportError("the 'released' segmentation needs spaCy (pip install spacy)") from e
    if pipeline is None:
        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        return nlp
    try:
        return spacy.load(pipeline)
    except OSError as e:
        raise OSError(f"segmentation 'released:{pipeline}': spaCy cannot load {pipeline!r} (a package name or a "
                      f"pipeline folder): {e}") from None


def sentence_spans(text: str, pipeline: str | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` of each spaCy sentence of ``text`` that holds a non-blank character
    (``pipeline`` None: blank English + sentencizer; else a spaCy pipeline name or folder)."""
    doc = _spacy_pipeline(pipeline)(text)
    return [(s.start_char, s.end_char) for s in doc.sents if s.text.strip()]


def released_subsentence_starts(words: Sequence[str], min_words: int = MIN_SUBSENT_WORDS) -> list[int]:
    """Indices of the words of one sentence that start a sub-sentence, by the released rule
    (module docstring, rule 3): always 0; ``j`` when ``words[j - 1]`` ends in ``, ; ! ?``,
    ``len(words) - j > min_words`` and the current piece has ``min_words`` or more words; a
    shorter piece that is not the sentence's first moves the previous start to ``j``."""
    starts = [0] if words else []
    n = len(words)
    for j in range(1, n):
        if words[j - 1][-1] not in _SUBSENT_END or n - j <= min_words:
            continue
        if j - starts[-1] >= min_words:
            starts.append(j)
        elif starts[-1] > 0:
            starts[-1] = j  # the short piece joins the sub-sentence before it
    return starts


def _split_released(text: str, pipeline: str | None) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for s, e in sentence_spans(text, pipeline):
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text[s:e])]
        starts = released_subsentence_starts([text[s + a:s + b] for a, b in words])
        for k, j in enumerate(starts):
            last = (starts[k + 1] if k + 1 < len(starts) else len(words)) - 1
            spans.append((s + words[j][0], s + words[last][1]))
    return spans


def split_segments(text: str, segmentation: str = DEFAULT_SEGMENTATION) -> list[Segment]:
    """Cut ``text`` into sub-sentence segments by ``segmentation`` (the module docstring has both
    rules; :func:`check_segmentation` the accepted specs).

    >>> [s.text for s in split_segments("There are two objects: a red circle, a blue square and a star. It is")]
    ['There are two objects: a red circle,', 'a blue square and a star.', 'It is']
    >>> [s.text for s in split_segments("There are two objects: a red circle, a blue square and a star. It is", "fine")]
    ['There are two objects:', 'a red circle,', 'a blue square', 'and a star.', 'It is']
    """
    if not isinstance(text, str):
        raise TypeError(f"split_segments() needs a string, got {type(text).__name__}")
    spec = check_segmentation(segmentation)
    if not text.strip():
        return []
    if spec == "fine":
        spans = _split_fine(text)
    else:
        spans = _split_released(text, spec.partition(":")[2] or None)
    return [Segment(i, a, b, text[a:b]) for i, (a, b) in enumerate(spans)]


def _split_fine(text: str) -> list[tuple[int, int]]:
    """The ``fine`` rule's ``[start, end)`` spans (module docstring)."""
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
    return [(a, b) for a, b in spans]


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
