"""The scene world: relations, hashing, sampling, question truth, and the caption checker."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmalign import world as W
from mmalign.world import MentionLabel, RelationLabel, Scene, SceneObject


def obj(color: str, shape: str, size: str, x: float, y: float) -> SceneObject:
    return SceneObject(shape=shape, color=color, size=size, x=x, y=y)


@pytest.fixture
def three() -> Scene:
    """Hand-made: red circle on the left; green star above blue square in one column at x=0.6.

        y=0.2            * green star (large)
        y=0.5   o red          [] blue square
               x=0.2          x=0.6
    """
    return Scene((obj("red", "circle", "small", 0.2, 0.5),
                  obj("blue", "square", "small", 0.6, 0.5),
                  obj("green", "star", "large", 0.6, 0.2)), "hand-3")


# ---------------------------------------------------------------------------------------------
# independent truth: recomputes answers from the scene dict with plain geometry


def truth_of(scene: dict, meta: dict, task: str) -> bool | int:
    """The answer to a question, from the raw scene dict and the question's meta only.

    Deliberately does not call world's relation code: left of = x smaller by >= 0.10, above =
    y smaller by >= 0.10 (y grows downwards).
    """
    objs = scene["objects"]

    def named(name: str) -> dict:
        parts = name.split()
        found = [o for o in objs if o["shape"] == parts[-1] and (len(parts) == 1 or o["color"] == parts[0])]
        assert len(found) == 1, f"{name!r} does not name exactly one object in {objs}"
        return found[0]

    if task == "yesno_existence":
        return any(meta["color"] in (None, o["color"]) and o["shape"] == meta["shape"] for o in objs)
    if task == "yesno_attribute":
        return named(meta["subject"])[meta["attribute"]] == meta["value"]
    if task == "yesno_relation":
        a, b = named(meta["subject"]), named(meta["object"])
        d = {"left of": b["x"] - a["x"], "right of": a["x"] - b["x"],
             "above": b["y"] - a["y"], "below": a["y"] - b["y"]}[meta["relation"]]
        assert not 0.025 < d < 0.10, "a relation question sits in the ambiguous band"
        return d >= 0.10
    if task == "count":
        if meta["attribute"] == "all":
            return len(objs)
        return sum(1 for o in objs if o[meta["attribute"]] == meta["value"])
    raise AssertionError(task)


def assert_qa_true(scene: dict, task: str, question: str, answer: str, label, meta: dict) -> None:
    """A question's text, label and answer agree with the independent truth."""
    if task in W.YESNO_TASKS:
        expected = truth_of(scene, meta, task)
        assert label is expected, (question, answer, meta)
        assert answer.startswith("Yes" if expected else "No"), (question, answer)
        for key in ("color", "shape", "subject", "object", "relation", "value"):
            if meta.get(key):
                assert meta[key] in question, (key, meta, question)
    elif task == "count":
        assert W.parse_count(answer) == truth_of(scene, meta, task) == meta["count"], (question, answer)


# ---------------------------------------------------------------------------------------------
# vocabulary and scene graph


def test_vocabulary_is_rich_enough() -> None:
    assert len(W.SHAPES) >= 6 and len(W.COLORS) >= 6
    assert W.SIZES == ("small", "large")
    assert set(W.RELATIONS) == {"left of", "right of", "above", "below"}
    assert all(len(rgb) == 3 and all(0 <= v <= 255 for v in rgb) for rgb in W.COLORS.values())


def test_relations_hand_checked(three: Scene) -> None:
    names = [o.name() for o in three.objects]
    got = {(names[r.subject], r.relation, names[r.object]) for r in three.relations()}
    # circle vs square: same y -> horizontal only; square vs star: same x -> vertical only;
    # circle vs star: both (star is right of and above the circle)
    assert got == {
        ("red circle", "left of", "blue square"), ("blue square", "right of", "red circle"),
        ("red circle", "left of", "green star"), ("green star", "right of", "red circle"),
        ("red circle", "below", "green star"), ("green star", "above", "red circle"),
        ("green star", "above", "blue square"), ("blue square", "below", "green star"),
    }
    assert three.relation_truth(0, "above", 1) is False  # aligned rows: clearly not above


