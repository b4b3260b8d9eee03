"""Reward models: MM-RLHF's critique-based reward model, and the scalar Bradley-Terry baseline.

Critique-based (``mode="critique"``; Zhang et al. 2025, "MM-RLHF: The Next Step Forward in
Multimodal LLM Alignment"): the vision-language model is asked to critique an answer,

    user:      <image> + critique_prompt.format(question=q, answer=a)
    assistant: <critique>

and a score head reads the last layer's hidden state at the *end of the critique* (the last
labelled token of the row: the critique's last token, or the chat template's end-of-turn token
after it). Training teacher-forces the reference critique of each response and adds

    loss = lm_weight * LM + bt_weight * (BT + tie_weight * TIE) + center_weight * mean((s_c + s_r)^2)

    LM  = NLL_example(chosen critique) + NLL_example(rejected critique)
    BT  = mean over untied pairs b of -log sigma(s_c - s_r - m_b)
          (m_b = margin_scale * max(0, score_chosen - score_rejected))
    TIE = mean over tied pairs of (s_c - s_r)^2

with ``NLL_example`` the mean over pairs of each critique's mean token NLL. A pair is tied when
its record has ``is_tie: true`` (the annotators ranked the two responses equal;
``data_pipelines.import_mmrlhf`` writes them to ``ties.jsonl``, and the release's
``dpo_pairs.jsonl`` may mix them into its pairs): Bradley-Terry has no preference to fit there,
so the two scores are pulled together instead; their critiques still get the LM loss. At inference the model
writes its own critique (greedy), then one forward over prompt + critique gives the score.

Scalar (``mode="scalar"``): the classic Bradley-Terry reward model (Ouyang et al. 2022,
"Training language models to follow instructions with human feedback"): user <image> + question,
assistant <answer>, the head reads the answer's last labelled token; BT loss only.

What was checked in the MM-RLHF code (github.com/yfzhang114/MM-RLHF, as stored in the search
corpus under julyanghar/MM-RLHF):

* ``llava/train/train_dpo.py``: ``make_conv_rm(prompt, answer, reason)`` builds the training
  conversation: human = ``<image>\\n`` + the evaluator prompt (:data:`MMRLHF_CRITIQUE_PROMPT`, with
  ``[Question]`` and ``[LMM Response]``), gpt = the critique (``chosen_reason`` /
  ``rejected_reason``, the human annotation expanded into a critique); labels cover the gpt turn
  only. A pair without reasons falls back to the plain (question, answer) conversation and its LM
  loss is switched off (``no_critic``); here a critique-mode record without reference critiques is
  an error instead (name the file and line), and the scalar mode is the no-critique model.
* ``llava/model/language_model/llava_qwen.py`` (``rm_forward``): one forward with labels gives the
  LM loss (``outputs.loss``) and ``hidden_states[-1]``; the reward is ``rm_head(hidden)`` at
  ``attention_mask.cumsum(-1)[:, -1] - 1``, the last non-padding token (right padding), i.e. the
  end of the critique turn. ``rm_head`` is ``RewardHead``: dropout, Linear(H, H), tanh, dropout,
  Linear(H, 1) (``head="mlp"`` here; ``head="linear"`` is one Linear(H, 1)).
* ``trl/trainer/reward_trainer.py`` (``compute_loss``): ``float_rewards_weight * -logsigmoid(c - r
  [- margin]) + center_rewards_coefficient * mean((c + r)^2) + critic_rewards_weight *
  (LM_chosen + LM_rejected)``, the Bradley-Terry mean over the untied pairs only and
  ``tie_weight * mean((c - r)^2)`` over the tied ones (``is_tie``) added before the
  ``float_rewards_weight`` factor, as ``bt_weight * (BT + tie_weight * TIE)`` here. The release
  reads ``self.args.tie_weight`` but its ``TrainingArguments`` (``train_dpo.py``) defines no such
  field, so it gives no value: ``tie_weight`` defaults to 1.0 here (our choice: the two losses
  on one footing). ``scripts/train/critic_reward_7b.sh``: lr 1e-6,
  cosine, warm-up ratio 0.1, 1 epoch, batch 1 x 24 accumulation, ``critic_rewards_weight 1.0``,
  ``float_rewards_weight 1.0``, ``center_rewards_coefficient 0.01``. With one pair per device
  step, ``outputs.loss`` is one critique's token mean, so the LM term is the per-example mean
  ("example" normalisation) summed over the two sides, as above.
* ``llava/eval/eval_mm_reward_bench.py``: inference generates the critique (greedy by default,
  ``temperature 0``), re-renders the conversation with it as the assistant turn and reads the
  reward with ``rm_forward``; options score with the reference critique instead
  (``use_gt_critic``; ``score_rm --critique reference`` here) or average the rewards read after
  ``num_critic`` critiques (default 1; ``score_rm --num-critic`` here).

Like MM-RLHF (and unlike CLoud, Ankner et al. 2024, "Critique-out-Loud Reward Models", which
retrains the head on the model's own re-generated critiques), the head is trained on *reference*
critiques and used on *generated* ones, so ``val/accuracy`` here (teacher-forced reference
critiques) is an optimistic bound; ``data_pipelines.score_rm`` measures the real thing.

Export (``export.dir``): the policy in Hugging Face format as :class:`PolicyModule` writes it, plus
``reward_head.safetensors`` and ``reward_config.json`` (mode, head, prompt, policy class), in one
atomic stage output. The use-time half -- the head, the prompts, loading and scoring -- is
:mod:`mmalign.rewards.critique` (:func:`~mmalign.rewards.critique.load_reward_model`,
:class:`~mmalign.rewards.critique.RewardScorer`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset

from mmalign.collators import VisionChatCollator
from mmalign.data import Loaders
from mmalign.losses.reward import bradley_terry_loss, reward_centering, tie_loss
from mmalign.losses.sft import sft_loss_terms
from mmalign.methods.base import (
    OptimArgs,
    PolicyModule,
    export_policy,
    global_denominator,
)
from mmalign.ops import token_logprobs
from mmalign.policy import Policy
from mmalign.records import (
    PreferenceRecord,
    ReadReport,
    RecordError,
    load_image,
    message_text,
    read_records,
)
from mmalign.records import where as record_where
from mmalign.rewards import CRITIQUE_KEYS
from mmalign.rewards.critique import (
    CONFIG_FILE,
    CRITIQUE_PROMPT,
    FORMAT_VERSION,
    HEAD_FILE,
    NO_LIMIT,
    HeadKind,
    RewardMode,
    ScoreHead,
    check_critique_prompt,
    reward_messages,
    score_rows,
)

log = logging.getLogger(__name__)


def _answer(messages: list[dict]) -> str:
    return message_text(messages[0])


def _source(rec: PreferenceRecord) -> str:
    return str(rec.meta.get("source", rec.id))


def is_tie(rec: PreferenceRecord) -> bool:
    """Whether the record is a tied pair (``is_tie: true``, MM-RLHF's field); anything but a JSON
    boolean there is a :class:`RecordError` naming the record."""
    v = rec.meta.get("is_tie", False)
    if not isinstance(v, bool):
        raise RecordError(f"{record_where(rec.meta, rec.id)}: 'is_tie' must be true or false, got {v!r}")
    return v


def check_reward_record(rec: PreferenceRecord, mode: RewardMode) -> None:
    """A :class:`RecordError` naming the record when critique mode lacks its reference critiques,
    or when ``is_tie`` is not a boolean."""
    is_tie(rec)
    if mode != "critique":
        return
    for side, key in CRITIQUE_KEYS.items():
        c = rec.meta.get(key)
        if not isinstance(c, str) or not c.strip():
            raise RecordError(f"{record_where(rec.meta, rec.id)}: critique mode needs the reference critique '{key}' "
                              f"(a non-empty string) for the {side} response; got {c!r}")


class RewardPairDataset(Dataset):
    """Preference records as pairs of collator examples (chosen, rejected); the image is decoded
    once per pair, lazily, with the record's ``file:line`` in any error."""

    def __init__(self, records: list[PreferenceRecord], mode: RewardMode, critique_prompt: str = CRITIQUE_PROMPT):
        for r in records:
            check_reward_record(r, mode)
        self.records, self.mode, self.critique_prompt = records, mode, critique_prompt

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        where = _source(r)
        images = [load_image(p, where) for p in r.images]
        meta = {"id": r.id, "source": where, "prompt_id": r.meta.get("prompt_id")}
        sides = {}
        for side, completion in (("chosen", r.chosen), ("rejected", r.rejected)):
            critique = r.meta[CRITIQUE_KEYS[side]] if self.mode == "critique" else None
            sides[side] = {"images": images, "meta": {**meta, "side": side},
                           "messages": reward_messages(r.prompt, _answer(completion), self.mode, critique,
                                                       self.critique_prompt)}
        nan = float("nan")
        return {**sides, "meta": meta, "is_tie": is_tie(r),
                "score_chosen": nan if r.score_chosen is None else r.score_chosen,
                "score_rejected": nan if r.score_rejected is None else r.score_rejected}


@dataclass
class RewardPairCollator:
    """Collate pairs into one batch of ``2B`` rows: the ``B`` chosen rows, then the ``B`` rejected.

    Rows are right-padded with labels on the assistant turn (:class:`VisionChatCollator`, train
    mode). A pair either fits ``max_length`` whole or is dropped whole, with a warning and a count:
    cutting a row would move its score position off the end of the critique, and dropping one row
    would break the pairing. ``batch["pairs"]`` holds ``n`` (= B), the records' ``score_chosen`` /
    ``score_rejected`` ``(B,)`` (NaN where absent), ``is_tie`` ``(B,)`` bool and their meta; no
    model input.
    """

    processor: Any
    max_length: int = 512
    dropped: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.rows = VisionChatCollator(self.processor, max_length=NO_LIMIT, mode="train", train_on="last",
                                       on_overlength="error")

    def __call__(self, pairs: list[dict]) -> dict | None:
        while pairs:
            batch = self.rows([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
            n = len(pairs)
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            over = [i for i in range(n) if max(lengths[i], lengths[n + i]) > self.max_length]
            if not over:
                batch["pairs"] = {
                    "n": n,
                    "score_chosen": torch.tensor([p["score_chosen"] for p in pairs], dtype=torch.float32),
                    "score_rejected": torch.tensor([p["score_rejected"] for p in pairs], dtype=torch.float32),
                    "is_tie": torch.tensor([bool(p.get("is_tie", False)) for p in pairs], dtype=torch.bool),
                    "meta": [p["meta"] for p in pairs],
                }
                return batch
            for i in reversed(over):
                self.dropped += 1
                log.warning("dropped pair (%d so far): %s is %d tokens, over max_length=%d", self.dropped,
                            record_where(pairs[i]["meta"]), max(lengths[i], lengths[n + i]),
                            self.max_length)
                del pairs[i]
        return None  # every pair dropped; Lightning skips a None batch


# ---------------------------------------------------------------------------------------------
# the LightningModule


class RewardModule(PolicyModule):
    """Train a reward model on preference pairs (see the module docstring for the objective).

    Args:
        mode: "critique" (MM-RLHF: generate a critique, score at its end; LM + BT loss) or
            "scalar" (score at the answer's end; BT loss only).
        lm_weight: weight of the critique LM loss (MM-RLHF's ``critic_rewards_weight``, 1.0);
            None = 1.0 in critique mode and 0 in scalar mode, which has no critique to model.
        bt_weight: weight of the Bradley-Terry loss (MM-RLHF's ``float_rewards_weight``, 1.0); it
            multiplies the tie loss too, as in the release.
        tie_weight: weight of the tie loss ``mean((s_c - s_r)^2)`` over tied pairs (``is_tie``)
            inside ``bt_weight``'s bracket (MM-RLHF's ``tie_weight``, which the release leaves
            undefined; 1.0 here). Without tied pairs in the data it does nothing.
        center_weight: weight of ``mean((s_chosen + s_rejected)^2)``, which keeps the scores near
            0 (MM-RLHF's ``center_rewards_coefficient``: 0.01 in its 7B script; 0 = off).
        margin_scale: Bradley-Terry margin ``m = margin_scale * max(0, score_chosen -
            score_rejected)`` from the records' scores (Llama 2's margin loss); 0 = plain
            Bradley-Terry. The gap is floored at 0 because a record's scores can disagree with its
            preference (MM-RLHF's pairs follow the human ranking, and their ``score_*`` are the
            dimension-score means): such a pair asks for no lead rather than for the reverse.
        head: "linear" (one Linear(H, 1)) or "mlp" (MM-RLHF's RewardHead, Linear-tanh-Linear).
        head_dropout: dropout of the "mlp" head.
        head_lr: learning rate of the score head, which starts from scratch; None = ``optim.lr``.
        critique_prompt: the critique instruction, with ``{question}`` and ``{answer}``; saved with
            the model, so scoring asks exactly what training taught. MM-RLHF's evaluator prompt is
            :data:`MMRLHF_CRITIQUE_PROMPT`.

        optim: the optimiser (:class:`~mmalign.methods.base.OptimArgs`; default lr 1e-3, warm-up
            20 steps).

    The export option is :class:`PolicyModule`'s (``**kwargs``); ``export.dir`` also receives the
    head and ``reward_config.json``.
    """

    def __init__(self, policy: Policy, mode: RewardMode = "critique", lm_weight: float | None = None,
                 bt_weight: float = 1.0, tie_weight: float = 1.0, center_weight: float = 0.0,
                 margin_scale: float = 0.0,
                 head: HeadKind = "linear", head_dropout: float = 0.0, head_lr: float | None = None,
                 critique_prompt: str = CRITIQUE_PROMPT,
                 optim: OptimArgs = OptimArgs(lr=1e-3, warmup_steps=20), **kwargs):  # noqa: B008
        if mode not in ("critique", "scalar"):
            raise ValueError(f"mode must be 'critique' or 'scalar', not {mode!r}")
        if mode == "scalar" and lm_weight:
            raise ValueError("lm_weight must be 0 (or unset) in scalar mode: the scalar reward model writes no "
                             "critique, and an LM loss on its answers would be SFT on rejected responses")
        for name, v in (("bt_weight", bt_weight), ("tie_weight", tie_weight), ("center_weight", center_weight),
                        ("margin_scale", margin_scale), ("lm_weight", lm_weight or 0.0)):
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        check_critique_prompt(critique_prompt)
        super().__init__(policy, optim=optim, **kwargs)
        self.lm_weight = (1.0 if mode == "critique" else 0.0) if lm_weight is None else float(lm_weight)
        hidden = getattr(policy, "hidden_size", None)
        if not isinstance(hidden, int):
            raise TypeError(f"{type(policy).__name__} has no integer `hidden_size`: the score head needs the width "
                             "of the hidden states that forward_hidden returns")
        self.head = ScoreHead(hidden, head, head_dropout)

    def datamodule_args(self) -> dict[str, Any]:
        """The processor, and the mode and critique prompt that the rows are built with."""
        return {**super().datamodule_args(), "mode": self.hparams.mode, "critique_prompt": self.hparams.critique_prompt}

    # -- optimisation --------------------------------------------------------------------------

    def extra_parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        # the score head starts from scratch: its own learning rate
        hp = self.hparams
        return [(list(self.head.parameters()), hp.head_lr if hp.head_lr is not None else self.optim.lr)]

    # -- steps ---------------------------------------------------------------------------------

    def _margin(self, pairs: dict, untied: torch.Tensor) -> torch.Tensor | None:
        """``(U,)`` margins of the untied pairs (``untied`` a ``(B,)`` bool mask), or None."""
        scale = self.hparams.margin_scale
        if not scale:
            return None
        gap = (pairs["score_chosen"] - pairs["score_rejected"])[untied.cpu()]   # (U,)
        idx = untied.cpu().nonzero().flatten().tolist()
        bad = [idx[i] for i in (~torch.isfinite(gap)).nonzero().flatten().tolist()]
        if bad:
            where = ", ".join(record_where(pairs['meta'][i]) for i in bad[:5])
            raise RecordError(f"margin_scale > 0 needs score_chosen and score_rejected in every record; missing in {where}")
        return (scale * gap.clamp(min=0)).to(self.device)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        pairs = batch["pairs"]
        n = pairs["n"]
        logits, scores = score_rows(self.policy, self.head, batch)           # (2B, T, V), (2B,)
        chosen, rejected = scores[:n], scores[n:]                            # (B,) each
        tied = pairs.get("is_tie", torch.zeros(n, dtype=torch.bool)).to(scores.device)   # (B,)
        untied = ~tied
        n_u, n_t = int(untied.sum()), int(tied.sum())
        zero = scores.sum() * 0.0                                            # keeps the graph when a part is empty
        if n_u:
            bt, acc = bradley_terry_loss(chosen[untied], rejected[untied], self._margin(pairs, untied))
        else:
            bt, acc = zero, None
        tie = tie_loss(chosen[tied], rejected[tied]) if n_t else zero
        if self.lm_weight:
            logps, mask = token_logprobs(logits, batch["labels"])            # (2B, T-1)
            (lm_c, k_c), (lm_r, k_r) = (sft_loss_terms(logps[:n], mask[:n], "example"),
                                        sft_loss_terms(logps[n:], mask[n:], "example"))
        else:
            lm_c = lm_r = k_c = k_r = torch.zeros((), device=scores.device)
        # Every term is a mean over this rank's pairs (all, untied or tied) or answers: rescaled to
        # its share of the global batch's mean (global_denominator; one all-reduce of the five
        # counts), so the ranks' gradient average is the one-process gradient however the items fall.
        counts = torch.tensor([float(n), float(n_u), float(n_t)], device=scores.device)
        d_pairs, d_u, d_t, d_c, d_r = global_denominator(torch.cat([counts, torch.stack([k_c.detach(), k_r.detach()]).float()]),
                                                         min_total=1.0)
        share = n / d_pairs                                                  # 1 on one process
        loss = self.hparams.bt_weight * (bt * (n_u / d_u) + self.hparams.tie_weight * tie * (n_t / d_t))
        if self.lm_weight:
            lm = lm_c / d_c + lm_r / d_r
            loss = loss + self.lm_weight * lm
            self.log(f"{stage}/lm_loss", lm, batch_size=n, sync_dist=True)
        if self.hparams.center_weight:
            center = reward_centering(chosen, rejected)
            loss = loss + self.hparams.center_weight * center * share
            self.log(f"{stage}/center_loss", center, batch_size=n)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        if n_u:
            self.log(f"{stage}/bt_loss", bt, batch_size=n_u)
            self.log(f"{stage}/accuracy", acc, prog_bar=True, batch_size=n_u)
        with torch.no_grad():
            if n_t:   # the release logs loss/tie and rewards/tie_margin (mean |c - r| of tied pairs)
                self.log(f"{stage}/tie_loss", tie, batch_size=n_t)
                self.log(f"{stage}/tie_margin", (chosen[tied] - rejected[tied]).abs().mean(), batch_size=n_t)
            if n_u:
                self.log(f"{stage}/margin", (chosen[untied] - rejected[untied]).mean(), batch_size=n_u)
            self.log(f"{stage}/score_mean", scores.mean(), batch_size=n)
        return loss

    def training_step(self, batch: dict, batch_idx: int):
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int):
        return self._step(batch, "val")

    # -- export --------------------------------------------------------------------------------

    def reward_config(self) -> dict:
        """What ``reward_config.json`` holds: enough to rebuild the head and ask the same prompt."""
        hp = self.hparams
        return {"format_version": FORMAT_VERSION, "mode": hp.mode, "head": hp.head, "head_dropout": hp.head_dropout,
                "hidden_size": self.head_hidden_size, "critique_prompt": hp.critique_prompt,
                "policy_class": f"{type(self.policy).__module__}.{type(self.policy).__qualname__}",
                "score_position": "last labelled token of the assistant turn (end of the critique / answer)"}

    @property
    def head_hidden_size(self) -> int:
        layer = self.head.dense if self.head.kind == "mlp" else self.head.score
        return layer.in_features

    def export(self, out_dir: str) -> None:
        export_reward_model(self.policy, self.head, self.reward_config(), out_dir, self.export_args.merge_lora)


def export_reward_model(policy: Policy, head: ScoreHead, config: dict, out_dir: str, merge_lora: bool = True) -> None:
    """Write the policy (Hugging Face format), ``reward_head.safetensors`` and
    ``reward_config.json`` to ``out_dir`` as one stage output (manifest last, swapped in whole)."""
    export_policy(policy, out_dir, merge_lora, heads=head, head_file=HEAD_FILE, config_file=CONFIG_FILE,
                  config=config, what="reward")


# ---------------------------------------------------------------------------------------------
# the DataModule


class RewardDataModule(Loaders, L.LightningDataModule):
    """Preference pairs for reward-model training, from JSONL files of PreferenceRecords.

    Tied pairs (``is_tie: true``) train the tie loss: they may sit in ``train_file`` among the
    preferences (the release's ``dpo_pairs.jsonl`` layout) or in ``ties_file`` /
    ``val_ties_file`` (``data_pipelines.import_mmrlhf`` writes ``<split>/ties.jsonl``, apart from
    the pairs, so a DPO run can never read a tie as a preference); a record in a ties file without
    ``is_tie: true`` is an error naming it.

    Each pair gives two rows built by :func:`reward_messages`: in critique mode the record's
    reference critiques (meta ``critique_chosen`` / ``critique_rejected``) are the assistant
    turns; in scalar mode the answers are. Processor, mode and critique prompt are the
    RewardModule's, given by :meth:`connect`, so data and model never disagree.

    Args:
        train_file: JSONL of preference records (the prefs stage's ``train/pairs.jsonl``).
        val_file: optional held-out JSONL (``val/pairs.jsonl``).
        ties_file: optional JSONL of tied pairs added to the training set (``train/ties.jsonl``).
        val_ties_file: optional JSONL of tied pairs added to the validation set (``val/ties.jsonl``).
        data_root: folder that image paths are relative to (default: each file's folder).
        limit: use at most this many training pairs (0 = all).
        val_limit: use at most this many validation pairs (0 = all).
        batch_size: pairs per step (each step runs ``2 * batch_size`` rows).
        num_workers: DataLoader worker processes (0 is fastest on 2 cores with 64 px images).
        max_length: longest row in tokens, image tokens included; a pair with a longer row is
            dropped whole, with a warning.
        check_images: "exists", "decode" (find corrupt images up front) or "none".
        on_error: "raise" at the first malformed record, or "skip" it into a rejects file.
    """

    def __init__(self, train_file: str, val_file: str | None = None, ties_file: str | None = None,
                 val_ties_file: str | None = None, data_root: str | None = None, limit: int = 0,
                 val_limit: int = 0, batch_size: int = 8, num_workers: int = 0, max_length: int = 512,
                 check_images: Literal["none", "exists", "decode"] = "exists",
                 on_error: Literal["raise", "skip"] = "raise"):
        super().__init__()
        self.save_hyperparameters()
        self.processor: Any = None
        self.mode: RewardMode | None = None
        self.critique_prompt: str | None = None
        self.collator: RewardPairCollator | None = None
        self.train_set: RewardPairDataset | None = None
        self.val_set: RewardPairDataset | None = None

    def connect(self, processor: Any, mode: RewardMode, critique_prompt: str = CRITIQUE_PROMPT) -> None:
        """Take what the data need from the model (:meth:`RewardModule.datamodule_args`): the
        policy's processor, the mode and the critique prompt. The mmalign CLI calls
        ``datamodule.connect(**model.datamodule_args())`` once both are built; outside it, call
        this before ``setup``."""
        if mode not in ("critique", "scalar"):
            raise ValueError(f"mode must be 'critique' or 'scalar', not {mode!r}")
        self.processor, self.mode, self.critique_prompt = processor, mode, check_critique_prompt(critique_prompt)

    def _read(self, path: str, limit: int, ties_path: str | None = None) -> RewardPairDataset:
        recs = self._records(path, limit)
        if ties_path:
            ties = self._records(ties_path, 0)
            for r in ties:
                if not is_tie(r):
                    raise RecordError(f"{record_where(r.meta, r.id)}: a record of the ties file {ties_path} "
                                      "must have 'is_tie': true (is this a pairs file?)")
            recs = recs + ties
        if not recs:
            raise ValueError(f"{path}: no usable preference records")
        return RewardPairDataset(recs, self.mode, self.critique_prompt)

    def _records(self, path: str, limit: int) -> list[PreferenceRecord]:
        hp = self.hparams
        rep = ReadReport(path)
        recs = read_records(path, "preference", data_root=hp.data_root, check_images=hp.check_images,
                            on_error=hp.on_error, report=rep)
        if rep.rejected:
            log.warning("%s: %d malformed record(s) skipped, see %s", path, rep.rejected, rep.rejects_path)
        if limit:
            recs = recs[:limit]
        if hp.on_error == "skip":   # critique mode's missing critiques, a non-boolean is_tie
            kept = []
            for r in recs:
                try:
                    check_reward_record(r, self.mode)
                    kept.append(r)
                except RecordError as e:
                    log.warning("skipped: %s", e)
            recs = kept
        return recs

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.processor is None or self.mode is None:
            raise ValueError("RewardDataModule needs a processor, mode and critique prompt: connect() was never "
                             "called (the mmalign CLI calls datamodule.connect(**model.datamodule_args()) with a "
                             "RewardModule; outside it, call connect(processor, mode, critique_prompt) before setup)")
        if self.collator is None:
            self.collator = RewardPairCollator(self.processor, max_length=hp.max_length)
        if self.train_set is None:
            self.train_set = self._read(hp.train_file, hp.limit, hp.ties_file)
        if self.val_set is None and hp.val_file:
            self.val_set = self._read(hp.val_file, hp.val_limit, hp.val_ties_file)
