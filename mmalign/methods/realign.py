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

import torch

from mmalign.losses.rdpo import RDPOOutput, rdpo_loss
from mmalign.methods.base import OptimArgs
from mmalign.methods.dpo import DPOModule, pair_sums
from mmalign.policy import Policy
from mmalign.records import where as record_where


class RealignModule(DPOModule):
    """rDPO training of ``policy`` on visual preference pairs.

    DPOModule's reference, probe and export options (``beta``: rDPO's one beta) pass through
    ``**kwargs`` with DPOModule's defaults; the optimiser has Re-Align's.

    Args:
        text_weight: weight of the text term (same image, chosen over rejected answer).
        visual_weight: weight of the visual term (same chosen answer, original over retrieved image);
            0 = text DPO only.
        anchor_weight: weight of mDPO's reward anchor ``-log sigma(beta (pc - rc) - delta)`` (0 in
            Re-Align's released code).
        anchor_delta: the anchor's delta.
        nll_weight: weight of the chosen answer's mean NLL (0 in Re-Align's released runs).
        optim: the optimiser (:class:`~mmalign.methods.base.OptimArgs`; Re-Align's default lr
            1e-4, warm-up 10 steps).
    """

    def __init__(self, policy: Policy, text_weight: float = 1.0, visual_weight: float = 1.0,
                 anchor_weight: float = 0.0, anchor_delta: float = 0.0, nll_weight: float = 0.0,
                 optim: OptimArgs = OptimArgs(lr=1e-4, warmup_steps=10), **kwargs):  # noqa: B008
        if min(text_weight, visual_weight, anchor_weight, nll_weight) < 0:
            raise ValueError("rDPO weights must be >= 0")
        # rDPO's loss is compute_loss below, not one of DPO's: DPO's loss options are fixed here
        # (switched off; nll_alpha, drs_k and drs_beta_min at DPOModule's defaults, which nothing
        # reads with them off), so they are no RealignModule options and never appear in its
        # config. The rest of DPOModule's (beta, reference, probe_*, on_collapse, export) pass
        # through **kwargs, with DPOModule's defaults.
        super().__init__(policy, loss_type="sigmoid", label_smoothing=0.0, nll_alpha=1.0, drs_w=0.0, drs_k=1.0,
                         drs_beta_min=1e-3, optim=optim, **kwargs)
        # PolicyModule's save_hyperparameters collects the arguments of every __init__ frame of
        # the chain, this one's included: text_weight etc. are in self.hparams and in checkpoints.

    def compute_loss(self, batch: dict) -> tuple[RDPOOutput, dict[str, torch.Tensor]]:
        """rDPO loss of one visual preference batch and the per-step statistics to log."""
        hp = self.hparams
        if not batch.get("visual"):
            where = record_where(batch["meta"][0]) if batch["meta"] else "?"
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
