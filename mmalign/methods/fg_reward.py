"""FGAIF's fine-grained reward models: object existence, attribute and relation hallucination.

FGAIF (Jing & Du 2024, "FGAIF: Aligning Large Vision-Language Models with Fine-grained AI
Feedback", arXiv:2404.05046) trains three reward models, one per hallucination type. Each is the
vision-language model with a token-classification head that reads the last layer's hidden state
at the *last token of every sub-sentence* (segment) of the response and classifies the segment
into three classes; the classes' reward values are summed into PPO's dense reward. Training is
cross-entropy on the per-segment labels that the feedback stage wrote
(``data_pipelines.feedback``: ``annotations.segments[k].labels[type]``).

Here:

* classes :data:`CLASSES` = ("hallucinated", "correct", "n/a") (the feedback stage's labels, in
  :data:`mmalign.feedback.LABELS`' order), reward values :data:`VALUES` = hallucinated -1,
  n/a 0, correct +1;
* one entry in ``types`` = one of FGAIF's separate models (the default; ``make fg-rm`` trains
  three); several entries = one shared backbone with one 3-class head per type (an option FGAIF
  does not have: one forward scores all types);
* segments are :func:`mmalign.segments.split_segments` of the response with ``segmentation``
  (the released splitter by default), checked against the records' ``annotations.segmentation``;
* the score position of segment ``k`` is its last token in the response's own tokenisation
  (:func:`mmalign.segments.char_to_token_end`), i.e. the token holding the segment's final
  character (its "," / "." for most segments), as in Fine-Grained RLHF (Wu et al. 2023), which
  rewards each sub-sentence at its final token.

What was checked in the released FGAIF code (github.com/LiqiangJing/FGAIF, as stored in the search
corpus):

* ``RLHF/models/fine_reward_model.py``: ``RewardModel`` puts ``reward_head = nn.Linear(hidden, 3)``
  (``num_labels = 3``, bias zero-initialised, weight at PyTorch's default init) on
  ``outputs.hidden_states[-1]`` at every position; ``RewardModelTrainer.compute_loss`` is
  ``F.cross_entropy(rewards.view(-1, 3), labels.view(-1), ignore_index=-100)``, i.e. the mean over
  every labelled position of the batch. One model is trained per type (``train_reward_object.sh``,
  ``..._attribute.sh``, ``..._relation.sh``; ``reward_type`` picks the label column).
* ``RLHF/data_utils/data_utils_fine_rm.py`` / ``common_utils_fine.py``: the row is
  ``"Prompt: Describe this image in detail. \\n"`` followed by the sub-sentences, each followed by
  ``</s>``; the labels are ``IGNORE_INDEX`` except at those ``</s>`` tokens, which get the
  annotated value of the type plus one (``labels[i][reward_type] + 1``, values in {-1, 0, 1}).
  The release's codes are +1 = the sub-sentence holds a hallucination of the type, 0 = clean
  (no hallucination of the type), -1 = not applicable; their class indices, code + 1, are
  therefore 0 = n/a, 1 = clean, 2 = hallucinated. Ours follow :data:`CLASSES` instead, and
  rewards are always read through :data:`VALUES` (hallucinated -1, n/a 0, correct +1), so no
  code is ever used as a reward and the order does not matter.
* Segments: the release cuts responses with Fine-Grained RLHF's sub-sentence splitter
  (``RLHF/data_utils/segment.py``), here ``segmentation: released`` (:mod:`mmalign.segments`),
  the default; ``fine`` is this project's finer object-phrase rule. The export records it.
* Two deliberate differences: we do not insert an end-of-sequence token after each segment (the
  PPO policy generates plain text, and the reward model reads the text as it is: the segment's
  own last token), and the prompt is the chat-template rendering of the record's prompt with its
  image, not FGAIF's fixed "Describe this image in detail" string.

The row a reward model reads, its head, export format and scoring are the use-time half, in
:mod:`mmalign.rewards.fine_grained` (the same encoding for training and scoring, so the two can
never disagree); the loss is :func:`mmalign.losses.fg.fg_loss`.

Loss: for each type, cross-entropy over the batch's valid segments (mean over segments; with
``class_weights="balanced"`` the weighted mean, PyTorch's ``weight=``), then the mean over types.
``"balanced"`` weighs class ``c`` of type ``t`` by ``n_t / (3 * n_{t,c})`` from the training
labels (scikit-learn's "balanced"): relation labels are ~99 % "n/a" in the demo world, and an
unweighted head learns to say "n/a" always.

Export (``export.dir``): the policy in Hugging Face format, ``fg_reward_head.safetensors`` and
``fg_reward_config.json``, in one atomic stage output;
:func:`mmalign.rewards.fine_grained.load_fg_reward_model` reads it back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset

from mmalign.data import Loaders
from mmalign.losses.fg import balanced_class_weights, fg_loss
from mmalign.methods.base import (
    OptimArgs,
    PolicyModule,
    export_policy,
    global_denominator,
)
from mmalign.policy import Policy
from mmalign.records import (
    AnnotatedResponse,
    ReadReport,
    RecordError,
    load_image,
    read_records,
)
from mmalign.records import where as record_where
from mmalign.rewards import CLASSES, VALUES, check_types
from mmalign.rewards.fine_grained import (
    CONFIG_FILE,
    FORMAT_VERSION,
    HEAD_FILE,
    SCORE_POSITION,
    check_fg_record,
    confusion,
    encode_segments,
    hallucinated_prf,
    make_head,
    segment_logits,
    segment_token_ends,
)
from mmalign.segments import DEFAULT_SEGMENTATION, Segment, check_segmentation

log = logging.getLogger(__name__)

__all__ = [
    "FGRewardCollator",
    "FGRewardDataModule",
    "FGRewardDataset",
    "FGRewardModule",
    "export_fg_reward_model",
]

ClassWeights = Literal["none", "balanced"]


@dataclass
class FGRewardCollator:
    """DataLoader ``collate_fn``: :func:`encode_segments` with labels, counting (and warning
    about) segments cut off by ``max_response_tokens``."""

    processor: Any
    max_response_tokens: int | None = 128
    segmentation: str = DEFAULT_SEGMENTATION
    segments_cut: int = field(default=0, init=False)

    def __call__(self, examples: list[dict]) -> dict:
        batch = encode_segments(self.processor, examples, self.max_response_tokens, segmentation=self.segmentation)
        if batch["segments_cut"]:
            self.segments_cut += batch["segments_cut"]
            log.warning("%d segment(s) past max_response_tokens=%d were not scored (%d so far)",
                        batch["segments_cut"], self.max_response_tokens, self.segments_cut)
        return batch


# ---------------------------------------------------------------------------------------------
# the LightningModule


class FGRewardModule(PolicyModule):
    """Train FGAIF fine-grained reward model(s) on per-segment labels (module docstring).

    Args:
        types: hallucination types, a subset of object / attribute / relation. One entry = one of
            FGAIF's separate reward models (the default, ``make fg-rm`` trains three); several =
            one shared backbone with one 3-class head per type (loss = mean over types).
        class_weights: "none" (FGAIF: plain cross-entropy) or "balanced": weigh each class by its
            inverse frequency in the training labels, ``n / (3 * n_c)`` per type, because most
            labels are "n/a" (relation: ~99 % in the demo world) and an unweighted head learns
            to predict the majority class.
        head_lr: learning rate of the heads, which start from scratch; None = ``optim.lr``.
        segmentation: how responses are cut into the segments it scores (:mod:`mmalign.segments`:
            "released", the released FGAIF / Fine-Grained RLHF splitter and the default, or
            "fine"). The training labels must have been cut the same way (the feedback stage's
            ``--segmentation``, recorded in each record: a mismatch is a record error), and the
            export records it, so PPO and the evaluation refuse to read the model's scores over
            segments cut another way.
        optim: the optimiser (:class:`~mmalign.methods.base.OptimArgs`; default lr 1e-3, warm-up
            20 steps).

    The export option is :class:`PolicyModule`'s (``**kwargs``); ``export.dir`` also receives the
    heads and ``fg_reward_config.json``.
    Logged: ``{train,val}/loss`` and per type ``{train,val}/<type>/loss`` and ``/accuracy``; at
    the end of each validation, per type ``val/<type>/precision``, ``/recall``, ``/f1`` of
    "hallucinated" from the epoch's confusion counts (not batch means).
    """

    def __init__(self, policy: Policy, types: list[str] = ["object"], class_weights: ClassWeights = "none",  # noqa: B006
                 head_lr: float | None = None, segmentation: str = DEFAULT_SEGMENTATION,
                 optim: OptimArgs = OptimArgs(lr=1e-3, warmup_steps=20), **kwargs):  # noqa: B008
        types = check_types(types)
        segmentation = check_segmentation(segmentation)
        if class_weights not in ("none", "balanced"):
            raise ValueError(f"class_weights must be 'none' or 'balanced', not {class_weights!r}")
        if head_lr is not None and not (math.isfinite(head_lr) and head_lr > 0):
            raise ValueError(f"head_lr must be a finite number > 0, got {head_lr}")
        super().__init__(policy, optim=optim, **kwargs)
        hidden = getattr(policy, "hidden_size", None)
        if not isinstance(hidden, int):
            raise TypeError(f"{type(policy).__name__} has no integer `hidden_size`: the heads need the width of the "
                            "hidden states that forward_hidden returns")
        self.types = types
        self.segmentation = segmentation
        self.heads = nn.ModuleDict({t: make_head(hidden) for t in types})
        # (K, 3); ones = unweighted. Set from the training labels in setup() for "balanced".
        self.register_buffer("class_weight", torch.ones(len(types), len(CLASSES)))
        self._weights_from_data = False
        self._val_confusion: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return next(iter(self.heads.values())).in_features

    def set_class_weights(self, weights: torch.Tensor) -> None:
        """Set the ``(K, 3)`` class weights (columns in :data:`CLASSES` order, rows in ``types``)."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != self.class_weight.shape or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"class weights must be finite, >= 0 and {tuple(self.class_weight.shape)}, got {w}")
        self.class_weight.copy_(w.to(self.class_weight.device))
        self._weights_from_data = True

    def setup(self, stage: str) -> None:
        super().setup(stage)   # refuses an export the strategy cannot give
        if stage != "fit" or self.hparams.class_weights != "balanced" or self._weights_from_data:
            return
        counts = getattr(self.trainer.datamodule, "train_class_counts", None) if self.trainer else None
        if counts is None:
            raise ValueError("class_weights='balanced' needs the training labels' class counts: use "
                             "FGRewardDataModule (train_class_counts), or call set_class_weights()")
        self.set_class_weights(balanced_class_weights(counts))
        log.info("balanced class weights (%s; columns %s): %s", self.types, CLASSES, self.class_weight.tolist())

    def datamodule_args(self) -> dict[str, Any]:
        """The processor, the types whose labels the data must hold, and the segmentation they
        must have been cut with."""
        return {**super().datamodule_args(), "types": list(self.types), "segmentation": self.segmentation}

    # -- optimisation --------------------------------------------------------------------------

    def extra_parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        # the heads start from scratch: their own learning rate
        hp = self.hparams
        return [(list(self.heads.parameters()), hp.head_lr if hp.head_lr is not None else self.optim.lr)]

    # -- steps ---------------------------------------------------------------------------------

    def _weights(self) -> torch.Tensor | None:
        return self.class_weight if self.hparams.class_weights == "balanced" else None

    def _step(self, batch: dict, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = segment_logits(self.policy, self.heads, batch, self.types)
        labels = batch["segment_labels"]
        # global_denominator: each type's mean is over the labelled segments of the global batch,
        # not of this rank's (the ranks hold different numbers of them)
        loss, per = fg_loss(logits, labels, self.types, self._weights(), denominator=global_denominator)
        n_rows = batch["response_ids"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n_rows, sync_dist=True)
        for t, m in per.items():
            n = int(m["n"])
            if n:
                self.log(f"{stage}/{t}/loss", m["loss"], batch_size=n)
                self.log(f"{stage}/{t}/accuracy", m["accuracy"], batch_size=n, prog_bar=len(self.types) == 1)
        return loss, logits

    def training_step(self, batch: dict, batch_idx: int):
        return self._step(batch, "train")[0]

    def on_validation_epoch_start(self) -> None:
        self._val_confusion = torch.zeros(len(self.types), len(CLASSES), len(CLASSES), dtype=torch.long)

    def validation_step(self, batch: dict, batch_idx: int):
        loss, logits = self._step(batch, "val")
        with torch.no_grad():
            for k, t in enumerate(self.types):
                self._val_confusion[k] += confusion(logits[t], batch["segment_labels"][..., k]).cpu()
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._val_confusion is None:
            return
        for k, t in enumerate(self.types):
            m = hallucinated_prf(self._val_confusion[k])
            for name in ("precision", "recall", "f1"):
                if math.isfinite(m[name]):
                    self.log(f"val/{t}/{name}", m[name])
            self.log(f"val/{t}/support_hallucinated", m["support"])

    # -- export --------------------------------------------------------------------------------

    def fg_reward_config(self) -> dict:
        """What ``fg_reward_config.json`` holds."""
        return {"format_version": FORMAT_VERSION, "types": list(self.types), "classes": list(CLASSES),
                "values": dict(VALUES), "hidden_size": self.hidden_size,
                "policy_class": f"{type(self.policy).__module__}.{type(self.policy).__qualname__}",
                "class_weights": self.hparams.class_weights, "class_weight": self.class_weight.tolist(),
                "score_position": SCORE_POSITION, "segmentation": self.segmentation}

    def export(self, out_dir: str) -> None:
        export_fg_reward_model(self.policy, self.heads, self.fg_reward_config(), out_dir,
                               self.export_args.merge_lora)


def export_fg_reward_model(policy: Policy, heads: nn.ModuleDict, config: dict, out_dir: str,
                           merge_lora: bool = True) -> None:
    """Write the policy (Hugging Face format), ``fg_reward_head.safetensors`` and
    ``fg_reward_config.json`` to ``out_dir`` as one stage output (manifest last, swapped in whole)."""
    export_policy(policy, out_dir, merge_lora, heads=heads, head_file=HEAD_FILE, config_file=CONFIG_FILE,
                  config=config, what="fg_reward")


# ---------------------------------------------------------------------------------------------
# data


class FGRewardDataset(Dataset):
    """Annotated responses with their per-segment class indices, as :func:`encode_segments`
    examples; images are decoded lazily, with the record's ``file:line`` in any error."""

    def __init__(self, records: list[AnnotatedResponse], segments: list[list[Segment]], labels: list[list[list[int]]]):
        self.records, self.segments, self.labels = records, segments, labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        where = r.meta.get("source", r.id)
        return {"images": [load_image(p, where) for p in r.images], "prompt": r.prompt, "response": r.response,
                "segments": self.segments[i], "labels": self.labels[i], "meta": {"id": r.id, "source": where}}


class FGRewardDataModule(Loaders, L.LightningDataModule):
    """Per-segment labels for fine-grained reward models, from the feedback stage's
    ``feedback.jsonl`` (annotated-response records).

    Args:
        train_file: feedback JSONL to train on.
        val_file: optional held-out feedback JSONL (e.g. the oracle's labels of val-split samples).
        data_root: folder image paths are relative to, and must stay inside (default: each
            file's folder).
        limit: use at most this many training responses (0 = all).
        val_limit: use at most this many validation responses (0 = all).
        batch_size: responses per step.
        num_workers: DataLoader worker processes (0 is fastest on 2 cores with 64 px images).
        max_response_tokens: longest response in tokens (eos included); segments past the cut are
            not scored (a warning with a count).
        check_images: "exists", "decode" (find corrupt images up front) or "none".
        on_error: "raise" at the first malformed record (bad JSON or schema, missing images,
            segments that do not tile the response or that share their last token), or "skip"
            it (counted in ``skipped``, with a warning; read errors also go to
            ``<file>.rejects.jsonl``). Either way this happens in ``setup``, never mid-training.

    The types, the segmentation and the processor are the :class:`FGRewardModule`'s, given by
    :meth:`connect`, so data and model never disagree: a record whose labels were cut with another
    segmentation (``annotations.segmentation``) is a record error.
    A training file in which a type has no segment labelled "hallucinated" is an error: the head
    would learn a constant.
    """

    def __init__(self, train_file: str, val_file: str | None = None, data_root: str | None = None, limit: int = 0,
                 val_limit: int = 0, batch_size: int = 8, num_workers: int = 0, max_response_tokens: int = 128,
                 check_images: Literal["none", "exists", "decode"] = "exists",
                 on_error: Literal["raise", "skip"] = "raise"):
        super().__init__()
        self.save_hyperparameters()
        self.processor: Any = None
        self.types: list[str] | None = None
        self.segmentation: str = DEFAULT_SEGMENTATION
        self.collator: FGRewardCollator | None = None
        self.train_set: FGRewardDataset | None = None
        self.val_set: FGRewardDataset | None = None
        #: ``(K, 3)`` training label counts (rows = types, columns = CLASSES), set by setup().
        self.train_class_counts: torch.Tensor | None = None
        self.skipped: dict[str, int] = {}

    def connect(self, processor: Any, types: Sequence[str], segmentation: str = DEFAULT_SEGMENTATION) -> None:
        """Take what the data need from the model (:meth:`FGRewardModule.datamodule_args`): the
        policy's processor, the hallucination types and the segmentation. The mmalign CLI calls
        ``datamodule.connect(**model.datamodule_args())`` once both are built; outside it, call
        this before ``setup``."""
        self.processor, self.types = processor, check_types(types)
        self.segmentation = check_segmentation(segmentation)

    def _read(self, path: str, limit: int, train: bool) -> FGRewardDataset:
        hp = self.hparams
        rep = ReadReport(path)
        recs = read_records(path, "annotated", data_root=hp.data_root, check_images=hp.check_images,
                            on_error=hp.on_error, report=rep)
        skipped = rep.rejected
        if rep.rejected:
            log.warning("%s: %d malformed record(s) skipped, see %s", path, rep.rejected, rep.rejects_path)
        if limit:
            recs = recs[:limit]
        kept, segments, labels = [], [], []
        tok = self.processor.tokenizer
        for r in recs:
            try:
                s, lab = check_fg_record(r, self.types, self.segmentation)
                # every segment must have a token of its own: found here, not mid-training
                where = record_where(r.meta, r.id)
                segment_token_ends(tok, r.response, s, where)
            except RecordError as e:
                if hp.on_error == "raise":
                    raise
                skipped += 1
                log.warning("skipped: %s", e)
                continue
            kept.append(r)
            segments.append(s)
            labels.append(lab)
        self.skipped[path] = skipped
        if not kept:
            raise ValueError(f"{path}: no usable annotated responses")
        if train:
            counts = torch.zeros(len(self.types), len(CLASSES), dtype=torch.long)
            for lab in labels:
                counts += torch.nn.functional.one_hot(torch.tensor(lab), len(CLASSES)).sum(0)
            for k, t in enumerate(self.types):
                if counts[k, 0] == 0:
                    sources = sorted({str(r.annotations.get("source", "unknown")) for r in kept})
                    raise ValueError(f"{path}: no segment is labelled hallucinated for {t} (source "
                                     f"{', '.join(sources)}): a reward model trained on it would learn a constant")
            self.train_class_counts = counts
            log.info("%s: %d responses; label counts per type (%s): %s", path, len(kept), CLASSES,
                     {t: counts[k].tolist() for k, t in enumerate(self.types)})
        return FGRewardDataset(kept, segments, labels)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.processor is None or self.types is None:
            raise ValueError("FGRewardDataModule needs a processor and the types: connect() was never called (the "
                             "mmalign CLI calls datamodule.connect(**model.datamodule_args()) with an FGRewardModule; "
                             "outside it, call connect(processor, types) before setup)")
        if self.collator is None:
            self.collator = FGRewardCollator(self.processor, hp.max_response_tokens, self.segmentation)
        if self.train_set is None:
            self.train_set = self._read(hp.train_file, hp.limit, train=True)
        if self.val_set is None and hp.val_file:
            self.val_set = self._read(hp.val_file, hp.val_limit, train=False)
