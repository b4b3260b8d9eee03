"""Datasets and the Lightning DataModule for chat-format vision data."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmalign.collators import PairLayout, PreferenceCollator, VisionChatCollator
from mmalign.records import (
    ReadReport,
    RecordError,
    iter_jsonl,
    load_image,
    message_text,
    read_records,
)

log = logging.getLogger(__name__)


class _RecordDataset(Dataset):
    """Records held in a list; each item decodes its images lazily, with the record's
    ``file:line`` (its ``source``) in any error."""

    def __init__(self, records: list):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def _load(r) -> tuple[str, list]:
        where = r.meta.get("source", r.id)
        return where, [load_image(p, where) for p in r.images]


class ChatDataset(_RecordDataset):
    """SFT records (:class:`~mmalign.records.SFTRecord`) as collator examples."""

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        where, images = self._load(r)
        return {
            "images": images,
            "messages": r.messages,
            "meta": {"id": r.id, "source": where, **{k: v for k, v in r.meta.items() if k != "source"}},
        }


def default_seed() -> int:
    """The seed training order derives from: Lightning's ``seed_everything`` seed (the one it also
    gives the DistributedSampler it injects), else torch's initial seed (random when unseeded)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else torch.initial_seed()


class EpochSampler(Sampler[int]):
    """Training order as a function of ``(seed, epoch)`` only, so a resumed run can rebuild the
    order of the epoch it was killed in; the global RNG is never touched.

    Without ``weights``: a permutation of ``range(n)`` (each example once an epoch). With
    ``weights``: ``n`` draws with replacement, example ``i`` with probability ``weights[i] /
    sum(weights)`` (what WeightedRandomSampler does, but reproducible per epoch).

    Like torch's DistributedSampler, the order changes only when ``set_epoch`` is called (Lightning
    calls it at every epoch start, and forwards it through the DistributedSamplerWrapper it puts
    around this sampler under DDP); two passes without it give the same order.
    """

    def __init__(self, n: int, seed: int | None = None, weights: Sequence[float] | None = None):
        if weights is not None and len(weights) != n:
            raise ValueError(f"{len(weights)} weights for {n} examples")
        self.n = n
        self.seed = default_seed() if seed is None else int(seed)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        # DistributedSampler's seed + epoch: a fresh, independent order each epoch.
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        yield from order.tolist()


class _SkipBatches:
    """The loader's index sampler minus the batches its checkpoint says were already trained on:
    only index lists are skipped, no example is loaded or collated for them."""

    def __init__(self, loader: ResumableLoader, inner: Any):
        self.loader, self.inner = loader, inner

    def __len__(self) -> int:
        return len(self.inner)  # the full epoch: Lightning counts the skipped batches as done

    def __iter__(self) -> Iterator[Any]:
        # A generator, so the skip is read when the first index is drawn: after Lightning has
        # loaded the loader's state and called set_epoch.
        skip, self.loader._skip = self.loader._skip, 0
        for n, indices in enumerate(self.inner):
            if n >= skip:
                yield indices


