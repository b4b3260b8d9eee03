"""Pairwise preference losses over sequence log-probabilities: DPO, IPO, NLL-anchored DPO, and
MM-RLHF's per-pair beta.

Every loss takes four ``(B,)`` tensors, one entry per preference pair ``b``:

    pc = policy_chosen_logps[b]      rc = reference_chosen_logps[b]
    pr = policy_rejected_logps[b]    rr = reference_rejected_logps[b]

each the *sum* over the completion's scored tokens of ``log p(token | prefix, image)`` (the
image and prompt tokens are not scored). With the implicit reward of a response
``r(y) = beta * (log pi(y) - log ref(y))`` the shared quantity is the margin of log-ratios

    h = (pc - rc) - (pr - rr)

The reference log-probs are constants: every function detaches them (and beta, and the reward
margin in :func:`dynamic_beta`), so no gradient reaches the reference model or the reward model
whatever the caller passes.

Definitions and sources
-----------------------
* DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
  Reward Model", eq. 7): ``loss = -log sigma(beta * h)``. Conservative DPO (Mitchell 2023, "A
  note on DPO with noisy preferences & relationship to IPO") with label smoothing ``eps``, the
  probability that the label is flipped: ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``.
  (The MM-RLHF trainer's ``label_smoothing`` is the *opposite* convention: its default 1.0 is
  plain DPO. Here 0.0 is plain DPO, as in TRL and torchtune.)
* IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", eq. 17): ``loss = (h - 1 / (2 tau))^2``.
* NLL-anchored DPO / RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"):
  ``loss = DPO + alpha * NLL(chosen)``, the NLL a mean over the chosen completion's tokens.
* Dynamic Reward Scaling (Zhang et al. 2025, "MM-RLHF: The Next Step Forward in Multimodal LLM
  Alignment", MM-DPO): ``beta(delta) = beta_ori * (1 + w * (1 - exp(-k * delta)))`` with
  ``delta = r_RM(y_w) - r_RM(y_l)`` the reward model's margin for the pair
  (:func:`dynamic_beta`). This per-pair beta from the *reward model's* margin is the paper's
  method and what mmalign trains with by default.

What the released MM-DPO trainer does instead
---------------------------------------------
Read in github.com/Kwai-YuanQi/MM-RLHF at commit 7c8af1d (files named below):

* ``trl/trainer/dpo_trainer.py``, ``DPOTrainer.dpo_loss(..., ls_factor=1.0, vision=False,
  implicit_beta=True)``: the ``sigmoid`` branch first sets a per-pair
  ``beta_used = beta * (1 + ls_factor_weight * ls_factor)`` floored at 1e-3, then, because
  ``implicit_beta`` is True by default and no caller passes it (``get_batch_loss_metrics`` calls
  ``self.dpo_loss(..., batch['ls_factor'], vision=vision)``), *overwrites* it with one beta for
  the whole batch, beta-DPO style (Wu et al. 2024, "beta-DPO: Direct Preference Optimization with
  Dynamic beta"): the detached DPO logits ``h`` of all pairs (gathered over the ranks) give
  ``mean``, ``std``, Gaussian weights ``exp(-0.5 ((h - mean) / (std + 1e-7))^2)``; 80 % of the
  pairs (``int(0.8 N)``) are drawn without replacement with those weights, and
  ``beta_used = beta * (1 + ls_factor_weight * (mean(h[drawn]) - mean))``, floored at 1e-3
  (:func:`released_batch_beta`). It reads the policy's own log-ratio margins against the
  reference, not the reward model.
* Nothing in the release computes ``ls_factor``: ``llava/train/train_dpo.py``
  (``DPODataset._get_item``) takes it from the record when present and defaults it to 1.0, and
  no script or data-preparation code writes it.
* ``scripts/train/dpo_ov7b.sh`` runs with ``--beta 0.1 --ls_factor_weight 0.1`` (w = 0.1),
  ``--gamma 0.25`` (the chosen answer's SFT loss) and ``--dpo_alpha 1.0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["DPOOutput", "all_pairs", "dpo_sigmoid_loss", "dynamic_beta", "ipo_loss",
           "nll_anchored_dpo_loss", "released_batch_beta"]


class DPOOutput(NamedTuple):
    """What every pairwise loss returns. All but ``loss`` are detached (for logging).

    Attributes:
        loss: scalar, mean of ``losses`` over the pairs (what to backpropagate).
        losses: ``(B,)`` per-pair loss (with gradient).
        chosen_rewards: ``(B,)`` implicit reward of the chosen response, ``beta * (pc - rc)``.
        rejected_rewards: ``(B,)`` implicit reward of the rejected response, ``beta * (pr - rr)``.
        reward_accuracy: scalar, share of pairs with ``chosen_rewards > rejected_rewards``
            (a tie counts as wrong).
        margins: ``(B,)`` ``chosen_rewards - rejected_rewards`` (``= beta * h``).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    margins: torch.Tensor


