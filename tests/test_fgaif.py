"""FGAIF's PPO wiring: sampled token ids, response log-probs, segment ends in policy tokens, the
rollout's reward placement and one PPO iteration."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.collators import VisionChatCollator, select_rows
from mmalign.methods.fgaif import FGAIFModule, segment_token_ends, token_char_ends
from mmalign.segments import split_segments
from models.policy import HFPolicy


def prompts(n=2):
    out = []
    for i, colour in enumerate([(220, 20, 20), (20, 20, 220), (20, 220, 20)][:n]):
        img = Image.new("RGB", (64, 64), colour)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
        out.append({"images": [img], "messages": msgs,
                    "meta": {"id": f"p{i}", "image_paths": [img], "prompt_messages": msgs}})
    return out


@pytest.fixture(params=["llava", "qwen2_vl"])
def family(request):
    return request.param


def test_generate_ids_masks_after_the_first_eos_and_decodes_like_generate(model_dirs, family):
    pol = HFPolicy(str(model_dirs[family]))
    batch = VisionChatCollator(pol.processor, mode="generate")(prompts())
    ids, mask = pol.generate_ids(batch, max_new_tokens=12)
    texts = pol.generate(batch, max_new_tokens=12)
    tok = pol.processor.tokenizer
    eos = pol.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for row, m, text in zip(ids.tolist(), mask.tolist(), texts):
        n = sum(m)
        assert m == [1] * n + [0] * (len(m) - n)            # a prefix
        assert not any(t in eos for t in row[:n - 1])        # no eos before the last kept token
        assert all(t == tok.pad_token_id for t in row[n:])
        assert tok.decode(row[:n], skip_special_tokens=True).strip() == text


def test_response_forward_gives_the_sampling_log_probs(model_dirs, family):
    # PPO's first minibatch must see ratio 1: the log-probs of a forward over prompt + response
    # equal the ones generation sampled with (read from generate's scores).
    pol = HFPolicy(str(model_dirs[family]))
    batch = VisionChatCollator(pol.processor, mode="generate")(prompts(3))
    inputs = pol.model_inputs(batch)
    pol.model.eval()
    out = pol.model.generate(**inputs, max_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=pol.processor.tokenizer.pad_token_id)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    gen_logps = torch.stack([torch.log_softmax(s.float(), -1).gather(1, new[:, j:j + 1]).squeeze(1)
                             for j, s in enumerate(out.scores)], dim=1)
    mask = torch.ones_like(new)
    logits, hidden = pol.response_forward(batch, new, mask, hidden=True)
    logps = torch.log_softmax(logits.float(), -1).gather(2, new.unsqueeze(-1)).squeeze(-1)
    assert logits.shape[:2] == new.shape and hidden.shape[:2] == new.shape
    assert torch.allclose(logps, gen_logps, atol=1e-4), (logps - gen_logps).abs().max()


def test_response_forward_needs_left_padding_and_matching_rows(model_dirs):
    pol = HFPolicy(str(model_dirs["llava"]))
    batch = VisionChatCollator(pol.processor, mode="generate")(prompts())
    with pytest.raises(ValueError, match="2 prompts"):
        pol.response_forward(batch, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))
    mask = batch["attention_mask"].clone()
    mask[0, -1] = 0                                        # as a right-padded row would be
    right = dict(batch, attention_mask=mask)
    with pytest.raises(ValueError, match="left-padded"):
        pol.response_forward(right, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long))


def test_select_rows_repeats_in_order():
    b = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "pixel_values": torch.arange(2.0).view(2, 1),
         "meta": [{"id": "a"}, {"id": "b"}], "layout": "x"}
    out = select_rows(b, [0, 0, 1])
    assert out["input_ids"].tolist() == [[1, 2], [1, 2], [3, 4]]
    assert [m["id"] for m in out["meta"]] == ["a", "a", "b"] and out["layout"] == "x"
    with pytest.raises(ValueError, match="pixel_values"):
        select_rows({**b, "pixel_values": torch.zeros(5, 1)}, [0])


@pytest.mark.parametrize("segmentation, n_segments", [("released", 2), ("fine", 4)])
def test_segment_ends_land_on_the_token_that_finishes_each_segment(model_dirs, segmentation, n_segments):
    # released: "There are two objects: a red circle," (7 words) | "a blue square and a star." (6 words)
    tok = HFPolicy(str(model_dirs["llava"])).processor.tokenizer
    text = "There are two objects: a red circle, a blue square and a star."
    ids = tok(" " + text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ends_chars = token_char_ends(tok, ids)
    full = tok.decode(ids, skip_special_tokens=True)
    clean, ends = segment_token_ends(full, ends_chars, segmentation)
    assert clean == text
    segs = split_segments(clean, segmentation)
    assert len(ends) == len(segs) == n_segments
    lead = len(full) - len(full.lstrip())
    for seg, j in zip(segs, ends):
        # the token reaches the segment's last character, and the one before does not
        assert ends_chars[j] >= lead + seg.end
        assert j == 0 or ends_chars[j - 1] < lead + seg.end
    assert ends[-1] < len(ids) - 1            # never the eos token: it adds no character


class KeywordRM:
    """A test double for a fine-grained reward model: a segment naming "red" is an object
    hallucination (-1), any other segment with a word is correct (+1)."""

    types = ("object",)

    def __init__(self, segmentation="released"):
        self.segmentation = segmentation

    def segment_rewards(self, items, mode="label", batch_size=32):
        out = []
        for it in items:
            segs = split_segments(it.response, self.segmentation)
            out.append({"object": torch.tensor([-1.0 if "red" in s.text else 1.0 for s in segs])})
        return out

    def to(self, device):
        return self


def make_module(model_dirs, **kw):
    pol = HFPolicy(str(model_dirs["llava"]))
    mod = FGAIFModule(pol, reward_models={"object": "unused"}, **kw)
    mod.__dict__["_reward_models"] = {"object": KeywordRM()}
    return mod


@pytest.mark.parametrize("placement,aggregation", [("segment", "sum"), ("sequence", "sum"), ("segment", "mean")])
def test_rollout_places_the_segment_rewards_and_conserves_them(model_dirs, placement, aggregation):
    torch.manual_seed(0)
    mod = make_module(model_dirs, reward_placement=placement, reward_aggregation=aggregation, kl_coef=0.0, max_new_tokens=24, value_model="shared")
    batch = VisionChatCollator(mod.policy.processor, mode="generate")(prompts(3))
    ro = mod.rollout(batch)
    tok = mod.policy.processor.tokenizer
    placed_total = 0.0
    for i, text in enumerate(ro["texts"]):
        segs = split_segments(text)
        # mean: each segment's reward divided by the response's number of segments
        scale = 1.0 / max(len(segs), 1) if aggregation == "mean" else 1.0
        expected = sum(-1.0 if "red" in s.text else 1.0 for s in segs) * scale
        row_rewards = ro["rewards_placed"][i]
        assert row_rewards.sum().item() == pytest.approx(expected)
        nz = row_rewards.nonzero().flatten().tolist()
        n = int(ro["mask"][i].sum())
        if placement == "sequence":
            assert nz == ([n - 1] if expected else [])
        else:
            ids = ro["ids"][i, :n].tolist()
            _, ends = segment_token_ends(tok.decode(ids, skip_special_tokens=True), token_char_ends(tok, ids))
            want = torch.zeros(row_rewards.shape[0])
            for seg, j in zip(split_segments(text), ends):
                want[j] += (-1.0 if "red" in seg.text else 1.0) * scale
            assert torch.allclose(row_rewards.cpu(), want)
        placed_total += expected
    assert ro["stats"]["reward/total"] == pytest.approx(placed_total / len(ro["texts"]))


def test_ppo_iteration_updates_the_policy_and_first_ratio_is_one(model_dirs):
    torch.manual_seed(0)
    mod = make_module(model_dirs, max_new_tokens=16, minibatch_size=4, ppo_epochs=1,
                      optim=FGAIFModule.optim_defaults(lr=1e-3))
    batch = VisionChatCollator(mod.policy.processor, mode="generate")(prompts(3))
    ro = mod.rollout(batch)
    # before any update the policy reproduces the rollout's log-probs: ratio 1 everywhere
    logits, _ = mod.policy.response_forward(ro["prompt"], ro["ids"], ro["mask"].long())
    logp = mod._gather_logps(logits, ro["ids"], ro["mask"])
    assert torch.allclose(logp, ro["old_logp"], atol=1e-5)
    assert torch.all(ro["old_values"] == 0)     # zero-initialised value head


def test_snapshot_reference_is_the_starting_policy_after_weights_change(model_dirs):
    # what a resumed run relies on: the reference is taken in setup(), before the checkpoint
    # overwrites the policy, and later weight changes never reach it
    pol = HFPolicy(str(model_dirs["llava"]))
    batch = VisionChatCollator(pol.processor, mode="generate")(prompts())
    before = pol.forward(batch).detach()
    pol.snapshot_reference()
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(0.05)
    with pol.reference() as ref:
        assert torch.allclose(ref.forward(batch), before)
    assert not torch.allclose(pol.forward(batch), before)


class _Prompts(torch.utils.data.Dataset):
    def __init__(self, n):
        self.items = prompts(3) * (n // 3 + 1)

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return self.items[i]


def test_training_steps_run_ppo_and_log_the_step_split(model_dirs, tmp_path):
    import lightning as L

    torch.manual_seed(0)
    mod = make_module(model_dirs, max_new_tokens=12, minibatch_size=3, ppo_epochs=2,
                      optim=FGAIFModule.optim_defaults(lr=1e-3))
    before = [p.detach().clone() for p in mod.policy.trainable_parameters()]
    loader = torch.utils.data.DataLoader(_Prompts(6), batch_size=3,
                                         collate_fn=VisionChatCollator(mod.policy.processor, mode="generate"))
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(mod, loader)
    # an iteration (3 prompts) = 2 epochs x 1 minibatch of 3 = 2 optimiser steps: 8 steps, 4 iterations
    assert trainer.global_step == 8 and len(mod.history) == 4
    h = mod.history[-1]
    for key in ("reward/object", "kl", "entropy", "clip_fraction", "loss/value", "response_length",
                "health/distinct2", "time/generation_s", "time/scoring_s", "time/training_s", "rollout_tokens_per_s"):
        assert key in h and h[key] == h[key], key            # present and not NaN
    after = list(mod.policy.trainable_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert mod.value_backbone is not None and mod.value_head.weight.abs().sum() > 0


def test_fgaif_trains_through_the_cli_exports_and_resumes(world, model_dirs, tmp_path):
    # the real path: a shared fine-grained reward model trained through the CLI, then FGAIF's
    # config through the CLI, killed-and-resumed from its last checkpoint
    from pathlib import Path

    from mmalign.cli import cli_main
    from tests.test_fg_reward import _feedback_file, fit_args

    root = Path(__file__).resolve().parents[1]
    fb = {"train": _feedback_file(world, "train", tmp_path / "fb/train.jsonl"),
          "val": _feedback_file(world, "val", tmp_path / "fb/val.jsonl")}
    rm = tmp_path / "rm"
    cli_main(fit_args(world, model_dirs["llava"], fb, rm, "--trainer.max_steps", "2",
                      "--model.init_args.types", "[object, attribute, relation]"))
    rms = '{"object": "%s", "attribute": "%s", "relation": "%s"}' % ((rm / "model",) * 3)

    def fgaif(*extra):
        return cli_main(["fit", "--config", str(root / "configs/fgaif/tiny.yaml"),
                         "--trainer.default_root_dir", str(tmp_path / "ppo"), "--trainer.enable_progress_bar", "false",
                         "--trainer.callbacks", ('[{"class_path": "ModelCheckpoint", '
                         '"init_args": {"every_n_train_steps": 2, "save_last": true}}]'),
                         "--model.init_args.policy.init_args.path", str(model_dirs["llava"]),
                         "--model.init_args.export.dir", str(tmp_path / "ppo/model"),
                         "--model.init_args.reward_models", rms, "--model.init_args.max_new_tokens", "12",
                         "--model.init_args.minibatch_size", "4",
                         "--data.init_args.train_file", str(world / "train/sft.jsonl"),
                         "--data.init_args.data_root", str(world), "--data.init_args.batch_size", "4", *extra])

    first = fgaif("--trainer.max_steps", "4")            # 2 iterations x 2 epochs x 1 minibatch
    assert first.trainer.global_step == 4 and len(first.model.history) == 2
    assert (tmp_path / "ppo/model/config.json").is_file()
    assert (tmp_path / "ppo/checkpoints/last.ckpt").is_file()
    with open(tmp_path / "ppo/logs/metrics.csv") as f:
        header = f.readline()
    for key in ("train/reward/object", "train/reward/relation", "train/kl", "train/entropy", "train/clip_fraction",
                "train/loss/value", "train/time/generation_s", "train/rollout_tokens_per_s", "train/health/loop_rate"):
        assert key in header, key
    # the reward models are not in the checkpoint (frozen, loaded by path), the value model is
    state = torch.load(tmp_path / "ppo/checkpoints/last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert any(k.startswith("value_backbone.") for k in state) and not any("reward" in k for k in state)
    resumed = fgaif("--trainer.max_steps", "6", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 6 and len(resumed.model.history) == 1


def test_oracle_segment_rewards_follow_the_scene_graph(world):
    # the control's reward model: the reference caption is all correct (+1 / 0), an injected
    # hallucination turns exactly its segment's type to -1
    import json
    import random

    from mmalign.inject import inject
    from mmalign.oracle import OracleSegmentRewards, load_world_scenes
    from mmalign.rewards import SegmentItem, SegmentRewardModel

    scenes = load_world_scenes(world)
    rm = OracleSegmentRewards(scenes)
    assert isinstance(rm, SegmentRewardModel)  # the declared interface PPO checks its reward models against
    rec = next(json.loads(line) for line in (world / "train/sft.jsonl").read_text().splitlines()
               if json.loads(line)["task"] == "detailed_caption")
    image = str((world / rec["images"][0]).resolve())
    ref = rec["messages"][-1]["content"][0]["text"]
    bad = inject(ref, scenes[image], "object", random.Random(0)).text
    good_r, bad_r = rm.segment_rewards([SegmentItem(images=[image], prompt=[], response=ref, id="a"),
                                        SegmentItem(images=[image], prompt=[], response=bad, id="b")])
    assert len(good_r["object"]) == len(split_segments(ref))
    assert all(v >= 0 for t in rm.types for v in good_r[t].tolist())
    assert (bad_r["object"] == -1).sum() == 1
    assert rm.segment_rewards([SegmentItem(images=[image], prompt=[], response="  ", id="c")])[0]["object"].numel() == 0
    with pytest.raises(FileNotFoundError, match="scenes.jsonl"):
        load_world_scenes(world / "train")


# ---------------------------------------------------------------------------------------------
# the release's PPO defaults, segmentation agreement, value model from a reward model


def test_defaults_are_the_releases(model_dirs):
    """FGAIF's release: GAE gamma = lam = 1, value-loss weight 0.1, rewards not whitened, the
    released segmentation; the config says the same."""
    import inspect

    import yaml

    from mmalign.losses.ppo import gae

    sig = inspect.signature(FGAIFModule.__init__).parameters
    assert {k: sig[k].default for k in ("gamma", "lam", "vf_coef", "whiten_rewards", "segmentation", "value_init")} == {
        "gamma": 1.0, "lam": 1.0, "vf_coef": 0.1, "whiten_rewards": False, "segmentation": "released",
        "value_init": "policy"}
    assert inspect.signature(gae).parameters["lam"].default == 1.0
    from pathlib import Path

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/fgaif/tiny.yaml").read_text())
    args = cfg["model"]["init_args"]
    assert (args["gamma"], args["lam"], args["vf_coef"], args["whiten_rewards"], args["segmentation"]) == (
        1.0, 1.0, 0.1, False, "released")


def test_reward_model_of_another_segmentation_is_refused(model_dirs, monkeypatch):
    import mmalign.rewards.fine_grained as fg

    pol = HFPolicy(str(model_dirs["llava"]))
    monkeypatch.setattr(fg, "load_fg_reward_model", lambda path: KeywordRM("fine"))
    mod = FGAIFModule(pol, reward_models={"object": "rm-dir"}, value_model="shared")
    with pytest.raises(ValueError, match=r"reward model rm-dir \(object\) used segmentation 'fine' but this run "
                                         r"uses 'released'"):
        mod._load_reward_models()
    fine = FGAIFModule(pol, reward_models={"object": "rm-dir"}, value_model="shared", segmentation="fine")
    assert fine._load_reward_models()["object"].segmentation == "fine"
    with pytest.raises(ValueError, match="segmentation must be one of"):
        FGAIFModule(pol, reward_models={"object": "rm-dir"}, segmentation="sentences")


def test_value_model_starts_from_the_reward_models_backbone(model_dirs, tmp_path):
    """value_init='reward_model' loads the object reward model's backbone weights into the
    separate value model (the release's init_value_with_reward); the head still starts at 0."""
    from mmalign.methods.fg_reward import FGRewardModule, export_fg_reward_model

    torch.manual_seed(0)
    rm_mod = FGRewardModule(HFPolicy(str(model_dirs["llava"])), types=["object"])
    with torch.no_grad():                       # a "trained" backbone: every weight moved
        for p in rm_mod.policy.parameters():
            p.add_(0.01)
    export_fg_reward_model(rm_mod.policy, rm_mod.heads, rm_mod.fg_reward_config(), str(tmp_path / "rm"))
    want = {k: v.clone() for k, v in rm_mod.policy.state_dict().items()}

    pol = HFPolicy(str(model_dirs["llava"]))
    start = {k: v.clone() for k, v in pol.state_dict().items()}
    mod = FGAIFModule(pol, reward_models={"attribute": "oracle", "object": str(tmp_path / "rm")},
                      value_init="reward_model")
    assert mod.value_init_from == str(tmp_path / "rm")
    got = mod.value_backbone.state_dict()
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k]) for k in want)
    # the policy itself is untouched, and the value head starts at zero
    assert all(torch.equal(pol.state_dict()[k], start[k]) for k in start)
    assert mod.value_head.weight.abs().sum() == 0 and mod.value_head.bias.abs().sum() == 0
    # the default starts from the policy
    plain = FGAIFModule(HFPolicy(str(model_dirs["llava"])), reward_models={"object": str(tmp_path / "rm")})
    assert all(torch.equal(plain.value_backbone.state_dict()[k], start[k]) for k in start)
    with pytest.raises(ValueError, match="value_model='separate'"):
        FGAIFModule(pol, reward_models={"object": str(tmp_path / "rm")}, value_init="reward_model",
                    value_model="shared")
    with pytest.raises(ValueError, match="reward_aggregation must be 'sum' or 'mean', not 'median'"):
        FGAIFModule(pol, reward_models={"object": str(tmp_path / "rm")}, reward_aggregation="median")
    for entry in ("oracle", "judge:some/judge"):
        with pytest.raises(ValueError, match=r"reward_models\['object'\] is '" + entry + "', which has no reward-model"):
            FGAIFModule(pol, reward_models={"object": entry}, value_init="reward_model")
