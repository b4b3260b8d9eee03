"""DRESS's conditional RL: the loss by hand, the condition checks, the export with its scheme,
and fits through the real CLI on hand-made critique / refinement records, conditioned on the
feedback text (the default) and on the rating level."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.conditions import (
    CONDITION_FILE,
    ConditionScheme,
    FeedbackCondition,
    derive_good_feedback,
    load_scheme,
    split_sentences,
    with_condition,
)
from mmalign.losses.dress import dress_loss
from mmalign.methods.dress import DRESSModule
from mmalign.records import RecordError

ROOT = Path(__file__).resolve().parents[1]
RATING = ["--model.init_args.condition", "rating"]
GOOD = "There is no hallucination in the answer."


def test_scheme_levels_texts_and_round_trip():
    s = ConditionScheme(thresholds=(0.5, 0.8), names=("low", "mid", "high"), template="Q: {name}.")
    assert [s.level(x) for x in (0.0, 0.49, 0.5, 0.79, 0.8, 1.0)] == [0, 0, 1, 1, 2, 2]
    assert s.for_score(0.6) == "Q: mid." and s.best() == "Q: high."
    assert ConditionScheme.from_dict(s.to_dict()) == s
    for bad in ({"thresholds": (0.8, 0.5), "names": ("a", "b", "c")}, {"thresholds": (0.5,), "names": ("a",)},
                {"template": "no field"}, {"names": ("a", "a")}):
        with pytest.raises(ValueError):
            ConditionScheme(**bad)
    with pytest.raises(ValueError, match="finite"):
        s.level(float("nan"))


def test_with_condition_first_and_last_turn():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A star."}]},
            {"role": "user", "content": [{"type": "text", "text": "Remove the star."}]}]
    first = with_condition(msgs, "C.")
    assert first[0]["content"][1]["text"] == "C. Describe." and msgs[0]["content"][1]["text"] == "Describe."
    last = with_condition(msgs, "C.", turn="last")
    assert last[2]["content"][0]["text"] == "C. Remove the star." and last[0] == msgs[0]
    only_image = [{"role": "user", "content": [{"type": "image"}]}]
    assert with_condition(only_image, "C.")[0]["content"][1] == {"type": "text", "text": "C."}


def test_dress_loss_by_hand():
    # two examples: b0 scores tokens with log-probs (-1, -3) -> NLL 2; b1 one token -0.5 -> NLL 0.5
    logps = torch.tensor([[-1.0, -3.0, 0.0], [0.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    # weights 1 and 3: (1 * 2 + 3 * 0.5) / 4 = 0.875
    assert dress_loss(logps, mask, torch.tensor([1.0, 3.0])).item() == pytest.approx(0.875)
    # an example without scored tokens does not count, whatever its weight
    mask2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert dress_loss(logps, mask2, torch.tensor([1.0, 3.0])).item() == pytest.approx(2.0)
    assert dress_loss(logps, mask, torch.tensor([0.0, 0.0])).item() == 0.0


def _critique(score: float, i: int) -> str:
    """A hand-made critique: top-rated ones name a scene-specific correct object, then the verdict."""
    return f"Object {i} is correct. {GOOD}" if score == 1.0 else f"There is no star in the image. Object {i} is wrong."


def _records(world: Path, out: Path, scheme: ConditionScheme | FeedbackCondition) -> Path:
    """Critique examples (scores 0.2 and 1.0) and one refinement episode per caption, built from the
    world's captions, each with a critique and the condition ``scheme`` gives it."""
    rows = []
    for i, line in enumerate((world / "train" / "sft.jsonl").read_text().splitlines()):
        r = json.loads(line)
        if r["task"] != "detailed_caption":
            continue
        prompt, answer = r["messages"][:-1], r["messages"][-1]
        for score in (0.2, 1.0):
            crit = _critique(score, i)
            cond = scheme.text(crit) if isinstance(scheme, FeedbackCondition) else scheme.for_score(score)
            rows.append({"id": f"{r['id']}-c{score}", "images": r["images"],
                         "messages": with_condition(prompt, cond) + [answer],
                         "kind": "critique", "score": score, "condition": cond, "critique": crit})
        crit = f"Object {i} is correct."
        cond = scheme.text(crit) if isinstance(scheme, FeedbackCondition) else scheme.for_score(0.9)
        episode = prompt + [{"role": "assistant", "content": [{"type": "text", "text": "There is one object: a star."}]},
                            {"role": "user", "content": [{"type": "text", "text": "Remove the star."}]}, answer]
        rows.append({"id": f"{r['id']}-r", "images": r["images"], "messages": with_condition(episode, cond, "last"),
                     "kind": "refinement", "score_before": 0.0, "score_after": 0.9, "condition": cond,
                     "critique": crit})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return out


