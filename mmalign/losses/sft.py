"""The supervised fine-tuning loss (visual instruction tuning): next-token NLL on assistant turns.

With ``lp[b, t] = log p(label[b, t] | tokens < t, images)``, ``m[b, t] = 1`` where ``label[b, t]``
is scored (prompt, image and padding positions carry no loss), ``n_b = sum_t m[b, t]`` the
scored tokens of example ``b`` and ``B`` the examples of the batch that have any (``n_b > 0``):

    "token"   (LLaVA's):  loss = - (1 / N) * sum_{b, t} m[b, t] * lp[b, t],   N = sum_b n_b
    "example":            loss = - (1 / B) * sum_b (1 / n_b) * sum_t m[b, t] * lp[b, t]

"token" weighs every scored token the same, so an example weighs in proportion to its answer
length: next to ~39-token detailed captions a one-token "Yes." gets ~1 % of the gradient.
"example" weighs every example the same, whatever its answer length.
"""

from __future__ import annotations

from typing import Literal

import torch

LossNormalization = Literal["token", "example"]


def sft_loss_terms(logps: torch.Tensor, mask: torch.Tensor, normalization: LossNormalization = "token"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed negative log-likelihood and the count it is averaged over: ``loss = total / count``.

    Split so that data parallelism can divide each rank's ``total`` by the *global* count
    (:func:`mmalign.methods.base.global_denominator`) instead of its own.

    Args:
        logps: ``(B, T)`` log-probabilities of the label tokens (any value where masked).
        mask: ``(B, T)`` float, 1 where the token is scored.
        normalization: "token": ``total = -sum_{b,t} m lp``, ``count = N`` the scored tokens;
            "example": ``total = -sum_b (1 / n_b) sum_t m lp``, ``count = B`` the examples with any.

    Returns:
        ``(total, count)``, two scalars (``count`` as float, not clamped).
    """
    if normalization == "token":
        return -(logps * mask).sum(), mask.sum()
    if normalization == "example":
        n = mask.sum(dim=1)                                            # (B,) scored tokens per example
        per_example = (logps * mask).sum(dim=1) / n.clamp(min=1)       # (B,) mean log-prob per example
        has = (n > 0).to(per_example.dtype)                            # (B,) examples that count
        return -(per_example * has).sum(), has.sum()
    raise ValueError(f"loss normalization must be 'token' or 'example', not {normalization!r}")


def sft_loss(logps: torch.Tensor, mask: torch.Tensor, normalization: LossNormalization = "token") -> torch.Tensor:
    """Negative log-likelihood of the scored tokens, normalised per ``normalization``.

    Args:
        logps: ``(B, T)`` log-probabilities of the label tokens (any value where masked).
        mask: ``(B, T)`` float, 1 where the token is scored.
        normalization: "token" = mean over all scored tokens of the batch; "example" = mean over
            each example's scored tokens, then mean over the examples that have any.

    Returns:
        A scalar; 0 when nothing is scored.
    """
    total, count = sft_loss_terms(logps, mask, normalization)
    return total / count.clamp(min=1)
