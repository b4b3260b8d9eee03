"""The synthetic world as a hallucination benchmark: question sets and per-caption scores.

Everything here is exact, because every scene's graph is known (:mod:`mmalign.world`).

Generative (one detailed caption per held-out scene), scored per hallucination type, AMBER-style
(Wang et al. 2023, "AMBER: An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination
Evaluation"; definitions in ``docs/EVALUATION.md``):

* **object existence**: an object is a *category* (shape), as in CHAIR and POPE. Mentions are
  found with :class:`mmalign.eval.vocab.ObjectVocabulary` (synonyms, plurals), not the world's
  own grammar, so CHAIR here is computed exactly as it is on COCO.
* **attribute** (colour, size, stated number): a claim about an object whose category *is* in the
  scene; wrong when no object of that shape has the stated colour, or the stated size/number is
  wrong (:func:`mmalign.world.check_caption`).
* **relation** (left of, right of, above, below): verifiable claims only (both sides name one
  object each); wrong when clearly false in the scene.

AMBER's Cog counts how many of an image's *likely hallucinations* the response mentions. Our
per-scene lists of likely confusions (our choice, fixed in this module and documented):

* objects: absent shapes that look like a present one (:data:`CONFUSABLE_SHAPES`: square and
  diamond are the same polygon turned 45 degrees; star and cross are both spiky and concave);
* attributes: a present shape with the colour of *another* object of the scene (a binding
  error: "a red square" when the square is blue and the circle is red);
* relations: the reverse of a relation the reference caption states ("B is left of A" when A is
  left of B).

Discriminative: POPE-style yes/no splits (random / popular / adversarial) for existence
(category-level, POPE's own question), attribute and relation, all built by
:mod:`mmalign.eval.pope` with frequencies from the training scenes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mmalign import world as W
from mmalign.eval.pope import (
    STRATEGIES,
    ObjectStats,
    YesNoQuestion,
    build_pope,
    pick_negatives,
    stable_rng,
)
from mmalign.eval.vocab import ObjectVocabulary

CAPTION_PROMPT = "Describe the image in detail."

#: Absent shape -> present shapes it is easily taken for (symmetric). Our choice; see module doc.
CONFUSABLE_SHAPES: dict[str, tuple[str, ...]] = {
    "square": ("diamond",), "diamond": ("square",),
    "star": ("cross",), "cross": ("star",),
    "circle": (), "triangle": (),
}


def world_vocabulary() -> ObjectVocabulary:
    """The world's object categories with the synonyms its caption parser accepts (disc ->
    circle, rhombus -> diamond); regular plurals come from the vocabulary itself, and a plural
    it cannot derive (rhombi) is added as a word of its own, so CHAIR sees every shape word the
    caption parser reads."""
    syn: dict[str, list[str]] = {s: [] for s in W.SHAPES}
    for word, (shape, plural) in W.SHAPE_WORDS.items():
        if not plural and word != shape:
            syn[shape].append(word)
    vocab = ObjectVocabulary(syn, name="world")
    irregular = [(w, shape) for w, (shape, plural) in W.SHAPE_WORDS.items()
                 if plural and [m.category for m in vocab.extract(w)] != [shape]]
    if not irregular:
        return vocab
    for w, shape in irregular:
        syn[shape].append(w)
    return ObjectVocabulary(syn, name="world")


# ---------------------------------------------------------------------------------------------
# captions


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " . ").split())


def score_caption(text: str, scene: W.Scene, vocab: ObjectVocabulary, reference: str | None = None) -> dict[str, int]:
    """Per-caption counts for every generative metric (each a numerator or a denominator).

    Hand-checkable example (scene: small green square, large red circle; reference relation
    "green square left of red circle"): "A large blue square, a red circle and a star. The red
    circle is left of the square." gives object mentions square, circle, star, circle, square
    (``obj_mentions=5``), one of them absent (star: ``obj_hallucinated=1``); the attribute claims
    are "large blue square" (wrong colour, ``attr_wrong``) and "red circle" (right), and the
    relation is the reverse of the reference one (``rel_wrong=1, rel_cog=1``).
    """
    shapes = {o.shape for o in scene.objects}
    parsed = W.parse_caption(text)
    # "There is no star." claims nothing: a shape word inside a negated mention is not an object
    # mention, as the caption checker and the oracle read it
    negated = [(m.start, m.end) for m in parsed.mentions if m.negated]
    mentions = [m for m in vocab.extract(text) if not any(a <= m.start and m.end <= b for a, b in negated)]
    cats = [m.category for m in mentions]
    hallucinated = [c for c in cats if c not in shapes]
    distinct = set(cats)
    confusions = {c for s in shapes for c in CONFUSABLE_SHAPES.get(s, ()) if c not in shapes}

    check = W.check_caption(parsed, scene)
    attr_claims = attr_wrong = 0
    colour_cov: set[int] = set()
    size_cov: set[int] = set()
    wrong_colour: set[tuple[str, str]] = set()
    for mc in check.mentions:
        m = mc.mention
        if mc.label == W.MentionLabel.NEGATED or not mc.shape_present:
            continue
        if m.color is None and m.size is None and m.count is None:
            continue
        attr_claims += 1
        if mc.label == W.MentionLabel.ATTRIBUTE_ERROR or (mc.label == W.MentionLabel.HALLUCINATED and "color" in mc.wrong_attributes):
            attr_wrong += 1
            if mc.label == W.MentionLabel.HALLUCINATED and m.color is not None:
                wrong_colour.add((m.shape, m.color))
        elif mc.label == W.MentionLabel.CORRECT and len(mc.matched) == 1:
            if m.color is not None:
                colour_cov.add(mc.matched[0])
            if m.size is not None:
                size_cov.add(mc.matched[0])
    attr_confusions = {(o.shape, p.color) for o in scene.objects for p in scene.objects
                       if p is not o and not scene.find(color=p.color, shape=o.shape)}

    gt_rel = {(r.subject, r.relation, r.object) for r in W.caption_relations(scene)}

    def canon(i: int, rel: str, j: int) -> tuple[int, str, int]:
        # "B right of A" and "A left of B" are one fact; keep the left-of / above form.
        return (j, W.OPPOSITE[rel], i) if rel in ("right of", "below") else (i, rel, j)

    gt_canon = {canon(*t) for t in gt_rel}
    rev_canon = {canon(j, rel, i) for i, rel, j in gt_rel}  # the reversed relations
    rel_claims = rel_wrong = 0
    rel_covered: set[tuple[int, str, int]] = set()
    rel_cog: set[tuple[int, str, int]] = set()
    for rc in check.relations:
        if rc.label == W.RelationLabel.UNVERIFIABLE:
            continue
        rel_claims += 1
        fact = canon(rc.subject_index, rc.claim.relation, rc.object_index)
        if rc.label == W.RelationLabel.WRONG:
            rel_wrong += 1
            if not rc.claim.negated and fact in rev_canon:
                rel_cog.add(fact)
        elif not rc.claim.negated and fact in gt_canon:
            rel_covered.add(fact)

    any_hal = bool(hallucinated) or attr_wrong > 0 or rel_wrong > 0
    row = {
        "obj_mentions": len(cats),
        "obj_hallucinated": len(hallucinated),
        "obj_any": int(bool(hallucinated)),
        "obj_gt": len(shapes),
        "obj_covered": len(distinct & shapes),
        "obj_cog": len(distinct & confusions),
        "obj_cog_listed": len(confusions),
        "attr_claims": attr_claims,
        "attr_wrong": attr_wrong,
        "attr_any": int(attr_wrong > 0),
        "attr_gt": 2 * len(scene.objects),
        "attr_covered": len(colour_cov) + len(size_cov),
        "attr_cog": len(wrong_colour & attr_confusions),
        "attr_cog_listed": len(attr_confusions),
        "rel_claims": rel_claims,
        "rel_wrong": rel_wrong,
        "rel_any": int(rel_wrong > 0),
        "rel_gt": len(gt_canon),
        "rel_covered": len(rel_covered),
        "rel_cog": len(rel_cog),
        "rel_cog_listed": len(rev_canon),
        "any_hallucination": int(any_hal),
        "count_stated": int(check.count_correct is not None),
        "count_correct": int(check.count_correct is True),
    }
    if reference is not None:
        row["exact"] = int(_norm(text) == _norm(reference))
    return row


# ---------------------------------------------------------------------------------------------
# yes/no splits


def existence_questions(scenes: Mapping[str, W.Scene], strategy: str, stats: ObjectStats,
                        per_image: int = 3, seed: int = 0) -> list[YesNoQuestion]:
    """POPE existence split over the scenes' shapes (keys of ``scenes`` are image paths)."""
    return build_pope({img: {o.shape for o in s.objects} for img, s in scenes.items()}, strategy,
                      per_image=per_image, seed=seed, vocabulary=W.SHAPES, stats=stats)