def _fit_args(world, model, data, root, *extra):
    return ["fit", "--config", str(ROOT / "configs/dress/tiny.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1",
            "--model.init_args.policy.init_args.path", str(model), "--model.init_args.export.dir", str(root / "model"),
            "--data.init_args.train_file", str(data), "--data.init_args.val_file", str(data),
            "--data.init_args.data_root", str(world), "--data.init_args.batch_size", "4", *extra]


def test_dress_fits_through_the_cli_and_exports_its_scheme(world, model_dirs, tmp_path):
    """condition: rating, as before feedback conditions existed."""
    from mmalign.cli import cli_main

    data = _records(world, tmp_path / "nlf/train.jsonl", ConditionScheme())
    cli = cli_main(_fit_args(world, model_dirs["llava"], data, tmp_path / "run", "--trainer.max_steps", "3", *RATING))
    assert cli.trainer.global_step == 3 and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert load_scheme(tmp_path / "run/model") == ConditionScheme()
    assert (tmp_path / "run/model" / CONDITION_FILE).is_file() and (tmp_path / "run/model/config.json").is_file()
    with open(tmp_path / "run/logs/metrics.csv") as f:
        header = f.readline()
    assert "val/nll_critique" in header and "val/nll_refinement" in header


def test_records_from_another_scheme_are_refused(world, model_dirs, tmp_path):
    from mmalign.cli import cli_main

    data = _records(world, tmp_path / "nlf/train.jsonl", ConditionScheme(template="Rated {name}."))
    with pytest.raises(RecordError, match="another condition scheme"):
        cli_main(_fit_args(world, model_dirs["llava"], data, tmp_path / "run", "--trainer.max_steps", "1", *RATING))
    # rating records under the default condition (feedback), and feedback records under rating
    data = _records(world, tmp_path / "nlf/rating.jsonl", ConditionScheme())
    with pytest.raises(RecordError, match="'Answer quality: (good|bad).' is not the feedback scheme's"):
        cli_main(_fit_args(world, model_dirs["llava"], data, tmp_path / "run2", "--trainer.max_steps", "1"))
    data = _records(world, tmp_path / "nlf/feedback.jsonl", FeedbackCondition())
    with pytest.raises(RecordError, match="'Feedback: .*' is not one of this scheme's"):
        cli_main(_fit_args(world, model_dirs["llava"], data, tmp_path / "run3", "--trainer.max_steps", "1", *RATING))


def test_only_the_last_turn_carries_loss_and_kind_weights_apply(world, model_dirs, tmp_path):
    from mmalign.collators import VisionChatCollator
    from mmalign.data import ChatDataset
    from mmalign.records import read_records
    from models.policy import HFPolicy

    data = _records(world, tmp_path / "nlf/train.jsonl", ConditionScheme())
    recs = [r for r in read_records(data, "sft", data_root=world) if r.meta["kind"] == "refinement"][:2]
    pol = HFPolicy(str(model_dirs["llava"]))
    batch = VisionChatCollator(pol.processor, train_on="last")([ChatDataset(recs)[i] for i in range(2)])
    tok = pol.processor.tokenizer
    labelled = tok.decode(batch["labels"][0][batch["labels"][0] >= 0], skip_special_tokens=True)
    assert "There is one object: a star." not in labelled                   # the first answer: no loss
    assert recs[0].messages[-1]["content"][0]["text"].split(":")[0] in labelled  # the revision: loss
    mod = DRESSModule(pol, condition="rating", kind_weights={"critique": 1.0, "refinement": 0.0})
    logps, mask = pol.completion_logprobs(batch)
    assert mod._weights(batch["meta"]).tolist() == [0.0, 0.0]
    assert dress_loss(logps, mask, mod._weights(batch["meta"])).item() == 0.0
    with pytest.raises(ValueError, match="unknown kind"):
        DRESSModule(pol, kind_weights={"chat": 1.0})


# ---------------------------------------------------------------------------------------------
# conditioned on the feedback text (the default)


def test_feedback_condition_texts_round_trip_and_load(tmp_path):
    f = FeedbackCondition(template="Critique: {feedback}", good_feedback="All correct.")
    assert f.text("  There is no star.  ") == "Critique: There is no star."
    assert f.best() == "Critique: All correct."
    assert f.to_dict() == {"mode": "feedback", "template": "Critique: {feedback}", "good_feedback": "All correct."}
    assert FeedbackCondition.from_dict(f.to_dict()) == f
    for bad in ({"template": "no field"}, {"template": "{feedback} {other}"}, {"good_feedback": " "}):
        with pytest.raises(ValueError):
            FeedbackCondition(**bad)
    for missing in (None, "", "  "):
        with pytest.raises(ValueError, match="needs a critique"):
            f.text(missing)
    with pytest.raises(ValueError, match="no good-feedback"):
        FeedbackCondition().best()
    # the model folder's file: either mode (a rating file has no "mode" key, as before)
    (tmp_path / CONDITION_FILE).write_text(json.dumps({**f.to_dict(), "good_feedback_info": {"rule": "x"}}))
    assert load_scheme(tmp_path) == f
    (tmp_path / CONDITION_FILE).write_text(json.dumps(ConditionScheme().to_dict()))
    assert load_scheme(tmp_path) == ConditionScheme()
    for bad in ({"mode": "feedback", "template": "F: {feedback}"}, {"mode": "vibes", "template": "{name}"}):
        (tmp_path / CONDITION_FILE).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=CONDITION_FILE):
            load_scheme(tmp_path)


