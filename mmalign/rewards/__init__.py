"""Reward models at use time: what PPO, the scoring stages and the evaluation load and call.

Training lives in :mod:`mmalign.methods` (``reward.RewardModule``, ``fg_reward.FGRewardModule``);
this package holds what a *trained* reward model is: its head, its export format, loading it back
and scoring with it. Nothing here imports a method, so a stage that only uses a reward model
never pulls in a LightningModule.

* :mod:`mmalign.rewards.critique`: MM-RLHF's critique reward model and the scalar Bradley-Terry
  baseline (:class:`~mmalign.rewards.critique.RewardModel`, ``load_reward_model``,
  ``RewardScorer``).
* :mod:`mmalign.rewards.fine_grained`: FGAIF's per-segment reward models
  (:class:`~mmalign.rewards.fine_grained.FGRewardModel`, ``load_fg_reward_model``).

A *segment reward model* is anything that turns responses into one reward per sub-sentence
segment and hallucination type -- :class:`SegmentRewardModel`. The trained fine-grained models
implement it, and so does the scene-graph oracle (:class:`mmalign.oracle.OracleSegmentRewards`),
which is how PPO runs with perfect rewards as a control.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from mmalign.feedback import HALLUCINATION_TYPES, LABELS

if TYPE_CHECKING:  # torch is imported where it is used: the oracle's users need not load it
    import torch

#: The classes of a segment label, in index order: the feedback stage's labels.
CLASSES: tuple[str, ...] = LABELS
#: The reward of each class (PPO maximises it, so a hallucination costs): hallucinated -1, n/a 0,
#: correct +1. These are rewards, not the released FGAIF data's label *codes*, which are
#: +1 = hallucinated, 0 = clean, -1 = not applicable (class index = code + 1; see
#: :mod:`mmalign.methods.fg_reward`); labels are named here, so no code is ever read as a reward.
VALUES: dict[str, float] = {"hallucinated": -1.0, "n/a": 0.0, "correct": 1.0}
#: Record keys (PreferenceRecord meta) of the reference critiques a critique reward model is trained
#: and checked on, as the prefs stage writes them.
CRITIQUE_KEYS = {"chosen": "critique_chosen", "rejected": "critique_rejected"}
#: How class probabilities become a reward: the most probable class's value, or the expectation.
RewardForm = Literal["label", "expected"]


@dataclass
class SegmentItem:
    """One response to score, segment by segment.

    Attributes:
        images: image paths or decoded PIL images, one per image part of ``prompt``.
        prompt: the prompt messages (TRL format), or the question as a string (then one image
            part per image goes first).
        response: the text; its segments are :func:`mmalign.segments.split_segments` of it, with
            the segmentation of the model that scores it.
        id: for error messages.
    """

    images: list[Any]
    prompt: list[dict] | str
    response: str
    id: str = ""

    def messages(self) -> list[dict]:
        return prompt_messages(self.prompt, len(self.images))


def prompt_messages(prompt: list[dict] | str, n_images: int) -> list[dict]:
    """A prompt as messages: given messages as they are; a question string as one user turn with
    ``n_images`` image parts first."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]
    return prompt


@runtime_checkable
class SegmentRewardModel(Protocol):
    """What FGAIF's PPO needs from a reward source: per item and type, one reward per segment.

    ``segment_rewards(items)[i][t]`` is a float tensor ``(S_i,)`` over the segments of
    ``split_segments(items[i].response, segmentation)`` (``(0,)`` for an empty response), with
    values in :data:`VALUES` for ``mode="label"``; ``types`` names the hallucination types it can
    score and ``segmentation`` (:mod:`mmalign.segments`) how it cuts a response: PPO refuses a
    model whose segmentation is not its own.
    """

    types: Sequence[str]
    segmentation: str

    def segment_rewards(self, items: Sequence[SegmentItem], mode: RewardForm = "label", batch_size: int = 16,
                        types: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]: ...

    def to(self, device: Any) -> Any: ...


def check_types(types: Sequence[str] | str) -> list[str]:
    """``types`` as a list if it is a non-empty subset of the hallucination types without
    repeats; a ValueError otherwise."""
    if isinstance(types, str):
        types = [types]
    types = list(types)
    bad = [t for t in types if t not in HALLUCINATION_TYPES]
    if not types or bad or len(set(types)) != len(types):
        raise ValueError(f"types must be a non-empty list of distinct entries of {list(HALLUCINATION_TYPES)}, "
                         f"got {types}")
    return types


def value_vector(device: torch.device | None = None) -> torch.Tensor:
    """:data:`VALUES` in :data:`CLASSES` order, ``(3,)`` float32."""
    import torch

    return torch.tensor([VALUES[c] for c in CLASSES], dtype=torch.float32, device=device)


def rewards_from_labels(segments: Sequence[Any], types: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per type the :data:`VALUES` of labelled segments (each with ``labels[type]``, as
    :class:`mmalign.feedback.SegmentFeedback`): ``(S,)`` float32. The segment rewards of a source
    that gives labels, not probabilities (the oracle, a judge)."""
    import torch

    return {t: torch.tensor([VALUES[s.labels[t]] for s in segments], dtype=torch.float32) for t in types}


def rewards_from_probs(probs: torch.Tensor, mode: RewardForm = "label") -> torch.Tensor:
    """Class probabilities ``(..., 3)`` -> segment rewards ``(...)``.

    ``"label"``: the :data:`VALUES` entry of the most probable class (FGAIF's discrete reward);
    ``"expected"``: ``sum_c p_c * VALUES[c]``."""
    if probs.shape[-1] != len(CLASSES):
        raise ValueError(f"probabilities must end in {len(CLASSES)} classes, got {tuple(probs.shape)}")
    values = value_vector(probs.device)
    if mode == "label":
        return values[probs.argmax(-1)]
    if mode == "expected":
        return probs.float() @ values
    raise ValueError(f"mode must be 'label' or 'expected', not {mode!r}")
