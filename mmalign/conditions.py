"""Conditions for DRESS's conditional RL: a rating from feedback -> a control text in the prompt.

DRESS (Chen et al. 2024, "DRESS: Instructing Large Vision-Language Models to Align and Interact
with Humans via Natural Language Feedback") "generalize[s] conditional reinforcement learning": it
trains the model "to produce corresponding responses conditioned on the NLF using language
modeling loss on the responses" (project page, dresslvlm.github.io). Its released NLF data
(huggingface.co/datasets/YangyiYY/LVLM_NLF) gives every model turn a ``rating`` and a critique.
Two ways to turn feedback into the condition, each a small frozen scheme with the same interface
(``best()``, ``to_dict()``), saved beside a trained model as ``dress_condition.json``, and a third
mode, no condition, for the ablation that measures them:

* :class:`FeedbackCondition` (``mode: feedback``, the default of the data stage and the trainer):
  the paper's reading, "conditioned on the NLF": the condition is the critique text itself,
  ``template.format(feedback=critique)`` (default ``"Feedback: {feedback}"``). At inference the
  model is asked with a *good-feedback text*, the critique a fully correct answer gets
  (:func:`derive_good_feedback`: the sentences shared by most top-rated critiques of the training
  data, e.g. the oracle's "There is no hallucination in the answer."), stored in the scheme.
* :class:`ConditionScheme` (``mode: rating``, no ``mode`` key in its file): a control code of
  the rating, in the style of Quark / Chain-of-Hindsight. A feedback score in [0, 1] is cut into
  levels by ascending ``thresholds`` (``level = number of thresholds <= score``), one level name
  per interval (``names``, worst first); the condition is ``template.format(name=...)``; at
  inference the model gets the best level's condition. How a rating becomes a condition is not
  in the sources we could read, so this choice is explicit and configurable.
* :class:`NoCondition` (``mode: none``): no condition text at all, the *unconditioned ablation*:
  the same records trained as plain SFT on the responses, which measures what conditioning on
  the feedback adds (DRESS's claim). Nothing is saved beside such a model (no
  ``dress_condition.json``; :func:`load_scheme` also reads a file of mode none as no scheme),
  so evaluation asks it plainly.

Either condition text goes before the first text part of a user turn (:func:`with_condition`).
Everything here is pure: the data stage, the trainer and the evaluation call the same functions,
so the condition a model was trained with is exactly the one it is asked with.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Union

__all__ = ["CONDITION_FILE", "CONDITION_MODES", "Condition", "ConditionScheme", "FeedbackCondition",
           "NoCondition", "derive_good_feedback", "load_scheme", "scheme_from_dict", "split_sentences", "with_condition"]

#: written beside an exported conditioned model (DRESSModule); evaluation reads it to ask the model
#: with its best condition, as at inference
CONDITION_FILE = "dress_condition.json"


@dataclass(frozen=True)
class ConditionScheme:
    """How feedback scores become condition texts.

    Attributes:
        thresholds: ascending cut points in [0, 1]; ``len(names) == len(thresholds) + 1``.
        names: one name per level, worst first (the last is what inference asks for).
        template: the condition text, with ``{name}``.
    """

    thresholds: Sequence[float] = (0.75,)
    names: Sequence[str] = ("bad", "good")
    template: str = "Answer quality: {name}."
    mode: ClassVar[str] = "rating"

    def __post_init__(self) -> None:
        t = list(self.thresholds)
        if len(self.names) != len(t) + 1:
            raise ValueError(f"need one name per level: {len(t)} threshold(s) make {len(t) + 1} levels, "
                             f"got names {list(self.names)}")
        if any(not (0.0 <= x <= 1.0) for x in t) or t != sorted(t) or len(set(t)) != len(t):
            raise ValueError(f"thresholds must be strictly ascending numbers in [0, 1], got {t}")
        if len(set(self.names)) != len(self.names) or any(not n.strip() for n in self.names):
            raise ValueError(f"level names must be distinct and non-empty, got {list(self.names)}")
        if "{name}" not in self.template:
            raise ValueError(f"template must contain {{name}}, got {self.template!r}")

    def level(self, score: float) -> int:
        """The level of ``score`` (0 = worst): how many thresholds are <= it."""
        if score is None or not math.isfinite(float(score)):
            raise ValueError(f"a condition needs a finite score, got {score!r}")
        return bisect.bisect_right(list(self.thresholds), float(score))

    def name(self, score: float) -> str:
        return self.names[self.level(score)]

    def text(self, name: str) -> str:
        """The condition text of a level name."""
        if name not in self.names:
            raise ValueError(f"unknown condition {name!r}; levels are {list(self.names)}")
        return self.template.format(name=name)

    def for_score(self, score: float) -> str:
        return self.text(self.name(score))

    def best(self) -> str:
        """The condition inference asks for: the best level's text."""
        return self.text(self.names[-1])

    def to_dict(self) -> dict:
        # no "mode" key: files written before feedback conditions existed read back unchanged
        return {"thresholds": list(self.thresholds), "names": list(self.names), "template": self.template}

    @classmethod
    def from_dict(cls, d: dict) -> ConditionScheme:
        return cls(thresholds=tuple(d["thresholds"]), names=tuple(d["names"]), template=d["template"])


