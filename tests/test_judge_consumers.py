"""The judge feedback source for every consumer of the oracle's feedback (issue 19): the caption
judge's helpfulness and missing objects, derived by hand from a fixed description; the ``nlf``
stage with ``--judge`` judging the revisions; the ``prefs`` stage with ``--inject-scoring judge``
scoring the injected copies and the reference. The judge is the tiny LLaVA of ``tests/conftest.py``
with its generation scripted (``_generate``), so every number has a derivation; the world oracle
is made to raise wherever the judge alone must be asked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines import nlf as N
from data_pipelines import prefs as P
from mmalign import world as W
from mmalign.feedback import FeedbackItem
from mmalign.oracle import WorldOracle, load_world_scenes
from mmalign.records import RecordError
from mmalign.stage import StageOutput, atomic_write_jsonl
from models.feedback_sources import VLMJudgeSource, caption_helpfulness, described_objects
from tests.test_nlf import SCRIPT  # the scripted reviser's table (its class is loaded by path)

DESCRIPTION = "A red circle is left of a blue square."


def _no_oracle(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the world oracle was asked; only the judge should be")

    monkeypatch.setattr(WorldOracle, "feedback", refuse)


def _spy_annotate(monkeypatch) -> list[list[str]]:
    """Record the item ids of every ``VLMJudgeSource.annotate`` call (the judge is loaded by class
    path inside the stages, so the class is patched)."""
    calls: list[list[str]] = []
    real = VLMJudgeSource.annotate

    def spy(self, items):
        calls.append([it.id for it in items])
        return real(self, items)

    monkeypatch.setattr(VLMJudgeSource, "annotate", spy)
    return calls


# ---------------------------------------------------------------------------------------------
# the caption judge: helpfulness, missing objects, the oracle's meta keys


@pytest.fixture(scope="module")
def caption_judge(model_dirs):
    return VLMJudgeSource(str(model_dirs["llava"]), questions="caption", batch_size=8, progress=False)


def test_described_objects_one_per_colour_and_shape():
    """"There are two objects: a small red circle and a large blue square. The red circle is left
    of the blue square. The circle is small. There is no star." names red circle (3 times, once
    without colour), blue square (twice) and a negated star: two objects."""
    text = ("There are two objects: a small red circle and a large blue square. The red circle is left of the "
            "blue square. The circle is small. There is no star.")
    assert [(m.color, m.shape) for m in described_objects(W.parse_caption(text))] == [("red", "circle"),
                                                                                     ("blue", "square")]
    # a colourless shape with no coloured mention of it is an object of its own
    assert [(m.color, m.shape) for m in described_objects(W.parse_caption("A star and a red star and a cross."))] \
        == [("red", "star"), (None, "cross")]


def test_caption_judge_helpfulness_and_missing_by_hand(caption_judge, world, monkeypatch):
    """Every image is described as DESCRIPTION: two objects, red circle and blue square.

    a "There is a small red circle.": refers to the red circle only -> helpfulness 1/2, missing
      the blue square; claims: circle (object, True), small red circle (attribute: no size
      described -> None): faithfulness 1/1.
    b "There is a circle and a green square.": "circle" (no colour) refers to the red circle, the
      green square is not the blue one -> 1/2, missing the blue square; claims: circle True,
      square True, green square (attribute) False -> faithfulness 2/3, one attribute hallucinated.
    c "I cannot tell.": no claim, still described -> 0/2, missing both, faithfulness 1.0.
    d "There is no red circle, but a blue square.": the negated mention refers to nothing -> 1/2,
      missing the red circle.
    e "A red circle and a blue square.": both -> 2/2, nothing missing, "No change is needed."
    """
    image = str(next((world / "images").rglob("*.png")))
    asked = []
    monkeypatch.setattr(caption_judge, "_generate", lambda pairs: asked.extend(pairs) or [DESCRIPTION] * len(pairs))
    texts = {"a": "There is a small red circle.", "b": "There is a circle and a green square.", "c": "I cannot tell.",
             "d": "There is no red circle, but a blue square.", "e": "A red circle and a blue square."}
    fb = {f.id: f for f in caption_judge.annotate([FeedbackItem(k, "Describe.", t, image=image)
                                                   for k, t in texts.items()])}
    assert asked == [(image, "Describe the image in detail.")]  # one description, claims or not
    want = {"a": (0.5, 1.0, "the blue square"), "b": (0.5, 2 / 3, "the blue square"),
            "c": (0.0, 1.0, "the red circle and the blue square"), "d": (0.5, 1.0, "the red circle")}
    for k, (help_, faith, missing) in want.items():
        f = fb[k]
        assert f.scores == {"faithfulness": pytest.approx(faith), "helpfulness": help_}, k
        assert f"The answer does not mention {missing}." in f.critique, k
        assert f"Also mention {missing}." in f.refinement, k
        assert f.meta["description"] == DESCRIPTION
    assert fb["e"].scores == {"faithfulness": 1.0, "helpfulness": 1.0} and fb["e"].refinement == "No change is needed."
    # the oracle's meta keys
    assert fb["b"].meta["hallucinated"] == {"object": 0, "attribute": 1, "relation": 0}
    assert fb["b"].meta["claims"] == 3 and fb["b"].meta["unverifiable"] == 0
    assert fb["a"].meta["claims"] == 2 and fb["a"].meta["unverifiable"] == 1
    assert fb["c"].meta["claims"] == 0 and fb["c"].meta["hallucinated"] == {"object": 0, "attribute": 0, "relation": 0}
    # a description that names nothing: nothing is known to be missing
    assert caption_helpfulness("I cannot tell.", W.parse_caption("I see nothing.")) == (1.0, [])


def test_yesno_judge_has_the_meta_keys_but_no_helpfulness(caption_judge, world, monkeypatch):
    """questions="yesno", every answer "no": "There is a small red circle." has an object and an
    attribute claim, both false."""
    image = str(next((world / "images").rglob("*.png")))
    monkeypatch.setattr(caption_judge, "questions", "yesno")
    monkeypatch.setattr(caption_judge, "_generate", lambda pairs: ["No."] * len(pairs))
    (f,) = caption_judge.annotate([FeedbackItem("a", "Describe.", "There is a small red circle.", image=image)])
    assert f.scores == {"faithfulness": 0.0}
    assert f.meta["hallucinated"] == {"object": 1, "attribute": 1, "relation": 0}
    assert f.meta["claims"] == 2 and f.meta["unverifiable"] == 0 and "description" not in f.meta


# ---------------------------------------------------------------------------------------------
# nlf --judge


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_nlf_judge_judges_every_round_batched_without_scenes(world, model_dirs, tmp_path, monkeypatch, capsys):
    """Two scenes, each with three oracle-annotated responses (the reference, an object and an
    attribute hallucination): four episodes. The judge describes each image truthfully (the
    scene's detailed caption). Scripted revisions: the object episodes revise to "There is a
    <absent shape>." (round 1), then to the reference (round 2); the attribute episodes to the
    reference (round 1).

    By hand, with --score-weights faithfulness=1,helpfulness=1: the reference makes only true
    claims and names every described object -> score 1.0 and nothing left to fix (episode over);
    "There is a <absent>." makes one false object claim and names nothing -> 0.0, one object
    hallucinated. The judge is asked in three annotate calls: the four "before" responses, the
    four round-1 revisions, the two round-2 revisions.
    """
    from tests.test_nlf import _feedback_file

    fb = _feedback_file(world, tmp_path / "fb" / "feedback.jsonl", n_per_split=1)
    rows = _rows(fb)
    by_src: dict[str, list[dict]] = {}
    for r in rows:
        by_src.setdefault(r["source_id"], []).append(r)
    assert len(by_src) == 2
    # the data folder without any scene graph: the judge needs none
    data = tmp_path / "data"
    shutil.copytree(world, data, ignore=shutil.ignore_patterns("scenes.jsonl"))
    scenes = load_world_scenes(world)
    # by the image's path under the data root (file names repeat across splits)
    captions = {Path(k).relative_to(world.resolve()): W.detailed_caption(s) for k, s in scenes.items()}
    monkeypatch.setattr(VLMJudgeSource, "_generate", lambda self, pairs: [
        captions[Path(i).relative_to(data.resolve())] for i, _ in pairs])
    calls = _spy_annotate(monkeypatch)
    _no_oracle(monkeypatch)
    SCRIPT.clear()
    wrong = {}
    for ref, obj, attr in by_src.values():
        scene = scenes[str((world / obj["images"][0]).resolve())]
        absent = next(s for s in W.SHAPES if s not in {o.shape for o in scene.objects})
        wrong[obj["id"]] = f"There is {W.article(absent)} {absent}."
        SCRIPT.update({f"{obj['id']}-refine1": wrong[obj["id"]], f"{obj['id']}-refine2": ref["response"],
                       f"{attr['id']}-refine1": ref["response"]})
    base = ["--feedback", str(fb), "--data", str(data), "--model", str(model_dirs["llava"]),
            "--policy-class", "tests.test_nlf.ScriptedReviser", "--revisions", "2",
            "--score-weights", "faithfulness=1,helpfulness=1", "--condition", "rating", "--batch-size", "4",
            "--no-progress"]
    # without --judge the stage still refuses to run episodes without scene graphs, and says what to do
    with pytest.raises(SystemExit):
        N.main([*base, "--out", str(tmp_path / "no-judge")])
    assert "--judge" in capsys.readouterr().err

    out = tmp_path / "nlf"
    assert N.main([*base, "--out", str(out), "--judge", str(model_dirs["llava"])]) == 0
    recs = {r["id"]: r for s in ("train", "val") for r in _rows(out / s / "sft.jsonl") if r["kind"] == "refinement"}
    episodes = [(obj, attr) for _ref, obj, attr in by_src.values()]
    assert [sorted(c) for c in calls] == [
        sorted(f"{r['id']}-before" for e in episodes for r in e),
        sorted(f"{r['id']}-refine1" for e in episodes for r in e),
        sorted(f"{obj['id']}-refine2" for obj, _a in episodes)]
    assert len(recs) == 6 and all(r["judged_by"] == "judge" for r in recs.values())
    for obj, attr in episodes:
        bad, good = recs[f"{obj['id']}-refine1"], recs[f"{obj['id']}-refine2"]
        assert bad["score_after"] == 0.0 and bad["scores_after"] == {"faithfulness": 0.0, "helpfulness": 0.0}
        assert bad["hallucinated_after"] == {"object": 1, "attribute": 0, "relation": 0}
        assert "The answer does not mention" in bad["critique"]  # the judge's missing objects
        assert good["score_before"] == 0.0 and good["score_after"] == 1.0 and good["success"] and good["fixed"]
        # a truthful description: the judge's "before" of the object hallucination is the oracle's
        # (one absent shape, every described object named), as the feedback record has it
        sc = obj["annotations"]["scores"]
        assert bad["score_before"] == pytest.approx((sc["faithfulness"] + sc["helpfulness"]) / 2)
        assert bad["hallucinated_before"] == obj["annotations"]["meta"]["hallucinated"]
        fixed = recs[f"{attr['id']}-refine1"]
        assert fixed["score_after"] == 1.0 and fixed["hallucinated_after"] == {"object": 0, "attribute": 0,
                                                                                "relation": 0}
    rep = json.loads((out / "report.json").read_text())
    assert rep["judged_by"] == "judge" and rep["judge"] == str(model_dirs["llava"])
    assert rep["episodes_stopped"] == {"nothing left to fix": 2}
    assert f"revisions judged by the judge {model_dirs['llava']}" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["judge"]["path"] == str(model_dirs["llava"])
    assert manifest["config"]["judge"]["questions"] == "caption"
    assert sum(Path(i["path"]).name == "config.json" for i in manifest["inputs"]) == 2  # the policy's, the judge's

    # a weight the judge does not give is named: yes/no questions give no helpfulness
    with pytest.raises(RecordError, match=r"gives no 'helpfulness' score.*--judge-questions caption"):
        N.main([*base, "--out", str(tmp_path / "yesno"), "--judge", str(model_dirs["llava"]),
                "--judge-questions", "yesno"])


# ---------------------------------------------------------------------------------------------
# prefs --inject-scoring judge


PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}]
SCENES = {
    "s0": W.Scene((W.SceneObject("circle", "red", "small", 0.2, 0.5), W.SceneObject("square", "blue", "large", 0.8, 0.5)),
                  scene_id="s0"),
    "s2": W.Scene((W.SceneObject("cross", "purple", "large", 0.5, 0.5),), scene_id="s2"),
}
#: what the scripted judge says of each image (by scene id)
DESCRIBED = {"s0": "A small red circle is left of a large blue square.", "s2": "There is a large purple cross."}


@pytest.fixture
def hand_data(tmp_path) -> Path:
    """A data-stage output of two hand-made scenes with blank images (as tests/test_prefs.py)."""
    out = tmp_path / "data"
    with StageOutput(out, stage="data", config={"hand_made": True}) as st:
        (st.path / "images" / "train").mkdir(parents=True)
        for sid in SCENES:
            Image.new("RGB", (8, 8)).save(st.path / "images" / "train" / f"{sid}.png")
        atomic_write_jsonl(st.path / "train" / "scenes.jsonl",
                           [{**s.to_dict(), "split": "train", "image": f"images/train/{sid}.png"}
                            for sid, s in SCENES.items()])
    return out


def _judged_row(pid: str, sid: str, text: str, f: float, h: float) -> dict:
    rid = f"{pid}-s0"
    return {"id": rid, "images": [f"images/train/{sid}.png"], "prompt": PROMPT, "response": text,
            "annotations": {"source": "judge", "id": rid, "scores": {"faithfulness": f, "helpfulness": h},
                            "critique": "c", "refinement": "r"},
            "sample_index": 0, "source_id": pid, "scene_id": sid, "task": "detailed_caption",
            "reference": W.detailed_caption(SCENES[sid])}


def test_prefs_judge_scores_injected_copies_and_reference(hand_data, model_dirs, tmp_path, monkeypatch):
    """Judge-fed feedback (scored_by "judge"), --judge given: auto scoring is the judge's.

    p0 (s0), its one sample scored 1.0 / 0.5 (overall 0.7 * 1 + 0.3 * 0.5 = 0.85). The reference
    ("There are two objects: a small red circle and a large blue square. The red circle is left of
    the blue square.") against the description of s0: every claim holds and both described
    objects are named -> 1.0 / 1.0, overall 1.0, on top. Its injected copy is scored by the judge
    and must come out below 0.85.
    p2 (s2), its sample scored 0 / 0: no copy can score below it, so each candidate (object, then
    attribute; "relation" has no relation claim to flip) is tried in its own round and dropped.
    The first annotate call holds both references and both prompts' first candidates.
    """
    rows = [_judged_row("p0", "s0", "There is a small red circle.", 1.0, 0.5),
            _judged_row("p2", "s2", "There is a large purple cross.", 0.0, 0.0)]
    fb = tmp_path / "fb"
    fb.mkdir()
    (fb / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(VLMJudgeSource, "_generate", lambda self, pairs: [DESCRIBED[Path(i).stem] for i, _ in pairs])
    calls = _spy_annotate(monkeypatch)
    _no_oracle(monkeypatch)
    out = tmp_path / "prefs"
    assert P.main(["--feedback", str(fb), "--data", str(hand_data), "--out", str(out), "--inject-per-prompt", "1",
                   "--include-reference", "--judge", str(model_dirs["llava"])]) == 0
    ranked = {r["id"]: r["responses"] for r in _rows(out / "ranked.jsonl")}
    ref, sample, inj = ranked["p0"]
    assert ref["source"] == "reference" and ref["scored_by"] == "judge"
    assert ref["scores"] == {"faithfulness": 1.0, "helpfulness": 1.0} and ref["overall"] == 1.0
    assert sample["source"] == "sample" and sample["overall"] == 0.85
    assert inj["source"].startswith("inject:") and inj["scored_by"] == "judge" and inj["overall"] < 0.85
    assert inj["injection"]["parent_rank"] == 1
    # the copy's scores are the judge's on its text, nothing else
    judge = VLMJudgeSource(str(model_dirs["llava"]), questions="caption", progress=False)
    (mine,) = judge.annotate([FeedbackItem("x", "", inj["text"], image=str(hand_data / "images/train/s0.png"))])
    assert inj["scores"] == {"faithfulness": mine.scores["faithfulness"], "helpfulness": mine.scores["helpfulness"]}
    assert inj["critique"] == mine.critique
    calls.pop()  # the check above
    # p2: the reference only (its sample scores 0 and no copy can score lower)
    assert [r["source"] for r in ranked["p2"]] == ["reference", "sample"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["inject_scoring"] == "judge" and rep["scored_by"] == {"judge": 5}
    assert rep["prompts"]["short_of_injections"] == 1
    failed = {k: v for k, v in rep["injections"]["failed_attempts"].items() if "does not score below" in k}
    # each round asked about one p2 copy that failed (round 1 also about p0's, which held): one
    # failure per call, and at least the object and the attribute copy were tried
    assert sum(failed.values()) == len(calls) >= 2
    first = set(calls[0])
    assert {"p0-reference", "p2-reference", "p0-inject0-round1", "p2-inject0-round1"} == first
    assert all(ids == [f"p2-inject0-round{k}"] for k, ids in enumerate(calls[1:], 2))

    # --inject-scoring judge without --judge is refused; a weight the judge lacks is named
    with pytest.raises(SystemExit):
        P.main(["--feedback", str(fb), "--data", str(hand_data), "--out", str(tmp_path / "x"),
                "--inject-scoring", "judge"])
    with pytest.raises(RecordError, match=r"gives no 'helpfulness' score.*--judge-questions caption"):
        P.main(["--feedback", str(fb), "--data", str(hand_data), "--out", str(tmp_path / "y"),
                "--inject-scoring", "judge", "--judge", str(model_dirs["llava"]), "--judge-questions", "yesno"])
