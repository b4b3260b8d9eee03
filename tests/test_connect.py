"""One way a DataModule gets what only the model knows: ``datamodule.connect(**model.datamodule_args())``
(mmalign.cli.connect_data, called by the CLI once both are built); ``setup`` without it is a clear error."""

from __future__ import annotations

import pytest
import torch

from mmalign.cli import connect_data
from mmalign.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from mmalign.methods.fg_reward import FGRewardDataModule, FGRewardModule
from mmalign.methods.reward import RewardDataModule, RewardModule
from mmalign.methods.sft import SFTModule


class StubPolicy(torch.nn.Module):
    hidden_size = 4
    processor = "the processor"


@pytest.mark.parametrize("cls", [SFTDataModule, PromptDataModule, PreferenceDataModule, RewardDataModule,
                                 FGRewardDataModule])
def test_setup_without_connect_says_so(cls):
    with pytest.raises(ValueError, match=r"needs a processor.*connect\(\) was never called"):
        cls("no-such-file.jsonl").setup("fit")


def test_each_module_gives_what_its_data_module_takes():
    sft = SFTDataModule("x.jsonl")
    connect_data(SFTModule(StubPolicy()), sft)
    assert sft.processor == "the processor"

    rm = RewardDataModule("x.jsonl")
    connect_data(RewardModule(StubPolicy(), mode="scalar", critique_prompt="Q: {question} A: {answer}"), rm)
    assert (rm.processor, rm.mode, rm.critique_prompt) == ("the processor", "scalar", "Q: {question} A: {answer}")

    fg = FGRewardDataModule("x.jsonl")
    connect_data(FGRewardModule(StubPolicy(), types=["relation", "object"]), fg)
    assert fg.processor == "the processor" and fg.types == ["relation", "object"]


def test_a_mismatched_pair_names_both():
    with pytest.raises(TypeError, match=r"RewardDataModule.connect.*SFTModule.datamodule_args\(\) gives \(processor\)"):
        connect_data(SFTModule(StubPolicy()), RewardDataModule("x.jsonl"))
    with pytest.raises(TypeError, match=r"SFTDataModule.connect.*RewardModule.datamodule_args\(\) gives "
                                        r"\(critique_prompt, mode, processor\)"):
        connect_data(RewardModule(StubPolicy()), SFTDataModule("x.jsonl"))
    with pytest.raises(TypeError, match="has no datamodule_args"):
        connect_data(torch.nn.Linear(1, 1), SFTDataModule("x.jsonl"))
    connect_data(SFTModule(StubPolicy()), None)  # no data module: nothing to connect
