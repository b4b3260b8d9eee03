"""DPO and MM-DPO (MM-RLHF's DPO with Dynamic Reward Scaling) over preference pairs.

One module for the DPO family; the loss is one of the pure functions of
:mod:`mmalign.losses.dpo`, chosen by ``loss_type``:

    sigmoid  DPO (Rafailov et al. 2023):        -log sigma(beta * h)        (cDPO with label_smoothing)
    ipo      IPO (Azar et al. 2023):            (h / len - 1 / (2 beta))^2  (per-token log-probs, as TRL)
    nll      NLL-anchored DPO (RPO, Pang 2024): DPO + nll_alpha * NLL(chosen)

with ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))`` over sequence log-probs.

MM-DPO (Zhang et al. 2025, "MM-RLHF: The Next Step Forward in Multimodal LLM Alignment") is DPO
over *every* ranked pair of a prompt (the ``prefs`` stage writes all of them) with Dynamic
Reward Scaling: a per-pair ``beta = beta * (1 + drs_w * (1 - exp(-drs_k * delta)))``,
``delta = r(y_w) - r(y_l)`` the reward model's margin for the pair (``reward_margin`` in each
record, written by ``data_pipelines.score_rm``). ``drs_w = 0`` is plain DPO. That is the paper's
rule and the default (``beta_mode: paper``). ``beta_mode: released`` reproduces what the
released trainer actually runs (its default ``implicit_beta=True``; see
:mod:`mmalign.losses.dpo`): one beta per batch from the policy's own DPO logits,
``beta * (1 + drs_w * (mean(h[drawn]) - mean(h)))`` floored at ``drs_beta_min``
(:func:`~mmalign.losses.dpo.released_batch_beta`), which needs no reward model.

A record with ``is_tie: true`` (a tied pair, which ``data_pipelines.import_mmrlhf`` keeps for
the reward model's tie loss) has no preferred side and is refused with an error naming it.

Reference log-probs come from the reference model on the fly (``reference: on_the_fly``: the
policy with its LoRA adapter disabled, or a frozen copy of the starting weights) or from the
records (``reference: precomputed``: ``ref_chosen_logp`` / ``ref_rejected_logp`` written in one
pass by ``data_pipelines.ref_logps``, which also records which checkpoint made them; a
mismatch with the policy's starting checkpoint is an error). Both give the same loss.

Generation health: DPO can collapse a small policy into repeated or empty text while its loss
still falls. With ``probe_file`` set, the module greedily answers a fixed set of prompts before
training and every ``probe_every`` steps, logs mean length, distinct-1/2, loop rate and empty
rate (``probe/*``), and flags a collapse against the step-0 probe (``probe/collapsed``); with
``on_collapse: stop`` training stops there.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import torch

from mmalign.collators import VisionChatCollator, to_device
from mmalign.health import collapsed, generation_health
from mmalign.losses.dpo import (
    DPOOutput,
    dpo_sigmoid_loss,
    dynamic_beta,
    ipo_loss,
    nll_anchored_dpo_loss,
    released_batch_beta,
)
from mmalign.methods.base import OptimArgs, PolicyModule, global_denominator
from mmalign.policy import Policy
from mmalign.records import where as record_where

log = logging.getLogger(__name__)

LossType = Literal["sigmoid", "ipo", "nll"]
#: record keys of precomputed reference log-probs (data_pipelines.ref_logps): chosen, rejected, and
#: the chosen answer under the rejected images (visual pairs)
REF_KEYS = ("ref_chosen_logp", "ref_rejected_logp", "ref_chosen_rejimg_logp")
ReferenceMode = Literal["on_the_fly", "precomputed"]
BetaMode = Literal["paper", "released"]


def pair_sums(logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` token log-probs and mask -> ``(B,)`` sequence log-probs and ``(B,)`` token counts."""
    return (logps * mask).sum(dim=1), mask.sum(dim=1)


