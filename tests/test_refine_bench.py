"""The refinement benchmark (DRESS): the turn loop on the tiny LLaVA, the conversation it asks,
fixed / introduced counting, the metrics by hand, carried scenes, re-runs and compare."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from data_pipelines import refine_bench as RB
from mmalign import world as W
from mmalign.eval import runner as R
from mmalign.eval.refine_metrics import TYPES
from mmalign.feedback import Claim
from mmalign.oracle import WorldOracle
from mmalign.records import read_scenes, resolve_image_path
from mmalign.stage import read_jsonl

FAST = ["--limit", "4", "--turns", "2", "--max-new-tokens", "16", "--n-boot", "50", "--batch-size", "4", "--no-progress"]
COND = "Answer quality: good."


def _recording(monkeypatch) -> list[list]:
    """Every batch of prompts the benchmark hands to generation, one list per turn."""
    calls: list[list] = []
    real = R.generate_answers

    def spy(policy, prompts, *args, **kw):
        calls.append(list(prompts))
        return real(policy, prompts, *args, **kw)

    monkeypatch.setattr(R, "generate_answers", spy)
    return calls


@pytest.fixture(scope="module")
def refine_run(world, model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("refine") / "llava"
    with pytest.MonkeyPatch.context() as mp:
        calls = _recording(mp)
        assert RB.main(["--model", str(model_dirs["llava"]), "--data", str(world), "--out", str(out),
                        "--condition", COND, *FAST]) == 0
    return out, calls


def test_turn_loop_writes_everything(refine_run):
    out, calls = refine_run
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["stage"] == "refine-bench" and doc["scenes"] == 4 and len(doc["turns"]) == 3
    assert doc["settings"]["condition"] == COND and doc["settings"]["turns"] == 2
    assert len(calls) == 3 and len(calls[0]) == 4
    for t in doc["turns"]:
        assert t["asked"] + t["carried"] == 4 and t["asked"] == len(calls[t["turn"]])
        for key, v in t["metrics"].items():
            assert set(v) == {"value", "low", "high", "n"}, key
            if not math.isnan(v["value"]) and not math.isnan(v["low"]):
                assert v["low"] - 1e-9 <= v["value"] <= v["high"] + 1e-9, (t["turn"], key, v)
    assert "fixed_claim_share" not in doc["turns"][0]["metrics"]
    for key in ("fixed_caption_share", "fixed_claim_share", "introduced_per_caption", "new_hallucination_share",
                "refined_share"):
        assert key in doc["turns"][1]["metrics"], key
    for key in ("false_per_caption", "false_object_per_caption", "chair_i", "mean_words", "coverage"):
        assert key in doc["turns"][2]["metrics"], key
    recs = read_jsonl(out / "generations.jsonl")
    assert len(recs) == 4 and all(len(r["turns"]) == 3 for r in recs)
    for r in recs:
        for k, t in enumerate(r["turns"]):
            j = t["judgement"]
            assert {"false_claims", "refinement", "critique", "claims", "coverage"} <= set(j)
            assert t["row"]["false_all"] == len(j["false_claims"])
            if k:
                row = t["row"]
                assert row["fixed_all"] + (row["false_all"] - row["introduced_all"]) == row["false_at_0"]
    # the metrics are the per-scene rows summed: recomputed from generations.jsonl they agree
    again = RB.summarize_records(recs, 2, n_boot=50, seed=0)
    for a, b in zip(again, doc["turns"]):
        assert a["metrics"].keys() == b["metrics"].keys()
        for k, v in a["metrics"].items():
            assert v["value"] == b["metrics"][k]["value"] or (math.isnan(v["value"]) and math.isnan(
                b["metrics"][k]["value"])), k
    report = (out / "report.md").read_text()
    assert "| metric | turn 0 | turn 1 | turn 2 |" in report and "| turn-0 false claims fixed (all types) |" in report
    assert COND in report and "## Definitions" in report
    pytest.importorskip("matplotlib")
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_conversation_layout_of_turn_two(refine_run, world):
    out, calls = refine_run
    recs = {r["image"]: r for r in read_jsonl(out / "generations.jsonl")}
    assert calls[2], "the tiny model left nothing to refine at turn 1"
    for image, msgs in calls[2]:
        assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
        r = recs[str(image)]
        text = [" ".join(p["text"] for p in m["content"] if p["type"] == "text") for m in msgs]
        assert text[0] == "Describe the image in detail."  # history: no condition
        assert text[1] == r["turns"][0]["answer"] and text[3] == r["turns"][1]["answer"]
        assert text[2] == r["turns"][0]["judgement"]["refinement"]  # history: no condition
        assert text[4] == f"{COND} {r['turns'][1]['judgement']['refinement']}"  # the turn being answered
        assert r["turns"][2]["user"] == text[4]
        assert [p["type"] for p in msgs[0]["content"]] == ["image", "text"]
        assert all(p["type"] == "text" for m in msgs[1:] for p in m["content"])  # one image, in the first turn
    for image, msgs in calls[0]:
        assert len(msgs) == 1 and msgs[0]["content"][1]["text"] == f"{COND} Describe the image in detail."


def test_rerun_skips(refine_run, world, model_dirs, capsys):
    out, _ = refine_run
    before = (out / "generations.jsonl").read_text()
    assert RB.main(["--model", str(model_dirs["llava"]), "--data", str(world), "--out", str(out),
                    "--condition", COND, *FAST]) == 0
    assert "up to date, skipping" in capsys.readouterr().out
    assert (out / "generations.jsonl").read_text() == before


def test_compare(refine_run, world, model_dirs, tmp_path, capsys):
    out, _ = refine_run
    plain = tmp_path / "plain"
    assert RB.main(["--model", str(model_dirs["llava"]), "--data", str(world), "--out", str(plain), *FAST]) == 0
    assert json.loads((plain / "metrics.json").read_text())["settings"]["condition"] == ""
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cmp_dir = tmp_path / "cmp"
    assert RB.main(["compare", str(out), str(copy), str(plain), "--names", "a", "b", "c", "--out", str(cmp_dir),
                    "--n-boot", "50"]) == 0
    cmp = json.loads((cmp_dir / "compare.json").read_text())
    assert cmp["turns"] == 3 and cmp["scenes"] == 4 and cmp["settings_differ"] == []
    same = cmp["diffs"][str(copy)]
    assert all(v["value"] == 0 for turn in same for v in turn.values() if not math.isnan(v["value"]))
    assert "fixed_claim_share" in cmp["diffs"][str(plain)][1]
    md = (cmp_dir / "compare.md").read_text()
    assert "## turn 2" in md and "| metric | a | b | Δ vs a | c | Δ vs a |" in md
    assert "condition `Answer quality: good.`" in md and "- c: " in md
    assert json.loads((cmp_dir / "manifest.json").read_text())["stage"] == "refine-bench-compare"
    capsys.readouterr()
    assert RB.main(["compare", str(out), str(copy), str(plain), "--names", "a", "b", "c", "--out", str(cmp_dir),
                    "--n-boot", "50"]) == 0
    assert "up to date" in capsys.readouterr().out
    # other scenes: refused, naming the problem
    fewer = tmp_path / "fewer"
    shutil.copytree(out, fewer)
    recs = read_jsonl(fewer / "generations.jsonl")
    (fewer / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[1:]))
    assert RB.main(["compare", str(out), str(fewer), "--out", str(tmp_path / "bad")]) == 2
    assert "same scenes" in capsys.readouterr().err
    assert RB.main(["compare", str(out), str(tmp_path / "missing"), "--out", str(tmp_path / "bad")]) == 2


# ---------------------------------------------------------------------------------------------
# pure parts


def _c(ctype: str, text: str, **meta) -> Claim:
    return Claim(ctype, text, 0, len(text), "?", meta)


def test_claim_keys_ignore_wording():
    assert RB.claim_key(_c("object", "a star", shape="star")) == RB.claim_key(_c("object", "The star", shape="star"))
    assert RB.claim_key(_c("attribute", "a small red circle", shape="circle", color="red", size="small", count=None)) \
        == "attribute: small red circle"
    assert RB.claim_key(_c("attribute", "two blue squares", shape="square", color="blue", size=None, count=2)) \
        == "attribute: blue square x2"
    rel = _c("relation", "r", subject="red circle", relation="left of", object="blue square", negated=True)
    assert RB.claim_key(rel) == "relation: red circle | not left of | blue square"


def test_fixed_kept_introduced_counting():
    star = _c("object", "a star", shape="star")
    star2 = _c("object", "the star", shape="star")
    cross = _c("object", "a cross", shape="cross")
    small = _c("attribute", "a small red circle", shape="circle", color="red", size="small", count=None)
    large_blue = _c("attribute", "a large blue circle", shape="circle", color="blue", size="large", count=None)
    rel = _c("relation", "r", subject="red circle", relation="above", object="star", negated=False)
    ch = RB.change_counts([star, star2, small, rel], [star, large_blue, cross])
    # star x2 -> x1: one fixed, one kept; the wrong attribute restated differently: fixed + introduced;
    # the relation gone: fixed; the cross: introduced
    assert ch["object"] == {"fixed": 1, "kept": 1, "introduced": 1}
    assert ch["attribute"] == {"fixed": 1, "kept": 0, "introduced": 1}
    assert ch["relation"] == {"fixed": 1, "kept": 0, "introduced": 0}
    assert ch["all"] == {"fixed": 3, "kept": 1, "introduced": 2}
    assert RB.change_counts([], [])["all"] == {"fixed": 0, "kept": 0, "introduced": 0}
    # the stored form (dicts with type and key) counts the same
    as_dicts = [{"type": c.type, "key": RB.claim_key(c)} for c in (star, star2, small, rel)]
    assert RB.change_counts(as_dicts, [star, large_blue, cross]) == ch


def _j(false: list[tuple[str, str]], claims: dict, coverage: float, n_words: int, refinement: str = "Fix.") -> dict:
    return {"false_claims": [{"type": t, "key": k, "text": k} for t, k in false],
            "claims": {t: claims.get(t, 0) for t in TYPES}, "checked": {t: claims.get(t, 0) for t in TYPES},
            "coverage": coverage, "words": n_words, "refinement": refinement}


def test_metrics_by_hand():
    star, red = ("object", "object: star"), ("attribute", "attribute: red circle")
    rel = ("relation", "relation: red circle | above | star")
    a0 = _j([star, red], {"object": 3, "attribute": 2}, 0.5, 10)
    a1 = _j([star, rel], {"object": 2, "attribute": 2, "relation": 1}, 0.5, 8)
    b0 = _j([], {"object": 2}, 1.0, 6, RB.NO_CHANGE)  # nothing to refine: carried
    t0 = [RB.turn_row(a0), RB.turn_row(b0)]
    t1 = [RB.turn_row(a1, a0, True), RB.turn_row(b0, b0, False)]
    m0 = RB.summarize_turn(t0, 0, n_boot=50)
    m1 = RB.summarize_turn(t1, 1, n_boot=50)
    v0 = {k: v["value"] for k, v in m0.items()}
    v1 = {k: v["value"] for k, v in m1.items()}
    assert v0["false_per_caption"] == 1.0 and v0["false_object_per_caption"] == 0.5
    assert v0["chair_i"] == pytest.approx(1 / 5) and v0["attribute_error_rate"] == 0.5
    assert math.isnan(v0["relation_error_rate"])  # no relation claim at all
    assert v0["hallucinated_share"] == 0.5 and v0["coverage"] == 0.75 and v0["mean_words"] == 8
    assert "fixed_claim_share" not in v0
    assert v1["false_per_caption"] == 1.0 and v1["chair_i"] == pytest.approx(1 / 4)
    assert v1["relation_error_rate"] == 1.0
    assert v1["fixed_caption_share"] == 0.0  # a's answer still has a false claim
    assert v1["fixed_claim_share"] == 0.5  # the red circle fixed, the star kept
    assert v1["fixed_attribute_share"] == 1.0 and v1["fixed_object_share"] == 0.0
    assert math.isnan(v1["fixed_relation_share"])  # no relation was false at turn 0
    assert v1["introduced_per_caption"] == 0.5 and v1["new_hallucination_share"] == 0.5
    assert v1["refined_share"] == 0.5 and v1["mean_words"] == 7
    assert m1["fixed_claim_share"]["n"] == 1  # one scene had false claims at turn 0


def test_carried_scenes_and_fixes_with_a_scripted_model(world, monkeypatch):
    """A fake model: scene 0 perfect from the start (carried), scene 1 fixes its false object at
    turn 1, scene 2 keeps it and adds another at turn 1, then is perfect at turn 2."""
    scenes = read_scenes(world / "test" / "scenes.jsonl")[:3]
    eps = [RB.Episode(s.scene_id, s, resolve_image_path(img, world, s.scene_id), "Describe the image in detail.")
           for s, img in scenes]
    by_image = {str(e.image): e.scene for e in eps}
    absent = {sid: [sh for sh in W.SHAPES if not s.find(shape=sh)] for sid, s in ((e.id, e.scene) for e in eps)}

    def fake(policy, prompts, *args, **kw):
        out = []
        for image, msgs in prompts:
            s = by_image[str(image)]
            k = sum(m["role"] == "assistant" for m in msgs)
            good = W.detailed_caption(s)
            x, y = absent[s.scene_id][:2]
            script = {eps[0].id: [good], eps[1].id: [f"{good} There is a {x}.", good],
                      eps[2].id: [f"{good} There is a {x}.", f"{good} There is a {x}. There is a {y}.", good]}
            out.append(script[s.scene_id][k])
        return out, 0.01

    monkeypatch.setattr(R, "generate_answers", fake)
    oracle = WorldOracle(by_image)
    thr = RB.run_turns(None, eps, oracle, turns=2)
    assert [thr[f"turn {k}"]["prompts"] for k in range(3)] == [3, 2, 1]
    assert eps[0].refined == [True, False, False] and eps[0].users[1:] == [None, None]
    assert eps[0].answers[0] == eps[0].answers[2] and not RB.needs_refinement(eps[0].judgements[0])
    assert eps[1].refined == [True, True, False]
    recs = [RB.episode_record(e, "") for e in eps]
    turns = RB.summarize_records(recs, 2, n_boot=50, seed=0)
    assert [t["asked"] for t in turns] == [3, 2, 1] and [t["carried"] for t in turns] == [0, 1, 2]
    v1 = {k: v["value"] for k, v in turns[1]["metrics"].items()}
    v2 = {k: v["value"] for k, v in turns[2]["metrics"].items()}
    assert v1["fixed_caption_share"] == 0.5 and v1["fixed_claim_share"] == 0.5
    assert v1["introduced_per_caption"] == pytest.approx(1 / 3) and v1["refined_share"] == pytest.approx(2 / 3)
    assert v2["fixed_caption_share"] == 1.0 and v2["fixed_claim_share"] == 1.0 and v2["false_per_caption"] == 0
    assert v2["introduced_per_caption"] == 0
    assert turns[0]["metrics"]["false_per_caption"]["value"] == pytest.approx(2 / 3)


def test_help_and_bad_arguments(world, model_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        RB.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--turns", "--condition", "--no-condition", "fixed_claim_share", "claim key", "carried"):
        assert word in text, word
    base = ["--model", str(model_dirs["llava"]), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        RB.main([*base, "--data", str(world), "--turns", "0"])
    with pytest.raises(SystemExit):
        RB.main([*base, "--data", str(tmp_path)])
    assert "make data" in capsys.readouterr().err
