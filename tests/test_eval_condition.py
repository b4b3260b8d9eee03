"""`mmalign eval` with a DRESS condition: what the model is asked, auto-pickup from the model folder,
--no-condition, and the record in metrics.json / report.md / the up-to-date check."""

from __future__ import annotations

import json
import shutil

import pytest

from mmalign.conditions import CONDITION_FILE, ConditionScheme
from mmalign.eval import runner as R
from mmalign.eval.cli import main, resolve_condition
from mmalign.records import read_scenes
from mmalign.stage import read_jsonl

# two scenes, one yes/no split: every path of the prompt builder, quickly
FAST = ["--n-boot", "20", "--max-new-tokens", "6", "--yesno-max-new-tokens", "2", "--no-progress", "--batch-size", "8",
        "--limit", "2", "--kinds", "existence", "--splits", "random"]
CAPTION = "Describe the image in detail."


@pytest.fixture
def rendered(monkeypatch) -> list[str]:
    """Every prompt text the collator renders for generation (what the model receives)."""
    seen: list[str] = []

    class Recording(R.VisionChatCollator):
        def _plan(self, ex: dict) -> dict:
            plan = super()._plan(ex)
            seen.append(plan["text"])
            return plan

    monkeypatch.setattr(R, "VisionChatCollator", Recording)
    return seen


@pytest.fixture
def dress_model(model_dirs, tmp_path):
    """The tiny LLaVA with a condition scheme saved beside it, as a DRESS export leaves it."""
    out = tmp_path / "dress-model"
    shutil.copytree(model_dirs["llava"], out)
    scheme = ConditionScheme(thresholds=(0.5, 0.9), names=("poor", "fair", "great"), template="Answer quality: {name}.")
    (out / CONDITION_FILE).write_text(json.dumps(scheme.to_dict()))
    return out


