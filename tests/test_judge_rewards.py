"""The judge's verdicts as FGAIF's segment rewards (``judge:<folder>``): the values derived by hand
from a fixed description, the refusals, and PPO loading them."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.feedback import FeedbackError
from mmalign.methods.fgaif import FGAIFModule
from mmalign.rewards import SegmentItem, SegmentRewardModel
from models.feedback_sources import JudgeSegmentRewards, VLMJudgeSource
from models.policy import HFPolicy

DESCRIPTION = "A red circle is left of a blue square."


@pytest.fixture(scope="module")
def judge_rewards(model_dirs):
    return JudgeSegmentRewards(str(model_dirs["llava"]), batch_size=8)


def _described(monkeypatch) -> list[int]:
    """Every image is described as DESCRIPTION; returns the sizes of the judge's generate calls."""
    calls: list[int] = []

    def fake(self, pairs):
        calls.append(len(pairs))
        return [DESCRIPTION] * len(pairs)

    monkeypatch.setattr(VLMJudgeSource, "_generate", fake)
    return calls


def test_rewards_by_hand_from_the_description(judge_rewards, world, monkeypatch):
    """Against "A red circle is left of a blue square.":

    * "There is one object: a red circle." -- one segment; object circle described (+1), red circle
      described with that colour (+1), no relation (0).
    * "There is a red circle and a green star." -- one segment; the star is not described, so its
      object claim is False: object -1; attribute: red circle True, green star unverifiable (no star
      described) -> +1; relation 0.
    * "The red circle is right of the blue square." -- the description states the opposite: relation
      -1; objects and colours hold: +1, +1.
    * "" -- no segment.
    All four in one scoring call: the three non-empty responses share their image, so it is
    described once, in one generate call.
    """
    calls = _described(monkeypatch)
    image = str(next((world / "images" / "train").glob("*.png")))
    texts = ["There is one object: a red circle.", "There is a red circle and a green star.",
             "The red circle is right of the blue square.", ""]
    items = [SegmentItem(images=[image], prompt="Describe the image.", response=t, id=f"r{k}")
             for k, t in enumerate(texts)]
    got = judge_rewards.segment_rewards(items)
    want = [{"object": [1.0], "attribute": [1.0], "relation": [0.0]},
            {"object": [-1.0], "attribute": [1.0], "relation": [0.0]},
            {"object": [1.0], "attribute": [1.0], "relation": [-1.0]},
            {"object": [], "attribute": [], "relation": []}]
    assert [{t: v.tolist() for t, v in d.items()} for d in got] == want
    assert calls == [1]
    assert isinstance(judge_rewards, SegmentRewardModel) and judge_rewards.segmentation == "released"
    # one type only
    assert list(judge_rewards.segment_rewards(items[:1], types=["object"])[0]) == ["object"]


def test_an_image_that_is_not_a_path_is_refused_by_item(judge_rewards, monkeypatch):
    _described(monkeypatch)
    item = SegmentItem(images=[Image.new("RGB", (8, 8))], prompt="Describe.", response="A red circle.", id="r7")
    with pytest.raises(FeedbackError, match=r"item 'r7' needs its image as a path \(got Image\)"):
        judge_rewards.segment_rewards([item])


def test_ppo_loads_judge_entries_once_and_checks_the_folder(model_dirs, tmp_path):
    folder = str(model_dirs["llava"])
    mod = FGAIFModule(HFPolicy(folder), reward_models={t: f"judge:{folder}" for t in ("object", "attribute")})
    loaded = mod._load_reward_models()
    assert isinstance(loaded["object"], JudgeSegmentRewards) and loaded["object"] is loaded["attribute"]
    assert loaded["object"].judge.questions == "caption"
    fine = FGAIFModule(HFPolicy(folder), reward_models={"object": f"judge:{folder}"}, segmentation="fine")
    assert fine._load_reward_models()["object"].segmentation == "fine"
    with pytest.raises(FileNotFoundError, match="'judge:.*nowhere': no config.json there"):
        FGAIFModule(HFPolicy(folder), reward_models={"object": f"judge:{tmp_path}/nowhere"})._load_reward_models()


def test_the_judge_rewards_follow_the_judge_not_the_oracle(judge_rewards, world, monkeypatch):
    """A description that omits an object the scene has: the judge's reward says hallucinated
    where the oracle (ground truth) would say correct -- the rewards are the judge's."""
    from mmalign.oracle import OracleSegmentRewards, load_world_scenes

    scenes = load_world_scenes(world)
    image, scene = next(iter(scenes.items()))
    obj = scene.objects[0]
    text = f"There is a {obj.color} {obj.shape}."
    monkeypatch.setattr(VLMJudgeSource, "_generate", lambda self, pairs: ["There is nothing."] * len(pairs))
    item = SegmentItem(images=[image], prompt="Describe the image.", response=text, id="x")
    assert OracleSegmentRewards(scenes).segment_rewards([item])[0]["object"].tolist() == [1.0]
    assert judge_rewards.segment_rewards([item])[0]["object"].tolist() == [-1.0]
    assert torch.is_floating_point(judge_rewards.segment_rewards([item])[0]["object"])
