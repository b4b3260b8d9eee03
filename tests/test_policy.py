"""The policy adapter on both tiny families: log-probs by hand, reference views, LoRA, export."""

from __future__ import annotations

import inspect

import pytest
import torch
from PIL import Image

from mmalign.collators import VisionChatCollator
from mmalign.ops import IGNORE_INDEX, token_logprobs
from models.policy import HFPolicy, LoraOptions


def examples():
    out = []
    for colour, answer in (((220, 20, 20), "A large red circle."), ((20, 20, 220), "Two blue stars.")):
        out.append({"images": [Image.new("RGB", (64, 64), colour)], "meta": {"id": answer}, "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    return out


@pytest.fixture(params=["llava", "qwen2_vl"])
def family(request):
    return request.param


def test_token_logprobs_by_hand():
    # V = 2, one sequence of 3 tokens [0, 1, 1]; only the last label is scored.
    # logits at t=1 are [0, ln 3] -> p(token 1) = 3 / (1 + 3) = 0.75.
    logits = torch.tensor([[[5.0, 1.0], [0.0, torch.log(torch.tensor(3.0))], [9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1]])
    logps, mask = token_logprobs(logits, labels)
    assert mask.tolist() == [[0.0, 1.0]]
    assert torch.allclose(logps, torch.tensor([[0.0, torch.log(torch.tensor(0.75))]]))


def test_completion_logprobs_equal_a_hand_computation(model_dirs, family):
    policy = HFPolicy(str(model_dirs[family])).eval()
    batch = VisionChatCollator(policy.processor)(examples())
    logps, mask = policy.completion_logprobs(batch)
    with torch.no_grad():
        logits = policy.model(**policy.model_inputs(batch)).logits.double()
    for b in range(2):
        want, n = 0.0, 0
        for t in range(batch["labels"].shape[1] - 1):
            target = int(batch["labels"][b, t + 1])
            if target == IGNORE_INDEX:
                continue
            want += float(logits[b, t, target] - torch.logsumexp(logits[b, t], 0))
            n += 1
        assert n == int(mask[b].sum()) > 0
        assert float(logps[b].sum().detach()) == pytest.approx(want, rel=1e-5)


def test_generate_needs_left_padding_and_returns_text(model_dirs, family):
    policy = HFPolicy(str(model_dirs[family]))
    gen = VisionChatCollator(policy.processor, mode="generate")(examples())
    out = policy.generate(gen, max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert policy.model.training  # generate() restores the training mode it found
    with pytest.raises(ValueError, match="left-padded"):
        policy.generate(VisionChatCollator(policy.processor)(examples()), max_new_tokens=2)


def _train_step(policy, batch, lr=0.05):
    opt = torch.optim.SGD(list(policy.trainable_parameters()), lr=lr)
    logps, mask = policy.completion_logprobs(batch)
    (-(logps.sum() / mask.sum())).backward()
    opt.step()


def test_frozen_copy_reference(model_dirs):
    policy = HFPolicy(str(model_dirs["llava"]))
    batch = VisionChatCollator(policy.processor)(examples())
    with torch.no_grad(), policy.reference() as ref:
        before = ref.completion_logprobs(batch)[0]
    _train_step(policy, batch)
    with torch.no_grad():
        after_policy = policy.completion_logprobs(batch)[0]
        with policy.reference() as ref:
            after_ref = ref.completion_logprobs(batch)[0]
    assert torch.equal(before, after_ref)
    assert not torch.allclose(after_policy, after_ref)
    assert "_ref_model" not in dict(policy.named_modules())  # not trained, not in the state_dict
    assert not any(k.startswith("_ref") for k in policy.state_dict())


def test_lora_reference_and_export(model_dirs, tmp_path):
    policy = HFPolicy(str(model_dirs["llava"]), lora=LoraOptions(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    batch = VisionChatCollator(policy.processor)(examples())
    base = HFPolicy(str(model_dirs["llava"])).eval()
    with torch.no_grad():
        base_lp = base.completion_logprobs(batch)[0]
    _train_step(policy, batch, lr=0.5)
    policy.eval()
    with torch.no_grad():
        lp = policy.completion_logprobs(batch)[0]
        with policy.reference() as ref:
            ref_lp = ref.completion_logprobs(batch)[0]
    assert torch.allclose(ref_lp, base_lp, atol=1e-5)  # adapter disabled == the base model
    assert not torch.allclose(lp, base_lp, atol=1e-4)
    # Export merged and as an adapter: both load back by path and give the trained log-probs.
    policy.save_pretrained(str(tmp_path / "merged"), merge_lora=True)
    policy.save_pretrained(str(tmp_path / "adapter"), merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    for d in ("merged", "adapter"):
        loaded = HFPolicy(str(tmp_path / d)).eval()
        with torch.no_grad():
            assert torch.allclose(loaded.completion_logprobs(batch)[0], lp, atol=1e-4), d
    # training still works after a merged export (the merge touched a copy)
    assert any(p.requires_grad for p in policy.parameters())


def test_freezing_and_safe_defaults(model_dirs, family):
    policy = HFPolicy(str(model_dirs[family]), freeze_vision_tower=True, freeze_projector=True)
    frozen = {n for n, p in policy.model.named_parameters() if not p.requires_grad}
    assert any("vision_tower" in n or "visual" in n for n in frozen)
    assert any("multi_modal_projector" in n or "merger" in n for n in frozen)
    assert all("language_model" not in n for n in frozen)
    assert inspect.signature(HFPolicy).parameters["trust_remote_code"].default is False


def test_quantization_without_cuda_is_a_clear_error(model_dirs):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        HFPolicy(str(model_dirs["llava"]), quantization="4bit", lora=LoraOptions())
    with pytest.raises(ValueError, match="set `lora`"):
        HFPolicy(str(model_dirs["llava"]), quantization="4bit")
