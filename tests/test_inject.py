"""Hallucination injection: one claim changes, the oracle sees it, the rest stays as it was.

The property tests run on the reference captions of 30 sampled scenes per kind and derive the
expectation from the claims before and after (``world_claims`` + ``verify_world_claim``):
attribute/relation -- the same claims in the same order with exactly one verdict turned from
True to False, of that kind; object -- the old claims unchanged plus the new mention's object
claim (False) and its attribute claim (None: the shape is absent).
"""

from __future__ import annotations

import random

import pytest

from mmalign import world as W
from mmalign.inject import INJECTION_KINDS, Injection, inject
from mmalign.oracle import WorldOracle, segment_feedback, verify_world_claim, world_claims
from mmalign.feedback import FeedbackItem


def _scenes(n: int = 30, lo: int = 1, hi: int = 4) -> list[W.Scene]:
    out = []
    for seed in range(n):
        rng = random.Random(1000 + seed)
        out.append(W.sample_scene(rng, scene_id=f"s{seed}", n_objects=rng.randint(lo, hi)))
    return out


def _verdicts(text: str, scene: W.Scene) -> list[tuple[str, bool | None]]:
    return [(c.type, verify_world_claim(c, scene)) for c in world_claims(text)]


def _check_one_change(ref: str, inj: Injection, scene: W.Scene) -> None:
    assert inj.text[inj.start:inj.end] == inj.replacement
    assert inj.text[:inj.start] + inj.original + inj.text[inj.end:] == ref or inj.kind == "object"
    before, after = _verdicts(ref, scene), _verdicts(inj.text, scene)
    if inj.kind == "object":
        assert inj.original == ""
        assert inj.text[:inj.start] + inj.text[inj.end:] != ref  # separator inserted too (", " / " and ")
        new = [(c.type, verify_world_claim(c, scene)) for c in world_claims(inj.text)
               if c.type != "relation" and inj.start <= c.start and c.end <= inj.end]
        assert sorted(new, key=str) == sorted([("object", False), ("attribute", None)], key=str)
        rest = [(c.type, verify_world_claim(c, scene)) for c in world_claims(inj.text)
                if not (c.type != "relation" and inj.start <= c.start and c.end <= inj.end)]
        assert rest == before
    else:
        assert len(after) == len(before)
        diff = [k for k in range(len(before)) if before[k] != after[k]]
        assert len(diff) == 1, (ref, inj.text)
        assert before[diff[0]] == (inj.kind, True) and after[diff[0]] == (inj.kind, False)


def _labels_at(text: str, pos: int, scene: W.Scene) -> dict[str, str]:
    claims = world_claims(text)
    segs = segment_feedback(text, claims, [verify_world_claim(c, scene) for c in claims])
    (seg,) = [s for s in segs if s.start <= pos < s.end]
    return seg.labels


@pytest.mark.parametrize("kind", INJECTION_KINDS)
def test_injection_changes_exactly_one_claim_and_the_oracle_sees_it(kind):
    n_done = 0
    for k, scene in enumerate(_scenes(lo=2 if kind == "relation" else 1)):
        ref = W.detailed_caption(scene)
        inj = inject(ref, scene, kind, random.Random(k))
        assert inj.kind == kind and inj.text != ref
        _check_one_change(ref, inj, scene)
        assert _labels_at(inj.text, inj.start, scene)[kind] == "hallucinated"
        # nothing else in the new text is hallucinated
        others = [t for t in ("object", "attribute", "relation") if t != kind]
        claims = world_claims(inj.text)
        segs = segment_feedback(inj.text, claims, [verify_world_claim(c, scene) for c in claims])
        assert sum(s.labels[kind] == "hallucinated" for s in segs) == 1
        assert all(s.labels[t] != "hallucinated" for s in segs for t in others)
        n_done += 1
    assert n_done == 30


def test_object_injection_on_short_captions_and_single_object_lists():
    """"A red circle and an orange star." style lists get a colour-only phrase in the list;
    "There is one object: a small red star." gets " and a <size> <colour> <shape>"; a caption
    without a list gets a sentence "There is also ..." at the end."""
    for k, scene in enumerate(_scenes(n=10)):
        short = W.short_caption(scene)
        inj = inject(short, scene, "object", random.Random(k))
        _check_one_change(short, inj, scene)
        new = world_claims(inj.text)
        (obj,) = [c for c in new if c.type == "object" and inj.start <= c.start < inj.end]
        assert verify_world_claim(obj, scene) is False
    one = W.Scene((W.SceneObject("star", "red", "small", 0.5, 0.5),), "one")
    inj = inject(W.detailed_caption(one), one, "object", random.Random(0))
    assert inj.text.startswith("There is one object: a small red star and a ")
    assert inj.text[inj.start:inj.end] == inj.replacement and inj.original == ""
    inj = inject("The red star is small.", one, "object", random.Random(0))
    assert inj.text.startswith("The red star is small. There is also a ") and inj.text.endswith(".")
    assert inj.replacement == inj.text[len("The red star is small. "):]
    assert _labels_at(inj.text, inj.start, one)["object"] == "hallucinated"


