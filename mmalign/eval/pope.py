"""POPE question sets built from per-image ground truth (Li et al. 2023).

POPE ("Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023) asks
balanced yes/no questions "Is there a <object> in the image?": for every image, ``k`` objects
that are in it (answer yes) and ``k`` that are not (answer no). The three splits differ only in
how the absent objects are chosen:

* ``random``: uniformly among the absent objects;
* ``popular``: the absent objects that are most frequent over the whole data set;
* ``adversarial``: the absent objects that most often co-occur with the image's objects
  (score of an absent object ``a`` = sum over present objects ``p`` of ``cooc(p, a)``, the number
  of images holding both).

The positives of an image are the same in every split (drawn with a seed that does not depend on
the split), so the splits' differences come from the negatives alone, as in POPE. Ties in the
popular/adversarial rankings are broken by a seeded shuffle, never by name order, so alphabet
position cannot bias a split.

:func:`pick_negatives` is the one selection routine; the world's attribute and relation splits
(:mod:`mmalign.eval.world_bench`) reuse it with their own scores ("built the same way").
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")
POPE_TEMPLATE = "Is there {a} {object} in the image?"

T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True)
class YesNoQuestion:
    """One yes/no question about one image (POPE's ``question_id, image, text, label`` plus meta).

    ``meta`` holds what a report breaks results down by: ``kind`` (existence / attribute /
    relation), ``split`` (random / popular / adversarial), ``target`` (the object or claim asked
    about) and, for negatives, how it was chosen.
    """

    question_id: str
    image: str
    text: str
    label: bool
    meta: Mapping[str, Any] = field(default_factory=dict)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def stable_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded by a hash of ``parts`` (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass
class ObjectStats:
    """Object frequency and pairwise co-occurrence over a set of images.

    ``freq[o]`` = images containing ``o``; ``cooc[(a, b)]`` (= ``cooc[(b, a)]``) = images
    containing both. POPE takes both from the annotations of the images it evaluates; pass a
    different set (e.g. the training scenes) to :func:`build_pope` as ``stats`` to rank by that.
    """

    freq: Counter = field(default_factory=Counter)
    cooc: Counter = field(default_factory=Counter)

    @classmethod
    def from_images(cls, objects_per_image: Iterable[Collection[T]]) -> "ObjectStats":
        st = cls()
        for objs in objects_per_image:
            s = sorted(set(objs))
            st.freq.update(s)
            for i, a in enumerate(s):
                for b in s[i + 1:]:
                    st.cooc[(a, b)] += 1
                    st.cooc[(b, a)] += 1
        return st

    def cooccurrence(self, present: Iterable[T], candidate: T) -> int:
        return sum(self.cooc[(p, candidate)] for p in present)


def pick_negatives(candidates: Sequence[T], k: int, rng: random.Random,
                   score: Callable[[T], float] | None = None) -> list[T]:
    """``k`` candidates: uniformly at random when ``score`` is None, else the ``k`` highest
    scores, ties broken by a seeded shuffle (not by order or name)."""
    pool = list(candidates)
    k = min(k, len(pool))
    if score is None:
        return rng.sample(pool, k)
    rng.shuffle(pool)
    return sorted(pool, key=score, reverse=True)[:k]  # sorted() is stable: shuffled order breaks ties


def negative_score(strategy: str, stats: ObjectStats, present: Collection[T]) -> Callable[[T], float] | None:
    """The ranking POPE uses for ``strategy`` (None = random)."""
    if strategy == "random":
        return None
    if strategy == "popular":
        return lambda a: stats.freq[a]
    if strategy == "adversarial":
        return lambda a: stats.cooccurrence(present, a)
    raise ValueError(f"unknown POPE split {strategy!r}; expected one of {STRATEGIES}")


def build_pope(
    objects_per_image: Mapping[str, Collection[str]],
    strategy: str,
    per_image: int = 3,
    seed: int = 0,
    vocabulary: Collection[str] | None = None,
    stats: ObjectStats | None = None,
    template: str = POPE_TEMPLATE,
    kind: str = "existence",
) -> list[YesNoQuestion]:
    """POPE questions for every image, in image order: yes-questions first, then no-questions.

    Args:
        objects_per_image: image (file name or id) -> object names present in it.
        strategy: ``"random"``, ``"popular"`` or ``"adversarial"``.
        per_image: ``k``; an image gets ``min(k, #present, #absent)`` questions of each answer
            (POPE uses 3 and keeps images with at least 3 objects; we keep every image and ask
            fewer about small ones, so the set stays balanced).
        seed: positives depend on ``(seed, image)`` only, negatives also on the strategy.
        vocabulary: every object that may be asked about (default: all objects seen).
        stats: frequency / co-occurrence to rank by (default: from ``objects_per_image``).
        template: ``{a}`` = "a"/"an", ``{object}`` = the name.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown POPE split {strategy!r}; expected one of {STRATEGIES}")
    stats = stats or ObjectStats.from_images(objects_per_image.values())
    vocab = sorted(set(vocabulary) if vocabulary is not None else {o for v in objects_per_image.values() for o in v})
    out: list[YesNoQuestion] = []
    for image in objects_per_image:
        present = sorted(set(objects_per_image[image]))
        absent = [o for o in vocab if o not in present]
        k = min(per_image, len(present), len(absent))
        if k == 0:
            continue
        positives = stable_rng(seed, image, "positives").sample(present, k)
        negatives = pick_negatives(absent, k, stable_rng(seed, image, strategy),
                                   negative_score(strategy, stats, present))
        for label, objs in ((True, positives), (False, negatives)):
            for obj in objs:
                out.append(YesNoQuestion(
                    question_id=f"{kind}-{strategy}-{len(out)}", image=image,
                    text=template.format(a=article(obj), object=obj), label=label,
                    meta={"kind": kind, "split": strategy, "target": obj}))
    return out
