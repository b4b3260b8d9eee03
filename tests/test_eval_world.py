"""The synthetic world as a benchmark: per-type caption scores by hand, and the yes/no splits."""

from __future__ import annotations

import random

from mmalign import world as W
from mmalign.eval import world_bench as B

# Small green square on the left, large red circle on the right, same height.
SQUARE = W.SceneObject("square", "green", "small", 0.2, 0.5)
CIRCLE = W.SceneObject("circle", "red", "large", 0.6, 0.5)
SCENE = W.Scene((SQUARE, CIRCLE), "hand")
VOCAB = B.world_vocabulary()


def test_score_caption_by_hand():
    """"A large red square, a red circle and a star. The red circle is left of the square."

    Objects (CHAIR, category level): mentions square, circle, star, circle, square = 5, one of
    them absent (star): CHAIR_i 1/5, the caption counts for CHAIR_s. Both present shapes are
    mentioned (cover 2/2). Likely confusions: square -> diamond (absent): 1 listed, not mentioned.
    Attributes: claims "large red square" (no red square: wrong colour; red is the circle's
    colour, a binding confusion -> Cog), "red circle" twice (right) = 3 claims, 1 wrong. Ground
    truth: colour and size of 2 objects = 4 facts, of which the circle's colour is stated = 1.
    Binding confusions listed: (square, red) and (circle, green) = 2.
    Relations: "red circle left of the square" is the reverse of the reference's "square left of
    circle": 1 verifiable claim, wrong, and a Cog hit; the reference relation is not covered.
    """
    text = "A large red square, a red circle and a star. The red circle is left of the square."
    row = B.score_caption(text, SCENE, VOCAB, reference=W.detailed_caption(SCENE))
    assert row == {
        "obj_mentions": 5, "obj_hallucinated": 1, "obj_any": 1, "obj_gt": 2, "obj_covered": 2,
        "obj_cog": 0, "obj_cog_listed": 1,
        "attr_claims": 3, "attr_wrong": 1, "attr_any": 1, "attr_gt": 4, "attr_covered": 1,
        "attr_cog": 1, "attr_cog_listed": 2,
        "rel_claims": 1, "rel_wrong": 1, "rel_any": 1, "rel_gt": 1, "rel_covered": 0, "rel_cog": 1, "rel_cog_listed": 1,
        "any_hallucination": 1, "count_stated": 0, "count_correct": 0, "exact": 0,
    }


def test_confusable_shape_counts_for_cog():
    row = B.score_caption("There is a diamond.", SCENE, VOCAB)
    assert row["obj_hallucinated"] == 1 and row["obj_cog"] == 1 and row["obj_cog_listed"] == 1


def test_reference_caption_is_perfect_and_synonyms_count():
    for seed in range(30):
        scene = W.sample_scene(random.Random(seed), n_objects=random.Random(seed).randint(1, 4))
        ref = W.detailed_caption(scene)
        row = B.score_caption(ref, scene, VOCAB, reference=ref)
        assert row["obj_hallucinated"] == row["attr_wrong"] == row["rel_wrong"] == row["any_hallucination"] == 0
        assert row["obj_covered"] == row["obj_gt"] and row["attr_covered"] == row["attr_gt"]
        assert row["rel_covered"] == row["rel_gt"] and row["exact"] == 1 and row["count_correct"] == 1
    # "discs" is a plural synonym of circle: not a hallucination in a scene with a circle.
    assert B.score_caption("Two discs.", SCENE, VOCAB)["obj_hallucinated"] == 0


def test_every_shape_word_the_parser_reads_is_a_chair_mention():
    """CHAIR must see each shape word the caption grammar accepts, irregular plurals included:
    "Two rhombi." in a scene without a diamond is one mention, one hallucinated ("rhombi" was
    missing from the scoring vocabulary, so the mention went uncounted)."""
    for word, (shape, _) in W.SHAPE_WORDS.items():
        assert [m.category for m in VOCAB.extract(f"There are two {word} here.")] == [shape], word
    row = B.score_caption("Two rhombi.", SCENE, VOCAB)
    assert row["obj_mentions"] == 1 and row["obj_hallucinated"] == 1


def test_a_negated_shape_is_no_mention():
    """"There is no star." claims no star (the caption checker labels it negated): CHAIR counts
    no mention and no hallucination; the square beside it is one true mention."""
    row = B.score_caption("There is no star.", SCENE, VOCAB)
    assert row["obj_mentions"] == 0 and row["obj_hallucinated"] == 0 and row["any_hallucination"] == 0
    row = B.score_caption("There is a green square. There are no stars.", SCENE, VOCAB)
    assert row["obj_mentions"] == 1 and row["obj_hallucinated"] == 0 and row["obj_covered"] == 1


