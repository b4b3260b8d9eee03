"""DRESS's unconditioned ablation (``--condition none`` / ``condition: none``): the nlf stage and the
LVLM_NLF importer write the same records with no condition text, a DRESS module fits them with
the same loss and exports no condition scheme, so evaluation asks the model plainly; records of
one scheme given to a module of another are refused."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

from mmalign.conditions import (
    CONDITION_FILE,
    ConditionScheme,
    NoCondition,
    load_scheme,
    scheme_from_dict,
)
from mmalign.methods.dress import DRESSModule
from mmalign.records import RecordError, read_records
from tests import test_nlf as T
from tests.test_dress import _fit_args


# ---------------------------------------------------------------------------------------------
# the scheme


def test_no_condition_round_trip_and_load(tmp_path):
    assert NoCondition().best() == "" and NoCondition().to_dict() == {"mode": "none"}
    assert scheme_from_dict({"mode": "none"}) == NoCondition()
    with pytest.raises(ValueError, match="takes no settings"):
        scheme_from_dict({"mode": "none", "template": "{feedback}"})
    # no file, or a file of mode none: a model trained without conditions, for every reader
    assert load_scheme(tmp_path) is None
    (tmp_path / CONDITION_FILE).write_text(json.dumps({"mode": "none"}))
    assert load_scheme(tmp_path) is None
    (tmp_path / CONDITION_FILE).write_text(json.dumps({"mode": "none", "names": ["a"]}))
    with pytest.raises(ValueError, match=CONDITION_FILE):
        load_scheme(tmp_path)


# ---------------------------------------------------------------------------------------------
# the nlf stage with --condition none, against the default --condition feedback


@pytest.fixture(scope="module")
def pair(world, model_dirs, tmp_path_factory) -> dict:
    """One caption prompt's three oracle-judged responses (the reference: nothing to fix; an
    object and an attribute hallucination: one refinement episode each, scripted revisions),
    through the stage twice: ``--condition none`` and the default ``--condition feedback``."""
    tmp = tmp_path_factory.mktemp("uncond")
    rows = T._rows(T._feedback_file(world, tmp / "all.jsonl"))
    first = rows[0]["source_id"]
    ref, obj, attr = [r for r in rows if r["source_id"] == first]
    keep = tmp / "fb.jsonl"
    keep.write_text("".join(json.dumps(r) + "\n" for r in (ref, obj, attr)))
    script = {f"{obj['id']}-refine1": "  There is a shape.  ", f"{attr['id']}-refine1": ref["response"]}
    T.SCRIPT.clear()
    T.SCRIPT.update(script)
    outs = {}
    for mode in ("none", "feedback"):
        outs[mode] = tmp / mode
        assert T.N.main(T._args(keep, world, model_dirs["llava"], outs[mode], "--revisions", "1", "--condition", mode,
                                "--policy-class", "tests.test_nlf.ScriptedReviser")) == 0
    return {"src": {r["id"]: r for r in (ref, obj, attr)}, "out": outs, "script": script,
            "recs": {m: {r["id"]: r for v in T._all(o).values() for r in v} for m, o in outs.items()}}


def _turn(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _records_file(out: Path) -> Path:
    """The split the prompt's scene hashed to (the other one is empty)."""
    return next(out / s / "sft.jsonl" for s in ("train", "val") if (out / s / "sft.jsonl").read_text().strip())


def test_none_records_carry_no_condition(pair, world):
    src, none, fb = pair["src"], pair["recs"]["none"], pair["recs"]["feedback"]
    # by hand: three critique examples, and an episode for each response with something to fix
    # (the reference's refinement is "No change is needed.")
    ref, obj, attr = src.values()
    assert ref["annotations"]["refinement"] == "No change is needed."
    want_ids = {f"{i}-critique" for i in src} | {f"{obj['id']}-refine1", f"{attr['id']}-refine1"}
    assert set(none) == want_ids and set(fb) == want_ids
    for rid, r in none.items():
        f = fb[rid]
        assert r["condition"] is None and f["condition"] == f"Feedback: {f['critique']}"
        # every meta field but the condition is the feedback run's
        assert ({k: v for k, v in r.items() if k not in ("condition", "messages")}
                == {k: v for k, v in f.items() if k not in ("condition", "messages")})
        s = src[r["source_id"]]
        question = s["prompt"]  # the caption prompt as the policy saw it (image + question)
        if r["kind"] == "critique":
            want = question + [_turn("assistant", s["response"])]
            turn, part = 0, len(question[0]["content"]) - 1  # the question's text part
        else:
            revision = pair["script"][rid].strip()
            want = question + [_turn("assistant", s["response"]), _turn("user", s["annotations"]["refinement"]),
                               _turn("assistant", revision)]
            turn, part = 2, 0  # the refinement turn
        assert r["messages"] == want
        # the feedback run's messages: exactly these with "Feedback: <critique> " before one text
        with_cond = copy.deepcopy(want)
        text = with_cond[turn]["content"][part]["text"]
        with_cond[turn]["content"][part]["text"] = f"Feedback: {f['critique']} {text}"
        assert f["messages"] == with_cond
    assert not any("Feedback:" in json.dumps(r["messages"]) for r in none.values())
    for s in ("train", "val"):
        read_records(pair["out"]["none"] / s / "sft.jsonl", "sft", data_root=world)


