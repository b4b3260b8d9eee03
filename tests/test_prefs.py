"""The `prefs` stage on hand-made worlds: ranking, all pairs, injections, splits, errors.

Each test writes a tiny data-stage output (a few scene graphs, blank images, a manifest) and
annotated responses in the feedback stage's format into ``tmp_path``. Scores are either set by
hand (so the expected ranking and pairs are derived in the docstrings) or made by the real
``WorldOracle`` (so injected copies can be compared with the oracle's verdicts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines import prefs as P
from mmalign import world as W
from mmalign.feedback import FeedbackItem, feedback_to_json
from mmalign.feedback_io import ScoreError
from mmalign.oracle import WorldOracle
from mmalign.records import RecordError, read_records
from mmalign.stage import StageOutput, atomic_write_jsonl

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}]

SCENES = {
    "s0": W.Scene((W.SceneObject("circle", "red", "small", 0.2, 0.5), W.SceneObject("square", "blue", "large", 0.8, 0.5)),
                  scene_id="s0"),
    "s1": W.Scene((W.SceneObject("star", "green", "large", 0.3, 0.3),
                   W.SceneObject("triangle", "yellow", "small", 0.7, 0.8)), scene_id="s1"),
    "s2": W.Scene((W.SceneObject("cross", "purple", "large", 0.5, 0.5),), scene_id="s2"),
}


def image_of(sid: str) -> str:
    return f"images/train/{sid}.png"


@pytest.fixture
def data(tmp_path) -> Path:
    """A data-stage output: three scenes with images, one more image that has no scene."""
    out = tmp_path / "data"
    with StageOutput(out, stage="data", config={"hand_made": True}) as st:
        (st.path / "images" / "train").mkdir(parents=True)
        for sid in [*SCENES, "orphan"]:
            Image.new("RGB", (8, 8)).save(st.path / image_of(sid))
        atomic_write_jsonl(st.path / "train" / "scenes.jsonl",
                           [{**s.to_dict(), "split": "train", "image": image_of(sid)} for sid, s in SCENES.items()])
    return out


def row(pid: str, j: int, sid: str, text: str, scores: dict | None = None, **extra) -> dict:
    """An annotated response as the feedback stage writes it; ``scores=None``: the oracle's feedback."""
    rid = f"{pid}-s{j}"
    if scores is None:
        item = FeedbackItem(id=rid, prompt="Describe the image in detail.", response=text)
        ann = feedback_to_json(WorldOracle({}).feedback(item, SCENES[sid]))
    else:
        ann = {"id": rid, "scores": scores, "critique": f"critique of {rid}", "refinement": f"refine {rid}"}
    return {"id": rid, "images": [image_of(sid)], "prompt": PROMPT, "response": text,
            "annotations": {"source": "oracle", **ann}, "sample_index": j, "source_id": pid, "scene_id": sid,
            "task": "detailed_caption", "reference": W.detailed_caption(SCENES[sid]), **extra}