# ---------------------------------------------------------------------------------------------
# helpers


def _check_pairs(*xs: torch.Tensor) -> None:
    """All inputs must be 1-D and of one shape ``(B,)``."""
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"expected (B,) tensors of one shape, got shapes {[tuple(x.shape) for x in xs]}")


def _as_beta(beta: float | torch.Tensor, like: torch.Tensor, name: str = "beta") -> torch.Tensor:
    """``beta`` as a detached tensor broadcastable to ``like`` ``(B,)``: a scalar or ``(B,)``."""
    b = torch.as_tensor(beta, dtype=like.dtype, device=like.device).detach()
    if b.dim() > 1 or (b.dim() == 1 and b.shape != like.shape):
        raise ValueError(f"{name} must be a scalar or a {tuple(like.shape)} tensor, got shape {tuple(b.shape)}")
    if not bool((b > 0).all()):
        raise ValueError(f"{name} must be > 0")
    return b


def _output(losses: torch.Tensor, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
            scale: torch.Tensor) -> DPOOutput:
    """Pack the per-pair losses with the implicit rewards ``scale * logratio`` (detached)."""
    chosen_rewards = (scale * chosen_logratios).detach()
    rejected_rewards = (scale * rejected_logratios).detach()
    margins = chosen_rewards - rejected_rewards
    return DPOOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).float().mean(),
        margins=margins,
    )