def test_none_condition_file_report_and_manifest(pair):
    out = pair["out"]["none"]
    assert json.loads((out / "condition.json").read_text()) == {"mode": "none"}
    rep = json.loads((out / "report.json").read_text())
    fb_rep = json.loads((pair["out"]["feedback"] / "report.json").read_text())
    assert rep["condition"] == {"mode": "none"} and "good_feedback" not in rep
    # the rating levels (for the report only, as with feedback conditions) and counts are the same
    assert rep["levels"] == fb_rep["levels"] and rep["records"] == fb_rep["records"]
    assert sum(rep["levels"]["critique"].values()) == 3 and sum(rep["levels"]["refinement"].values()) == 2
    md = (out / "report.md").read_text()
    assert "Condition: none (--condition none, the unconditioned ablation)" in md
    assert json.loads((out / "manifest.json").read_text())["config"]["condition"] == {"mode": "none"}


def test_none_needs_no_critique(world, pair, tmp_path):
    rows = list(pair["src"].values())
    rows[1] = {**rows[1], "annotations": {**rows[1]["annotations"], "critique": ""}}
    path = tmp_path / "fb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    assert T.N.main(["--feedback", str(path), "--data", str(world), "--revisions", "0", "--no-progress",
                     "--out", str(out), "--condition", "none"]) == 0
    recs = {r["id"]: r for v in T._all(out).values() for r in v}
    assert len(recs) == 3 and recs[f"{rows[1]['id']}-critique"]["condition"] is None


def test_import_none_by_hand(tmp_path):
    """The LVLM_NLF fixture (tests/test_nlf.py's docstring) with --condition none: every turn makes
    a record (line 4's second turn has no critique; it is kept, as with rating), no condition."""
    out = tmp_path / "n"
    assert T.D.main(["--input", str(T.FIXTURE), "--images", str(T.IMAGES), "--out", str(out), "--max-rating", "5",
                     "--val-fraction", str(T.VAL_FRACTION), "--condition", "none"]) == 0
    rows = {r["id"]: r for v in T._all(out).values() for r in v}
    assert len(rows) == 8 and all(r["condition"] is None for r in rows.values())
    c1 = rows["dress-hallucination-1-critique"]
    assert c1["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]},
        _turn("assistant", "A man skis down a snowy slope. Two dogs run beside him and a red car is parked at the bottom.")]
    assert (c1["score"], c1["level"]) == (pytest.approx(0.4), "bad")
    r12 = rows["dress-hallucination-1-refine2"]
    assert T._text(r12["messages"][-2]) == "There is no car either. Describe the skier and the slope only."
    assert json.loads((out / "condition.json").read_text()) == {"mode": "none"}
    rep = json.loads((out / "report.json").read_text())
    assert rep["condition"] == {"mode": "none"} and rep["levels"]["critique"] == {"bad": 2, "good": 2}
    assert "Condition: none" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# the trainer


def test_none_module_fits_exports_no_scheme_and_eval_asks_plainly(world, model_dirs, pair, tmp_path):
    from mmalign.cli import cli_main
    from mmalign.eval.cli import resolve_condition

    cli = cli_main(_fit_args(world, model_dirs["llava"], _records_file(pair["out"]["none"]), tmp_path / "run", "--trainer.max_steps", "1",
                             "--model.init_args.condition", "none"))
    assert cli.model.scheme == NoCondition()
    assert cli.trainer.global_step == 1 and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    model = tmp_path / "run/model"
    assert (model / "config.json").is_file() and not (model / CONDITION_FILE).exists()
    assert load_scheme(model) is None
    assert resolve_condition(model, None, False) == ("", "")
    assert resolve_condition(model, None, True) == ("", "")


def test_none_weights_and_mismatches(pair, model_dirs, world, tmp_path):
    from mmalign.cli import cli_main
    from models.policy import HFPolicy

    none = list(pair["recs"]["none"].values())
    fb = list(pair["recs"]["feedback"].values())
    pol = HFPolicy(str(model_dirs["llava"]))
    # the kind weights apply as in every mode: by hand, 1.0 per critique example, 0.25 per episode
    mod = DRESSModule(pol, condition="none", kind_weights={"critique": 1.0, "refinement": 0.25})
    assert mod._weights(none).tolist() == [1.0 if r["kind"] == "critique" else 0.25 for r in none]
    assert sorted(mod._weights(none).tolist()) == [0.25, 0.25, 1.0, 1.0, 1.0]
    # conditioned records under condition: none
    with pytest.raises(RecordError, match=rf"{re.escape(fb[0]['id'])}.*condition: none trains without any condition; "
                                          "the data were made with another condition scheme"):
        mod._weights(fb)
    rating = {**none[0], "condition": ConditionScheme().for_score(none[0]["score"])}
    with pytest.raises(RecordError, match="another condition scheme"):
        mod._weights([rating])
    # unconditioned records under a conditioned module
    with pytest.raises(RecordError, match=rf"{re.escape(none[0]['id'])}.*no condition, but condition: rating needs one"):
        DRESSModule(pol, condition="rating")._weights(none)
    with pytest.raises(RecordError, match=r"no condition, but condition: feedback needs one.*--condition none\?"):
        DRESSModule(pol, condition="feedback", good_feedback="All good.")._weights(none)
    # ... and through the CLI with the default config (condition: feedback): the good-feedback text
    # is derived from the records' critiques, then the first batch is refused
    with pytest.raises(RecordError, match="another condition scheme"):
        cli_main(_fit_args(world, model_dirs["llava"], _records_file(pair["out"]["none"]), tmp_path / "r",
                           "--trainer.max_steps", "1"))
