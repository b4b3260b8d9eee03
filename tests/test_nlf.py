"""DRESS's NLF data: the ``nlf`` stage on the small world with the tiny LLaVA (conditioned on the
rating level with ``--condition rating``, and on the critique text, the default), and the LVLM_NLF
importer (rating conditions).

The importer's fixture (tests/fixtures/real/dress/LVLM_NLF/hallucination_nlf.jsonl), with
``--max-rating 5`` (score = rating / 5) and the default scheme (threshold 0.75: bad < 0.75 <= good):

* line 1 (000000051977.jpg): ratings 2, 3, 5 -> scores 0.4, 0.6, 1.0: a critique example (bad)
  and refinement episodes 0.4 -> 0.6 (bad, success) and 0.6 -> 1.0 (good, success);
* line 2 (000000151112.jpg): ratings 4, 3 -> 0.8 (good), then 0.8 -> 0.6 (bad, no success); its
  question starts with ``<image>\\n`` (dropped) and it uses the ``critique_NLF`` spelling;
* line 3 (000000000139.jpg): one turn, rating 5 (a number) -> a good critique example only;
* line 4 (000000051977.jpg again): ratings 1, 5 -> 0.2 (bad), then 0.2 -> 1.0 (good, success);
  its last turn has no critique.

Total: 4 critique examples, 4 refinement episodes (3 successes); 5 + 2 critique keys, 1 missing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from data_pipelines import import_dress as D
from data_pipelines import nlf as N
from mmalign import world as W
from mmalign.conditions import ConditionScheme
from mmalign.ranking import split_of
from mmalign.records import RecordError, message_text, read_records

FIXTURE = Path(__file__).parent / "fixtures" / "real" / "dress"
NLF_FILE = FIXTURE / "LVLM_NLF" / "hallucination_nlf.jsonl"
IMAGES = FIXTURE / "images"
VAL_FRACTION = 0.5
SCHEME = ConditionScheme()

#: record id -> the revision ScriptedReviser returns (set by a test before it runs the stage)
SCRIPT: dict[str, str] = {}


class ScriptedReviser(torch.nn.Module):
    """A stand-in Policy (loaded by class path, like HFPolicy) whose revisions are scripted by
    record id (``SCRIPT``): empty, hallucinating or correct, as a test needs."""

    def __init__(self, path: str, **_):
        super().__init__()
        from models.policy import HFPolicy

        self.processor = HFPolicy(path).processor
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def generate(self, batch, num_return_sequences=1, **_):
        return [SCRIPT[m["id"]] for m in batch["meta"]]


# ---------------------------------------------------------------------------------------------
# helpers


def _scenes(world: Path):
    from mmalign.oracle import load_world_scenes

    return load_world_scenes(world)


def _oracle_fb(world: Path, image_rel: str, text: str):
    from mmalign.feedback import FeedbackItem
    from mmalign.oracle import WorldOracle

    scenes = _scenes(world)
    image = str((world / image_rel).resolve())
    return WorldOracle(scenes).feedback(FeedbackItem(id="x", prompt="", response=text, image=image), scenes[image])


def _feedback_file(world: Path, out: Path, n_per_split: int = 2) -> Path:
    """Oracle feedback on three responses per caption prompt (the reference, an object and an
    attribute hallucination), for ``n_per_split`` scenes the stage puts in train and as many in
    val (``VAL_FRACTION``), so both splits are exercised."""
    import random

    from mmalign.feedback import FeedbackItem, feedback_to_json
    from mmalign.inject import inject
    from mmalign.oracle import WorldOracle

    scenes = _scenes(world)
    oracle = WorldOracle(scenes)
    rng = random.Random(0)
    want = {"train": n_per_split, "val": n_per_split}
    rows = []
    for line in (world / "train" / "sft.jsonl").read_text().splitlines():
        r = json.loads(line)
        split = split_of(r["scene_id"], VAL_FRACTION)
        if r["task"] != "detailed_caption" or not want[split]:
            continue
        image = str((world / r["images"][0]).resolve())
        ref = r["messages"][-1]["content"][0]["text"]
        texts = [ref]
        for kind in ("object", "attribute"):
            try:
                texts.append(inject(ref, scenes[image], kind, rng).text)
            except ValueError:
                pass
        if len(texts) < 3:
            continue
        want[split] -= 1
        for j, text in enumerate(texts):
            fb = oracle.feedback(FeedbackItem(id=f"{r['id']}-{j}", prompt="", response=text, image=image), scenes[image])
            rows.append({"id": f"{r['id']}-{j}", "images": r["images"], "prompt": r["messages"][:-1], "response": text,
                         "annotations": {"source": "oracle", **feedback_to_json(fb)}, "source_id": r["id"],
                         "scene_id": r["scene_id"], "task": r["task"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _all(out: Path) -> dict[str, list[dict]]:
    return {s: _rows(out / s / "sft.jsonl") for s in ("train", "val")}


def _text(m: dict) -> str:
    return message_text(m)


def _args(fb: Path, world: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--feedback", str(fb), "--data", str(world), "--model", str(model), "--out", str(out),
            "--val-fraction", str(VAL_FRACTION), "--max-new-tokens", "12", "--batch-size", "4", "--no-progress",
            *extra]


@pytest.fixture(scope="module")
def fb(world, tmp_path_factory) -> Path:
    return _feedback_file(world, tmp_path_factory.mktemp("nlf-fb") / "feedback.jsonl")


@pytest.fixture(scope="module")
def nlf_out(world, model_dirs, fb, tmp_path_factory) -> Path:
    """The stage end to end with the tiny LLaVA: 8 feedback records, 2 refinement rounds, rating conditions."""
    out = tmp_path_factory.mktemp("nlf") / "nlf"
    assert N.main(_args(fb, world, model_dirs["llava"], out, "--limit", "8", "--revisions", "2",
                        "--condition", "rating")) == 0
    return out


# ---------------------------------------------------------------------------------------------
# the nlf stage with the tiny LLaVA


def test_critique_examples(nlf_out, fb, world):
    recs = [r for v in _all(nlf_out).values() for r in v if r["kind"] == "critique"]
    source = {r["id"]: r for r in _rows(fb)}
    assert len(recs) == 8  # --limit 8: one critique example per feedback record
    for r in recs:
        src = source[r["source_id"]]
        score = src["annotations"]["scores"]["faithfulness"]  # default --score-weights faithfulness=1
        assert r["score"] == pytest.approx(score) and r["scores"] == {"faithfulness": pytest.approx(score)}
        assert r["level"] == ("good" if score >= 0.75 else "bad") and r["condition"] == f"Answer quality: {r['level']}."
        user, answer = r["messages"]
        assert user["content"][0] == {"type": "image"}
        assert _text(user) == f"{r['condition']} {_text(src['prompt'][0])}"  # condition in the first turn
        assert answer["role"] == "assistant" and _text(answer) == src["response"]
        assert r["critique"] == src["annotations"]["critique"] and r["refinement"] == src["annotations"]["refinement"]
        assert r["scene_id"] == src["scene_id"] and r["task"] == "detailed_caption" and r["feedback_source"] == "oracle"
    assert {r["level"] for r in recs} == {"good", "bad"}
    # every record reads back through the SFT schema, images relative to --data
    for s in ("train", "val"):
        read_records(nlf_out / s / "sft.jsonl", "sft", data_root=world)


def test_refinement_episodes_keep_every_revision(nlf_out, world):
    rep = json.loads((nlf_out / "report.json").read_text())
    rows = [r for v in _all(nlf_out).values() for r in v]
    crit = [r for r in rows if r["kind"] == "critique"]
    ref = {r["id"]: r for r in rows if r["kind"] == "refinement"}
    rejects = _rows(nlf_out / "rejects.jsonl")
    # references are perfect ("No change is needed."): nothing to fix, no episode
    no_fix = [r for r in crit if r["refinement"] == "No change is needed."]
    assert rep["feedback"] == {"records": 8, "without_refinement": len(no_fix), "episodes": 8 - len(no_fix)}
    assert len(no_fix) >= 2
    # every revision is a record (better or not) or an empty-revision reject, round by round
    r1 = [r for r in ref.values() if r["round"] == 1]
    r2 = [r for r in ref.values() if r["round"] == 2]
    empty = [x for x in rejects if x["reason"] == "empty revision"]
    assert len(r1) + sum(x["round"] == 1 for x in empty) == rep["feedback"]["episodes"]
    left = rep["episodes_stopped"].get("nothing left to fix", 0)
    assert len(r2) + sum(x["round"] == 2 for x in empty) == len(r1) - left
    assert rep["revisions"]["round 1"]["n"] == len(r1) and rep["revisions"]["all"]["n"] == len(ref)
    assert r1 and r2

    crit_by_src = {r["source_id"]: r for r in crit}
    for r in ref.values():
        msgs = r["messages"]
        k = r["round"]
        assert len(msgs) == 2 + 2 * k and [m["role"] for m in msgs] == ["user", "assistant"] * (k + 1)
        c = crit_by_src[r["source_id"]]
        question = _text(c["messages"][0]).removeprefix(c["condition"] + " ")
        assert _text(msgs[0]) == question and msgs[0]["content"][0] == {"type": "image"}  # no condition here
        assert _text(msgs[1]) == _text(c["messages"][1])  # the original response
        assert _text(msgs[-2]) == f"{r['condition']} {r['refinement']}"  # condition in the last user turn
        assert r["condition"] == SCHEME.for_score(r["score_after"]) and r["level"] == SCHEME.name(r["score_after"])
        assert r["success"] == (r["score_after"] > r["score_before"])
        assert r["fixed"] == (sum(r["hallucinated_after"].values()) < sum(r["hallucinated_before"].values()))
        assert r["policy"].startswith("llava@") and r["judged_by"] == "oracle" and r["checkable_claims_after"] >= 0
        if k == 1:
            assert r["refinement"] == c["refinement"] and r["score_before"] == pytest.approx(c["score"])
        else:
            prev = ref[r["id"].replace(f"-refine{k}", f"-refine{k - 1}")]
            # round 2 continues round 1's conversation (without round 1's condition), refines its
            # revision with the oracle's new refinement, and starts from its score
            assert _text(msgs[2]) == prev["refinement"] and _text(msgs[3]) == _text(prev["messages"][-1])
            assert r["score_before"] == prev["score_after"]
            assert r["refinement"] == _oracle_fb(world, r["images"][0], _text(prev["messages"][-1])).refinement

    # one record's scores by hand through the oracle
    r = r1[0]
    before = _oracle_fb(world, r["images"][0], _text(r["messages"][1]))
    after = _oracle_fb(world, r["images"][0], _text(r["messages"][-1]))
    assert r["score_before"] == pytest.approx(before.scores["faithfulness"])
    assert r["score_after"] == pytest.approx(after.scores["faithfulness"])
    assert r["hallucinated_after"] == after.meta["hallucinated"] and r["critique"] == after.critique
    assert r["scores_after"] == {"faithfulness": pytest.approx(after.scores["faithfulness"])}


def test_only_the_revision_carries_loss(nlf_out, world, model_dirs):
    from mmalign.collators import VisionChatCollator
    from mmalign.data import ChatDataset
    from mmalign.ops import IGNORE_INDEX
    from models.processors import load_processor

    recs = [r for s in ("train", "val") for r in read_records(nlf_out / s / "sft.jsonl", "sft", data_root=world)
            if r.meta["kind"] == "refinement"]
    r = max(recs, key=lambda x: len(x.messages))
    proc = load_processor(model_dirs["llava"])
    batch = VisionChatCollator(proc, max_length=4096, mode="train", train_on="last")([ChatDataset([r])[0]])
    labels = batch["labels"][0]
    got = proc.tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True)
    assert " ".join(got.split()).startswith(" ".join(message_text(r.messages[-1]).split())[:20])
    assert message_text(r.messages[1]) not in got


def test_split_by_scene_manifest_condition_and_skip(nlf_out, fb, world, model_dirs, capsys):
    splits = _all(nlf_out)
    for s, rows in splits.items():
        assert rows, f"no {s} records"
        assert all(split_of(r["scene_id"], VAL_FRACTION) == s for r in rows)
    assert not {r["scene_id"] for r in splits["train"]} & {r["scene_id"] for r in splits["val"]}
    manifest = json.loads((nlf_out / "manifest.json").read_text())
    assert manifest["stage"] == "nlf" and manifest["config"]["revisions"] == 2
    for s, rows in splits.items():
        for k in ("critique", "refinement"):
            assert manifest["counts"][f"{s}/{k}"] == sum(r["kind"] == k for r in rows)
    assert json.loads((nlf_out / "condition.json").read_text()) == SCHEME.to_dict()
    md = (nlf_out / "report.md").read_text()
    assert "| round 1 |" in md and "success" in md
    rep = json.loads((nlf_out / "report.json").read_text())
    s = rep["revisions"]["all"]["success_rate"]
    assert s["low"] <= s["value"] <= s["high"]
    capsys.readouterr()
    assert N.main(_args(fb, world, model_dirs["llava"], nlf_out, "--limit", "8", "--revisions", "2",
                        "--condition", "rating")) == 0
    assert "up to date" in capsys.readouterr().out


def test_scripted_revisions_empty_stop_and_fix(world, model_dirs, fb, tmp_path):
    """Scripted revisions of three episodes: an empty one (rejected, episode over), a perfect one
    (the reference: nothing left to fix, episode over) and a hallucinating one then the reference."""
    rows = _rows(fb)
    by_src: dict[str, list[dict]] = {}
    for r in rows:
        by_src.setdefault(r["source_id"], []).append(r)
    (ref, obj, attr), (_ref2, obj2, _attr2) = list(by_src.values())[:2]
    SCRIPT.clear()
    scene = _scenes(world)[str((world / obj2["images"][0]).resolve())]
    absent = next(s for s in W.SHAPES if s not in {o.shape for o in scene.objects})
    wrong = f"There is {W.article(absent)} {absent}."  # one object claim, false: faithfulness 0
    SCRIPT.update({f"{obj['id']}-refine1": "  ",
                   f"{attr['id']}-refine1": ref["response"],
                   f"{obj2['id']}-refine1": wrong,
                   f"{obj2['id']}-refine2": _ref2["response"]})
    out = tmp_path / "nlf"
    keep = tmp_path / "fb.jsonl"
    keep.write_text("".join(json.dumps(r) + "\n" for r in (ref, obj, attr, _ref2, obj2)))
    assert N.main(_args(keep, world, model_dirs["llava"], out, "--revisions", "2", "--condition", "rating",
                        "--policy-class", "tests.test_nlf.ScriptedReviser")) == 0
    recs = {r["id"]: r for v in _all(out).values() for r in v if r["kind"] == "refinement"}
    rejects = _rows(out / "rejects.jsonl")
    assert [(x["id"], x["reason"], x["round"]) for x in rejects] == [(f"{obj['id']}-refine1", "empty revision", 1)]
    assert set(recs) == {f"{attr['id']}-refine1", f"{obj2['id']}-refine1", f"{obj2['id']}-refine2"}
    perfect = recs[f"{attr['id']}-refine1"]
    assert perfect["score_after"] == 1.0 and perfect["success"] and perfect["fixed"] and perfect["level"] == "good"
    bad = recs[f"{obj2['id']}-refine1"]
    assert bad["score_after"] == 0.0 and not bad["success"] and bad["level"] == "bad"  # kept although worse
    assert _text(bad["messages"][-2]) == f"Answer quality: bad. {obj2['annotations']['refinement']}"
    good = recs[f"{obj2['id']}-refine2"]
    assert good["score_before"] == 0.0 and good["score_after"] == 1.0 and good["success"] and good["fixed"]
    assert _text(good["messages"][3]) == wrong
    rep = json.loads((out / "report.json").read_text())
    assert rep["feedback"] == {"records": 5, "without_refinement": 2, "episodes": 3}
    assert rep["episodes_stopped"] == {"empty revision": 1, "nothing left to fix": 1}
    assert rep["revisions_without_checkable_claims"] == 0 and bad["checkable_claims_after"] == 1
    assert rep["rejects"] == {"total": 1, "reasons": {"empty revision": 1}}
    assert rep["revisions"]["round 1"]["success_rate"]["value"] == 0.5
    assert json.loads((out / "manifest.json").read_text())["counts"]["rejected"] == 1


def test_critique_only_and_bad_feedback_lines(world, fb, tmp_path, capsys):
    out = tmp_path / "c"
    assert N.main(["--feedback", str(fb), "--data", str(world), "--out", str(out), "--revisions", "0",
                   "--condition", "rating", "--thresholds", "0.3", "0.9", "--names", "poor", "fair", "great", "--template", "Rated {name}:",
                   "--no-progress"]) == 0
    rows = [r for v in _all(out).values() for r in v]
    assert rows and all(r["kind"] == "critique" for r in rows)
    assert {r["condition"] for r in rows} <= {"Rated poor:", "Rated fair:", "Rated great:"}
    assert json.loads((out / "condition.json").read_text())["names"] == ["poor", "fair", "great"]
    # --score-weights: the score is the weighted mean of the feedback's scores
    assert N.main(["--feedback", str(fb), "--data", str(world), "--out", str(tmp_path / "w"), "--revisions", "0",
                   "--score-weights", "faithfulness=1,helpfulness=3"]) == 0
    source = {r["id"]: r["annotations"]["scores"] for r in _rows(fb)}
    for r in (r for v in _all(tmp_path / "w").values() for r in v):
        sc = source[r["source_id"]]
        assert r["score"] == pytest.approx((sc["faithfulness"] + 3 * sc["helpfulness"]) / 4)
    with pytest.raises(SystemExit):
        N.main(["--feedback", str(fb), "--data", str(world), "--out", str(tmp_path / "x")])  # rounds need --model
    with pytest.raises(SystemExit):
        N.main(["--feedback", str(fb), "--data", str(world), "--out", str(tmp_path / "x"), "--revisions", "0",
                "--thresholds", "0.5", "--names", "only-one"])
    bad = tmp_path / "bad.jsonl"
    lines = fb.read_text().splitlines()
    bad.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(RecordError, match=rf"{re.escape(str(bad))}:2: malformed JSON"):
        N.main(["--feedback", str(bad), "--data", str(world), "--out", str(tmp_path / "b"), "--revisions", "0"])
    assert not (tmp_path / "b").exists()
    assert N.main(["--feedback", str(bad), "--data", str(world), "--out", str(tmp_path / "b"), "--revisions", "0",
                   "--on-error", "skip"]) == 0
    rejects = _rows(tmp_path / "b" / "rejects.jsonl")
    assert len(rejects) == 1 and rejects[0]["line"] == 2 and rejects[0]["reason"] == "input: malformed record"


# ---------------------------------------------------------------------------------------------
# the nlf stage conditioned on the critique text (the default)


def test_feedback_condition_records_and_good_feedback(world, model_dirs, fb, tmp_path):
    """Scripted revisions (one hallucinating, one perfect), default --condition feedback: every
    condition is the critique text -- the feedback record's for a critique example, the oracle's
    critique of the revision for a refinement episode -- and condition.json holds the good
    feedback derived from the train split's top-rated critiques."""
    rows = _rows(fb)
    by_src: dict[str, list[dict]] = {}
    for r in rows:
        by_src.setdefault(r["source_id"], []).append(r)
    (ref, obj, attr) = next(iter(by_src.values()))
    scene = _scenes(world)[str((world / obj["images"][0]).resolve())]
    absent = next(s for s in W.SHAPES if s not in {o.shape for o in scene.objects})
    wrong = f"There is {W.article(absent)} {absent}."
    SCRIPT.clear()
    SCRIPT.update({f"{obj['id']}-refine1": wrong, f"{attr['id']}-refine1": ref["response"]})
    keep = tmp_path / "fb.jsonl"
    keep.write_text("".join(json.dumps(r) + "\n" for r in (ref, obj, attr)))
    out = tmp_path / "nlf3"
    assert N.main(_args(keep, world, model_dirs["llava"], out, "--revisions", "1",
                        "--policy-class", "tests.test_nlf.ScriptedReviser")) == 0
    recs = {r["id"]: r for v in _all(out).values() for r in v}
    for src in (ref, obj, attr):
        c = recs[f"{src['id']}-critique"]
        crit = src["annotations"]["critique"]
        assert c["condition"] == f"Feedback: {crit}" and c["critique"] == crit
        assert _text(c["messages"][0]) == f"Feedback: {crit} {_text(src['prompt'][0])}"
        assert c["level"] == ("good" if c["score"] >= 0.75 else "bad")  # the rating level, for the report
    bad = recs[f"{obj['id']}-refine1"]
    bad_crit = _oracle_fb(world, obj["images"][0], wrong).critique
    assert bad["critique"] == bad_crit and bad["condition"] == f"Feedback: {bad_crit}"
    assert _text(bad["messages"][-2]) == f"Feedback: {bad_crit} {obj['annotations']['refinement']}"
    assert _text(bad["messages"][0]) == _text(ref["prompt"][0])  # the first turn: no condition
    assert _text(bad["messages"][-1]) == wrong
    good = recs[f"{attr['id']}-refine1"]
    assert good["condition"] == f"Feedback: {_oracle_fb(world, attr['images'][0], ref['response']).critique}"
    # by hand: the reference is the only top-rated (faithfulness 1.0) critique example -- from the
    # train split, or from all when the scene is in val and train has none -- so every sentence of
    # its critique is said by all top-rated critiques; the oracle ends it with the verdict
    cond = json.loads((out / "condition.json").read_text())
    rep = json.loads((out / "report.json").read_text())
    assert ref["annotations"]["critique"].endswith("There is no hallucination in the answer.")
    assert cond == {"mode": "feedback", "template": "Feedback: {feedback}", "good_feedback": ref["annotations"]["critique"]}
    assert rep["good_feedback"]["top_examples"] == 1 and rep["good_feedback"]["rule"] == "shared sentences"
    assert rep["good_feedback"]["from"] == ("train" if split_of(ref["scene_id"], VAL_FRACTION) == "train" else "all")
    assert rep["condition"] == cond and "inference asks with the good feedback" in (out / "report.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["config"]["condition"]["mode"] == "feedback"
    # --good-feedback gives the text; the trainer's config must then give the same
    out2 = tmp_path / "given"
    assert N.main(["--feedback", str(keep), "--data", str(world), "--out", str(out2), "--revisions", "0",
                   "--good-feedback", "All correct."]) == 0
    assert json.loads((out2 / "condition.json").read_text())["good_feedback"] == "All correct."
    assert json.loads((out2 / "report.json").read_text())["good_feedback"] == {"rule": None, "given": True}


def test_feedback_condition_needs_critique_text(world, fb, tmp_path):
    rows = _rows(fb)
    rows[1]["annotations"]["critique"] = ""
    path = tmp_path / "fb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--feedback", str(path), "--data", str(world), "--revisions", "0", "--no-progress"]
    with pytest.raises(RecordError, match=rf"{re.escape(rows[1]['id'])}.*no critique text"):
        N.main([*base, "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()
    assert N.main([*base, "--out", str(tmp_path / "b"), "--on-error", "skip"]) == 0
    rejects = _rows(tmp_path / "b" / "rejects.jsonl")
    assert [(x["id"], x["reason"]) for x in rejects] == [(rows[1]["id"], "no critique")]
    assert len([r for v in _all(tmp_path / "b").values() for r in v]) == len(rows) - 1
    assert N.main([*base, "--out", str(tmp_path / "c"), "--condition", "rating"]) == 0  # rating needs none
    with pytest.raises(SystemExit):
        N.main([*base, "--out", str(tmp_path / "d"), "--feedback-template", "no field"])


# ---------------------------------------------------------------------------------------------
# the LVLM_NLF importer


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dress") / "import"
    assert D.main(["--input", str(FIXTURE), "--images", str(IMAGES), "--out", str(out), "--max-rating", "5",
                   "--val-fraction", str(VAL_FRACTION), "--condition", "rating"]) == 0
    return out


def test_import_records_by_hand(imported):
    rows = {r["id"]: r for v in _all(imported).values() for r in v}
    assert sorted(rows) == sorted([
        "dress-hallucination-1-critique", "dress-hallucination-1-refine1", "dress-hallucination-1-refine2",
        "dress-hallucination-2-critique", "dress-hallucination-2-refine1", "dress-hallucination-3-critique",
        "dress-hallucination-4-critique", "dress-hallucination-4-refine1"])
    good, bad = "Answer quality: good.", "Answer quality: bad."
    c1 = rows["dress-hallucination-1-critique"]
    assert c1["images"] == ["000000051977.jpg"] and c1["score"] == pytest.approx(0.4) and c1["rating"] == 2
    assert c1["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{bad} Describe the image in detail."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A man skis down a snowy slope. Two dogs run beside "
                                                                   "him and a red car is parked at the bottom."}]}]
    assert c1["critique"].startswith("The skier and the slope are correct") and c1["dimension"] == "hallucination"
    assert c1["source_id"] == "hallucination_nlf.jsonl:1" and c1["scene_id"] == "000000051977.jpg"
    r12 = rows["dress-hallucination-1-refine2"]
    assert [m["role"] for m in r12["messages"]] == ["user", "assistant"] * 3
    assert [_text(m) for m in r12["messages"][1:]] == [
        "A man skis down a snowy slope. Two dogs run beside him and a red car is parked at the bottom.",
        "Remove the dogs and the car: they are not in the image. Describe only what is there.",  # no condition
        "A man skis down a snowy slope. A red car is parked at the bottom of the hill.",
        f"{good} There is no car either. Describe the skier and the slope only.",
        "A man in a blue jacket skis down a snow covered slope."]
    assert _text(r12["messages"][0]) == "Describe the image in detail."
    assert (r12["round"], r12["score_before"], r12["score_after"], r12["success"], r12["fixed"]) == (2, 0.6, 1.0, True, None)
    assert (r12["rating_before"], r12["rating_after"], r12["condition"]) == (3, 5, good)
    r11 = rows["dress-hallucination-1-refine1"]
    assert (r11["score_before"], r11["score_after"], r11["success"], r11["level"]) == (0.4, 0.6, True, "bad")
    assert _text(r11["messages"][-2]).startswith(f"{bad} Remove the dogs")
    c2 = rows["dress-hallucination-2-critique"]
    assert _text(c2["messages"][0]) == f"{good} What is the vehicle in the picture doing?"  # <image> dropped
    assert c2["caption"] == ["A double decker bus driving down the street.", "A red bus on a city road."]
    assert c2["critique"] == "Correct; it could mention the surroundings."  # critique_NLF spelling
    r21 = rows["dress-hallucination-2-refine1"]
    assert (r21["score_before"], r21["score_after"], r21["success"], r21["condition"]) == (0.8, 0.6, False, bad)
    c3 = rows["dress-hallucination-3-critique"]
    assert (c3["score"], c3["level"], c3["caption"]) == (1.0, "good", ["A living room with a television and a chair."])
    r41 = rows["dress-hallucination-4-refine1"]
    assert (r41["score_before"], r41["score_after"], r41["critique"]) == (0.2, 1.0, None)