@dataclass(frozen=True)
class FeedbackCondition:
    """Condition on the feedback text itself (DRESS's "conditioned on the NLF").

    Attributes:
        template: the condition text, with ``{feedback}`` (the critique, stripped).
        good_feedback: the feedback text inference asks with (:meth:`best`); None until known
            (the data stage and the trainer derive it with :func:`derive_good_feedback`).
    """

    template: str = "Feedback: {feedback}"
    good_feedback: str | None = None
    mode: ClassVar[str] = "feedback"

    def __post_init__(self) -> None:
        try:
            ok = self.template.format(feedback="x") != self.template
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"feedback template {self.template!r}: only {{feedback}} may be a field ({e})") from None
        if not ok or "{feedback}" not in self.template:
            raise ValueError(f"feedback template must contain {{feedback}}, got {self.template!r}")
        if self.good_feedback is not None and (not isinstance(self.good_feedback, str)
                                               or not self.good_feedback.strip()):
            raise ValueError(f"good_feedback must be a non-empty text or None, got {self.good_feedback!r}")

    def text(self, feedback: str | None) -> str:
        """The condition text of a critique; a missing or blank critique is a ValueError (there is
        nothing to condition on)."""
        if not isinstance(feedback, str) or not feedback.strip():
            raise ValueError(f"a feedback condition needs a critique text, got {feedback!r}")
        return self.template.format(feedback=feedback.strip())

    def best(self) -> str:
        """The condition inference asks with: the good-feedback text's."""
        if self.good_feedback is None:
            raise ValueError("this feedback condition has no good-feedback text (derive_good_feedback, or give one)")
        return self.text(self.good_feedback)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "template": self.template, "good_feedback": self.good_feedback}

    @classmethod
    def from_dict(cls, d: dict) -> FeedbackCondition:
        return cls(template=d["template"], good_feedback=d.get("good_feedback"))