def test_relation_margin_and_ambiguous_band() -> None:
    s = Scene((obj("red", "circle", "small", 0.30, 0.5), obj("blue", "square", "small", 0.36, 0.5)))
    # 0.06 apart: more than ALIGN_EPS, less than the margin -> neither true nor clearly false
    assert s.relation_truth(0, "left of", 1) is None
    assert s.relation_truth(1, "left of", 0) is False  # the opposite direction is clearly false
    assert s.relations() == ()
    s2 = Scene((obj("red", "circle", "small", 0.30, 0.5), obj("blue", "square", "small", 0.40, 0.5)))
    assert s2.relation_truth(0, "left of", 1) is True  # exactly the margin counts


def test_reading_order_and_detailed_caption(three: Scene) -> None:
    assert three.reading_order() == [0, 2, 1]  # left column, then the x=0.6 column top to bottom
    assert W.detailed_caption(three) == (
        "There are three objects: a small red circle, a large green star and a small blue square. "
        "The red circle is left of the green star. The green star is above the blue square."
    )
    assert W.short_caption(three) == "A red circle, a green star and a blue square."
    one = Scene((obj("orange", "star", "large", 0.5, 0.5),))
    assert W.detailed_caption(one) == "There is one object: a large orange star."
    assert W.short_caption(one) == "An orange star."


def test_scene_validation() -> None:
    with pytest.raises(ValueError, match="unique"):
        Scene((obj("red", "circle", "small", 0.2, 0.2), obj("red", "circle", "large", 0.8, 0.8)))
    with pytest.raises(ValueError, match="unknown color"):
        obj("pink", "circle", "small", 0.2, 0.2)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        obj("red", "circle", "small", 1.2, 0.2)
    with pytest.raises(ValueError, match="1-10 objects"):
        Scene(())


def test_dict_round_trip_and_graph_hash(three: Scene) -> None:
    d = three.to_dict()
    back = Scene.from_dict({**d, "image": "x.png", "graph_hash": "ignored"})
    assert back == three
    moved = Scene(tuple(SceneObject(o.shape, o.color, o.size, o.x + 0.01, o.y - 0.01) for o in reversed(three.objects)),
                  "another-id")
    assert moved.graph_hash() == three.graph_hash()  # positions, order and id do not matter
    swapped = Scene((obj("red", "circle", "small", 0.6, 0.5), obj("blue", "square", "small", 0.2, 0.5),
                     three.objects[2]))
    assert swapped.graph_hash() != three.graph_hash()  # relations changed
    resized = Scene((obj("red", "circle", "large", 0.2, 0.5),) + three.objects[1:])
    assert resized.graph_hash() != three.graph_hash()
    with pytest.raises(ValueError, match="lacks field"):
        Scene.from_dict({"objects": [{"shape": "circle"}]})


def test_sample_scene_deterministic_and_well_laid_out() -> None:
    a = [W.sample_scene(random.Random(7), f"s{i}") for i in range(3)]
    b = [W.sample_scene(random.Random(7), f"s{i}") for i in range(3)]
    assert a == b
    rng = random.Random(1)
    for _ in range(300):
        s = W.sample_scene(rng)
        assert 1 <= len(s.objects) <= 4
        assert s.reading_order() == list(range(len(s.objects)))
        for i, p in enumerate(s.objects):
            r = W.SIZE_EXTENT[p.size]
            assert r <= p.x <= 1 - r and r <= p.y <= 1 - r
            for q in s.objects[i + 1:]:
                need = r + W.SIZE_EXTENT[q.size] + W.MIN_GAP
                assert (p.x - q.x) ** 2 + (p.y - q.y) ** 2 >= need ** 2 - 1e-12
                for d in (abs(p.x - q.x), abs(p.y - q.y)):
                    assert d <= W.ALIGN_EPS or d >= W.RELATION_MARGIN


# ---------------------------------------------------------------------------------------------
# questions


def test_questions_true_and_balanced() -> None:
    rng = random.Random(3)
    labels: dict[str, list[bool]] = {t: [] for t in W.YESNO_TASKS}
    negatives: dict[str, int] = {}
    for i in range(600):
        scene = W.sample_scene(rng, f"q{i}")
        for qa in W.scene_tasks(scene, rng):
            assert_qa_true(scene.to_dict(), qa.task, qa.question, qa.answer, qa.label, qa.meta)
            if qa.label is not None:
                labels[qa.task].append(qa.label)
                negatives[str(qa.meta.get("negative"))] = negatives.get(str(qa.meta.get("negative")), 0) + 1
    for task, ls in labels.items():
        assert 0.42 <= sum(ls) / len(ls) <= 0.58, (task, sum(ls), len(ls))
    assert negatives["adversarial"] > 50 and negatives["random"] > 50 and negatives["opposite"] > 50


