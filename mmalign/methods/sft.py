"""Supervised fine-tuning (visual instruction tuning): next-token loss on assistant turns.

    loss = - (1 / N) * sum_{b, t : label[b, t] is scored} log p(label[b, t] | tokens < t, images)

N counts every scored token of the batch (prompt, image and padding positions carry no loss), as
in LLaVA's instruction tuning.
"""

from __future__ import annotations

from mmalign.methods.base import PolicyModule
from mmalign.ops import masked_mean


class SFTModule(PolicyModule):
    """Visual instruction tuning of ``policy`` on chat records (see PolicyModule for options)."""

    def _step(self, batch: dict, stage: str):
        logps, mask = self.policy.completion_logprobs(batch)
        loss = -masked_mean(logps, mask)
        bs = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs)
        self.log(f"{stage}/tokens", mask.sum(), reduce_fx="sum", batch_size=bs)
        return loss

    def training_step(self, batch: dict, batch_idx: int):
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int):
        return self._step(batch, "val")
