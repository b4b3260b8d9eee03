"""The ground-truth feedback oracle: claims, verdicts, FGAIF segment labels, DRESS critiques.

The hand-made scene used throughout (``SCENE``): a small green square at (0.2, 0.5) and a large
red circle at (0.6, 0.5). So: shapes {square, circle}; the square is left of the circle
(0.6 - 0.2 = 0.4 >= 0.10) and the circle right of the square; they are level (same y), so
neither is above the other.
"""

from __future__ import annotations

import json
import random

import pytest

from mmalign import world as W
from mmalign.eval.vocab import ObjectVocabulary
from mmalign.feedback import (
    HALLUCINATION_TYPES,
    LABELS,
    Claim,
    Feedback,
    FeedbackError,
    FeedbackItem,
    FeedbackSource,
    SegmentFeedback,
    check_feedback,
    feedback_from_json,
    feedback_to_json,
)
from mmalign.oracle import (
    CocoOracle,
    WorldOracle,
    coco_claims,
    critique_and_refinement,
    segment_feedback,
    verify_world_claim,
    world_claims,
)

SCENE = W.Scene((W.SceneObject("square", "green", "small", 0.2, 0.5),
                 W.SceneObject("circle", "red", "large", 0.6, 0.5)), scene_id="s0")
RESPONSE = ("There are two objects: a small green square and a large blue circle. "
            "The circle is left of the square. There is a star.")


def _item(response: str, image: str = "img/s0.png", id: str = "x", **meta) -> FeedbackItem:
    return FeedbackItem(id=id, prompt="Describe the image in detail.", response=response, image=image, meta=meta)


def test_world_claims_and_verdicts_by_hand():
    """Mentions in order: "a small green square" (object square: True; attribute green+small:
    True), "a large blue circle" (object circle: True; attribute: no blue circle -> False),
    "The circle" (object: True; no colour/size -> no attribute claim), "the square" (True),
    "a star" (object: no star -> False). Relation "The circle is left of the square": the circle
    (x=0.6) is right of the square (x=0.2) -> False."""
    claims = world_claims(RESPONSE)
    got = [(c.type, c.text, verify_world_claim(c, SCENE)) for c in claims]
    assert got == [
        ("object", "a small green square", True),
        ("attribute", "a small green square", True),
        ("object", "a large blue circle", True),
        ("attribute", "a large blue circle", False),
        ("object", "The circle", True),
        ("relation", "The circle is left of the square", False),
        ("object", "the square", True),
        ("object", "a star", False),
    ]
    for c in claims:
        assert RESPONSE[c.start:c.end] == c.text
    q = {c.text + "/" + c.type: c.question for c in claims}
    assert q["a star/object"] == "Is there a star in the image?"
    assert q["a large blue circle/attribute"] == "Is the blue circle large?"
    assert q["The circle is left of the square/relation"] == "Is the circle left of the square?"
    rel = claims[5].meta
    assert (rel["subject"], rel["relation"], rel["object"]) == ("circle", "left of", "square")
    assert claims[3].meta["color"] == "blue" and claims[3].meta["size"] == "large"


def test_claim_questions_and_unverifiable_cases():
    """Colour only -> existence question of the coloured object; a count -> "Are there ...";
    an attribute of an absent shape is None (the object claim carries the error); a relation
    with a hallucinated side is None; a negated mention gives no claim."""
    c = world_claims("There is a red star.")
    assert [(x.type, x.question) for x in c] == [("object", "Is there a star in the image?"),
                                                ("attribute", "Is there a red star in the image?")]
    assert [verify_world_claim(x, SCENE) for x in c] == [False, None]
    c = world_claims("There are two red circles.")
    assert c[1].question == "Are there two red circles in the image?"
    assert verify_world_claim(c[1], SCENE) is False  # one red circle, not two
    c = world_claims("The blue star is left of the red circle.")
    assert [(x.type, verify_world_claim(x, SCENE)) for x in c] == [
        ("object", False), ("attribute", None), ("relation", None), ("object", True), ("attribute", True)]
    assert world_claims("There is no star.") == []
    # a size stated without colour: "a small square" -> there is one square and it is small
    c = world_claims("A small square.")
    assert c[1].question == "Is there a small square in the image?" and verify_world_claim(c[1], SCENE) is True


