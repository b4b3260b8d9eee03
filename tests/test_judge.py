"""The feedback interface and the MMHal-style judge on the tiny models (image-text and text-only)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmalign.feedback import Feedback, FeedbackError, FeedbackItem, FeedbackSource, check_feedback
from mmalign.records import RecordError, load_image
from models.judge import DEFAULT_PROMPT_TEMPLATE, TEMPLATE_FIELDS, MMHalJudge, rating_tokens

SHORT_TEMPLATE = "Q: {question}\nRef: {reference}\nA: {response}\nRate 0-6."


def _items(world, n=4):
    """Test-split records of different lengths (so a batch is padded), as feedback items."""
    recs = [json.loads(line) for line in (world / "test" / "sft.jsonl").read_text().splitlines()]
    # detailed caption, short caption, yes/no ... of scene 0, then the detailed caption of scene 1
    picked = recs[:3] + [r for r in recs if r["task"] == "detailed_caption"][1:2]
    out = []
    for r in picked[:n]:
        out.append(FeedbackItem(id=r["id"], prompt=r["question"], response=r["answer"],
                                image=str(world / r["images"][0]), reference=r["answer"]))
    return out


@pytest.fixture(scope="module")
def judge(model_dirs):
    return MMHalJudge(str(model_dirs["llava"]), batch_size=4, progress=False)


def _check_well_formed(items, fb):
    assert [f.id for f in fb] == [it.id for it in items]
    for f in fb:
        assert isinstance(f, Feedback)
        r, e = f.scores["mmhal_rating"], f.scores["mmhal_expected"]
        assert r in range(7) and 0.0 <= e <= 6.0
        assert f.scores["hallucination"] == (1.0 if r < 3 else 0.0)
        probs = f.meta["digit_probs"]
        assert len(probs) == 7 and sum(probs) == pytest.approx(1.0, abs=1e-9)
        assert probs.index(max(probs)) == int(r)
        assert e == pytest.approx(sum(d * p for d, p in enumerate(probs)), abs=1e-9)
        assert 0.0 < f.meta["digit_mass"] <= 1.0
        assert f.raw == str(int(r))


# -- the interface ------------------------------------------------------------------------------


def test_check_feedback_catches_count_ids_and_bad_scores():
    items = [FeedbackItem(id="a", prompt="q", response="r"), FeedbackItem(id="b", prompt="q", response="r")]
    good = [Feedback(id="a", scores={"s": 1.0}), Feedback(id="b", scores={"s": 2})]
    assert check_feedback(items, iter(good)) == good
    with pytest.raises(FeedbackError, match="returned 1 feedback entries for 2 items"):
        check_feedback(items, good[:1])
    with pytest.raises(FeedbackError, match="entry 0 has id 'b' but item 0 is 'a'"):
        check_feedback(items, good[::-1])
    for bad in (float("nan"), float("inf"), True, "4"):
        with pytest.raises(FeedbackError, match=r"item 'b': score 's'"):
            check_feedback(items, [good[0], Feedback(id="b", scores={"s": bad})], source="x")
    with pytest.raises(FeedbackError, match="not a Feedback"):
        check_feedback(items, [good[0], {"id": "b"}])


# -- digit tokens -------------------------------------------------------------------------------


def test_digits_are_single_tokens_after_a_space_bridge(judge):
    tok = judge.tokenizer
    # The tiny byte-level BPE writes " 3" as 'Ġ' + '3': the space is a bridge token, digits are bare.
    assert tok.convert_ids_to_tokens(judge.bridge_ids) == ["Ġ"]
    assert judge.digit_ids == tok.convert_tokens_to_ids(list("0123456"))
    assert tok("Rating: 3", add_special_tokens=False)["input_ids"][-2:] == judge.bridge_ids + [judge.digit_ids[3]]
    item = FeedbackItem(id="x", prompt="Q?", response="R.", image="unused")
    assert judge.prompt_text(item).endswith("<|assistant|>Rating:")


class _CharTokenizer:
    """Fake tokenizer: one token per character, but every digit is two tokens."""

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for c in text:
            ids += [ord(c), 0] if c.isdigit() else [ord(c)]
        return {"input_ids": ids}


class _Gpt2LikeTokenizer:
    """Fake tokenizer: ' 3' is one token (GPT-2 style), other characters one token each."""

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text[i] == " " and i + 1 < len(text) and text[i + 1].isdigit():
                ids.append(1000 + int(text[i + 1]))
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_rating_tokens_variants_and_refusal():
    assert rating_tokens(_Gpt2LikeTokenizer()) == ([], [1000 + d for d in range(7)])
    with pytest.raises(ValueError, match="single next token"):
        rating_tokens(_CharTokenizer())


# -- the image-text judge -------------------------------------------------------------------------


def test_judge_is_a_feedback_source_and_returns_well_formed_feedback(judge, world):
    assert isinstance(judge, FeedbackSource) and judge.name == "mmhal_judge"
    assert judge.kind == "image-text-to-text" and judge.use_image
    items = _items(world)
    fb = judge.annotate(items)
    _check_well_formed(items, fb)
    assert judge.annotate([]) == []
    assert not judge.model.training


def test_expected_rating_by_hand(judge, world):
    item = _items(world, 1)[0]
    # Build the input independently: prompt text, processor, the bridge token, one forward pass.
    tok = judge.tokenizer
    text = judge.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": judge.instruction(item)}]}],
        tokenize=False, add_generation_prompt=True) + "Rating:"
    assert item.response in text and "0: not informative, with hallucination" in text
    enc = judge.processor(text=[text], images=[[load_image(item.image)]], return_tensors="pt")
    space = tok.convert_tokens_to_ids("Ġ")
    enc["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([[space]])], 1)
    enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones(1, 1, dtype=enc["attention_mask"].dtype)], 1)
    with torch.no_grad():
        logits = judge.model(**{k: v.to(judge.device) for k, v in enc.items()}).logits[0, -1].double().cpu()
    logz = torch.logsumexp(logits, 0)
    lp = [float(logits[tok.convert_tokens_to_ids(str(d))] - logz) for d in range(7)]
    z = sum(math.exp(x) for x in lp)
    expected = sum(d * math.exp(x) / z for d, x in enumerate(lp))
    rating = max(range(7), key=lambda d: lp[d])

    got = judge.digit_logprobs([item])[0].tolist()
    assert got == pytest.approx(lp, abs=1e-5)
    fb = judge.annotate([item])[0]
    assert fb.scores["mmhal_expected"] == pytest.approx(expected, abs=1e-5)
    assert fb.scores["mmhal_rating"] == rating
    assert fb.meta["digit_mass"] == pytest.approx(z, rel=1e-4)


def test_scores_do_not_depend_on_batch_size_or_padding(judge, world):
    items = _items(world)
    lengths = judge._encode(items)["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the batch of 4 really is left-padded
    full = judge.digit_logprobs(items)
    judge.batch_size = 1
    try:
        single = judge.digit_logprobs(items)
    finally:
        judge.batch_size = 4
    assert torch.allclose(full, single, atol=1e-4)


def test_qwen2_vl_judge_batch_invariant(model_dirs, world):
    j = MMHalJudge(str(model_dirs["qwen2_vl"]), batch_size=3, prompt_template=SHORT_TEMPLATE, progress=False)
    items = _items(world, 3)
    assert "Ref: " in j.prompt_text(items[0])
    full = j.digit_logprobs(items)
    j.batch_size = 1
    assert torch.allclose(full, j.digit_logprobs(items), atol=1e-4)
    _check_well_formed(items, j.annotate(items))


def test_items_without_image_need_a_text_only_judge(judge, model_dirs):
    item = FeedbackItem(id="no-pic", prompt="What is shown?", response="A red circle.", meta={"source": "f.jsonl:3"})
    with pytest.raises(RecordError, match=r"item 'no-pic' \(f.jsonl:3\).*use_image=False"):
        judge.annotate([item])
    with pytest.raises(FeedbackError, match="duplicate item id"):
        judge.annotate([item, item])
    text_only = MMHalJudge(str(model_dirs["llava"]), use_image=False, prompt_template=SHORT_TEMPLATE, progress=False)
    assert "<image>" not in text_only.prompt_text(item)
    _check_well_formed([item], text_only.annotate([item]))


def test_bad_paths_and_templates(tmp_path, model_dirs):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        MMHalJudge(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot read a Hugging Face model config"):
        MMHalJudge(str(tmp_path / "empty"))
    from transformers import CLIPVisionConfig

    CLIPVisionConfig().save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="is neither an image-text-to-text model"):
        MMHalJudge(str(tmp_path / "clip"))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['answer'\]"):
        MMHalJudge(str(model_dirs["llava"]), prompt_template="{question} {answer}")
    assert all(f"{{{f}}}" in DEFAULT_PROMPT_TEMPLATE for f in TEMPLATE_FIELDS)


# -- MMHal-Bench response files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_lm_dir(model_dirs, tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dirs["llava"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    out = tmp_path_factory.mktemp("text_lm")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_text_only_causal_lm_judge(text_lm_dir, world):
    j = MMHalJudge(str(text_lm_dir), batch_size=4, progress=False)
    assert j.kind == "causal-lm" and not j.use_image and j.processor is None
    assert isinstance(j, FeedbackSource)
    items = _items(world)
    text = j.prompt_text(items[0])
    assert text.startswith("<|bos|><|user|>") and text.endswith("<|assistant|>Rating:") and "<image>" not in text
    _check_well_formed(items, j.annotate(items))
    full = j.digit_logprobs(items)
    j.batch_size = 1
    assert torch.allclose(full, j.digit_logprobs(items), atol=1e-4)  # left padding + position ids
    # No chat template: the instruction as plain text, then "Rating:" on its own line.
    j.tokenizer.chat_template = None
    assert j.prompt_text(items[0]).endswith("Reply with the rating digit only.\n\nRating:")
    _check_well_formed(items[:2], j.annotate(items[:2]))
    with pytest.raises(ValueError, match="cannot be shown the image"):
        MMHalJudge(str(text_lm_dir), use_image=True)