def test_a_which_clause_is_about_the_object_before_it():
    """"The circle is right of the rhombus, which is above the square": the second relation is the
    rhombus's, not the circle's. Diamond at (0.2, 0.2) above the square at (0.2, 0.7); the circle
    at (0.7, 0.7) is right of the diamond and level with the square. Both claims are true; read
    with the circle as the clause's subject (the old attachment) "circle above square" was false."""
    diamond = W.SceneObject("diamond", "blue", "small", 0.2, 0.2)
    square = W.SceneObject("square", "green", "small", 0.2, 0.7)
    circle = W.SceneObject("circle", "red", "large", 0.7, 0.7)  # level with the square: not above it
    scene = W.Scene((diamond, square, circle), "which")
    text = "The red circle is right of the blue rhombus, which is above the green square."
    parsed = W.parse_caption(text)
    assert [(r.subject.shape, r.relation, r.object.shape) for r in parsed.relations] == [
        ("circle", "right of", "diamond"), ("diamond", "above", "square")]
    row = B.score_caption(text, scene, VOCAB)
    assert row["rel_claims"] == 2 and row["rel_wrong"] == 0
    # "that" opens the same clause; without a relative pronoun the first subject carries on.
    that = W.parse_caption("The red circle is right of the blue rhombus that is above the green square.")
    assert [r.subject.shape for r in that.relations] == ["circle", "diamond"]
    chained = W.parse_caption("The red circle is right of the blue rhombus and below the green square.")
    assert [r.subject.shape for r in chained.relations] == ["circle", "circle"]


def _scenes(n=40, seed=3):
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        s = W.sample_scene(rng, n_objects=rng.randint(1, 4), scene_id=f"s{i}")
        out[f"images/{i}.png"] = s
    return out


def _truth(q, scene):
    """Independent check of a question's label from the scene (no world question code)."""
    named = {o.name(): o for o in scene.objects}
    if q.meta["kind"] == "existence":
        return any(o.shape == q.meta["target"] for o in scene.objects)
    if q.meta["kind"] == "attribute":
        o = named[q.meta["target"]]
        return getattr(o, "color" if q.meta["attribute"] == "color" else "size") == q.meta["value"]
    a, rel, b = q.meta["target"].split(" | ")
    oa, ob = named[a], named[b]
    d = {"left of": ob.x - oa.x, "right of": oa.x - ob.x, "above": ob.y - oa.y, "below": oa.y - ob.y}[rel]
    return d >= W.RELATION_MARGIN


def test_world_questions_labels_are_true_and_splits_differ_only_in_negatives():
    scenes = _scenes()
    stats = B.reference_stats(_scenes(200, seed=9).values())
    sets = B.world_questions(scenes, stats)
    assert len(sets) == 9
    for name, qs in sets.items():
        assert qs and sum(q.label for q in qs) * 2 == len(qs), name
        for q in qs:
            assert _truth(q, scenes[q.image]) is q.label, (name, q.text)
    for kind in ("existence", "attribute", "relation"):
        pos = [sorted((q.image, q.text) for q in sets[f"{kind}/{s}"] if q.label) for s in ("random", "popular", "adversarial")]
        assert pos[0] == pos[1] == pos[2], kind


def test_adversarial_attribute_and_relation_negatives():
    """Adversarial colour negatives are another object's colour (binding); adversarial relation
    negatives are reversals of a relation that holds."""
    scenes = _scenes(60)
    stats = B.reference_stats(scenes.values())
    attr = B.attribute_questions(scenes, "adversarial", stats["colours"])
    colour_negs = [q for q in attr if not q.label and q.meta["attribute"] == "color"]
    assert colour_negs
    for q in colour_negs:
        scene = scenes[q.image]
        others = {o.color for o in scene.objects if o.name() != q.meta["target"]} - {q.meta["target"].split()[0]}
        if others:
            assert q.meta["value"] in others, q.text
    rel = B.relation_questions(scenes, "adversarial", stats["relations"])
    negs = [q for q in rel if not q.label]
    # Every scene with 2+ objects has a relation that holds, so its reverse is always available.
    assert negs and all(_is_reversal(q, scenes[q.image]) for q in negs)
    rnd = [q for q in B.relation_questions(scenes, "random", stats["relations"]) if not q.label]
    assert sum(_is_reversal(q, scenes[q.image]) for q in rnd) < len(rnd), "random negatives are not all reversals"


def _is_reversal(q, scene) -> bool:
    a, r, b = q.meta["target"].split(" | ")
    idx = {o.name(): i for i, o in enumerate(scene.objects)}
    return scene.relation_truth(idx[a], W.OPPOSITE[r], idx[b]) is True
