"""rDPO, the objective of Re-Align: DPO on the answers plus a DPO-style *visual* preference term
that prefers the original image over a retrieved, similar-looking one for the same answer.

Re-Align (Xing et al. 2025, "Re-Align: Aligning Vision Language Models via Retrieval-Augmented
Direct Preference Optimization", EMNLP 2025, arXiv 2502.13146; code github.com/taco-group/Re-Align).
Its pairs come from image retrieval: the rejected answer ``y_l`` is the chosen answer ``y_w`` with
its object / attribute / relation words masked and re-filled by the VLM while it looks at a
*retrieved* image ``m_r`` (one of the top-k nearest training images by the VLM's own vision
features, tried in rank order; the first re-fill whose sentence-embedding cosine to ``y_w`` is below
0.95 is kept, with its image), so ``m_r`` is the natural "rejected image" for ``y_w``
(``data_pipelines/realign_data.py``, ``--rejected refill``; :mod:`mmalign.refill`).

Inputs, every one a ``(B,)`` tensor of summed completion log-probs (as in :mod:`mmalign.losses.dpo`):

    pc  = log pi(y_w | m, x)      rc  = log ref(y_w | m, x)      chosen answer, original image
    pr  = log pi(y_l | m, x)      rr  = log ref(y_l | m, x)      rejected answer, original image
    pci = log pi(y_w | m_r, x)    rci = log ref(y_w | m_r, x)    chosen answer, retrieved image

One policy ``pi`` and one frozen reference ``ref`` score all six. Per pair ``b``:

    text   = -log sigma(beta * [(pc - rc) - (pr - rr)])      DPO: same image m, y_w over y_l
    visual = -log sigma(beta * [(pc - rc) - (pci - rci)])    same answer y_w, image m over m_r
    anchor = -log sigma(beta * (pc - rc) - delta)            mDPO's reward anchor (off in Re-Align)
    losses = text_weight * text + visual_weight * visual + anchor_weight * anchor
             + nll_weight * nll(y_w | m, x)

``visual`` is :func:`~mmalign.losses.dpo.dpo_sigmoid_loss` with the retrieved-image log-probs in
the rejected slot, and the function computes it exactly that way. The Re-Align defaults are
``text_weight = visual_weight = 1``, ``anchor_weight = nll_weight = 0``: a plain, unweighted sum
of two DPO losses with one beta.

Paper vs released trainer: all six terms above are *label* log-probs, the log-probability of the
actual sequence (``y_w`` or ``y_l``) under ``m`` or ``m_r``, as in the paper's rDPO equation
(the released repository's ``asset/pics/rDPO.png``). mmalign follows the paper. The released
trainer differs in two places (details below): it scores the rejected answer and the
retrieved-image chosen answer with the best *non-label* token at each position ("noisy" log-probs,
``_get_noisy_batch_logps``), and it adds ``sft_weight * CE(chosen)`` with an ``sft_weight`` that is
never set (so 0). Neither is reproduced.

Sources (what was checked, and where)
-------------------------------------
* ``rDPOtrainer.py`` (taco-group/Re-Align, ``rDPOTrainer.dpo_loss``): ``logits = (pc - pr) - (rc -
  rr)``; ``image_conditional_logits = (pc - pci) - (rc - rci)``; ``losses = -logsigmoid(beta *
  logits) - logsigmoid(beta * image_conditional_logits)`` (one ``self.beta``, no weights). The
  anchor line ``anchor_logits = pc - rc`` and its ``-logsigmoid(beta * anchor_logits)`` term are
  *commented out*. Logged rewards: ``beta * (pc - rc)``, ``beta * (pr - rr)`` and ``beta * (pci -
  rci)`` ("imageless"), with accuracies ``chosen > rejected`` and ``chosen > imageless``.
* Same file, ``concatenated_forward``: ``pc`` and ``pr`` use ``images=batch['images']`` (the
  original), ``pci`` runs the *chosen* input ids with ``images=batch['retrieved_images']``; the
  reference log-probs come from the same function run on the reference model, so one reference
  for both terms. In the released LoRA setup the reference is the policy with its adapter
  disabled (``ref_model`` is never passed; the separately loaded ``model_ref`` in
  ``train_rdpo.py`` is unused), i.e. the initial model.
* ``train_rdpo.py`` dataset: each record has ``image`` and ``retrieved_image``; both go through the
  same processor. ``train_lora_rdpo.sh`` / README: ``beta = 0.1``, lr ``1e-6``, cosine, warmup 0.03,
  per-device batch 1, gradient accumulation 8, bf16, LoRA (r 128, alpha 256, dropout 0.05 on
  q/k/v/o projections), 1 epoch (the ``num_train_epochs`` default); log-probs are summed
  (``average_log_prob=False``), ``loss_type`` sigmoid.
* The structure is mDPO's (Wang et al. 2024, "mDPO: Conditional Preference Optimization for
  Multimodal Large Language Models"; luka-group/mDPO ``mdpo_trainer.py``, whose ``dpo_loss``
  Re-Align's copies): mDPO sums the same three terms (text, image-conditional, anchor) with a
  *corrupted* copy of the image in place of ``m_r``; its paper writes the anchor as ``-log
  sigma(beta * (pc - rc) - delta)`` and its code uses ``delta = 0``. Re-Align replaces the
  corrupted image with the retrieved one and drops the anchor.
* The paper (abstract; project page ``index.html``): rDPO is "an extension of DPO that integrates
  an additional visual preference optimization objective"; its equation (``asset/pics/rDPO.png``)
  is the sum of the textual DPO term and the visual term over sequence (label) likelihoods, which
  is what this module computes.

What the released code does that this module leaves to the caller
-----------------------------------------------------------------
* The code scores the rejected answer (``pr``, ``rr``) and the retrieved-image chosen answer
  (``pci``, ``rci``) with ``_get_noisy_batch_logps`` (its vendored ``dpo_trainer.py``, which the
  README says to copy over TRL's): at each scored position it takes the log-prob of the
  highest-scoring token *other than the label* (top-1 unless top-1 is the label, then top-2),
  not of the label. ``pc``/``rc`` use the ordinary label log-prob. That is a choice of what
  sequence score goes in, not of the loss: this function takes whatever ``(B,)`` scores it is
  given. mmalign feeds it ordinary label log-probs for all six (the paper's equation, the DPO/mDPO
  reading, and what the variable names in the code describe); reproducing the released numbers
  would need that token-level scoring upstream.
* An SFT term: ``loss = sft_weight * CrossEntropy(chosen) + loss`` is in ``rDPOTrainer``, but
  ``sft_weight`` (a ``TrainingArguments`` field, default 0.0, in the later ``train_rdpo.py``) is
  never handed to the trainer, so in the released runs it is off. ``nll_weight`` here is that
  term, as a per-pair token-mean NLL (as :func:`~mmalign.losses.dpo.nll_anchored_dpo_loss`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmalign.losses.dpo import (
    DPOOutput,
    _as_beta,
    _check_pairs,
    _logratios,
    dpo_sigmoid_loss,
)

__all__ = ["RDPOOutput", "rdpo_loss"]


class RDPOOutput(NamedTuple):
    """What :func:`rdpo_loss` returns. ``loss``/``losses`` and the terms' ``losses`` carry gradient;
    every reward, margin and accuracy is detached (for logging).

    Attributes:
        loss: scalar, mean of ``losses`` over the pairs (what to backpropagate).
        losses: ``(B,)`` weighted total per pair: ``text_weight * text.losses + visual_weight *
            visual.losses + anchor_weight * anchor_losses + nll_weight * policy_chosen_nll``.
        text: :class:`DPOOutput` of the *unweighted* text term (same image, chosen vs rejected
            answer): ``losses`` ``(B,)``, ``loss`` its mean, ``chosen_rewards`` ``(B,)`` ``beta *
            (pc - rc)``, ``rejected_rewards`` ``(B,)`` ``beta * (pr - rr)``, ``margins`` ``(B,)``,
            ``reward_accuracy`` scalar (share of pairs with chosen > rejected; a tie is wrong).
        visual: :class:`DPOOutput` of the *unweighted* visual term (same chosen answer, original
            vs retrieved image): ``chosen_rewards`` ``(B,)`` ``beta * (pc - rc)`` (as in ``text``),
            ``rejected_rewards`` ``(B,)`` ``beta * (pci - rci)`` (Re-Align's "imageless" reward),
            ``margins`` ``(B,)``, ``reward_accuracy`` scalar (the code's "imageless accuracy").
        anchor_losses: ``(B,)`` unweighted anchor ``-log sigma(beta * (pc - rc) - delta)``,
            computed (and logged) whatever ``anchor_weight`` is.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    text: DPOOutput
    visual: DPOOutput
    anchor_losses: torch.Tensor


def rdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    policy_chosen_logps_rejimg: torch.Tensor,
    reference_chosen_logps_rejimg: torch.Tensor,
    beta: float | torch.Tensor,
    text_weight: float = 1.0,
    visual_weight: float = 1.0,
    anchor_weight: float = 0.0,
    anchor_delta: float = 0.0,
    policy_chosen_nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
) -> RDPOOutput:
    """Re-Align's rDPO: text DPO + visual DPO (original over retrieved image), optional anchor/NLL.

    ``losses[b] = text_weight * -log sigma(beta_b [(pc - rc) - (pr - rr)])
                + visual_weight * -log sigma(beta_b [(pc - rc) - (pci - rci)])
                + anchor_weight * -log sigma(beta_b (pc - rc) - anchor_delta)
                + nll_weight * policy_chosen_nll[b]``

    Defaults are the released Re-Align objective (weights 1, 1, 0, 0); pass ``beta=0.1`` for its
    script's value. With ``anchor_weight = 1`` (``anchor_delta = 0``) and a corrupted image in
    place of the retrieved one this is mDPO. The reference log-probs are detached.

    Args:
        policy_chosen_logps: ``(B,)`` ``pc``, summed log-probs of the chosen answer given the
            original image, under the policy.
        policy_rejected_logps: ``(B,)`` ``pr``, the rejected answer given the original image.
        reference_chosen_logps: ``(B,)`` ``rc``, as ``pc`` under the reference (detached here).
        reference_rejected_logps: ``(B,)`` ``rr``, as ``pr`` under the reference (detached here).
        policy_chosen_logps_rejimg: ``(B,)`` ``pci``, the *chosen* answer given the retrieved
            (rejected) image instead of the original, under the policy.
        reference_chosen_logps_rejimg: ``(B,)`` ``rci``, as ``pci`` under the same reference
            (detached here).
        beta: > 0, a float, scalar tensor or ``(B,)`` tensor (per-pair beta), shared by all
            terms (Re-Align uses one beta); detached.
        text_weight: >= 0, weight of the text term (1 in Re-Align; 0 switches it off).
        visual_weight: >= 0, weight of the visual term (1 in Re-Align; 0 gives plain DPO).
        anchor_weight: >= 0, weight of the reward anchor (0 in Re-Align, 1 in mDPO).
        anchor_delta: ``delta``, the anchor's offset: it pushes ``beta (pc - rc)`` above ``delta``
            (0 in mDPO's code).
        policy_chosen_nll: ``(B,)`` token-mean NLL of each chosen answer (original image) under the
            policy, with gradient; required when ``nll_weight > 0``.
        nll_weight: >= 0, weight of the NLL term (Re-Align's ``sft_weight``, 0 in its runs).

    Returns:
        :class:`RDPOOutput`: the weighted total, each unweighted term with its rewards, margins
        and accuracy.
    """
    weights = {"text_weight": text_weight, "visual_weight": visual_weight,
               "anchor_weight": anchor_weight, "nll_weight": nll_weight}
    for name, w in weights.items():
        if w < 0:
            raise ValueError(f"{name} must be >= 0, got {w}")
    if not any(weights.values()):
        raise ValueError("all term weights are 0: the loss would be identically 0")
    if nll_weight > 0 and policy_chosen_nll is None:
        raise ValueError("nll_weight > 0 needs policy_chosen_nll")

    text = dpo_sigmoid_loss(policy_chosen_logps, policy_rejected_logps,
                            reference_chosen_logps, reference_rejected_logps, beta)
    # The visual pair: same answer y_w, "chosen" = original image, "rejected" = retrieved image.
    visual = dpo_sigmoid_loss(policy_chosen_logps, policy_chosen_logps_rejimg,
                              reference_chosen_logps, reference_chosen_logps_rejimg, beta)
    chosen, _ = _logratios(policy_chosen_logps, policy_rejected_logps,
                           reference_chosen_logps, reference_rejected_logps)  # (B,) pc - rc
    anchor_losses = -F.logsigmoid(_as_beta(beta, chosen) * chosen - anchor_delta)

    losses = text_weight * text.losses + visual_weight * visual.losses + anchor_weight * anchor_losses
    if policy_chosen_nll is not None:
        _check_pairs(policy_chosen_logps, policy_chosen_nll)
        losses = losses + nll_weight * policy_chosen_nll
    return RDPOOutput(loss=losses.mean(), losses=losses, text=text, visual=visual,
                      anchor_losses=anchor_losses)