def _logratios(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pc - rc, pr - rr)``, both ``(B,)``, the reference terms detached."""
    _check_pairs(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return (policy_chosen_logps - reference_chosen_logps.detach(),
            policy_rejected_logps - reference_rejected_logps.detach())


# ---------------------------------------------------------------------------------------------
# losses


def dpo_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """DPO (Rafailov et al. 2023), optionally conservative (label smoothing).

    ``losses[b] = -(1 - eps) * log sigma(beta_b * h_b) - eps * log sigma(-beta_b * h_b)`` with
    ``h = (pc - rc) - (pr - rr)``; ``eps = 0`` is plain DPO, ``-log sigma(beta * h)``.

    Args:
        policy_chosen_logps: ``(B,)`` summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: ``(B,)`` same for the rejected completions.
        reference_chosen_logps: ``(B,)`` summed log-probs of the chosen completions under the
            reference model (detached here).
        reference_rejected_logps: ``(B,)`` same for the rejected completions (detached here).
        beta: > 0, a float or a scalar tensor (one beta for all pairs), or a ``(B,)`` tensor of
            per-pair betas (MM-DPO's Dynamic Reward Scaling, see :func:`dynamic_beta`); detached.
        label_smoothing: ``eps`` in ``[0, 0.5]``, the assumed probability that a label is
            flipped (cDPO). Note the MM-RLHF code's ``label_smoothing`` means ``1 - eps``.

    Returns:
        :class:`DPOOutput`; the rewards are scaled by the same (per-pair) beta as the loss.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps,
                                  reference_chosen_logps, reference_rejected_logps)
    b = _as_beta(beta, chosen)
    logits = b * (chosen - rejected)                                   # (B,) beta * h
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _output(losses, chosen, rejected, b)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    tau: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> DPOOutput:
    """IPO (Azar et al. 2023, eq. 17): ``losses[b] = (h_b - 1 / (2 tau))^2``.

    IPO regresses the log-ratio margin onto the target ``1 / (2 tau)`` instead of pushing it to
    infinity, so the scale of ``h`` matters. With sequence (summed) log-probs ``h`` grows with
    response length and a fixed target means little; the common implementations (TRL, and the
    MM-RLHF trainer, which sets ``average_log_prob = loss_type == "ipo"``) use *per-token
    average* log-probs instead. Pass ``chosen_lengths`` and ``rejected_lengths`` to get that:
    each of the four log-probs is divided by its completion's token count before ``h`` is
    formed (policy and reference of a completion share the count). Without lengths, ``h`` is
    the margin of summed log-probs, as the paper writes it.

    Args:
        policy_chosen_logps: ``(B,)`` summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: ``(B,)`` same for the rejected completions.
        reference_chosen_logps: ``(B,)`` reference model, chosen (detached here).
        reference_rejected_logps: ``(B,)`` reference model, rejected (detached here).
        tau: > 0, the regularisation strength (TRL calls it beta); the target margin is
            ``1 / (2 tau)``.
        chosen_lengths: ``(B,)`` scored tokens of each chosen completion, or None (both or
            neither); counts below 1 are taken as 1.
        rejected_lengths: ``(B,)`` same for the rejected completions.

    Returns:
        :class:`DPOOutput`; rewards are ``tau * log-ratio`` on the scale ``h`` is computed on
        (per-token when lengths are given), as TRL logs them.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    chosen, rejected = _logratios(policy_chosen_logps, policy_rejected_logps,
                                  reference_chosen_logps, reference_rejected_logps)
    if chosen_lengths is not None:
        _check_pairs(chosen, chosen_lengths, rejected_lengths)
        chosen = chosen / chosen_lengths.to(chosen.dtype).clamp(min=1)
        rejected = rejected / rejected_lengths.to(rejected.dtype).clamp(min=1)
    losses = (chosen - rejected - 1.0 / (2.0 * tau)) ** 2
    return _output(losses, chosen, rejected, torch.as_tensor(tau, dtype=chosen.dtype, device=chosen.device))


def nll_anchored_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    policy_chosen_nll: torch.Tensor,
    beta: float | torch.Tensor,
    alpha: float,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """DPO plus ``alpha`` times the NLL of the chosen response (RPO, Pang et al. 2024).

    ``losses[b] = dpo_sigmoid_loss(...).losses[b] + alpha * policy_chosen_nll[b]``. The NLL term
    keeps the chosen response likely: plain DPO only widens the *gap* and can do so by lowering
    both log-probs, which ends in a collapsed policy. Pang et al. use ``alpha = 1`` with the NLL
    normalised by length, as here. (The MM-RLHF trainer adds ``gamma`` times the token-mean
    cross-entropy over all chosen tokens of the batch, ``gamma = 0.25`` in its 7B script: the
    same idea with token rather than per-pair weighting.)

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, beta, label_smoothing: as in :func:`dpo_sigmoid_loss`.
        policy_chosen_nll: ``(B,)`` mean per-token negative log-likelihood of each chosen
            completion under the policy (with gradient), e.g. ``-(logps * mask).sum(1) /
            mask.sum(1)`` from :func:`mmalign.ops.token_logprobs`.
        alpha: >= 0, weight of the NLL term; 0 gives plain DPO.

    Returns:
        :class:`DPOOutput` with ``losses``/``loss`` including the NLL term; the rewards, accuracy
        and margins are DPO's. The NLL part of ``loss`` is ``alpha * policy_chosen_nll.mean()``.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    _check_pairs(policy_chosen_logps, policy_chosen_nll)
    out = dpo_sigmoid_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta, label_smoothing)
    losses = out.losses + alpha * policy_chosen_nll
    return out._replace(loss=losses.mean(), losses=losses)


# ---------------------------------------------------------------------------------------------
# MM-DPO (MM-RLHF)


