"""The tiny-model builder: both families build, save/load through the Auto classes, expand image
tokens to the model's feature count, keep the chat-template prefix property and stop generating at
the end of the assistant turn."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessorPil, LlavaProcessor
from transformers.utils import is_torchvision_available

from models import tiny
from models.processors import load_processor
from models.tiny import (
    FAMILIES,
    Qwen2VLImageTextProcessor,
    build_tiny_vlm,
    count_parameters,
    image_tokens_per_image,
    save_tiny_vlm,
    train_tokenizer,
)

COLORS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
SIZES = ["small", "large"]
PROMPT = "Describe the image in detail."


def caption(rng: random.Random) -> str:
    objs = [f"a {rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(SHAPES)}" for _ in range(rng.randint(1, 3))]
    return f"There are {len(objs)} objects: " + " and ".join(objs) + "."


def corpus(n: int = 200) -> list[str]:
    rng = random.Random(0)
    return [caption(rng) for _ in range(n)] + [PROMPT, "Is there a red circle?", "Yes.", "No."] * 10


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8))


def conversation(answer: str = "There are 1 objects: a small red circle.") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def built(request):
    family = request.param
    tokenizer = train_tokenizer(corpus(), vocab_size=400, family=family)
    model, processor = build_tiny_vlm(tokenizer, family=family)
    return family, model, processor


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_is_byte_level_and_adds_nothing(family):
    tok = train_tokenizer(corpus(50), vocab_size=320, family=family)
    for text in ["a small red circle", "Ünïcödé ✓ 漢字 🙂", "tabs\tand\n\nnewlines  ", "", "~`@#$%^&*()"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert ids == tok(text, add_special_tokens=False)["input_ids"]  # no automatic bos/eos
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    assert tok.eos_token == tiny.END
    assert len(tok(tok.image_token, add_special_tokens=False)["input_ids"]) == 1


def test_tokenizer_vocab_size_is_respected():
    tok = train_tokenizer(corpus(), vocab_size=300)
    assert 256 < len(tok) <= 300
    with pytest.raises(ValueError):
        train_tokenizer(corpus(10), vocab_size=100)


# ----------------------------------------------------------------------------- chat template


def test_chat_template_prefix_property(built):
    """Prompt (up to the last user turn + generation prompt) is a string- and token-prefix of the
    full rendering, also with images expanded, multi-turn, and answers starting with whitespace."""
    _, _, processor = built
    conversations = [
        conversation(),
        [
            {"role": "system", "content": "You describe scenes."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": "\n\n  There is a star."},
            {"role": "user", "content": "Is it red?"},
            {"role": "assistant", "content": [{"type": "text", "text": " No, it is blue.\n"}]},
        ],
    ]
    for messages in conversations:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = processor.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = processor.apply_chat_template(messages[: i + 1], tokenize=False)
            assert full.startswith(prompt) and full.endswith(tiny.END)
            assert prompt.endswith(tiny.ROLE_TOKENS["assistant"])
            p = processor(text=prompt, images=image(), return_tensors="pt")["input_ids"][0]
            f = processor(text=full, images=image(), return_tensors="pt")["input_ids"][0]
            assert torch.equal(f[: len(p)], p)
            assert f[-1] == processor.tokenizer.eos_token_id
            # the tokenizer alone (no image expansion) keeps it too
            tp = processor.tokenizer(prompt)["input_ids"]
            assert processor.tokenizer(full)["input_ids"][: len(tp)] == tp


def test_chat_template_text(built):
    family, _, processor = built
    text = processor.apply_chat_template(conversation("Hi."), tokenize=False)
    image_text = "<image>" if family == "llava" else "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == f"<|bos|><|user|>{image_text}{PROMPT}<|end|><|assistant|>Hi.<|end|>"
    assert processor.tokenizer.chat_template == processor.chat_template
    spaced = [{"role": "system", "content": " a\n"}, {"role": "user", "content": "\n b "}]
    assert processor.apply_chat_template(spaced, tokenize=False) == "<|bos|><|system|> a\n<|end|><|user|>\n b <|end|>"
    with pytest.raises(Exception, match="unknown role"):
        processor.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


# ----------------------------------------------------------------------------- model


def test_image_tokens_match_model_features(built):
    family, model, processor = built
    assert image_tokens_per_image(processor, 64) == 64
    texts = [processor.apply_chat_template(conversation(), tokenize=False)] * 2
    batch = processor(text=texts, images=[image(0), image(1)], return_tensors="pt", padding=True)
    assert ((batch["input_ids"] == processor.image_token_id).sum(1) == 64).all()
    with torch.no_grad():
        out = model(**batch)  # HF raises if image tokens != image features
    assert out.logits.shape == (*batch["input_ids"].shape, len(processor.tokenizer))


def test_save_load_round_trip_identical_logits(built, tmp_path):
    family, model, processor = built
    save_tiny_vlm(model, processor, tmp_path)
    loaded_processor = load_processor(tmp_path)
    loaded_model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded_model) is type(model)
    if family == "llava":
        auto = AutoProcessor.from_pretrained(tmp_path)
        assert type(auto) is LlavaProcessor and type(loaded_processor) is LlavaProcessor
        assert type(auto.image_processor) is CLIPImageProcessorPil or is_torchvision_available()
    else:
        config = json.loads((tmp_path / "processor_config.json").read_text())
        assert config["processor_class"] == "Qwen2VLProcessor"  # stock layout
        assert config["video_processor"]["patch_size"] == processor.image_processor.patch_size
        if is_torchvision_available():
            assert type(AutoProcessor.from_pretrained(tmp_path)).__name__ == "Qwen2VLProcessor"
        else:
            assert type(loaded_processor) is Qwen2VLImageTextProcessor
    texts = [
        processor.apply_chat_template(conversation(), tokenize=False),
        processor.apply_chat_template(conversation()[:1], tokenize=False, add_generation_prompt=True),
    ]
    images = [image(2), image(3)]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    batch2 = loaded_processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert batch.keys() == batch2.keys()
    for key in batch:
        assert torch.equal(batch[key], batch2[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded_model(**batch2).logits)
    assert loaded_model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert loaded_model.generation_config.pad_token_id == processor.tokenizer.pad_token_id


def test_generate_stops_at_end_of_turn(built):
    """Overfit one example (labels only on the answer, masked by the prefix property), then
    greedy generation reproduces the answer and stops at <|end|> before max_new_tokens."""
    family, model, processor = built
    model = copy.deepcopy(model)  # the module fixture stays untrained
    answer = "There are 1 objects: a small red circle."
    prompt = processor.apply_chat_template(conversation(answer)[:1], tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(conversation(answer), tokenize=False)
    batch = processor(text=full, images=image(), return_tensors="pt")
    n_prompt = processor(text=prompt, images=image(), return_tensors="pt")["input_ids"].shape[1]
    labels = batch["input_ids"].clone()
    labels[:, :n_prompt] = -100
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):  # ~60 (llava) to ~90 (qwen2_vl) steps reach the threshold
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.02:
            break
    model.eval()
    inputs = processor(text=prompt, images=image(), return_tensors="pt")
    max_new = 40
    out = model.generate(**inputs, max_new_tokens=max_new)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert len(new) < max_new and new[-1] == processor.tokenizer.eos_token_id
    assert processor.decode(new, skip_special_tokens=True) == answer


def test_batched_generate_with_left_padding_matches_single(built):
    """The tokenizer pads right (training); batched generation needs padding_side="left"."""
    _, model, processor = built
    assert processor.tokenizer.padding_side == "right"
    question = [{"type": "image"}, {"type": "text", "text": "Is there a large purple star? Answer yes or no."}]
    prompts = [
        processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in (conversation()[:1], [{"role": "user", "content": question}])
    ]
    images = [image(5), image(6)]
    singles = [
        model.generate(**processor(text=p, images=im, return_tensors="pt"), max_new_tokens=6)[0, -6:]
        for p, im in zip(prompts, images)
    ]
    batch = processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**batch, max_new_tokens=6)[:, -6:]
    assert torch.equal(out[0], singles[0]) and torch.equal(out[1], singles[1])


def test_same_seed_same_weights():
    tok = train_tokenizer(corpus(20), vocab_size=300)
    a, _ = build_tiny_vlm(tok, seed=3, text_layers=1, vision_layers=1)
    b, _ = build_tiny_vlm(tok, seed=3, text_layers=1, vision_layers=1)
    c, _ = build_tiny_vlm(tok, seed=4, text_layers=1, vision_layers=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_default_sizes_parameter_band():
    """DESIGN.md: ~1M parameters at 64 px / patch 8 for the default llava."""
    tok = train_tokenizer(corpus(), vocab_size=512)
    for family in FAMILIES:
        tok_f = tok if family == "llava" else train_tokenizer(corpus(), vocab_size=512, family=family)
        model, _ = build_tiny_vlm(tok_f, family=family)
        assert 500_000 < count_parameters(model) < 3_000_000, family


def test_text_init_std_sets_decoder_and_projector_init():
    tok = train_tokenizer(corpus(20), vocab_size=300)
    for std in (0.02, 0.08):
        model, _ = build_tiny_vlm(tok, text_layers=1, vision_layers=1, text_init_std=std)
        assert model.config.text_config.initializer_range == std
        q = model.model.language_model.layers[0].self_attn.q_proj.weight
        proj = model.model.multi_modal_projector.linear_2.weight
        assert q.std().item() == pytest.approx(std, rel=0.1)
        assert proj.std().item() == pytest.approx(std, rel=0.1)
    # the CLI parses it as a float
    assert tiny.build_parser().parse_args(["--data", "d", "--out", "o", "--text-init-std", "0.05"]).text_init_std == 0.05


def test_bad_sizes_raise():
    tok = train_tokenizer(corpus(20), vocab_size=300)
    with pytest.raises(ValueError, match="multiple"):
        build_tiny_vlm(tok, image_size=60)
    with pytest.raises(ValueError, match="family"):
        build_tiny_vlm(tok, family="qwen2_vl")  # llava tokenizer lacks the Qwen vision tokens


# ----------------------------------------------------------------------------- CLI


def write_sft(data_dir, n: int = 6) -> None:
    rng = random.Random(1)
    (data_dir / "train").mkdir(parents=True)
    with open(data_dir / "train" / "sft.jsonl", "w") as f:
        for i in range(n):
            record = {"images": [f"images/train/{i:06d}.png"], "messages": conversation(caption(rng))}
            f.write(json.dumps(record) + "\n")


def test_cli_builds_and_replaces_atomically(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "model"
    write_sft(data)
    small = ["--text-layers", "1", "--vision-layers", "1", "--vocab-size", "300"]
    for family in ("llava", "qwen2_vl"):
        assert tiny.main(["--data", str(data), "--out", str(out), "--family", family, *small]) == 0
        info = json.loads((out / "build.json").read_text())
        assert info["family"] == family and info["image_tokens_per_image"] == 64
        assert info["args"]["text_layers"] == 1 and info["num_parameters"] > 0
        model = AutoModelForImageTextToText.from_pretrained(out)
        assert model.config.model_type == family and count_parameters(model) == info["num_parameters"]
        assert len(load_processor(out).tokenizer) == info["vocab_size"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model"]  # no tmp/trash left
    with pytest.raises(FileNotFoundError):
        tiny.main(["--data", str(tmp_path / "missing"), "--out", str(out)])
    with pytest.raises(SystemExit):
        tiny.main(["--help"])
    assert "--text-hidden" in capsys.readouterr().out


def test_record_texts_cover_string_and_part_content(tmp_path):
    path = tmp_path / "x.jsonl"
    messages = [{"role": "user", "content": "plain"}, *conversation("answer")]
    path.write_text(json.dumps({"messages": messages}) + "\n\n")
    assert list(tiny.iter_record_texts(path)) == ["plain", PROMPT, "answer"]
