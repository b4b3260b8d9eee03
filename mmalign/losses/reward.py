"""Reward-model losses over scores: Bradley-Terry ranking, the tie loss, reward centring, and where a
score is read.

A reward model maps one (image, prompt, response) row to a scalar score. A preference pair ``b``
gives two scores, ``c = chosen_scores[b]`` for the preferred response and ``r = rejected_scores[b]``
for the other. Under the Bradley-Terry model (Bradley & Terry 1952, "Rank Analysis of Incomplete
Block Designs: I. The Method of Paired Comparisons") ``P(chosen preferred) = sigma(c - r)``, so the
maximum-likelihood loss of a pair is

    loss_b = -log sigma(c - r - m_b)

with ``m_b = 0`` for the plain model, or a per-pair margin ``m_b >= 0`` that asks the chosen score
to lead by at least that much (Llama 2, Touvron et al. 2023, sec. 3.2.2: the margin grows with how
clearly the annotators preferred the chosen response).

Tied pairs (two responses the annotators ranked equal) carry no preference, so Bradley-Terry has
nothing to fit; MM-RLHF's reward trainer asks their scores to be *equal* instead, with the squared
difference ``mean over tied pairs of (c - r)^2`` (:func:`tie_loss`), weighted by ``tie_weight``
and added to the Bradley-Terry mean over the untied pairs.

Reward centring (Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but
do not Eliminate Reward Hacking") penalises ``mean((c + r)^2)`` so that scores stay near zero; the
Bradley-Terry loss only sees differences and leaves the offset free. The MM-RLHF reward trainer
(``trl/trainer/reward_trainer.py``, ``RewardTrainer.compute_loss``, in github.com/Kwai-YuanQi/MM-RLHF
at commit 7c8af1d) uses the same terms::

    loss_reward = mean_{untied} -logsigmoid(c - r [- margin]) + tie_weight * mean_{tied} (c - r)^2
    loss_reward = float_rewards_weight * loss_reward
                  + center_rewards_coefficient * mean_{all pairs} (c + r)^2
    loss        = loss_reward + critic_rewards_weight * (LM_chosen + LM_rejected)

(``center_rewards_coefficient`` 0.01 in its ``scripts/train/critic_reward_7b.sh``). Its tied pairs
are the records with ``is_tie`` true (``llava/train/train_dpo.py`` passes the flag through);
``tie_weight`` is read from the training arguments but the released ``TrainingArguments`` does not
define it, so the release gives no value for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmalign.ops import IGNORE_INDEX

__all__ = ["bradley_terry_loss", "gather_at", "last_label_index", "reward_centering", "tie_loss"]


def _check_pair_scores(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.ndim != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"expected two (B,) score tensors of one shape, got {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    if chosen.numel() == 0:
        raise ValueError("no pairs: the score tensors are empty")


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry ranking loss of preference pairs, and the ranking accuracy.

    Args:
        chosen_scores: ``(B,)`` scores of the preferred responses.
        rejected_scores: ``(B,)`` scores of the dispreferred responses.
        margin: None (plain Bradley-Terry), a float, or ``(B,)`` per-pair margins ``m``; the loss
            of pair ``b`` is then ``-log sigma(c_b - r_b - m_b)``. Detached: a margin is a target,
            never trained.

    Returns:
        ``(loss, accuracy)``: ``loss`` the scalar mean over pairs of ``-log sigma(c - r - m)``
        (computed as ``softplus(-(c - r - m))``, exact and stable for large differences);
        ``accuracy`` the detached share of pairs with ``c > r`` (a tie counts as wrong, and the
        margin plays no part: it asks whether the model *ranks* the pair right).
    """
    _check_pair_scores(chosen_scores, rejected_scores)
    diff = chosen_scores.float() - rejected_scores.float()                  # (B,)
    if margin is not None:
        m = torch.as_tensor(margin, dtype=diff.dtype, device=diff.device).detach()
        if m.ndim not in (0, 1) or (m.ndim == 1 and m.shape != diff.shape):
            raise ValueError(f"margin must be a number or a (B,) tensor with B={diff.numel()}, got shape {tuple(m.shape)}")
        diff_m = diff - m
    else:
        diff_m = diff
    loss = F.softplus(-diff_m).mean()                                       # -log sigma(x) = softplus(-x)
    accuracy = (diff > 0).float().mean().detach()
    return loss, accuracy


def tie_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """MM-RLHF's loss for tied pairs: ``mean over pairs of (c - r)^2``, minimised when the reward
    model scores the two responses alike (``tie_rewards_diff.mean()`` in the released
    ``RewardTrainer.compute_loss``). Which side is called "chosen" does not matter: the loss is
    symmetric.

    Args:
        chosen_scores, rejected_scores: ``(B,)`` scores of the two responses of each tied pair.

    Returns:
        A scalar, with gradient.
    """
    _check_pair_scores(chosen_scores, rejected_scores)
    return ((chosen_scores.float() - rejected_scores.float()) ** 2).mean()


def reward_centering(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """``mean over pairs of (c + r)^2``: keeps the scores' offset near zero (MM-RLHF's
    ``center_rewards_coefficient`` term, which multiplies this).

    Args:
        chosen_scores, rejected_scores: ``(B,)`` each.

    Returns:
        A scalar.
    """
    _check_pair_scores(chosen_scores, rejected_scores)
    return ((chosen_scores.float() + rejected_scores.float()) ** 2).mean()


def gather_at(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row at one position: ``out[b] = hidden[b, index[b]]``.

    Args:
        hidden: ``(B, T, H)``.
        index: ``(B,)`` integer positions, each in ``[0, T)``.

    Returns:
        ``(B, H)``, differentiable with respect to ``hidden``.
    """
    if hidden.ndim != 3 or index.ndim != 1 or index.shape[0] != hidden.shape[0]:
        raise ValueError(f"expected hidden (B, T, H) and index (B,), got {tuple(hidden.shape)} and {tuple(index.shape)}")
    t = hidden.shape[1]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= t):
        raise ValueError(f"index out of range [0, {t}): {index.tolist()}")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, index.to(hidden.device).long()]


def last_label_index(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Position of the last labelled token of each row: where a reward head reads.

    The collators label the assistant turn (the response, or the critique), including the chat
    template's end-of-turn token, so this is the end of the scored text. Its hidden state has
    attended to every token of the image, the prompt and the scored text.

    Args:
        labels: ``(B, T)`` token ids, ``ignore_index`` where not labelled.

    Returns:
        ``(B,)`` long positions. A row with no labelled token is an error (it has nothing to score).
    """
    if labels.ndim != 2:
        raise ValueError(f"expected labels (B, T), got {tuple(labels.shape)}")
    labelled = labels != ignore_index                                       # (B, T)
    empty = (~labelled.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"row(s) {empty} have no labelled token: nothing to score")
    t = labels.shape[1]
    positions = torch.arange(t, device=labels.device).expand_as(labels)
    return torch.where(labelled, positions, torch.full_like(positions, -1)).max(dim=1).values