@dataclass(frozen=True)
class NoCondition:
    """No condition (``mode: none``): DRESS's unconditioned ablation.

    The records keep every message as the policy saw it (no condition text anywhere) and carry
    ``condition: null``; the trainer fits them as plain SFT on the responses (revisions), so
    comparing it with a conditioned model on the same records isolates what the condition adds.
    Inference asks with nothing (:meth:`best` is empty).
    """

    mode: ClassVar[str] = "none"

    def best(self) -> str:
        """The condition inference asks with: none."""
        return ""

    def to_dict(self) -> dict:
        return {"mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict) -> NoCondition:
        extra = sorted(set(d) - {"mode"})
        if extra:  # a stray field would mean someone expected it to do something
            raise ValueError(f"condition mode none takes no settings, got {extra}")
        return cls()


#: a condition scheme of any mode
Condition = Union[ConditionScheme, FeedbackCondition, NoCondition]  # noqa: UP007 (a runtime alias)
CONDITION_MODES = ("feedback", "rating", "none")


def scheme_from_dict(d: dict) -> Condition:
    """The scheme of a ``to_dict()`` (``mode`` "feedback", "none", or "rating" / absent)."""
    mode = d.get("mode", "rating")
    if mode == "feedback":
        return FeedbackCondition.from_dict(d)
    if mode == "rating":
        return ConditionScheme.from_dict(d)
    if mode == "none":
        return NoCondition.from_dict(d)
    raise ValueError(f"unknown condition mode {mode!r}; modes are {list(CONDITION_MODES)}")


def load_scheme(model_dir: str | os.PathLike) -> ConditionScheme | FeedbackCondition | None:
    """The condition scheme saved with a conditioned model (``dress_condition.json``), or None
    for a model trained without conditions: no such file (what a DRESS export with ``condition:
    none`` leaves), or a file of mode none (read the same way, so every reader asks such a model
    plainly). A malformed file, or a feedback scheme without its good-feedback text (inference
    could not ask it), is a ValueError naming it."""
    path = Path(model_dir) / CONDITION_FILE
    if not path.is_file():
        return None
    try:
        scheme = scheme_from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a condition scheme: {e}") from None
    if isinstance(scheme, NoCondition):
        return None
    if isinstance(scheme, FeedbackCondition) and scheme.good_feedback is None:
        raise ValueError(f"{path}: a feedback condition without good_feedback; inference has no text to ask with")
    return scheme


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """``text`` cut after every ``.``, ``!`` or ``?`` followed by white space; blank parts dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


#: a sentence is part of the good-feedback text when more than this share of top-rated critiques say it
GOOD_FEEDBACK_SHARE = 0.5


def derive_good_feedback(examples: Iterable[tuple[float, str | None]],
                         min_share: float = GOOD_FEEDBACK_SHARE) -> tuple[str, dict]:
    """The good-feedback text inference asks a feedback-conditioned model with, from the
    ``(score, critique)`` pairs of the training data's critique examples, and how it was found.

    Rule: the *top-rated* examples are those with the highest score among examples with a
    critique (scores compared after rounding to 1e-9). Each top-rated critique is cut into
    sentences (:func:`split_sentences`, a sentence counted once per critique); the text is the
    sentences said by more than ``min_share`` of them (default: a majority), ordered by their mean relative position
    in those critiques (0 = first sentence, 1 = last), ties by text. A critique of a fully correct
    answer names what it got right ("The large red circle is correct.", different per scene) and
    then says a fixed verdict ("There is no hallucination in the answer."); this keeps the verdict
    and drops the scene-specific part, which at inference would name objects of another image.
    When no sentence passes ``min_share``, the most frequent whole top-rated critique is used
    (ties: the first in input order) and the returned info says so.

    Returns ``(text, info)``: info has ``rule`` ("shared sentences" or "most frequent critique"),
    ``top_score``, ``top_examples``, ``min_share`` and ``sentences`` (each chosen sentence's share).
    A ValueError when no example has a critique.
    """
    if not 0 <= min_share < 1:
        raise ValueError(f"min_share must be in [0, 1), got {min_share}")
    pairs = [(round(float(s), 9), c.strip()) for s, c in examples
             if isinstance(c, str) and c.strip() and s is not None and math.isfinite(float(s))]
    if not pairs:
        raise ValueError("no critique example with a critique text and a score: no good-feedback text to derive")
    top = max(s for s, _ in pairs)
    crits = [c for s, c in pairs if s == top]
    share: Counter = Counter()
    position: dict[str, list[float]] = {}
    for c in crits:
        sents = list(dict.fromkeys(split_sentences(c)))
        for i, x in enumerate(sents):
            share[x] += 1
            position.setdefault(x, []).append(i / (len(sents) - 1) if len(sents) > 1 else 0.0)
    chosen = [x for x, n in share.items() if n / len(crits) > min_share]
    info = {"top_score": top, "top_examples": len(crits), "min_share": min_share}
    if chosen:
        chosen.sort(key=lambda x: (sum(position[x]) / len(position[x]), x))
        return " ".join(chosen), {**info, "rule": "shared sentences",
                                  "sentences": {x: round(share[x] / len(crits), 4) for x in chosen}}
    counts = Counter(crits)
    best = max(counts.values())
    text = next(c for c in crits if counts[c] == best)
    return text, {**info, "rule": "most frequent critique", "sentences": {text: round(best / len(crits), 4)}}


def with_condition(messages: Sequence[dict], condition: str, turn: str = "first") -> list[dict]:
    """A copy of chat ``messages`` with ``condition`` (and a space) before the first text of the
    ``turn`` ("first" or "last") user turn; a user turn without text gets a text part after its
    images. ``condition`` empty returns an unchanged copy. Multi-turn refinement episodes put the
    revision's condition in the last user turn (the one carrying the refinement feedback)."""
    if turn not in ("first", "last"):
        raise ValueError(f"turn must be 'first' or 'last', not {turn!r}")
    out = copy.deepcopy(list(messages))
    if not condition:
        return out
    users = [m for m in out if m.get("role") == "user"]
    if not users:
        raise ValueError("no user turn to put the condition in")
    m = users[-1] if turn == "last" else users[0]
    content = m["content"]
    if isinstance(content, str):
        m["content"] = f"{condition} {content}"
        return out
    for part in content:
        if part.get("type") == "text":
            part["text"] = f"{condition} {part['text']}"
            return out
    content.append({"type": "text", "text": condition})
    return out
