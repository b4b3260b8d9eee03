"""DRESS's conditional-RL loss: the weighted mean of per-example NLLs of the scored turn.

With ``lp_b`` the per-token log-probs of example ``b``'s last assistant turn (the response, or the
revision), ``n_b`` its token count and ``w_b`` its kind's weight
(:class:`mmalign.methods.dress.DRESSModule`):

    NLL_b = -(1 / n_b) * sum_t lp_b[t]
    loss  = sum_b w_b * NLL_b / sum_b w_b
"""

from __future__ import annotations

import torch


def dress_loss_terms(logps: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_b w_b NLL_b, sum_b w_b)``, the two halves of :func:`dress_loss` (examples without
    scored tokens get weight 0), split so data parallelism can divide each rank's sum by the
    all-reduced weight total (:func:`mmalign.methods.base.global_denominator`).

    Args: as :func:`dress_loss`. Returns two scalars.
    """
    n = mask.sum(dim=1)                                                   # (B,)
    nll = -(logps * mask).sum(dim=1) / n.clamp(min=1)                     # (B,)
    w = weights.to(nll.dtype) * (n > 0).to(nll.dtype)
    return (w * nll).sum(), w.sum()


def dress_loss(logps: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_b w_b NLL_b / sum_b w_b`` with ``NLL_b`` the mean negative log-prob of example
    ``b``'s scored tokens (examples without scored tokens or with weight 0 do not count).

    Args:
        logps: ``(B, T)`` label log-probs (0 where masked).
        mask: ``(B, T)`` float, 1 on the scored tokens (the last assistant turn).
        weights: ``(B,)`` per-example weights >= 0.
    """
    weighted, total = dress_loss_terms(logps, mask, weights)
    if total <= 0:
        return weighted * 0.0
    return weighted / total