def test_question_forms(three: Scene) -> None:
    rng = random.Random(0)
    q = W.existence_question(three, rng, answer=False)
    assert re.fullmatch(r"(Is there|Does the image contain|Can you see) an? \w+ \w+.*\?", q.question)
    assert q.answer == "No." and (q.meta["color"], q.meta["shape"]) not in {(o.color, o.shape) for o in three.objects}
    forms = [W.existence_question(three, random.Random(s), answer=False) for s in range(30)]
    category = [f for f in forms if f.meta["color"] is None]
    assert 3 <= len(category) <= 20, "about a third of existence questions are POPE's category form"
    assert all(f.meta["shape"] not in {o.shape for o in three.objects} for f in category)
    assert all(re.fullmatch(r"(Is there|Can you see) an? \w+ in the (image|picture)\?", f.question) for f in category)
    r = W.relation_question(three, rng, answer=True)
    assert r is not None and r.answer == "Yes."
    assert W.relation_question(Scene((three.objects[0],)), rng) is None
    c = W.count_question(three, random.Random(5))
    assert c.answer in {"Zero.", "One.", "Two.", "Three."}
    assert W.yes_no(True) == "Yes." and W.count_answer(3) == "Three."


def test_scene_tasks_repeat_without_duplicates(three: Scene) -> None:
    qas = W.scene_tasks(three, random.Random(0), qa_per_scene=3)
    assert [q.task for q in qas[:2]] == ["detailed_caption", "short_caption"]
    for task in ("yesno_existence", "yesno_attribute", "yesno_relation", "count"):
        qs = [q.question for q in qas if q.task == task]
        assert 1 <= len(qs) <= 3 and len(set(qs)) == len(qs)


def test_answer_parsers() -> None:
    assert W.parse_yes_no("Yes.") is True and W.parse_yes_no("  no, there is not") is False
    assert W.parse_yes_no("Maybe") is None and W.parse_yes_no("Nope") is None
    assert W.parse_count("Three.") == 3 and W.parse_count("there are 4") == 4 and W.parse_count("none") == 0
    assert W.parse_count("many") is None


# ---------------------------------------------------------------------------------------------
# caption parsing and checking


def test_parse_tolerates_plurals_synonyms_case_and_numbers() -> None:
    p = W.parse_caption("TWO Red Discs, three crosses, a Violet rhombus, an Little orange star and the big squares.")
    got = [(m.shape, m.color, m.size, m.count, m.plural) for m in p.mentions]
    assert got == [
        ("circle", "red", None, 2, True),
        ("cross", None, None, 3, True),
        ("diamond", "purple", None, None, False),
        ("star", "orange", "small", None, False),
        ("square", None, "large", None, True),
    ]
    assert p.mentions[0].text == "TWO Red Discs"
    p = W.parse_caption("The square is large. Red circle, small star.")
    assert [(m.shape, m.color, m.size) for m in p.mentions] == [
        ("square", None, None), ("circle", "red", None), ("star", None, "small")]  # no modifiers across punctuation
    assert W.parse_caption("I see 3 objects.").object_count == 3
    assert W.parse_caption("There is one object: a star.").object_count == 1
    assert W.parse_caption("A star.").object_count is None


def test_parse_relation_phrasings() -> None:
    text = ("The red circle is to the left of the blue square. A green star is on top of the blue square; "
            "the blue square isn't above the star. The star is under the circle and right of the square. "
            "The square is left of it.")
    p = W.parse_caption(text)
    got = [(c.subject.shape, c.relation, c.object.shape, c.negated) for c in p.relations]
    assert got == [
        ("circle", "left of", "square", False),
        ("star", "above", "square", False),
        ("square", "above", "star", True),
        ("star", "below", "circle", False),
        ("star", "right of", "square", False),  # chained: subject stays the star
    ]  # "left of it" has no object mention: no claim


