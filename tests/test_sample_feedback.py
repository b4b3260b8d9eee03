"""The `sample` and `feedback` stages end to end on the small world with tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipelines import feedback as F
from data_pipelines import sample as S
from mmalign.feedback import LABELS, feedback_from_json
from mmalign.records import read_records


class ScriptedPolicy(torch.nn.Module):
    """A stand-in Policy (loaded by class path like HFPolicy) whose samples are scripted: the
    reference-like caption, an empty string and a hallucinating caption, in turn."""

    def __init__(self, path: str, **_):
        super().__init__()
        from models.policy import HFPolicy

        self.processor = HFPolicy(path).processor
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device to move batches to

    def generate(self, batch, num_return_sequences=1, **_):
        n = batch["input_ids"].shape[0] * num_return_sequences
        script = ["There is a red circle.", "", "There are two objects: a blue star and a green cross."]
        return [script[i % 3] for i in range(n)]


@pytest.fixture(scope="module")
def sampled(world, model_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample"
    assert S.main(["--model", str(model_dirs["llava"]), "--data", str(world), "--limit", "4", "--k", "2",
                   "--max-new-tokens", "16", "--out", str(out), "--no-progress"]) == 0
    return out


def test_sample_writes_annotated_records(sampled, world, model_dirs, capsys):
    recs = read_records(sampled / "responses.jsonl", "annotated", data_root=world)
    rejects = (sampled / "rejects.jsonl").read_text().splitlines()
    assert len(recs) + len(rejects) == 8  # 4 prompts x 2 samples, every one accounted for
    r = recs[0]
    assert r.meta["generation"] == {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 16, "k": 2, "seed": 0}
    assert r.meta["policy"].startswith("llava@") and r.meta["task"] == "detailed_caption"
    assert r.meta["reference"].startswith("There ") and r.prompt[0]["role"] == "user"
    raw = json.loads((sampled / "responses.jsonl").read_text().splitlines()[0])
    assert not Path(raw["images"][0]).is_absolute()  # portable: relative to the data root
    manifest = json.loads((sampled / "manifest.json").read_text())
    assert manifest["counts"]["prompts"] == 4 and manifest["stage"] == "sample"
    # Same settings: up to date, nothing redone.
    assert S.main(["--model", str(model_dirs["llava"]), "--data", str(world), "--limit", "4", "--k", "2",
                   "--max-new-tokens", "16", "--out", str(sampled), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_sample_rejects_empty_responses(world, model_dirs, tmp_path):
    out = tmp_path / "s"
    assert S.main(["--model", str(model_dirs["llava"]), "--policy-class", "tests.test_sample_feedback.ScriptedPolicy",
                   "--data", str(world), "--limit", "3", "--k", "3", "--out", str(out), "--no-progress"]) == 0
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    kept = (out / "responses.jsonl").read_text().splitlines()
    assert len(rejects) == 3 and all(r["reason"] == "empty response" for r in rejects) and len(kept) == 6
    assert json.loads((out / "manifest.json").read_text())["counts"]["rejected_empty"] == 3


def test_feedback_oracle_and_judge(world, model_dirs, tmp_path):
    # Scripted samples: one faithful-looking and one hallucinating caption per prompt.
    samples = tmp_path / "s"
    assert S.main(["--model", str(model_dirs["llava"]), "--policy-class", "tests.test_sample_feedback.ScriptedPolicy",
                   "--data", str(world), "--limit", "3", "--k", "3", "--out", str(samples), "--no-progress"]) == 0
    out = tmp_path / "oracle"
    assert F.main(["--responses", str(samples), "--data", str(world), "--source", "oracle", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "feedback.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        fb = feedback_from_json(row["annotations"])
        assert row["annotations"]["source"] == "oracle"
        assert fb.segments and all(v in LABELS for s in fb.segments for v in s.labels.values())
        assert fb.critique and fb.refinement and 0 <= fb.scores["faithfulness"] <= 1
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["responses"] == 6 and report["agreement_with_oracle"] is None
    # "a blue star and a green cross": the world fixture has few such objects, so hallucinations are found.
    assert report["counts"]["segments"]["object"].get("hallucinated", 0) >= 1

    judged = tmp_path / "judge"
    assert F.main(["--responses", str(samples), "--data", str(world), "--source", "judge",
                   "--judge", str(model_dirs["llava"]), "--out", str(judged), "--no-progress"]) == 0
    report = json.loads((judged / "report.json").read_text())
    agree = report["agreement_with_oracle"]
    assert set(agree) == {"object", "attribute", "relation"} and agree["object"]["n"] > 0
    assert "Agreement with the oracle" in (judged / "report.md").read_text()


def test_feedback_bad_input_is_counted_not_lost(world, sampled, tmp_path):
    lines = (sampled / "responses.jsonl").read_text().splitlines()
    bad = json.loads(lines[0])
    bad["images"] = ["images/test/missing.png"]
    broken = tmp_path / "responses.jsonl"
    broken.write_text("\n".join([lines[1], "{not json", json.dumps(bad), *lines[2:]]) + "\n")
    out = tmp_path / "fb"
    assert F.main(["--responses", str(broken), "--data", str(world), "--source", "oracle", "--out", str(out)]) == 0
    rejects = (out / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 2
    assert len((out / "feedback.jsonl").read_text().splitlines()) == len(lines) - 1
    with pytest.raises(SystemExit):
        F.main(["--responses", str(broken), "--data", str(world), "--source", "judge", "--out", str(out)])


def test_feedback_with_teacher_critic(world, model_dirs, sampled, tmp_path):
    """--teacher: a tiny causal LM rewrites critique and refinement (its text is noise, but the
    stage records it and keeps the oracle's labels)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dirs["llava"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    LlamaForCausalLM(cfg).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    out = tmp_path / "fb"
    assert F.main(["--responses", str(sampled), "--data", str(world), "--source", "oracle", "--teacher", str(teacher),
                   "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "feedback.jsonl").read_text().splitlines()]
    assert rows and all(r["annotations"]["critique_by"] == str(teacher) for r in rows)
    assert all(isinstance(r["annotations"]["critique"], str) for r in rows)
    assert all(r["annotations"]["segments"] is not None for r in rows)
