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
    targets = labels[:, 1:]
    mask = targets != ignore_index
    logps = gather_logprobs(logits[:, :-1], targets.masked_fill(~mask, 0))
    return logps * mask, mask.float()


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., ids]`` in float32: ``(B, T, V)`` logits, ``(B, T)`` ids -> ``(B, T)``."""
    logits = logits.float()
    # log_softmax + gather is the exact form; logsumexp keeps it one pass over V.
    return torch.gather(logits, -1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 when nothing is masked in)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)