def test_import_split_report_manifest_and_skip(imported, capsys):
    splits = _all(imported)
    for s, rows in splits.items():
        assert all(split_of(r["scene_id"], VAL_FRACTION) == s for r in rows)
    where = {r["id"]: s for s, rows in splits.items() for r in rows}
    assert where["dress-hallucination-1-critique"] == where["dress-hallucination-4-refine1"]  # same image
    for s in ("train", "val"):
        read_records(imported / s / "sft.jsonl", "sft", data_root=IMAGES, check_images="decode")
    rep = json.loads((imported / "report.json").read_text())
    assert rep["records"]["critique"]["total"] == 4 and rep["records"]["refinement"]["total"] == 4
    assert rep["levels"] == {"critique": {"bad": 2, "good": 2}, "refinement": {"bad": 2, "good": 2}}
    assert rep["revisions"]["all"]["success_rate"]["value"] == 0.75 and rep["revisions"]["all"]["fix_rate"] is None
    assert rep["critique_keys"] == {"critique NLF": 5, "critique_NLF": 2} and rep["turns_without_critique"] == 1
    assert rep["rating_scale"] == {"min": 0.0, "max": 5.0, "max_from": "flag"}
    assert rep["files"]["hallucination_nlf.jsonl"]["ratings"]["histogram"] == {"1": 1, "2": 1, "3": 2, "4": 1, "5": 3}
    assert json.loads((imported / "condition.json").read_text()) == SCHEME.to_dict()
    manifest = json.loads((imported / "manifest.json").read_text())
    assert manifest["counts"]["train/critique"] + manifest["counts"]["val/critique"] == 4
    assert manifest["info"]["rating_scale"]["max"] == 5.0
    capsys.readouterr()
    assert D.main(["--input", str(FIXTURE), "--images", str(IMAGES), "--out", str(imported), "--max-rating", "5",
                   "--val-fraction", str(VAL_FRACTION), "--condition", "rating"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_import_feedback_condition_by_hand(tmp_path):
    """The default --condition feedback: each record conditioned on its own turn's critique; line
    4's second turn has none and makes no record (its conversation is not needed by any other)."""
    out = tmp_path / "f"
    assert D.main(["--input", str(FIXTURE), "--images", str(IMAGES), "--out", str(out), "--max-rating", "5",
                   "--val-fraction", str(VAL_FRACTION)]) == 0
    rows = {r["id"]: r for v in _all(out).values() for r in v}
    assert len(rows) == 7 and "dress-hallucination-4-refine1" not in rows
    crit = "The skier and the slope are correct, but there are no dogs and no car in the image."
    c1 = rows["dress-hallucination-1-critique"]
    assert c1["condition"] == f"Feedback: {crit}" and c1["level"] == "bad"
    assert _text(c1["messages"][0]) == f"Feedback: {crit} Describe the image in detail."
    r12 = rows["dress-hallucination-1-refine2"]
    assert [_text(m) for m in r12["messages"][2:5]] == [
        "Remove the dogs and the car: they are not in the image. Describe only what is there.",  # history
        "A man skis down a snowy slope. A red car is parked at the bottom of the hill.",
        "Feedback: Accurate and free of hallucination. There is no car either. Describe the skier and the slope only."]
    c2 = rows["dress-hallucination-2-critique"]
    assert _text(c2["messages"][0]) == ("Feedback: Correct; it could mention the surroundings. "
                                        "What is the vehicle in the picture doing?")
    rep = json.loads((out / "report.json").read_text())
    assert rep["skipped_without_critique"] == 1
    # by hand: with --val-fraction 0.5, train holds 000000051977.jpg only (lines 1 and 4: critique
    # scores 0.4 and 0.2); the top-rated is line 1's, one critique, so all its one sentence is kept
    cond = json.loads((out / "condition.json").read_text())
    assert cond == {"mode": "feedback", "template": "Feedback: {feedback}", "good_feedback": crit}
    assert rep["good_feedback"]["top_score"] == 0.4 and rep["good_feedback"]["from"] == "train"
    assert "Inference asks with the good feedback" in (out / "report.md").read_text()


def test_import_default_max_rating_warns(tmp_path, capsys):
    out = tmp_path / "o"
    assert D.main(["--input", str(NLF_FILE), "--images", str(IMAGES), "--out", str(out)]) == 0
    assert "warning" in capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["rating_scale"]["max_from"] == "data" and rep["rating_scale"]["max"] == 5.0


def _bad_line(obj_or_text) -> str:
    return obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)


def _good() -> dict:
    return json.loads(NLF_FILE.read_text().splitlines()[1])


def _with(**turn_changes) -> dict:
    obj = _good()
    for k, v in turn_changes.items():
        if v is None:
            obj["interaction"][0].pop(k, None)
        else:
            obj["interaction"][0][k] = v
    return obj


BAD = {
    "malformed JSON": ('{"image_id": "000000051977.jpg", "interaction": [', "malformed JSON"),
    "no interaction": ({"image_id": "000000051977.jpg", "caption": "x"}, "missing field 'interaction'"),
    "no image_id": ({"interaction": _good()["interaction"]}, "missing field 'image_id'"),
    "no model": (_with(model=None), r"interaction\[0\]: missing field 'model'"),
    "no rating": (_with(rating=None), r"interaction\[0\]: missing field 'rating'"),
    "rating not a number": (_with(rating="four"), r"interaction\[0\]: rating 'four' is not a number"),
    "empty model": (_with(model="  "), r"interaction\[0\]: 'model' is empty"),
    "missing image": ({**_good(), "image_id": "000000999999.jpg"}, "image '000000999999.jpg' not found"),
    "escaping image": ({**_good(), "image_id": "../../mmrlhf/images/short/sharegpt4v_000123.jpg"}, "escapes"),
    "bad caption": ({**_good(), "caption": 7}, "'caption' must be a string or a list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_import_bad_input_names_file_and_line(case, tmp_path, capsys):
    bad, msg = BAD[case]
    lines = NLF_FILE.read_text().splitlines()
    path = tmp_path / "LVLM_NLF" / "hallucination_nlf.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join([lines[0], _bad_line(bad), *lines[2:]]) + "\n")
    out = tmp_path / "out"
    with pytest.raises(RecordError, match=rf"{re.escape(str(path))}:2: .*{msg}"):
        D.run([tmp_path], IMAGES, out, max_rating=5)
    assert not out.exists()
    assert D.main(["--input", str(tmp_path), "--images", str(IMAGES), "--out", str(out), "--max-rating", "5"]) == 1
    assert f"{path}:2" in capsys.readouterr().err
    # skip: the line goes to rejects.jsonl with its reason, the others are imported
    rep = D.run([tmp_path], IMAGES, out, max_rating=5, on_error="skip")
    rejects = _rows(out / "rejects.jsonl")
    assert rep["rejected"]["total"] == 1 and len(rejects) == 1 and rejects[0]["where"] == f"{path}:2"
    assert rep["lines"] == {"total": 4, "imported": 3}


def test_import_rating_outside_the_scale(tmp_path):
    with pytest.raises(RecordError, match=rf"{re.escape(str(NLF_FILE))}:1: interaction\[2\]: rating 5 is outside the scale \[0, 4\]"):
        D.run([NLF_FILE], IMAGES, tmp_path / "o", max_rating=4)
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
    with pytest.raises(ValueError, match="--max-rating"):
        D.run([NLF_FILE], IMAGES, tmp_path / "o", max_rating=0)
