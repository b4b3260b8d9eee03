"""Feedback sources: anything that reads (image, prompt, response) items and returns feedback.

A *feedback source* is a judge model, a reward model, a rule-based checker or a human-label file
behind one interface: :meth:`FeedbackSource.annotate` takes a sequence of :class:`FeedbackItem`
and returns one :class:`Feedback` per item, in the same order. Stages that build preference
pairs or critiques only see this interface, never a model family (``mmalign`` never imports
``models``; concrete sources such as ``models.judge.MMHalJudge`` live there).

Response-level scores go in ``Feedback.scores`` by name (e.g. ``{"mmhal_rating": 4.0}``); a source
that writes natural-language feedback (DRESS-style critique and refinement) fills ``critique`` /
``refinement``. :func:`check_feedback` is the one validation every caller runs on what a source
returned: right count, right ids in the right order, finite numeric scores.

Fine-grained feedback (FGAIF, Jing & Du 2024, "FGAIF: Aligning Large Vision-Language Models with
Fine-grained AI Feedback"): a response is cut into sub-sentence segments
(:func:`mmalign.segments.split_segments`; the source's ``segmentation``, by default the released
FGAIF / Fine-Grained RLHF splitter, which the feedback stage records beside the labels as
``annotations.segmentation``) and each segment gets one label per hallucination type
(object existence, attribute, relation) -- :class:`SegmentFeedback` in ``Feedback.segments``. The
labels come from checkable :class:`Claim` s (atomic facts, each with a yes/no question whose true
answer is "yes" iff it holds), see :mod:`mmalign.oracle`. :func:`feedback_to_json` /
:func:`feedback_from_json` turn a :class:`Feedback` into a JSON-able dict and back, for records.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


#: The hallucination types of FGAIF (object existence, object attribute, object relation).
HALLUCINATION_TYPES: tuple[str, ...] = ("object", "attribute", "relation")
#: A segment's label for one type: it holds a false claim of that type ("hallucinated"), only
#: true ones ("correct"), or no checkable claim of that type ("n/a").
LABELS: tuple[str, ...] = ("hallucinated", "correct", "n/a")


class FeedbackError(ValueError):
    """A feedback source returned something malformed; the message names the item id."""


@dataclass(frozen=True)
class Claim:
    """One checkable statement of a response (an "atomic fact" in FGAIF's terms).

    Attributes:
        type: one of :data:`HALLUCINATION_TYPES`.
        text: the surface text, e.g. "a large red star"; ``response[start:end] == text``.
        start, end: character offsets into the response.
        question: a yes/no question whose true answer is "yes" iff the claim holds, phrased like
            the world's training questions ("Is there a star in the image?", "Is there a red star
            in the image?", "Is the red star large?", "Is the red circle left of the blue
            square?"), so a VQA model can check it as FGAIF does with LLaVA.
        meta: the claim, structured: ``{"shape"}`` (object), ``{"shape", "color"}`` /
            ``{"shape", "color", "size"}`` / with ``"count"`` (attribute; unstated ones None),
            ``{"subject", "relation", "object"}`` (relation; sides as names such as "red circle").
            Sources may add keys (e.g. the oracle's ``"wrong"`` / ``"actual"`` hints).
    """

    type: str
    text: str
    start: int
    end: int
    question: str
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.type not in HALLUCINATION_TYPES:
            raise ValueError(f"claim {self.text!r}: unknown type {self.type!r}; expected one of {HALLUCINATION_TYPES}")
        if not 0 <= self.start <= self.end:
            raise ValueError(f"claim {self.text!r}: bad span [{self.start}, {self.end})")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "text": self.text, "start": self.start, "end": self.end,
                "question": self.question, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Claim":
        return cls(type=d["type"], text=d["text"], start=int(d["start"]), end=int(d["end"]),
                   question=d["question"], meta=dict(d.get("meta") or {}))


@dataclass
class SegmentFeedback:
    """Labels for one sub-sentence segment of a response (FGAIF's unit of reward).

    Attributes:
        index: position of the segment in the response (0, 1, ...).
        start, end: character offsets into the response; ``response[start:end] == text``.
        text: the segment text.
        labels: every type in :data:`HALLUCINATION_TYPES` -> one of :data:`LABELS`.
        claims: the claims assigned to this segment (those whose end offset lies in it).
        verdicts: per claim, True (holds), False (hallucinated) or None (cannot be checked).
    """

    index: int
    start: int
    end: int
    text: str
    labels: dict[str, str]
    claims: list[Claim] = field(default_factory=list)
    verdicts: list[bool | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "start": self.start, "end": self.end, "text": self.text,
                "labels": dict(self.labels), "claims": [c.to_dict() for c in self.claims],
                "verdicts": list(self.verdicts)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SegmentFeedback":
        return cls(index=int(d["index"]), start=int(d["start"]), end=int(d["end"]), text=d["text"],
                   labels=dict(d["labels"]), claims=[Claim.from_dict(c) for c in d.get("claims") or ()],
                   verdicts=list(d.get("verdicts") or ()))


@dataclass(frozen=True)
class FeedbackItem:
    """One response to be judged.

    Attributes:
        id: unique within a call to ``annotate``; the returned :class:`Feedback` carries it back.
        prompt: the question / instruction the response answers.
        response: the text being judged.
        image: resolved image file path, or None for a text-only item.
        reference: a reference answer / ground-truth description, when known.
        meta: anything else a source may use (e.g. MMHal's ``image_content`` list) or a caller
            wants carried along (e.g. ``source`` = where the item was read from).
    """

    id: str
    prompt: str
    response: str
    image: str | None = None
    reference: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)  # items hash by their other fields


def prompt_text(messages: list[dict]) -> str:
    """The :attr:`FeedbackItem.prompt` of a chat prompt: the text parts of its user turns, joined
    by spaces (images and assistant turns left out)."""
    parts = [p["text"] for m in messages if m["role"] == "user" for p in m["content"]
             if isinstance(p, dict) and p.get("type") == "text"]
    return " ".join(parts)


@dataclass
class Feedback:
    """What a source says about one item.

    Attributes:
        id: the :attr:`FeedbackItem.id` it answers.
        scores: response-level scores by name, e.g. ``{"mmhal_rating": 4.0, "mmhal_expected": 3.7}``.
        critique: natural-language critique (DRESS), when the source writes one.
        refinement: how to fix the response (DRESS), when the source writes one.
        raw: the source's raw output, for inspection.
        meta: source-specific extras (e.g. the judge's digit distribution).
        segments: fine-grained (FGAIF-style) per-segment labels, when the source writes them.
    """

    id: str
    scores: dict[str, float]
    critique: str | None = None
    refinement: str | None = None
    raw: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    segments: list[SegmentFeedback] | None = None


def feedback_to_json(fb: Feedback) -> dict[str, Any]:
    """A JSON-able dict of ``fb`` (claims and segments as nested dicts); inverse of
    :func:`feedback_from_json`. ``meta`` is copied as it is, so it must be JSON-able itself."""
    return {"id": fb.id, "scores": dict(fb.scores), "critique": fb.critique, "refinement": fb.refinement,
            "raw": fb.raw, "meta": dict(fb.meta),
            "segments": None if fb.segments is None else [s.to_dict() for s in fb.segments]}


def feedback_from_json(d: Mapping[str, Any]) -> Feedback:
    """Rebuild a :class:`Feedback` from :func:`feedback_to_json` output; a missing key or a
    malformed segment is a :class:`FeedbackError` naming the id."""
    fid = d.get("id")
    try:
        segs = d.get("segments")
        return Feedback(id=str(d["id"]), scores=dict(d["scores"]), critique=d.get("critique"),
                        refinement=d.get("refinement"), raw=d.get("raw"), meta=dict(d.get("meta") or {}),
                        segments=None if segs is None else [SegmentFeedback.from_dict(s) for s in segs])
    except (KeyError, TypeError, ValueError) as e:
        raise FeedbackError(f"feedback record {fid!r}: malformed ({type(e).__name__}: {e})") from None


@runtime_checkable
class FeedbackSource(Protocol):
    """Anything with a ``name`` and ``annotate(items) -> list[Feedback]`` (same order, same length)."""

    name: str

    def annotate(self, items: Sequence[FeedbackItem]) -> list[Feedback]: ...


def check_feedback(items: Sequence[FeedbackItem], feedback: Sequence[Feedback], source: str = "") -> list[Feedback]:
    """Validate a source's answer to ``items``; return it as a list.

    Raises :class:`FeedbackError` when the count differs, an entry is not a :class:`Feedback`,
    an id does not match its item (order matters), or a score is not a finite real number
    (NaN/inf, bools and strings are refused), naming the item id and the score. When
    ``segments`` is set, each must be a :class:`SegmentFeedback` whose labels give every type in
    :data:`HALLUCINATION_TYPES` a value in :data:`LABELS`, with one verdict per claim.
    """
    who = f"feedback source {source!r}" if source else "feedback source"
    feedback = list(feedback)
    if len(feedback) != len(items):
        raise FeedbackError(f"{who} returned {len(feedback)} feedback entries for {len(items)} items")
    for i, (item, fb) in enumerate(zip(items, feedback)):
        if not isinstance(fb, Feedback):
            raise FeedbackError(f"{who}: entry {i} (item {item.id!r}) is a {type(fb).__name__}, not a Feedback")
        if fb.id != item.id:
            raise FeedbackError(
                f"{who}: entry {i} has id {fb.id!r} but item {i} is {item.id!r} "
                "(feedback must come back in the order of the items)")
        if not isinstance(fb.scores, dict):
            raise FeedbackError(f"{who}: item {item.id!r}: scores must be a dict, got {type(fb.scores).__name__}")
        for name, value in fb.scores.items():
            if not isinstance(name, str):
                raise FeedbackError(f"{who}: item {item.id!r}: score name {name!r} is not a string")
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise FeedbackError(
                    f"{who}: item {item.id!r}: score {name!r} must be a number, got {type(value).__name__}")
            if not math.isfinite(float(value)):
                raise FeedbackError(f"{who}: item {item.id!r}: score {name!r} is {value} (NaN/inf scores are not allowed)")
        if fb.segments is not None:
            _check_segments(fb.segments, f"{who}: item {item.id!r}")
    return feedback


def _check_segments(segments: Any, where: str) -> None:
    if not isinstance(segments, list):
        raise FeedbackError(f"{where}: segments must be a list, got {type(segments).__name__}")
    for k, seg in enumerate(segments):
        if not isinstance(seg, SegmentFeedback):
            raise FeedbackError(f"{where}: segment {k} is a {type(seg).__name__}, not a SegmentFeedback")
        if not isinstance(seg.labels, dict) or set(seg.labels) != set(HALLUCINATION_TYPES):
            got = sorted(seg.labels) if isinstance(seg.labels, dict) else type(seg.labels).__name__
            raise FeedbackError(f"{where}: segment {k}: labels must have exactly the keys {HALLUCINATION_TYPES}, got {got}")
        for t, lab in seg.labels.items():
            if lab not in LABELS:
                raise FeedbackError(f"{where}: segment {k}: {t} label {lab!r} is not one of {LABELS}")
        if len(seg.verdicts) != len(seg.claims):
            raise FeedbackError(f"{where}: segment {k}: {len(seg.claims)} claims but {len(seg.verdicts)} verdicts")
        for v in seg.verdicts:
            if v is not True and v is not False and v is not None:
                raise FeedbackError(f"{where}: segment {k}: verdict {v!r} must be True, False or None")


def item_where(item: FeedbackItem) -> str:
    """How an error names an item: its id, and where it was read from when known."""
    source = item.meta.get("source") if item.meta else None
    return f"item {item.id!r}" + (f" ({source})" if source else "")


def check_items(source: str, items: Sequence[FeedbackItem], need_image: str | None = None) -> None:
    """What every source checks before it runs: FeedbackItems with unique ids, and, when
    ``need_image`` (the reason, used in the error) is given, an existing image file per item."""
    from pathlib import Path

    from mmalign.records import RecordError

    seen = set()
    for it in items:
        if not isinstance(it, FeedbackItem):
            raise TypeError(f"{source}: items must be FeedbackItem, got {type(it).__name__}")
        if it.id in seen:
            raise FeedbackError(f"{source}: duplicate item id {it.id!r}")
        seen.add(it.id)
    if need_image:
        for it in items:
            if not it.image:
                raise RecordError(f"{item_where(it)}: {need_image}, but the item has no image path")
            if not Path(it.image).is_file():
                raise RecordError(f"{item_where(it)}: image {it.image} not found")
