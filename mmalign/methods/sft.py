"""Supervised fine-tuning (visual instruction tuning): next-token loss on the assistant turns.

The loss and its two normalisations ("token", LLaVA's; "example") are :mod:`mmalign.losses.sft`;
this module trains with it, dividing by the all-reduced count under data parallelism.
"""

from __future__ import annotations

import torch

from mmalign.losses.sft import LossNormalization, sft_loss_terms
from mmalign.methods.base import OptimArgs, PolicyModule, global_denominator
from mmalign.policy import Policy


class SFTModule(PolicyModule):
    """Visual instruction tuning of ``policy`` on chat records (see PolicyModule for the other options).

    Args:
        loss_normalization: "token" = mean over all scored tokens of the batch (LLaVA's; long
            answers dominate the gradient); "example" = mean over each example's scored tokens,
            then over examples (every example weighs the same, whatever its answer length).
        optim: the optimiser (:class:`~mmalign.methods.base.OptimArgs`; SFT's default lr 1e-3,
            warm-up 20 steps).
    """

    def __init__(self, policy: Policy, loss_normalization: LossNormalization = "token",
                 optim: OptimArgs = OptimArgs(lr=1e-3, warmup_steps=20), **kwargs):  # noqa: B008
        if loss_normalization not in ("token", "example"):
            raise ValueError(f"loss_normalization must be 'token' or 'example', not {loss_normalization!r}")
        super().__init__(policy, optim=optim, **kwargs)
        # PolicyModule's save_hyperparameters reads this frame's arguments: loss_normalization
        # is in self.hparams (and in checkpoints) like the other options.

    @staticmethod
    def global_sft_loss(logps: torch.Tensor, mask: torch.Tensor, normalization: LossNormalization) -> torch.Tensor:
        """:func:`sft_loss` of the *global* batch under data parallelism: this rank's summed NLL
        over the all-reduced count / world size (:func:`global_denominator`), so the ranks'
        gradient average is the one-process gradient of the whole batch even when ranks hold
        different numbers of answer tokens; on one process exactly :func:`sft_loss`."""
        total, count = sft_loss_terms(logps, mask, normalization)
        return total / global_denominator(count, min_total=1.0)

    def _step(self, batch: dict, stage: str):
        logps, mask = self.policy.completion_logprobs(batch)           # (B, T-1) each
        loss = self.global_sft_loss(logps, mask, self.hparams.loss_normalization)
        bs = batch["input_ids"].shape[0]
        # sync_dist: each rank's value is W * (its share of the global mean); their mean is the
        # global batch's loss (a no-op on one process).
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log(f"{stage}/tokens", mask.sum(), reduce_fx="sum", batch_size=bs, sync_dist=True)
        if stage == "val":
            # Both forms, so runs trained with either normalisation compare on the same scale.
            with torch.no_grad():
                for norm in ("token", "example"):
                    self.log(f"val/loss_{norm}", self.global_sft_loss(logps, mask, norm), batch_size=bs,
                             sync_dist=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int):
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int):
        return self._step(batch, "val")
