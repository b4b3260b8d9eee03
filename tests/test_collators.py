"""Collator masks, padding sides and truncation, hand-checked on the tiny models' tokens."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.collators import OverlengthError, VisionChatCollator, image_token_id
from mmalign.ops import IGNORE_INDEX
from models.processors import load_processor


def example(answer: str, question: str = "What is there?", turns: int = 1) -> dict:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    for t in range(1, turns):
        msgs += [{"role": "user", "content": [{"type": "text", "text": f"Again {t}?"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": f"{answer} {t}"}]}]
    return {"images": [Image.new("RGB", (64, 64), (200, 30, 30))], "messages": msgs, "meta": {"id": answer}}


@pytest.fixture(params=["llava", "qwen2_vl"])
def processor(request, model_dirs):
    return load_processor(model_dirs[request.param])


def labelled_text(processor, batch, i):
    keep = batch["labels"][i] != IGNORE_INDEX
    return processor.tokenizer.decode(batch["input_ids"][i][keep])


def test_labels_cover_exactly_the_assistant_turn(processor):
    c = VisionChatCollator(processor, max_length=512)
    batch = c([example("A red circle."), example("Two large blue squares and a star.")])
    end = processor.tokenizer.eos_token
    # By hand: the loss covers the answer text and the end-of-turn token, nothing else.
    assert labelled_text(processor, batch, 0) == "A red circle." + end
    assert labelled_text(processor, batch, 1) == "Two large blue squares and a star." + end
    # Right padding for training: the shorter row ends in pad tokens with no loss.
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][1, -1] == 1
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    # No image token ever carries a label.
    img = image_token_id(processor)
    assert (batch["labels"][batch["input_ids"] == img] == IGNORE_INDEX).all()
    # The labelled span is the tail of the real sequence.
    n0 = int(batch["attention_mask"][0].sum())
    k = len(processor.tokenizer("A red circle." + end, add_special_tokens=False)["input_ids"])
    assert (batch["labels"][0, n0 - k:n0] == batch["input_ids"][0, n0 - k:n0]).all()
    assert (batch["labels"][0, : n0 - k] == IGNORE_INDEX).all()


def test_multi_turn_all_vs_last(processor):
    ex = example("A red circle.", turns=2)
    end = processor.tokenizer.eos_token
    all_turns = VisionChatCollator(processor, train_on="all")([ex])
    last = VisionChatCollator(processor, train_on="last")([ex])
    assert labelled_text(processor, all_turns, 0) == "A red circle." + end + "A red circle. 1" + end
    assert labelled_text(processor, last, 0) == "A red circle. 1" + end


def test_generate_mode_pads_left_and_drops_the_answer(processor):
    c = VisionChatCollator(processor, mode="generate")
    batch = c([example("A red circle."), example("x", question="Describe the image in detail, please.")])
    assert "labels" not in batch
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert batch["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    assert "A red circle." not in text and text.rstrip().endswith("<|assistant|>")


def test_truncation_cuts_the_tail_but_never_image_tokens(processor):
    long = example("red " * 80)
    n_full = int(VisionChatCollator(processor, max_length=10_000)([long])["attention_mask"].sum())
    img = image_token_id(processor)
    cut = VisionChatCollator(processor, max_length=n_full - 20)([long, example("A star.")])
    assert cut["input_ids"].shape[1] == n_full - 20
    assert (cut["input_ids"][0] == img).sum() == 64  # every image token kept
    # A limit inside the image tokens: dropped with a count, or an error naming the record.
    c = VisionChatCollator(processor, max_length=30)
    batch = c([long, example("A star.")])
    assert batch is None and c.dropped == 2
    with pytest.raises(OverlengthError, match="cutting would drop image tokens"):
        VisionChatCollator(processor, max_length=30, on_overlength="error")([long])


def test_drop_keeps_the_rest_of_the_batch(processor):
    short = example("A star.")
    n_short = int(VisionChatCollator(processor)([short])["attention_mask"].sum())
    c = VisionChatCollator(processor, max_length=n_short + 2)
    # A prompt longer than max_length leaves no labelled token after the cut: that example is
    # dropped, and the rest of the batch is encoded exactly as it would be alone.
    long_prompt = example("A star.", question="why " * 60)
    batch = c([short, long_prompt])
    assert c.dropped == 1 and batch["input_ids"].shape[0] == 1
    assert batch["meta"] == [{"id": "A star."}]
    assert torch.equal(batch["input_ids"][0], VisionChatCollator(processor)([short])["input_ids"][0])