class ResumableLoader(DataLoader):
    """A DataLoader whose place inside an epoch is saved in Lightning checkpoints.

    Lightning puts ``state_dict()`` of every stateful train loader into a checkpoint and hands
    it back to ``load_state_dict`` on ``--ckpt_path``; a plain DataLoader has neither, so a run
    resumed mid-epoch would restart the epoch from its first batch (with a new order). Here the
    state is the sampler's seed and epoch and how many batches of the epoch were handed out; on
    resume the sampler rebuilds the same order (see EpochSampler) and the batches already trained
    on are skipped by index. Batches are counted where they leave the loader, after any worker
    prefetching, so workers do not shift the count; under DDP the skip applies to this rank's
    batches, after the DistributedSamplerWrapper has sharded the order.
    """

    _skip = 0     # batches to skip at the start of the next pass (set by load_state_dict)
    _served = 0   # batches of the current pass handed out (skipped ones included)

    @property
    def _index_sampler(self):
        # torch's iterators draw every batch's indices from this property (the batch sampler):
        # wrapping it is the one place a skip costs nothing and keeps len() the full epoch.
        return _SkipBatches(self, super()._index_sampler)

    def __iter__(self):
        self._served = self._skip
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def _sampler_obj(self) -> Any:
        # under DDP Lightning wraps our sampler in a DistributedSamplerWrapper (``.dataset._sampler``)
        wrapped = getattr(getattr(self.sampler, "dataset", None), "_sampler", None)
        return wrapped if isinstance(wrapped, EpochSampler) else self.sampler

    def state_dict(self) -> dict[str, Any]:
        s = self._sampler_obj()
        return {"batches": self._served, "epoch": getattr(s, "epoch", None), "seed": getattr(s, "seed", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self._sampler_obj()
        if state.get("seed") is not None and isinstance(s, EpochSampler):
            s.seed = int(state["seed"])  # the killed run's order even if the seed option changed
        done = state.get("batches", 0) >= len(self)
        # A finished pass resumes at the next epoch's start; set the epoch here too, because
        # worker processes draw their first indices before Lightning calls set_epoch.
        if state.get("epoch") is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(state["epoch"] + done)
        self._skip = 0 if done else int(state.get("batches", 0))


class Loaders:
    """The train / val DataLoaders every DataModule here builds the same way: ``train_set`` and
    ``val_set`` with ``self.collator``, ``hparams.batch_size`` and ``hparams.num_workers``;
    ``_sampler()`` may replace uniform shuffling for training (task weights).

    The train loader is resumable: its order is a function of (seed, epoch) and its position is
    in every checkpoint, so a run killed mid-epoch and resumed with ``--ckpt_path last`` sees
    exactly the batches an uninterrupted run would have (see ResumableLoader).
    """

    def _sampler(self) -> EpochSampler | None:
        return None

    def _loader(self, ds: Dataset, shuffle: bool, sampler=None) -> DataLoader:
        cls = ResumableLoader if shuffle else DataLoader
        if shuffle and sampler is None:
            sampler = EpochSampler(len(ds))
        return cls(ds, batch_size=self.hparams.batch_size, sampler=sampler,
                   num_workers=self.hparams.num_workers, collate_fn=self.collator,
                   persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, sampler=self._sampler())

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []


class _RecordDataModule(Loaders, L.LightningDataModule):
    """What the record-file DataModules share: reading (malformed records skipped into a
    rejects file or raised, per ``on_error``), the processor of the trained policy (given by
    :meth:`connect`), and the loaders. Subclasses say which record kind, dataset and collator."""

    kind = ""

    def __init__(self):
        super().__init__()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.collator: Any = None
        self.processor: Any = None

    def connect(self, processor: Any) -> None:
        """Take what the data need from the model: the policy's processor, so data and model can
        never disagree on tokens. The mmalign CLI calls ``datamodule.connect(**model.datamodule_args())``
        once both are built; outside it, call ``connect(policy.processor)`` before ``setup``."""
        self.processor = processor

    def _records(self, path: str) -> list:
        hp = self.hparams
        rep = ReadReport(path)
        recs = read_records(path, self.kind, data_root=hp.data_root, check_images=hp.check_images,
                            on_error=hp.on_error, report=rep)
        if rep.rejected:
            log.warning("%s: %d malformed record(s) skipped, see %s", path, rep.rejected, rep.rejects_path)
        return recs

    def _read(self, path: str) -> Dataset:
        raise NotImplementedError

    def _make_collator(self) -> Any:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.collator is None:
            if self.processor is None:
                raise ValueError(f"{type(self).__name__} needs a processor: connect() was never called (the mmalign "
                                 "CLI calls datamodule.connect(**model.datamodule_args()); outside it, call "
                                 "connect(policy.processor) before setup)")
            self.collator = self._make_collator()
        if self.train_set is None:
            self.train_set = self._read(hp.train_file)
            if hp.limit:
                self.train_set.records = self.train_set.records[: hp.limit]
        if self.val_set is None and hp.val_file:
            self.val_set = self._read(hp.val_file)



class SFTDataModule(_RecordDataModule):
    """Visual instruction tuning data from JSONL files of SFT records.

    Args:
        train_file: JSONL of SFT records (TRL conversational vision format).
        val_file: optional held-out JSONL for validation loss.
        data_root: folder that image paths are relative to (default: each file's folder).
        tasks: keep only records whose ``task`` field is in this list (all when empty).
        task_weights: sampling weight per ``task`` (tasks not named weigh 1). Training then
            draws examples with replacement so that each task's share of the draws is its weight
            over the sum of weights, whatever its record count: ``{detailed_caption: 5}`` with
            the five other tasks at 1 makes half of the examples detailed captions.
        limit: use at most this many training records (0 = all), for quick runs.
        batch_size: examples per step.
        num_workers: DataLoader worker processes (0 keeps everything in the main process,
            the fastest choice on 2 cores with 64 px images).
        max_length: longest sequence in tokens, image tokens included.
        train_on: "all" assistant turns carry loss, or only the "last" one.
        on_overlength: "drop" over-long examples with a warning and a count, or "error".
        check_images: "exists", "decode" (find corrupt images up front) or "none".
        on_error: "raise" at the first malformed record, or "skip" it into a rejects file.

    The processor is the policy's own, given by :meth:`connect`, so data and model can never
    disagree on tokens.
    """

    kind = "sft"

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        data_root: str | None = None,
        tasks: list[str] | None = None,
        task_weights: dict[str, float] | None = None,
        limit: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        max_length: int = 512,
        train_on: Literal["all", "last"] = "all",
        on_overlength: Literal["drop", "error"] = "drop",
        check_images: Literal["none", "exists", "decode"] = "exists",
        on_error: Literal["raise", "skip"] = "raise",
    ):
        super().__init__()
        self.save_hyperparameters()

    def _read(self, path: str) -> ChatDataset:
        hp = self.hparams
        recs = self._records(path)
        if hp.tasks:
            recs = [r for r in recs if r.meta.get("task") in hp.tasks]
        if not recs:
            raise ValueError(f"{path}: no records left (tasks filter {hp.tasks})")
        return ChatDataset(recs)

    def _make_collator(self) -> VisionChatCollator:
        hp = self.hparams
        return VisionChatCollator(self.processor, max_length=hp.max_length, mode="train", train_on=hp.train_on,
                                  on_overlength=hp.on_overlength)

    def _sampler(self) -> EpochSampler | None:
        weights = self.hparams.task_weights
        if not weights:
            return None
        recs = self.train_set.records
        counts = Counter(r.meta.get("task") for r in recs)
        unknown = set(weights) - set(counts)
        if unknown:
            raise ValueError(f"task_weights names tasks absent from {self.hparams.train_file}: {sorted(unknown)}")
        # Each task's share of draws is proportional to its weight, whatever its record count.
        w = [weights.get(r.meta.get("task"), 1.0) / counts[r.meta.get("task")] for r in recs]
        return EpochSampler(len(recs), weights=w)


class PromptDataset(_RecordDataset):
    """SFT records as prompts only (assistant turns dropped), for on-policy sampling; ``meta``
    keeps the record's fields, its resolved ``image_paths`` and ``prompt_messages`` (reward
    models re-read them to score a response)."""

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        where, images = self._load(r)
        prompt = [m for m in r.messages if m["role"] != "assistant"]
        return {
            "images": images,
            "messages": prompt,
            "meta": {**{k: v for k, v in r.meta.items() if k != "source"}, "id": r.id, "source": where,
                     "image_paths": [str(p) for p in r.images], "prompt_messages": prompt},
        }


class PromptDataModule(_RecordDataModule):
    """Prompts (image + question) for on-policy RL from JSONL files of SFT records: each distinct
    (images, question) once, the reference answer dropped; batches are left-padded for generation.

    Args:
        train_file: JSONL of SFT records; their user turns are the prompts.
        val_file: optional held-out prompts (unused by methods that validate by probing).
        data_root: folder that image paths are relative to (default: each file's folder).
        tasks: keep only records whose ``task`` is in this list (all when empty).
        limit: use at most this many prompts (0 = all).
        batch_size: prompts per rollout.
        num_workers: DataLoader worker processes.
        max_length: longest prompt in tokens, image tokens included.
        check_images: "exists", "decode" (find corrupt images up front) or "none".
        on_error: "raise" at the first malformed record, or "skip" it into a rejects file.
    """

    kind = "sft"

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        data_root: str | None = None,
        tasks: list[str] | None = None,
        limit: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        max_length: int = 512,
        check_images: Literal["none", "exists", "decode"] = "exists",
        on_error: Literal["raise", "skip"] = "raise",
    ):
        super().__init__()
        self.save_hyperparameters()

    def _read(self, path: str) -> PromptDataset:
        hp = self.hparams
        seen, recs = set(), []
        for r in self._records(path):
            if hp.tasks and r.meta.get("task") not in hp.tasks:
                continue
            key = (tuple(r.images), tuple(message_text(m) for m in r.messages if m["role"] == "user"))
            if key not in seen:
                seen.add(key)
                recs.append(r)
        if not recs:
            raise ValueError(f"{path}: no prompts left (tasks filter {hp.tasks})")
        return PromptDataset(recs)

    def _make_collator(self) -> VisionChatCollator:
        return VisionChatCollator(self.processor, max_length=self.hparams.max_length, mode="generate",
                                  on_overlength="error")