class DPOModule(PolicyModule):
    """DPO-family training of ``policy`` on preference pairs (see the module docstring; the
    export option is PolicyModule's).

    Args:
        loss_type: "sigmoid" (DPO), "ipo" or "nll" (DPO + nll_alpha x mean NLL of the chosen answer).
        beta: DPO's beta (beta_ori of MM-DPO); IPO's tau.
        label_smoothing: cDPO's assumed label-flip probability in [0, 0.5] (0 = plain DPO).
        nll_alpha: weight of the chosen answer's NLL for loss_type "nll".
        drs_w: Dynamic Reward Scaling weight w (MM-DPO); 0 = off (plain DPO). With
            ``beta_mode: paper`` it needs ``reward_margin`` in every record. (The release's
            ``ls_factor_weight``: 0.1 in its 7B script.)
        drs_k: Dynamic Reward Scaling rate k: beta saturates once k * delta is a few
            (``beta_mode: paper`` only).
        drs_beta_min: floor on the beta (the released trainer's 1e-3), so a pair the reward
            model disagrees with can never get a beta <= 0 (a reversed preference).
        beta_mode: "paper" (default): per-pair beta from the reward model's margin, the paper's
            Dynamic Reward Scaling. "released": the released trainer's batch-level beta from the
            policy's DPO logits (:func:`~mmalign.losses.dpo.released_batch_beta`; under data
            parallelism the logits are gathered over the ranks, which needs equal per-rank
            batch sizes, as the release's ``all_gather`` does).
        reference: "on_the_fly" (reference model forward each step) or "precomputed"
            (``ref_chosen_logp`` / ``ref_rejected_logp`` in the records).
        probe_file: SFT-format JSONL whose prompts are the generation-health probe (None = no probe).
        probe_task: keep only probe records of this task (None = all).
        probe_size: number of probe prompts.
        probe_every: probe every this many optimizer steps.
        probe_max_new_tokens: generation budget per probe answer.
        on_collapse: "warn" (log and go on) or "stop" training when the probe flags a collapse.
        optim: the optimiser (:class:`~mmalign.methods.base.OptimArgs`; DPO's default lr 5e-6,
            warm-up 10 steps).
    """

    def __init__(self, policy: Policy, loss_type: LossType = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 nll_alpha: float = 1.0, drs_w: float = 0.0, drs_k: float = 1.0, drs_beta_min: float = 1e-3,
                 beta_mode: BetaMode = "paper", reference: ReferenceMode = "on_the_fly", probe_file: str | None = None,
                 probe_task: str | None = "detailed_caption", probe_size: int = 16, probe_every: int = 50,
                 probe_max_new_tokens: int = 96, on_collapse: Literal["warn", "stop"] = "warn",
                 optim: OptimArgs = OptimArgs(lr=5e-6, warmup_steps=10), **kwargs):  # noqa: B008
        if loss_type not in ("sigmoid", "ipo", "nll"):
            raise ValueError(f"loss_type must be 'sigmoid', 'ipo' or 'nll', not {loss_type!r}")
        if reference not in ("on_the_fly", "precomputed"):
            raise ValueError(f"reference must be 'on_the_fly' or 'precomputed', not {reference!r}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if beta_mode not in ("paper", "released"):
            raise ValueError(f"beta_mode must be 'paper' or 'released', not {beta_mode!r}")
        if drs_w and loss_type == "ipo":
            raise ValueError("Dynamic Reward Scaling scales DPO's beta; it is not defined for IPO (set drs_w: 0)")
        if not drs_beta_min > 0:
            raise ValueError(f"drs_beta_min must be > 0, got {drs_beta_min}")
        super().__init__(policy, optim=optim, **kwargs)
        self._probe_batches: list[dict] | None = None
        self._probe_start: dict[str, float] | None = None
        self._ref_id: str | None = None
        #: every probe's metrics, in order (also in the loggers)
        self.probe_history: list[dict] = []

    # -- reference ------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)   # refuses an export the strategy cannot give
        # A frozen-copy reference taken lazily after `--ckpt_path last` would be the resumed,
        # half-trained policy: take it now, before Lightning restores the checkpoint.
        if self.hparams.reference == "on_the_fly" and hasattr(self.policy, "snapshot_reference"):
            self.policy.snapshot_reference()

    def on_fit_start(self) -> None:
        if self.hparams.reference == "precomputed":
            from mmalign.stage import checkpoint_id

            path = getattr(self.policy, "path", None)
            self._ref_id = checkpoint_id(path) if path and Path(path).is_dir() else None
        if self.hparams.probe_file:
            self._probe("start")

    def _reference_logps(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """``(B,)`` reference sequence log-probs of the chosen and the rejected answers, and for a
        visual batch of the chosen answer under the rejected images."""
        if self.hparams.reference == "on_the_fly":
            with torch.no_grad(), self.policy.reference() as ref:
                parts = ref.pair_logprobs(batch)
            return tuple(pair_sums(parts[j], parts[j + 1])[0] for j in range(0, len(parts), 2))
        keys = REF_KEYS[: 3 if batch.get("visual") else 2]
        cols: list[list[float]] = [[] for _ in keys]
        for m in batch["meta"]:
            missing = [k for k in keys if k not in m]
            if missing:
                raise ValueError(f"{record_where(m)}: reference 'precomputed' needs {', '.join(keys)} in "
                                 f"every record, {', '.join(missing)} missing (run data_pipelines.ref_logps on the pairs)")
            if self._ref_id and m.get("ref_model") and m["ref_model"] != self._ref_id:
                raise ValueError(f"{record_where(m)}: reference log-probs were made by {m['ref_model']}, "
                                 f"but the policy starts from {self._ref_id}")
            for col, k in zip(cols, keys):
                col.append(float(m[k]))
        return tuple(torch.tensor(col, device=self.device) for col in cols)

    # -- loss -----------------------------------------------------------------------------------

    def pair_beta(self, batch: dict, logits: torch.Tensor | None = None) -> torch.Tensor | float:
        """The beta of each pair: per-pair under Dynamic Reward Scaling (``beta_mode: paper``),
        one for the batch from ``logits`` (the ``(B,)`` DPO logits ``h``) under ``beta_mode:
        released``, else ``beta``."""
        hp = self.hparams
        if not hp.drs_w:
            return hp.beta
        if hp.beta_mode == "released":
            if logits is None:
                raise ValueError("beta_mode 'released' needs the batch's DPO logits")
            h = logits.detach()
            if self._trainer is not None and self.trainer.world_size > 1:
                h = self.all_gather(h).reshape(-1)   # the release gathers h over the ranks
            return released_batch_beta(h, hp.beta, hp.drs_w, floor=hp.drs_beta_min)
        margins = []
        for m in batch["meta"]:
            d = m.get("reward_margin")
            if d is None or not math.isfinite(float(d)):
                raise ValueError(f"{record_where(m)}: Dynamic Reward Scaling (drs_w={hp.drs_w}) needs a "
                                 f"finite reward_margin in every record, got {d!r} (score the pairs with "
                                 "data_pipelines.score_rm)")
            margins.append(float(d))
        delta = torch.tensor(margins, device=self.device)
        return dynamic_beta(delta, hp.beta, hp.drs_w, hp.drs_k, clip=(hp.drs_beta_min, math.inf))

    def compute_loss(self, batch: dict) -> tuple[DPOOutput, dict[str, torch.Tensor]]:
        """The loss of one preference batch and the per-step statistics to log."""
        hp = self.hparams
        ties = [m for m in batch["meta"] if m.get("is_tie") is True]
        if ties:
            raise ValueError(f"{record_where(ties[0])}: a tied pair (is_tie: true) has no preferred response, so DPO "
                             f"cannot train on it ({len(ties)} in this batch); give DPO the pairs file and the ties "
                             "file to the reward model (import_mmrlhf writes them apart)")
        pc_tok, pc_mask, pr_tok, pr_mask = self.policy.pair_logprobs(batch)[:4]
        pc, n_c = pair_sums(pc_tok, pc_mask)
        pr, n_r = pair_sums(pr_tok, pr_mask)
        rc, rr = self._reference_logps(batch)[:2]
        beta = self.pair_beta(batch, ((pc - rc) - (pr - rr)).detach())
        nll = -pc / n_c.clamp(min=1)                                   # (B,) mean NLL of each chosen answer
        if hp.loss_type == "sigmoid":
            out = dpo_sigmoid_loss(pc, pr, rc, rr, beta, hp.label_smoothing)
        elif hp.loss_type == "ipo":
            out = ipo_loss(pc, pr, rc, rr, hp.beta, chosen_lengths=n_c, rejected_lengths=n_r)
        else:
            out = nll_anchored_dpo_loss(pc, pr, rc, rr, nll, beta, hp.nll_alpha, hp.label_smoothing)
        stats = {
            "reward_accuracy": out.reward_accuracy,
            "margin": out.margins.mean(),
            "chosen_reward": out.chosen_rewards.mean(),
            "rejected_reward": out.rejected_rewards.mean(),
            "logp_chosen": pc.detach().mean(),
            "logp_rejected": pr.detach().mean(),
            "nll_chosen": nll.detach().mean(),
            "beta": torch.as_tensor(beta, dtype=torch.float32).mean(),
        }
        return out, stats

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        out, stats = self.compute_loss(batch)
        bs = len(batch["meta"])
        # The mean over the pairs of the *global* batch: summed per-pair losses over the
        # all-reduced pair count / world size (global_denominator). Lightning's distributed
        # sampler gives every rank as many pairs, where this equals out.loss; it also stays the
        # global mean when they differ. On one process it is out.loss (up to rounding).
        loss = out.losses.sum() / global_denominator(torch.tensor(float(bs), device=out.losses.device))
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        # The statistics are this rank's means (rank 0's batch when logged): an estimate, not
        # worth a collective per statistic per step.
        for k, v in stats.items():
            self.log(f"{stage}/{k}", v, prog_bar=k == "reward_accuracy", batch_size=bs)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    # -- generation-health probe ----------------------------------------------------------------

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        hp = self.hparams
        if hp.probe_file and self.global_step > 0 and self.global_step % hp.probe_every == 0:
            self._probe(f"step {self.global_step}")

    def _probe_data(self) -> list[dict]:
        if self._probe_batches is None:
            from mmalign.data import ChatDataset
            from mmalign.records import read_records

            hp = self.hparams
            recs = read_records(hp.probe_file, "sft", data_root=self._data_root())
            if hp.probe_task:
                recs = [r for r in recs if r.meta.get("task") == hp.probe_task]
            if not recs:
                raise ValueError(f"{hp.probe_file}: no probe records (probe_task={hp.probe_task!r})")
            recs = recs[: hp.probe_size]
            for r in recs:
                r.messages = [m for m in r.messages if m["role"] != "assistant"]
            ds = ChatDataset(recs)
            collator = VisionChatCollator(self.policy.processor, max_length=1 << 16, mode="generate")
            self._probe_batches = [collator([ds[j] for j in range(i, min(i + 16, len(ds)))])
                                   for i in range(0, len(ds), 16)]
        return self._probe_batches

    def _data_root(self) -> str | None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(getattr(dm, "hparams", None), "data_root", None)

    @torch.no_grad()
    def _probe(self, when: str) -> None:
        texts: list[str] = []
        for b in self._probe_data():
            texts += self.policy.generate(to_device(b, self.device), max_new_tokens=self.hparams.probe_max_new_tokens)
        health = generation_health(texts)
        if self._probe_start is None:
            self._probe_start = health
        why = collapsed(health, self._probe_start)
        # Straight to the loggers: Lightning refuses self.log() in on_fit_start, where the step-0
        # probe runs.
        metrics = {f"probe/{k}": v for k, v in health.items()} | {"probe/collapsed": float(bool(why))}
        for lg in self.loggers:
            lg.log_metrics(metrics, step=self.global_step)
        self.probe_history.append({"step": self.global_step, **metrics})
        log.info("probe at %s: %s | e.g. %r", when, {k: round(v, 3) for k, v in health.items()}, texts[0][:120])
        if why:
            msg = f"generation collapse at {when}: " + "; ".join(why) + f" | e.g. {texts[0][:120]!r}"
            log.warning(msg)
            if self.hparams.on_collapse == "stop":
                print(msg + " -> stopping (on_collapse: stop)")
                self.trainer.should_stop = True
