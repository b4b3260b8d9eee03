"""Re-Align's rDPO (Xing et al. 2025, "Re-Align: Aligning Vision Language Models via
Retrieval-Augmented Direct Preference Optimization") as a method: DPOModule with the loss
swapped for :func:`mmalign.losses.rdpo.rdpo_loss`.

Each record is a dual preference (``make realign-data``): the chosen answer over a rejected
(hallucination-injected) answer under the original image, and the chosen answer under the
original image over the same answer under a *retrieved* look-alike image
(``rejected_images``). The collator scores the three completions with each image and prompt
encoded once (``PreferenceCollator``, visual batches), the reference is the DPO module's (on the
fly or precomputed, ``ref_chosen_rejimg_logp`` included), and the logging and generation-health
probe are DPOModule's. Setting ``visual_weight: 0`` leaves the text term only: plain DPO on the
same data, the ablation the paper makes.
"""

from __future__ import annotations

from typing import Literal

import torch

from mmalign.losses.rdpo import RDPOOutput, rdpo_loss
from mmalign.methods.dpo import DPOModule, ReferenceMode, pair_sums
from mmalign.policy import Policy


class RealignModule(DPOModule):
    """rDPO training of ``policy`` on visual preference pairs (see DPOModule for the optimiser,
    reference, probe and export options; ``beta`` is rDPO's one beta).

    Args:
        text_weight: weight of the text term (same image, chosen over rejected answer).
        visual_weight: weight of the visual term (same chosen answer, original over retrieved image);
            0 = text DPO only.
        anchor_weight: weight of mDPO's reward anchor ``-log sigma(beta (pc - rc) - delta)`` (0 in
            Re-Align's released code).
        anchor_delta: the anchor's delta.
        nll_weight: weight of the chosen answer's mean NLL (0 in Re-Align's released runs).
    """

    def __init__(self, policy: Policy, lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 10,
                 min_lr_ratio: float = 0.1, export_dir: str | None = None, merge_lora: bool = True,
                 beta: float = 0.1, text_weight: float = 1.0, visual_weight: float = 1.0,
                 anchor_weight: float = 0.0, anchor_delta: float = 0.0, nll_weight: float = 0.0,
                 reference: ReferenceMode = "on_the_fly", probe_file: str | None = None,
                 probe_task: str | None = "detailed_caption", probe_size: int = 16, probe_every: int = 50,
                 probe_max_new_tokens: int = 96, on_collapse: Literal["warn", "stop"] = "warn"):
        if min(text_weight, visual_weight, anchor_weight, nll_weight) < 0:
            raise ValueError("rDPO weights must be >= 0")
        super().__init__(policy, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, export_dir=export_dir, merge_lora=merge_lora,
                         loss_type="sigmoid", beta=beta, reference=reference, probe_file=probe_file,
                         probe_task=probe_task, probe_size=probe_size, probe_every=probe_every,
                         probe_max_new_tokens=probe_max_new_tokens, on_collapse=on_collapse)
        # PolicyModule's save_hyperparameters collects the arguments of every __init__ frame of
        # the chain, this one's included: text_weight etc. are in self.hparams and in checkpoints.

    def compute_loss(self, batch: dict) -> tuple[RDPOOutput, dict[str, torch.Tensor]]:
        """rDPO loss of one visual preference batch and the per-step statistics to log."""
        hp = self.hparams
        if not batch.get("visual"):
            where = batch["meta"][0].get("source", batch["meta"][0].get("id")) if batch["meta"] else "?"
            raise ValueError(f"{where}: rDPO needs rejected_images in every record (make realign-data)")
        parts = self.policy.pair_logprobs(batch)
        pc, n_c = pair_sums(parts[0], parts[1])
        pr, _ = pair_sums(parts[2], parts[3])
        pv, _ = pair_sums(parts[4], parts[5])
        rc, rr, rv = self._reference_logps(batch)
        nll = -pc / n_c.clamp(min=1)
        out = rdpo_loss(pc, pr, rc, rr, pv, rv, hp.beta, text_weight=hp.text_weight, visual_weight=hp.visual_weight,
                        anchor_weight=hp.anchor_weight, anchor_delta=hp.anchor_delta,
                        policy_chosen_nll=nll, nll_weight=hp.nll_weight)
        stats = {
            "reward_accuracy": out.text.reward_accuracy,
            "margin": out.text.margins.mean(),
            "chosen_reward": out.text.chosen_rewards.mean(),
            "rejected_reward": out.text.rejected_rewards.mean(),
            "text_loss": out.text.loss.detach(),
            "visual_loss": out.visual.loss.detach(),
            "visual_accuracy": out.visual.reward_accuracy,
            "visual_margin": out.visual.margins.mean(),
            "rejected_image_reward": out.visual.rejected_rewards.mean(),
            "logp_chosen": pc.detach().mean(),
            "logp_rejected": pr.detach().mean(),
            "logp_chosen_rejected_image": pv.detach().mean(),
            "nll_chosen": nll.detach().mean(),
        }
        return out, stats