class PreferenceDataset(_RecordDataset):
    """Preference records (:class:`~mmalign.records.PreferenceRecord`) as
    :class:`~mmalign.collators.PreferenceCollator` examples. ``meta`` carries the record's extra
    fields (reward margins, precomputed reference log-probs, scores) with ``id`` and ``source``."""

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        where, images = self._load(r)
        extra = {"rejected_images": [load_image(p, where) for p in r.rejected_images]} if r.rejected_images else {}
        return {
            **extra,
            "images": images,
            "prompt": r.prompt,
            "chosen": message_text(r.chosen[0]),
            "rejected": message_text(r.rejected[0]),
            "meta": {**{k: v for k, v in r.meta.items() if k != "source"}, "id": r.id, "source": where,
                     "score_chosen": r.score_chosen, "score_rejected": r.score_rejected},
        }


#: the field a margins file gives each pair (MM-DPO's delta, written by data_pipelines.score_rm)
MARGIN_KEY = "reward_margin"


def read_margins(path: str) -> dict[str, tuple[float, int]]:
    """``{pair id: (reward_margin, line)}`` from a JSONL of scored pairs (``make rm-score``'s
    ``rm/scored/<split>/pairs.jsonl``; only ``id`` and ``reward_margin`` are read). A line without
    an id or a finite margin, or an id given twice, is an error naming ``file:line``."""
    out: dict[str, tuple[float, int]] = {}
    for lineno, obj, err in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if err:
            raise RecordError(f"{where}: {err}")
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
            raise RecordError(f"{where}: a margins record needs a string 'id' (the pair it scores)")
        m = obj.get(MARGIN_KEY)
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise RecordError(f"{where}: pair {obj['id']!r} has no finite '{MARGIN_KEY}' (got {m!r})")
        if obj["id"] in out:
            raise RecordError(f"{where}: pair {obj['id']!r} scored twice (first at line {out[obj['id']][1]})")
        out[obj["id"]] = (float(m), lineno)
    return out


