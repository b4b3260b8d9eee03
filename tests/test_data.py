"""The SFT DataModule: task filters, per-task sampling weights, a clear error without a processor."""

from __future__ import annotations

from collections import Counter

import pytest

from mmalign.data import SFTDataModule
from models.processors import load_processor


def module(world, **kw) -> SFTDataModule:
    dm = SFTDataModule(train_file=str(world / "train/sft.jsonl"), data_root=str(world), batch_size=8, **kw)
    return dm


def test_needs_a_processor(world):
    with pytest.raises(ValueError, match="needs a processor"):
        module(world).setup("fit")


def test_task_weights_set_each_tasks_share(world, model_dirs):
    dm = module(world, task_weights={"detailed_caption": 5.0})
    dm.set_processor(load_processor(model_dirs["llava"]))
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    draws = Counter()
    for _ in range(40):
        draws.update(dm.train_set.records[i].meta["task"] for i in sampler)
    total = sum(draws.values())
    # weight 5 against five tasks at 1: half of the draws are detailed captions
    assert draws["detailed_caption"] / total == pytest.approx(0.5, abs=0.03)
    assert draws["count"] / total == pytest.approx(0.1, abs=0.02)


def test_task_filter_and_unknown_weights(world, model_dirs):
    dm = module(world, tasks=["count"])
    dm.set_processor(load_processor(model_dirs["llava"]))
    dm.setup("fit")
    assert {r.meta["task"] for r in dm.train_set.records} == {"count"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and "labels" in batch
    bad = module(world, task_weights={"poetry": 2.0})
    bad.set_processor(load_processor(model_dirs["llava"]))
    bad.setup("fit")
    with pytest.raises(ValueError, match="poetry"):
        bad.train_dataloader()
