"""Conditions for DRESS's conditional RL: a rating from feedback -> a control text in the prompt.

DRESS (Chen et al. 2024, "DRESS: Instructing Large Vision-Language Models to Align and Interact
with Humans via Natural Language Feedback") "generalize[s] conditional reinforcement learning": it
trains the model "to produce corresponding responses conditioned on the NLF using language
modeling loss on the responses" (project page, dresslvlm.github.io). Its released NLF data
(huggingface.co/datasets/YangyiYY/LVLM_NLF) gives every model turn a ``rating`` and a critique.
How a rating becomes the condition is not in the sources we could read, so this module makes the
choice explicit and configurable, in the style of Quark / Chain-of-Hindsight control codes:

* a feedback score in [0, 1] is cut into levels by ascending ``thresholds`` (``level = number of
  thresholds <= score``), one level name per interval (``names``, worst first);
* the condition is the text ``template.format(name=...)`` put before the first text part of the
  first user turn;
* at inference the model gets the best level's condition (:func:`best_condition`).

Everything here is pure: the data stage, the trainer and the evaluation call the same functions,
so the condition a model was trained with is exactly the one it is asked with.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CONDITION_FILE", "ConditionScheme", "load_scheme", "with_condition"]

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
        return {"thresholds": list(self.thresholds), "names": list(self.names), "template": self.template}

    @classmethod
    def from_dict(cls, d: dict) -> ConditionScheme:
        return cls(thresholds=tuple(d["thresholds"]), names=tuple(d["names"]), template=d["template"])


def load_scheme(model_dir: str | os.PathLike) -> ConditionScheme | None:
    """The condition scheme saved with a conditioned model (``dress_condition.json``), or None
    for a model trained without conditions. A malformed file is a ValueError naming it."""
    path = Path(model_dir) / CONDITION_FILE
    if not path.is_file():
        return None
    try:
        return ConditionScheme.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a condition scheme: {e}") from None


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