def attribute_questions(scenes: Mapping[str, W.Scene], strategy: str, colour_freq: Mapping[str, int],
                        per_image: int = 2, seed: int = 0) -> list[YesNoQuestion]:
    """Attribute split, built like POPE: per scene ``k`` objects, each asked once with its true
    attribute (yes) and once with a wrong one (no).

    The attribute is the colour when the object's shape is unique in the scene ("Is the circle
    red?"), else the size ("Is the red circle large?"; its one wrong value is the other size in
    every split). Wrong colours: ``random`` uniformly; ``popular`` the most frequent colour in
    the training scenes; ``adversarial`` a colour another object of this scene has (a binding
    confusion, the attribute analogue of co-occurrence).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown split {strategy!r}; expected one of {STRATEGIES}")
    out: list[YesNoQuestion] = []
    for img, scene in scenes.items():
        k = min(per_image, len(scene.objects))
        subjects = stable_rng(seed, img, "attribute-subjects").sample(range(len(scene.objects)), k)
        shape_n = Counter(o.shape for o in scene.objects)
        for i in subjects:
            o = scene.objects[i]
            if shape_n[o.shape] == 1:
                others = {p.color for p in scene.objects if p is not o}
                score = {"random": None, "popular": lambda c: colour_freq.get(c, 0),
                         "adversarial": lambda c, others=others: (c in others) + colour_freq.get(c, 0) / 1e9}[strategy]
                wrong = pick_negatives([c for c in W.COLORS if c != o.color], 1,
                                       stable_rng(seed, img, i, strategy), score)[0]
                pairs = ((True, o.color), (False, wrong))
                texts = [f"Is the {o.shape} {c}?" for _, c in pairs]
                attr = "color"
            else:
                pairs = ((True, o.size), (False, next(z for z in W.SIZES if z != o.size)))
                texts = [f"Is the {o.name()} {z}?" for _, z in pairs]
                attr = "size"
            for (label, value), text in zip(pairs, texts):
                out.append(YesNoQuestion(f"attribute-{strategy}-{len(out)}", img, text, label,
                                         {"kind": "attribute", "split": strategy, "target": o.name(),
                                          "attribute": attr, "value": value}))
    return out


def relation_questions(scenes: Mapping[str, W.Scene], strategy: str, relation_freq: Mapping[str, int],
                       per_image: int = 2, seed: int = 0) -> list[YesNoQuestion]:
    """Relation split, built like POPE: ``k`` relations that clearly hold (yes) and ``k`` that
    are clearly false (no) per scene with two or more objects.

    Negatives: ``random`` uniformly among clearly-false (pair, relation) triples; ``popular``
    the relation words most frequent in the training scenes; ``adversarial`` the reverse of a
    relation that holds ("Is A right of B?" when A is left of B).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown split {strategy!r}; expected one of {STRATEGIES}")
    out: list[YesNoQuestion] = []
    for img, scene in scenes.items():
        n = len(scene.objects)
        triples = [(i, r, j) for i in range(n) for j in range(n) if i != j for r in W.RELATIONS]
        true = [t for t in triples if scene.relation_truth(*t) is True]
        false = [t for t in triples if scene.relation_truth(*t) is False]
        k = min(per_image, len(true), len(false))
        if k == 0:
            continue
        positives = stable_rng(seed, img, "relation-positives").sample(true, k)
        score = {"random": None,
                 "popular": lambda t: relation_freq.get(t[1], 0),
                 "adversarial": lambda t, s=scene: float(s.relation_truth(t[0], W.OPPOSITE[t[1]], t[2]) is True)}[strategy]
        negatives = pick_negatives(false, k, stable_rng(seed, img, "relation", strategy), score)
        for label, ts in ((True, positives), (False, negatives)):
            for i, r, j in ts:
                a, b = scene.objects[i].name(), scene.objects[j].name()
                out.append(YesNoQuestion(f"relation-{strategy}-{len(out)}", img, f"Is the {a} {r} the {b}?", label,
                                         {"kind": "relation", "split": strategy, "target": f"{a} | {r} | {b}"}))
    return out


