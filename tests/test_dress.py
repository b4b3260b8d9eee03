"""DRESS's conditional RL: the loss by hand, the condition checks, the export with its scheme,
and a fit through the real CLI on hand-made critique / refinement records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmalign.conditions import (
    CONDITION_FILE,
    ConditionScheme,
    load_scheme,
    with_condition,
)
from mmalign.losses.dress import dress_loss
from mmalign.methods.dress import DRESSModule
from mmalign.records import RecordError

ROOT = Path(__file__).resolve().parents[1]


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


def _records(world: Path, out: Path, scheme: ConditionScheme) -> Path:
    """Critique examples and one refinement episode per caption, built from the world's captions."""
    rows = []
    for line in (world / "train" / "sft.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["task"] != "detailed_caption":
            continue
        prompt, answer = r["messages"][:-1], r["messages"][-1]
        for score in (0.2, 1.0):
            cond = scheme.for_score(score)
            rows.append({"id": f"{r['id']}-c{score}", "images": r["images"],
                         "messages": with_condition(prompt, cond) + [answer],
                         "kind": "critique", "score": score, "condition": cond})
        cond = scheme.for_score(0.9)
        episode = prompt + [{"role": "assistant", "content": [{"type": "text", "text": "There is one object: a star."}]},
                            {"role": "user", "content": [{"type": "text", "text": "Remove the star."}]}, answer]
        rows.append({"id": f"{r['id']}-r", "images": r["images"], "messages": with_condition(episode, cond, "last"),
                     "kind": "refinement", "score_before": 0.0, "score_after": 0.9, "condition": cond})
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
    from mmalign.cli import cli_main

    data = _records(world, tmp_path / "nlf/train.jsonl", ConditionScheme())
    cli = cli_main(_fit_args(world, model_dirs["llava"], data, tmp_path / "run", "--trainer.max_steps", "3"))
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
        cli_main(_fit_args(world, model_dirs["llava"], data, tmp_path / "run", "--trainer.max_steps", "1"))


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
    mod = DRESSModule(pol, kind_weights={"critique": 1.0, "refinement": 0.0})
    logps, mask = pol.completion_logprobs(batch)
    assert mod._weights(batch["meta"]).tolist() == [0.0, 0.0]
    assert dress_loss(logps, mask, mod._weights(batch["meta"])).item() == 0.0
    with pytest.raises(ValueError, match="unknown kind"):
        DRESSModule(pol, kind_weights={"chat": 1.0})