def test_derive_good_feedback_by_hand():
    assert split_sentences("A b. C d!  E? ") == ["A b.", "C d!", "E?"]
    # top score 1.0: three critiques; "No error." is in 3/3, "B." in 2/3 (> 1/2), "A." / "C." in 1/3.
    # Mean relative positions: "B." (0 + 1/2) / 2 = 0.25, "No error." (1 + 1 + 1) / 3 = 1.
    ex = [(1.0, "A. B. No error."), (1.0, "B. No error."), (1.0 + 1e-12, "C. No error."), (0.5, "Bad. No error."),
          (0.9, None)]
    text, info = derive_good_feedback(ex)
    assert text == "B. No error."
    assert info == {"top_score": 1.0, "top_examples": 3, "min_share": 0.5, "rule": "shared sentences",
                    "sentences": {"B.": 0.6667, "No error.": 1.0}}
    # a stricter share keeps the verdict only
    assert derive_good_feedback(ex, min_share=0.7)[0] == "No error."
    # no sentence said by more than half: the most frequent whole critique (first of a tie)
    text, info = derive_good_feedback([(1.0, "X. Y."), (1.0, "Z."), (1.0, "Z."), (1.0, "W.")])
    assert (text, info["rule"], info["sentences"]) == ("Z.", "most frequent critique", {"Z.": 0.5})
    with pytest.raises(ValueError, match="no critique example"):
        derive_good_feedback([(1.0, None), (0.5, " ")])


def test_feedback_tokens_and_labels_by_hand(world, model_dirs):
    """A feedback-conditioned critique example and refinement episode, token by token: the
    condition (the critique) is prompt, the response / revision is what carries the loss."""
    from mmalign.collators import VisionChatCollator, image_token_id
    from mmalign.ops import IGNORE_INDEX
    from models.processors import load_processor

    proc = load_processor(model_dirs["llava"])
    tok = proc.tokenizer
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    f = FeedbackCondition()
    q = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}]
    answer = {"role": "assistant", "content": [{"type": "text", "text": "There is a red circle."}]}
    crit = {"images": [img], "messages": with_condition(q, f.text("There is no star in the image.")) + [answer],
            "meta": {"id": "c"}}
    episode = q + [{"role": "assistant", "content": [{"type": "text", "text": "There is a star."}]},
                   {"role": "user", "content": [{"type": "text", "text": "Remove the star."}]}, answer]
    refine = {"images": [img], "messages": with_condition(episode, f.text("The red circle is correct."), "last"),
              "meta": {"id": "r"}}
    batch = VisionChatCollator(proc, max_length=1024, mode="train", train_on="last")([crit, refine])
    for i, want in enumerate([
        # by hand from the chat template (models/tiny's chat_template.jinja): bos, then per turn
        # <|role|> + content + <|end|>; the image part is the image tokens
        ("<|bos|><|user|>{IMG}Feedback: There is no star in the image. Describe the image in detail.<|end|>"
         "<|assistant|>There is a red circle.<|end|>"),
        ("<|bos|><|user|>{IMG}Describe the image in detail.<|end|><|assistant|>There is a star.<|end|>"
         "<|user|>Feedback: The red circle is correct. Remove the star.<|end|><|assistant|>There is a red circle.<|end|>"),
    ]):
        ids = batch["input_ids"][i][batch["attention_mask"][i] == 1]
        is_img = ids == image_token_id(proc)
        n_img = int(is_img.sum())
        assert n_img > 0 and bool(is_img[2:2 + n_img].all())  # the image tokens follow <|bos|><|user|>
        text = tok.decode(ids[:2]) + "{IMG}" + tok.decode(ids[2 + n_img:])
        assert text == want
        labels = batch["labels"][i][batch["attention_mask"][i] == 1]
        # exactly the last answer and its end token carry loss: the tail of the sequence
        k = len(tok("There is a red circle.<|end|>", add_special_tokens=False)["input_ids"])
        assert (labels[-k:] == ids[-k:]).all() and (labels[:-k] == IGNORE_INDEX).all()
        assert tok.decode(labels[labels != IGNORE_INDEX]) == "There is a red circle.<|end|>"