def reference_stats(train_scenes: Iterable[W.Scene]) -> dict[str, Any]:
    """Frequencies the popular/adversarial splits rank by, from the *training* scenes (what a
    model could have learned as priors)."""
    scenes = list(train_scenes)
    return {
        "objects": ObjectStats.from_images({o.shape for o in s.objects} for s in scenes),
        "colours": Counter(o.color for s in scenes for o in s.objects),
        "relations": Counter(r.relation for s in scenes for r in s.relations()),
    }


def world_questions(scenes: Mapping[str, W.Scene], stats: Mapping[str, Any], seed: int = 0,
                    kinds: Sequence[str] = ("existence", "attribute", "relation"),
                    strategies: Sequence[str] = STRATEGIES) -> dict[str, list[YesNoQuestion]]:
    """Every yes/no split: ``{"existence/random": [...], ...}``."""
    out: dict[str, list[YesNoQuestion]] = {}
    for kind in kinds:
        for strategy in strategies:
            if kind == "existence":
                qs = existence_questions(scenes, strategy, stats["objects"], seed=seed)
            elif kind == "attribute":
                qs = attribute_questions(scenes, strategy, stats["colours"], seed=seed)
            elif kind == "relation":
                qs = relation_questions(scenes, strategy, stats["relations"], seed=seed)
            else:
                raise ValueError(f"unknown question kind {kind!r}")
            out[f"{kind}/{strategy}"] = qs
    return out