def stage_rejected_ids(pairs_path: str) -> set[str]:
    """Ids of the pairs the stage that wrote ``pairs_path`` left out on purpose and listed in
    ``rejects.jsonl`` beside it (``ref-logps``: pairs over ``--max-length``)."""
    rejects = os.path.join(os.path.dirname(os.path.abspath(pairs_path)), "rejects.jsonl")
    if not os.path.exists(rejects):
        return set()
    return {obj["id"] for _, obj, err in iter_jsonl(rejects)
            if not err and isinstance(obj, dict) and isinstance(obj.get("id"), str)}


def join_margins(records: list, pairs_path: str, margins_path: str, strict: bool = True) -> None:
    """Give every preference record of ``pairs_path`` its ``reward_margin`` from ``margins_path``,
    joined by pair id (in place; a margin already in a record is replaced).

    MM-DPO's two inputs are made by separate stages from the same ``prefs`` pairs: the reference
    log-probs (``ref-logps``) and the critique reward model's margins (``rm-score``). The join is
    checked both ways: a pair without a margin, or a margin whose pair is not in ``pairs_path``
    (unless the pairs' stage listed it in its ``rejects.jsonl``), is a :class:`RecordError` naming
    the file that lacks it and the pair id: the two files would come from different pairs.
    ``strict=False`` (records skipped as malformed, ``on_error: skip``) only warns on the second."""
    margins = read_margins(margins_path)
    for r in records:
        if r.id not in margins:
            raise RecordError(f"{margins_path}: no {MARGIN_KEY} for pair {r.id!r} "
                              f"({r.meta.get('source', pairs_path)}); the margins must score the same pairs")
        r.meta[MARGIN_KEY] = margins[r.id][0]
    have = {r.id for r in records}
    orphans = [i for i in margins if i not in have]
    if orphans:
        orphans = [i for i in orphans if i not in stage_rejected_ids(pairs_path)]
    if orphans:
        i = orphans[0]
        msg = (f"{pairs_path}: no pair {i!r}, whose {MARGIN_KEY} is at {margins_path}:{margins[i][1]} "
               f"({len(orphans)} margin(s) without a pair); the margins must score the same pairs")
        if strict:
            raise RecordError(msg)
        log.warning("%s", msg)