def write_feedback(folder: Path, rows: list[dict | str]) -> Path:
    """A feedback-stage folder; a str row is written as the raw line."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / "feedback.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "manifest.json").write_text("{}\n")
    return folder


def run(fb: Path, data: Path, out: Path, *extra: str) -> int:
    return P.main(["--feedback", str(fb), "--data", str(data), "--out", str(out), *extra])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


HAND = [  # (text, faithfulness, helpfulness) -> overall with weights 0.7 / 0.3
    ("d: a purple star.", 0.0, 0.5),              # 0.15
    ("c: a red circle.", 0.5, 1.0),               # 0.35 + 0.30 = 0.65
    ("a: a small red circle.", 1.0, 1.0),         # 1.00
    ("e: a red circle and a square.", 0.5, 1.0),  # 0.65, tied with c
    ("b: a large red circle.", 1.0, 0.0),         # 0.70
    ("a: a small red circle.", 0.0, 0.0),         # the same text as a: kept once (the first)
]


def test_ranking_and_all_pairs_derived_by_hand(data, tmp_path):
    """Prompt p0 (hand scores above): ranked a 1.0, b 0.7, c 0.65, e 0.65, d 0.15 (the tie keeps
    file order, the duplicate of a is dropped). 5 responses give 5*4/2 = 10 pairs less the tie
    (c, e) = 9. Prompt p1 has 4 distinct scores: 4*3/2 = 6 pairs. --val-fraction 0: all train."""
    rows = [row("p0", j, "s0", t, {"faithfulness": f, "helpfulness": h}) for j, (t, f, h) in enumerate(HAND)]
    rows += [row("p1", j, "s1", f"text {j}", {"faithfulness": f, "helpfulness": 0.5})
             for j, f in enumerate([0.1, 0.9, 0.4, 0.6])]
    fb = write_feedback(tmp_path / "fb", rows)
    out = tmp_path / "prefs"
    assert run(fb, data, out, "--inject-per-prompt", "0", "--val-fraction", "0") == 0

    ranked = {r["id"]: r for r in jsonl(out / "ranked.jsonl")}
    r0 = ranked["p0"]["responses"]
    assert [x["text"][0] for x in r0] == ["a", "b", "c", "e", "d"]
    assert [x["overall"] for x in r0] == [1.0, 0.7, 0.65, 0.65, 0.15]
    assert r0[0]["scores"] == {"faithfulness": 1.0, "helpfulness": 1.0} and r0[0]["sample_id"] == "p0-s2"
    assert r0[0]["critique"] == "critique of p0-s2" and r0[0]["refinement"] == "refine p0-s2"
    assert all(x["source"] == "sample" and x["scored_by"] == "oracle" for x in r0)
    assert ranked["p0"]["split"] == "train" and ranked["p0"]["scene_id"] == "s0"

    pairs = jsonl(out / "train" / "pairs.jsonl")
    assert jsonl(out / "val" / "pairs.jsonl") == []
    p0 = [p for p in pairs if p["prompt_id"] == "p0"]
    assert len(p0) == 9 and len([p for p in pairs if p["prompt_id"] == "p1"]) == 6
    assert {p["id"] for p in p0} == {f"p0-{i}-{j}" for i in range(5) for j in range(i + 1, 5)} - {"p0-2-3"}
    best_worst = next(p for p in p0 if p["id"] == "p0-0-4")
    assert best_worst["chosen"][0]["content"][0]["text"].startswith("a:")
    assert best_worst["rejected"] == [{"role": "assistant", "content": [{"type": "text", "text": "d: a purple star."}]}]
    assert (best_worst["score_chosen"], best_worst["score_rejected"]) == (1.0, 0.15)
    assert best_worst["chosen_rank"] == 0 and best_worst["rejected_rank"] == 4
    assert best_worst["scores_rejected"] == {"faithfulness": 0.0, "helpfulness": 0.5}
    assert best_worst["critique_rejected"] == "critique of p0-s0"
    assert best_worst["source_chosen"] == best_worst["source_rejected"] == "sample"
    assert best_worst["task"] == "detailed_caption" and best_worst["images"] == [image_of("s0")]
    # The pairs are valid preference records for the training stages.
    assert len(read_records(out / "train" / "pairs.jsonl", "preference", data_root=data)) == 15

    report = json.loads((out / "report.json").read_text())
    assert report["prompts"]["total"] == 2 and report["pairs"] == {"total": 15, "train": 15, "val": 0}
    assert report["duplicates_dropped"] == {"sample": 1} and report["responses"]["sample"] == 9
    assert report["chosen_is"] == {"sample": {"pairs": 15, "share": 1.0}}

    # --min-margin 0.1: b-c and b-e (0.05 apart) make no pair any more: 9 - 2 = 7 for p0; p1's
    # scores 0.1, 0.4, 0.6, 0.9 (faithfulness) are 0.14+ apart in overall, so its 6 stay.
    out2 = tmp_path / "prefs-margin"
    assert run(fb, data, out2, "--inject-per-prompt", "0", "--val-fraction", "0", "--min-margin", "0.1") == 0
    pairs2 = jsonl(out2 / "train" / "pairs.jsonl")
    assert len([p for p in pairs2 if p["prompt_id"] == "p0"]) == 7 and len(pairs2) == 13


def test_weights_change_the_ranking(data, tmp_path):
    """faithfulness=0,helpfulness=1: a, c, e tie at 1.0 and b (0.0) falls below d (0.5)."""
    rows = [row("p0", j, "s0", t, {"faithfulness": f, "helpfulness": h}) for j, (t, f, h) in enumerate(HAND)]
    fb = write_feedback(tmp_path / "fb", rows)
    out = tmp_path / "prefs"
    assert run(fb, data, out, "--inject-per-prompt", "0", "--weights", "faithfulness=0,helpfulness=2") == 0
    (r,) = jsonl(out / "ranked.jsonl")
    assert [x["text"][0] for x in r["responses"]] == ["c", "a", "e", "d", "b"]  # c, a, e tied: file order
    n_pairs = sum(len(jsonl(out / s / "pairs.jsonl")) for s in ("train", "val"))
    assert n_pairs == 3 * 2 + 1  # each of the three 1.0s over d and b, then d over b


def test_injected_copies_score_lower_under_the_oracle(data, tmp_path):
    """Oracle-annotated samples; every injected copy is re-scored by the oracle on the scene,
    scores exactly what the oracle says about its text, and ranks below its parent sample."""
    # the first sample of each is the world's own caption ("There are two objects: a small red
    # circle and a large blue square. The red circle is left of the blue square."), so every kind
    # has something to change in it
    texts = {"s0": [W.detailed_caption(SCENES["s0"]), "There is a small red circle.", "There is a green star."],
             "s1": [W.detailed_caption(SCENES["s1"]), "There is a large green star and a small red triangle."]}
    rows = [row(f"p-{sid}", j, sid, t) for sid, ts in texts.items() for j, t in enumerate(ts)]
    fb = write_feedback(tmp_path / "fb", rows)
    out = tmp_path / "prefs"
    assert run(fb, data, out, "--inject-per-prompt", "3", "--include-reference") == 0
    oracle = WorldOracle({})
    kinds = set()
    for rec in jsonl(out / "ranked.jsonl"):
        rs = rec["responses"]
        injected = [x for x in rs if x["source"].startswith("inject:")]
        assert len(injected) == 3
        for x in injected:
            kinds.add(x["source"])
            parent = rs[x["injection"]["parent_rank"]]
            assert parent["source"] == "sample" and x["scored_by"] == "oracle"
            assert x["overall"] < parent["overall"]
            assert x["scores"]["faithfulness"] < parent["scores"]["faithfulness"]
            truth = oracle.feedback(FeedbackItem(id="x", prompt="", response=x["text"]), SCENES[rec["scene_id"]])
            assert x["scores"] == truth.scores and x["critique"] == truth.critique
            assert x["injection"]["replacement"] in x["text"]
        # The reference equals the first sample here (the world's own caption): kept once, as the sample.
        assert [x["source"] for x in rs].count("reference") == 0
        assert rs[0]["overall"] == 1.0
        assert [x["overall"] for x in rs] == sorted((x["overall"] for x in rs), reverse=True)
    assert kinds == {"inject:object", "inject:attribute", "inject:relation"}
    pairs = jsonl(out / "train" / "pairs.jsonl") + jsonl(out / "val" / "pairs.jsonl")
    inj_below_parent = [p for p in pairs if p["source_rejected"].startswith("inject:") and p["source_chosen"] == "sample"]
    assert inj_below_parent
    report = json.loads((out / "report.json").read_text())
    assert report["injections"]["made"] and report["responses"]["total"] == sum(
        len(r["responses"]) for r in jsonl(out / "ranked.jsonl"))
    assert report["duplicates_dropped"] == {"reference": 2}


def test_reference_is_scored_by_the_oracle(data, tmp_path):
    rows = [row("p0", 0, "s2", "There is a small purple cross."), row("p0", 1, "s2", "There is a red star.")]
    out = tmp_path / "prefs"
    assert run(write_feedback(tmp_path / "fb", rows), data, out, "--inject-per-prompt", "0",
               "--include-reference") == 0
    (rec,) = jsonl(out / "ranked.jsonl")
    top = rec["responses"][0]
    assert top["source"] == "reference" and top["text"] == W.detailed_caption(SCENES["s2"])
    assert top["scores"] == {"faithfulness": 1.0, "helpfulness": 1.0} and top["scored_by"] == "oracle"
    assert len(rec["responses"]) == 3  # 3 distinct scores -> 3 pairs
    assert sum(len(jsonl(out / s / "pairs.jsonl")) for s in ("train", "val")) == 3


def _many_prompts() -> list[dict]:
    return [row(f"q{k:02d}", j, sid, t) for k in range(24) for sid in [list(SCENES)[k % 3]]
            for j, t in enumerate([W.detailed_caption(SCENES[sid]), "There is a large orange circle."])]


def test_split_keeps_prompts_whole(data, tmp_path):
    fb = write_feedback(tmp_path / "fb", _many_prompts())
    out = tmp_path / "prefs"
    assert run(fb, data, out, "--val-fraction", "0.5") == 0
    split = {r["id"]: r["split"] for r in jsonl(out / "ranked.jsonl")}
    assert set(split.values()) == {"train", "val"}  # 24 prompts: both sides get some
    for s in ("train", "val"):
        for p in jsonl(out / s / "pairs.jsonl"):
            assert split[p["prompt_id"]] == s == P.split_of(p["prompt_id"], 0.5)
    # The split is a function of the prompt id only: another seed or fraction keeps val nested.
    assert all(P.split_of(pid, 0.25) == "train" for pid, s in split.items() if s == "train")


def test_output_is_deterministic_for_a_seed(data, tmp_path):
    fb = write_feedback(tmp_path / "fb", _many_prompts())
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(outs, ("0", "0", "1")):
        assert run(fb, data, out, "--seed", seed, "--inject-per-prompt", "2") == 0
    files = ("ranked.jsonl", "train/pairs.jsonl", "val/pairs.jsonl")
    assert all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)
    # another seed draws other injections (the scene's absent shapes, colours and sizes)
    assert (outs[0] / "ranked.jsonl").read_bytes() != (outs[2] / "ranked.jsonl").read_bytes()


def test_rerun_is_skipped_when_up_to_date(data, tmp_path, capsys):
    rows = _many_prompts()[:6]
    fb = write_feedback(tmp_path / "fb", rows)
    out = tmp_path / "prefs"
    assert run(fb, data, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "prefs" and [Path(i["path"]).name for i in manifest["inputs"]] == ["feedback.jsonl", "data"]
    assert manifest["counts"]["prompts"] == 3
    capsys.readouterr()
    assert run(fb, data, out) == 0
    assert "up to date" in capsys.readouterr().out
    assert run(fb, data, out, "--seed", "3") == 0  # another config: redone
    assert "up to date" not in capsys.readouterr().out
    write_feedback(tmp_path / "fb", rows[:4])  # changed input: redone
    assert run(fb, data, out, "--seed", "3") == 0
    assert "up to date" not in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["counts"]["prompts"] == 2


def test_unusable_lines_name_file_and_line(data, tmp_path):
    good = row("p0", 0, "s0", "There is a small red circle.")
    orphan = {**row("p1", 0, "s0", "There is a red circle."), "images": ["images/train/orphan.png"], "scene_id": None}
    bare = {**row("p2", 0, "s1", "There is a star."), "annotations": {}}
    fb = write_feedback(tmp_path / "fb", [good, "{not json", orphan, bare])
    path = fb / "feedback.jsonl"
    with pytest.raises(RecordError, match=rf"^{path}:2: malformed JSON"):
        run(fb, data, tmp_path / "out")
    write_feedback(tmp_path / "fb", [good, orphan, bare])
    with pytest.raises(RecordError, match=rf"^{path}:2: no scene graph for image \['images/train/orphan.png'\]"):
        run(fb, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written

    write_feedback(tmp_path / "fb", [good, "{not json", orphan, bare])
    out = tmp_path / "skip"
    assert run(fb, data, out, "--on-error", "skip") == 0
    rejects = jsonl(out / "rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "malformed record"), (3, "no scene"), (4, "no feedback")]
    assert rejects[2]["error"].startswith(f"{path}:4: no feedback")
    report = json.loads((out / "report.json").read_text())
    assert report["rejects"]["total"] == 3 and report["prompts"]["total"] == 1

    # Without injection or reference no scene is needed: the orphan image is fine then.
    write_feedback(tmp_path / "fb", [good, orphan])
    assert run(fb, data, tmp_path / "noscene", "--inject-per-prompt", "0") == 0


def test_nan_scores_are_refused_even_when_skipping(data, tmp_path):
    bad = row("p0", 1, "s0", "There is a red circle.", {"faithfulness": math.nan, "helpfulness": 0.5})
    fb = write_feedback(tmp_path / "fb", [row("p0", 0, "s0", "There is a small red circle."), bad])
    assert "NaN" in (fb / "feedback.jsonl").read_text().splitlines()[1]
    for mode in ("raise", "skip"):
        with pytest.raises(ScoreError, match=rf"{fb / 'feedback.jsonl'}:2: score 'faithfulness' is nan"):
            run(fb, data, tmp_path / "out", "--on-error", mode)


def test_missing_dimension_says_which_weights_to_use(data, tmp_path):
    judged = [row("p0", j, "s0", t, {"faithfulness": f})
              for j, (t, f) in enumerate([("There is a red circle.", 1.0), ("There is a blue circle.", 0.0)])]
    for r in judged:
        r["annotations"]["source"] = "judge"
    fb = write_feedback(tmp_path / "fb", judged)
    with pytest.raises(RecordError, match=r"feedback.jsonl:1: feedback has no 'helpfulness' score.*--weights"):
        run(fb, data, tmp_path / "out")
    # A judge source: injected copies take the parent's judge scores moved by the oracle's change.
    out = tmp_path / "judge"
    assert run(fb, data, out, "--weights", "faithfulness=1", "--inject-per-prompt", "1") == 0
    (rec,) = jsonl(out / "ranked.jsonl")
    (inj,) = [x for x in rec["responses"] if x["source"].startswith("inject:")]
    parent = rec["responses"][inj["injection"]["parent_rank"]]
    assert inj["scored_by"] == "judge+oracle-delta" and parent["scored_by"] == "judge"
    assert inj["overall"] < parent["overall"] == 1.0
    assert json.loads((out / "report.json").read_text())["inject_scoring"] == "parent"


@pytest.mark.parametrize("bad", ["faithfulness", "faithfulness=-1", "faithfulness=0", "a=1,a=2", "a=nan"])
def test_bad_weights_are_refused(bad):
    with pytest.raises(ValueError, match="--weights"):
        P.parse_weights(bad)


def test_help_explains_the_stage(capsys):
    with pytest.raises(SystemExit) as e:
        P.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "all_pairs" in text and "--inject-per-prompt" in text and "--min-margin" in text