def test_check_hand_written_caption(three: Scene) -> None:
    # objects: small red circle (0.2,0.5), small blue square (0.6,0.5), large green star (0.6,0.2)
    text = ("There are three objects: a large red circle, a small purple square, a yellow triangle and "
            "two green stars. There is no orange cross. The red circle is right of the blue square. "
            "The green star is above the blue square. The yellow triangle is below the red circle.")
    c = W.check_caption(W.parse_caption(text), three)
    labels = [(m.mention.text, m.label, m.wrong_attributes) for m in c.mentions]
    assert labels == [
        ("a large red circle", MentionLabel.ATTRIBUTE_ERROR, ("size",)),
        ("a small purple square", MentionLabel.HALLUCINATED, ("color",)),  # a square exists, not purple
        ("a yellow triangle", MentionLabel.HALLUCINATED, ()),  # no triangle at all
        ("two green stars", MentionLabel.ATTRIBUTE_ERROR, ("count",)),
        ("no orange cross", MentionLabel.NEGATED, ()),
        ("The red circle", MentionLabel.CORRECT, ()),
        ("the blue square", MentionLabel.CORRECT, ()),
        ("The green star", MentionLabel.CORRECT, ()),
        ("the blue square", MentionLabel.CORRECT, ()),
        ("The yellow triangle", MentionLabel.HALLUCINATED, ()),
        ("the red circle", MentionLabel.CORRECT, ()),
    ]
    assert (c.n_mentions, c.n_correct, c.n_hallucinated, c.n_attribute_errors) == (10, 5, 3, 2)
    assert c.n_category_hallucinated == 2 and c.distinct_hallucinated == 2
    assert [r.label for r in c.relations] == [RelationLabel.WRONG, RelationLabel.CORRECT, RelationLabel.UNVERIFIABLE]
    assert c.count_correct is True
    assert c.covered == frozenset({0, 1, 2}) and c.coverage == 1.0  # via the relation sentences
    assert not c.faithful and not c.complete


def test_check_short_caption_partial_coverage(three: Scene) -> None:
    c = W.check_caption(W.parse_caption("A red circle and a star."), three)
    assert c.n_hallucinated == 0 and c.faithful and not c.complete
    assert c.covered == frozenset({0, 2})  # "a star" is the only star: it identifies it


def test_negated_relation_and_ambiguous_mentions() -> None:
    s = Scene((obj("red", "circle", "small", 0.2, 0.5), obj("blue", "circle", "large", 0.7, 0.5)))
    c = W.check_caption(W.parse_caption("The red circle is not right of the blue circle. The circle is left of "
                                        "the blue circle. The large circle is right of the red circle."), s)
    assert [r.label for r in c.relations] == [RelationLabel.CORRECT, RelationLabel.UNVERIFIABLE, RelationLabel.CORRECT]
    # "the circle" alone matches two circles: correct but it identifies neither
    assert c.mentions[2].label == MentionLabel.CORRECT and len(c.mentions[2].matched) == 2


def test_aggregate_checks(three: Scene) -> None:
    good = W.check_caption(W.parse_caption(W.detailed_caption(three)), three)
    bad = W.check_caption(W.parse_caption("A yellow triangle."), three)
    agg = W.aggregate_checks([good, bad])
    assert agg["captions"] == 2 and agg["complete_rate"] == 0.5
    assert agg["hallucinated"] == 1
    assert agg["object_hallucination_rate"] == pytest.approx(1 / (good.n_mentions + 1))
    assert agg["coverage"] == pytest.approx(3 / 6)
    assert W.aggregate_checks([])["captions"] == 0


# ---------------------------------------------------------------------------------------------
# properties

pairs = [(c, s) for c in W.COLORS for s in W.SHAPES]

arbitrary_scenes = st.lists(
    st.tuples(st.sampled_from(pairs), st.sampled_from(W.SIZES), st.floats(0, 1), st.floats(0, 1)),
    min_size=1, max_size=6, unique_by=lambda t: t[0],
).map(lambda items: Scene(tuple(obj(c, s, z, x, y) for (c, s), z, x, y in items)))
sampled_scenes = st.integers(0, 2**32 - 1).map(lambda seed: W.sample_scene(random.Random(seed)))
any_scene = st.one_of(arbitrary_scenes, sampled_scenes)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_scene)
def test_round_trip_detailed_caption(scene: Scene) -> None:
    c = W.check_caption(W.parse_caption(W.detailed_caption(scene)), scene)
    assert c.complete and c.coverage == 1.0 and c.count_correct is True
    assert c.n_hallucinated == 0 and c.n_attribute_errors == 0
    assert all(r.label == RelationLabel.CORRECT for r in c.relations)
    assert len(c.relations) == len(W.caption_relations(scene))
    s = W.check_caption(W.parse_caption(W.short_caption(scene)), scene)
    assert s.n_hallucinated == 0 and s.coverage == 1.0


@settings(max_examples=150, deadline=None)
@given(any_scene, any_scene)
def test_other_scene_yields_exactly_the_missing_objects(a: Scene, b: Scene) -> None:
    c = W.check_caption(W.parse_caption(W.detailed_caption(a)), b)
    missing = {(o.color, o.shape) for o in a.objects} - {(o.color, o.shape) for o in b.objects}
    got = {(m.mention.color, m.mention.shape) for m in c.mentions if m.label == MentionLabel.HALLUCINATED}
    assert got == missing
    assert (c.n_hallucinated > 0) == bool(missing)


