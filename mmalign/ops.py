"""Small pure tensor functions shared by every method."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label token under ``logits``.

    Args:
        logits: ``(B, T, V)`` next-token logits; position ``t`` predicts token ``t + 1``.
        labels: ``(B, T)`` token ids, ``ignore_index`` where no loss is taken (prompt, image,
            padding).

    Returns:
        ``(logps, mask)``, both ``(B, T - 1)``: ``logps[b, t] = log softmax(logits[b, t])[labels[b, t + 1]]``
        (0 where masked) and ``mask`` the float mask of scored positions.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != ignore_index
    safe = targets.masked_fill(~mask, 0)
    # log_softmax + gather is the exact form; logsumexp keeps it one pass over V.
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return logps * mask, mask.float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when nothing is masked in)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)