class PreferenceDataModule(_RecordDataModule):
    """Preference pairs (``chosen`` preferred over ``rejected`` for one image + prompt) from
    JSONL files of preference records (TRL's vision preference format, see
    :class:`mmalign.records.PreferenceRecord`; ``make prefs`` writes them).

    Args:
        train_file: JSONL of preference records.
        val_file: optional held-out JSONL for validation loss / reward accuracy.
        train_margins: optional JSONL of scored pairs (``make rm-score``'s
            ``rm/scored/train/pairs.jsonl``) whose ``reward_margin`` is joined into ``train_file``'s
            pairs by id, for MM-DPO's Dynamic Reward Scaling (see :func:`join_margins`).
        val_margins: the same for ``val_file``.
        data_root: folder that image paths are relative to (default: each file's folder).
        limit: use at most this many training pairs (0 = all), for quick runs.
        batch_size: pairs per step (each pair is two sequences).
        num_workers: DataLoader worker processes.
        max_length: longest sequence in tokens (image tokens + prompt + one answer).
        layout: "shared_prompt" encodes each image and prompt once per pair and scores both
            answers on the prompt's KV cache (faster; decoder-only families with 1-D positions);
            "concat" runs chosen and rejected as two full rows (any family; what TRL does).
            Both give the same log-probs (see PreferenceCollator).
        on_overlength: "drop" over-long pairs with a warning and a count, or "error".
        check_images: "exists", "decode" (find corrupt images up front) or "none".
        on_error: "raise" at the first malformed record, or "skip" it into a rejects file.
    """

    kind = "preference"

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        data_root: str | None = None,
        train_margins: str | None = None,
        val_margins: str | None = None,
        limit: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        max_length: int = 512,
        layout: PairLayout = "shared_prompt",
        on_overlength: Literal["drop", "error"] = "drop",
        check_images: Literal["none", "exists", "decode"] = "exists",
        on_error: Literal["raise", "skip"] = "raise",
    ):
        super().__init__()
        self.save_hyperparameters()

    def _read(self, path: str) -> PreferenceDataset:
        hp = self.hparams
        recs = self._records(path)
        if not recs:
            raise ValueError(f"{path}: no preference records")
        margins = hp.train_margins if path == hp.train_file else hp.val_margins
        if margins:
            join_margins(recs, path, margins, strict=hp.on_error == "raise")
        return PreferenceDataset(recs)

    def _make_collator(self) -> PreferenceCollator:
        hp = self.hparams
        return PreferenceCollator(self.processor, max_length=hp.max_length, layout=hp.layout,
                                  on_overlength=hp.on_overlength)