def test_segment_labels_by_hand():
    """The fine segmentation: [0] "There are two objects:" (no claim: all n/a); [1] "a small green
    square" (object and attribute correct); [2] "and a large blue circle." (object correct,
    attribute hallucinated); [3] "The circle is left of the square." (objects correct, relation
    hallucinated); [4] "There is a star." (object hallucinated)."""
    claims = world_claims(RESPONSE)
    segs = segment_feedback(RESPONSE, claims, [verify_world_claim(c, SCENE) for c in claims], "fine")
    H, C, N = "hallucinated", "correct", "n/a"
    assert [(s.text, s.labels["object"], s.labels["attribute"], s.labels["relation"]) for s in segs] == [
        ("There are two objects:", N, N, N),
        ("a small green square", C, C, N),
        ("and a large blue circle.", C, H, N),
        ("The circle is left of the square.", C, N, H),
        ("There is a star.", H, N, N),
    ]
    assert [len(s.claims) for s in segs] == [0, 2, 2, 3, 1]
    with pytest.raises(ValueError, match="8 claims but 1 verdicts"):
        segment_feedback(RESPONSE, claims, [True])


def test_segment_labels_by_hand_released_segmentation():
    """The released splitter (the default) cuts only at sentence ends here (the first sentence has
    no , ; ! ?): [0] the whole first sentence holds both mentions -> object correct (both shapes
    exist), attribute hallucinated (the circle is not large and blue), relation n/a; [1] and [2]
    as in the fine segmentation."""
    claims = world_claims(RESPONSE)
    verdicts = [verify_world_claim(c, SCENE) for c in claims]
    segs = segment_feedback(RESPONSE, claims, verdicts)
    assert segs == segment_feedback(RESPONSE, claims, verdicts, "released")
    H, C, N = "hallucinated", "correct", "n/a"
    assert [(s.text, s.labels["object"], s.labels["attribute"], s.labels["relation"]) for s in segs] == [
        ("There are two objects: a small green square and a large blue circle.", C, H, N),
        ("The circle is left of the square.", C, N, H),
        ("There is a star.", H, N, N),
    ]
    assert [len(s.claims) for s in segs] == [4, 3, 1]
    # the oracle threads its segmentation through
    fine = WorldOracle({"img/s0.png": SCENE}, segmentation="fine").annotate([_item(RESPONSE)])[0]
    released = WorldOracle({"img/s0.png": SCENE}).annotate([_item(RESPONSE)])[0]
    assert (len(fine.segments), len(released.segments)) == (5, 3)
    with pytest.raises(ValueError, match="segmentation must be one of"):
        WorldOracle({"img/s0.png": SCENE}, segmentation="sentences")


def test_world_oracle_scores_critique_and_refinement():
    """faithfulness: 8 claims, all verifiable, 5 hold -> 5/8. helpfulness: "a small green square"
    covers the square, "The circle" (the one circle) covers the circle -> 2/2 (the world's
    coverage). The critique names the star and the wrong colour and relation; the refinement
    fixes each."""
    oracle = WorldOracle({"img/s0.png": SCENE})
    assert isinstance(oracle, FeedbackSource) and oracle.name == "oracle"
    items = [_item(RESPONSE)]
    (fb,) = check_feedback(items, oracle.annotate(items), source=oracle.name)
    assert fb.scores == {"faithfulness": 5 / 8, "helpfulness": 1.0}
    assert fb.meta["hallucinated"] == {"object": 1, "attribute": 1, "relation": 1}
    assert fb.critique == ("The small green square is correct. There is no blue circle in the image. "
                           "The circle is red. The circle is right of the square, not left of it. "
                           "There is no star in the image.")
    assert fb.refinement == ("Call the circle red, not blue. Say that the circle is right of the square. "
                             "Remove the star.")
    # the released segmentation's three sentences (the critique does not depend on the segmentation)
    assert [s.labels["object"] for s in fb.segments] == ["correct", "correct", "hallucinated"]
    (fine,) = WorldOracle({"img/s0.png": SCENE}, segmentation="fine").annotate(items)
    assert [s.labels["object"] for s in fine.segments] == ["n/a", "correct", "correct", "correct", "hallucinated"]
    assert (fine.critique, fine.refinement, fine.scores) == (fb.critique, fb.refinement, fb.scores)


def test_size_count_and_missing_objects_by_hand():
    """"The large green square is right of the red circle. Two red circles.": the square is
    small (size wrong), it is left of the circle (relation wrong), there is one red circle (count
    wrong). Claims: square obj T, attr F, relation F, circle obj T, attr T, circles obj T,
    attr F -> faithfulness 4/7. Coverage: only "the red circle" identifies an object -> 1/2.
    Every object is referred to, so nothing is "missing"."""
    (fb,) = WorldOracle({"img/s0.png": SCENE}).annotate(
        [_item("The large green square is right of the red circle. Two red circles.")])
    assert fb.scores == {"faithfulness": 4 / 7, "helpfulness": 0.5}
    assert fb.critique == ("The green square is not large. It is small. The green square is left of the red "
                           "circle, not right of it. There are not two red circles in the image.")
    assert fb.refinement == ("Describe the green square as small, not large. Say that the green square is "
                             "left of the red circle. Say there is one red circle, not two.")
    # a faithful but incomplete answer: the critique names what is missing
    (fb,) = WorldOracle({"img/s0.png": SCENE}).annotate([_item("There is a red circle.")])
    assert fb.scores == {"faithfulness": 1.0, "helpfulness": 0.5}
    assert fb.critique == ("The red circle is correct. The answer does not mention the green square. "
                           "There is no hallucination in the answer.")
    assert fb.refinement == "Also mention the green square."


