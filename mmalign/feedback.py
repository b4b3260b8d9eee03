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
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class FeedbackError(ValueError):
    """A feedback source returned something malformed; the message names the item id."""


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
    """

    id: str
    scores: dict[str, float]
    critique: str | None = None
    refinement: str | None = None
    raw: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class FeedbackSource(Protocol):
    """Anything with a ``name`` and ``annotate(items) -> list[Feedback]`` (same order, same length)."""

    name: str

    def annotate(self, items: Sequence[FeedbackItem]) -> list[Feedback]: ...


def check_feedback(items: Sequence[FeedbackItem], feedback: Sequence[Feedback], source: str = "") -> list[Feedback]:
    """Validate a source's answer to ``items``; return it as a list.

    Raises :class:`FeedbackError` when the count differs, an entry is not a :class:`Feedback`,
    an id does not match its item (order matters), or a score is not a finite real number
    (NaN/inf, bools and strings are refused), naming the item id and the score.
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
    return feedback