def dynamic_beta(
    reward_margin: torch.Tensor,
    beta_ori: float,
    w: float,
    k: float,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Per-pair beta of MM-DPO's Dynamic Reward Scaling (Zhang et al. 2025, MM-RLHF).

    ``beta(delta) = beta_ori * (1 + w * (1 - exp(-k * delta)))``, ``delta = r(y_w) - r(y_l)`` the
    reward model's score margin for the pair. ``delta = 0`` gives ``beta_ori``; ``beta`` rises
    with ``delta`` (for ``w, k > 0``) and saturates at ``beta_ori * (1 + w)``, so pairs the
    reward model is confident about get a larger beta (a sharper, more heavily weighted loss).

    ``delta < 0`` (the reward model disagrees with the label) is *not* clipped at 0: the paper
    does not say, and such pairs get ``beta < beta_ori``. Since ``1 - exp(-k delta)`` is
    unbounded below, a large negative ``delta`` drives beta to 0 and then negative, which would
    *reverse* the preference. Pass ``clip`` to bound the result: ``(1e-3, math.inf)`` is the
    floor the released trainer puts on every beta it uses (its per-pair beta is overwritten by
    a batch-level one by default, see the module docstring and :func:`released_batch_beta`);
    clip ``reward_margin`` at 0 yourself to treat disagreeing pairs as plain DPO pairs
    (``beta_ori``) instead.

    Args:
        reward_margin: ``(B,)`` ``delta``, reward-model score of the chosen minus the rejected
            response (detached here: the reward model gets no gradient).
        beta_ori: > 0, the base DPO beta (0.1 in the MM-RLHF scripts).
        w: weight of the dynamic part (the paper's w; the release's ``ls_factor_weight``, 0.1 in
            its 7B script).
        k: rate at which the scaling saturates in ``delta`` (scale it to the reward model's
            score range: ``k * delta`` of a few means saturated).
        clip: ``(low, high)`` bounds on the returned beta, or None for none.

    Returns:
        ``(B,)`` per-pair beta, to pass as ``beta`` to :func:`dpo_sigmoid_loss`.
    """
    if beta_ori <= 0:
        raise ValueError(f"beta_ori must be > 0, got {beta_ori}")
    delta = reward_margin.detach()
    beta = beta_ori * (1.0 + w * (1.0 - torch.exp(-k * delta)))
    if clip is not None:
        low, high = clip
        if not low <= high:
            raise ValueError(f"clip must be (low, high) with low <= high, got {clip}")
        beta = beta.clamp(min=low, max=high)
    return beta


def released_batch_beta(
    logits: torch.Tensor,
    beta: float,
    w: float,
    keep: float = 0.8,
    floor: float = 1e-3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The one beta the released MM-DPO trainer uses for a whole batch (``implicit_beta=True``,
    its default; ``trl/trainer/dpo_trainer.py`` ``DPOTrainer.dpo_loss`` in Kwai-YuanQi/MM-RLHF).

    With ``h`` the detached DPO logits of the batch's ``N`` pairs (gathered over the ranks by
    the caller), ``m = mean(h)`` and ``s = std(h)`` (unbiased, as ``torch.std``):

        weights_b = exp(-0.5 * ((h_b - m) / (s + 1e-7))^2)
        D         = int(keep * N) indices drawn without replacement with these weights
        beta_used = max(floor, beta * (1 + w * (mean(h[D]) - m)))

    The draw favours pairs near the batch mean, so ``mean(h[D]) - m`` is positive when the
    outlying pairs lie below the mean (beta grows) and negative when they lie above it. It is
    random: pass ``generator`` for a reproducible draw (the trainer uses the global RNG).

    Where the release would fail, this returns ``beta`` (floored): with fewer pairs than make
    one draw (``int(keep * N) == 0``, e.g. one pair per global batch) the release's ``std`` is
    NaN and ``torch.multinomial`` raises.

    Args:
        logits: ``(N,)`` ``h = (pc - rc) - (pr - rr)`` of each pair, unscaled by beta (detached here).
        beta: > 0, the base beta (0.1 in the release's script).
        w: the release's ``ls_factor_weight`` (0.1 in its script).
        keep: share of the pairs drawn (0.8 in the release).
        floor: lower bound on the result (1e-3 in the release).
        generator: random source of the draw; None = torch's global RNG.

    Returns:
        A 0-d tensor: the batch's beta.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if logits.ndim != 1 or logits.numel() == 0:
        raise ValueError(f"expected a non-empty (N,) tensor of DPO logits, got shape {tuple(logits.shape)}")
    a = logits.detach().float()
    n_draw = int(a.numel() * keep)
    if n_draw == 0:
        return torch.tensor(max(beta, floor), dtype=a.dtype, device=a.device)
    mean = a.mean()
    std = a.std() if a.numel() > 1 else torch.zeros((), dtype=a.dtype, device=a.device)
    weights = torch.exp(-0.5 * ((a - mean) / (std + 1e-7)) ** 2)
    drawn = torch.multinomial(weights, n_draw, replacement=False, generator=generator)
    return (beta * (1.0 + w * (a[drawn].mean() - mean))).clamp(min=floor)


def all_pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    """Every comparison pair of one prompt's ranked responses, as ``(chosen, rejected)`` indices.

    MM-DPO trains on all pairs with a strict preference, not only best against worst: ``(i, j)``
    for every ``scores[i] > scores[j]``; tied responses make no pair. Order is deterministic:
    by ``i``, then ``j`` (the order of ``scores``). ``n`` responses with distinct scores give
    ``n (n - 1) / 2`` pairs.

    Args:
        scores: one score per response (higher is better); NaN is refused.

    Returns:
        List of ``(i, j)`` index pairs, ``scores[i] > scores[j]``.
    """
    s = [float(x) for x in scores]
    if any(math.isnan(x) for x in s):
        raise ValueError(f"scores contain NaN: {list(scores)}")
    return [(i, j) for i in range(len(s)) for j in range(len(s)) if s[i] > s[j]]