def test_reference_captions_get_no_hallucinated_label():
    """The reference caption of 30 sampled scenes (1-4 objects): every segment label is correct
    or n/a, faithfulness and helpfulness are 1, and the critique says there is no hallucination."""
    scenes, items = {}, []
    for seed in range(30):
        rng = random.Random(seed)
        scene = W.sample_scene(rng, scene_id=f"s{seed}", n_objects=rng.randint(1, 4))
        scenes[f"img/{seed}.png"] = scene
        items.append(_item(W.detailed_caption(scene), image=f"img/{seed}.png", id=str(seed)))
    fbs = check_feedback(items, WorldOracle(scenes).annotate(items))
    for fb in fbs:
        assert all(lab != "hallucinated" for s in fb.segments for lab in s.labels.values()), fb.id
        assert fb.scores == {"faithfulness": 1.0, "helpfulness": 1.0}
        assert fb.critique.endswith("There is no hallucination in the answer.")
        assert fb.refinement == "No change is needed."
        assert any(s.labels["object"] == "correct" for s in fb.segments)


def test_lookup_by_scene_id_and_clear_errors():
    oracle = WorldOracle({"img/s0.png": SCENE})
    # by the scene's own id when the image path differs
    (fb,) = oracle.annotate([_item("A red circle.", image="/elsewhere/x.png", scene_id="s0")])
    assert fb.meta["scene_id"] == "s0"
    with pytest.raises(FeedbackError, match=r"item 'q7': no scene for image 'img/missing.png'"):
        oracle.annotate([_item("A red circle.", image="img/missing.png", id="q7")])
    with pytest.raises(TypeError, match="not a world.Scene"):
        WorldOracle({"a": {"objects": []}})  # type: ignore[dict-item]


def test_empty_response_is_feedback_not_a_crash():
    (fb,) = check_feedback([_item("  ")], WorldOracle({"img/s0.png": SCENE}).annotate([_item("  ")]))
    assert fb.segments == []
    assert fb.critique.startswith("The answer is empty.")
    assert fb.scores == {"faithfulness": 1.0, "helpfulness": 0.0}
    assert critique_and_refinement([]) == ("The answer is empty.", "Describe the objects in the image.")


def test_critique_is_deterministic_and_names_the_hallucinated_object():
    claims = world_claims("A red circle and a purple cross.")
    segs = segment_feedback("A red circle and a purple cross.", claims, [verify_world_claim(c, SCENE) for c in claims])
    a, b = critique_and_refinement(segs), critique_and_refinement(segs)
    assert a == b
    assert "There is no cross in the image." in a[0] and a[1] == "Remove the purple cross."


def test_coco_oracle_by_hand():
    """Annotated: person, dog. "A man walks a dog, and a cat sleeps." -> mentions man (person:
    True), dog (True), cat (False); segments "A man walks a dog," | "and a cat sleeps." ->
    object labels correct | hallucinated; faithfulness 2/3; attribute/relation n/a."""
    vocab = ObjectVocabulary.coco()
    claims = coco_claims("A man walks a dog, and a cat sleeps.", vocab)
    assert [(c.meta["category"], c.question) for c in claims] == [
        ("person", "Is there a person in the image?"), ("dog", "Is there a dog in the image?"),
        ("cat", "Is there a cat in the image?")]
    oracle = CocoOracle({"coco/1.jpg": ["dog", "person"]}, segmentation="fine")
    assert isinstance(oracle, FeedbackSource)
    items = [_item("A man walks a dog, and a cat sleeps.", image="coco/1.jpg")]
    (fb,) = check_feedback(items, oracle.annotate(items))
    assert fb.scores == {"faithfulness": 2 / 3}
    assert [s.labels for s in fb.segments] == [
        {"object": "correct", "attribute": "n/a", "relation": "n/a"},
        {"object": "hallucinated", "attribute": "n/a", "relation": "n/a"}]
    assert "There is no cat in the image." in fb.critique and "Remove the cat." in fb.refinement
    # released splitter: A man walks a dog,(4) | ... would leave 4 words (not more than 5): no cut
    (fb,) = CocoOracle({"coco/1.jpg": ["dog", "person"]}).annotate(items)
    assert [(s.text, s.labels["object"]) for s in fb.segments] == [("A man walks a dog, and a cat sleeps.",
                                                                    "hallucinated")]
    with pytest.raises(FeedbackError, match=r"item 'x': no annotated objects for image 'coco/2.jpg'"):
        oracle.annotate([_item("A dog.", image="coco/2.jpg")])