@settings(max_examples=100, deadline=None)
@given(sampled_scenes, st.integers(0, 1000))
def test_generated_questions_are_true(scene: Scene, seed: int) -> None:
    for qa in W.scene_tasks(scene, random.Random(seed), qa_per_scene=2):
        assert_qa_true(scene.to_dict(), qa.task, qa.question, qa.answer, qa.label, qa.meta)


# ---------------------------------------------------------------------------------------------
# the world prior (co-occurrence) and the look-up questions


def test_world_prior_gives_cooccurrence_and_typical_colours():
    rng = random.Random(0)
    scenes = [W.sample_scene(rng, f"p{i}", min_objects=2, max_objects=4) for i in range(3000)]
    prior = W.DEFAULT_PRIOR
    group = {s: k for k, c in enumerate(prior.contexts) for s in c}
    same = total = 0
    for s in scenes:
        g = [group[o.shape] for o in s.objects]
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                same += g[i] == g[j]
                total += 1
    # two objects share a context far more often than the 5/11 that uniform draws would give
    assert same / total > 0.65
    typical = dict(prior.typical_color)
    objs = [o for s in scenes for o in s.objects]
    share = sum(o.color == typical[o.shape] for o in objs) / len(objs)
    assert 0.35 < share < 0.6  # 0.5 asked, minus uniqueness clashes; uniform would give 1/6
    freq = {sh: sum(o.shape == sh for o in objs) for sh in W.SHAPES}
    assert freq["circle"] > 1.8 * freq["triangle"]  # the popular split has something to rank
    uniform = [W.sample_scene(random.Random(i), prior=None) for i in range(400)]
    assert sum(o.color == typical[o.shape] for s in uniform for o in s.objects) / sum(len(s.objects) for s in uniform) < 0.3


def test_world_prior_validates():
    with pytest.raises(ValueError, match="partition"):
        W.WorldPrior(contexts=(("circle", "square", "triangle"), ("star", "cross", "circle")))
    with pytest.raises(ValueError, match="weight"):
        W.WorldPrior(shape_weights=(1.0, 1.0))


def test_lookup_questions_answer_from_the_scene(three):
    rng = random.Random(0)
    qa = W.lookup_color_question(three, rng, "star")
    assert qa.answer == "Green." and W.parse_lookup_colors(qa.answer) == ["green"]
    qa = W.lookup_color_question(three, rng, "cross")
    assert qa.answer == "There is no cross." and W.parse_lookup_colors(qa.answer) == []
    assert W.parse_lookup_colors("I do not know") is None
    qa = W.lookup_size_question(three, rng, 2)
    assert qa.answer == "Large." and W.parse_lookup_size(qa.answer) == "large"
    # the circle (x 0.2) is left of the square (x 0.6), same row
    qa = W.lookup_relation_question(three, rng, (0, 1))
    assert qa.answer == "Left of." and W.parse_lookup_relations(qa.answer) == ["left of"]
    # the star is right of the circle and above it
    qa = W.lookup_relation_question(three, rng, (2, 0))
    assert qa.answer == "Right of and above." and W.parse_lookup_relations(qa.answer) == ["right of", "above"]
    assert W.lookup_relation_question(Scene(three.objects[:1], "one"), rng) is None
    assert W.parse_lookup_relations("Level.") == [] and W.parse_lookup_relations("dunno") is None


def test_explained_yes_no_answers_start_with_the_label_and_state_the_truth():
    rng = random.Random(1)
    for i in range(300):
        scene = W.sample_scene(rng, f"e{i}")
        for qa in W.scene_tasks(scene, random.Random(i), explain_yes_no=True):
            if qa.label is None:
                continue
            assert W.parse_yes_no(qa.answer) is qa.label
            body = qa.answer.split(", ", 1)[1]
            if qa.task == "yesno_attribute" and qa.meta["attribute"] == "size":
                subject = next(o for o in scene.objects if o.name() == qa.meta["subject"])
                assert body == f"it is {subject.size}."
            if qa.task == "yesno_existence" and not qa.label:
                assert body.startswith("there is no ")
    short = W.scene_tasks(W.sample_scene(random.Random(2)), random.Random(2))
    assert {qa.answer for qa in short if qa.label is not None} <= {"Yes.", "No."}