def test_feedback_fits_through_the_cli_exports_good_feedback_and_inference_asks_it(world, model_dirs, tmp_path):
    from data_pipelines import refine_bench as RB
    from mmalign.cli import cli_main
    from mmalign.eval.cli import main as eval_main
    from mmalign.eval.cli import resolve_condition
    from mmalign.stage import read_jsonl

    data = _records(world, tmp_path / "nlf/train.jsonl", FeedbackCondition())
    cli = cli_main(_fit_args(world, model_dirs["llava"], data, tmp_path / "run", "--trainer.max_steps", "3"))
    assert cli.trainer.global_step == 3 and math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    model = tmp_path / "run/model"
    saved = json.loads((model / CONDITION_FILE).read_text())
    # by hand: every top-rated (1.0) critique is "Object <i> is correct. <GOOD>" with a different i,
    # so only the verdict is said by more than half of them
    n_top = sum(1 for line in data.read_text().splitlines() if json.loads(line).get("score") == 1.0)
    assert saved == {"mode": "feedback", "template": "Feedback: {feedback}", "good_feedback": GOOD,
                     "good_feedback_info": {"top_score": 1.0, "top_examples": n_top, "min_share": 0.5,
                                            "rule": "shared sentences", "sentences": {GOOD: 1.0}}}
    assert load_scheme(model) == FeedbackCondition(good_feedback=GOOD)
    want = f"Feedback: {GOOD}"
    assert resolve_condition(model, None, False) == (want, str(model / CONDITION_FILE))
    # mmalign eval asks every caption prompt with it (yes/no questions plain: --condition-kinds)
    fast = ["--n-boot", "20", "--max-new-tokens", "6", "--yesno-max-new-tokens", "2", "--no-progress",
            "--limit", "1", "--kinds", "existence", "--splits", "random"]
    assert eval_main(["--model", str(model), "--data", str(world), "--out", str(tmp_path / "eval"), *fast]) == 0
    doc = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert doc["settings"]["condition"] == want
    rows = read_jsonl(tmp_path / "eval/generations.jsonl")
    assert all(r["condition"] == want for r in rows if r["section"] == "captions")
    assert not any("condition" in r for r in rows if r["section"] != "captions")
    # the refinement benchmark asks the caption prompt, then each refinement, with it
    assert RB.main(["--model", str(model), "--data", str(world), "--out", str(tmp_path / "refine"), "--limit", "2",
                    "--turns", "1", "--max-new-tokens", "8", "--n-boot", "20", "--no-progress"]) == 0
    assert json.loads((tmp_path / "refine/metrics.json").read_text())["settings"]["condition"] == want
    for r in read_jsonl(tmp_path / "refine/generations.jsonl"):
        assert r["turns"][0]["user"] == f"{want} Describe the image in detail."
        if r["turns"][1]["refined"]:
            assert r["turns"][1]["user"] == f"{want} {r['turns'][0]['judgement']['refinement']}"


def test_feedback_records_checked_and_good_feedback_from_config(world, model_dirs, tmp_path):
    from mmalign.records import read_records
    from models.policy import HFPolicy

    data = _records(world, tmp_path / "nlf/train.jsonl", FeedbackCondition())
    recs = read_records(data, "sft", data_root=world)
    pol = HFPolicy(str(model_dirs["llava"]))
    mod = DRESSModule(pol)
    metas = [{"id": r.id, **r.meta} for r in recs[:3]]
    assert mod._weights(metas).tolist() == [1.0, 1.0, 1.0]
    # a condition made from another critique, and a record without a critique, are refused
    with pytest.raises(RecordError, match="another condition scheme"):
        mod._weights([{**metas[0], "critique": "Something else."}])
    with pytest.raises(RecordError, match="no critique text"):
        mod._weights([{k: v for k, v in metas[0].items() if k != "critique"}])
    # derived from records (as on_fit_start does), or given in the config and then kept
    mod.set_good_feedback_from(recs)
    assert mod.scheme.best() == f"Feedback: {GOOD}" and mod.good_feedback_info["rule"] == "shared sentences"
    given = DRESSModule(pol, good_feedback="All good.")
    assert given.scheme.best() == "Feedback: All good." and given.good_feedback_info == {"given": True}
    with pytest.raises(ValueError, match="condition must be"):
        DRESSModule(pol, condition="score")
    with pytest.raises(ValueError, match="no good-feedback text to export"):
        DRESSModule(pol).export(str(tmp_path / "never"))