def test_feedback_json_round_trip_and_segment_validation():
    (fb,) = WorldOracle({"img/s0.png": SCENE}).annotate([_item(RESPONSE)])
    d = json.loads(json.dumps(feedback_to_json(fb)))
    back = feedback_from_json(d)
    assert back == fb
    assert isinstance(back.segments[1].claims[0], Claim)
    plain = Feedback(id="a", scores={"s": 1.0})
    assert feedback_from_json(feedback_to_json(plain)) == plain
    with pytest.raises(FeedbackError, match="feedback record 'z': malformed"):
        feedback_from_json({"id": "z"})
    item = [_item(RESPONSE)]
    seg = SegmentFeedback(0, 0, 5, "There", {t: "n/a" for t in HALLUCINATION_TYPES})
    check_feedback(item, [Feedback(id="x", scores={}, segments=[seg])])
    bad_label = SegmentFeedback(0, 0, 5, "There", {"object": "maybe", "attribute": "n/a", "relation": "n/a"})
    with pytest.raises(FeedbackError, match=r"item 'x': segment 0: object label 'maybe' is not one of"):
        check_feedback(item, [Feedback(id="x", scores={}, segments=[bad_label])])
    missing = SegmentFeedback(0, 0, 5, "There", {"object": "n/a"})
    with pytest.raises(FeedbackError, match="labels must have exactly the keys"):
        check_feedback(item, [Feedback(id="x", scores={}, segments=[missing])])
    uneven = SegmentFeedback(0, 0, 5, "There", {t: "n/a" for t in HALLUCINATION_TYPES}, verdicts=[True])
    with pytest.raises(FeedbackError, match="0 claims but 1 verdicts"):
        check_feedback(item, [Feedback(id="x", scores={}, segments=[uneven])])
    with pytest.raises(FeedbackError, match="not a SegmentFeedback"):
        check_feedback(item, [Feedback(id="x", scores={}, segments=[{"labels": {}}])])  # type: ignore[list-item]
    assert set(LABELS) == {"hallucinated", "correct", "n/a"}
    with pytest.raises(ValueError, match="unknown type 'colour'"):
        Claim("colour", "x", 0, 1, "?")


def test_caption_verdict_against_the_true_description_is_the_oracle():
    """Evidence = the scene's own detailed caption (every object with colour and size): object
    and attribute verdicts equal verify_world_claim's; relation verdicts, where the caption says
    anything about the pair, agree with it too. Claims come from other scenes' captions, so
    there are false ones of every kind."""
    import random as _r

    from mmalign.oracle import caption_verdict, verify_world_claim

    rng = _r.Random(5)
    scenes = [W.sample_scene(rng, f"c{i}", n_objects=rng.randint(1, 4)) for i in range(150)]
    seen = {"object": set(), "attribute": set(), "relation": set()}
    for k, scene in enumerate(scenes):
        evidence = W.parse_caption(W.detailed_caption(scene))
        for other in (scene, scenes[k - 1], scenes[k - 2]):
            for c in world_claims(W.detailed_caption(other)):
                got, truth = caption_verdict(c, evidence), verify_world_claim(c, scene)
                if c.type in ("object", "attribute") or got is not None:
                    assert got == truth, (c.text, got, truth)
                seen[c.type].add(got)
    assert seen["object"] == {True, False} and {True, False} <= seen["attribute"]
    assert {True, False, None} <= seen["relation"]


def test_caption_verdict_when_the_description_omits_or_errs():
    from mmalign.oracle import caption_verdict

    claims = {c.text: c for c in world_claims(
        "There are two objects: a small red circle and a large blue square. The red circle is left of the blue square.")}
    omits = W.parse_caption("There is one object: a small red circle.")
    assert caption_verdict(claims["a small red circle"], omits) is True
    assert caption_verdict(next(c for c in world_claims("a large blue square") if c.type == "object"), omits) is False
    wrong_size = W.parse_caption("There is one object: a large red circle.")
    attr = next(c for c in world_claims("a small red circle") if c.type == "attribute")
    assert caption_verdict(attr, wrong_size) is False
    other_colour = W.parse_caption("There is one object: a small green circle.")
    assert caption_verdict(attr, other_colour) is False
    rel = next(c for c in world_claims("The red circle is left of the blue square.") if c.type == "relation")
    assert caption_verdict(rel, W.parse_caption("The blue square is right of the red circle.")) is True
    assert caption_verdict(rel, W.parse_caption("The blue square is left of the red circle.")) is False
    assert caption_verdict(rel, W.parse_caption("The blue square is above the red circle.")) is None
