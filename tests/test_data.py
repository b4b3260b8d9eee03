"""The SFT DataModule: task filters, per-task sampling weights, a clear error without a processor;
the preference DataModule's join of reward margins by pair id (MM-DPO); the resumable train loader:
the same batches after a mid-epoch resume, with workers and under DDP."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from mmalign.data import EpochSampler, PreferenceDataModule, ResumableLoader, SFTDataModule
from mmalign.records import RecordError, read_records
from models.processors import load_processor


def module(world, **kw) -> SFTDataModule:
    dm = SFTDataModule(train_file=str(world / "train/sft.jsonl"), data_root=str(world), batch_size=8, **kw)
    return dm


def test_needs_a_processor(world):
    with pytest.raises(ValueError, match="needs a processor"):
        module(world).setup("fit")


def test_task_weights_set_each_tasks_share(world, model_dirs):
    dm = module(world, task_weights={"detailed_caption": 5.0})
    dm.connect(load_processor(model_dirs["llava"]))
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    draws = Counter()
    for epoch in range(40):
        sampler.set_epoch(epoch)  # Lightning does this at every epoch start: a new draw each epoch
        draws.update(dm.train_set.records[i].meta["task"] for i in sampler)
    total = sum(draws.values())
    # weight 5 against eight tasks at 1 (one record each per scene; one-object scenes have no
    # relation questions, ignored here): 5/13 of the draws are detailed captions, 1/13 counting
    assert draws["detailed_caption"] / total == pytest.approx(5 / 13, abs=0.03)
    assert draws["count"] / total == pytest.approx(1 / 13, abs=0.02)


def test_task_filter_and_unknown_weights(world, model_dirs):
    dm = module(world, tasks=["count"])
    dm.connect(load_processor(model_dirs["llava"]))
    dm.setup("fit")
    assert {r.meta["task"] for r in dm.train_set.records} == {"count"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and "labels" in batch
    bad = module(world, task_weights={"poetry": 2.0})
    bad.connect(load_processor(model_dirs["llava"]))
    bad.setup("fit")
    with pytest.raises(ValueError, match="poetry"):
        bad.train_dataloader()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


@pytest.fixture
def pairs_and_margins(world, tmp_path):
    """Four caption pairs as ``ref-logps`` writes them and their margins as ``rm-score`` writes
    them (every field of the pair plus the scores), in another order."""
    recs = [r for r in read_records(world / "train/sft.jsonl", "sft", data_root=world)
            if r.meta.get("task") == "detailed_caption"][:5]
    pairs = [{"id": f"p{i}", "images": recs[i].images, "prompt": recs[i].messages[:-1],
              "chosen": recs[i].messages[-1]["content"][0]["text"],
              "rejected": recs[i + 1].messages[-1]["content"][0]["text"],
              "ref_chosen_logp": -1.0 - i, "ref_rejected_logp": -2.0 - i} for i in range(4)]
    scored = [{**{k: v for k, v in p.items() if not k.startswith("ref_")}, "reward_chosen": 0.5,
               "reward_rejected": 0.5 - (i + 1) / 4, "reward_margin": (i + 1) / 4} for i, p in enumerate(pairs)]
    return (write_jsonl(tmp_path / "ref/train/pairs.jsonl", pairs),
            write_jsonl(tmp_path / "rm/scored/train/pairs.jsonl", scored[::-1]))


def preference_module(world, pairs: Path, margins: Path | None, **kw) -> PreferenceDataModule:
    dm = PreferenceDataModule(str(pairs), data_root=str(world), train_margins=margins and str(margins), **kw)
    dm.connect(object())  # setup only reads the records here; no batch is collated
    return dm


def test_margins_are_joined_by_pair_id(world, pairs_and_margins):
    pairs, margins = pairs_and_margins
    dm = preference_module(world, pairs, margins)
    dm.setup("fit")
    got = {dm.train_set[i]["meta"]["id"]: dm.train_set[i]["meta"] for i in range(len(dm.train_set))}
    assert {k: m["reward_margin"] for k, m in got.items()} == {f"p{i}": (i + 1) / 4 for i in range(4)}
    assert got["p2"]["ref_chosen_logp"] == -3.0  # the pairs' own fields stay
    assert "reward_chosen" not in got["p2"]     # only the margin is taken from the scored pairs
    # without a margins file the records are as written (plain DPO needs none)
    plain = preference_module(world, pairs, None)
    plain.setup("fit")
    assert "reward_margin" not in plain.train_set[0]["meta"]


def test_a_pair_without_a_margin_names_the_margins_file_and_the_pair(world, pairs_and_margins):
    pairs, margins = pairs_and_margins
    rows = margins.read_text().splitlines()
    margins.write_text("".join(x + "\n" for x in rows if '"id": "p1"' not in x))
    with pytest.raises(RecordError, match=rf"{re.escape(str(margins))}: no reward_margin for pair 'p1'"):
        preference_module(world, pairs, margins).setup("fit")


def test_a_margin_without_a_pair_names_the_pairs_file_and_the_pair(world, pairs_and_margins):
    pairs, margins = pairs_and_margins
    rows = pairs.read_text().splitlines()
    pairs.write_text("".join(x + "\n" for x in rows if '"id": "p3"' not in x))
    where = re.escape(f"{margins}:1")
    with pytest.raises(RecordError, match=rf"{re.escape(str(pairs))}: no pair 'p3', whose reward_margin is at {where}"):
        preference_module(world, pairs, margins).setup("fit")
    # ...unless the pairs' stage left it out on purpose and said so (ref-logps: too long)
    write_jsonl(pairs.parent / "rejects.jsonl", [{"id": "p3", "reason": "does not fit max_length=256"}])
    dm = preference_module(world, pairs, margins)
    dm.setup("fit")
    assert sorted(r.id for r in dm.train_set.records) == ["p0", "p1", "p2"]


def test_a_bad_margins_file_names_the_line(world, pairs_and_margins):
    pairs, margins = pairs_and_margins
    rows = [json.loads(x) for x in margins.read_text().splitlines()]
    rows[2]["reward_margin"] = float("nan")
    write_jsonl(margins, rows)
    with pytest.raises(RecordError, match=rf"{re.escape(str(margins))}:3: pair 'p1' has no finite 'reward_margin'"):
        preference_module(world, pairs, margins).setup("fit")
    write_jsonl(margins, [*rows[:2], rows[0]])
    with pytest.raises(RecordError, match=rf"{re.escape(str(margins))}:3: pair 'p3' scored twice"):
        preference_module(world, pairs, margins).setup("fit")


class Recorded(torch.utils.data.Dataset):
    """``range(n)`` that remembers which items were loaded (in this process)."""

    def __init__(self, n: int):
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.loaded.append(i)
        return i


def batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("weights", [None, [1.0] * 11 + [5.0] * 12])
def test_resumable_loader_continues_mid_epoch(num_workers, weights):
    def loader(seed, ds=None):
        return ResumableLoader(ds or Recorded(23), batch_size=4, sampler=EpochSampler(23, seed=seed, weights=weights),
                               num_workers=num_workers)

    ref = loader(5)
    ref.sampler.set_epoch(1)
    epoch1 = batches(ref)
    ref.sampler.set_epoch(2)
    epoch2 = batches(ref)
    assert len(epoch1) == 6 and epoch1 != epoch2  # 23 examples in 6 batches; a new order each epoch

    killed = loader(5)
    killed.sampler.set_epoch(1)
    it = iter(killed)
    seen = [next(it).tolist() for _ in range(3)]  # workers have prefetched more than these three
    state = killed.state_dict()
    assert seen == epoch1[:3] and state == {"batches": 3, "epoch": 1, "seed": 5}
    del it

    ds = Recorded(23)
    resumed = loader(999, ds)  # another seed and epoch 0: the state must override both
    resumed.load_state_dict(state)
    assert len(resumed) == 6  # Lightning counts the skipped batches as done
    assert batches(resumed) == epoch1[3:]
    if num_workers == 0:  # the skipped batches were never loaded
        assert sorted(ds.loaded) == sorted(i for b in epoch1[3:] for i in b)
    assert resumed.state_dict() == {"batches": 6, "epoch": 1, "seed": 5}
    resumed.sampler.set_epoch(2)
    assert batches(resumed) == epoch2  # the skip applies once; the next epoch is whole


def test_resumable_loader_after_a_finished_epoch_starts_the_next():
    ref = ResumableLoader(list(range(10)), batch_size=4, sampler=EpochSampler(10, seed=1))
    ref.sampler.set_epoch(4)
    epoch4 = batches(ref)
    resumed = ResumableLoader(list(range(10)), batch_size=4, sampler=EpochSampler(10, seed=1))
    resumed.load_state_dict({"batches": 3, "epoch": 3, "seed": 1})
    assert batches(resumed) == epoch4


def test_resumable_loader_under_lightnings_ddp_wrapper():
    """Under DDP Lightning wraps the sampler in a DistributedSamplerWrapper: each rank resumes
    its own shard of the same order, and set_epoch / the saved seed reach the inner sampler."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    def rank_loader(rank, seed):
        wrapped = DistributedSamplerWrapper(EpochSampler(20, seed=seed), num_replicas=2, rank=rank, shuffle=False)
        return ResumableLoader(list(range(20)), batch_size=3, sampler=wrapped)

    for rank in (0, 1):
        ref = rank_loader(rank, seed=7)
        ref.sampler.set_epoch(2)
        full = batches(ref)
        inner = EpochSampler(20, seed=7)
        inner.set_epoch(2)
        assert [i for b in full for i in b] == list(inner)[rank::2]  # this rank's shard of the order
        it = iter(ref)
        next(it), next(it)
        state = ref.state_dict()
        assert state == {"batches": 2, "epoch": 2, "seed": 7}
        resumed = rank_loader(rank, seed=0)
        resumed.load_state_dict(state)
        assert batches(resumed) == full[2:]