def _run(model, world, out, *extra) -> dict:
    assert main(["--model", str(model), "--data", str(world), "--out", str(out), *FAST, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_prompts_empty_condition_unchanged(world):
    _scene, image = read_scenes(world / "test" / "scenes.jsonl")[0]
    prompts = [(world / image, CAPTION)]
    plain = R._Prompts(prompts)[0]["messages"]
    assert R._Prompts(prompts, "")[0]["messages"] == plain
    cond = R._Prompts(prompts, "Answer quality: great.")[0]["messages"]
    assert cond[0]["content"][0] == {"type": "image"}
    assert cond[0]["content"][1]["text"] == f"Answer quality: great. {CAPTION}"
    assert plain[0]["content"][1]["text"] == CAPTION  # the condition did not leak into the source prompt
    # a whole conversation is used as it is, the condition in its first user turn
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": [{"type": "text", "text": "Fix it."}]}]
    got = R._Prompts([(world / image, chat)], "C.")[0]["messages"]
    assert got[0]["content"][1]["text"] == "C. Q" and got[2]["content"][0]["text"] == "Fix it."
    assert chat[0]["content"][1]["text"] == "Q"


def test_condition_goes_before_captions_only_by_default(world, model_dirs, tmp_path, rendered):
    """DRESS's feedback is written on captions: by default the yes/no questions are asked plain."""
    doc = _run(model_dirs["llava"], world, tmp_path / "cap", "--condition", "Be exact.")
    captions = [t for t in rendered if CAPTION in t]
    yesno = [t for t in rendered if "Is there" in t]
    assert len(captions) == 2 and yesno
    assert all(f"Be exact. {CAPTION}" in t for t in captions)
    assert not any("Be exact." in t for t in yesno)
    assert doc["settings"]["condition_kinds"] == ["caption"]
    rows = read_jsonl(tmp_path / "cap" / "generations.jsonl")
    assert {r["section"] for r in rows if "condition" in r} == {"captions"}
    assert any("condition" not in r for r in rows)
    assert "before the first user text of every caption prompt" in (tmp_path / "cap" / "report.md").read_text()
    with pytest.raises(SystemExit):
        main(["--model", str(model_dirs["llava"]), "--data", str(world), "--out", str(tmp_path / "x"),
              "--condition-kinds", "captions"])


def test_condition_flag_reaches_every_prompt(world, model_dirs, tmp_path, rendered):
    doc = _run(model_dirs["llava"], world, tmp_path / "flag", "--condition", "Be exact.",
               "--condition-kinds", "caption,yesno")
    captions = [t for t in rendered if CAPTION in t]
    yesno = [t for t in rendered if "Is there" in t]
    assert len(captions) == 2 and yesno
    assert all(f"Be exact. {CAPTION}" in t for t in captions)
    assert all("Be exact. Is there" in t for t in yesno)
    assert doc["settings"]["condition"] == "Be exact." and doc["settings"]["condition_source"] == "--condition"
    rows = read_jsonl(tmp_path / "flag" / "generations.jsonl")
    assert all(r["condition"] == "Be exact." for r in rows)
    assert all(r["prompt"] == CAPTION for r in rows if r["section"] == "captions")  # the benchmark's prompt, kept
    assert "`Be exact.` (from --condition)" in (tmp_path / "flag" / "report.md").read_text()


def test_model_condition_picked_up_and_turned_off(world, dress_model, tmp_path, rendered, capsys):
    out = tmp_path / "dress"
    doc = _run(dress_model, world, out)
    assert doc["settings"]["condition"] == "Answer quality: great."  # the best level
    assert doc["settings"]["condition_source"].endswith(CONDITION_FILE)
    assert rendered and all("Answer quality: great. " in t for t in rendered if CAPTION in t)
    assert "Answer quality: great." in (out / "report.md").read_text()
    assert "condition: 'Answer quality: great.'" in capsys.readouterr().out
    # same settings: up to date
    rendered.clear()
    _run(dress_model, world, out)
    assert "up to date, skipping" in capsys.readouterr().out and not rendered
    # --no-condition is another evaluation (the condition is part of the up-to-date check)
    doc = _run(dress_model, world, out, "--no-condition")
    assert rendered and not any("Answer quality" in t for t in rendered)
    assert doc["settings"]["condition"] == "" and "--no-condition" in doc["settings"]["condition_source"]
    assert "Condition: none (--no-condition" in (out / "report.md").read_text()
    assert "condition" not in read_jsonl(out / "generations.jsonl")[0]
    # an explicit --condition wins over the model's
    rendered.clear()
    doc = _run(dress_model, world, out, "--condition", "Answer quality: fair.")
    assert all("Answer quality: fair. " in t for t in rendered if CAPTION in t)
    assert doc["settings"]["condition_source"] == "--condition"


def test_no_scheme_no_condition_settings_as_before(world, model_dirs, tmp_path, rendered):
    doc = _run(model_dirs["llava"], world, tmp_path / "plain")
    # nothing recorded: outputs made before conditions existed stay up to date
    assert "condition" not in doc["settings"] and "condition_source" not in doc["settings"]
    assert rendered and not any("quality" in t for t in rendered)
    assert "Condition" not in (tmp_path / "plain" / "report.md").read_text()


def test_resolve_condition_and_bad_inputs(dress_model, model_dirs, world, tmp_path, capsys):
    assert resolve_condition(model_dirs["llava"], None, False) == ("", "")
    assert resolve_condition(model_dirs["llava"], None, True) == ("", "")
    assert resolve_condition(dress_model, None, False) == ("Answer quality: great.", str(dress_model / CONDITION_FILE))
    assert resolve_condition(dress_model, "", False) == ("", "--condition ''")
    with pytest.raises(ValueError):
        resolve_condition(dress_model, "x", True)
    base = ["--model", str(dress_model), "--data", str(world), "--out", str(tmp_path / "o"), *FAST]
    with pytest.raises(SystemExit):
        main([*base, "--condition", "x", "--no-condition"])
    assert "not allowed with" in capsys.readouterr().err
    (dress_model / CONDITION_FILE).write_text(json.dumps({"thresholds": [0.5], "names": ["a"], "template": "{name}"}))
    with pytest.raises(SystemExit):
        main(base)
    err = capsys.readouterr().err
    assert CONDITION_FILE in err and "not a condition scheme" in err