def test_attribute_edit_by_hand_fixes_the_article():
    """Scene: one small orange star. In "An orange star." the only slot is the colour, and every
    other colour starts with a consonant, so the article changes with it: "An orange" -> "A red"
    (the changed span includes the article; capitals kept); over 40 seeds all 5 colours appear.
    In "There is one object: a small orange star." the article sits before "small", so the
    span is just the changed word: small -> large, or orange -> another colour."""
    scene = W.Scene((W.SceneObject("star", "orange", "small", 0.5, 0.5),), "o")
    seen = set()
    for seed in range(40):
        inj = inject("An orange star.", scene, "attribute", random.Random(seed))
        assert inj.original == "An orange" and inj.replacement.startswith("A ")
        assert inj.text == inj.replacement + " star."
        seen.add(inj.replacement)
    assert seen == {"A red", "A green", "A blue", "A yellow", "A purple"}
    inj = inject("There is one object: a small orange star.", scene, "attribute", random.Random(3))
    assert (inj.original, inj.replacement) in {("small", "large"), *{("orange", c) for c in W.COLORS if c != "orange"}}


def test_relation_flip_by_hand():
    """Square at x=0.2, circle at x=0.6: "The green square is left of the red circle." -> the
    only correct relation is flipped: "left" -> "right" at offset 20 (len("The green square is "))."""
    scene = W.Scene((W.SceneObject("square", "green", "small", 0.2, 0.5),
                     W.SceneObject("circle", "red", "large", 0.6, 0.5)), "s")
    inj = inject("The green square is left of the red circle.", scene, "relation", random.Random(0))
    assert inj == Injection("The green square is right of the red circle.", "relation", 20, 25, "left", "right")


def test_deterministic_by_seed():
    for k, scene in enumerate(_scenes(n=10, lo=2)):
        ref = W.detailed_caption(scene)
        for kind in INJECTION_KINDS:
            assert inject(ref, scene, kind, random.Random(7)) == inject(ref, scene, kind, random.Random(7))


def test_impossible_kinds_raise_with_the_reason():
    one = W.Scene((W.SceneObject("star", "red", "small", 0.5, 0.5),), "one")
    with pytest.raises(ValueError, match="no correct relation claim to flip"):
        inject(W.detailed_caption(one), one, "relation", random.Random(0))
    with pytest.raises(ValueError, match="no correct mention with a colour or size"):
        inject("There is a star.", one, "attribute", random.Random(0))
    with pytest.raises(ValueError, match="no correct mention"):
        inject("There is a blue star.", one, "attribute", random.Random(0))  # the only mention is wrong
    every = W.Scene(tuple(W.SceneObject(s, "red", "small", 0.1 + 0.15 * i, 0.5) for i, s in enumerate(W.SHAPES)), "all")
    with pytest.raises(ValueError, match="every shape is already in scene 'all'"):
        inject(W.detailed_caption(every), every, "object", random.Random(0))
    with pytest.raises(ValueError, match="empty response"):
        inject("  ", one, "object", random.Random(0))
    with pytest.raises(ValueError, match="unknown injection kind 'colour'"):
        inject("A star.", one, "colour", random.Random(0))


def test_oracle_feedback_on_an_injected_pair():
    """The chosen (reference) answer is faithful; the injected one loses exactly one claim."""
    scene = _scenes(n=1, lo=3, hi=3)[0]
    ref = W.detailed_caption(scene)
    inj = inject(ref, scene, "relation", random.Random(0))
    oracle = WorldOracle({"img.png": scene})
    good, bad = oracle.annotate([FeedbackItem("a", "Describe.", ref, image="img.png"),
                                 FeedbackItem("b", "Describe.", inj.text, image="img.png")])
    n = len(world_claims(ref))
    assert good.scores["faithfulness"] == 1.0 and bad.scores["faithfulness"] == (n - 1) / n
    assert bad.meta["hallucinated"] == {"object": 0, "attribute": 0, "relation": 1}
